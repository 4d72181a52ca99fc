"""Images into the segmenter: any array or PIL image -> `[H, W, 3]` uint8 (EXIF orientation applied), image files
read with errors that name the file, and the resize to the short side."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from .switches import SegmentError


def to_rgb_array(image) -> np.ndarray:
    """PIL image or array ([H, W], [H, W, 3|4], uint8 or float in [0, 1]) -> `[H, W, 3]` uint8. A PIL image is
    turned upright first (its EXIF orientation tag applied), so masks follow what viewers show."""
    if hasattr(image, "convert"):
        image = np.asarray(exif_upright(image).convert("RGB"))
    a = np.asarray(image)
    if a.ndim == 2:
        a = np.repeat(a[..., None], 3, 2)
    if a.ndim != 3 or a.shape[2] not in (3, 4) or min(a.shape[:2]) < 1:
        raise SegmentError(f"expected an image [H, W, 3], got an array of shape {a.shape}")
    a = a[..., :3]
    if not a.flags.writeable:
        a = a.copy()
    if a.dtype != np.uint8:
        a = np.clip(a.astype(np.float32) * (255 if a.max() <= 1.0 else 1), 0, 255).round().astype(np.uint8)
    return np.ascontiguousarray(a)


def exif_upright(im):
    """A PIL image with its EXIF orientation applied (unchanged when it has none or the EXIF block is broken)."""
    from PIL import ImageOps

    try:
        return ImageOps.exif_transpose(im) if int(im.getexif().get(0x0112, 1)) != 1 else im
    except Exception:  # noqa: BLE001 - orientation is a hint; never refuse an image over it
        return im


def read_image(path: str | Path) -> np.ndarray:
    """An image file -> `[H, W, 3]` uint8, EXIF orientation applied; anything else is a SegmentError naming the
    file."""
    from PIL import Image, UnidentifiedImageError

    p = Path(path)
    if not p.is_file():
        raise SegmentError(f"{p}: no such image file")
    try:
        with Image.open(p) as im:
            im.load()
            return to_rgb_array(im)
    except (UnidentifiedImageError, OSError, Image.DecompressionBombError) as e:
        raise SegmentError(f"{p}: not a readable image file ({e.__class__.__name__}: {e})") from None


def resize_short(x: torch.Tensor, short: int) -> torch.Tensor:
    """`x [C, H, W]` -> short side `short` (aspect kept)."""
    h, w = x.shape[-2:]
    s = short / min(h, w)
    size = (max(1, round(h * s)), max(1, round(w * s)))
    if size == (h, w):
        return x
    return F.interpolate(x[None], size=size, mode="bilinear", align_corners=False, antialias=s < 1)[0]
