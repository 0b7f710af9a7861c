"""
experiments/, small: paper.py's full grid takes an hour and --quick about 15 minutes, and the emoji
recipe an hour, more than the test suite's budget, so this runs the same code on a few steps: every
metric is computed, the claims are judged, and the figures are drawn. The verdict rule is tested on
its own.
"""
import json
import os
import sys

import numpy as np
import pytest

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "experiments"))
import paper                                            # noqa: E402

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
               paper.run("no crop", {**small, "crop": False}, 0, TINY, evaluations=1)]
    base = results[0]["final"]
    for metric in ("zero-shot", "prompt: bare label", "prompt: one template", "zero-shot outline", "count",
                   "binding", "relation", *[f"probe {k}-shot" for k in paper.SHOTS]):
        assert 0 <= base[metric] <= 1, metric
    assert [p["images"] for p in results[0]["curve"]] == [32, 64] and set(results[1]["final"]) == {
        "images", "loss", "zero-shot"}
    claims = {c["claim"]: c for c in paper.claims(results)}
    assert {"contrastive beats predictive", "prompt ensembling", "random crop helps",
            "zero-shot is more robust to a shift", "limitation: binding"} <= set(claims)
    assert all(c["verdict"].endswith("(1 seed)") for c in claims.values())
    written = paper.figures(results, list(claims.values()), str(tmp_path))
    assert len(written) == 5 and all(open(p, "rb").read(4) == b"\x89PNG" for p in written)


def test_the_emoji_recipe_on_fake_packages(tmp_path, monkeypatch):
    """experiments/emoji_recipe.py end to end on the small tarballs of test_emoji, two steps a run: the
    scores of every test CSV for each arm and seed, the table, the figure; a rerun trains nothing."""
    from conftest import reference
    reference("matplotlib")
    import data
    import emoji_recipe
    from test_emoji import make_packages
    assert data.main(["emoji", *make_packages(tmp_path), "--out", str(tmp_path / "data"), "--size", "32"]) == 0
    few = ["--steps", "2", "--batch-size", "8", "--warmup", "1", "--workers", "0"]
    monkeypatch.setattr(emoji_recipe, "ARMS", {"recipe": ["--preset", "emoji", *few], "tiny": ["--preset", "tiny", *few]})
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

    def no_training(*a):
        raise AssertionError("a finished run was trained again")
    monkeypatch.setattr(emoji_recipe, "run", no_training)
    emoji_recipe.main(args)
    assert json.load(open(tmp_path / "results" / "results.json")) == results


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
                    run("bow", seed, **{"zero-shot": 0.3 + jitter}),
                    run("no crop", seed, **{"zero-shot": 0.605 + jitter})]
    verdicts = {c["claim"]: c["verdict"] for c in paper.claims(results)}
    assert verdicts["contrastive beats predictive"] == "holds"              # 0.6 against 0.3
    assert verdicts["prompt engineering"] == "does not hold"                # one template 0.5 < bare 0.55
    assert verdicts["prompt ensembling"] == "holds"                         # ensemble 0.6 > one template 0.5
    assert verdicts["random crop helps"] == "within noise"                  # 0.005 apart, spread 0.02
    assert verdicts["zero-shot is more robust to a shift"] == "holds"       # drops 0.05 against 0.3
    assert verdicts["limitation: count"] == "does not hold"                 # counting is near perfect here
    assert verdicts["limitation: binding"] == "holds"                       # binding at chance
