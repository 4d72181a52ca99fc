"""Label Studio writer: `tasks.json` (pre-annotated tasks, brush RLE predictions) and `labelstudio.xml` (the
project's labeling config: an `Image` and a `BrushLabels` whose `Label` values are the bank's class names).

Label Studio does not check predictions against the config at import: a `from_name` / `to_name` or label value that
the config lacks silently hides the prediction. So the config is written from the same names and tag names as the
tasks; paste it into the project (Settings -> Labeling Interface -> Code) before importing `tasks.json`.

`data.image` must be a URL the browser can load (`--image-url`):
- `/data/local-files/?d=<folder>`: files served by Label Studio itself (`LABEL_STUDIO_LOCAL_FILES_SERVING_ENABLED=
  true`, `LABEL_STUDIO_LOCAL_FILES_DOCUMENT_ROOT=/root`, `<folder>` = the images root relative to it, and a Local
  Files storage added to the project);
- `http(s)://host/prefix`: any web server holding the same tree;
- `s3://bucket/prefix`: with an S3 source storage connected to the project (Label Studio presigns the URLs).
Without it, images on S3 keep their `s3://` URI; local paths are written as they are and a warning says so.
"""
from __future__ import annotations

import json
import sys
from urllib.parse import quote
from xml.sax.saxutils import quoteattr

from .encode import coco_decode, ls_brush_rle
from .plan import Plan


def model_version(bank_id: str, version: int, pamr: bool = False) -> str:
    """The `model_version` of predictions: the bank's id and version (`<bank_id>@v<N>`, `+pamr` when refined)."""
    return f"{bank_id}@v{version}" + ("+pamr" if pamr else "")


def label_config(names: list[str], from_name: str = "tag", to_name: str = "image", colours: dict | None = None) -> str:
    """A labeling config for brush pre-annotations: `Label` values exactly `names`, in order."""
    labels = "\n".join(f"    <Label value={quoteattr(n)}" + (f" background={quoteattr(colours[n])}" if colours and n in
                                                              colours else "") + "/>" for n in names)
    return (f"<View>\n  <Image name={quoteattr(to_name)} value=\"$image\" zoom=\"true\"/>\n"
            f"  <BrushLabels name={quoteattr(from_name)} toName={quoteattr(to_name)}>\n{labels}\n"
            "  </BrushLabels>\n</View>\n")


def brush_results(names: list[str], rles: list[bytes], width: int, height: int, from_name: str, to_name: str,
                  scores: list[float] | None = None, prefix: str = "r") -> list[dict]:
    """One `brushlabels` result per class region (Label Studio brush RLE), with its score when known."""
    out = []
    for i, (n, rle) in enumerate(zip(names, rles)):
        r = {"id": f"{prefix}{i}", "from_name": from_name, "to_name": to_name, "type": "brushlabels",
             "original_width": width, "original_height": height, "image_rotation": 0,
             "value": {"format": "rle", "rle": list(rle), "brushlabels": [n]}}
        if scores is not None:
            r["score"] = round(float(scores[i]), 6)
        out.append(r)
    return out


def prediction_score(scores: list[float] | None, areas: list[int]) -> float | None:
    """A task's score: the mean class score over all labelled (non-background) pixels."""
    if not scores or not sum(areas):
        return None
    return round(float(sum(s * a for s, a in zip(scores, areas)) / sum(areas)), 6)


def image_url(base: str, path: str) -> str:
    """`--image-url` prefix + the image's path (URL-quoted); `...?d=` prefixes take the path with no extra `/`."""
    return f"{base}{quote(path)}" if base.endswith(("=", "/")) else f"{base}/{quote(path)}"


def write_labelstudio(p: Plan, rows: list[dict], url: str | None, from_name: str, to_name: str) -> str:
    from ..segment import class_colour

    version = model_version(p.job["bank_id"], p.job["bank_version"], p.job["pamr"])
    tasks = []
    for r in rows:
        rles = r["ls_rle"] if len(r["ls_rle"] or []) == len(r["values"]) else [
            ls_brush_rle(coco_decode(c, r["height"], r["width"])) for c in r["counts"]]
        scores = r.get("score") if r.get("score") and len(r["score"]) == len(r["values"]) else None
        confs = r.get("class_confidence")
        if confs is not None and len(confs) == len(r["values"]):
            scores = confs  # issue 21: regions and the task scored by confidence (low = doubtful, review first)
        pred = {"model_version": version, "result": brush_results(r["names"], rles, r["width"], r["height"],
                                                                  from_name, to_name, scores)}
        score = round(float(r["confidence"]), 6) if r.get("confidence") is not None else \
            prediction_score(scores, r["area"])
        if score is not None:
            pred["score"] = score
        image = image_url(url, r["path"]) if url else p.images.display(r["path"])
        tasks.append({"data": {"image": image, "path": r["path"]}, "predictions": [pred]})
    colours = {n: "#%02x%02x%02x" % class_colour(v) for v, n in p.classes.items()}
    p.out.write_bytes("labelstudio.xml", label_config(list(p.classes.values()), from_name, to_name, colours).encode())
    p.out.write_bytes("tasks.json", json.dumps(tasks).encode())
    if not url and not p.images.is_s3:
        print("label_dataset: warning: tasks.json's data.image are local paths, which Label Studio's editor cannot "
              "load: pass --image-url (/data/local-files/?d=<folder under LABEL_STUDIO_LOCAL_FILES_DOCUMENT_ROOT>, "
              "http(s)://host/prefix or s3://bucket/prefix)", file=sys.stderr)
    return f"labelstudio: {len(tasks)} tasks, config labelstudio.xml ({len(p.classes)} labels, " \
           f"from_name={from_name!r}, to_name={to_name!r})"
