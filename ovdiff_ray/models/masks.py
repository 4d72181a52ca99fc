"""Attribution + instance masks -> foreground/background masks (OVDIFF.md section 3).

`fg_bg_masks` is the ranking / complement / erosion / fallback rule; instance maskers (MaskCut on DINO keys,
CutLER through detectron2) produce its candidates.
"""
from __future__ import annotations

import numpy as np
from scipy import ndimage

from ..recipe import MasksConfig

CROSS = ndimage.generate_binary_structure(2, 1)  # 3x3 cross


def fg_bg_masks(attribution: np.ndarray, instances: np.ndarray | None, cfg: MasksConfig) -> tuple[np.ndarray, np.ndarray]:
    """attribution: [H, W] in [0, 1]; instances: [M, H, W] bool or None -> (fg [H, W] bool, bg [H, W] bool).

    Candidates are the instance masks plus their complement; each is weighted by its mean attribution and each pixel
    goes to the covering candidate of highest weight. Foreground = pixels won by the best candidate; background =
    pixels won by the worst one, with attribution < bg_threshold, eroded `erode` times. No instance masks: thresholds.
    """
    attr = np.asarray(attribution, np.float32)
    low = attr < cfg.bg_threshold
    inst = None if instances is None else np.asarray(instances, bool)
    if inst is not None:
        inst = inst[inst.reshape(len(inst), -1).any(1)] if len(inst) else inst
    if inst is None or len(inst) == 0:
        fg = attr > cfg.fg_threshold
        bg = low
    else:
        comp = ~inst.any(0)
        cands = np.concatenate([inst, comp[None]]) if comp.any() else inst  # [K, H, W]
        weights = np.array([attr[c].mean() for c in cands], np.float32)  # [K]
        # each pixel -> covering candidate of highest weight
        w = np.where(cands, weights[:, None, None], -np.inf)
        winner = w.argmax(0)  # [H, W]
        best, worst = int(weights.argmax()), int(weights.argmin())
        fg = winner == best
        bg = (winner == worst) & low if worst != best else np.zeros_like(fg)
    if cfg.erode > 0 and bg.any():
        bg = ndimage.binary_erosion(bg, structure=CROSS, iterations=cfg.erode)
    return fg, bg & ~fg
