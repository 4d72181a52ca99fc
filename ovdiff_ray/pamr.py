"""PAMR, pixel-adaptive mask refinement (Araslanov & Roth 2020; OVDIFF.md 6.6): scores refined by local colour
affinities at several dilations."""
from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F

_NEIGHBOURS = [(-1, -1), (-1, 0), (-1, 1), (0, -1), (0, 1), (1, -1), (1, 0), (1, 1)]


def _shifts(x: torch.Tensor, dilations: Sequence[int], centre: bool) -> list[torch.Tensor]:
    """`x [C, H, W]` -> neighbours at each dilation (replicate padding), optionally with the centre per dilation."""
    d_max = max(dilations)
    h, w = x.shape[-2:]
    p = F.pad(x[None], (d_max,) * 4, mode="replicate")[0]
    out = []
    for d in dilations:
        for dy, dx in ([(0, 0)] if centre else []) + _NEIGHBOURS:
            y0, x0 = d_max + dy * d, d_max + dx * d
            out.append(p[:, y0:y0 + h, x0:x0 + w])
    return out


def pamr_affinity(image: torch.Tensor, dilations: Sequence[int]) -> torch.Tensor:
    """PAMR affinities `[P, H, W]` (softmax over the 8 * len(dilations) neighbours) of `image [3, H, W]`."""
    with_centre = torch.stack(_shifts(image, dilations, True))  # [9 * nd, 3, H, W]
    std = with_centre.std(0)  # [3, H, W]
    del with_centre
    diffs = torch.stack([(n - image).abs() for n in _shifts(image, dilations, False)])  # [P, 3, H, W]
    aff = (-diffs / (1e-8 + 0.1 * std)).mean(1)  # [P, H, W]
    return torch.softmax(aff, 0)


@torch.no_grad()
def pamr_refine(image: torch.Tensor, scores: torch.Tensor, iters: int = 10,
         dilations: Sequence[int] = (1, 2, 4, 8, 12, 24)) -> torch.Tensor:
    """Pixel-adaptive mask refinement (Araslanov & Roth 2020): `image [3, H, W]`, `scores [K, H, W]` -> `[K, H, W]`.

    Each iteration replaces a pixel's scores by the affinity-weighted mean of its neighbours' at several
    dilations; affinities come from local colour differences scaled by the local standard deviation.
    """
    if iters <= 0 or not dilations:
        return scores
    aff = pamr_affinity(image.float(), dilations)
    m = scores.float()
    for _ in range(iters):
        m = sum(a[None] * n for a, n in zip(aff, _shifts(m, dilations, False)))
    return m
