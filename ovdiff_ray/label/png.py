"""PNG writer: masks/<input path>.png (class index) + classes.json; overlays/ pictures."""
from __future__ import annotations

import io
import json

import pyarrow.fs as pafs

from ..store.fs import StoreError
from .encode import ImageError, decode_image, encode_png, labels_of
from .plan import Plan, info, mirror_names


def write_png(p: Plan, rows: list[dict]) -> str:
    """classes.json, and masks that are missing (labelled by a run that did not ask for png) from the RLE."""
    from ..confidence import unsure_value

    unsure = unsure_value(p.png_dtype)
    doc = {**info(p), "dtype": p.png_dtype, "classes": {"0": "background", **{str(v): n for v, n in p.classes.items()}},
           "unsure": {"value": unsure, "min_confidence": p.job.get("min_confidence", 0.0),
                      "meaning": "pixels under min_confidence: left unlabelled (not background)"}}
    p.out.write_bytes("classes.json", json.dumps(doc, indent=1).encode())
    sel = pafs.FileSelector(p.out.path("masks"), recursive=True, allow_not_found=True)
    have = {i.path[len(p.out.root) + 1:] for i in p.out.fs.get_file_info(sel)}
    for r in rows:
        if p.masks[r["path"]] not in have:
            p.out.write_bytes(p.masks[r["path"]], encode_png(labels_of(r, unsure), p.png_dtype))
    return f"png: {len(rows)} masks ({p.png_dtype}) + classes.json"

def write_overlays(p: Plan, rows: dict[str, dict], n: int, max_pixels: int) -> int:
    """Overlays of the first `n` listed images that are labelled and have none yet; returns how many written."""
    from ..segment import SegmentationResult, overlay

    written = 0
    for it in p.listing[:n]:
        r = rows.get(it.path)
        key = mirror_names([it.path], "overlays")[it.path]
        if r is None or p.out.exists(key):
            continue
        try:
            rgb = decode_image(p.images.read_bytes(it.path), max_pixels)
        except (StoreError, ImageError):
            continue
        labels = labels_of(r)
        names = {0: "background", **dict(zip(r["values"], r["names"]))}
        buf = io.BytesIO()
        overlay(rgb, SegmentationResult(labels, names, None, [])).save(buf, format="PNG")
        p.out.write_bytes(key, buf.getvalue())
        written += 1
    return written

