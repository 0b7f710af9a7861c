"""train.py: the data generator, a short run end to end, exact resume, CSV data, and bad input."""
import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
from PIL import Image

import miniclip as mc
import train

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SMALL = ["--n-train", "256", "--n-eval", "48", "--batch-size", "32", "--log-every", "2", "--eval-every", "4"]


def shape_pixels(img):
    """The pixels of the shape: the background is darker than 70 + noise in every channel."""
    return img.max(axis=2) > 110


@pytest.mark.parametrize("color", list(train.COLORS))
def test_generator_colors_match_pixels(color):
    rng = np.random.default_rng(0)
    for kind in train.SHAPES:
        img = train.draw_shape(rng, color, kind, "large", "center", 36).astype(float)
        mean = img[shape_pixels(img)].mean(axis=0)
        nearest = min(train.COLORS, key=lambda c: np.sum((np.array(train.COLORS[c]) - mean) ** 2))
        assert nearest == color, (kind, mean)


def test_generator_shapes_sizes_and_positions_match_pixels():
    rng = np.random.default_rng(1)

    def stats(kind, size="large", where="center"):
        mask = shape_pixels(train.draw_shape(rng, "white", kind, size, where, 36))
        ys, xs = np.nonzero(mask)
        fill = mask.sum() / ((np.ptp(ys) + 1) * (np.ptp(xs) + 1))     # share of the bounding box covered
        return fill, mask.sum(), xs.mean(), ys.mean()

    fills = {k: np.mean([stats(k)[0] for _ in range(5)]) for k in train.SHAPES}
    assert fills["square"] > 0.9 > fills["circle"] > 0.7 > fills["cross"] > fills["star"]
    assert 0.4 < fills["triangle"] < 0.65 and 0.4 < fills["diamond"] < 0.65
    assert stats("circle", "large")[1] > 2.5 * stats("circle", "small")[1]
    assert stats("square", "small", "left")[2] < 14 < 22 < stats("square", "small", "right")[2]
    assert stats("square", "small", "top")[3] < 14 < 22 < stats("square", "small", "bottom")[3]
    assert 15 < stats("circle", "small", "center")[2] < 21


def test_held_out_pairs_keep_every_word_in_training():
    for seed in range(5):
        seen, held = train.split_pairs(seed)
        assert len(held) == 12 and len(seen) == 36 and not set(seen) & set(held)
        assert all(sum(s == shape for _, s in held) == 2 for shape in train.SHAPES)
        assert all(sum(c == color for c, _ in held) <= 2 for color in train.COLORS)
    assert train.split_pairs(0) == train.split_pairs(0) != train.split_pairs(1)


def test_captions_name_their_color_and_shape_only():
    _, captions, attrs = train.make_shapes(300, [("red", "star"), ("blue", "cross")], seed=0, side=36)
    for caption, (color, kind, _, _) in zip(captions, attrs):
        words = set(caption.split())
        assert {color, kind} <= words and not words & (set(train.COLORS) | set(train.SHAPES)) - {color, kind}


def test_short_tiny_run_end_to_end(tmp_path, capsys):
    out = tmp_path / "tiny.npz"
    assert train.main(["--tiny", "--steps", "8", *SMALL, "--out", str(out)]) == 0
    log = capsys.readouterr().out
    assert "step     8/8 | loss" in log and "zeroshot_top1" in log and "img/s" in log and "ETA" in log
    params, cfg, meta, extra = mc.load_checkpoint(out)
    assert meta["step"] == 8 and len(meta["labels"]) == 48 and meta["templates"]
    assert len(meta["held_out_pairs"]) == 12 and set(extra) == {f"adam.{m}.{k}" for m in "mv" for k in params}
    records = [json.loads(line) for line in open(tmp_path / "tiny.metrics.jsonl")]
    assert [r["step"] for r in records if "loss" in r] == [2, 4, 6, 8]
    assert all(np.isfinite(r["loss"]) for r in records if "loss" in r)
    assert sorted(os.listdir(tmp_path / "samples"))[0].endswith(".png")


def test_resume_matches_an_uninterrupted_run(tmp_path):
    args = ["--tiny", "--steps", "6", *SMALL]
    assert train.main(args + ["--out", str(tmp_path / "a.npz")]) == 0
    assert train.main(args + ["--out", str(tmp_path / "b.npz"), "--stop-at", "3"]) == 0
    assert mc.load_checkpoint(tmp_path / "b.npz")[2]["step"] == 3
    assert train.main(["--resume", str(tmp_path / "b.npz"), "--out", str(tmp_path / "b.npz")]) == 0
    a, b = mc.load_checkpoint(tmp_path / "a.npz"), mc.load_checkpoint(tmp_path / "b.npz")
    assert a[2]["step"] == b[2]["step"] == 6
    for k in a[0]:
        assert np.array_equal(a[0][k], b[0][k]), k
    for k in a[3]:
        assert np.array_equal(a[3][k], b[3][k]), k


def test_deterministic_for_a_seed(tmp_path):
    for name in "xy":
        assert train.main(["--tiny", "--steps", "2", *SMALL, "--out", str(tmp_path / f"{name}.npz")]) == 0
    x, y = mc.load_checkpoint(tmp_path / "x.npz")[0], mc.load_checkpoint(tmp_path / "y.npz")[0]
    assert all(np.array_equal(x[k], y[k]) for k in x)


def write_csv_folder(folder, rows, n_images=10):
    os.makedirs(folder / "img", exist_ok=True)
    rng = np.random.default_rng(0)
    for i in range(n_images):
        Image.fromarray(rng.integers(0, 256, (20 + i, 30, 3), dtype=np.uint8)).save(folder / "img" / f"{i}.png")
    with open(folder / "pairs.csv", "w") as f:
        f.write("filepath,title\n" + "".join(f"{p},{c}\n" for p, c in rows))
    return str(folder / "pairs.csv")


def test_csv_training(tmp_path, capsys):
    rows = [(f"img/{i}.png", f"picture number {i}") for i in range(10)]
    csv_path = write_csv_folder(tmp_path, rows)
    out = tmp_path / "ck.npz"
    assert train.main(["--data", csv_path, "--steps", "3", "--batch-size", "4", "--eval-every", "3",
                       "--log-every", "1", "--out", str(out)]) == 0
    assert "9 training pairs, 1 validation pairs" in capsys.readouterr().out
    tok_prefix = tmp_path / "tok"
    from bpe import from_list
    from_list(mc.load_checkpoint(out)[2]["tokenizer"]).save(tok_prefix)
    # Fine-tune from those weights, with the tokenizer given as a file.
    assert train.main(["--data", csv_path, "--steps", "2", "--batch-size", "4", "--init", str(out),
                       "--tokenizer", f"{tok_prefix}.bpe", "--out", str(tmp_path / "ft.npz")]) == 0
    # Stop early and resume: the checkpoint remembers the CSV, so --data need not be given again.
    part = tmp_path / "part.npz"
    capsys.readouterr()
    assert train.main(["--data", csv_path, "--steps", "4", "--batch-size", "4", "--val-frac", "0",
                       "--stop-at", "2", "--out", str(part)]) == 0
    assert "10 training pairs, 0 validation pairs" in capsys.readouterr().out
    assert train.main(["--resume", str(part), "--out", str(part)]) == 0
    assert "10 training pairs, 0 validation pairs" in capsys.readouterr().out
    assert mc.load_checkpoint(part)[2]["step"] == 4

    # A model trained on captions has no labels: zeroshot.py asks for them.
    p = subprocess.run([sys.executable, os.path.join(ROOT, "zeroshot.py"), str(tmp_path / "img" / "0.png"),
                        "--checkpoint", str(out)], capture_output=True, text=True)
    assert p.returncode == 1 and p.stderr == 'error: the checkpoint stores no labels: give --labels "cat,dog" or --labels-file FILE\n'
    p = subprocess.run([sys.executable, os.path.join(ROOT, "zeroshot.py"), str(tmp_path / "img" / "0.png"),
                        "--checkpoint", str(out), "--labels", "picture number 1,picture number 2"],
                       capture_output=True, text=True)
    assert p.returncode == 0 and "picture number" in p.stdout


def test_csv_errors(tmp_path, capsys):
    assert train.main(["--data", str(tmp_path / "none.csv"), "--out", str(tmp_path / "x.npz")]) == 1
    assert "none.csv: no such CSV file" in capsys.readouterr().err

    rows = [("img/0.png", "fine"), ("img/missing.png", "gone"), ("img/1.png", ""), ("img/2.png", "ok"),
            ("img/3.png", "ok too"), ("img/4.png", "also")]
    csv_path = write_csv_folder(tmp_path, rows, n_images=5)
    (tmp_path / "img" / "2.png").write_bytes(b"not a png")
    assert train.main(["--data", csv_path, "--out", str(tmp_path / "x.npz")]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "3 bad rows" in err and "line 3: img/missing.png: no such file" in err
    assert "line 4: empty caption" in err and "line 5: img/2.png: not an image" in err and "--skip-bad" in err

    assert train.main(["--data", csv_path, "--skip-bad", "--steps", "1", "--batch-size", "2",
                       "--out", str(tmp_path / "x.npz")]) == 0
    assert "skipped 3 bad rows" in capsys.readouterr().out

    with open(tmp_path / "cols.csv", "w") as f:
        f.write("image,caption\nimg/0.png,x\n")
    assert train.main(["--data", str(tmp_path / "cols.csv"), "--out", str(tmp_path / "x.npz")]) == 1
    assert "no column 'filepath'; the columns are ['image', 'caption']" in capsys.readouterr().err


def test_an_unwritable_out_is_one_line(tmp_path, capsys):
    (tmp_path / "file").write_text("")
    assert train.main(["--tiny", *SMALL, "--steps", "1", "--out", str(tmp_path / "file" / "c.npz")]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith(f"error: cannot write beside {tmp_path / 'file' / 'c.npz'}: ")


def test_resume_saves_back_into_the_file_it_resumed(tmp_path):
    out = str(tmp_path / "c.npz")
    assert train.main(["--tiny", *SMALL, "--steps", "2", "--stop-at", "1", "--out", out]) == 0
    assert train.main(["--resume", out]) == 0
    assert mc.load_checkpoint(out)[2]["step"] == 2


def test_nan_loss_stops_and_keeps_the_last_checkpoint(tmp_path, capsys):
    out = tmp_path / "t.npz"
    assert train.main(["--tiny", "--steps", "2", *SMALL, "--out", str(out)]) == 0
    before = out.read_bytes()
    assert train.main(["--tiny", "--steps", "40", *SMALL, "--lr", "1e9", "--warmup", "1", "--out", str(out)]) == 1
    err = capsys.readouterr().err
    assert "the loss became nan" in err and "try a lower --lr" in err
    assert out.read_bytes() == before


def test_ctrl_c_saves_and_exits(tmp_path):
    out = tmp_path / "c.npz"
    proc = subprocess.Popen([sys.executable, "-u", os.path.join(ROOT, "train.py"), "--tiny", "--steps", "100000",
                             *SMALL, "--log-every", "1", "--eval-every", "100000", "--out", str(out)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    for line in proc.stdout:
        if line.startswith("step"):
            break
    proc.send_signal(signal.SIGINT)
    rest, err = proc.communicate(timeout=60)
    assert proc.returncode == 130, err
    assert "Traceback" not in err and "interrupted" in rest and "resume with" in rest
    step = mc.load_checkpoint(out)[2]["step"]
    assert 1 <= step < 100000
