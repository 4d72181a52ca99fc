"""Label maps as the service and the provenance share them: the mask dtype of a bank, nearest-neighbour resizing,
and PNG encoding. Below `explain.py` and `serve/` alike (neither imports the other for these)."""
from __future__ import annotations

import base64
import io

import numpy as np


def mask_dtype(num_classes: int) -> str:
    """uint8 while every label value (0..num_classes) fits, else uint16; fixed per bank so clients can rely on it."""
    return "uint8" if num_classes < 255 else "uint16"  # 255 (65535) is the "unsure" value


def upscale_labels(labels: np.ndarray, width: int, height: int) -> np.ndarray:
    """Nearest-neighbour resize of a label map `[h, w]` to `[height, width]` (pixel centres; no new label values)."""
    h, w = labels.shape
    if (h, w) == (height, width):
        return labels
    rows = np.minimum(((np.arange(height) + 0.5) * (h / height)).astype(np.int64), h - 1)
    cols = np.minimum(((np.arange(width) + 0.5) * (w / width)).astype(np.int64), w - 1)
    return labels[rows][:, cols]


def b64png(img) -> str:
    """A PIL image -> base64 PNG (fast compression)."""
    buf = io.BytesIO()
    img.save(buf, format="PNG", optimize=False, compress_level=1)
    return base64.b64encode(buf.getvalue()).decode("ascii")


def encode_png(labels: np.ndarray, num_classes: int) -> str:
    """Label map `[H, W]` -> base64 PNG (mode L for uint8, I;16 for uint16; 255 / 65535 = unsure)."""
    from PIL import Image

    if mask_dtype(num_classes) == "uint8":
        return b64png(Image.fromarray(labels.astype(np.uint8), mode="L"))
    return b64png(Image.fromarray(labels.astype(np.uint16)))


def decode_png(b64: str) -> np.ndarray:
    """base64 PNG mask -> `[H, W]` int64 label values (the inverse of `encode_png`)."""
    from PIL import Image

    with Image.open(io.BytesIO(base64.b64decode(b64))) as im:
        return np.asarray(im).astype(np.int64)
