"""Label snapping to class-agnostic regions (recipe `segmentation.regions: none | superpixels | sam`).

A *region map* is `[H, W]` int64: a region id >= 0 per pixel, or -1 for a pixel no region covers (it keeps its own
label). Two ways to make one:

- `superpixels`: scikit-image superpixels of the image, no weights (FreeDA: `felzenszwalb(image in [0, 1],
  scale=100, sigma=1.0, min_size=20)`; `slic`, `quickshift` and `watershed` as options). Every pixel is covered.
- `sam`: SAM's automatic masks (models/sam.py), painted by `paint_masks` as CorrCLIP does: sorted by area ascending,
  so larger masks overwrite smaller ones; pixels under no mask are -1.

Two ways to snap the averaged score maps `[C, H, W]` (row 0 = background) to it:

- `vote` (CorrCLIP's map correction): each pixel votes for its argmax (scores <= 0 count as 0, ties to background);
  every region takes the majority label of its pixels. The returned maps are the vote shares of the pixel's region
  (one-hot of its own vote for an unsegmented pixel), so the argmax after upsampling is the majority label.
- `mean` (FreeDA-style pooling): every pixel of a region gets the region's mean score per class.

`RegionSnapper` ties a recipe's `segmentation` section to both: a region maker per method, built on first use, and
`snap(image, scores, method)`.
"""
from __future__ import annotations

from typing import Protocol

import numpy as np
import torch

from .recipe import SamRegionsConfig, SegmentationConfig, SuperpixelConfig

METHODS = ("none", "superpixels", "sam")
MODES = ("vote", "mean")


class RegionsError(ValueError):
    """An unknown region method or mode, or a region maker that cannot be built (the message says which)."""


class RegionMaker(Protocol):
    """`image [H, W, 3] uint8` -> region map `[H, W]` int64 (-1 = unsegmented)."""

    def __call__(self, image: np.ndarray) -> np.ndarray: ...


# ------------------------------------------------------------------------------------------------- region maps

def superpixels(image: np.ndarray, cfg: SuperpixelConfig) -> np.ndarray:
    """`image [H, W, 3]` uint8 -> superpixel ids `[H, W]` int64, 0..R-1, covering every pixel. Over
    `cfg.max_pixels` (> 0) the image is segmented downscaled to that many pixels (`min_size` scaled by the same
    area ratio) and the ids are upsampled nearest."""
    image = np.asarray(image, np.uint8)
    h, w = image.shape[:2]
    if cfg.max_pixels and h * w > cfg.max_pixels:
        from PIL import Image

        s = (cfg.max_pixels / (h * w)) ** 0.5
        small = np.asarray(Image.fromarray(image).resize((max(1, round(w * s)), max(1, round(h * s))),
                                                         Image.BILINEAR))
        ids = _superpixels(small, cfg, max(1, round(cfg.min_size * s * s)))
        ids = np.asarray(Image.fromarray(ids.astype(np.int32)).resize((w, h), Image.NEAREST), np.int64)
        present = np.zeros(int(ids.max()) + 1, bool)
        present[ids] = True  # a thin region may vanish in the upsampling: renumber densely, O(pixels)
        return (np.cumsum(present) - 1)[ids]
    return _superpixels(image, cfg, cfg.min_size)


def _superpixels(image: np.ndarray, cfg: SuperpixelConfig, min_size: int) -> np.ndarray:
    from skimage import segmentation as sks

    x = image.astype(np.float64) / 255.0  # FreeDA: image / 255
    if cfg.method == "felzenszwalb":  # uint8 in: skimage divides by 255 itself, the same values without our copy
        seg = sks.felzenszwalb(image, scale=cfg.scale, sigma=cfg.sigma, min_size=min_size, channel_axis=-1)
    elif cfg.method == "slic":
        seg = sks.slic(x, n_segments=cfg.n_segments, compactness=cfg.slic_compactness, sigma=cfg.sigma,
                       start_label=0, channel_axis=-1)
    elif cfg.method == "quickshift":
        seg = sks.quickshift(x, ratio=cfg.ratio, kernel_size=cfg.kernel_size, max_dist=cfg.max_dist,
                             sigma=cfg.sigma, channel_axis=-1)
    elif cfg.method == "watershed":
        from skimage.color import rgb2gray
        from skimage.filters import sobel

        seg = sks.watershed(sobel(rgb2gray(x)), markers=cfg.n_segments, compactness=cfg.watershed_compactness)
    else:
        raise RegionsError(f"unknown superpixel method {cfg.method!r} (known: felzenszwalb, slic, quickshift, "
                           "watershed)")
    seg = seg.astype(np.int64)
    seg -= seg.min()
    present = np.zeros(int(seg.max()) + 1, bool)
    present[seg] = True  # dense ids 0..R-1 whatever the method's numbering (O(pixels), no sort)
    return (np.cumsum(present) - 1)[seg]


def paint_masks(masks: np.ndarray) -> np.ndarray:
    """`masks [M, H, W]` bool -> region map `[H, W]` int64: mask i painted in order of area ascending, so a larger
    mask overwrites the smaller ones it covers (CorrCLIP); ids are mask indices, -1 where no mask is."""
    masks = np.asarray(masks, bool)
    if masks.ndim != 3:
        raise RegionsError(f"expected masks [M, H, W], got shape {masks.shape}")
    out = np.full(masks.shape[1:], -1, np.int64)
    areas = masks.reshape(len(masks), -1).sum(1)
    for i in np.argsort(areas, kind="stable"):
        out[masks[i]] = i
    return out


class SuperpixelRegions:
    """Region maker: scikit-image superpixels with a recipe's `segmentation.superpixels` settings."""

    def __init__(self, cfg: SuperpixelConfig):
        self.cfg = cfg

    def __call__(self, image: np.ndarray) -> np.ndarray:
        return superpixels(image, self.cfg)


class SamRegions:
    """Region maker: SAM's automatic masks (one mask-generation pass per image), painted by `paint_masks`."""

    def __init__(self, cfg: SamRegionsConfig, device: str = "cpu"):
        from .models.sam import SamMaskGenerator

        self.generator = SamMaskGenerator(cfg, device)

    def __call__(self, image: np.ndarray) -> np.ndarray:
        return paint_masks(self.generator(image))


# ------------------------------------------------------------------------------------------------------ voting

def _flat(scores: torch.Tensor, regions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, int]:
    c = scores.shape[0]
    if regions.shape != scores.shape[1:]:
        raise RegionsError(f"region map {tuple(regions.shape)} does not match score maps {tuple(scores.shape[1:])}")
    r = regions.reshape(-1).to(scores.device, torch.long)
    return r, scores.reshape(c, -1), int(r.max()) + 1 if r.numel() else 0


def majority_labels(labels: torch.Tensor, regions: torch.Tensor, num_labels: int) -> torch.Tensor:
    """`labels [H, W]` in 0..num_labels-1, `regions [H, W]` -> `[H, W]`: each region's most frequent label (ties to
    the smallest label), unsegmented pixels (-1) unchanged."""
    lab = labels.reshape(-1).long()
    r = regions.reshape(-1).to(lab.device, torch.long)
    seg = r >= 0
    n_reg = int(r.max()) + 1 if r.numel() else 0
    if n_reg == 0:
        return labels.clone()
    counts = torch.bincount(r[seg] * num_labels + lab[seg], minlength=n_reg * num_labels).view(n_reg, num_labels)
    out = lab.clone()
    out[seg] = counts.argmax(1)[r[seg]]
    return out.view(labels.shape).to(labels.dtype)


def vote(scores: torch.Tensor, regions: torch.Tensor) -> torch.Tensor:
    """`scores [C, H, W]`, `regions [H, W]` -> vote shares `[C, H, W]` float32 (see the module docstring): the share of
    its region's pixels voting for each class (their argmax of the scores clamped at 0); an unsegmented pixel's own
    vote, one-hot."""
    r, s, n_reg = _flat(scores, regions)
    c, n = s.shape
    votes = s.clamp_min(0).argmax(0)  # [N] first maximum: ties go to background
    if n_reg and bool((r >= 0).all()):  # every pixel in a region (superpixels): one gather, no one-hot
        counts = torch.bincount(r * c + votes, minlength=n_reg * c).view(n_reg, c).float()
        shares = counts / counts.sum(1, keepdim=True).clamp_min(1)  # [R, C]
        return torch.index_select(shares.T.contiguous(), 1, r).view(scores.shape)
    out = torch.zeros(c, n, dtype=torch.float32, device=s.device)
    out[votes, torch.arange(n, device=s.device)] = 1.0
    seg = r >= 0
    if n_reg and seg.any():
        counts = torch.bincount(r[seg] * c + votes[seg], minlength=n_reg * c).view(n_reg, c).float()
        shares = counts / counts.sum(1, keepdim=True).clamp_min(1)  # [R, C]
        out[:, seg] = shares[r[seg]].T
    return out.view(scores.shape)


def region_mean(scores: torch.Tensor, regions: torch.Tensor) -> torch.Tensor:
    """`scores [C, H, W]`, `regions [H, W]` -> `[C, H, W]`: every segmented pixel gets its region's mean scores;
    unsegmented pixels keep theirs."""
    r, s, n_reg = _flat(scores, regions)
    seg = r >= 0
    out = s.clone().float()
    if n_reg and seg.any():
        sums = torch.zeros(n_reg, s.shape[0], dtype=torch.float32, device=s.device)
        sums.index_add_(0, r[seg], s[:, seg].T.float())
        counts = torch.bincount(r[seg], minlength=n_reg).clamp_min(1).float()
        out[:, seg] = (sums / counts[:, None])[r[seg]].T
    return out.view(scores.shape)


def snap_scores(scores: torch.Tensor, regions: torch.Tensor, mode: str = "vote") -> torch.Tensor:
    """`scores [C, H, W]` snapped to `regions [H, W]` by `vote` or `mean`."""
    if mode == "vote":
        return vote(scores, regions)
    if mode == "mean":
        return region_mean(scores, regions)
    raise RegionsError(f"unknown regions mode {mode!r} (known: {', '.join(MODES)})")


# --------------------------------------------------------------------------------------------------- snapper

class RegionSnapper:
    """A recipe's region settings: region makers per method (built on first use, SAM loaded once) and `snap`."""

    def __init__(self, seg: SegmentationConfig, device: str = "cpu"):
        self.seg = seg
        self.device = device
        self._makers: dict[str, RegionMaker] = {}

    def method(self, override: str | None = None) -> str:
        """The method in effect: `override` (a method name; `on` = the recipe's, or superpixels when the recipe has
        none; `off` = none) or the recipe's `segmentation.regions`."""
        m = self.seg.regions if override is None else override.strip().lower()
        if m == "on":
            m = self.seg.regions if self.seg.regions != "none" else "superpixels"
        elif m == "off":
            m = "none"
        if m not in METHODS:
            raise RegionsError(f"unknown regions method {override!r} (known: {', '.join(METHODS)}, on, off)")
        return m

    def maker(self, method: str) -> RegionMaker:
        if method not in self._makers:
            if method == "superpixels":
                self._makers[method] = SuperpixelRegions(self.seg.superpixels)
            elif method == "sam":
                self._makers[method] = SamRegions(self.seg.sam, self.device)
            else:
                raise RegionsError(f"no region maker for method {method!r}")
        return self._makers[method]

    def regions(self, image: torch.Tensor, method: str) -> torch.Tensor:
        """`image [3, H, W]` float in [0, 1] -> region map `[H, W]` int64 on the image's device."""
        rgb = (image.clamp(0, 1) * 255).round().byte().permute(1, 2, 0).cpu().numpy()
        return torch.from_numpy(self.maker(method)(rgb)).to(image.device)

    def snap(self, image: torch.Tensor, scores: torch.Tensor, method: str) -> torch.Tensor:
        """`image [3, H, W]`, `scores [C, H, W]` -> snapped `[C, H, W]` (unchanged for method `none`)."""
        if method == "none":
            return scores
        return snap_scores(scores, self.regions(image, method), self.seg.regions_mode)
