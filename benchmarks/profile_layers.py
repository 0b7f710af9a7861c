"""
Where the time of an image encoding or a train step goes, layer by layer, against the machine's sgemm peak.

    python benchmarks/profile_layers.py                        ViT-B/32 image encoding, batch 16 at 224 (bench.py's row)
    python benchmarks/profile_layers.py --train                the tiny train step, batch 128 (bench.py's first row)
    python benchmarks/profile_layers.py --train --layers 6 4   bench.py's deepest train step

Each of miniclip's layer functions (forward and backward) and AdamW's step is wrapped with a timer for
the run; a layer's time is its own, the layers it calls left out (attention's time is without its two
linear layers, a block's is its residual adds and slicing). The matrix products' rate is counted from
their shapes (2 flops per multiply-add; a linear layer's backward makes two products) as a share of
NumPy's sgemm on 2048 x 2048 matrices (bench.py's), measured in the same run. The median of --repeats
runs after a warm-up.
"""
import argparse
import dataclasses
import os
import sys
import time
from collections import defaultdict

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
import miniclip as mc  # noqa: E402  before NumPy: it makes OpenBLAS's settings (mc.cpu_settings)
from bench import inputs, sgemm_peak, spec_of, timed  # noqa: E402


def layer_names():
    """Every forward/backward function of miniclip's layers, plain and fast, and the encoders'."""
    return [n for n, f in vars(mc).items() if callable(f) and n.endswith(("_forward", "_backward", "_fast"))
            and n not in ("features_forward", "features_backward")] + ["patchify", "l2_normalize"]


def linear_flops(name, args):
    if name == "linear_forward":
        x, w = args[0], args[1]
        return 2 * (x.size // x.shape[-1]) * w.size
    if name == "linear_backward":
        x2, w, _ = args[1]
        return 2 * 2 * len(x2) * w.size                 # dx = dout w and dw = dout^T x
    return 0


def instrument(optimizer=None):
    """Wrap the layer functions (and optimizer.step): {name: seconds of its own}, {name: flops}."""
    spent, flops, stack = defaultdict(float), defaultdict(float), []

    def wrap(name, fn):
        def timed_call(*args, **kwargs):
            stack.append(0.0)
            t0 = time.perf_counter()
            out = fn(*args, **kwargs)
            total = time.perf_counter() - t0
            inner = stack.pop()
            spent[name] += total - inner
            if stack:
                stack[-1] += total
            flops[name] += linear_flops(name, args)
            return out
        return timed_call
    for name in layer_names():
        setattr(mc, name, wrap(name, getattr(mc, name)))
    for table in (mc.ACTIVATIONS, mc.ACTIVATIONS_FAST):   # the blocks find the activations through tables
        for act, (forward, backward) in list(table.items()):
            table[act] = (getattr(mc, forward.__name__), getattr(mc, backward.__name__))
    if optimizer is not None:
        optimizer.step = wrap("AdamW.step", optimizer.step)
    return spent, flops


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0].strip())
    p.add_argument("--train", action="store_true", help="a train step of the tiny preset (default: an image encoding)")
    p.add_argument("--preset", help="default: ViT-B/32 for an encoding, tiny for --train")
    p.add_argument("--layers", type=int, nargs=2, metavar=("IMAGE", "TEXT"), help="the towers' depths instead of the preset's")
    p.add_argument("--heads", type=int, help="heads in each tower instead of the preset's")
    p.add_argument("--batch", type=int, help="default: 16 for an encoding, 128 for --train")
    p.add_argument("--repeats", type=int, default=5)
    args = p.parse_args()
    mc.cpu_settings()
    cfg = mc.PRESETS[args.preset or ("tiny" if args.train else "ViT-B/32")]
    if args.layers:
        cfg = dataclasses.replace(cfg, vision_layers=args.layers[0], text_layers=args.layers[1])
    if args.heads:
        cfg = dataclasses.replace(cfg, vision_heads=args.heads, text_heads=args.heads)
    batch = args.batch or (128 if args.train else 16)
    params = mc.init_params(cfg)
    pixels, ids = inputs(spec_of(cfg), batch, 16)       # bench.py's inputs: every caption 16 tokens
    if args.train:
        opt = mc.AdamW(params)

        def work():
            loss, grads = mc.loss_and_grads(params, cfg, pixels, ids)
            opt.step(params, grads, 1e-5)
        what = f"{args.preset or 'tiny'} train step ({cfg.vision_layers} + {cfg.text_layers} layers, " \
               f"{cfg.vision_heads} heads), batch {batch}"
    else:
        opt = None
        work = lambda: mc.encode_image(params, cfg, pixels)      # noqa: E731
        what = f"{args.preset or 'ViT-B/32'} image encoding, batch {batch}"
    peak = sgemm_peak()
    plain = timed(work, args.repeats)                   # after a warm-up, without the timers
    spent, flops = instrument(opt)
    runs = []
    for _ in range(args.repeats):
        spent.clear()
        flops.clear()
        t0 = time.perf_counter()
        work()
        runs.append((time.perf_counter() - t0, dict(spent), dict(flops)))
    total, spent, flops = sorted(runs, key=lambda r: r[0])[len(runs) // 2]
    print(f"{what}: {plain * 1e3:.0f} ms ({total * 1e3:.0f} ms with the timers); sgemm peak {peak:.0f} GFLOP/s\n")
    print("| layer | ms | share | GFLOP/s (% of peak) |")
    print("|---|---|---|---|")
    shown = 0.0
    for name, s in sorted(spent.items(), key=lambda kv: -kv[1]):
        if s < 0.005 * total:
            continue
        shown += s
        rate = f"{flops[name] / s / 1e9:.0f} ({flops[name] / s / 1e9 / peak:.0%})" if flops.get(name) else ""
        print(f"| {name} | {s * 1e3:.1f} | {s / total:.0%} | {rate} |")
    rest = total - shown
    print(f"| everything else (the layers under 0.5% each, the loss, Python between calls) | {rest * 1e3:.1f} | "
          f"{rest / total:.0%} | |")


if __name__ == "__main__":
    main()
