"""The Ray Data UDF of the labelling job: one actor holds the models and the requested classes' prototypes."""
from __future__ import annotations

import os
import socket
import time
import traceback

import numpy as np
import pyarrow as pa

from ..store.fs import Location, StoreError
from .encode import (FAILED, MAX_BYTES, MAX_PIXELS, OK, ROW_SCHEMA, UNREADABLE, ImageError, decode_image,
                     encode_labels, error_row, image_id, own_scores)


class Labeller:
    """Ray Data callable class: models and the requested classes' prototypes loaded once per actor; a batch of
    image paths -> a table of compact rows (ROW_SCHEMA). Decoding happens here, so a bad file is one error row.
    Images are segmented with their scores (`return_scores`: `[K + 1, H, W]` float32 per image, K = classes kept by
    the pre-filter, held while its row is encoded) for the per-class and per-component scores; the labels are the
    same as without them."""

    def __init__(self, bank: str, version: int, classes: list[str] | None, images: str, storage: dict | None = None,
                 png_dtype: str | None = None, labelstudio: bool = False, pamr: bool = False,
                 max_pixels: int = MAX_PIXELS, max_bytes: int = MAX_BYTES, device: str = "cpu",
                 conf_png: bool = False, min_confidence: float | None = None):
        from ..segment import Segmenter
        from ..store.shared import load_shared

        self.images = Location(images, storage)
        # the node's one read-only copy of this version's arrays (memory-mapped), shared by its actors
        b = load_shared(bank, version=version, classes=classes, storage_options=storage)
        self.seg = Segmenter.from_bank(b, device)
        position = {c["name"]: i for i, c in enumerate(b.manifest["classes"])}
        self.lut = np.array([0] + [position[n] + 1 for n in b.names], np.int32)  # loaded index -> bank value
        self.names = {position[n] + 1: n for n in b.names}
        self.png_dtype, self.labelstudio, self.pamr = png_dtype, labelstudio, pamr
        self.conf_png = conf_png
        self.min_confidence = b.recipe.segmentation.min_confidence if min_confidence is None else min_confidence
        self.max_pixels, self.max_bytes = max_pixels, max_bytes
        self.worker = f"{socket.gethostname()}:{os.getpid()}"

    def __call__(self, batch: dict[str, np.ndarray]) -> pa.Table:
        """Decode each image (a bad file is an error row), then segment the readable ones as one batch."""
        t0 = time.perf_counter()
        rows: list[dict | None] = []
        todo: list[tuple[int, str, int, np.ndarray]] = []
        for p, s in zip(batch["path"], batch["size"]):
            path, size = str(p), int(s)
            try:
                todo.append((len(rows), path, size, decode_image(self.images.read_bytes(path, self.max_bytes),
                                                                 self.max_pixels)))
                rows.append(None)
            except (StoreError, ImageError) as e:
                rows.append(error_row(path, size, UNREADABLE, str(e), self.worker))
        try:
            results = self.seg.segment_batch([rgb for *_, rgb in todo], pamr=self.pamr, return_scores=True)
        except Exception:  # noqa: BLE001 - find the image that fails: one by one
            results = [None] * len(todo)
        secs = (time.perf_counter() - t0) / max(len(todo), 1)
        for (i, path, size, rgb), res in zip(todo, results):
            rows[i] = self.label_one(path, size, rgb, res, secs)
        return pa.Table.from_pylist(rows, schema=ROW_SCHEMA)

    def label_one(self, path: str, size: int, rgb: np.ndarray, res=None, secs: float = 0.0) -> dict:
        """One decoded image (already segmented when `res` is given) -> a row; a failure is an error row."""
        t0 = time.perf_counter()
        try:
            if res is None:
                res = self.seg.segment(rgb, pamr=self.pamr, return_scores=True)
            topk = {int(self.lut[v]): [(int(self.lut[c]), s) for c, s in best] for v, best in (res.topk or {}).items()}
            row = encode_labels(self.lut[res.labels], self.names, self.png_dtype, self.labelstudio, own_scores(res),
                                res.confidence, self.min_confidence, topk, self.conf_png)
        except Exception as e:  # noqa: BLE001 - reported per image; the job goes on
            return error_row(path, size, FAILED, f"{type(e).__name__}: {e}\n{traceback.format_exc(limit=4)}",
                             self.worker)
        return dict(path=path, size=size, status=OK, error="", **row, image_id=image_id(path),
                    seconds=secs + time.perf_counter() - t0, worker=self.worker)

