"""
The CLIP paper's findings, measured in miniature on the scenes world (experiments/scenes.py) (one to three shapes,
captions that count, bind colors to shapes and relate left to right; 12 color-shape pairs never seen
in training; an outline style seen only in testing).

    python experiments/paper.py --quick      1 seed, short runs: about 15 minutes on 2 cores
    python experiments/paper.py              3 seeds, longer runs: about an hour, in the background
                                             (a rerun skips the runs results.json holds at that scale)

Writes experiments/results.json (each claim: the paper's statement and number, ours per seed with its
spread, and a verdict) and experiments/*.png (with matplotlib; without it, says so and writes the JSON).
Runs go two at a time, each in its own process with single-threaded BLAS, and print as they finish.

A verdict compares two arms over seeds: "holds" when the difference goes the paper's way and is larger
than the spread of either arm over seeds, "does not hold" when it goes the other way by as much, and
"within noise" otherwise. With one seed (--quick) there is no spread, so verdicts say "(1 seed)".
"""
import argparse
import dataclasses
import json
import math
import multiprocessing
import os
import sys
import time
from concurrent.futures import ProcessPoolExecutor, as_completed

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
import miniclip as mc  # noqa: E402  before NumPy: it makes OpenBLAS's settings (mc.cpu_settings)
import numpy as np  # noqa: E402
import bpe                                              # noqa: E402
import data                                             # noqa: E402
import train                                            # noqa: E402
import zeroshot                                         # noqa: E402
import probe                                            # noqa: E402
import scenes                                           # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))
IMAGE = 48                                              # 6 x 6 patches of 8: room for three shapes side by side
BASE = dict(objective="contrastive", batch=128, temperature=0.0, crop=True, width=96,
            text_layers=mc.PRESETS["tiny"].text_layers)
SHOTS = (1, 2, 4, 8, 16)


@dataclasses.dataclass
class Scale:
    """How much work: --quick or the full run."""
    seeds: tuple
    images_seen: int            # per training run, whatever its batch size
    n_train: int                # generated training scenes per seed
    n_test: int                 # items per multiple-choice test
    probe_pool: int = 2 * 16 * 48   # single-object images the probes take their k shots per class from


QUICK = Scale(seeds=(0,), images_seen=64 * 128, n_train=12_000, n_test=300)
FULL = Scale(seeds=(0, 1, 2), images_seen=200 * 128, n_train=24_000, n_test=600)


def arms():
    """Every training run of the grid, as (name, settings): the base and one change at a time."""
    return [("base", BASE),
            ("bow", {**BASE, "objective": "bow"}), ("bag", {**BASE, "text_layers": 0}),
            ("batch 32", {**BASE, "batch": 32}), ("batch 512", {**BASE, "batch": 512}),
            ("T fixed 0.07", {**BASE, "temperature": 0.07}), ("T fixed 0.01", {**BASE, "temperature": 0.01}),
            ("T fixed 0.2", {**BASE, "temperature": 0.2}),
            ("no crop", {**BASE, "crop": False}),
            ("width 48", {**BASE, "width": 48}), ("width 192", {**BASE, "width": 192})]


def model_config(width, objective, vocab_size, text_layers):
    """The tiny preset at IMAGE pixels, both towers `width` wide with 32-wide heads; text_layers 0: a bag of words."""
    return dataclasses.replace(mc.PRESETS["tiny"], image_size=IMAGE, vision_width=width, text_width=width,
                               vision_heads=width // 32, text_heads=width // 32, vocab_size=vocab_size,
                               text_layers=text_layers, objective=objective)


def train_flops(cfg, images, text_tokens=12, head=0):
    """
    Training compute, counted from the shapes: 6 x (multiply-adds of the forward's matrix products)
    per image, the backward being twice the forward and a multiply-add 2 FLOPs. text_tokens: a
    caption's length, 0 for a model without a text tower; head: the outputs of a linear head on the
    image features (bag-of-words: the vocabulary; supervised: the classes). LayerNorm, softmax and the
    activations are left out: a few percent at these widths.
    """
    def tower(D, L, T):
        return L * T * (12 * D * D + 2 * T * D)     # qkv + out (4 D^2), MLP (8 D^2), scores and mixing (2 T D)
    G = (cfg.image_size // cfg.patch_size) ** 2
    per_image = tower(cfg.vision_width, cfg.vision_layers, G + 1) + G * 3 * cfg.patch_size ** 2 * cfg.vision_width
    if text_tokens:
        per_image += tower(cfg.text_width, cfg.text_layers, text_tokens)
    return 6 * (per_image + head * cfg.embed_dim) * images


# -----------------------------------------------------------------------------
# One training run and its evaluation (in a worker process)


def world(seed, scale):
    """The training scenes, tokenizer, held-out pairs and tests of one seed, drawn the same in every process."""
    pairs, held = scenes.scenes_world(scale.n_train, seed, IMAGE)
    tok = bpe.learn(pairs.captions, 1024)
    train_pairs = [p for p in ((c, s) for c in data.COLORS for s in data.SHAPES) if p not in held]
    all_pairs = train_pairs + held
    tests = {"held": scenes.scene_tests(scale.n_test, seed, IMAGE, "solid", held),
             "held outline": scenes.scene_tests(scale.n_test, seed + 100, IMAGE, "outline", held),
             "all": scenes.scene_tests(scale.n_test, seed + 200, IMAGE, "solid", all_pairs),
             "all outline": scenes.scene_tests(scale.n_test, seed + 300, IMAGE, "outline", all_pairs),
             "probe pool": scenes.scene_tests(scale.probe_pool, seed + 400, IMAGE, "solid", all_pairs, ("color_shape",))}
    return pairs, tok, tests


def image_features(params, cfg, images, unit=True):
    feats = mc.to_numpy(mc.encode_image(params, cfg, mc.to_device(mc.normalize_pixels(data.center_crop(images, IMAGE)))))
    return feats / np.linalg.norm(feats, axis=1, keepdims=True) if unit else feats


def choose(params, cfg, tok, test, templates=("{}",)):
    """Accuracy on a multiple-choice test: each image takes the candidate its embedding is closest to
    (the bag-of-words model: the candidate whose words it finds most probable)."""
    texts = sorted({c for options in test["candidates"] for c in options})
    prompts = zeroshot.prompt_ids(tok, cfg, texts, templates)
    if cfg.objective == "bow":
        pixels = mc.normalize_pixels(data.center_crop(test["images"], IMAGE))
        scores = mc.to_numpy(mc.bow_label_scores(params, cfg, mc.to_device(pixels), prompts, len(templates)))
    else:
        classes = mc.to_numpy(mc.class_embeddings(params, cfg, prompts, len(templates)))
        scores = image_features(params, cfg, test["images"]) @ classes.T
    column = {t: i for i, t in enumerate(texts)}
    right = [max(options, key=lambda c: scores[i, column[c]]) == options[a]
             for i, (options, a) in enumerate(zip(test["candidates"], test["answers"]))]
    return float(np.mean(right))


def evaluate(params, cfg, tok, tests, full):
    """Zero-shot on the held-out pairs; with full, every other test the claims need."""
    out = {"zero-shot": choose(params, cfg, tok, tests["held"]["color_shape"], data.TEMPLATES)}
    if not full or cfg.objective == "bow":
        return out
    ensemble = data.TEMPLATES
    out.update({
        "prompt: bare label": choose(params, cfg, tok, tests["held"]["color_shape"], ("{}",)),
        "prompt: one template": choose(params, cfg, tok, tests["held"]["color_shape"], ("a photo of a {}",)),
        "zero-shot outline": choose(params, cfg, tok, tests["held outline"]["color_shape"], ensemble),
        "all pairs": choose(params, cfg, tok, tests["all"]["color_shape"], ensemble),
        "all pairs outline": choose(params, cfg, tok, tests["all outline"]["color_shape"], ensemble),
        **{task: choose(params, cfg, tok, tests["held"][task]) for task in ("count", "binding", "relation")}})
    # Linear probes on the image features of all 48 pairs: k shots per class from the pool, tested
    # on the solid and the outline tests.
    pool = tests["probe pool"]["color_shape"]
    X, y = image_features(params, cfg, pool["images"], unit=False), pool["answers"]
    test_solid, test_outline = tests["all"]["color_shape"], tests["all outline"]["color_shape"]
    Xs, Xo = (image_features(params, cfg, t["images"], unit=False) for t in (test_solid, test_outline))
    for k in SHOTS:
        pick = np.concatenate([np.flatnonzero(y == c)[:k] for c in np.unique(y)])
        predicted = probe.linear_probe(X[pick], y[pick], np.concatenate([Xs, Xo]))
        out[f"probe {k}-shot"] = float((predicted[:len(Xs)] == test_solid["answers"]).mean())
        out[f"probe {k}-shot outline"] = float((predicted[len(Xs):] == test_outline["answers"]).mean())
    return out


def run(name, settings, seed, scale, evaluations=4):
    """Train one arm on one seed; evaluate `evaluations` times along the way (the last one in full)."""
    pairs, tok, tests = world(seed, scale)
    cfg = model_config(settings["width"], settings["objective"], tok.vocab_size, settings["text_layers"])
    B = settings["batch"]
    steps = scale.images_seen // B
    tc = train.TrainConfig(steps=steps, batch_size=B, lr=2e-3 * math.sqrt(B / 128), warmup=max(1, steps // 15),
                           seed=seed, temperature=settings["temperature"], random_crop=settings["crop"])
    params = mc.to_device(mc.init_params(cfg, seed=seed))
    train.fix_temperature(params, tc)
    opt = train.optimizer(params, tc)
    slack, t0, curve = data.load_size(IMAGE) - IMAGE, time.time(), []
    plan = (data.batch_plan(s, len(pairs), B, seed, slack, tc.random_crop) for s in range(steps))
    loader = data.Loader(IMAGE, workers=0)              # the scenes are in memory: crops are cut directly
    for step, (crops, idx) in enumerate(loader.batches(pairs, plan)):
        pixels, ids = train.batch_inputs(crops, [pairs.captions[i] for i in idx], tok, cfg)
        loss, grads = mc.loss_and_grads(params, cfg, pixels, ids)
        opt.step(params, grads, train.lr_at(step, tc))
        mc.clamp_logit_scale(params)
        if (step + 1) % max(1, steps // evaluations) == 0 or step + 1 == steps:
            metrics = evaluate(params, cfg, tok, tests, full=step + 1 == steps and name == "base")
            curve.append({"images": (step + 1) * B, "loss": loss, **metrics})
    return {"arm": name, "seed": seed, "settings": settings, "seconds": time.time() - t0,
            "flops": train_flops(cfg, scale.images_seen, 12 if cfg.objective == "contrastive" else 0), "logit_scale": mc.logit_scale_value(params),
            "curve": curve, "final": curve[-1]}


# -----------------------------------------------------------------------------
# The claims: each a comparison of two numbers per seed, with the paper's side of it.


def values(results, arm, metric):
    return np.array([r["final"][metric] for r in results if r["arm"] == arm and metric in r["final"]])


def verdict(a, b, paper_says_a_wins):
    """Is a better than b (per seed, mean), beyond the seeds' spread?"""
    diff = float(np.mean(a) - np.mean(b))
    spread = max(float(np.ptp(a)), float(np.ptp(b))) if len(a) > 1 else 0.0
    if abs(diff) <= spread:
        word = "within noise"
    else:
        word = "holds" if (diff > 0) == paper_says_a_wins else "does not hold"
    return word + (" (1 seed)" if len(a) < 2 else ""), diff, spread


def judged(name, paper, a_name, a, b_name, b, a_wins=True, note=""):
    """One claim's record: the paper's statement, both sides per seed, their difference, spread and verdict."""
    word, diff, spread = verdict(np.asarray(a), np.asarray(b), a_wins)
    return {"claim": name, "paper": paper, "a": a_name, "b": b_name,
            "a per seed": [round(float(x), 4) + 0.0 for x in a], "b per seed": [round(float(x), 4) + 0.0 for x in b],
            "a - b": round(diff, 4), "spread": round(spread, 4), "verdict": word, "note": note}


def claims(results):
    out = []

    def claim(name, paper, arm_a, metric_a, arm_b, metric_b, a_wins=True, note=""):
        a, b = values(results, arm_a, metric_a), values(results, arm_b, metric_b)
        if len(a) and len(b):
            out.append(judged(name, paper, f"{arm_a}: {metric_a}", a, f"{arm_b}: {metric_b}", b, a_wins, note))

    claim("contrastive beats predictive", "with the text as a bag of words, a contrastive objective is about 4x "
          "as efficient at zero-shot ImageNet as bag-of-words prediction (Figure 2)", "bag", "zero-shot", "bow",
          "zero-shot", note="bag: the contrastive base with a bag-of-words text encoder; curves in contrastive_vs_bow.png")
    claim("contrastive beats predictive, with a text transformer", "as above, with the text transformer in the "
          "contrastive arm (the paper's CLIP; Figure 2 itself has the bag of words)", "base", "zero-shot", "bow",
          "zero-shot")
    claim("prompt engineering", "a prompt template adds 1.3 points on ImageNet over the bare label (Figure 4)",
          "base", "prompt: one template", "base", "prompt: bare label")
    claim("prompt ensembling", "ensembling 80 prompts adds a further 3.5 points (Figure 4 and section 3.1.4)",
          "base", "zero-shot", "base", "prompt: one template")
    claim("more negatives help", "large batches (32,768) matter for contrastive learning (section 2.5)",
          "batch 512", "zero-shot", "batch 32", "zero-shot", note="equal images seen; lr scaled by sqrt(batch)")
    for T in ("0.07", "0.01", "0.2"):
        claim(f"learned temperature vs fixed {T}", "the temperature is learned, from 0.07, clipped at 100 "
              "(section 2.5)", "base", "zero-shot", f"T fixed {T}", "zero-shot")
    claim("random crop helps", "a random square crop is the only augmentation (section 2.5)",
          "base", "zero-shot", "no crop", "zero-shot")
    k_meet = None
    zs = values(results, "base", "all pairs")
    for k in SHOTS:
        if len(zs) and np.mean(values(results, "base", f"probe {k}-shot")) >= np.mean(zs):
            k_meet = k
            break
    claim("zero-shot matches a few-shot linear probe", "zero-shot CLIP matches a 4-shot linear probe on the same "
          "features (Figure 6)", "base", "all pairs", "base", "probe 4-shot",
          note=f"the probe first reaches zero-shot at k = {k_meet} shots per class (of {SHOTS})")
    zs_drop = values(results, "base", "all pairs") - values(results, "base", "all pairs outline")
    probe_drop = values(results, "base", "probe 16-shot") - values(results, "base", "probe 16-shot outline")
    if len(zs_drop):
        word, diff, spread = verdict(-zs_drop, -probe_drop, True)
        out.append({"claim": "zero-shot is more robust to a shift", "paper": "zero-shot models lose less under "
                    "distribution shift than a linear probe fitted to one distribution (Figures 13-14)",
                    "a": "base: zero-shot drop, solid -> outline", "b": "base: 16-shot probe drop, solid -> outline",
                    "a per seed": [round(float(x), 4) for x in zs_drop],
                    "b per seed": [round(float(x), 4) for x in probe_drop],
                    "a - b": round(float(np.mean(zs_drop - probe_drop)), 4), "spread": round(spread, 4),
                    "verdict": word, "note": "a smaller drop is better: compared as negated drops"})
    flops = {r["arm"]: r["flops"] for r in results}
    if "width 48" in flops and "width 192" in flops:
        claim("more compute, lower error", "zero-shot error falls smoothly (a power law) with training compute over "
              "model sizes (Figure 9)", "width 192", "zero-shot", "width 48", "zero-shot",
              note=f"training compute {flops['width 192'] / flops['width 48']:.1f}x; error against compute in compute.png")
    # Limitations: how far above chance each test is, as a share of the way from chance to perfect, so
    # that a 48-way and a 2-way test compare.
    lift = lambda metric, chance: (values(results, "base", metric) - chance) / (1 - chance)
    for task, chance in (("count", 1 / 3), ("binding", 0.5), ("relation", 0.5)):
        a, b = lift("zero-shot", 1 / 48), lift(task, chance)
        if len(a):
            word, diff, spread = verdict(a, b, True)
            out.append({"claim": f"limitation: {task}", "paper": "CLIP is weak at counting, at binding attributes "
                        "to objects and at spatial relations, though strong at naming objects (section 6)",
                        "a": "base: color-shape, (accuracy - chance) / (1 - chance)", "b": f"base: {task}, the same",
                        "a per seed": [round(float(x), 4) for x in a], "b per seed": [round(float(x), 4) for x in b],
                        "a - b": round(diff, 4), "spread": round(spread, 4), "verdict": word,
                        "note": f"raw accuracy on {task}: {values(results, 'base', task).round(3).tolist()}, chance {chance:.2f}"})
    return out


# -----------------------------------------------------------------------------
# Figures


def figure_writer(folder, wrote):
    """
    (pyplot, save(fig, name), the paths saved so far) for figures written into folder as PNG; None,
    after saying so, when matplotlib is not installed (the results, `wrote`, stand without figures).
    """
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print(f"matplotlib is not installed (pip install -r requirements-dev.txt): wrote {wrote}, no figures")
        return None
    written = []

    def save(fig, name):
        path = os.path.join(folder, name)
        fig.tight_layout()
        fig.savefig(path, dpi=110)
        plt.close(fig)
        written.append(path)
    return plt, save, written


def figures(results, claim_list, folder):
    writer = figure_writer(folder, "results.json")
    if writer is None:
        return []
    plt, save, written = writer

    fig, ax = plt.subplots(figsize=(5, 3.5))
    for arm, label in (("bag", "contrastive, bag-of-words encoder"), ("base", "contrastive, text transformer"),
                       ("bow", "bag-of-words prediction")):
        curves = [r["curve"] for r in results if r["arm"] == arm]
        if curves:
            x = [p["images"] for p in curves[0]]
            y = np.array([[p["zero-shot"] for p in c] for c in curves])
            ax.errorbar(x, y.mean(0), yerr=y.std(0), marker="o", capsize=3, label=label)
    ax.axhline(1 / 48, color="gray", ls=":", label="chance")
    ax.set(xlabel="images seen", ylabel="zero-shot accuracy, held-out pairs", title="Contrastive vs predictive")
    ax.set_ylim(top=0.65)                               # room above the curves for the legend
    ax.legend(fontsize=8, loc="upper right")
    save(fig, "contrastive_vs_bow.png")

    fig, axes = plt.subplots(1, 3, figsize=(11, 3.5))
    for ax, (title, group) in zip(axes, (("batch size (equal images seen)", ("batch 32", "base", "batch 512")),
                                         ("temperature", ("base", "T fixed 0.07", "T fixed 0.01", "T fixed 0.2")),
                                         ("augmentation", ("base", "no crop")))):
        group = [a for a in group if len(values(results, a, "zero-shot"))]     # the arms that ran
        means = [values(results, a, "zero-shot").mean() for a in group]
        errs = [values(results, a, "zero-shot").std() for a in group]
        names = [{"base": "batch 128" if "batch" in title else "learned" if "temp" in title else "random crop"}
                 .get(a, a) for a in group]
        ax.bar(names, means, yerr=errs, capsize=3, color="tab:blue")
        ax.set(title=title, ylabel="zero-shot accuracy", ylim=(0, 1))
        ax.tick_params(axis="x", rotation=20)
    save(fig, "ablations.png")

    fig, ax = plt.subplots(figsize=(5, 3.5))
    probe = np.array([[r["final"][f"probe {k}-shot"] for k in SHOTS] for r in results if r["arm"] == "base"])
    zs = values(results, "base", "all pairs")
    ax.errorbar(SHOTS, probe.mean(0), yerr=probe.std(0), marker="o", capsize=3, label="linear probe")
    ax.axhline(zs.mean(), color="tab:red", label="zero-shot")
    ax.set(xscale="log", xticks=SHOTS, xticklabels=SHOTS, xlabel="labeled examples per class",
           ylabel="accuracy, 48 color-shape classes", title="Zero-shot vs k-shot linear probe")
    ax.legend()
    save(fig, "zero_shot_vs_probe.png")

    fig, axes = plt.subplots(1, 2, figsize=(10, 3.5))
    pairs = [("zero-shot", "all pairs", "all pairs outline"), ("16-shot probe", "probe 16-shot", "probe 16-shot outline")]
    for i, (label, solid, outline) in enumerate(pairs):
        axes[0].bar([i - 0.2, i + 0.2], [values(results, "base", solid).mean(), values(results, "base", outline).mean()],
                    width=0.4, color=["tab:blue", "tab:orange"])
    axes[0].set(xticks=[0, 1], xticklabels=[p[0] for p in pairs], ylim=(0, 1), ylabel="accuracy",
                title="Shift: filled (blue) -> outline (orange)")
    tasks = ["zero-shot", "count", "binding", "relation"]
    axes[1].bar(["color + shape", "count", "binding", "relation"], [values(results, "base", t).mean() for t in tasks],
                yerr=[values(results, "base", t).std() for t in tasks], capsize=3)
    for x, chance in enumerate((1 / 48, 1 / 3, 0.5, 0.5)):
        axes[1].plot([x - 0.4, x + 0.4], [chance, chance], "k:")
    axes[1].set(ylim=(0, 1), title="Limitations (dotted: chance)")
    save(fig, "robustness_and_limitations.png")

    fig, ax = plt.subplots(figsize=(5, 3.5))
    for arm in ("width 48", "base", "width 192"):
        runs = [r for r in results if r["arm"] == arm]
        if runs:
            ax.scatter([runs[0]["flops"]] * len(runs), [1 - r["final"]["zero-shot"] for r in runs], label=arm)
    ax.set(xscale="log", yscale="log", xlabel="training compute (FLOPs)", ylabel="zero-shot error",
           title="Error against compute, three widths")
    ax.legend()
    save(fig, "compute.png")
    return written


def markdown(claim_list):
    """The claims as a Markdown table: each side's mean over seeds with its range, and the verdict."""
    def side(values):
        between = " to " if min(values) < 0 else "-"
        return f"{np.mean(values):.3f}" + (f" ({min(values):.3f}{between}{max(values):.3f})" if len(values) > 1 else "")
    lines = ["| claim | a | b | a - b | spread | verdict | note |", "|---|---|---|---|---|---|---|"]
    for c in claim_list:
        lines.append(f"| {c['claim']}: {c['a']} (a) against {c['b']} (b) | {side(c['a per seed'])} | "
                     f"{side(c['b per seed'])} | {c['a - b']:+.3f} | {c['spread']:.3f} | {c['verdict']} | {c['note']} |")
    return "\n".join(lines)


# -----------------------------------------------------------------------------


def run_in_worker(job):
    mc.cpu_settings()
    return run(*job)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0].strip())
    p.add_argument("--quick", action="store_true", help="1 seed and shorter runs (about 15 minutes)")
    p.add_argument("--out", default=HERE, help="folder for results.json and the figures (default: experiments/)")
    p.add_argument("--jobs", type=int, default=2, help="runs at a time, one process each (default 2)")
    p.add_argument("--from-results", action="store_true",
                   help="train nothing: recompute the claims, the table and the figures from the runs in --out's results.json")
    args = p.parse_args(argv)
    mc.cpu_settings()
    if args.from_results:
        with open(os.path.join(args.out, "results.json")) as f:
            saved = json.load(f)
        report(saved["runs"], Scale(**{**saved["scale"], "seeds": tuple(saved["scale"]["seeds"])}), args.out, time.time())
        return
    scale = QUICK if args.quick else FULL
    os.makedirs(args.out, exist_ok=True)
    results = saved_runs(os.path.join(args.out, "results.json"), scale)
    done = {(r["arm"], r["seed"]) for r in results}
    jobs = [(name, settings, seed, scale) for seed in scale.seeds for name, settings in arms() if (name, seed) not in done]
    print(f"{len(jobs)} runs of {scale.images_seen:,} images each ({len(done)} done before), {args.jobs} at a time",
          flush=True)
    os.environ.update(OMP_NUM_THREADS="1", OPENBLAS_NUM_THREADS="1", MKL_NUM_THREADS="1")   # each process: one core
    t0 = time.time()
    with ProcessPoolExecutor(args.jobs, mp_context=multiprocessing.get_context("spawn")) as pool:
        for i, future in enumerate(as_completed([pool.submit(run_in_worker, job) for job in jobs])):
            r = future.result()
            results.append(r)
            write_results(args.out, scale, results)
            print(f"[{i + 1}/{len(jobs)} after {time.time() - t0:.0f}s] {r['arm']}, seed {r['seed']}: "
                  f"zero-shot {r['final']['zero-shot']:.3f} ({r['seconds']:.0f}s)", flush=True)
    report(results, scale, args.out, t0)


def saved_runs(path, scale):
    """The runs saved in results.json at path by an earlier call at the same scale, which a rerun skips: a
    grid can be spread over several sittings, and an arm added later runs alone. [] if there are none."""
    if not os.path.exists(path):
        return []
    with open(path) as f:
        saved = json.load(f)
    same = saved.get("scale") == json.loads(json.dumps(dataclasses.asdict(scale)))
    if not same:
        print(f"{path}: its runs are of another scale; they are run again and replaced")
    return saved["runs"] if same else []


def write_results(folder, scale, results, claim_list=()):
    bpe.write_atomic(os.path.join(folder, "results.json"), json.dumps(
        {"scale": dataclasses.asdict(scale), "claims": list(claim_list), "runs": results}, indent=1))


def report(results, scale, folder, t0):
    """results.json (the scale, the claims and every run), the table of claims, and the figures."""
    results.sort(key=lambda r: (r["arm"], r["seed"]))
    claim_list = claims(results)
    write_results(folder, scale, results, claim_list)
    print(markdown(claim_list))
    for path in figures(results, claim_list, folder):
        print("wrote", path)
    print(f"done in {time.time() - t0:.0f}s")


if __name__ == "__main__":
    main()
