"""
Where an image encoding's time goes, layer by layer, against the machine's sgemm peak.

    python benchmarks/profile_encode.py                       ViT-B/32, batch 16 at 224 (bench.py's image row)
    python benchmarks/profile_encode.py --preset tiny --batch 128

Each of miniclip's layer functions is wrapped with a timer for the run; a layer's time is its own,
the layers it calls left out (attention's time is without its two linear layers). The matrix products'
rate is counted from their shapes (2 flops per multiply-add) as a share of NumPy's sgemm on 2048 x 2048
matrices (bench.py's), measured in the same run; the median of --repeats encodings after a warm-up.
"""
import argparse
import os
import sys
import time
from collections import defaultdict

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
import miniclip as mc  # noqa: E402  before NumPy: it makes OpenBLAS's settings (mc.cpu_settings)
import numpy as np  # noqa: E402
from bench import sgemm_peak, timed  # noqa: E402

LAYERS = ("linear_forward", "layernorm_forward", "layernorm_forward_fast", "quickgelu_forward_fast", "gelu_forward",
          "attention_forward_fast", "patchify", "embed_image_forward", "l2_normalize")


def instrument():
    """Wrap the layer functions: {name: [seconds of its own per call]}, {name: flops}."""
    spent, flops, stack = defaultdict(float), defaultdict(float), []

    def wrap(name, fn):
        def timed(*args, **kwargs):
            stack.append(0.0)
            t0 = time.perf_counter()
            out = fn(*args, **kwargs)
            total = time.perf_counter() - t0
            inner = stack.pop()
            spent[name] += total - inner
            if stack:
                stack[-1] += total
            if name == "linear_forward":
                x, w = args[0], args[1]
                flops[name] += 2 * (x.size // x.shape[-1]) * w.shape[0] * w.shape[1]
            return out
        return timed
    for name in LAYERS:
        setattr(mc, name, wrap(name, getattr(mc, name)))
    for act, (forward, backward) in list(mc.ACTIVATIONS_FAST.items()):  # the blocks find these through the table
        mc.ACTIVATIONS_FAST[act] = (getattr(mc, forward.__name__), backward)
    return spent, flops


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0].strip())
    p.add_argument("--preset", default="ViT-B/32", choices=sorted(mc.PRESETS))
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--repeats", type=int, default=5)
    args = p.parse_args()
    mc.cpu_settings()
    cfg = mc.PRESETS[args.preset]
    params = mc.init_params(cfg)
    pixels = np.random.default_rng(0).standard_normal((args.batch, 3, cfg.image_size, cfg.image_size)).astype(np.float32)
    peak = sgemm_peak()
    plain = timed(lambda: mc.encode_image(params, cfg, pixels), args.repeats)      # after a warm-up
    spent, flops = instrument()
    runs = []
    for _ in range(args.repeats):
        spent.clear()
        flops.clear()
        t0 = time.perf_counter()
        mc.encode_image(params, cfg, pixels)
        runs.append((time.perf_counter() - t0, dict(spent), dict(flops)))
    total, spent, flops = sorted(runs, key=lambda r: r[0])[len(runs) // 2]
    print(f"{args.preset}, batch {args.batch}: {plain * 1e3:.0f} ms an encoding "
          f"({args.batch / plain:.1f} img/s; {total * 1e3:.0f} ms with the timers); "
          f"sgemm peak {peak:.0f} GFLOP/s\n")
    print("| layer | ms | share | GFLOP/s (% of peak) |")
    print("|---|---|---|---|")
    for name, s in sorted(spent.items(), key=lambda kv: -kv[1]):
        rate = f"{flops[name] / s / 1e9:.0f} ({flops[name] / s / 1e9 / peak:.0%})" if name in flops else ""
        print(f"| {name} | {s * 1e3:.1f} | {s / total:.0%} | {rate} |")
    rest = total - sum(spent.values())
    print(f"| everything else (residual adds, reshapes, the class token's slice, ...) | {rest * 1e3:.1f} | "
          f"{rest / total:.0%} | |")


if __name__ == "__main__":
    main()
