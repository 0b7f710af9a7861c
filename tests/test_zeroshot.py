"""zeroshot.py as a user runs it: output formats, ensembling, and every bad input. Its main() runs in
this process with stdout and stderr captured (a fresh interpreter per call added its start-up and
imports to each test, and proved nothing more); one test runs the script as a process."""
import contextlib
import io
import json
import os
import struct
import subprocess
import sys
import types
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import bpe
import data
import miniclip as mc
import weights
import train
import zeroshot
from conftest import zeroshot_probabilities

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# zeroshot.py's log probabilities against transformers': measured at most 2.4e-6 apart (float32 sums in
# another order); compared as logs, so a small probability's error is not lost under 1e-4.
LOGPROB_BOUND = 1e-5


def run(*args, cwd=None):
    """zeroshot.main(args) with its output captured: returncode, stdout, stderr, as a process would give
    them (argparse's exit status included). An exception propagates and fails the test, as a traceback would."""
    out, err, here = io.StringIO(), io.StringIO(), os.getcwd()
    try:
        os.chdir(cwd or here)
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            try:
                code = zeroshot.main([str(a) for a in args])
            except SystemExit as e:
                code = e.code
    finally:
        os.chdir(here)
    return types.SimpleNamespace(returncode=code, stdout=out.getvalue(), stderr=err.getvalue())


def test_the_script_runs_as_a_process(tiny, sample):
    """python zeroshot.py, in a process of its own, prints what main() prints and exits with its status."""
    p = subprocess.run([sys.executable, os.path.join(ROOT, "zeroshot.py"), sample, "--checkpoint", str(tiny / "tiny.npz"),
                        "--json"], capture_output=True, text=True, timeout=300)
    assert p.returncode == 0 and "Traceback" not in p.stderr, p.stderr
    assert p.stdout == run(sample, "--checkpoint", tiny / "tiny.npz", "--json").stdout
    p = subprocess.run([sys.executable, os.path.join(ROOT, "zeroshot.py"), sample, "--checkpoint", str(tiny / "nothing.npz")],
                       capture_output=True, text=True, timeout=300)
    assert p.returncode == 1 and p.stderr.startswith("error: ") and p.stderr.count("\n") == 1, p.stderr


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """A briefly trained tiny checkpoint and a few images (accuracy is not the point here)."""
    folder = tmp_path_factory.mktemp("tiny")
    assert train.main(["--tiny", "--steps", "4", "--n-train", "256", "--n-eval", "48", "--batch-size", "32",
                       "--out", str(folder / "tiny.npz")]) == 0
    return folder


@pytest.fixture(scope="module")
def sample(tiny):
    return str(sorted((tiny / "samples").iterdir())[0])


def test_table(tiny, sample):
    p = run(sample, "--checkpoint", tiny / "tiny.npz")
    assert p.returncode == 0, p.stderr
    lines = p.stdout.splitlines()
    assert lines[0] == sample and len(lines) == 6 and lines[1].lstrip().startswith("1. ")
    probs = [float(line.split("%")[0].split()[-1]) for line in lines[1:]]
    assert probs == sorted(probs, reverse=True)


def test_json_all_labels_sorted(tiny, sample):
    p = run(sample, sample, "--checkpoint", tiny / "tiny.npz", "--json")
    records = [json.loads(line) for line in p.stdout.splitlines()]
    assert len(records) == 2 and records[0]["image"] == sample
    preds = records[0]["predictions"]
    assert len(preds) == 48 and {d["label"] for d in preds} == set(data.LABELS)
    assert [d["prob"] for d in preds] == sorted((d["prob"] for d in preds), reverse=True)
    assert abs(sum(d["prob"] for d in preds) - 1) < 1e-6
    top2 = json.loads(run(sample, "--checkpoint", tiny / "tiny.npz", "--json", "--topk", "2").stdout)
    assert [d["label"] for d in top2["predictions"]] == [d["label"] for d in preds[:2]]


def test_ensembling_matches_the_definition(tiny, sample):
    """Two templates: the class embedding is the normalized mean of the two normalized prompt embeddings."""
    labels, templates = ["red star", "blue cross", "white circle"], ["a photo of a {}", "{}"]
    p = run(sample, "--checkpoint", tiny / "tiny.npz", "--json", "--labels", ",".join(labels),
            "--template", templates[0], "--template", templates[1])
    got = {d["label"]: d["prob"] for d in json.loads(p.stdout)["predictions"]}

    params, cfg, meta, _ = weights.load_checkpoint(tiny / "tiny.npz")
    tok = bpe.from_list(meta["tokenizer"])
    unit = lambda x: x / np.linalg.norm(x, axis=-1, keepdims=True)
    classes = []
    for label in labels:
        ids = tok.tokenize([t.format(label) for t in templates], cfg.context_length)
        classes.append(unit(unit(mc.encode_text(params, cfg, ids)).mean(axis=0)))
    img = unit(mc.encode_image(params, cfg, mc.preprocess(Image.open(sample), cfg.image_size)[None]))
    logits = np.exp(float(params["logit_scale"])) * img @ np.array(classes).T
    want = np.exp(logits - logits.max()) / np.exp(logits - logits.max()).sum()
    assert np.allclose([got[label] for label in labels], want[0], atol=1e-5)


def test_long_label_is_truncated_with_a_warning(tiny, sample):
    p = run(sample, "--checkpoint", tiny / "tiny.npz", "--labels", "red star," + "very " * 40 + "long")
    assert p.returncode == 0 and "warning: prompt" in p.stderr and "truncated" in p.stderr


def bomb_png(path, side=100_000):
    """A PNG whose header claims side x side pixels (10 gigapixels) over a few bytes of data."""
    chunk = lambda kind, data: (struct.pack(">I", len(data)) + kind + data
                                + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF))
    ihdr = struct.pack(">IIBBBBB", side, side, 8, 2, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 64))
                     + chunk(b"IEND", b""))


def test_bad_images_each_get_one_line_and_the_rest_are_answered(tiny, sample, tmp_path):
    (tmp_path / "dir.jpg").mkdir()
    (tmp_path / "empty.jpg").write_bytes(b"")
    (tmp_path / "text.jpg").write_text("this is not a jpeg")
    buf = tmp_path / "whole.jpg"
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (64, 64, 3), dtype=np.uint8)).save(buf)
    (tmp_path / "truncated.jpg").write_bytes(buf.read_bytes()[:300])
    bomb_png(tmp_path / "bomb.png")
    bad = {"missing.jpg": "no such file", "dir.jpg": "is a directory", "empty.jpg": "not an image",
           "text.jpg": "not an image", "truncated.jpg": "cannot decode", "bomb.png": "decompression bomb"}
    p = run(sample, *[tmp_path / name for name in bad], "--checkpoint", tiny / "tiny.npz", "--json")
    assert p.returncode == 1
    errors = p.stderr.strip().splitlines()
    assert len(errors) == len(bad)
    for line, (name, message) in zip(errors, bad.items()):
        assert line.startswith(f"error: {tmp_path / name}: ") and message in line, line
    assert [json.loads(line)["image"] for line in p.stdout.splitlines()] == [sample]


def test_decoding_workers_answer_as_this_process_does(tiny, sample, tmp_path):
    """Over several batches, with unreadable images among them: background decoding gives the same
    answers, in the same order, and the same error lines, as decoding in the process."""
    samples = sorted((tiny / "samples").iterdir())
    (tmp_path / "empty.jpg").write_bytes(b"")
    paths = [*samples[:4], tmp_path / "empty.jpg", *samples[4:], tmp_path / "missing.png", samples[0]]
    ck = tiny / "tiny.npz"
    here = run(*paths, "--checkpoint", ck, "--json", "--batch-size", "3", "--workers", "0")
    there = run(*paths, "--checkpoint", ck, "--json", "--batch-size", "3", "--workers", "2")
    assert here.returncode == there.returncode == 1
    assert len(here.stdout.splitlines()) == len(paths) - 2 and there.stdout == here.stdout
    assert there.stderr == here.stderr and len(here.stderr.splitlines()) == 2, here.stderr


def test_progress_shows_rate_and_eta_on_the_stream_it_is_given(monkeypatch):
    """Every 5 s of a long phase: done of total, images/s and the time left; a short phase says nothing."""
    import io
    clock = iter([100.0, 100.0, 101.0, 106.0, 112.0])
    monkeypatch.setattr(data.time, "time", lambda: next(clock))
    out = io.StringIO()
    shown = data.Progress("images", 1000, file=out)     # made at 100 s
    shown.update(50)                                    # 101 s: too soon
    shown.update(300)                                   # 106 s: 300 in 6 s
    shown.update(1000)                                  # 112 s: the end
    assert out.getvalue().splitlines() == ["images: 300/1,000 (6s, 50/s, ETA 14s)", "images: 1,000/1,000 (12s, 83/s)"]


def test_odd_but_valid_images(tiny, tmp_path):
    rng = np.random.default_rng(0)
    rgb = rng.integers(0, 256, (40, 60, 3), dtype=np.uint8)
    Image.fromarray(rgb).convert("RGBA").save(tmp_path / "rgba.png")
    Image.fromarray(rgb).convert("L").save(tmp_path / "gray.jpg")
    Image.fromarray(rgb).convert("P").save(tmp_path / "palette.gif")
    Image.fromarray((rng.integers(0, 65536, (40, 60))).astype(np.uint16)).save(tmp_path / "deep.png")
    p = run(*[tmp_path / n for n in ("rgba.png", "gray.jpg", "palette.gif", "deep.png")],
            "--checkpoint", tiny / "tiny.npz", "--json")
    assert p.returncode == 0, p.stderr
    assert len(p.stdout.splitlines()) == 4


def test_exif_rotation_is_applied(tmp_path):
    """Orientation 6 means: rotate 90 degrees clockwise to display. The stored left half becomes the top."""
    stored = np.zeros((20, 40, 3), dtype=np.uint8)
    stored[:, :20] = (255, 0, 0)
    stored[:, 20:] = (0, 0, 255)
    exif = Image.Exif()
    exif[0x0112] = 6
    Image.fromarray(stored).save(tmp_path / "rot.jpg", exif=exif, quality=95)
    img = np.asarray(mc.open_image(tmp_path / "rot.jpg"))
    assert img.shape == (40, 20, 3)
    assert img[5, 10, 0] > 200 > img[5, 10, 2] and img[35, 10, 2] > 200 > img[35, 10, 0]


def test_sixteen_bit_keeps_its_contrast(tmp_path):
    ramp = np.tile(np.linspace(0, 65535, 64).astype(np.uint16), (8, 1))
    Image.fromarray(ramp).save(tmp_path / "ramp.png")
    img = np.asarray(mc.open_image(tmp_path / "ramp.png"))[:, :, 0]
    assert img[0, 0] == 0 and img[0, -1] == 255 and 100 < img[0, 32] < 155


def test_whole_call_errors(tiny, sample, tmp_path):
    ck = tiny / "tiny.npz"
    p = run(sample, "--checkpoint", ck, "--labels", " , ,")
    assert p.returncode == 1 and p.stderr == "error: the label list is empty\n"

    p = run(sample, cwd=tmp_path)                       # no default checkpoint here
    assert p.returncode == 1 and "run `python train.py --tiny` first" in p.stderr

    (tmp_path / "corrupt.npz").write_bytes(b"PK\x03\x04garbage")
    np.savez(tmp_path / "pickled.npz", x=np.array([object()], dtype=object))
    np.savez(tmp_path / "foreign.npz", w=np.ones(2))
    for name, message in (("corrupt.npz", "not a readable miniclip checkpoint"),
                          ("pickled.npz", "refusing to unpickle"), ("foreign.npz", "not a miniclip checkpoint")):
        p = run(sample, "--checkpoint", tmp_path / name)
        assert p.returncode == 1 and message in p.stderr and p.stderr.count("\n") == 1, p.stderr

    (tmp_path / "hf").mkdir()
    (tmp_path / "hf" / "model.safetensors").write_bytes(struct.pack("<Q", 10 ** 12) + b"{}")
    p = run(sample, "--weights", tmp_path / "hf", "--labels", "a,b")
    assert p.returncode == 1 and "not a valid safetensors file" in p.stderr and p.stderr.count("\n") == 1

    p = run(sample, "--weights", tmp_path / "hf")
    assert p.returncode == 1 and "--weights needs labels" in p.stderr

    p = run(sample, "--checkpoint", ck, "--template", "no placeholder")
    assert p.returncode == 1 and "has no {}" in p.stderr

    (tmp_path / "latin1.txt").write_bytes("caf\xe9\n".encode("latin-1"))
    for name, message in (("latin1.txt", "latin1.txt: cannot read labels (not UTF-8 text"),
                          ("absent.txt", "absent.txt: cannot read labels (No such file or directory)")):
        p = run(sample, "--checkpoint", ck, "--labels-file", tmp_path / name)
        assert p.returncode == 1 and message in p.stderr and p.stderr.count("\n") == 1, p.stderr

    # --test's columns are fixed, so its errors name no train.py option (--csv-img-key, --skip-bad).
    (tmp_path / "cols.csv").write_text("path,title,label\nx.png,a,b\n")
    (tmp_path / "gone.csv").write_text("filepath,title,label\nabsent.png,a,b\n")
    for name, message in (("cols.csv", "no column 'filepath'; the columns are ['path', 'title', 'label']"),
                          ("gone.csv", "1 bad row, first: line 2: absent.png: no such file")):
        p = run("--checkpoint", ck, "--test", tmp_path / name)
        assert p.returncode == 1 and p.stderr == f"error: {tmp_path / name}: {message}\n", p.stderr


def test_images_from_a_folder_or_a_list_answer_as_arguments_do(tiny, tmp_path):
    """A folder is searched recursively, in sorted order, for image files only; a list file gives one path a line."""
    ck = tiny / "tiny.npz"
    samples = sorted((tiny / "samples").iterdir())
    (tmp_path / "sub").mkdir()
    for i, s in enumerate(samples):
        (tmp_path / ("sub" if i % 2 else ".") / f"{i}.png").write_bytes(s.read_bytes())
    (tmp_path / "notes.txt").write_text("not an image")
    folder = sorted(str(p) for p in tmp_path.rglob("*.png"))
    direct = run(*folder, "--checkpoint", ck, "--json")
    assert direct.returncode == 0 and len(direct.stdout.splitlines()) == len(samples)
    p = run("--images-from", tmp_path, "--checkpoint", ck, "--json")
    assert p.returncode == 0 and p.stdout == direct.stdout, p.stderr
    (tmp_path / "list.txt").write_text("\n".join(folder) + "\n\n")
    assert run("--images-from", tmp_path / "list.txt", "--checkpoint", ck, "--json").stdout == direct.stdout


def test_retrieval_and_saved_embeddings(tiny, sample, tmp_path):
    """--query ranks the images by the softmax over images, and --save-embeddings writes what was computed."""
    ck = tiny / "tiny.npz"
    samples = [str(s) for s in sorted((tiny / "samples").iterdir())]
    out = tmp_path / "emb.npz"
    p = run(*samples, tmp_path / "missing.png", "--checkpoint", ck, "--query", "a photo of a pink circle.",
            "--query", "a photo of a yellow square.", "--json", "--save-embeddings", out)
    assert p.returncode == 1 and p.stderr.count("error: ") == 1 and "missing.png: no such file" in p.stderr
    results = [json.loads(line) for line in p.stdout.splitlines()]
    assert [r["query"] for r in results] == ["a photo of a pink circle.", "a photo of a yellow square."]
    with np.load(out, allow_pickle=False) as z:
        saved = {k: z[k] for k in z.files}
    assert saved["image_paths"].tolist() == samples and saved["queries"].tolist() == [r["query"] for r in results]
    assert saved["image_embeddings"].shape == (len(samples), 64)
    assert np.allclose(np.linalg.norm(saved["image_embeddings"], axis=1), 1, atol=1e-5)
    logits = saved["logit_scale"] * saved["text_embeddings"] @ saved["image_embeddings"].T
    probs = np.exp(logits - logits.max(1, keepdims=True))
    probs /= probs.sum(1, keepdims=True)
    for q, r in enumerate(results):
        assert [d["image"] for d in r["results"]] == [samples[i] for i in np.argsort(-logits[q], kind="stable")]
        assert np.allclose([d["prob"] for d in r["results"]], np.sort(probs[q])[::-1], atol=1e-6)

    # Classification saves the label embeddings, one per label.
    p = run(sample, "--checkpoint", ck, "--labels", "red circle,blue star", "--save-embeddings", out)
    with np.load(out, allow_pickle=False) as z:
        assert z["labels"].tolist() == ["red circle", "blue star"] and z["text_embeddings"].shape == (2, 64)


def test_retrieval_and_listing_errors(tiny, sample, tmp_path):
    ck = tiny / "tiny.npz"
    (tmp_path / "empty").mkdir()
    for args, message in [(["--images-from", tmp_path / "nothing"], "no such file or folder"),
                          (["--images-from", tmp_path / "empty"], "no image files in this folder"),
                          ([], "no images: name them"),
                          ([sample, "--query", " "], "a --query is empty"),
                          ([sample, "--save-embeddings", tmp_path / "e.txt"], "must end in .npz"),
                          ([sample, "--save-embeddings", tmp_path / "no" / "e.npz"], "no folder"),
                          ([sample, "--topk", "0"], "at least 1")]:
        p = run(*args, "--checkpoint", ck)
        assert p.returncode == 1 and message in p.stderr and p.stderr.count("\n") == 1, (args, p.stderr)
    assert sorted(os.listdir(tmp_path)) == ["empty"]                  # nothing written
    p = run(sample, "--checkpoint", ck, "--query", "a", "--labels", "b")
    assert p.returncode == 2 and "not allowed with" in p.stderr


def test_retrieval_matches_transformers(tmp_path):
    """logits_per_text's softmax over the images, from a Hugging Face folder: the same ranking and probabilities."""
    from conftest import clip_folders, reference
    torch = reference("torch")
    transformers = reference("transformers")
    model, hf, _ = clip_folders(tmp_path)
    rng = np.random.default_rng(2)
    images = [tmp_path / f"{i}.png" for i in range(5)]
    for i, path in enumerate(images):
        Image.fromarray(rng.integers(0, 256, (60 + 7 * i, 80, 3), dtype=np.uint8)).save(path)
    queries = ["a dog on a beach", "Two red cars!"]
    p = run(*images, "--weights", hf, *[a for q in queries for a in ("--query", q)], "--json")
    assert p.returncode == 0, p.stderr
    got = [{d["image"]: d["prob"] for d in json.loads(line)["results"]} for line in p.stdout.splitlines()]

    tokenizer = transformers.CLIPTokenizer.from_pretrained(str(hf))
    processor = transformers.CLIPImageProcessorPil.from_pretrained(str(hf))
    pixels = processor(images=[Image.open(i) for i in images], return_tensors="pt")["pixel_values"]
    with torch.no_grad():
        out = model(**tokenizer(queries, padding=True, return_tensors="pt"), pixel_values=pixels)
    want = torch.log_softmax(out.logits_per_text.double(), -1).numpy()
    for q in range(len(queries)):
        in_our_order = [want[q][images.index(Path(i))] for i in got[q]]     # random weights: near ties
        assert all(a >= b - 1e-5 for a, b in zip(in_our_order, in_our_order[1:]))
        assert np.abs(np.log([got[q][str(i)] for i in images]) - want[q]).max() < LOGPROB_BOUND


@pytest.mark.parametrize("act, mlp", [("quick_gelu", None), ("gelu", None), ("gelu", 176)])
@pytest.mark.parametrize("layout", ["hf", "open_clip"])
def test_weights_folder_matches_transformers(tmp_path, layout, act, mlp):
    """
    A random-weight CLIP with CLIP's real vocabulary (49,408 tokens) and context 77, written in Hugging
    Face's layout and in open_clip's: zeroshot.py --weights gives the probabilities of transformers'
    CLIPModel and its processors, for OpenAI's QuickGELU, for the exact GELU of LAION's models, and for
    an MLP of 2.75x the width (ViT-g/14's and ViT-bigG/14's are not 4x), read from intermediate_size
    and from open_clip's mlp_ratio.
    """
    from conftest import clip_folders, reference
    torch = reference("torch")
    transformers = reference("transformers")
    model, hf, oc = clip_folders(tmp_path, act, mlp=mlp)
    folder = {"hf": hf, "open_clip": oc}[layout]
    assert (model.config.text_config.vocab_size, model.config.text_config.max_position_embeddings) == (49408, 77)

    image = tmp_path / "odd.jpg"
    Image.fromarray(np.random.default_rng(1).integers(0, 256, (71, 97, 3), dtype=np.uint8)).save(image)
    labels = ["cat", "dog", "red sports car", "a diagram of attention"]
    p = run(image, "--weights", folder, "--labels", ",".join(labels), "--json")
    assert p.returncode == 0, p.stderr
    got = {d["label"]: d["prob"] for d in json.loads(p.stdout)["predictions"]}

    tokenizer = transformers.CLIPTokenizer.from_pretrained(str(hf))
    processor = transformers.CLIPImageProcessorPil.from_pretrained(str(hf))
    text = tokenizer([f"a photo of a {label}." for label in labels], padding=True, return_tensors="pt")
    pixels = processor(images=Image.open(image), return_tensors="pt")["pixel_values"]
    with torch.no_grad():
        want = torch.log_softmax(model(**text, pixel_values=pixels).logits_per_image.double(), -1)[0].numpy()
    assert np.abs(np.log([got[label] for label in labels]) - want).max() < LOGPROB_BOUND


@pytest.mark.parametrize("layout", ["hf", "open_clip"])
def test_fine_tune_a_published_folder_at_scale_100_on_captions_with_a_bang(tmp_path, layout):
    """
    The path a user takes after --tiny: published-style weights (logit scale 100, CLIP's vocabulary),
    a CSV whose captions contain "!", a few steps of fine-tuning with finite losses, and zeroshot.py
    reading the result.
    """
    from conftest import clip_folders
    _, hf, oc = clip_folders(tmp_path, width=32, layers=1, image=32, patch=8, proj=16,
                             logit_scale=float(np.log(100)))
    folder = {"hf": hf, "open_clip": oc}[layout]
    rng = np.random.default_rng(0)
    os.makedirs(tmp_path / "img")
    with open(tmp_path / "pairs.csv", "w") as f:
        f.write("filepath,title\n")
        for i in range(16):
            Image.fromarray(rng.integers(0, 256, (40, 48, 3), dtype=np.uint8)).save(tmp_path / "img" / f"{i}.png")
            f.write(f"img/{i}.png,wow! picture {i}!!\n")
    out = tmp_path / "ft.npz"
    assert train.main(["--init", str(folder), "--data", str(tmp_path / "pairs.csv"), "--steps", "6",
                       "--batch-size", "8", "--lr", "1e-4", "--warmup", "1", "--log-every", "1",
                       "--val-frac", "0.25", "--workers", "0", "--out", str(out)]) == 0
    records = [json.loads(line) for line in open(tmp_path / "ft.metrics.jsonl")]
    losses = [r["loss"] for r in records if "loss" in r]
    assert len(losses) == 6 and all(np.isfinite(losses)) and 99 < records[0]["logit_scale"] <= 100
    p = run(tmp_path / "img" / "0.png", "--checkpoint", out, "--labels", "picture 0!,picture 1!", "--json")
    got = {x["label"]: x["prob"] for x in json.loads(p.stdout)["predictions"]}
    want = zeroshot_probabilities(out, tmp_path / "img" / "0.png", ["picture 0!", "picture 1!"])
    assert p.returncode == 0 and max(abs(got[k] - want[k]) for k in want) < 1e-6, p.stderr
