"""Attribution + instance masks -> foreground / background masks, for a batch on the device.

The rule of `models.masks.fg_bg_masks` (OVDIFF.md section 3; the numpy reference, one image at a time): candidates
are the non-empty instance masks plus their complement, each weighted by its mean attribution; each pixel goes to
the covering candidate of highest weight (ties: the first); foreground = the pixels of the best candidate;
background = the pixels of the lowest-weight candidate that wins any, with attribution < `bg_threshold`, eroded
`erode` times by a 3x3 cross (the image border does not erode). An image without instance masks falls back to
thresholds: fg = attribution > `fg_threshold`, bg = attribution < `bg_threshold` and not fg, not eroded.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ..recipe import MasksConfig


@dataclass
class FgBg:
    """`fg [N, H, W]`, `bg [N, H, W]` bool on the device; `kept [N]` bool: images with a non-empty foreground."""

    fg: torch.Tensor
    bg: torch.Tensor

    @property
    def kept(self) -> torch.Tensor:
        return self.fg.flatten(1).any(1)


def erode_cross(x: torch.Tensor, iterations: int) -> torch.Tensor:
    """`[N, H, W]` bool eroded by the 3x3 cross `iterations` times; outside the image counts as inside."""
    for _ in range(iterations):
        p = F.pad(x.float()[:, None], (1, 1, 1, 1), value=1.0)[:, 0]
        x = (p[:, 1:-1, 1:-1] * p[:, :-2, 1:-1] * p[:, 2:, 1:-1] * p[:, 1:-1, :-2] * p[:, 1:-1, 2:]) > 0
    return x


def fg_bg_batch(attribution: torch.Tensor, instances: torch.Tensor | None, cfg: MasksConfig) -> FgBg:
    """attribution `[N, H, W]` in [0, 1]; instances `[N, M, H, W]` bool (padded with empty masks) or None -> FgBg."""
    attr = attribution.float()
    low = attr < cfg.bg_threshold
    thr_fg = attr > cfg.fg_threshold
    fallback = FgBg(thr_fg, low & ~thr_fg)
    if instances is None or instances.shape[1] == 0:
        return fallback
    inst = instances.bool()
    n, m = inst.shape[:2]
    nonempty = inst.flatten(2).any(2)  # [N, M]
    comp = ~(inst & nonempty[:, :, None, None]).any(1)  # [N, H, W]
    cands = torch.cat([inst, comp[:, None]], 1)  # [N, M+1, H, W]
    valid = torch.cat([nonempty, comp.flatten(1).any(1)[:, None]], 1)  # [N, M+1]
    area = cands.flatten(2).sum(2).clamp_min(1)
    weights = (cands.float() * attr[:, None]).flatten(2).sum(2) / area  # mean attribution per candidate
    weights = torch.where(valid, weights, torch.full_like(weights, -torch.inf))
    w = torch.where(cands, weights[:, :, None, None], torch.full_like(attr[:, None].expand_as(cands), -torch.inf))
    winner = w.argmax(1)  # [N, H, W]; ties: the first (torch's argmax returns the first maximal index)
    best = weights.argmax(1)  # [N]
    won = torch.zeros_like(valid).scatter_(1, winner.flatten(1), True) & valid
    worst = torch.where(won, weights, torch.full_like(weights, torch.inf)).argmin(1)
    fg = winner == best[:, None, None]
    bg = (winner == worst[:, None, None]) & low & (worst != best)[:, None, None]
    if cfg.erode > 0:
        bg = erode_cross(bg, cfg.erode)
    bg = bg & ~fg
    has = nonempty.any(1)[:, None, None]
    return FgBg(torch.where(has, fg, fallback.fg), torch.where(has, bg, fallback.bg))
