"""A Ray Data UDF over an image column: label maps, confidence and classes as columns.

    import ray
    from ovdiff_ray.data import Segment

    ds = ray.data.read_images("s3://bucket/photos", mode="RGB")  # column "image": [H, W, 3] uint8
    out = ds.map_batches(Segment, fn_constructor_kwargs={"bank": "s3://bucket/banks/lvis", "classes": ["dog", "cat"]},
                         batch_size=4, compute=ray.data.ActorPoolStrategy(size=2), num_gpus=0)
    row = out.take(1)[0]  # image, labels [H, W] int32, confidence [H, W] float32, classes (JSON), unsure [H, W] bool

Each actor loads the bank and the models once (`Segmenter.from_bank`). Label values are the bank's: 0 background,
c + 1 = class c of its manifest; `classes` is the JSON object {value: name} of the values present in that image.
With `min_confidence` (default the recipe's `segmentation.min_confidence`, 0 = off) the `unsure` column marks the
pixels under it (their `labels` value is kept; mask them with it). For files, see `label_dataset` (resumable, every
labelling format); this is the building block for pipelines of your own.
"""
from __future__ import annotations

import json

import numpy as np


class Segment:
    """Ray Data callable class: `batch[image_column]` (`[H, W, 3]` uint8 each, any sizes) -> the batch plus `labels`,
    `confidence`, `classes` and `unsure` columns."""

    def __init__(self, bank: str, classes: list[str] | None = None, pamr: bool = False, regions: str | None = None,
                 min_confidence: float | None = None, image_column: str = "image", device: str | None = None,
                 storage: dict | None = None, version: int | None = None):
        from .confidence import check_min_confidence
        from .segment import Segmenter
        from .store.bank import Bank

        b = Bank.load(bank, version=version, storage_options=storage)
        self.seg = Segmenter.from_bank(b, device)
        self.classes = list(classes) if classes is not None else None
        self.seg.resolve(self.classes)  # unknown names fail at actor start, named
        self.pamr, self.regions, self.column = pamr, regions, image_column
        minc = b.recipe.segmentation.min_confidence if min_confidence is None else min_confidence
        self.min_confidence = check_min_confidence(minc)

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        if self.column not in batch:
            raise KeyError(f"no column {self.column!r} in the batch (columns: {', '.join(batch)})")
        images = list(batch[self.column])
        results = self.seg.segment_batch(images, self.classes, self.pamr, regions=self.regions)
        out = dict(batch)
        out["labels"] = _ragged([r.labels.astype(np.int32) for r in results])
        out["confidence"] = _ragged([r.confidence.astype(np.float32) for r in results])
        out["unsure"] = _ragged([r.confidence < self.min_confidence for r in results])
        out["classes"] = np.array([json.dumps({str(v): n for v, n in sorted(r.classes.items())}) for r in results],
                                  dtype=object)
        return out


def _ragged(arrays: list[np.ndarray]) -> np.ndarray | list:
    """One batch column of per-row arrays: stacked when they share a shape, else a list (variable-shaped)."""
    if len({a.shape for a in arrays}) == 1:
        return np.stack(arrays)
    return arrays
