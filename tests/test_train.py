"""train.py: a short run end to end, exact resume, CSV data, evaluation in blocks, and bad input."""
import dataclasses
import importlib.util
import json
import os
import signal
import subprocess
import sys
import warnings

import numpy as np
import pytest
from PIL import Image

import data
import miniclip as mc
import weights
import train
import zeroshot
from conftest import zeroshot_probabilities

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SMALL = ["--n-train", "256", "--n-eval", "48", "--batch-size", "32", "--log-every", "2", "--eval-every", "4"]


def test_short_tiny_run_end_to_end(tmp_path, capsys):
    out = tmp_path / "tiny.npz"
    assert train.main(["--tiny", "--steps", "8", *SMALL, "--out", str(out)]) == 0
    log = capsys.readouterr().out
    assert "step     8/8 | loss" in log and "zeroshot_top1" in log and "img/s" in log and "ETA" in log
    params, cfg, meta, extra = weights.load_checkpoint(out)
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
    assert weights.load_checkpoint(tmp_path / "b.npz")[2]["step"] == 3
    assert train.main(["--resume", str(tmp_path / "b.npz"), "--out", str(tmp_path / "b.npz")]) == 0
    a, b = weights.load_checkpoint(tmp_path / "a.npz"), weights.load_checkpoint(tmp_path / "b.npz")
    assert a[2]["step"] == b[2]["step"] == 6
    for k in a[0]:
        assert np.array_equal(a[0][k], b[0][k]), k
    for k in a[3]:
        assert np.array_equal(a[3][k], b[3][k]), k


def test_deterministic_for_a_seed(tmp_path):
    for name in "xy":
        assert train.main(["--tiny", "--steps", "2", *SMALL, "--out", str(tmp_path / f"{name}.npz")]) == 0
    x, y = weights.load_checkpoint(tmp_path / "x.npz")[0], weights.load_checkpoint(tmp_path / "y.npz")[0]
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
    from_list(weights.load_checkpoint(out)[2]["tokenizer"]).save(tok_prefix)
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
    assert weights.load_checkpoint(part)[2]["step"] == 4

    # A model trained on captions has no labels: zeroshot.py asks for them.
    p = subprocess.run([sys.executable, os.path.join(ROOT, "zeroshot.py"), str(tmp_path / "img" / "0.png"),
                        "--checkpoint", str(out)], capture_output=True, text=True)
    assert p.returncode == 1 and p.stderr == 'error: the checkpoint stores no labels: give --labels "cat,dog" or --labels-file FILE\n'
    labels = ["picture number 1", "picture number 2", "a cat"]
    p = subprocess.run([sys.executable, os.path.join(ROOT, "zeroshot.py"), str(tmp_path / "img" / "0.png"),
                        "--checkpoint", str(out), "--labels", ",".join(labels), "--json"], capture_output=True, text=True)
    got = {x["label"]: x["prob"] for x in json.loads(p.stdout)["predictions"]}
    want = zeroshot_probabilities(out, tmp_path / "img" / "0.png", labels)
    assert p.returncode == 0 and max(abs(got[k] - want[k]) for k in labels) < 1e-6


def test_csv_errors(tmp_path, capsys):
    assert train.main(["--data", str(tmp_path / "none.csv"), "--out", str(tmp_path / "x.npz")]) == 1
    assert "none.csv: no such CSV file" in capsys.readouterr().err

    rows = [("img/0.png", "fine"), ("img/missing.png", "gone"), ("img/1.png", ""), ("img/2.png", "ok"),
            ("img/3.png", "ok too"), ("img/4.png", "also")]
    csv_path = write_csv_folder(tmp_path, rows, n_images=5)
    (tmp_path / "img" / "2.png").write_bytes(b"not a png")
    # Indexing finds missing files and empty captions before training starts.
    assert train.main(["--data", csv_path, "--out", str(tmp_path / "x.npz")]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "2 bad rows" in err and "line 3: img/missing.png: no such file" in err
    assert "line 4: empty caption" in err and "--skip-bad" in err
    assert not os.path.exists(tmp_path / "x.npz") and not os.path.exists(tmp_path / "x.metrics.jsonl")

    # An image that does not decode is found when its batch is decoded: one line naming it.
    out = str(tmp_path / "x.npz")
    every_pair = ["--steps", "2", "--batch-size", "4", "--val-frac", "0", "--workers", "0", "--out", out]
    (tmp_path / "decode.csv").write_text("filepath,title\n" + "".join(f"img/{i}.png,pair {i}\n" for i in (0, 2, 3, 4)))
    assert train.main(["--data", str(tmp_path / "decode.csv"), *every_pair]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "2.png: not an image file Pillow can read" in err and "--skip-bad" in err

    # With --skip-bad, bad rows are skipped and the undecodable image replaced by another of its batch.
    assert train.main(["--data", csv_path, "--skip-bad", *every_pair]) == 0
    log = capsys.readouterr().out
    assert "skipped 2 bad rows" in log and "skipped an unreadable image" in log and "2.png" in log

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
    assert weights.load_checkpoint(out)[2]["step"] == 2


def test_nan_loss_stops_and_keeps_the_last_checkpoint(tmp_path, capsys):
    out = tmp_path / "t.npz"
    assert train.main(["--tiny", "--steps", "2", *SMALL, "--out", str(out)]) == 0
    before = out.read_bytes()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert train.main(["--tiny", "--steps", "40", *SMALL, "--lr", "1e9", "--warmup", "1", "--out", str(out)]) == 1
    err = capsys.readouterr().err
    assert "the loss became nan" in err and "try a lower --lr" in err
    assert not caught, [str(w.message) for w in caught]      # the one line, not NumPy's overflow warnings first
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
    step = weights.load_checkpoint(out)[2]["step"]
    assert 1 <= step < 100000


def test_trim_keeps_the_end_of_text_of_captions_with_a_bang():
    """id 0 is the byte "!", a real token: trimming must keep every row's end-of-text and its feature."""
    import bpe
    tok = bpe.learn(["a cat", "a dog", "a bird"] * 5, 530)
    ids = tok.tokenize(["a cat!?", "a dog"], 20)
    assert (ids == 0).any(axis=1)[0]                    # the "!" is there as id 0
    trimmed = zeroshot.trim(ids)
    assert (trimmed == tok.vocab_size - 1).any(axis=1).all()
    cfg = dataclasses.replace(mc.PRESETS["tiny"], vocab_size=tok.vocab_size)
    params = mc.init_params(cfg, dtype=np.float64)
    assert np.allclose(mc.encode_text(params, cfg, trimmed), mc.encode_text(params, cfg, ids), rtol=1e-12, atol=1e-12)


def files_of(folder):
    return {name: (folder / name).read_bytes() for name in sorted(os.listdir(folder)) if not (folder / name).is_dir()}


def test_bad_options_are_one_line_and_touch_nothing(tmp_path, capsys):
    out = tmp_path / "c.npz"
    assert train.main(["--tiny", *SMALL, "--steps", "2", "--out", str(out)]) == 0
    (tmp_path / "junk.npz").write_bytes(os.urandom(4096))
    before = files_of(tmp_path)
    capsys.readouterr()
    cases = {
        ("--batch-size", "0"): "--batch-size must be at least 1",
        ("--val-frac", "1.0"): "--val-frac must be at least 0 and below 1",
        ("--val-frac", "-0.5"): "--val-frac must be at least 0 and below 1",
        ("--lr", "nan"): "--lr must be a finite number above 0",
        ("--log-every", "0"): "--log-every must be at least 1",
        ("--eval-every", "0"): "--eval-every must be at least 1",
        ("--steps", "0"): "--steps must be at least 1",
        ("--workers", "-1"): "--workers must be at least 0",
        ("--csv-separator", "ab"): "--csv-separator must be one character",
        ("--batch-size", "1000"): "--batch-size 1000 is more than the 256 training pairs",
        ("--tiny", "--data", "x.csv"): "--tiny is the tiny model on generated shapes; --data asks for another run",
        ("--tiny", "--preset", "ViT-L/14"): "--preset ViT-L/14 asks for another run",
        ("--tiny", "--init", str(tmp_path / "junk.npz")): "--init asks for another run",
        ("--init", str(tmp_path / "junk.npz")): "junk.npz: not a readable miniclip checkpoint (not an .npz archive)",
        ("--init", str(tmp_path / "nothing.npz")): "--init " + str(tmp_path / "nothing.npz") + ": no such file",
    }
    for flags, message in cases.items():
        assert train.main([*SMALL, "--out", str(out), *flags]) == 1, flags
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and err.startswith("error: ") and message in err, (flags, err)
        assert files_of(tmp_path) == before, flags
    assert train.main(["--resume", str(tmp_path / "junk.npz"), "--out", str(out)]) == 1
    err = capsys.readouterr().err
    assert "not an .npz archive" in err and "pickled" not in err
    assert train.main(["--resume", str(out), "--data", "x.csv"]) == 1
    assert "--resume continues the saved run" in capsys.readouterr().err
    assert files_of(tmp_path) == before


def test_csv_with_a_byte_order_mark_and_tabs(tmp_path, capsys):
    write_csv_folder(tmp_path, [], n_images=6)
    with open(tmp_path / "pairs.tsv", "w", encoding="utf-8-sig") as f:   # as a spreadsheet program writes it
        f.write("filepath\ttitle\n" + "".join(f"img/{i}.png\tpicture, number {i}!\n" for i in range(6)))
    assert train.main(["--data", str(tmp_path / "pairs.tsv"), "--csv-separator", "\\t", "--steps", "2",
                       "--batch-size", "2", "--workers", "0", "--out", str(tmp_path / "c.npz")]) == 0
    assert "5 training pairs, 1 validation pairs" in capsys.readouterr().out


def test_resume_refuses_changed_data(tmp_path, capsys):
    rows = [(f"img/{i}.png", f"picture number {i}") for i in range(10)]
    csv_path = write_csv_folder(tmp_path, rows)
    out = str(tmp_path / "c.npz")
    assert train.main(["--data", csv_path, "--steps", "4", "--stop-at", "2", "--batch-size", "4",
                       "--workers", "0", "--out", out]) == 0
    rows[3] = ("img/3.png", "another caption")
    write_csv_folder(tmp_path, rows)
    before = files_of(tmp_path)
    capsys.readouterr()
    assert train.main(["--resume", out]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "the data changed since this run was saved" in err and "--init" in err
    assert files_of(tmp_path) == before


def test_a_save_removes_what_an_interrupted_save_left(tmp_path):
    out = tmp_path / "c.npz"
    (tmp_path / "c.npz.tmp12345").write_bytes(b"x" * 1000)       # a save killed by kill -9
    (tmp_path / "c.npz.tmpfile").write_bytes(b"not ours")          # not a temporary file of ours
    assert train.main(["--tiny", *SMALL, "--steps", "1", "--out", str(out)]) == 0
    curves = ["c.png"] if importlib.util.find_spec("matplotlib") else []   # train.py's figure, when it can draw one
    assert sorted(os.listdir(tmp_path)) == sorted(["c.metrics.jsonl", "c.npz", "c.npz.tmpfile", "samples", *curves])


def test_metrics_hold_each_step_once_after_a_resume(tmp_path):
    out = tmp_path / "c.npz"
    args = ["--tiny", *SMALL, "--log-every", "1", "--eval-every", "100", "--steps", "6"]
    assert train.main([*args, "--stop-at", "3", "--out", str(out)]) == 0
    with open(tmp_path / "c.metrics.jsonl", "a") as f:            # steps a killed run logged after its save
        f.write(json.dumps({"step": 4, "loss": 1.0}) + "\n" + json.dumps({"step": 5, "loss": 1.0}) + "\n")
    assert train.main(["--resume", str(out)]) == 0
    steps = [json.loads(line)["step"] for line in open(tmp_path / "c.metrics.jsonl")]
    assert steps == [1, 2, 3, 4, 5, 6, 6]                         # 6: the loss, then the final evaluation


def test_init_with_another_image_size(tmp_path, capsys):
    """--init's weights decide the image size; the data is cut to fit them, whatever --preset says."""
    small = tmp_path / "small.npz"
    assert train.main(["--tiny", *SMALL, "--steps", "1", "--out", str(small)]) == 0
    params, cfg, meta, _ = weights.load_checkpoint(small)
    cfg48 = dataclasses.replace(cfg, image_size=48)
    weights.save_weights(tmp_path / "w48.npz", mc.init_params(cfg48), cfg48, meta={"tokenizer": meta["tokenizer"]})
    assert train.main([*SMALL, "--steps", "1", "--init", str(tmp_path / "w48.npz"),
                       "--out", str(tmp_path / "c.npz")]) == 0
    assert weights.load_checkpoint(tmp_path / "c.npz")[1].image_size == 48


def test_the_checkpoint_is_saved_before_evaluation(tmp_path, monkeypatch):
    def out_of_memory(*args):
        raise MemoryError("evaluation ran out of memory")
    monkeypatch.setattr(train, "evaluate", out_of_memory)
    with pytest.raises(MemoryError):
        train.main(["--tiny", *SMALL, "--steps", "8", "--out", str(tmp_path / "c.npz")])
    assert weights.load_checkpoint(tmp_path / "c.npz")[2]["step"] == 4


def test_recall_in_blocks_equals_the_whole_matrix(monkeypatch):
    rng = np.random.default_rng(0)
    q, items = rng.standard_normal((50, 8)), rng.standard_normal((40, 8))
    qk, ik = rng.integers(0, 10, 50), rng.integers(0, 10, 40)
    order = np.argsort(-(q @ items.T), axis=1)
    want = {k: float((ik[order[:, :k]] == qk[:, None]).any(axis=1).mean()) for k in (1, 5)}
    monkeypatch.setattr(zeroshot, "RECALL_BLOCK", 7)
    assert zeroshot.recall_at(q, items, qk, ik) == want
    assert 0 < want[1] < want[5] < 1


def test_shards_train_and_resume_exactly_with_any_workers(tmp_path, capsys):
    """Shards streamed by 0 or 2 workers, stopped and resumed or not: the same weights, bit for bit."""
    from test_data import write_shards
    pattern = write_shards(tmp_path / "shards", 3, 8)
    args = ["--data", pattern, "--steps", "6", "--batch-size", "4", "--eval-every", "3", "--val-frac", "0.2"]
    assert train.main([*args, "--workers", "0", "--out", str(tmp_path / "a.npz")]) == 0
    assert "20 training pairs, 4 validation pairs" in capsys.readouterr().out
    assert train.main([*args, "--workers", "2", "--stop-at", "4", "--out", str(tmp_path / "b.npz")]) == 0
    assert train.main(["--resume", str(tmp_path / "b.npz"), "--workers", "1"]) == 0
    a, b = weights.load_checkpoint(tmp_path / "a.npz"), weights.load_checkpoint(tmp_path / "b.npz")
    assert a[2]["step"] == b[2]["step"] == 6
    assert all(np.array_equal(a[0][k], b[0][k]) for k in a[0]) and all(np.array_equal(a[3][k], b[3][k]) for k in a[3])


def test_training_clamps_the_logit_scale_after_each_step(tmp_path):
    """Weights whose t = 5 > ln 100 (the loss does not clamp): after one step, t is ln 100."""
    start = tmp_path / "start.npz"
    assert train.main(["--tiny", *SMALL, "--steps", "1", "--out", str(start)]) == 0
    params, cfg, meta, _ = weights.load_checkpoint(start)
    params["logit_scale"] = np.array(5.0, dtype=np.float32)
    weights.save_weights(tmp_path / "hot.npz", params, cfg, meta={"tokenizer": meta["tokenizer"]})
    assert train.main([*SMALL, "--steps", "1", "--init", str(tmp_path / "hot.npz"),
                       "--out", str(tmp_path / "c.npz")]) == 0
    assert float(weights.load_checkpoint(tmp_path / "c.npz")[0]["logit_scale"]) == pytest.approx(np.log(100))


# The ablation switches: a fixed temperature and no random crop.

def test_a_fixed_temperature_stays_fixed_and_is_the_one_used(tmp_path):
    """--temperature 0.05: logit scale 20 at every step, kept through a resume; the learned one moves."""
    args = ["--tiny", "--steps", "4", *SMALL, "--log-every", "1", "--lr", "1e-2"]
    assert train.main(args + ["--temperature", "0.05", "--stop-at", "2", "--out", str(tmp_path / "fixed.npz")]) == 0
    assert train.main(["--resume", str(tmp_path / "fixed.npz")]) == 0
    assert train.main(args + ["--out", str(tmp_path / "learned.npz")]) == 0
    scale = lambda name: [r["logit_scale"] for r in map(json.loads, open(tmp_path / f"{name}.metrics.jsonl"))
                          if "logit_scale" in r]
    fixed = scale("fixed")                                   # exp of log 20 held in float32
    assert fixed == [fixed[0]] * 4 and abs(fixed[0] - 20) < 1e-5 and len(set(scale("learned"))) == 4
    params, _, meta, _ = weights.load_checkpoint(tmp_path / "fixed.npz")
    assert meta["step"] == 4 and float(params["logit_scale"]) == np.float32(np.log(20.0))


def test_frozen_parameters_are_not_updated_and_the_others_are_as_before():
    from test_model import MICRO, batch
    params = mc.init_params(MICRO, seed=1, dtype=np.float64)
    _, grads = mc.loss_and_grads(params, MICRO, *batch(MICRO, 4))
    plain, frozen = ({k: v.copy() for k, v in params.items()} for _ in range(2))
    mc.AdamW(plain).step(plain, grads, 1e-2)
    mc.AdamW(frozen, frozen=("logit_scale",)).step(frozen, grads, 1e-2)
    assert frozen["logit_scale"] == params["logit_scale"] != plain["logit_scale"]
    assert all(np.array_equal(plain[k], frozen[k]) for k in params if k != "logit_scale")


def test_without_random_crop_every_crop_is_the_center():
    idx, offsets = data.batch_plan(5, 100, 16, seed=0, slack=4, random_crop=False)
    assert offsets.shape == (16, 2) and (offsets == 2).all()
    idx2, random = data.batch_plan(5, 100, 16, seed=0, slack=4)
    assert np.array_equal(idx, idx2) and len(np.unique(random)) > 1      # the same pairs, only the crops differ


@pytest.mark.parametrize("value, ok", [("0", True), ("0.07", True), ("0.01", True), ("0.005", False),
                                       ("-1", False), ("nan", False)])
def test_temperature_option_is_checked(tmp_path, value, ok, capsys):
    status = train.main(["--tiny", "--steps", "1", *SMALL, "--temperature", value, "--out", str(tmp_path / "c.npz")])
    assert (status == 0) == ok
    if not ok:
        assert "--temperature must be 0 (learned) or at least 0.01" in capsys.readouterr().err


def test_bag_of_words_objective_trains_and_is_scored_by_label_words(tmp_path, capsys):
    """--objective bow: the loss falls, evaluation gives zero-shot only (no text embeddings, no recall),
    the checkpoint says what it is, and zeroshot.py and --init refuse what they cannot do with it."""
    out = tmp_path / "bow.npz"
    assert train.main(["--tiny", "--objective", "bow", "--steps", "12", *SMALL, "--log-every", "1", "--eval-every", "12",
                       "--lr", "3e-3", "--warmup", "1", "--out", str(out)]) == 0
    records = [json.loads(line) for line in open(tmp_path / "bow.metrics.jsonl")]
    losses = [r["loss"] for r in records if "loss" in r]
    assert np.mean(losses[-3:]) < losses[0] - 0.3
    assert [set(r["eval"]) for r in records if "eval" in r] == [{"zeroshot_top1", "zeroshot_top5"}]
    params, cfg, _, _ = weights.load_checkpoint(out)
    assert cfg.objective == "bow" and params["bow.weight"].shape == (cfg.vocab_size, cfg.embed_dim)
    assert "try: python zeroshot.py" not in capsys.readouterr().out
    p = subprocess.run([sys.executable, os.path.join(ROOT, "zeroshot.py"), str(next((tmp_path / "samples").iterdir())),
                        "--checkpoint", str(out)], capture_output=True, text=True)
    assert p.returncode == 1 and "has no text tower" in p.stderr
    assert train.main(["--init", str(out), "--objective", "bow", "--steps", "1"]) == 1
    assert "trains from scratch" in capsys.readouterr().err


def test_a_bag_of_words_text_encoder_trains_resumes_and_classifies(tmp_path):
    """--text-layers 0: the loss falls, the checkpoint holds no text transformer and no positions,
    --resume continues it, and zeroshot.py classifies with it."""
    out = tmp_path / "bag.npz"
    assert train.main(["--preset", "tiny", "--text-layers", "0", "--steps", "12", *SMALL, "--log-every", "1",
                       "--lr", "3e-3", "--warmup", "1", "--out", str(out)]) == 0
    losses = [json.loads(line)["loss"] for line in open(tmp_path / "bag.metrics.jsonl") if '"loss"' in line]
    assert np.mean(losses[-3:]) < losses[0] - 0.3
    params, cfg, _, _ = weights.load_checkpoint(out)
    assert cfg.text_layers == 0 and not any(k.startswith("transformer.") or k == "positional_embedding" for k in params)
    assert train.main(["--resume", str(out), "--steps", "14"]) == 0
    p = subprocess.run([sys.executable, os.path.join(ROOT, "zeroshot.py"), str(next((tmp_path / "samples").iterdir())),
                        "--checkpoint", str(out), "--json"], capture_output=True, text=True)
    assert p.returncode == 0, p.stderr
    probs = [x["prob"] for x in json.loads(p.stdout)["predictions"]]
    assert len(probs) == 48 and abs(sum(probs) - 1) < 1e-4                 # the 48 color-shape pairs


def test_curves_figure_beside_the_checkpoint_or_a_line_saying_why_not(tmp_path, capsys, monkeypatch):
    from conftest import reference
    reference("matplotlib")
    assert train.main(["--tiny", "--steps", "4", *SMALL, "--out", str(tmp_path / "a.npz")]) == 0
    assert f"curves: {tmp_path / 'a'}.png" in capsys.readouterr().out
    with open(tmp_path / "a.png", "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"
    monkeypatch.setitem(sys.modules, "matplotlib", None)                  # as if not installed
    assert train.main(["--tiny", "--steps", "2", *SMALL, "--out", str(tmp_path / "b.npz")]) == 0
    assert "no curves figure: matplotlib is not installed" in capsys.readouterr().out
    assert not (tmp_path / "b.png").exists()


def test_any_model_shape_from_flags_and_a_json_file(tmp_path, capsys):
    """Each shape field on top of a preset, from --model-config's JSON and then the flags (which win);
    a shape the model cannot run is one line before anything is read or written."""
    (tmp_path / "shape.json").write_text(json.dumps({"image_size": 48, "vision_layers": 1, "vision_width": 64}))
    out = tmp_path / "s.npz"
    csv_path = write_csv_folder(tmp_path, [(f"img/{i}.png", f"picture {i}") for i in range(8)])
    assert train.main(["--data", csv_path, "--steps", "1", "--batch-size", "4", "--workers", "0", "--val-frac", "0",
                       "--model-config", str(tmp_path / "shape.json"), "--vision-width", "48", "--vision-heads", "4",
                       "--text-mlp-width", "200", "--activation", "gelu", "--out", str(out)]) == 0
    cfg = weights.load_checkpoint(out)[1]
    assert (cfg.image_size, cfg.vision_layers, cfg.vision_width, cfg.vision_heads, cfg.text_mlp, cfg.vision_mlp,
            cfg.activation) == (48, 1, 48, 4, 200, 192, "gelu")
    for flags, message in [(["--vision-width", "100"], "vision_width 100 does not split into 3 heads"),
                           (["--image-size", "30"], "image_size 30 is not a multiple of patch_size 8"),
                           (["--context-length", "2"], "context_length must be at least 3"),
                           (["--text-heads", "0"], "text_heads must be a whole number of at least 1"),
                           (["--init", str(out), "--embed-dim", "32"], "--embed-dim sets a new model's shape; --init"),
                           (["--model-config", str(csv_path)], "not valid JSON")]:
        capsys.readouterr()
        assert train.main(["--data", csv_path, *flags, "--out", str(tmp_path / "never.npz")]) == 1, flags
        err = capsys.readouterr().err
        assert message in err and err.count("\n") == 1, err
        assert not (tmp_path / "never.npz").exists()
    (tmp_path / "bad.json").write_text(json.dumps({"image_size": 48, "depth": 3}))
    assert train.main(["--data", csv_path, "--model-config", str(tmp_path / "bad.json")]) == 1
    assert "not depth" in capsys.readouterr().err


def test_setup_leaves_the_arguments_as_given(tmp_path):
    """--resume reads the data options the run was saved with into the Run, not into the caller's args."""
    ck = tmp_path / "t.npz"
    assert train.main(["--tiny", "--steps", "2", "--n-train", "64", "--n-eval", "48", "--batch-size", "16",
                       "--template", "a {} shape", "--out", str(ck)]) == 0
    args = train.parse_args(["--resume", str(ck), "--steps", "3"])
    before = dict(vars(args))
    run = train.setup(args)
    assert vars(args) == before and args.template is None
    assert run.data_args["template"] == ["a {} shape"] and run.step == 2
