"""Parquet writer: `labels.parquet`, one row per image, self-describing.

Columns: `path` (under the images root), `image_id` (as in the COCO files), `width`, `height`, `values` (label values
present, ascending), `classes` (their names), `rle` (per class: COCO compressed RLE counts, ASCII, column-major, of
an `[height, width]` mask), `area`, `bbox` `[x, y, w, h]`, `score` (per class: mean class score over its pixels).
The `rle` field's metadata says how to decode it; the schema metadata key `ovdiff` is JSON with the images root, the
class table (0 = background, c + 1 = class c of the bank) and the bank's id and version.
"""
from __future__ import annotations

import io
import json

import pyarrow as pa
import pyarrow.parquet as pq

from .encode import image_id
from .plan import Plan, info

RLE_METADATA = {
    "encoding": "coco-rle-compressed",  # pycocotools' compressed RLE, counts as an ASCII string
    "order": "column-major",  # pixels run down columns first (Fortran order), as COCO's
    "size": "[height, width] from the row's height and width columns",
    "decode": "pycocotools.mask.decode({'size': [height, width], 'counts': rle[i].encode()}) -> [height, width] "
              "uint8, for label values[i]",
}


def schema() -> pa.Schema:
    return pa.schema([
        pa.field("path", pa.string(), metadata={"description": "image path under images_root ('/'-separated)"}),
        pa.field("image_id", pa.int64(), metadata={"description": "COCO image id (annotations.json)"}),
        pa.field("width", pa.int32()),
        pa.field("height", pa.int32()),
        pa.field("values", pa.list_(pa.int32()), metadata={"description": "label values present (0 = background "
                                                                          "excluded), ascending"}),
        pa.field("classes", pa.list_(pa.string()), metadata={"description": "class name of each value"}),
        pa.field("rle", pa.list_(pa.string()), metadata=RLE_METADATA),
        pa.field("area", pa.list_(pa.int64()), metadata={"description": "pixels per value"}),
        pa.field("bbox", pa.list_(pa.list_(pa.float64())), metadata={"description": "[x, y, w, h] per value"}),
        pa.field("score", pa.list_(pa.float32()), metadata={"description": "mean class score over its pixels "
                                                                           "(0..1), per value"}),
        pa.field("confidence", pa.float32(), metadata={"description": "mean pixel confidence of the image (0..1; "
                                                                      "low = review first)"}),
        pa.field("class_confidence", pa.list_(pa.float32()), metadata={"description": "mean confidence over each "
                                                                                     "value's pixels"}),
        pa.field("unsure", pa.string(), metadata={"description": "COCO RLE counts of the unsure pixels (confidence "
                                                                 "under min_confidence; in no value's mask); '' = "
                                                                 "none, null = threshold off"}),
        pa.field("unsure_area", pa.int64()),
        pa.field("topk", pa.list_(pa.list_(pa.int32())), metadata={"description": "per value: the best label values "
                                                                                 "by mean score over its pixels"}),
        pa.field("topk_score", pa.list_(pa.list_(pa.float32()))),
    ])


def write_parquet(p: Plan, rows: list[dict]) -> str:
    data = [{"path": r["path"], "image_id": r.get("image_id") or image_id(r["path"]), "width": r["width"],
             "height": r["height"], "values": r["values"], "classes": r["names"], "rle": r["counts"],
             "area": r["area"], "bbox": r["bbox"], "score": r.get("score"),
             **{k: r.get(k) for k in ("confidence", "class_confidence", "unsure", "unsure_area", "topk", "topk_score")}}
            for r in rows]
    meta = info(p)
    meta["classes"] = [{"value": 0, "name": "background", "kind": "background"}] + [
        {"value": v, "name": n, "kind": p.kinds[v]} for v, n in p.classes.items()]
    meta["rle"] = RLE_METADATA
    t = pa.Table.from_pylist(data, schema=schema()).replace_schema_metadata({"ovdiff": json.dumps(meta)})
    buf = io.BytesIO()
    pq.write_table(t, buf)
    p.out.write_bytes("labels.parquet", buf.getvalue())
    return f"parquet: {len(data)} rows"
