"""Confidence (ovdiff_ray/confidence.py) and risk-coverage (ovdiff_ray/riskcoverage.py), checked against plain loops,
and `ovdiff eval`'s risk-coverage report and `--min-confidence` on toy scenes."""
from __future__ import annotations

import itertools
import json
from pathlib import Path

import numpy as np
import pytest
import torch

from ovdiff_ray import confidence, evaluate
from ovdiff_ray.models import toy
from ovdiff_ray.riskcoverage import LEVELS, RiskCoverage

VOCAB = str(Path(__file__).resolve().parents[1] / "bank" / "vocab" / "toy.tsv")


def plain_aurc_all_orders(conf: list[float], right: list[bool]) -> float:
    """Mean over every order consistent with `conf` (ties in every order) of the mean risk at coverage k/N."""
    n = len(conf)
    total, count = 0.0, 0
    for perm in itertools.permutations(range(n)):
        if any(conf[perm[i]] < conf[perm[i + 1]] for i in range(n - 1)):
            continue
        wrong, risks = 0, []
        for k, i in enumerate(perm, start=1):
            wrong += not right[i]
            risks.append(wrong / k)
        total += sum(risks) / n
        count += 1
    return total / count


@pytest.mark.parametrize("seed", range(6))
def test_aurc_equals_the_mean_over_tie_orders(seed):
    rng = np.random.default_rng(seed)
    conf = [float(x) for x in rng.choice([0.1, 0.5, 0.5, 0.9, 0.25], 7)]
    right = [bool(x) for x in rng.random(7) < 0.6]
    rc = RiskCoverage()
    rc.add(np.array(conf), np.array(right))
    assert rc.aurc() == pytest.approx(plain_aurc_all_orders(conf, right), abs=1e-12)
    assert rc.aurc_random() == pytest.approx(1 - np.mean(right))


def test_accuracy_at_coverage_and_orderings():
    right = np.array([True] * 90 + [False] * 10)
    good = np.r_[np.linspace(1, 0.5, 90), np.linspace(0.4, 0, 10)]  # every wrong pixel least confident
    rc = RiskCoverage()
    rc.add(good, right)
    assert rc.accuracy_at(0.9) == pytest.approx(1.0) and rc.accuracy_at(1.0) == pytest.approx(0.9)
    assert rc.accuracy_at(0.95) == pytest.approx(90 / 95)
    bad = RiskCoverage()
    bad.add(1 - good, right)
    assert rc.aurc() < bad.aurc_random() < bad.aurc()
    curve = rc.curve()
    assert [p["coverage"] for p in curve] == [0.5, 0.55, 0.6, 0.65, 0.7, 0.75, 0.8, 0.85, 0.9, 0.95, 1.0]
    with pytest.raises(ValueError, match="differ in size"):
        rc.add(good, right[:5])
    assert rc.total.shape == (LEVELS,) and rc.pixels == 100


def test_pixel_confidence_matches_a_plain_loop():
    g = torch.Generator().manual_seed(0)
    raw = torch.rand(4, 6, 5, generator=g) * 1.2 - 0.1
    final = torch.rand(4, 6, 5, generator=g)
    got = confidence.pixel_confidence(raw, final)
    arg = final.argmax(0)
    for y in range(6):
        for x in range(5):
            c = int(arg[y, x])
            px = [(yy, xx) for yy in range(6) for xx in range(5) if int(arg[yy, xx]) == c]
            fit = sum(min(max(float(raw[c, yy, xx]), 0.0), 1.0) for yy, xx in px) / len(px)
            want = min(float(final[c, y, x]), 1.0) * fit ** confidence.FIT_POWER
            assert float(got[y, x]) == pytest.approx(want, rel=1e-5, abs=1e-7)
    assert got.min() >= 0 and got.max() <= 1


def test_a_class_that_fits_its_pixels_worse_is_less_confident():
    final = torch.zeros(3, 4, 4)
    final[1, :, :2] = 1.0  # every pixel of each half voted the same way
    final[2, :, 2:] = 1.0
    raw = torch.zeros(3, 4, 4)
    raw[1, :, :2] = 0.98
    raw[2, :, 2:] = 0.90
    c = confidence.pixel_confidence(raw, final)
    assert float(c[:, :2].min()) > float(c[:, 2:].max())
    topk = confidence.class_topk(raw, final, k=2)
    assert set(topk) == {1, 2} and topk[1][0] == (1, pytest.approx(0.98, abs=1e-4))


def test_min_confidence_checks():
    assert confidence.check_min_confidence("0.25") == 0.25
    for bad in ("x", -0.1, 1.5, "nan"):
        with pytest.raises(ValueError, match="min_confidence: expected a number in \\[0, 1\\]"):
            confidence.check_min_confidence(bad)
    assert confidence.unsure_mask(np.array([0.1, 0.9]), 0) is None
    assert confidence.unsure_mask(np.array([0.1, 0.9]), 0.5).tolist() == [True, False]


def test_eval_reports_risk_coverage_and_min_confidence_trades_coverage_for_accuracy(toy_bank, tmp_path, capsys):
    scenes = tmp_path / "scenes"
    toy.write_scenes(VOCAB, 6, str(scenes), seed=5, progress=False)
    runs = {}
    for minc in (0.0, 0.5, 0.9):
        capsys.readouterr()
        assert evaluate.main(["--dataset", "toy", "--bank", toy_bank, "--root", str(scenes), "--json",
                              "--no-progress", "--min-confidence", str(minc)]) == 0
        runs[minc] = json.loads(capsys.readouterr().out)
    r = runs[0.0]
    assert [p["coverage"] for p in r["risk_coverage"]][0] == 0.5 and r["risk_coverage"][-1]["coverage"] == 1.0
    accs = [p["accuracy"] for p in r["risk_coverage"]]
    assert accs[-1] < 1 and all(0 < a <= 1 for a in accs)
    assert r["aurc"] < r["aurc_random"] and r["aurc_top_score"] < r["aurc_random"]
    assert r["coverage"] == 1.0
    covs = [runs[m]["coverage"] for m in (0.0, 0.5, 0.9)]
    assert covs[0] > covs[1] > covs[2] > 0
    # unsure pixels are ignored: the labelled ones are more often right
    accs = [runs[m]["accuracy"] for m in (0.0, 0.5, 0.9)]
    assert accs[0] < accs[1] <= accs[2], accs
    assert accs[0] == pytest.approx(r["risk_coverage"][-1]["accuracy"], abs=1e-5)
    capsys.readouterr()
    assert evaluate.main(["--dataset", "toy", "--bank", toy_bank, "--root", str(scenes), "--no-progress",
                          "--min-confidence", "0.5"]) == 0
    out = capsys.readouterr().out
    assert "AURC" in out and "top score" in out and "coverage" in out and "min confidence 0.5" in out
    with pytest.raises(SystemExit):
        evaluate.main(["--dataset", "toy", "--bank", toy_bank, "--root", str(scenes), "--min-confidence", "2"])
    assert "--min-confidence 2.0: expected a number in [0, 1]" in capsys.readouterr().err
