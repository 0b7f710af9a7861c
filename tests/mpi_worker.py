"""
Data-parallel computations for tests/test_distributed.py, run under mpiexec (or alone, as one process).

    mpiexec -n K python tests/mpi_worker.py step OUT.npz N   one step's loss and gradients on a global batch of
                                                              N pairs, then two AdamW steps; process 0 saves them
    mpiexec -n K python tests/mpi_worker.py train ARGS...    train.py with these arguments, in float64

Everything is float64, so a difference from one process on the whole batch is round-off (~1e-15), not
float32's 1e-7, and the tests can ask for 1e-10.
"""
import functools
import os
import sys

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import miniclip as mc                                   # noqa: E402
import train                                            # noqa: E402
from test_model import MICRO, batch                     # noqa: E402


def shard(x, group):
    """This process's rows of a global batch."""
    n = len(x) // group.size
    return x[group.rank * n:(group.rank + 1) * n]


def step(out, N):
    group = train.mpi_group()
    params = mc.init_params(MICRO, seed=1, dtype=np.float64)
    pixels, ids = batch(MICRO, N, seed=0)
    loss, grads = train.data_parallel_loss_and_grads(params, MICRO, shard(pixels, group), shard(ids, group), group)
    opt = mc.AdamW(params)
    for seed in (1, 2):
        pixels, ids = batch(MICRO, N, seed=seed)
        _, g = train.data_parallel_loss_and_grads(params, MICRO, shard(pixels, group), shard(ids, group), group)
        opt.step(params, g, lr=1e-2)
    if group.rank == 0:
        np.savez(out, loss=loss, **{f"grad.{k}": v for k, v in grads.items()},
                 **{f"param.{k}": v for k, v in params.items()})


if __name__ == "__main__":
    if sys.argv[1] == "step":
        step(sys.argv[2], int(sys.argv[3]))
    else:
        train.mc.init_params = functools.partial(mc.init_params, dtype=np.float64)
        sys.exit(train.main(sys.argv[2:]))
