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
agreement of the extractors measured worse than `top` alone on the development draw, so they are not used; so did
a margin over each label's region (its mean score minus the best other class's). One region margin helps (issue 27):
background whose pixels a kept stuff class matches on average as well as the background prototypes do, within 1%
(`contested_background`), gets confidence 0.

`UNSURE_U8` / `UNSURE_U16` are the values an unsure pixel takes in a class-index PNG; `unsure_mask` says which pixels
are unsure for a threshold (`segmentation.min_confidence`, 0 = off).

**Calibrated fit** (issue 28: a threshold must mean the same on toy and real features). A raw cosine means nothing by
itself: toy prototypes match their own support images at ~0.95, real DINO / CLIP / SD features at much lower cosines,
where `fit ** 8` goes to ~0. So the bank records, per class and extractor, how the class's own support images match
its own prototypes (`fit_calibration`, computed at build time by the class pipeline and stored in the shard's
metadata, `CAL_KEY`): quantiles of the support fg pixels' cosine to the nearest own fg prototype, of its per-image
means, of the bg pixels' cosine to the nearest fg prototype, and the same three for background (bg pixels to the
nearest bg prototype, ...). At segmentation the fit is measured against the bank's own scale (`fit_scale`):

    u = clamp(fit / scale, 0, 1),  confidence = top * u ** FIT_POWER

with `scale` the mean over the bank's classes of the median cosine of their own support fg pixels to their nearest
own fg prototype, averaged over the extractors used (as the scores are). On toy features `scale` is ~0.995 and the
ranking is the raw formula's; where features match at lower cosines (a random component appended:
`models/noisy.py`, or real features) `scale` falls with them. Measured against it on the development draw
(`bench/confidence_quality.py`, README "Confidence"): per-class anchors (each label against its own class's record:
the 95% quantile of its pixels, the median of its per-image fits, or an affine map between its own and its
background's cosines) ranked errors worse, the classes' own fits on toy features differing by less than the errors
do; a scale from per-image fits (~0.988) or a high pixel quantile ties the best labels at 1 (test regions fit better
than whole support masks, whose borders cross the object's edge) or spreads with the noise.
Banks built before the record (no `CAL_KEY` in their shards)
fall back to the raw formula; classes added later without it do not enter the scale.
"""
from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

FIT_POWER = 8
CONTEST_MARGIN = 0.01  # contested background: a stuff class within 1% of the background's mean score over it
CAL_SCALE = ("fg", 0.5)  # the record's anchor: median cosine of a class's own support fg pixels
CAL_KEY = b"ovdiff.calibration"  # shard (Parquet schema) metadata key: {extractor: fit_calibration(...)}
CAL_QUANTILES = (0.05, 0.1, 0.25, 0.5, 0.75, 0.9, 0.95)
# own label: fg pixels -> nearest fg prototype (pixels, per-image means), bg pixels -> nearest fg prototype (other);
# background label: bg pixels -> nearest bg prototype (pixels, per-image means), fg pixels -> nearest bg prototype
CAL_FIELDS = ("fg", "fg_image", "fg_other", "bg", "bg_image", "bg_other")
CAL_MAX_PIXELS = 65536  # pixels per region sampled for the record (seeded)
UNSURE_U8 = 255
UNSURE_U16 = 65535
TOPK = 3


def unsure_value(dtype: str) -> int:
    """The label value of an unsure pixel in a class-index PNG of `dtype` (uint8 -> 255, uint16 -> 65535)."""
    return UNSURE_U8 if dtype == "uint8" else UNSURE_U16


def label_fit(raw: torch.Tensor, final: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """-> (`arg [h, w]` each pixel's label row, `top [h, w]` its final score in [0, 1], `fit [C]` per label row the
    mean over the pixels it won of its raw score clamped to [0, 1]; 0 for rows with no pixel)."""
    final = final.float().clamp_min(0)
    arg = final.argmax(0)  # ties to background, as the labels
    top = final.gather(0, arg[None])[0].clamp(0, 1)
    own = raw.float().clamp(0, 1).gather(0, arg[None])[0]
    c = final.shape[0]
    flat = arg.reshape(-1)
    sums = torch.zeros(c, dtype=torch.float32, device=raw.device).index_add_(0, flat, own.reshape(-1))
    counts = torch.bincount(flat, minlength=c).clamp_min(1).float()
    return arg, top, sums / counts


def pixel_confidence(raw: torch.Tensor, final: torch.Tensor, scale: float | None = None,
                     stuff: torch.Tensor | None = None) -> torch.Tensor:
    """`raw [C, h, w]` averaged scores before region snapping, `final [C, h, w]` the scores the labels come from
    (row 0 = background) -> confidence `[h, w]` float32 in [0, 1] of each pixel's label (`final`'s argmax).

    `scale` (`fit_scale`: the bank's typical own cosine) calibrates the fit: `top * clamp(fit / scale, 0, 1) **
    FIT_POWER`; None (a bank without the record) keeps the raw `top * fit ** FIT_POWER`. `stuff [C]` bool (the
    stuff rows): background that a stuff class contests is 0 (`contested_background`)."""
    arg, top, fit = label_fit(raw, final)
    if scale is not None:
        fit = (fit / max(float(scale), 1e-3)).clamp(0, 1)
    if stuff is not None and contested_background(raw, arg, stuff):
        fit = fit.clone()
        fit[0] = 0.0
    return (top * fit[arg].pow(FIT_POWER)).clamp_(0, 1)


def contested_background(raw: torch.Tensor, arg: torch.Tensor, stuff: torch.Tensor) -> bool:
    """Whether a kept stuff class matches the pixels labelled background (`arg == 0`) on average as well as the
    background prototypes do, within `CONTEST_MARGIN` of their mean score (`raw [C, h, w]` before snapping; `stuff
    [C]` bool, row 0 = background). Stuff read as background is the most frequent confident error at the whole toy
    vocabulary: a textured field that is also some thing's typical background, so a background prototype is the
    stuff itself and the two tie (to 0.0005 on the development draw) over the whole region."""
    m = arg == 0
    stuff = torch.as_tensor(stuff, dtype=torch.bool, device=raw.device)
    if not bool(m.any()) or not bool(stuff.any()):
        return False
    mean = raw.float().clamp(0, 1)[:, m].mean(1)  # [C]
    return bool(mean[stuff].max() >= (1 - CONTEST_MARGIN) * mean[0])


# -- the record: built per class at build time, read back with the bank -------------------------------------------
@torch.no_grad()
def _nearest_cos(pixels: torch.Tensor, rows: torch.Tensor, chunk: int = 8192) -> torch.Tensor:
    """`pixels [P, D]`, unit `rows [R, D]` -> `[P]` cosine of each pixel to its nearest row."""
    out = []
    for i in range(0, len(pixels), chunk):
        p = pixels[i:i + chunk].float()
        out.append((p @ rows.T).amax(1) / p.norm(dim=1).clamp_min(1e-12))
    return torch.cat(out) if out else pixels.new_zeros(0)


def _quantiles(x: torch.Tensor) -> list[float]:
    q = torch.tensor(CAL_QUANTILES, dtype=torch.float64, device=x.device)
    return [round(float(v), 5) for v in torch.quantile(x.double(), q).cpu()]


def _image_means(values: torch.Tensor, images: torch.Tensor) -> torch.Tensor:
    n = int(images.max()) + 1
    sums = torch.zeros(n, dtype=torch.float64, device=values.device).index_add_(0, images, values.double())
    counts = torch.bincount(images, minlength=n)
    return (sums[counts > 0] / counts[counts > 0]).float()


def _sample(pixels: torch.Tensor, images: torch.Tensor, n: int, seed: int):
    if len(pixels) <= n:
        return pixels, images
    g = torch.Generator().manual_seed(seed)
    pick = torch.randperm(len(pixels), generator=g)[:n].to(pixels.device)
    return pixels[pick], images[pick]


def fit_calibration(fg: torch.Tensor, fg_images: torch.Tensor, bg: torch.Tensor, bg_images: torch.Tensor,
                    vectors: torch.Tensor, is_fg: torch.Tensor, seed: int = 0,
                    max_pixels: int = CAL_MAX_PIXELS) -> dict | None:
    """How one class's own support images match its own prototypes, for one extractor.

    `fg [P, D]` / `bg [Q, D]`: the support images' fg / bg pixel features on the feature grid, `fg_images [P]` /
    `bg_images [Q]` the image of each; `vectors [R, D]` the class's unit prototype rows, `is_fg [R]` bool. At most
    `max_pixels` pixels per region (a seeded sample). -> `{"quantiles": CAL_QUANTILES, field: [Q floats]}` for the
    `CAL_FIELDS`, or None when a region or a kind of prototype is empty (the record is then left out)."""
    vectors = vectors.to(fg.device).float()
    is_fg = torch.as_tensor(is_fg, dtype=torch.bool, device=vectors.device)
    fg_rows, bg_rows = vectors[is_fg], vectors[~is_fg]
    if not len(fg) or not len(bg) or not len(fg_rows) or not len(bg_rows):
        return None
    fg, fg_images = _sample(fg, fg_images, max_pixels, seed)
    bg, bg_images = _sample(bg, bg_images, max_pixels, seed + 1)
    fg_fg, bg_bg = _nearest_cos(fg, fg_rows), _nearest_cos(bg, bg_rows)
    rec = {"quantiles": list(CAL_QUANTILES),
           "fg": _quantiles(fg_fg), "fg_image": _quantiles(_image_means(fg_fg, fg_images)),
           "fg_other": _quantiles(_nearest_cos(bg, fg_rows)),
           "bg": _quantiles(bg_bg), "bg_image": _quantiles(_image_means(bg_bg, bg_images)),
           "bg_other": _quantiles(_nearest_cos(fg, bg_rows))}
    return rec


def calibration_array(record: dict | None) -> np.ndarray:
    """One extractor's record of one class -> `[6, Q]` float32 (`CAL_FIELDS` x `CAL_QUANTILES`); all nan without a
    record. A record with other quantiles or fields is a ValueError naming what differs."""
    out = np.full((len(CAL_FIELDS), len(CAL_QUANTILES)), np.nan, np.float32)
    if record is None:
        return out
    if tuple(record.get("quantiles", ())) != CAL_QUANTILES:
        raise ValueError(f"fit calibration: quantiles {record.get('quantiles')!r}, this reader knows "
                         f"{list(CAL_QUANTILES)}")
    for i, f in enumerate(CAL_FIELDS):
        v = record.get(f)
        if v is None or len(v) != len(CAL_QUANTILES):
            raise ValueError(f"fit calibration: field {f!r} missing or of the wrong length")
        out[i] = np.asarray(v, np.float32)
    return out


def fit_scale(bank, extractors: list[str]) -> float | None:
    """The bank's typical own fit: over its classes with a record, the mean of the median cosine of their own
    support fg pixels to their nearest own fg prototype (`CAL_SCALE`), averaged over the `extractors` used (as the scores are). None when an extractor
    has no class with a record (a bank built before it): the raw formula then."""
    field, q = CAL_SCALE
    per = []
    for ex in extractors:
        cal = getattr(bank.extractors[ex], "calibration", None)
        if cal is None:
            return None
        v = np.asarray(cal[:, CAL_FIELDS.index(field), CAL_QUANTILES.index(q)], np.float64)
        v = v[np.isfinite(v)]
        if not len(v):
            return None
        per.append(float(v.mean()))
    return float(np.mean(per)) if per else None


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
