"""Label Studio writer: tasks.json, pre-annotation tasks with brush RLE predictions."""
from __future__ import annotations

import json
from urllib.parse import quote

from .encode import coco_decode, ls_brush_rle
from .plan import Plan


def write_labelstudio(p: Plan, rows: list[dict], url: str | None, from_name: str, to_name: str) -> None:
    tasks = []
    version = f"ovdiff {p.job['bank_id']} v{p.job['bank_version']}" + (" pamr" if p.job["pamr"] else "")
    for r in rows:
        rles = r["ls_rle"] if len(r["ls_rle"]) == len(r["values"]) else [
            ls_brush_rle(coco_decode(c, r["height"], r["width"])) for c in r["counts"]]
        result = [{"id": f"{i}-{v}", "from_name": from_name, "to_name": to_name, "type": "brushlabels",
                   "original_width": r["width"], "original_height": r["height"],
                   "image_rotation": 0, "value": {"format": "rle", "rle": list(rle), "brushlabels": [n]}}
                  for i, (v, n, rle) in enumerate(zip(r["values"], r["names"], rles))]
        image = f"{url.rstrip('/')}/{quote(r['path'])}" if url else p.images.display(r["path"])
        tasks.append({"data": {"image": image, "path": r["path"]},
                      "predictions": [{"model_version": version, "result": result}]})
    p.out.write_bytes("tasks.json", json.dumps(tasks).encode())

