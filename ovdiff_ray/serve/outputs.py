"""Confidence outputs of `POST /v1/segment` (issue 21): the fields a replica adds to a result, and how the ingress
turns them into the JSON body.

- `scores=true`: `confidence` (base64 16-bit grey PNG at the mask's size; confidence = value / `confidence_scale`),
  `class_confidence` (label value -> mean confidence over its pixels) and `topk` (label value -> the best classes by
  mean score over its pixels, its own class usually first).
- `min_confidence` (form field; default the bank recipe's `segmentation.min_confidence`, 0 = off): pixels under it
  are unsure: `unsure_value` (255 for uint8 masks, 65535 for uint16) in the PNG mask, absent from RLE; the body says
  `min_confidence`, `unsure_value` and `unsure_pixels`.
"""
from __future__ import annotations

import numpy as np

from ..confidence import unsure_value
from ..labelmaps import b64png, mask_dtype, upscale_labels
from ..riskcoverage import LEVELS, quantize


def confidence_fields(seg, res, job) -> dict:
    """A replica's extra result fields (numpy arrays cross to the ingress as the label map does)."""
    minc = seg.seg.min_confidence if job.min_confidence is None else job.min_confidence
    conf = res.confidence
    out: dict = {"min_confidence": float(minc), "want_confidence": bool(job.confidence)}
    if conf is None:
        return out
    out["confidence"] = conf.astype(np.float32)
    if job.confidence:
        name = lambda v: "background" if v == 0 else seg.bank.names[v - 1]  # noqa: E731
        out["class_confidence"] = {int(v): round(float(conf[res.labels == v].mean()), 6) for v in res.classes}
        out["topk"] = {int(v): [{"id": int(c), "name": name(c), "score": s} for c, s in best]
                       for v, best in (res.topk or {}).items() if v in res.classes}
    return out


def upscale(a: np.ndarray, width: int, height: int) -> np.ndarray:
    """Nearest-neighbour resize to `[height, width]` (pixel centres, as the label map is upscaled)."""
    return upscale_labels(a, width, height)


def apply_confidence(labels: np.ndarray, result: dict, num_classes: int) -> tuple[np.ndarray, dict]:
    """`labels [H, W]` at the mask's size -> (labels with unsure pixels set to the unsure value, body fields)."""
    conf = result.get("confidence")
    body: dict = {}
    if conf is None:
        return labels, body
    h, w = labels.shape
    conf = upscale(conf, w, h)
    minc = float(result.get("min_confidence") or 0.0)
    if minc > 0:
        unsure = conf < minc
        value = unsure_value(mask_dtype(num_classes))
        labels = labels.astype(np.uint16 if value > 255 else labels.dtype, copy=True)
        labels[unsure] = value
        body.update(min_confidence=minc, unsure_value=value, unsure_pixels=int(unsure.sum()))
    if result.get("want_confidence"):
        from PIL import Image

        body["confidence"] = b64png(Image.fromarray(quantize(conf)))
        body["confidence_scale"] = LEVELS - 1
        body["class_confidence"] = {str(v): c for v, c in sorted(result.get("class_confidence", {}).items())}
        body["topk"] = {str(v): t for v, t in sorted(result.get("topk", {}).items())}
    return labels, body


def rle_skip(num_classes: int) -> int:
    """The label value RLE leaves out besides background: the unsure value."""
    return unsure_value(mask_dtype(num_classes))
