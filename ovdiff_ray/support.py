"""A class's support set as the bank keeps it (issue 26): what the class pipeline hands the store beside the
prototypes, on the host.

Shapes: `images [N, h, w, 3]` uint8 at the stored size (thumbnails or full); `fg`, `bg [N, h, w]` bool at that size;
`instances [N, M, h, w]` bool or None (no masker); per-image arrays `[N]`; `embeddings [N, E]` float32, the
pre-filter classifier's unit-norm image embeddings; `name_text`, `prompt_text [E]` its text embeddings of the class
name and of the prompt words.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

RECORD_MODES = ("thumbnails", "full", "none")
DROP_EMPTY = "empty foreground"
DROP_FILTER = "low agreement"


@dataclass
class SupportData:
    """One class's support set and its per-image signals (see the module docstring for shapes)."""

    images: np.ndarray
    fg: np.ndarray
    bg: np.ndarray
    instances: np.ndarray | None
    seeds: list[int]
    kept: np.ndarray  # [N] bool: images the prototypes were made from
    dropped: list[str]  # [N] "" | DROP_EMPTY | DROP_FILTER
    image_size: tuple[int, int]  # (H, W) as generated
    signals: dict[str, np.ndarray] = field(default_factory=dict)  # name -> [N] float32
    embeddings: np.ndarray | None = None
    name_text: np.ndarray | None = None
    prompt_text: np.ndarray | None = None
    mode: str = "thumbnails"

    def __len__(self) -> int:
        return len(self.seeds)


def agreement_filter(agreement: np.ndarray, candidates: np.ndarray, mads: float, keep_min: float) -> np.ndarray:
    """T2S-style classifier filter: `[N]` bool, the candidates whose agreement with the class text is not an outlier
    below the others (`< median - mads * spread`, spread = 1.4826 MAD over the candidates, at least a tenth of the
    median: a class whose images all agree does not lose the few the classifier is less sure of); at least
    `keep_min` of the candidates stay (the best by agreement). The scale of the classifier's cosines (CLIP ~0.3, the
    toy world's ~0.9) cancels."""
    keep = candidates.copy()
    idx = np.nonzero(candidates)[0]
    if len(idx) < 3:
        return keep
    a = agreement[idx].astype(np.float64)
    med = np.median(a)
    mad = 1.4826 * np.median(np.abs(a - med))
    low = a < med - mads * max(mad, 0.1 * abs(med), 1e-6)
    n_min = int(np.ceil(keep_min * len(idx)))
    if (~low).sum() < n_min:  # never below keep_min: keep the best n_min
        low = np.ones(len(idx), bool)
        low[np.argsort(-a, kind="stable")[:n_min]] = False
    keep[idx[low]] = False
    return keep
