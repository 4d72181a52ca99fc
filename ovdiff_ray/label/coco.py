"""COCO writer: annotations.json (pycocotools-readable)."""
from __future__ import annotations

import json

from .plan import Plan, info


def write_coco(p: Plan, rows: list[dict]) -> None:
    images, anns = [], []
    for image_id, r in enumerate(rows, 1):
        images.append({"id": image_id, "file_name": r["path"], "width": r["width"], "height": r["height"]})
        for v, counts, area, bbox in zip(r["values"], r["counts"], r["area"], r["bbox"]):
            anns.append({"id": len(anns) + 1, "image_id": image_id, "category_id": v, "iscrowd": 0, "area": area,
                         "bbox": bbox, "segmentation": {"size": [r["height"], r["width"]], "counts": counts}})
    doc = {"info": info(p), "licenses": [], "images": images, "annotations": anns,
           "categories": [{"id": v, "name": n, "supercategory": p.kinds[v]} for v, n in p.classes.items()]}
    p.out.write_bytes("annotations.json", json.dumps(doc).encode())

