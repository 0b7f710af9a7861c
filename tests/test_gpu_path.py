"""
The GPU path without a GPU. tests/fake_gpu/cupy.py stands in for CuPy: its arrays refuse implicit
conversion to NumPy and mixing with NumPy arrays, as CuPy's do, and compute with NumPy underneath. So
a forgotten to_device/to_numpy, or a NumPy call on a device array, fails here as it would on a GPU, and
everything else gives the CPU path's numbers exactly. (On a real GPU: MINICLIP_DEVICE=gpu pytest.)
"""
import dataclasses
import importlib
import json
import os
import subprocess
import sys

import numpy as np
import pytest

import miniclip as mc
from test_model import MICRO, batch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FAKE = os.path.join(ROOT, "tests", "fake_gpu")
GPU_ENV = {"PYTHONPATH": FAKE, "MINICLIP_DEVICE": "gpu"}


@pytest.fixture
def fake_gpu(monkeypatch):
    """mc.xp is the stand-in for this test, NumPy again after it."""
    monkeypatch.syspath_prepend(FAKE)
    monkeypatch.delitem(sys.modules, "cupy", raising=False)
    cupy = importlib.import_module("cupy")
    assert cupy.__file__.startswith(FAKE)
    mc.set_device("gpu")
    yield cupy
    mc.set_device("cpu")


def test_the_stand_in_refuses_what_cupy_refuses(fake_gpu):
    a = fake_gpu.asarray(np.arange(6.0).reshape(2, 3))
    host = np.ones((2, 3))
    for mistake in (lambda: np.asarray(a), lambda: a + host, lambda: host * a, lambda: a @ host.T,
                    lambda: fake_gpu.concatenate([a, host]), lambda: np.exp(a) - host, lambda: a.__setitem__(0, host[0])):
        with pytest.raises(TypeError):
            mistake()
    assert float(a.sum()) == 15.0 and a.get().tolist() == [[0, 1, 2], [3, 4, 5]] and a[1, 2].item() == 5.0
    assert isinstance(np.exp(a), fake_gpu.ndarray) and isinstance(a * np.float32(2), fake_gpu.ndarray)


@pytest.mark.parametrize("cfg", [MICRO, dataclasses.replace(MICRO, text_layers=0)], ids=["transformer", "bag of words"])
def test_train_step_equals_the_cpu_path(fake_gpu, cfg):
    """Loss, every gradient, an AdamW step and the logit-scale clamp: device arrays, the CPU's numbers."""
    pixels, ids = batch(cfg, 6)
    results = []
    for device in ("gpu", "cpu"):
        mc.set_device(device)
        params = mc.init_params(cfg, seed=1, dtype=np.float64)
        params["logit_scale"] = mc.xp.asarray(5.0)                      # above ln 100: the clamp acts
        loss, grads = mc.loss_and_grads(params, cfg, mc.to_device(pixels), mc.to_device(ids), checkpoint=True)
        opt = mc.AdamW(params)
        opt.step(params, grads, lr=1e-2)
        mc.clamp_logit_scale(params)
        if device == "gpu":
            assert all(isinstance(v, fake_gpu.ndarray) for v in [*grads.values(), *params.values()])
        results.append((loss, mc.to_numpy(grads), mc.to_numpy(params)))
    (loss_g, grads_g, params_g), (loss_c, grads_c, params_c) = results
    assert loss_g == loss_c
    assert all(np.array_equal(grads_g[k], grads_c[k]) for k in grads_c)
    assert all(np.array_equal(params_g[k], params_c[k]) for k in params_c)
    assert params_c["logit_scale"] == np.log(100)


def run(script, *args, env=None, cwd=None):
    p = subprocess.run([sys.executable, os.path.join(ROOT, script), *map(str, args)], capture_output=True,
                       text=True, cwd=cwd, timeout=300, env={**os.environ, **(env or {})})
    assert p.returncode == 0 and "Traceback" not in p.stderr, p.stdout + p.stderr
    return p


def test_train_evaluate_resume_and_zeroshot_end_to_end(tmp_path):
    """train.py (with evaluation, a stop and a resume) and zeroshot.py both ways, as a user runs them with
    --device gpu: every step's loss and evaluation equal the CPU run's, and so do the answers."""
    small = ["--tiny", "--n-train", "256", "--n-eval", "48", "--batch-size", "32", "--log-every", "1",
             "--eval-every", "2", "--steps", "4"]
    for device in ("gpu", "cpu"):
        out = tmp_path / device / "c.npz"
        run("train.py", *small, "--stop-at", "2", "--out", out, "--device", device, env=GPU_ENV, cwd=tmp_path)
        run("train.py", "--resume", out, "--device", device, env=GPU_ENV, cwd=tmp_path)
    timing = ("img_per_s", "data_wait")
    logs = [[{k: v for k, v in json.loads(line).items() if k not in timing}
             for line in open(tmp_path / d / "c.metrics.jsonl")] for d in ("gpu", "cpu")]
    assert logs[0] == logs[1] and sum("eval" in r for r in logs[0]) == 2

    samples = sorted(str(p) for p in (tmp_path / "cpu" / "samples").iterdir())
    answers = []
    for device in ("gpu", "cpu"):
        ck = tmp_path / device / "c.npz"
        answers.append(run("zeroshot.py", *samples, "--checkpoint", ck, "--device", device, "--json",
                           env=GPU_ENV).stdout)
        answers.append(run("zeroshot.py", *samples, "--checkpoint", ck, "--device", device, "--json",
                           "--query", "a photo of a pink circle.", "--save-embeddings", tmp_path / f"{device}.npz",
                           env=GPU_ENV).stdout)
    assert answers[:2] == answers[2:]
    with np.load(tmp_path / "gpu.npz") as g, np.load(tmp_path / "cpu.npz") as c:
        assert all(np.array_equal(g[k], c[k]) for k in c.files)


def test_a_published_folder_on_the_gpu_path(tmp_path):
    """A Hugging Face folder with exact GELU through zeroshot.py --device gpu: the CPU path's probabilities."""
    from conftest import clip_folders
    _, hf, oc = clip_folders(tmp_path, "gelu", width=32, layers=1, image=32, patch=8, proj=16)
    image = tmp_path / "x.png"
    from PIL import Image
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (40, 50, 3), dtype=np.uint8)).save(image)
    for folder in (hf, oc):
        got = [run("zeroshot.py", image, "--weights", folder, "--labels", "cat,dog", "--json", "--device", device,
                   env=GPU_ENV).stdout for device in ("gpu", "cpu")]
        assert got[0] == got[1]
