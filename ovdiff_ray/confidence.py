"""Per-pixel confidence, the "unsure" label and top-k classes, from the score maps the segmenter already has.

Chosen by risk-coverage on toy scenes (README "Confidence"; `bench/confidence_quality.py` compares the candidates):

    confidence = top * fit ** FIT_POWER

- `top`: the pixel's final score for its label: with regions snapped by vote, the share of its region's pixels that
  voted for the label (how settled the region is); without regions, the averaged cosine.
- `fit`: how well the label's prototypes match the pixels it won in this image: the mean, over every pixel of the
  image with that label, of the averaged cosine (before snapping) to the label's own prototypes. Most remaining
  errors are whole objects given a confusable class (a star read as a ring of its colour) or stuff read as
  background: every pixel of such a region votes the same way (top = 1) but matches its prototypes a little worse.

Pixel-level margins (best minus second class, per extractor or averaged, pooled over superpixels or not) and the
agreement of the extractors measured worse than `top` alone on the development draw, so they are not used.

`UNSURE_U8` / `UNSURE_U16` are the values an unsure pixel takes in a class-index PNG; `unsure_mask` says which pixels
are unsure for a threshold (`segmentation.min_confidence`, 0 = off).
"""
from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

FIT_POWER = 8
UNSURE_U8 = 255
UNSURE_U16 = 65535
TOPK = 3


def unsure_value(dtype: str) -> int:
    """The label value of an unsure pixel in a class-index PNG of `dtype` (uint8 -> 255, uint16 -> 65535)."""
    return UNSURE_U8 if dtype == "uint8" else UNSURE_U16


def pixel_confidence(raw: torch.Tensor, final: torch.Tensor) -> torch.Tensor:
    """`raw [C, h, w]` averaged scores before region snapping, `final [C, h, w]` the scores the labels come from
    (row 0 = background) -> confidence `[h, w]` float32 in [0, 1] of each pixel's label (`final`'s argmax)."""
    final = final.float().clamp_min(0)
    arg = final.argmax(0)  # ties to background, as the labels
    top = final.gather(0, arg[None])[0].clamp(0, 1)
    own = raw.float().clamp(0, 1).gather(0, arg[None])[0]
    c = final.shape[0]
    flat = arg.reshape(-1)
    sums = torch.zeros(c, dtype=torch.float32, device=raw.device).index_add_(0, flat, own.reshape(-1))
    counts = torch.bincount(flat, minlength=c).clamp_min(1).float()
    fit = (sums / counts)[arg]
    return (top * fit.pow(FIT_POWER)).clamp_(0, 1)


def upsample_confidence(conf: torch.Tensor, h0: int, w0: int) -> np.ndarray:
    """`conf [h, w]` -> `[h0, w0]` float32 (bilinear)."""
    if conf.shape != (h0, w0):
        conf = F.interpolate(conf[None, None], size=(h0, w0), mode="bilinear", align_corners=False)[0, 0]
    return conf.clamp(0, 1).cpu().numpy().astype(np.float32)


def class_topk(raw: torch.Tensor, final: torch.Tensor, k: int = TOPK) -> dict[int, list[tuple[int, float]]]:
    """Per label row present in `final`'s argmax: the `k` rows with the highest mean raw score over its pixels,
    best first, as `(row, mean score)` (the label's own row is usually first; 0 = background)."""
    arg = final.float().clamp_min(0).argmax(0).reshape(-1)
    c = raw.shape[0]
    r = raw.float().clamp(0, 1).reshape(c, -1)
    sums = torch.zeros(c, c, dtype=torch.float32, device=raw.device).index_add_(0, arg, r.T)  # [label, class]
    counts = torch.bincount(arg, minlength=c)
    out = {}
    for row in torch.nonzero(counts).reshape(-1).tolist():
        mean = sums[row] / counts[row]
        vals, idx = mean.topk(min(k, c))
        out[row] = [(int(i), round(float(v), 4)) for v, i in zip(vals, idx)]
    return out


def unsure_mask(confidence: np.ndarray | None, min_confidence: float) -> np.ndarray | None:
    """Pixels under `min_confidence` (None when the threshold is off or there is no confidence)."""
    if confidence is None or not min_confidence or min_confidence <= 0:
        return None
    return np.asarray(confidence) < float(min_confidence)


def check_min_confidence(value: float, what: str = "min_confidence") -> float:
    """A threshold in [0, 1]; anything else is a ValueError naming `what`."""
    try:
        v = float(value)
    except (TypeError, ValueError):
        raise ValueError(f"{what}: expected a number in [0, 1], got {value!r}") from None
    if not (0.0 <= v <= 1.0) or v != v:
        raise ValueError(f"{what}: expected a number in [0, 1], got {value!r}")
    return v
