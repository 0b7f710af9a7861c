"""
experiments/paper.py, small: the full grid takes an hour and --quick about 15 minutes, more than the
test suite's budget, so this runs the same code on a few steps: every metric is computed, the claims
are judged, and the figures are drawn. The verdict rule is tested on its own.
"""
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
