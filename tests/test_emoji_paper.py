"""
experiments/emoji_paper.py and experiments/supervised.py: the supervised baseline's gradient, the
held-out skin tones, the claims on made-up results whose verdicts are known, and the grid end to end
on the small tarballs of test_emoji, a few steps a run.
"""
import dataclasses
import json
import os
import re
import sys

import numpy as np

import miniclip as mc
from conftest import numerical_grad, rel_error

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "experiments"))
import emoji_paper                                      # noqa: E402
import supervised                                       # noqa: E402

MICRO = mc.Config(image_size=12, patch_size=4, vision_width=8, vision_layers=2, vision_heads=2,
                  context_length=7, vocab_size=20, text_width=12, text_layers=2, text_heads=2, embed_dim=6)


def test_supervised_gradient():
    """Every parameter tensor of the image tower and the head, up to 12 entries each, float64, below 1e-6."""
    params = supervised.init_params(MICRO, 5, seed=1, dtype=np.float64)
    assert set(params) == {k for k in mc.param_shapes(MICRO) if k.startswith("visual.")} | {"head.weight", "head.bias"}
    rng = np.random.default_rng(0)
    pixels, labels = rng.standard_normal((6, 3, 12, 12)), np.array([0, 4, 2, 2, 1, 4])
    loss, grads = supervised.loss_and_grads(params, MICRO, pixels, labels)
    assert set(grads) == set(params)
    f = lambda: supervised.loss_and_grads(params, MICRO, pixels, labels)[0]
    worst = {}
    for name, p in params.items():
        index = rng.choice(p.size, min(12, p.size), replace=False)
        worst[name] = rel_error(np.asarray(grads[name]).reshape(-1)[index], numerical_grad(f, p, index=index))
    assert max(worst.values()) < 1e-6, worst


def test_supervised_loss_is_cross_entropy_of_the_right_class():
    """Against the definition, written out: -log softmax(features head^T + bias)[label], averaged."""
    params = supervised.init_params(MICRO, 3, seed=2, dtype=np.float64)
    pixels, labels = np.random.default_rng(1).standard_normal((4, 3, 12, 12)), np.array([2, 0, 1, 2])
    logits = supervised.class_scores(params, MICRO, pixels)
    want = np.mean([np.log(np.exp(row).sum()) - row[y] for row, y in zip(logits, labels)])
    assert abs(supervised.loss_and_grads(params, MICRO, pixels, labels)[0] - want) < 1e-12


def test_supervised_model_fits_a_few_images():
    """CS231n's sanity check: 8 images of 4 classes are learned by heart in 150 steps."""
    rng = np.random.default_rng(0)
    params = supervised.init_params(MICRO, 4, seed=0)
    pixels, labels = rng.standard_normal((8, 3, 12, 12)).astype(np.float32), np.arange(8) % 4
    opt = mc.AdamW(params, weight_decay=0.0)
    first = supervised.loss_and_grads(params, MICRO, pixels, labels)[0]
    for _ in range(150):
        loss, grads = supervised.loss_and_grads(params, MICRO, pixels, labels)
        opt.step(params, grads, 3e-3)
    assert first > 1.0 and loss < 0.05
    assert np.array_equal(supervised.class_scores(params, MICRO, pixels).argmax(axis=1), labels)


def rows(codes):
    return [{"filepath": f"images/{v}/{c}.png", "title": c, "label": f"name of {c}"} for c in codes
            for v in ("google", "twitter")]


def test_split_tones_keeps_two_tones_of_each_toned_class_out():
    tones = ["1F3FB", "1F3FC", "1F3FD", "1F3FE", "1F3FF"]
    wave = ["1F44B"] + [f"1F44B-{t}" for t in tones]
    tip = ["1F481-200D-2640"] + [f"1F481-{t}-200D-2640" for t in tones]
    orphan = [f"1F91D-{t}" for t in tones]                     # its untoned base is not in training: no class
    drawn = set()
    for seed in range(10):
        classes, held = emoji_paper.split_tones(rows(wave + tip + orphan + ["1F600"]), seed=seed)
        assert set(classes) == {"1F44B", "1F481-200D-2640", "1F600"}
        assert len(held & set(wave)) == len(held & set(tip)) == emoji_paper.TONES_HELD and len(held) == 4
        assert not held & set(classes) and not held & set(orphan)       # only toned variants, of a class
        assert held == emoji_paper.split_tones(rows(wave + tip + orphan + ["1F600"]), seed=seed)[1]      # seeded
        drawn |= held
    assert len(drawn) > 4                                               # and the seed picks which


def test_world_keeps_the_held_tones_out_of_training(tmp_path):
    import data
    from test_emoji import make_packages
    assert data.main(["emoji", *make_packages(tmp_path), "--out", str(tmp_path / "data"), "--size", "32"]) == 0
    world = emoji_paper.build_world(str(tmp_path / "data"), str(tmp_path / "work"))
    _, held = emoji_paper.split_tones(emoji_paper.read_rows(tmp_path / "data" / "train.csv"))
    assert held
    crops, labels, names = world.tests["in-distribution"]
    shifted = world.tests["shifted"]
    assert len(crops) == 2 * len(held) and len(shifted[0]) == len(held) and names == shifted[2]
    # No held-out tone trains: no caption names one (a toned name is unique to its emoji), and the
    # supervised set is every other training image of a class, once.
    train_rows = emoji_paper.read_rows(tmp_path / "data" / "train.csv")
    held_names = {r["label"] for r in train_rows if emoji_paper.code_of(r["filepath"]) in held}
    assert len(held_names) == len(held)
    named = re.compile("|".join(rf"(?<![\w-]){re.escape(n)}(?![\w-])" for n in held_names))   # "man ..." is not in "woman ..."
    assert not [c for c in world.captioned.captions if named.search(c)]
    assert len(world.captioned) == len([r for r in train_rows if emoji_paper.code_of(r["filepath"]) not in held])
    kept = {r["filepath"] for r in train_rows if emoji_paper.code_of(r["filepath"]) not in held
            and emoji_paper.untoned(emoji_paper.code_of(r["filepath"])) in set(emoji_paper.split_tones(train_rows)[0])}
    assert len(world.labeled) == len(kept)
    # The choices are the classes that come in skin tones, and each image's label is its untoned emoji's.
    assert names == [world.class_names[c] for c in world.candidates]
    name_of = {emoji_paper.code_of(r["filepath"]): r["label"] for r in train_rows}
    want = [name_of[emoji_paper.untoned(c)] for c in sorted(held) for _ in range(2)]    # google and twitter
    assert sorted(names[y] for y in labels) == sorted(want)
    # The decoded images are cached and read back the same.
    again = emoji_paper.build_world(str(tmp_path / "data"), str(tmp_path / "work"))
    assert np.array_equal(again.tests["shifted"][0], shifted[0])


def fake_results(er=0.5, probe_er=0.0, slope=-0.05, one=0.30, bare=0.20, ensemble=0.25, bow=0.02, bag=0.10):
    """Made-up runs over 3 seeds whose verdicts are known: supervised points on a line in logit space,
    CLIP er logits above it and probes probe_er above it, error = 2 FLOPs^slope on every run."""
    n = 1000
    inv = lambda z: 1 / (1 + np.exp(-z))
    out = []
    for seed, jitter in enumerate((-0.01, 0.0, 0.01)):
        for i, (w, s) in enumerate([(32, 100), (64, 100), (96, 300), (128, 300)]):
            x = -1.0 + 0.6 * i + jitter
            out.append({"kind": "supervised", "width": w, "steps": s, "seed": seed, "flops": 1.0,
                        "scores": {"in-distribution": inv(x), "shifted": inv(0.5 * x - 2)}})
            flops = 1e9 * 10 ** i
            scores = {"in-distribution": inv(x), "shifted": inv(0.5 * x - 2 + er + jitter),
                      "held-out concepts": 1 - 2 * flops ** slope}
            if w == 96:
                scores.update({"probe in-distribution": inv(x + 1), "probe shifted": inv(0.5 * (x + 1) - 2 + probe_er),
                               **{f"{t}, {p}": v + jitter for t in ("held-out concepts", "OpenMoji, seen concepts")
                                  for p, v in (("bare name", bare), ("one template", one), ("ensemble", ensemble))}})
            out.append({"kind": "clip", "width": w, "steps": s, "seed": seed, "flops": flops, "scores": scores})
        out.append({"kind": "bow", "width": 96, "steps": 450, "seed": seed, "flops": 1e11,
                    "scores": {"held-out concepts": bow + jitter}})
        out.append({"kind": "bag", "width": 96, "steps": 470, "seed": seed, "flops": 1e11,
                    "scores": {"held-out concepts": bag + jitter}})
    return out, n


def test_claims_give_the_verdict_the_numbers_say():
    results, n = fake_results()
    claims, er, fits = emoji_paper.claims(results, n, n)
    verdicts = {c["claim"]: c for c in claims}
    robust = verdicts["zero-shot CLIP is effectively robust"]
    assert robust["verdict"] == "holds" and abs(robust["a - b"] - 0.5) < 0.02              # 0.5 logits above the line
    assert all(abs(e["slope"] - 0.5) < 1e-6 and abs(e["intercept"] + 2) < 1e-6 and e["r2"] > 0.999 for e in er.values())
    assert verdicts["zero-shot is more robust than a probe on its features"]["verdict"] == "holds"
    assert abs(fits["mean"]["slope"] + 0.05) < 1e-6 and fits["mean"]["r2"] > 0.999
    assert verdicts["zero-shot error falls with compute"]["verdict"] == "holds"
    assert verdicts["prompt engineering, held-out concepts"]["verdict"] == "holds"          # 0.30 > 0.20
    assert verdicts["prompt ensembling, OpenMoji, seen concepts"]["verdict"] == "does not hold"   # 0.25 < 0.30
    assert verdicts["contrastive beats predictive"]["verdict"] == "holds"                   # bag 0.10 > bow 0.02
    assert verdicts["contrastive beats predictive"]["a per seed"] == [0.09, 0.1, 0.11]      # the bag's runs, not clip's
    assert verdicts["contrastive beats predictive, with a text transformer"]["verdict"] == "holds"
    # The other way round: below the line, error rising with compute, the ensemble ahead by less than the noise.
    results, n = fake_results(er=-0.5, probe_er=-0.5, slope=0.05, ensemble=0.305, bow=0.05, bag=0.01)
    verdicts = {c["claim"]: c["verdict"] for c in emoji_paper.claims(results, n, n)[0]}
    assert verdicts["zero-shot CLIP is effectively robust"] == "does not hold"
    assert verdicts["zero-shot is more robust than a probe on its features"] == "within noise"
    assert verdicts["zero-shot error falls with compute"] == "does not hold"
    assert verdicts["prompt ensembling, held-out concepts"] == "within noise"
    assert verdicts["contrastive beats predictive"] == "does not hold"                        # 0.01 < 0.05


def test_frontier_keeps_the_runs_no_cheaper_run_beats():
    points = [(1, 0.9), (2, 0.95), (3, 0.8), (4, 0.85), (5, 0.7)]
    assert emoji_paper.frontier(points) == [(1, 0.9), (3, 0.8), (5, 0.7)]


def test_the_grid_end_to_end_on_fake_packages(tmp_path, monkeypatch):
    """Every kind of run on a few steps: the scores each claim reads, the figures, and a rerun that trains nothing."""
    from conftest import reference
    reference("matplotlib")
    import data
    from test_emoji import make_packages
    assert data.main(["emoji", *make_packages(tmp_path), "--out", str(tmp_path / "data"), "--size", "32"]) == 0
    monkeypatch.setattr(emoji_paper, "WIDTHS", (32, 64))
    monkeypatch.setattr(emoji_paper, "BASE_WIDTH", 32)
    monkeypatch.setattr(emoji_paper, "BATCH", 8)
    monkeypatch.setattr(emoji_paper, "QUICK", emoji_paper.Scale(seeds=(0,), lengths=(2, 3)))
    args = ["--data", str(tmp_path / "data"), "--quick", "--out", str(tmp_path / "out"), "--work", str(tmp_path / "work"),
            "--jobs", "1"]
    emoji_paper.main(args)
    saved = json.load(open(tmp_path / "out" / "emoji_paper.json"))
    kinds = sorted((r["kind"], r["width"], r["steps"]) for r in saved["runs"])
    assert [k for k in kinds if k[0] not in ("bow", "bag")] == sorted((k, w, s) for k in ("clip", "supervised")
                                                                       for w in (32, 64) for s in (2, 3))
    assert [k[:2] for k in kinds if k[0] in ("bow", "bag")] == [("bag", 32)] * 2 + [("bow", 32)] * 2
    bag = next(r for r in saved["runs"] if r["kind"] == "bag")
    assert set(bag["scores"]) == {"held-out concepts"}
    base = next(r for r in saved["runs"] if r["kind"] == "clip" and r["width"] == 32 and r["steps"] == 3)
    assert {"in-distribution", "shifted", "held-out concepts", "probe in-distribution", "probe shifted",
            "held-out concepts, ensemble", "OpenMoji, seen concepts, bare name"} <= set(base["scores"])
    assert all(0 <= v <= 1 for r in saved["runs"] for v in r["scores"].values())
    assert {c["claim"] for c in saved["claims"]} >= {"zero-shot CLIP is effectively robust", "contrastive beats predictive",
                                                      "zero-shot error falls with compute"}
    for name in ("emoji_robustness.png", "emoji_compute.png", "emoji_prompts.png", "emoji_contrastive_vs_bow.png"):
        assert open(tmp_path / "out" / name, "rb").read(4) == b"\x89PNG"

    def no_training(*a):
        raise AssertionError("a finished run was trained again")
    monkeypatch.setattr(emoji_paper, "run", no_training)
    emoji_paper.main(args)
    assert json.load(open(tmp_path / "out" / "emoji_paper.json"))["runs"] == saved["runs"]
    emoji_paper.main(["--from-results", "--out", str(tmp_path / "out")])


def test_figure_2s_arms_differ_from_the_contrastive_run_in_one_thing_each():
    """bag: the text encoder a bag of words (no text layers), the objective contrastive; bow: the objective
    prediction. Everything else is the base run's shape."""
    clip, bag, bow = (emoji_paper.model_config(96, kind, 500) for kind in ("clip", "bag", "bow"))
    assert dataclasses.replace(bag, text_layers=clip.text_layers) == clip and bag.text_layers == 0
    assert dataclasses.replace(bow, objective="contrastive") == clip
