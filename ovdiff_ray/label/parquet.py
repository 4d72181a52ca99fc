"""Parquet writer: labels.parquet, one row per image with per-class COCO RLE."""
from __future__ import annotations

import io
import json

import pyarrow as pa
import pyarrow.parquet as pq

from .encode import PART_SCHEMA
from .plan import Plan, info


def write_parquet(p: Plan, rows: list[dict]) -> None:
    cols = ["path", "width", "height", "values", "names", "counts", "area", "bbox"]
    t = pa.Table.from_pylist([{k: r[k] for k in cols} for r in rows], schema=pa.schema([PART_SCHEMA.field(c) for c in cols]))
    t = t.rename_columns(["path", "width", "height", "values", "classes", "rle", "area", "bbox"])
    buf = io.BytesIO()
    pq.write_table(t.replace_schema_metadata({"ovdiff": json.dumps(info(p))}), buf)
    p.out.write_bytes("labels.parquet", buf.getvalue())

