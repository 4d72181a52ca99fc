"""Thing proposals from the prototypes (issue 27; recipe `segmentation.thing_proposals`, off in paper.yaml).

The classifier pre-filter makes one call per image; a thing class it does not keep is lost however good its
prototypes are (OVDIFF.md 6.2; the toy world's `red circle` called a `red ring`, a `yellow circle` missed). The
prototypes are a second, denser opinion: each cell of the whole-image view (its features average-pooled to a grid
of `proposal_grid` cells on the short side) asks the faiss class retrieval (`Segmenter._class_index`: one class-level
foreground prototype per class) for its nearest classes, per extractor, cosines summed over extractors as
`Segmenter.retrieve` does. A thing class the pre-filter dropped is proposed when it is the nearest asked class (stuff
included, so stuff cells vote for stuff) in at least `proposal_min_share` of the cells; at most `thing_proposals`
per image, the most voted first. A proposal is then matched like a kept class in the whole view the presence check
already scores, and stays only where it wins `proposal_min_area` of that view by at least `proposal_margin` (cosine,
mean over extractors) against the kept classes' full prototypes (instance and part rows, background included): the
cheap vote proposes, the full match decides.

Cost per image: `cells x classes x D` multiply-adds per extractor in the retrieval (16 x 21 cells x 1203 classes at
LVIS size, a few ms) and at most `thing_proposals` more classes in the whole-view match; no text prompts, no
extra extractor pass (the whole-image features are the presence check's, reused by the views).
"""
from __future__ import annotations

from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F


def cell_queries(f: torch.Tensor, grid: int) -> np.ndarray:
    """`f [D, h, w]` whole-image features -> `[N, D]` float32 unit rows: the features average-pooled to `grid`
    cells on the short side (the aspect kept, never more cells than pixels)."""
    d, h, w = f.shape
    s = min(1.0, grid / min(h, w))
    size = (max(1, round(h * s)), max(1, round(w * s)))
    q = F.adaptive_avg_pool2d(f[None].float(), size)[0].flatten(1).T  # [N, D]
    return F.normalize(q, dim=1).cpu().numpy().astype(np.float32)


def cell_similarities(index, rows: np.ndarray, q: np.ndarray, n_classes: int, k: int) -> np.ndarray:
    """The `k` nearest class-level prototypes of each query `q [N, D]` in a faiss index whose row i is class
    `rows[i]` -> `[N, n_classes]` cosine per (cell, class), -1 for classes not among a cell's `k` nearest."""
    sims, found = index.search(q, min(index.ntotal, k))
    out = np.full((len(q), n_classes), -1.0, np.float32)
    ok = found >= 0
    cells = np.broadcast_to(np.arange(len(q))[:, None], found.shape)
    np.maximum.at(out, (cells[ok], rows[found[ok]]), sims[ok])
    return out


def propose(total: np.ndarray, asked: Sequence[int], kept: Sequence[int], things: Sequence[int], min_share: float,
            limit: int, floor: float) -> list[int]:
    """`total [N, C]` summed cosines per (cell, class) -> asked thing classes not in `kept` that are the nearest
    asked class in at least `min_share` of the N cells, most cells first (ties: lower class id), at most `limit`.
    Cells where no asked class was retrieved (every asked total at `floor`: -1 per extractor) vote for none."""
    asked = np.asarray(sorted(set(asked)), np.int64)
    if limit <= 0 or not len(asked) or not len(total):
        return []
    sub = total[:, asked]  # [N, A]
    win = asked[sub.argmax(1)]
    voted = sub.max(1) > floor + 1e-6
    share = np.bincount(win[voted], minlength=total.shape[1]) / len(total)
    kept_set, thing_set = set(kept), set(things)
    cands = [int(c) for c in asked if int(c) in thing_set and int(c) not in kept_set and share[c] >= min_share]
    cands.sort(key=lambda c: (-share[c], c))
    return cands[:limit]


def clear_wins(scores: torch.Tensor, rows: Sequence[int], margin: float) -> dict[int, float]:
    """`scores [K + 1, h, w]` of the whole view (mean over extractors) -> per row of `rows`, the share of all pixels
    it wins (argmax of the scores clamped at 0, ties to the first row) by at least `margin` over the best other
    row."""
    s = scores.clamp_min(0)
    out = {}
    for r in rows:
        others = torch.cat([s[:r], s[r + 1:]]).amax(0)
        out[r] = float(((s[r] > others) & (s[r] - others >= margin)).float().mean())
    return out
