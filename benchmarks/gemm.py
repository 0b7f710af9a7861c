"""
The matrix products alone: NumPy's BLAS against PyTorch's, on the products of a ViT-B/32 encoding and
of the tiny train step.

    python benchmarks/gemm.py                5 alternating rounds, about a minute
    python benchmarks/gemm.py --rounds 9

A ViT-B/32 image encoding at batch 16 spends about 80% of its time in four products per block (800
rows: 16 images x 50 positions): q, k, v projected together, attention's output projection, and the
MLP's two layers. The tiny train step spends about half of its time in the same four, much smaller
(2,176 rows: 128 images x 17 positions, width 96), each also in the backward's two products: dx = dout w
and dw = dout^T x. Whatever the rest of miniclip does, it cannot beat PyTorch by more than these
products allow. Each side runs in its own process, 2 threads, the median of 20 products after a
warm-up, each round in turn (NumPy's side first, then the other way round).
"""
import argparse
import os
import statistics
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# name: (M, In, Out, product) as linear_forward and linear_backward make them, x (M, In), w (Out, In):
# "x w^T" the forward, "dout w" the input's gradient, "dout^T x" the weight's.
SHAPES = {f"ViT-B/32 encoding, {name} ({M} x {i} -> {o})": (M, i, o, "x w^T") for name, (M, i, o) in
          {"q, k, v": (800, 768, 2304), "out_proj": (800, 768, 768), "c_fc": (800, 768, 3072),
           "c_proj": (800, 3072, 768)}.items()}
SHAPES.update({f"tiny train step, {name} ({M} x {i} -> {o}), {kind}": (M, i, o, kind)
               for name, (M, i, o) in {"q, k, v": (2176, 96, 288), "out_proj": (2176, 96, 96),
                                       "c_fc": (2176, 96, 384), "c_proj": (2176, 384, 96)}.items()
               for kind in ("x w^T", "dout w", "dout^T x")})

SIDE = """
import sys, time, statistics
sys.path.insert(0, %r)
framework = sys.argv[1]
if framework == "numpy":
    import miniclip                                     # before NumPy, as every entry point: its CPU settings
    miniclip.cpu_settings()
    import numpy as np
    rng = np.random.default_rng(0)
    make = lambda *s: rng.standard_normal(s).astype(np.float32)
else:
    import torch
    torch.set_num_threads(2)
    make = lambda *s: torch.randn(*s)
for M, In, Out, kind in %r:
    x, w, dout = make(M, In), make(Out, In), make(M, Out)
    product = {"x w^T": lambda: x @ w.T, "dout w": lambda: dout @ w, "dout^T x": lambda: dout.T @ x}[kind]
    product()
    times = []
    for _ in range(20):
        t = time.perf_counter()
        product()
        times.append(time.perf_counter() - t)
    print(statistics.median(times))
""" % (ROOT, list(SHAPES.values()))


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0].strip())
    p.add_argument("--rounds", type=int, default=5, help="alternating rounds, each side once a round (default 5)")
    rounds = p.parse_args().rounds
    if rounds < 1:
        p.error("--rounds must be at least 1")
    times = {"numpy": [], "torch": []}
    for r in range(rounds):
        for fw in (("numpy", "torch") if r % 2 == 0 else ("torch", "numpy")):
            out = subprocess.run([sys.executable, "-c", SIDE, fw], capture_output=True, text=True, check=True).stdout
            times[fw].append([float(t) for t in out.split()])
    print(f"{rounds} alternating rounds, 2 threads each\n")
    print("| product | NumPy (OpenBLAS) | PyTorch | time ratio, NumPy / PyTorch: median (range over rounds) |")
    print("|---|---|---|---|")
    for i, (name, (M, In, Out, _)) in enumerate(SHAPES.items()):
        ours, theirs = [t[i] for t in times["numpy"]], [t[i] for t in times["torch"]]
        ratios = [a / b for a, b in zip(ours, theirs)]
        rate = lambda ts: f"{statistics.median(ts) * 1e3:.2f} ms, {2 * M * In * Out / statistics.median(ts) / 1e9:.0f} GFLOP/s"
        print(f"| {name} | {rate(ours)} | {rate(theirs)} | {statistics.median(ratios):.2f} "
              f"({min(ratios):.2f}-{max(ratios):.2f}) |")


if __name__ == "__main__":
    main()
