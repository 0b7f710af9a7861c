"""
experiments/, small: paper.py's full grid takes an hour and --quick about 15 minutes, and the emoji
recipe an hour, more than the test suite's budget, so this runs the same code on a few steps: every
metric is computed, the claims are judged, and the figures are drawn. The verdict rule is tested on
its own.
"""
import csv
import dataclasses
import json
import os
import re
import subprocess
import sys

import numpy as np
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "experiments"))
import paper                                            # noqa: E402
import probe                                            # noqa: E402
import scenes                                           # noqa: E402

TINY = paper.Scale(seeds=(0,), images_seen=2 * 32, n_train=200, n_test=20, probe_pool=96)


def test_verdicts():
    assert paper.verdict(np.array([0.8, 0.82]), np.array([0.5, 0.52]), True)[0] == "holds"
    assert paper.verdict(np.array([0.8, 0.82]), np.array([0.5, 0.52]), False)[0] == "does not hold"
    assert paper.verdict(np.array([0.6, 0.7]), np.array([0.55, 0.65]), True)[0] == "within noise"
    assert paper.verdict(np.array([0.6]), np.array([0.5]), True)[0] == "holds (1 seed)"


def test_the_grid_end_to_end_on_a_few_steps(tmp_path):
    from conftest import reference
    reference("matplotlib")
    small = {**paper.BASE, "batch": 32}
    results = [paper.run("base", small, 0, TINY, evaluations=2),
               paper.run("bow", {**small, "objective": "bow"}, 0, TINY, evaluations=2),
               paper.run("no crop", {**small, "crop": False}, 0, TINY, evaluations=1),
               paper.run("bag", {**small, "text_layers": 0}, 0, TINY, evaluations=1)]
    base = results[0]["final"]
    for metric in ("zero-shot", "prompt: bare label", "prompt: one template", "zero-shot outline", "count",
                   "binding", "relation", *[f"probe {k}-shot" for k in paper.SHOTS]):
        assert 0 <= base[metric] <= 1, metric
    assert [p["images"] for p in results[0]["curve"]] == [32, 64] and set(results[1]["final"]) == {
        "images", "loss", "zero-shot"}
    claims = {c["claim"]: c for c in paper.claims(results)}
    assert set(results[3]["final"]) == {"images", "loss", "zero-shot"}       # a bag: zero-shot only, as bow
    assert {"contrastive beats predictive", "contrastive beats predictive, with a text transformer",
            "prompt ensembling", "random crop helps",
            "zero-shot is more robust to a shift", "limitation: binding"} <= set(claims)
    assert all(c["verdict"].endswith("(1 seed)") for c in claims.values())
    written = paper.figures(results, list(claims.values()), str(tmp_path))
    assert len(written) == 5 and all(open(p, "rb").read(4) == b"\x89PNG" for p in written)


def test_a_rerun_trains_only_the_runs_results_json_lacks(tmp_path, monkeypatch, capsys):
    """An arm added to a finished grid runs alone; the saved runs are kept as they were. A grid of
    another scale is not mixed in."""
    small = {**paper.BASE, "batch": 32}
    grid = [("base", small), ("bag", {**small, "text_layers": 0})]
    for name in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):   # main sets them for its workers;
        monkeypatch.setenv(name, "1")                                            # undone after the test
    monkeypatch.setattr(paper, "QUICK", TINY)
    monkeypatch.setattr(paper, "arms", lambda: grid)
    paper.main(["--quick", "--out", str(tmp_path), "--jobs", "1"])
    first = json.load(open(tmp_path / "results.json"))["runs"]
    assert sorted(r["arm"] for r in first) == ["bag", "base"]
    grid.append(("bow", {**small, "objective": "bow"}))
    capsys.readouterr()
    paper.main(["--quick", "--out", str(tmp_path), "--jobs", "1"])
    assert "1 runs of 64 images each (2 done before)" in capsys.readouterr().out
    again = json.load(open(tmp_path / "results.json"))
    assert [r for r in again["runs"] if r["arm"] != "bow"] == first and len(again["runs"]) == 3
    assert "contrastive beats predictive" in {c["claim"] for c in again["claims"]}
    monkeypatch.setattr(paper, "QUICK", dataclasses.replace(TINY, images_seen=32))
    paper.main(["--quick", "--out", str(tmp_path), "--jobs", "1"])
    assert "3 runs of 32 images each (0 done before)" in capsys.readouterr().out


def test_the_emoji_recipe_on_fake_packages(tmp_path, monkeypatch):
    """experiments/emoji_recipe.py end to end on the small tarballs of test_emoji, two steps a run: the
    scores of every test CSV for each arm and seed, the table, the figure; a rerun trains nothing."""
    from conftest import reference
    reference("matplotlib")
    import data
    import emoji_recipe
    from test_emoji import make_fluent, make_packages
    tarballs = [*make_packages(tmp_path), make_fluent(tmp_path)]
    assert data.main(["emoji", *tarballs, "--out", str(tmp_path / "data"), "--size", "32"]) == 0
    few = ["--steps", "2", "--batch-size", "8", "--warmup", "1", "--workers", "0"]
    monkeypatch.setattr(emoji_recipe, "ARMS", {arm: (csv_name, [*options, *few]) for arm, (csv_name, options)
                                               in emoji_recipe.ARMS.items()})
    args = ["--data", str(tmp_path / "data"), "--seeds", "0", "1", "--checkpoints", str(tmp_path / "ck"),
            "--results", str(tmp_path / "results")]
    emoji_recipe.main(args)
    results = json.load(open(tmp_path / "results" / "results.json"))
    assert [(r["arm"], r["seed"]) for r in results] == [("recipe", 0), ("tiny", 0), ("recipe", 1), ("tiny", 1)]
    for r in results:
        assert set(r["tests"]) == set(emoji_recipe.TESTS)
        unseen = r["tests"]["OpenMoji, held-out concepts"]
        assert unseen["labels"] == len((tmp_path / "data" / "labels_test.txt").read_text().splitlines())
        assert all(0 <= unseen[k] <= 1 for k in emoji_recipe.METRICS)
    table = (tmp_path / "results" / "table.md").read_text()
    assert table.count("| recipe (2 seeds) |") == len(emoji_recipe.TESTS) and "tiny (2 seeds)" in table
    assert open(tmp_path / "results" / "heldout_grid.png", "rb").read(4) == b"\x89PNG"
    # The breakdown counts top-1 as --test does, and splits every image into exactly one of its groups.
    row = emoji_recipe.breakdown(str(tmp_path / "ck" / "recipe-seed0.npz"), str(tmp_path / "data"),
                                 ["test_concepts.csv"]).splitlines()[2].strip("| ").split(" | ")
    scored = results[0]["tests"]["held-out concepts"]
    assert row[1] == f"{scored['images']:,}, {scored['labels']:,}" and row[2] == f"{scored['zeroshot_top1']:.1%}"
    n_seen, n_unseen = (cell.split(", ")[0] for cell in row[3:5])
    letters = lambda text: set(re.sub("[^a-z]", " ", text.lower()).split())
    with open(tmp_path / "data" / "train.csv", encoding="utf-8") as f:
        vocabulary = set().union(*(letters(r["title"]) for r in csv.DictReader(f)))
    with open(tmp_path / "data" / "test_concepts.csv", encoding="utf-8") as f:
        names = [r["label"] for r in csv.DictReader(f)]     # "farmer" is a held-out word; "thing 20"'s are not
    known = sum(letters(n) <= vocabulary for n in names)
    assert 0 < known < len(names) and (int(n_seen), int(n_unseen)) == (known, len(names) - known)
    assert float(row[5].rstrip("%")) >= float(row[2].rstrip("%"))         # a right name is a right concept

    # The third artist's arm, asked for, trains on train_with_fluent.csv.
    emoji_recipe.main([*args, "--seeds", "0", "--arms", "recipe+fluent"])
    log = (tmp_path / "ck" / "recipe+fluent-seed0.log").read_text()
    assert f"from {tmp_path / 'data' / 'train_with_fluent.csv'}" in log
    assert "| recipe+fluent (1 seed) |" in (tmp_path / "results" / "table.md").read_text()
    results = json.load(open(tmp_path / "results" / "results.json"))

    def no_training(*a):
        raise AssertionError("a finished run was trained again")
    monkeypatch.setattr(emoji_recipe, "run", no_training)
    emoji_recipe.main(args)
    assert json.load(open(tmp_path / "results" / "results.json")) == results


def test_the_fluent_arm_without_its_csv_is_one_line(tmp_path):
    import data
    from test_emoji import make_packages
    assert data.main(["emoji", *make_packages(tmp_path), "--out", str(tmp_path / "data"), "--size", "32"]) == 0
    p = subprocess.run([sys.executable, os.path.join(ROOT, "experiments", "emoji_recipe.py"), "--arms", "recipe+fluent",
                        "--data", str(tmp_path / "data"), "--checkpoints", str(tmp_path / "ck"),
                        "--results", str(tmp_path / "r")], capture_output=True, text=True)
    assert p.returncode == 1 and p.stderr.count("\n") == 1 and "no train_with_fluent.csv" in p.stderr, p.stderr
    assert not os.path.exists(tmp_path / "ck") and not os.path.exists(tmp_path / "r")


def test_claims_give_the_verdict_the_numbers_say():
    """Made-up results over 3 seeds, where each verdict is known: a clear win, a clear loss, a tie within
    the seeds' spread, and the robustness claim, which compares drops (smaller is better)."""
    def run(arm, seed, **final):
        return {"arm": arm, "seed": seed, "final": final, "flops": 1.0}
    results = []
    for seed, jitter in enumerate((-0.01, 0.0, 0.01)):
        results += [run("base", seed, **{"zero-shot": 0.6 + jitter, "prompt: one template": 0.5 + jitter,
                                          "prompt: bare label": 0.55 + jitter, "all pairs": 0.5 + jitter,
                                          "all pairs outline": 0.45 + jitter, "probe 16-shot": 0.7 + jitter,
                                          "probe 16-shot outline": 0.4 + jitter, "count": 0.9, "binding": 0.5,
                                          "relation": 0.5 + jitter,
                                          **{f"probe {k}-shot": 0.1 * i + jitter for i, k in enumerate(paper.SHOTS) if k != 16}}),
                    run("bow", seed, **{"zero-shot": 0.3 + jitter}), run("bag", seed, **{"zero-shot": 0.31 + jitter}),
                    run("no crop", seed, **{"zero-shot": 0.605 + jitter})]
    verdicts = {c["claim"]: c["verdict"] for c in paper.claims(results)}
    assert verdicts["contrastive beats predictive"] == "within noise"       # the bags: 0.31 against 0.3
    assert verdicts["contrastive beats predictive, with a text transformer"] == "holds"   # 0.6 against 0.3
    assert verdicts["prompt engineering"] == "does not hold"                # one template 0.5 < bare 0.55
    assert verdicts["prompt ensembling"] == "holds"                         # ensemble 0.6 > one template 0.5
    assert verdicts["random crop helps"] == "within noise"                  # 0.005 apart, spread 0.02
    assert verdicts["zero-shot is more robust to a shift"] == "holds"       # drops 0.05 against 0.3
    assert verdicts["limitation: count"] == "does not hold"                 # counting is near perfect here
    assert verdicts["limitation: binding"] == "holds"                       # binding at chance


# The scenes world (experiments/scenes.py).

def test_scenes_never_show_a_held_out_pair_in_training():
    train_set, held = scenes.scenes_world(3000, seed=0, image_size=32)
    assert len(held) == 12
    seen = {obj for key in train_set.keys for obj in key}
    assert seen and not seen & set(held)
    for color, kind in held:                                   # nor does any caption name one
        assert not any(f"{color} {kind}" in c or f"{color} {scenes.plural(kind)}" in c for c in train_set.captions)
    kinds = {("count" if len(set(k)) == 1 else "pair", len(k)) for k in train_set.keys}
    assert kinds == {("count", 1), ("count", 2), ("count", 3), ("pair", 2)}


def test_scene_captions_say_what_is_drawn():
    rng = np.random.default_rng(0)
    assert scenes.scene_caption(rng, [("red", "cross")] * 3).endswith("three red crosses")
    for _ in range(20):
        c = scenes.scene_caption(rng, [("red", "circle"), ("blue", "star")])
        assert "red circle" in c and "blue star" in c
        assert "blue star left of" not in c and "red circle right of" not in c   # the red circle is on the left


def test_scene_objects_sit_left_to_right_and_outlines_are_hollow():
    rng = np.random.default_rng(1)
    solid = scenes.draw_scene(rng, [("red", "square"), ("blue", "square")], 72).astype(int)
    red = solid[:, :, 0] - solid[:, :, 2] > 100
    blue = solid[:, :, 2] - solid[:, :, 0] > 100
    assert np.nonzero(red)[1].max() < np.nonzero(blue)[1].min()                # red entirely left of blue
    rng = np.random.default_rng(1)
    outline = scenes.draw_scene(rng, [("white", "circle")], 72, "outline").astype(int)
    rng = np.random.default_rng(1)
    filled = scenes.draw_scene(rng, [("white", "circle")], 72, "solid").astype(int)
    inside = filled.sum(axis=2) > 600                                          # the filled disc
    ys, xs = np.nonzero(inside)
    cy, cx = int(ys.mean()), int(xs.mean())
    assert filled[cy, cx].sum() > 600 and outline[cy, cx].sum() < 300          # the outline's middle is background


def test_scene_tests_have_one_right_answer_and_a_near_miss():
    train_set, held = scenes.scenes_world(10, seed=0, image_size=32)
    tests = scenes.scene_tests(30, 0, 32, "outline", held)
    assert set(tests) == {"color_shape", "count", "binding", "relation"}
    for name, t in tests.items():
        assert len(t["images"]) == len(t["candidates"]) == len(t["answers"]) == 30
        for options, answer in zip(t["candidates"], t["answers"]):
            assert len(set(options)) == len(options) and 0 <= answer < len(options)
    for options in tests["binding"]["candidates"]:            # the same words, colors swapped
        assert sorted(options[0].split()) == sorted(options[1].split()) and options[0] != options[1]
    assert all(len(o) == 48 for o in tests["color_shape"]["candidates"])


# The linear probe: its objective's gradient, and its solutions against scikit-learn's.

def probe_data(n=600, D=24, K=6, seed=0):
    """Gaussian clusters that overlap: a probe gets most, not all, right."""
    rng = np.random.default_rng(seed)
    y = rng.integers(0, K, n)
    return rng.standard_normal((K, D))[y] * 0.5 + rng.standard_normal((n, D)), y


def test_probe_gradient():
    from conftest import numerical_grad, rel_error
    X, y = probe_data(40, 5, 3)
    Y = np.eye(3)[y]
    w = np.random.default_rng(1).standard_normal(5 * 3 + 3)
    _, g = probe.probe_loss_and_grad(w, X, Y, 0.7)
    num = numerical_grad(lambda: probe.probe_loss_and_grad(w, X, Y, 0.7)[0], w)
    assert rel_error(g, num) < 1e-7


@pytest.mark.parametrize("C", [1e-3, 0.1, 10.0])
def test_probe_fit_equals_scikit_learn(C):
    """The same convex objective, so the same minimum: weights to 1e-4 of their scale, the same predictions."""
    from conftest import reference
    linear_model = reference("sklearn.linear_model")
    X, y = probe_data()
    W, b = probe.fit_probe(X, y, 6, C)
    ref = linear_model.LogisticRegression(C=C, max_iter=10_000, tol=1e-10).fit(X, y)
    assert np.abs(W - ref.coef_.T).max() < 1e-4 * np.abs(ref.coef_).max()
    assert np.array_equal((X @ W + b).argmax(axis=1), ref.predict(X))


def test_linear_probe_accuracy_equals_scikit_learn():
    """
    The whole protocol (search C on a split, refit on all) against scikit-learn searching the same grid
    on the same split: the same test accuracy within 1% (600 test points), and well above chance.
    """
    from conftest import reference
    linear_model = reference("sklearn.linear_model")
    X, y = probe_data(1200)
    Xtr, ytr, Xte, yte = X[:600], y[:600], X[600:], y[600:]
    ours = (probe.linear_probe(Xtr, ytr, Xte) == yte).mean()
    order = np.random.default_rng(0).permutation(600)
    val, fit = order[:120], order[120:]
    scores = [linear_model.LogisticRegression(C=c, max_iter=10_000).fit(Xtr[fit], ytr[fit]).score(Xtr[val], ytr[val])
              for c in probe.PROBE_CS]
    best = probe.PROBE_CS[int(np.argmax(scores))]
    ref = linear_model.LogisticRegression(C=best, max_iter=10_000).fit(Xtr, ytr).score(Xte, yte)
    assert abs(ours - ref) <= 0.01 and ours > 0.6, (ours, ref)
    labels = np.array(["cat", "dog", "car", "sky", "sea", "sun"])[ytr]       # any label values come back
    assert set(probe.linear_probe(Xtr, labels, Xte[:20])) <= set(labels)
