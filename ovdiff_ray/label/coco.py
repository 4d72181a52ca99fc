"""COCO writer: `annotations.json` (a pycocotools dataset) and `results.json` (the list `COCO.loadRes` takes).

Semantic by default: one annotation per class present per image, its region every pixel of that class. With
`--instances`, thing classes are split into connected components (8-connected, one annotation each; stuff stays one
region per class). Each annotation has a `score`: the mean score of its class over its pixels. Image ids are stable:
taken by `file_name` from a ground-truth COCO file (`--coco-images`), else `image_id(path)` (53 bits of the path's
sha256, stored in the parts), so re-runs and added images never renumber anything.
"""
from __future__ import annotations

import json
import os


from ..store.fs import Location, StoreError
from .encode import coco_decode, coco_rle, components, image_id
from .plan import LabelError, Plan, info

MAX_GT_BYTES = 2 ** 30  # a ground-truth file read for its image ids (LVIS val is ~200 MB)
SEMANTIC = "semantic: one region per class per image (all pixels of the class, possibly several objects)"
INSTANCES = ("instances: thing classes split into 8-connected components, one annotation each; stuff classes one "
             "region per class per image")


def read_gt_images(uri: str) -> dict[str, int]:
    """`file_name` -> `id` of a COCO file's `images` (local path or s3:// URI); LabelError naming the file."""
    parent, name = os.path.split(uri.rstrip("/"))
    try:
        doc = json.loads(Location(parent or ".").read_bytes(name, MAX_GT_BYTES))
        images = doc["images"]
        out = {str(im["file_name"]): int(im["id"]) for im in images}
    except StoreError as e:
        raise LabelError(f"--coco-images: {e}") from None
    except (ValueError, KeyError, TypeError) as e:
        raise LabelError(f"--coco-images {uri}: not a COCO file with images[].file_name/id ({type(e).__name__}: "
                         f"{e})") from None
    if len(set(out.values())) != len(out):
        raise LabelError(f"--coco-images {uri}: image ids repeat")
    return out


def match_ids(paths: list[str], gt: dict[str, int]) -> dict[str, int]:
    """Image path -> ground-truth id: the same `file_name`, else the same base name when exactly one GT image has it."""
    by_base: dict[str, list[int]] = {}
    for fn, i in gt.items():
        by_base.setdefault(fn.rsplit("/", 1)[-1], []).append(i)
    out = {}
    for p in paths:
        if p in gt:
            out[p] = gt[p]
        elif len(by_base.get(p.rsplit("/", 1)[-1], ())) == 1:
            out[p] = by_base[p.rsplit("/", 1)[-1]][0]
    return out


def regions(p: Plan, r: dict, instances: bool):
    """One row -> (category id, counts, area, bbox, score) per annotation."""
    scores = r.get("score") or [None] * len(r["values"])
    inst = r.get("inst_score") or [None] * len(r["values"])
    for v, counts, area, bbox, score, comp in zip(r["values"], r["counts"], r["area"], r["bbox"], scores, inst):
        if not instances or p.kinds.get(v) != "thing":
            yield v, counts, area, bbox, score
            continue
        lab, n = components(coco_decode(counts, r["height"], r["width"]))
        for k in range(1, n + 1):
            c, a, b = coco_rle(lab == k)
            yield v, c, a, b, (comp[k - 1] if comp is not None and len(comp) == n else score)


def write_coco(p: Plan, rows: list[dict], coco_images: str | None = None, instances: bool = False) -> str:
    """annotations.json + results.json; returns a one-line note for the summary. `p.gt_ids` holds the ids read
    from `coco_images` (plan() reads it, so a bad file stops the job before any work)."""
    ids = {r["path"]: r.get("image_id") or image_id(r["path"]) for r in rows}
    matched: dict[str, int] = {}
    if coco_images:
        matched = match_ids([r["path"] for r in rows], p.gt_ids if p.gt_ids is not None else
                            read_gt_images(coco_images))
        ids.update(matched)
    if len(set(ids.values())) != len(ids):
        raise LabelError("COCO image ids collide: two images got the same id (give --coco-images)")
    images, anns, results = [], [], []
    for r in rows:
        iid = ids[r["path"]]
        confs = dict(zip(r["values"], r.get("class_confidence") or []))
        images.append({"id": iid, "file_name": r["path"], "width": r["width"], "height": r["height"]})
        for v, counts, area, bbox, score in regions(p, r, instances):
            seg = {"size": [r["height"], r["width"]], "counts": counts}
            ann = {"id": len(anns) + 1, "image_id": iid, "category_id": v, "iscrowd": 0, "area": area, "bbox": bbox,
                   "segmentation": seg}
            if score is not None:
                ann["score"] = round(float(score), 6)
            if v in confs:
                ann["confidence"] = round(float(confs[v]), 6)  # mean pixel confidence of its class (issue 21)
            anns.append(ann)
            if not coco_images or r["path"] in matched:
                results.append({"image_id": iid, "category_id": v, "segmentation": seg, "area": area, "bbox": bbox,
                                "score": ann.get("score", 1.0)})
    meta = info(p)
    meta.update(year=int(meta["date_created"][:4]), url="", contributor="ovdiff label_dataset",
                regions=INSTANCES if instances else SEMANTIC,
                image_ids=(f"ids of {coco_images} by file_name; images not in it: sha256 of the path (53 bits)"
                           if coco_images else "sha256 of the image path under images_root (first 53 bits)"),
                score="mean score of the annotation's class over its pixels (0..1)")
    doc = {"info": meta, "licenses": [], "images": images, "annotations": anns,
           "categories": [{"id": v, "name": n, "supercategory": p.kinds[v]} for v, n in p.classes.items()]}
    p.out.write_bytes("annotations.json", json.dumps(doc).encode())
    p.out.write_bytes("results.json", json.dumps(results).encode())
    note = f"coco: {len(images)} images, {len(anns)} annotations ({'instances' if instances else 'semantic'})"
    if coco_images:
        note += f"; {len(matched)} of {len(rows)} images matched in {coco_images} (only those in results.json)"
    return note
