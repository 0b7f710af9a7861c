"""
miniclip against PyTorch (transformers' CLIPModel) on the same machine, weights and inputs, in one run.

    python benchmarks/bench.py            the whole table, about 15 minutes on 2 cores
    python benchmarks/bench.py --quick    two rounds, fewer repeats
    python benchmarks/bench.py --baseline ../old     also another checkout's miniclip, in the same rounds

Both sides load one save_pretrained folder of random weights and use the same number of threads.
Each measurement runs in a fresh subprocess, so its peak memory is its own: after loading the weights
the process notes its resident memory, resets its peak (Linux's /proc/self/clear_refs), runs, and
reports the peak (VmHWM) above that baseline: activations, gradients and optimizer state. A time is
the median of the repeats after one warm-up. The train steps take turns over five rounds (each side,
and each of miniclip's speed tricks undone, once a round), and a ratio is the median of the rounds'
ratios: this machine's speed drifts by 10-30% between runs. GFLOP/s counts the matrix products each
side runs (2 flops per multiply-add, 3x the forward's for a train step; miniclip's last blocks do less,
see matmul_flops), as a share of measured sgemm peak.
"""
import argparse
import dataclasses
import json
import math
import os
import statistics
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
import miniclip as mc  # noqa: E402  before NumPy: it makes OpenBLAS's settings (mc.cpu_settings)
import numpy as np  # noqa: E402
import weights                                          # noqa: E402

THREADS = os.cpu_count()


def spec_of(cfg):
    return dict(image=cfg.image_size, patch=cfg.patch_size, vision=(cfg.vision_width, cfg.vision_layers, cfg.vision_heads),
                text=(cfg.text_width, cfg.text_layers, cfg.text_heads), vocab=cfg.vocab_size, context=cfg.context_length,
                embed=cfg.embed_dim)


# The tiny train step over head widths and depths: the preset (width 96, 3 heads of 32, 3 image and 2
# text layers), then one change at a time. Small heads mean many small matrix products in attention.
tiny = mc.PRESETS["tiny"]
TINY = spec_of(tiny)
TRAIN_SPECS = {
    "tiny preset: 3 heads of 32, 3 + 2 layers": TINY,
    "heads of 16 (6 heads)": spec_of(dataclasses.replace(tiny, vision_heads=6, text_heads=6)),
    "heads of 24 (4 heads)": spec_of(dataclasses.replace(tiny, vision_heads=4, text_heads=4)),
    "heads of 48 (2 heads)": spec_of(dataclasses.replace(tiny, vision_heads=2, text_heads=2)),
    "4 heads of 24, 3 + 3 layers": spec_of(dataclasses.replace(tiny, vision_heads=4, text_heads=4, text_layers=3)),
    "3 heads of 32, 6 + 4 layers": spec_of(dataclasses.replace(tiny, vision_layers=6, text_layers=4)),
}
B32 = spec_of(mc.PRESETS["ViT-B/32"])


def hf_config(spec):
    import transformers
    (vw, vl, vh), (tw, tl, th) = spec["vision"], spec["text"]
    return transformers.CLIPConfig(
        text_config=dict(vocab_size=spec["vocab"], hidden_size=tw, intermediate_size=4 * tw, num_hidden_layers=tl,
                         num_attention_heads=th, max_position_embeddings=spec["context"],
                         eos_token_id=spec["vocab"] - 1, hidden_act="quick_gelu"),
        vision_config=dict(hidden_size=vw, intermediate_size=4 * vw, num_hidden_layers=vl, num_attention_heads=vh,
                           image_size=spec["image"], patch_size=spec["patch"], hidden_act="quick_gelu"),
        projection_dim=spec["embed"], attn_implementation="eager")


def make_folder(spec, folder):
    import torch
    import transformers
    torch.manual_seed(0)
    transformers.CLIPModel(hf_config(spec)).save_pretrained(folder)


def inputs(spec, n, text_len):
    rng = np.random.default_rng(0)
    pixels = rng.standard_normal((n, 3, spec["image"], spec["image"])).astype(np.float32)
    ids = rng.integers(1, spec["vocab"] - 2, (n, text_len))
    ids[:, 0] = spec["vocab"] - 2
    ids[:, -1] = spec["vocab"] - 1                       # every text fills the row, EOT last
    return pixels, ids


def matmul_flops(spec, n, text_len, image=True, text=True, one_position=False):
    """
    Forward multiply-adds x 2 of the matrix products: projections, MLPs, attention scores and mixing.
    one_position: each tower's last block as miniclip runs it, its q, k, v projection at every position
    and the rest (scores, mixing, out_proj, MLP) for one query per sequence.
    """
    def tower(width, layers, T):
        per_layer = 2 * n * T * (12 * width * width) + 2 * 2 * n * T * T * width
        if not one_position:
            return layers * per_layer
        last = 2 * n * (T * 3 * width * width + 9 * width * width) + 2 * 2 * n * T * width
        return (layers - 1) * per_layer + last
    total = 0
    if image:
        T = (spec["image"] // spec["patch"]) ** 2 + 1
        total += tower(spec["vision"][0], spec["vision"][1], T) + 2 * n * (T - 1) * 3 * spec["patch"] ** 2 * spec["vision"][0]
    if text:
        total += tower(spec["text"][0], spec["text"][1], text_len)
    return total


def reset_peak():
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")


def peak_mib():
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024


def timed(fn, repeats):
    fn()
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def measure(framework, task, spec, folder, repeats):
    """
    Runs in its own process: load the weights, note the resident memory, then build the optimizer (for a
    train step) and time the work. Returns the median seconds and the peak memory above that baseline.
    """
    n, text_len = {"train": (128, 16), "image": (16, 77), "text": (256, 77)}[task]
    pixels, ids = inputs(spec, n, text_len)
    if framework == "miniclip":
        mc.cpu_settings()                               # as train.py's main() does
        if os.environ.get("BENCH_ROWS_WHOLE") == "1":
            mc.MIN_SPLIT = math.inf                     # by_rows then runs every array in one piece
        if os.environ.get("BENCH_LAST_BLOCK_WHOLE") == "1":
            every_position_through_the_last_block()
        params, cfg = weights.load_weights(folder)
        baseline = rss_mib()
        reset_peak()
        if task == "train":
            opt = mc.AdamW(params)

            def fn():
                loss, grads = mc.loss_and_grads(params, cfg, pixels, ids)
                opt.step(params, grads, 1e-5)
        elif task == "image":
            fn = lambda: mc.encode_image(params, cfg, pixels)
        else:
            fn = lambda: mc.encode_text(params, cfg, ids)
    else:
        import torch
        import transformers
        torch.set_num_threads(THREADS)
        model = transformers.CLIPModel.from_pretrained(folder, attn_implementation="eager")
        px, tid = torch.from_numpy(pixels), torch.from_numpy(ids)
        baseline = rss_mib()
        reset_peak()
        if task == "train":
            model.train()
            opt = torch.optim.AdamW(model.parameters(), lr=1e-5, betas=(0.9, 0.98), eps=1e-6, weight_decay=0.2)

            def fn():
                opt.zero_grad(set_to_none=True)
                model(input_ids=tid, pixel_values=px, return_loss=True).loss.backward()
                opt.step()
        else:
            model.eval()

            def fn():
                with torch.inference_mode():
                    if task == "image":
                        model.get_image_features(pixel_values=px)
                    else:
                        model.get_text_features(input_ids=tid)
    seconds = timed(fn, repeats)
    one_position = framework == "miniclip" and os.environ.get("BENCH_LAST_BLOCK_WHOLE") != "1"
    flops = matmul_flops(spec, n, text_len, task != "text", task != "image", one_position) * (3 if task == "train" else 1)
    return {"seconds": seconds, "peak_mib": peak_mib() - baseline, "gflop": flops / 1e9}


def every_position_through_the_last_block():
    """
    Undo the encoders' shortcut (miniclip's speed devices, block_forward_fast): the last block works out every
    position, as PyTorch's CLIPModel does, and the class or end-of-text token is read off afterwards.
    """
    forward, backward = mc.transformer_forward, mc.transformer_backward

    def whole_forward(x, *args, at, **kwargs):
        y, caches = forward(x, *args, at=None, **kwargs)                   # (N, T, D)
        return y[np.arange(len(y)), at][:, None], (caches, at, y.shape)

    def whole_backward(dout, cache, *args):
        caches, at, shape = cache
        d = np.zeros(shape, dout.dtype)
        d[np.arange(len(d)), at] = dout[:, 0]
        return backward(d, caches, *args)
    mc.transformer_forward, mc.transformer_backward = whole_forward, whole_backward


def rss_mib():
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2 ** 20


def run_one(framework, task, spec, folder, repeats, script=__file__, **env):
    """
    One measurement in a fresh process. env: variables to set there, None to unset one. script: the
    bench.py that measures, another checkout's for a baseline.
    """
    env = {**os.environ, **env}
    if framework != "miniclip":                         # importing miniclip set it here; PyTorch runs as it comes
        env.pop("OPENBLAS_THREAD_TIMEOUT", None)
    env = {k: v for k, v in env.items() if v is not None}
    out = subprocess.run([sys.executable, script, "--one", framework, task, json.dumps(spec), folder, str(repeats)],
                         capture_output=True, text=True, check=True, env=env).stdout
    return json.loads(out.strip().splitlines()[-1])


def sgemm_peak():
    a = np.random.default_rng(0).standard_normal((2048, 2048)).astype(np.float32)
    return 2 * 2048 ** 3 / timed(lambda: a @ a, 5) / 1e9


def openai_tokenizer(vocab):
    """OpenAI's SimpleTokenizer from open_clip's copy of tokenizer.py, or None without ftfy."""
    import importlib.util
    if importlib.util.find_spec("ftfy") is None:
        return None
    spec = importlib.util.spec_from_file_location("openai_tokenizer", os.path.join(os.path.dirname(vocab), "tokenizer.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.SimpleTokenizer(vocab)


def tokenizer_rows(quick):
    """Encoding throughput against transformers' CLIPTokenizer and OpenAI's on CLIP's vocabulary; BPE training time."""
    import importlib.util
    import bpe
    rows = []
    spec = importlib.util.find_spec("open_clip")
    vocab = spec and os.path.join(spec.submodule_search_locations[0], "bpe_simple_vocab_16e6.txt.gz")
    corpus = stdlib_text(4 * 2 ** 20)
    if vocab and os.path.exists(vocab):
        import transformers
        lines = [line for line in corpus.splitlines() if line.strip()][:20000 if quick else 100000]
        ours = bpe.load(vocab)
        with tempfile.TemporaryDirectory() as d:
            ours.save_hf(d)
            hf = transformers.CLIPTokenizer.from_pretrained(d)
        n_tokens = sum(len(ours.encode(line)) for line in lines)
        ours.cache.clear()
        fresh = bpe.load(vocab)
        t_ours = timed(lambda: [fresh.encode(line) for line in lines], 1 if quick else 3)
        t_hf_each = timed(lambda: [hf(line, add_special_tokens=False)["input_ids"] for line in lines], 1 if quick else 3)
        t_hf_batch = timed(lambda: hf(lines, add_special_tokens=False)["input_ids"], 1 if quick else 3)
        rows.append(("Tokenizer encode, one text per call", f"{n_tokens / t_ours / 1e6:.2f}M tok/s",
                     f"{n_tokens / t_hf_each / 1e6:.2f}M tok/s", t_ours / t_hf_each))
        rows.append(("Tokenizer encode, whole list in one call", f"{n_tokens / t_ours / 1e6:.2f}M tok/s",
                     f"{n_tokens / t_hf_batch / 1e6:.2f}M tok/s", t_ours / t_hf_batch))
        openai = openai_tokenizer(vocab)
        if openai:                                      # the same lines and protocol as t_ours above
            t_openai = timed(lambda: [openai.encode(line) for line in lines], 1 if quick else 3)
            rows.append(("Tokenizer encode, against OpenAI's SimpleTokenizer (with ftfy)",
                         f"{n_tokens / t_ours / 1e6:.2f}M tok/s", f"{n_tokens / t_openai / 1e6:.2f}M tok/s",
                         t_ours / t_openai))
    else:
        rows.append(("Tokenizer encode", "not measured: open-clip-torch (CLIP's vocabulary) missing", "", None))
    t0 = time.perf_counter()
    tok = bpe.learn([corpus], 8192)
    rows.append((f"BPE training, {len(corpus) / 2 ** 20:.0f} MiB of text to {tok.vocab_size} tokens",
                 f"{time.perf_counter() - t0:.1f} s", "no counterpart", None))
    return rows


def stdlib_text(n_bytes):
    """A few MB of real English and code: Python's own standard library sources, in a fixed order."""
    import sysconfig
    lib = sysconfig.get_paths()["stdlib"]
    parts, size = [], 0
    for name in sorted(os.listdir(lib)):
        if name.endswith(".py"):
            with open(os.path.join(lib, name), encoding="utf-8", errors="replace") as f:
                text = f.read()
            parts.append(text)
            size += len(text)
            if size >= n_bytes:
                break
    return "".join(parts)[:n_bytes]


# The tiny preset's train step again, each time with one of miniclip's speed tricks undone: the
# variables are set in the measuring process, before NumPy loads.
TRICKS = {
    "glibc's default malloc (MINICLIP_MALLOC_DEFAULTS=1)": ("keeping freed memory", {"MINICLIP_MALLOC_DEFAULTS": "1"}),
    "OpenBLAS's threads left spinning (OPENBLAS_THREAD_TIMEOUT=28, its default)": ("letting BLAS threads sleep",
                                                                                   {"OPENBLAS_THREAD_TIMEOUT": "28"}),
    "none of cpu_settings() (NumPy imported first, as a script of one's own may)": (
        "the CPU settings", {"MINICLIP_MALLOC_DEFAULTS": "1", "OPENBLAS_THREAD_TIMEOUT": "28"}),
    "every array in one piece (no by_rows threads)": ("by_rows", {"BENCH_ROWS_WHOLE": "1"}),
    "every position through the last block, as PyTorch": ("reading one position of the last block",
                                                          {"BENCH_LAST_BLOCK_WHOLE": "1"}),
}


def take_turns(runs, rounds):
    """
    {name: a function that measures once} -> {name: [each round's result]}. The order flips every
    round, so a drift in the machine's speed lands on every side alike; ratios are taken per round.
    """
    out = {name: [] for name in runs}
    for r in range(rounds):
        for name in (list(runs) if r % 2 == 0 else list(runs)[::-1]):
            out[name].append(runs[name]())
    return out


def summary(results):
    """One side's rounds as one result: the median time, the largest peak memory."""
    return {"seconds": statistics.median(r["seconds"] for r in results),
            "peak_mib": max(r["peak_mib"] for r in results), "gflop": results[0]["gflop"]}


def per_round(a, b):
    """The median over rounds of a's time over b's."""
    return statistics.median(x["seconds"] / y["seconds"] for x, y in zip(a, b))


def ratio_text(a, b):
    """a's time over b's: the median over rounds, and the range when there are several rounds."""
    ratios = [x["seconds"] / y["seconds"] for x, y in zip(a, b)]
    spread = f" ({min(ratios):.2f}-{max(ratios):.2f})" if len(ratios) > 1 else ""
    return f"{statistics.median(ratios):.2f}{spread}"


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0].strip())
    p.add_argument("--quick", action="store_true")
    p.add_argument("--baseline", metavar="DIR", help="another checkout of miniclip, measured as a third side in the "
                                                      "same rounds: a before and after in one run")
    p.add_argument("--one", nargs=5, metavar=("FRAMEWORK", "TASK", "SPEC", "FOLDER", "REPEATS"), help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.one:
        framework, task, spec, folder, repeats = args.one
        print(json.dumps(measure(framework, task, json.loads(spec), folder, int(repeats))))
        return

    import platform
    import torch
    print(f"machine: {platform.processor() or platform.machine()}, {THREADS} cores; numpy {np.__version__}, "
          f"torch {torch.__version__}; {THREADS} threads each")
    peaks = [sgemm_peak()]                              # measured again at the end: the machine drifts
    rows = []
    gf = lambda r: f"{r['gflop'] / r['seconds']:.0f} ({r['gflop'] / r['seconds'] / max(peaks):.0%})"

    def row(label, res, fmt):
        ours, theirs = summary(res["miniclip"]), summary(res["torch"])
        before = [ratio_text(res["baseline"], res["torch"])] if args.baseline else []
        return (label, fmt(ours), fmt(theirs), ratio_text(res["miniclip"], res["torch"]), *before,
                f"{ours['peak_mib']:.0f} / {theirs['peak_mib']:.0f}", lambda: f"{gf(ours)} / {gf(theirs)}")

    def sides(task, spec, folder, repeats):
        """The measurements of one row: miniclip, PyTorch and, with --baseline, the other checkout's miniclip."""
        runs = {fw: lambda fw=fw: run_one(fw, task, spec, folder, repeats) for fw in ("miniclip", "torch")}
        if args.baseline:
            runs["baseline"] = lambda: run_one("miniclip", task, spec, folder, repeats,
                                               script=os.path.join(args.baseline, "benchmarks", "bench.py"))
        return runs

    step = lambda r: f"{r['seconds'] * 1000:.0f} ms"
    rounds = 2 if args.quick else 5
    with tempfile.TemporaryDirectory() as d:
        for i, (name, spec) in enumerate(TRAIN_SPECS.items()):
            folder = os.path.join(d, f"train{i}")
            make_folder(spec, folder)
            runs = sides("train", spec, folder, 5)
            if i == 0:
                runs.update({trick: lambda env=env: run_one("miniclip", "train", spec, folder, 5, **env)
                             for trick, (_, env) in TRICKS.items()})
            res = take_turns(runs, rounds)
            rows.append(row(f"Train step, batch 128 (forward, backward, AdamW), {name}", res, step))
            if i == 0:
                tricks = res
        make_folder(B32, os.path.join(d, "b32"))
        for task, label, unit, n in (("image", "ViT-B/32 image encoding, batch 16 at 224", "img/s", 16),
                                     ("text", "ViT-B/32 text encoding, batch 256 x 77", "texts/s", 256)):
            repeats = {"image": 5, "text": 3}[task] // (2 if args.quick else 1) or 1
            res = take_turns(sides(task, B32, os.path.join(d, "b32"), repeats), rounds if task == "image" else min(rounds, 3))
            rows.append(row(label, res, lambda r: f"{n / r['seconds']:.1f} {unit}"))
    for trick, (what, _) in TRICKS.items():
        undone = summary(tricks[trick])
        rows.append((f"Train step, tiny preset, with {trick}", step(undone), "", ratio_text(tricks[trick], tricks["torch"]),
                     *([""] if args.baseline else []), f"{undone['peak_mib']:.0f} / -",
                     f"{what} saves {1 - per_round(tricks['miniclip'], tricks[trick]):.0%}"))
    rows += [(*r[:3], "" if r[3] is None else f"{r[3]:.2f}", *([""] if args.baseline else []), "", "")
             for r in tokenizer_rows(args.quick)]

    peaks.append(sgemm_peak())
    print(f"sgemm peak (NumPy, 2048^3): {max(peaks):.0f} GFLOP/s, the faster of {peaks[0]:.0f} at the start and "
          f"{peaks[1]:.0f} at the end")
    print()
    before = [f"baseline ({args.baseline}) / PyTorch"] if args.baseline else []
    print("| " + " | ".join(["benchmark", "miniclip", "PyTorch", "time ratio, miniclip / PyTorch: median (range over rounds)",
                             *before, "peak MiB (miniclip / PyTorch)", "GFLOP/s, % of sgemm peak (miniclip / PyTorch)"]) + " |")
    print("|---" * (6 + len(before)) + "|")
    for *cells, flops in rows:
        print("| " + " | ".join([*cells, flops() if callable(flops) else flops]) + " |")
    print("| GPU (CuPy against PyTorch CUDA) | not measured: this run had no GPU |" + " |" * (4 + len(before)))


if __name__ == "__main__":
    main()
