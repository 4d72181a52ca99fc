"""`label_dataset`: label a folder or bucket of images with a prototype bank, on Ray Data; resumable.

One module per job: `job` (the command: plan, run on Ray Data, finalize), `plan` (validation and the diff against the
output), `labeller` (the Ray Data UDF), `encode` (row encoders: COCO RLE, Label Studio brush RLE, PNG), `parts`
(rows stored as they arrive), one writer per format: `coco`, `png`, `labelstudio`, `parquet`; and `cvat`, a
cvat-sdk auto-annotation function module.
"""
from __future__ import annotations

from .encode import (FAILED, MAX_BYTES, MAX_PIXELS, OK, PART_SCHEMA, ROW_SCHEMA, UNREADABLE, ImageError, coco_decode,
                     coco_rle, decode_image, encode_labels, encode_png, labels_of, ls_brush_rle)
from .job import Progress, main, parse_args, run
from .labeller import Labeller
from .plan import FORMATS, LabelError, Plan, plan

__all__ = ["FAILED", "FORMATS", "MAX_BYTES", "MAX_PIXELS", "OK", "PART_SCHEMA", "ROW_SCHEMA", "UNREADABLE",
           "ImageError", "LabelError", "Labeller", "Plan", "Progress", "coco_decode", "coco_rle", "decode_image",
           "encode_labels", "encode_png", "labels_of", "ls_brush_rle", "main", "parse_args", "plan", "run"]
