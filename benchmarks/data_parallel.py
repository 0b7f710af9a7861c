"""
Data-parallel training on MPI: K = 2 processes against one, and miniclip against PyTorch's own data
parallelism (DistributedDataParallel over gloo, features gathered with torch.distributed.nn.all_gather
and the same local loss), on the same machine, weights and inputs, in one run.

    python benchmarks/data_parallel.py            tiny and ViT-B/32, about 5 minutes on 2 cores
    python benchmarks/data_parallel.py --quick    tiny only

Needs requirements-dev.txt and requirements-dist.txt. Every configuration is started by mpiexec (one
process runs without it) with the machine's cores split evenly: one process gets all of them as BLAS
threads, two get half each, as train.py arranges. One step is forward, backward, the collectives and
AdamW on a global batch; times are process 0's medians after one warm-up, with a barrier before each,
and for the tiny model the median of three rounds taken in turn.
For miniclip the step is also split: the time inside the three collectives includes waiting for the
slower process.
"""
import argparse
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))
sys.path.insert(0, HERE)

from bench import B32, TINY, inputs, make_folder, timed  # noqa: E402

CORES = os.cpu_count()
CASES = {"tiny": (TINY, 128, 16), "b32": (B32, 32, 77)}    # spec, global batch, text length


def shard(x, rank, k):
    n = len(x) // k
    return x[rank * n:(rank + 1) * n]


def miniclip_step(folder, case, repeats):
    import miniclip as mc
    import weights
    import train
    mc.cpu_settings()                                   # as train.py's main() does
    group = train.mpi_group()
    rank, k = (group.rank, group.size) if group else (0, 1)
    spec, n, text_len = CASES[case]
    pixels, ids = inputs(spec, n, text_len)
    pixels, ids = shard(pixels, rank, k), shard(ids, rank, k)
    params, cfg = weights.load_weights(folder)
    opt = mc.AdamW(params)
    in_collectives = [0.0]
    if group:                                           # time each collective, waiting included
        for name in ("allgather", "reduce_scatter", "mean"):
            def timed_call(*a, _f=getattr(group, name)):
                t = time.perf_counter()
                out = _f(*a)
                in_collectives[0] += time.perf_counter() - t
                return out
            setattr(group, name, timed_call)

    def step():
        if group:
            group.comm.Barrier()
            loss, grads = train.data_parallel_loss_and_grads(params, cfg, pixels, ids, group)
        else:
            loss, grads = mc.loss_and_grads(params, cfg, pixels, ids)
        opt.step(params, grads, 1e-5)
    seconds = timed(step, repeats)
    return rank, {"seconds": seconds, "collectives": in_collectives[0] / (repeats + 1)}


def torch_step(folder, case, repeats):
    import torch
    import torch.distributed as dist
    import torch.distributed.nn.functional as dist_nn
    import transformers
    rank, k = int(os.environ.get("PMI_RANK", 0)), int(os.environ.get("PMI_SIZE", 1))
    torch.set_num_threads(max(1, CORES // k))
    spec, n, text_len = CASES[case]
    pixels, ids = inputs(spec, n, text_len)
    px, tid = torch.from_numpy(shard(pixels, rank, k)), torch.from_numpy(shard(ids, rank, k))
    model = transformers.CLIPModel.from_pretrained(folder, attn_implementation="eager")
    model.train()
    if k > 1:
        dist.init_process_group("gloo", rank=rank, world_size=k)
        model = torch.nn.parallel.DistributedDataParallel(model)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-5, betas=(0.9, 0.98), eps=1e-6, weight_decay=0.2)
    scale = (model.module if k > 1 else model).logit_scale
    labels = torch.arange(len(px)) + rank * len(px)

    def step():
        if k > 1:
            dist.barrier()
        opt.zero_grad(set_to_none=True)
        out = model(input_ids=tid, pixel_values=px)     # normalized image_embeds and text_embeds
        img, txt = out.image_embeds, out.text_embeds
        img_all = torch.cat(dist_nn.all_gather(img)) if k > 1 else img
        txt_all = torch.cat(dist_nn.all_gather(txt)) if k > 1 else txt
        s = scale.exp().clamp(max=100)
        loss = (torch.nn.functional.cross_entropy(s * img @ txt_all.T, labels)
                + torch.nn.functional.cross_entropy(s * txt @ img_all.T, labels)) / 2
        loss.backward()
        opt.step()
    return rank, {"seconds": timed(step, repeats)}


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run(framework, case, folder, k, threads, repeats):
    """One configuration under mpiexec; returns process 0's measurements."""
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(free_port())}
    mpiexec = os.path.join(os.path.dirname(sys.executable), "mpiexec")
    cmd = [sys.executable, __file__, "--one", framework, case, folder, str(repeats)]
    out = subprocess.run(([mpiexec, "-n", str(k)] if k > 1 else []) + cmd, env=env, capture_output=True,
                         text=True, check=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0].strip())
    p.add_argument("--quick", action="store_true")
    p.add_argument("--one", nargs=4, metavar=("FRAMEWORK", "CASE", "FOLDER", "REPEATS"), help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.one:
        framework, case, folder, repeats = args.one
        rank, result = (miniclip_step if framework == "miniclip" else torch_step)(folder, case, int(repeats))
        if rank == 0:
            print(json.dumps(result))
        return

    import platform
    import torch
    print(f"machine: {platform.processor() or platform.machine()}, {CORES} cores; numpy {np.__version__}, "
          f"torch {torch.__version__}")
    print()
    print("| global batch | processes x BLAS threads | miniclip s/step | PyTorch s/step | time ratio (miniclip / PyTorch) "
          "| miniclip: share of the step in collectives |")
    print("|---|---|---|---|---|---|")
    with tempfile.TemporaryDirectory() as d:
        for case in ("tiny",) if args.quick else ("tiny", "b32"):
            folder = os.path.join(d, case)
            make_folder(CASES[case][0], folder)
            repeats, rounds = (10, 3) if case == "tiny" else (3, 1)
            name = f"{'tiny' if case == 'tiny' else 'ViT-B/32'}, {CASES[case][1]} pairs"
            # The four configurations take turns, and each reports the median of its rounds, so a drift
            # in the machine's speed lands on all of them alike.
            runs = [{(fw, k): run(fw, case, folder, k, CORES // k, repeats) for k in (1, 2) for fw in ("miniclip", "torch")}
                    for _ in range(rounds)]
            median = lambda fw, k: {m: statistics.median(r[fw, k][m] for r in runs) for m in runs[0][fw, k]}
            one = {fw: median(fw, 1) for fw in ("miniclip", "torch")}
            two = {fw: median(fw, 2) for fw in ("miniclip", "torch")}
            for label, r in ((f"1 x {CORES}", one), (f"2 x {CORES // 2}", two)):
                share = f"{r['miniclip']['collectives'] / r['miniclip']['seconds']:.0%}" if r is two else ""
                print(f"| {name} | {label} | {r['miniclip']['seconds']:.3f} | {r['torch']['seconds']:.3f} "
                      f"| {r['miniclip']['seconds'] / r['torch']['seconds']:.2f} | {share} |")
            print(f"| {name} | speedup of 2 processes over 1 | {one['miniclip']['seconds'] / two['miniclip']['seconds']:.2f}x "
                  f"| {one['torch']['seconds'] / two['torch']['seconds']:.2f}x | | |")
            if case == "tiny":
                over = run("miniclip", case, folder, 2, CORES, 3)
                print(f"| {name} | 2 x {CORES}, oversubscribed | {over['seconds']:.3f} | | | "
                      f"{over['collectives'] / over['seconds']:.0%} |")


if __name__ == "__main__":
    main()
