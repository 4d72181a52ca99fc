"""Risk-coverage of a per-pixel confidence: how right the most confident x% of pixels are.

Pixels are ranked by confidence, most confident first; at coverage x the accuracy is that of the first x% of them.
The area under the risk curve (AURC, risk = 1 - accuracy, averaged over every coverage from one pixel to all of them)
is 0 for a confidence that ranks every right pixel above every wrong one, and the error rate itself for a random
order (`aurc_random`: the expected risk is the same at every coverage).

Confidences are accumulated as 16-bit levels (the values the confidence PNG carries: `round(c * 65535)`), so memory
is two histograms whatever the number of pixels. Pixels sharing a level are taken in random order: inside a level
the cumulative error grows linearly (its expected value), so ties never favour a measure.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

LEVELS = 65536
COVERAGES = tuple(round(0.5 + 0.05 * i, 2) for i in range(11))  # 0.50, 0.55, ..., 1.00


def quantize(conf: np.ndarray) -> np.ndarray:
    """Confidence in [0, 1] (any shape) -> uint16 levels `round(c * 65535)` (nan -> 0)."""
    c = np.nan_to_num(np.asarray(conf, np.float64), nan=0.0)
    return np.round(np.clip(c, 0.0, 1.0) * (LEVELS - 1)).astype(np.uint16)


@dataclass
class RiskCoverage:
    """Accumulates (confidence, right?) per pixel; `curve`, `accuracy_at` and `aurc` read it."""

    total: np.ndarray = field(default_factory=lambda: np.zeros(LEVELS, np.int64))  # pixels per level
    wrong: np.ndarray = field(default_factory=lambda: np.zeros(LEVELS, np.int64))  # wrong pixels per level

    def add(self, conf: np.ndarray, correct: np.ndarray, valid: np.ndarray | None = None) -> None:
        """`conf` in [0, 1], `correct` bool, `valid` bool (pixels to count; default all), all the same shape."""
        q = quantize(conf).reshape(-1)
        ok = np.asarray(correct, bool).reshape(-1)
        if q.shape != ok.shape:
            raise ValueError(f"confidence and correctness differ in size: {q.shape} vs {ok.shape}")
        if valid is not None:
            v = np.asarray(valid, bool).reshape(-1)
            q, ok = q[v], ok[v]
        self.total += np.bincount(q, minlength=LEVELS)
        self.wrong += np.bincount(q[~ok], minlength=LEVELS)

    def merge(self, other: "RiskCoverage") -> None:
        self.total += other.total
        self.wrong += other.wrong

    @property
    def pixels(self) -> int:
        return int(self.total.sum())

    def _cum(self) -> tuple[np.ndarray, np.ndarray]:
        """Cumulative pixels and wrong pixels at the end of each non-empty level, most confident level first."""
        t = self.total[::-1]
        w = self.wrong[::-1]
        nz = t > 0
        return np.cumsum(t[nz]), np.cumsum(w[nz])

    def wrong_among(self, k: np.ndarray) -> np.ndarray:
        """Expected wrong pixels among the `k` most confident (float `k`, 0..pixels), ties in random order."""
        n, e = self._cum()
        k = np.asarray(k, np.float64)
        if not len(n):
            return np.zeros_like(k)
        return np.interp(k, np.r_[0, n], np.r_[0, e])

    def accuracy_at(self, coverage: float) -> float:
        """Pixel accuracy of the most confident `coverage` share of pixels (nan without pixels)."""
        n = self.pixels
        if not n:
            return float("nan")
        k = max(coverage * n, 1e-9)
        return float(1.0 - self.wrong_among(np.array([k]))[0] / k)

    def curve(self, coverages=COVERAGES) -> list[dict]:
        """`[{"coverage", "accuracy"}]` at each coverage (default 0.50, 0.55, ..., 1.00)."""
        return [{"coverage": float(c), "accuracy": round(self.accuracy_at(c), 6)} for c in coverages]

    def aurc(self) -> float:
        """Mean risk over every coverage k/N, k = 1..N (exact for the levels; ties in random order)."""
        n = self.pixels
        if not n:
            return float("nan")
        k = np.arange(1, n + 1, dtype=np.float64) if n <= 4_000_000 else np.linspace(1, n, 4_000_000)
        return float(np.mean(self.wrong_among(k) / k))

    def aurc_random(self) -> float:
        """AURC of pixels in random order: the error rate (the expected risk at every coverage)."""
        n = self.pixels
        return float(self.wrong.sum() / n) if n else float("nan")


class RiskReport:
    """One eval run's risk-coverage: the confidence (`SegmentationResult.confidence`) against the raw top score (the
    highest final score of each pixel: a vote share with regions) and random order, and the coverage left by a
    `min_confidence` threshold (unsure pixels)."""

    def __init__(self, min_confidence: float = 0.0):
        self.min_confidence = float(min_confidence or 0.0)
        self.confidence = RiskCoverage()
        self.top_score = RiskCoverage()
        self.valid = 0
        self.kept = 0
        self.kept_right = 0

    def add(self, gt: np.ndarray, pred: np.ndarray, res, ignore: int) -> np.ndarray:
        """Count one image (`gt`, `pred` `[H, W]` dataset ids, `res` its SegmentationResult with scores and
        confidence); returns `gt` with the unsure pixels set to `ignore` (for the confusion matrix)."""
        valid = gt != ignore
        right = gt == pred
        if res.confidence is None:
            raise ValueError("the segmentation result has no confidence map")
        self.confidence.add(res.confidence, right, valid)
        if res.scores is not None:
            self.top_score.add(np.asarray(res.scores).max(0), right, valid)
        n = int(valid.sum())
        self.valid += n
        keep = valid
        if self.min_confidence > 0:
            unsure = res.confidence < self.min_confidence
            gt = np.where(unsure, ignore, gt)
            keep = valid & ~unsure
        self.kept += int(keep.sum())
        self.kept_right += int((keep & right).sum())
        return gt

    @property
    def coverage(self) -> float:
        """Share of the (not ignored) pixels that are labelled, not unsure."""
        return self.kept / self.valid if self.valid else float("nan")

    @property
    def accuracy(self) -> float:
        """Pixel accuracy of the labelled (not unsure, not ignored) pixels."""
        return self.kept_right / self.kept if self.kept else float("nan")

    @property
    def aurc(self) -> float:
        return self.confidence.aurc()

    @property
    def aurc_random(self) -> float:
        return self.confidence.aurc_random()

    @property
    def aurc_top_score(self) -> float:
        return self.top_score.aurc() if self.top_score.pixels else float("nan")

    def to_dict(self) -> dict:
        top = {p["coverage"]: p["accuracy"] for p in self.top_score.curve()} if self.top_score.pixels else {}
        return {"risk_coverage": [{**p, "accuracy_top_score": top.get(p["coverage"])}
                                  for p in self.confidence.curve()],
                "aurc": round(self.aurc, 6), "aurc_random": round(self.aurc_random, 6),
                "aurc_top_score": round(self.aurc_top_score, 6), "min_confidence": self.min_confidence,
                "coverage": round(self.coverage, 6), "accuracy": round(self.accuracy, 6)}

    def format(self) -> str:
        """The risk-coverage table: accuracy of the most confident x% of pixels, by confidence and by top score."""
        lines = [f"{'coverage':>8} {'confidence':>11} {'top score':>10} {'random':>8}"]
        rnd = 1 - self.aurc_random
        for p, q in zip(self.confidence.curve(), self.top_score.curve()):
            lines.append(f"{100 * p['coverage']:>7.0f}% {p['accuracy']:>11.5f} {q['accuracy']:>10.5f} {rnd:>8.5f}")
        lines.append(f"{'AURC':>8} {self.aurc:>11.5f} {self.aurc_top_score:>10.5f} {self.aurc_random:>8.5f}")
        if self.min_confidence > 0:
            lines.append(f"min confidence {self.min_confidence:g}: coverage {100 * self.coverage:.2f}%, accuracy "
                         f"{self.accuracy:.5f} (the rest unsure, left out of mIoU)")
        return "\n".join(lines)
