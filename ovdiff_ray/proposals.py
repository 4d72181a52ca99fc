"""Recall past the pre-filter (issue 27; recipe `segmentation.thing_proposals`, off in paper.yaml).

The classifier pre-filter makes one call per image; a thing class it does not keep is lost however good its
prototypes are (OVDIFF.md 6.2; in the toy world a `cyan circle` on `cyan dots` is never called, a `red circle` is
called a `red ring`). Two steps, both bounded per image:

1. **Prototypes propose where.** Each cell of the whole-image view (its features average-pooled to `proposal_grid`
   cells on the short side) asks the faiss class retrieval (`Segmenter._class_index`: one class-level foreground
   prototype per class) for its nearest classes, per extractor, cosines summed over extractors as
   `Segmenter.retrieve` does. A thing class the pre-filter dropped is proposed when it is the nearest asked class
   (stuff included, so stuff cells vote for stuff) in at least `proposal_min_share` of the cells; at most
   `thing_proposals` per image, the most voted first. Each proposal is matched with the kept classes in the whole
   view (full prototypes, background included) and marks a region where it wins at least `proposal_min_area` of
   the view.
2. **The classifier names what.** The bounding box of the region's largest connected part, grown by
   `proposal_context` of its size, is cropped and given to the classifier; its best thing class among the asked
   ones (single-class text embeddings, as the pre-filter's candidates) is added to the kept classes when the
   pre-filter had not kept it. Where the region is a kept class's object the classifier names that class again and
   nothing is added.

Measured at the whole toy vocabulary (README "The tail"), it does not pay there, so it is off in every recipe: the
prototypes of same-coloured toy things are close (a ring's prototypes win a circle's pixels), so proposals added
as they are cost more than they recover (nanmean 0.962 -> 0.921 at 88 classes, development draw); named by the
classifier's crop they cost little (0.961, fresh draws -0.003 to -0.005), but the crop call fails where the
image's did.

Cost per image: `cells x classes x D` multiply-adds per extractor in the retrieval (16 x 16 cells x 1203 classes at
LVIS size), one more whole-view match with at most `thing_proposals` more classes, and at most `thing_proposals`
crops through the classifier's image encoder (its text embeddings are cached); no extra extractor pass.
"""
from __future__ import annotations

from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F


def grid_size(h: int, w: int, grid: int) -> tuple[int, int]:
    """Cells `(rows, cols)` for an `h x w` image: `grid` on the short side (never more than pixels), aspect kept."""
    s = min(1.0, grid / min(h, w))
    return max(1, round(h * s)), max(1, round(w * s))


def cell_queries(f: torch.Tensor, size: tuple[int, int]) -> np.ndarray:
    """`f [D, h, w]` whole-image features -> `[rows * cols, D]` float32 unit rows: the features average-pooled to
    `size` cells (the same cells for every extractor, whatever its stride)."""
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


def region_box(mask: torch.Tensor, context: float) -> tuple[slice, slice]:
    """`mask [h, w]` bool (not empty) -> (rows, cols) slices of the bounding box of its largest 8-connected component,
    grown by `context` x its size on each side (clipped to the image), at least 8 px a side where the image allows."""
    from scipy import ndimage

    lab, n = ndimage.label(mask.cpu().numpy(), np.ones((3, 3), bool))
    big = 1 + int(np.argmax(np.bincount(lab.ravel(), minlength=n + 1)[1:])) if n > 1 else 1
    ys, xs = np.nonzero(lab == big)
    h, w = mask.shape
    y0, y1, x0, x1 = int(ys.min()), int(ys.max()) + 1, int(xs.min()), int(xs.max()) + 1
    gy = max(round(context * (y1 - y0)), (8 - (y1 - y0) + 1) // 2, 0)
    gx = max(round(context * (x1 - x0)), (8 - (x1 - x0) + 1) // 2, 0)
    return slice(max(0, y0 - gy), min(h, y1 + gy)), slice(max(0, x0 - gx), min(w, x1 + gx))
