"""Nearest-prototype matching (OVDIFF.md 6.3-6.4): gather the kept classes' prototypes, score pixels against them.

`gather` lays out one extractor's rows for one matmul: the foreground rows of every kept class (segment layout), then
the background rows: the background prototypes of the kept things, stuff-filtered against the kept stuff classes.
`match` is the matmul and the per-class max.

Stuff filter rules (`segmentation.stuff_filter_rule`):

- `fixed` (paper): a background row goes when its cosine to any foreground row of a kept stuff class exceeds
  `segmentation.stuff_threshold` (0.85).
- `self`: a background row goes when it is as close to a stuff class's foreground rows as that class's own
  support images are to it: per stuff class, the threshold is the lowest cosine of its instance prototypes to its
  class prototype (no fixed number, so it holds across feature spaces). A thing's background that *is* the stuff
  goes; one that only shares its colour or texture stays.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np
import torch

from .store.bank import Bank

STUFF_FILTER_RULES = ("fixed", "self")


@dataclass
class Gathered:
    """Kept classes' prototypes of one extractor, ready for one matmul."""

    protos: torch.Tensor  # [R, D] float32 (fg rows of all kept classes, then bg rows)
    fg_index: torch.Tensor  # [K, L] int64 fg row per (class, slot); padding points at row n_fg (-inf)
    n_fg: int
    n_bg: int
    run: int = 0  # every kept class has exactly `run` fg rows (a plain reshape replaces the index gather)
    bg_empty: float = 0.0  # background score without bg rows: -1 (the authors' padding) when background is on


def segment_max(sims: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """`sims [R, N]`, `index [K, L]` (row R = padding) -> per-class max `[K, N]`."""
    k, length = index.shape
    if k == 0:
        return sims.new_zeros(0, sims.shape[1])
    full = torch.cat([sims, sims.new_full((1, sims.shape[1]), -torch.inf)], 0)
    return full[index.reshape(-1)].view(k, length, -1).amax(1)


def class_rows(bank: Bank, ex: str, c: int) -> np.ndarray:
    a = bank.extractors[ex]
    return np.arange(*a.rows_of(c).indices(len(a.vectors)))


def self_threshold(bank: Bank, ex: str, c: int, default: float) -> float:
    """Lowest cosine of stuff class `c`'s instance fg prototypes to its class fg prototype (`default` without)."""
    a = bank.extractors[ex]
    r = class_rows(bank, ex, c)
    cls = a.vectors[r[(a.kind[r] == 0) & (a.level[r] == 0)]].astype(np.float32)
    inst = a.vectors[r[(a.kind[r] == 0) & (a.level[r] == 1)]].astype(np.float32)
    if not len(cls) or not len(inst):
        return default
    return float((inst @ cls.T).max(1).min())


def gather(bank: Bank, ex: str, kept: Sequence[int], *, background: bool = True, stuff_filter: bool = True,
           class_mean_only: bool = False, stuff_threshold: float = 0.85, stuff_filter_rule: str = "fixed",
           device: torch.device | str = "cpu",
           thresholds: dict | None = None) -> Gathered:
    """Rows of extractor `ex` for the kept classes: fg rows per kept class, then the bg rows of the kept things,
    stuff-filtered against the kept stuff classes. `thresholds` caches `self` thresholds."""
    a = bank.extractors[ex]
    fg_rows, bg_rows, stuff_rows, stuff_ids = [], [], [], []
    level_ok = (lambda r: a.level[r] == 0) if class_mean_only else (lambda r: np.ones(len(r), bool))
    for c in kept:
        r = class_rows(bank, ex, c)
        fg = r[(a.kind[r] == 0) & level_ok(r)]
        fg_rows.append(fg)
        if bank.kinds[c] == "stuff":
            stuff_rows.append(fg)
            stuff_ids.append(c)
        elif background:
            bg_rows.append(r[(a.kind[r] == 1) & level_ok(r)])
    bg = np.concatenate(bg_rows) if bg_rows else np.zeros(0, np.int64)
    vec = lambda idx: torch.from_numpy(a.vectors[idx]).to(device).float()  # noqa: E731
    if stuff_filter and len(bg) and stuff_rows and sum(len(s) for s in stuff_rows):
        sims = vec(bg) @ vec(np.concatenate(stuff_rows)).T  # [n_bg, n_stuff_rows]
        if stuff_filter_rule == "self":
            cache = {} if thresholds is None else thresholds
            thr = np.concatenate([np.full(len(rows), cache.setdefault((ex, c), self_threshold(
                bank, ex, c, stuff_threshold))) for c, rows in zip(stuff_ids, stuff_rows)])
            drop = (sims >= torch.from_numpy(thr).to(sims) - 1e-6).any(1)
        else:
            drop = sims.amax(1) > stuff_threshold
        bg = bg[~drop.cpu().numpy()]
    lengths = [len(f) for f in fg_rows]
    n_fg = sum(lengths)
    width = max(lengths + [1])
    index = torch.full((len(kept), width), n_fg, dtype=torch.long)  # padding: the -inf row after the fg rows
    start = 0
    for i, n in enumerate(lengths):
        index[i, :n] = torch.arange(start, start + n)
        start += n
    rows = np.concatenate(fg_rows + [bg]).astype(np.int64)
    run = lengths[0] if lengths and all(n == lengths[0] for n in lengths) else 0
    return Gathered(vec(rows), index.to(device), n_fg, len(bg), run, -1.0 if background else 0.0)


def match(feats: torch.Tensor, g: Gathered, chunk: int = 16384) -> torch.Tensor:
    """`feats [B, D, h, w]` -> scores `[B, K + 1, h, w]` (background at 0; `g.bg_empty` when there are no bg rows:
    -1, or 0 with background prototypes switched off).

    Per image one `protos [R, D] @ feats [D, N]` (fp32), a per-class max over rows, and the division by the
    pixel norms after the max (cosine = max(p . f) / |f|), so features are never copied or normalised.
    """
    b, d, h, w = feats.shape
    k = g.fg_index.shape[0]
    out = feats.new_zeros(b, k + 1, h * w, dtype=torch.float32)
    for j in range(b):
        f = feats[j].reshape(d, h * w).float()
        for i in range(0, h * w, chunk):
            fi = f[:, i:i + chunk]
            sims = g.protos @ fi  # [R, n]
            o = out[j, :, i:i + chunk]
            if g.run:
                o[1:] = sims[:g.n_fg].view(k, g.run, -1).amax(1)
            else:
                o[1:] = segment_max(sims[:g.n_fg], g.fg_index)
            if g.n_bg:
                o[0] = sims[g.n_fg:].amax(0)
            o /= fi.norm(dim=0).clamp_min(1e-12)
            if not g.n_bg:
                o[0] = g.bg_empty
    return out.view(b, k + 1, h, w)
