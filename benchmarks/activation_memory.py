"""
Activation memory per pair of a train step, with and without --grad-checkpointing, and the largest
batch that fits in a memory budget.

    python benchmarks/activation_memory.py                 ViT-B/32, 24 GiB, about a minute on 2 cores
    python benchmarks/activation_memory.py --preset tiny

NumPy reports every buffer it allocates to tracemalloc, so the peak traced during one forward and
backward pass, minus what was alive before it, is the step's working memory: the activations kept for
the backward, the gradients, and the temporaries of the layer in flight. Measured at two batch sizes,
its slope is the memory each pair costs and its intercept the fixed part (the gradients of the weights).
The largest batch adds the weights and AdamW's two moments, 3 x 4 bytes a parameter, to the fixed part.
"""
import argparse
import os
import sys
import tracemalloc

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import miniclip as mc  # noqa: E402  before NumPy: it makes OpenBLAS's settings (mc.cpu_settings)
import numpy as np  # noqa: E402


def step_peak(params, cfg, n, checkpoint):
    """Bytes traced at the peak of one loss_and_grads on a batch of n random pairs, above the start."""
    rng = np.random.default_rng(0)
    pixels = rng.standard_normal((n, 3, cfg.image_size, cfg.image_size)).astype(np.float32)
    ids = rng.integers(1, cfg.vocab_size - 1, (n, cfg.context_length))
    ids[:, -1] = cfg.vocab_size - 1                     # full-length texts, the worst case
    tracemalloc.start()
    base = tracemalloc.get_traced_memory()[0]
    mc.loss_and_grads(params, cfg, pixels, ids, checkpoint)
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    return peak - base


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0].strip())
    p.add_argument("--preset", default="ViT-B/32", choices=sorted(mc.PRESETS))
    p.add_argument("--budget-gib", type=float, default=24.0)
    p.add_argument("--batches", type=int, nargs=2, default=(2, 6))
    args = p.parse_args()
    mc.cpu_settings()
    cfg = mc.PRESETS[args.preset]
    params = mc.init_params(cfg)
    n_params = sum(v.size for v in params.values())
    budget = args.budget_gib * 2 ** 30
    print(f"{args.preset}: {n_params / 1e6:.1f}M parameters; batches {args.batches[0]} and {args.batches[1]}; "
          f"budget {args.budget_gib:g} GiB")
    print("| | activations per pair | fixed (gradients) | largest batch in budget |")
    print("|---|---|---|---|")
    for checkpoint in (False, True):
        a, b = (step_peak(params, cfg, n, checkpoint) for n in args.batches)
        per_pair = (b - a) / (args.batches[1] - args.batches[0])
        fixed = a - per_pair * args.batches[0]
        largest = int((budget - 3 * 4 * n_params - fixed) // per_pair)
        name = "--grad-checkpointing" if checkpoint else "plain backward"
        print(f"| {name} | {per_pair / 2 ** 20:.1f} MiB | {fixed / 2 ** 20:.0f} MiB | {largest} |")


if __name__ == "__main__":
    main()
