"""CVAT auto-annotation function (cvat-sdk's detection-function protocol): a bank's classes as mask labels.

    pip install cvat-cli   # with this package in the same environment
    cvat-cli --server-host https://cvat.example --auth USER task auto-annotate TASK_ID \\
        --function-module ovdiff_ray.label.cvat -p bank=str:s3://bucket/banks/lvis [-p classes=str:"dog,cat"] \\
        [-p device=str:cuda] [-p pamr=bool:true] [-p instances=bool:true] [--conf-threshold 0.5]

cvat-cli imports the module, calls `create(**params)` and matches the function's labels to the task's by name, so
create the task with labels named as the bank's classes (`ovdiff bank inspect URI` lists them; a task label of type
"mask" or "any"). Each image gets one mask shape per class present (all its pixels), or with `instances` one per
8-connected component of each thing class; a shape whose mean class score is under `--conf-threshold` is dropped.
With `--conv-mask-to-poly` masks come back as polygons (outer contours).
"""
from __future__ import annotations

import numpy as np

from .encode import components, own_scores


class OVDiffFunction:
    """`spec` (one mask label per bank class, id = the bank's label value) and `detect(context, image)`."""

    def __init__(self, bank: str, version: int | None = None, classes: str | list[str] | None = None,
                 device: str | None = None, pamr: bool = False, instances: bool = False):
        import cvat_sdk.auto_annotation as cvataa

        from ..models import default_device
        from ..segment import Segmenter
        from ..store.bank import Bank

        if isinstance(classes, str):
            classes = [c.strip() for c in classes.split(",") if c.strip()]
        b = Bank.load(bank, version=version, classes=classes or None)
        self.seg = Segmenter.from_bank(b, device or default_device())
        position = {c["name"]: i for i, c in enumerate(b.manifest["classes"])}
        kinds = {c["name"]: c.get("kind", "thing") for c in b.manifest["classes"]}
        self.value = np.array([0] + [position[n] + 1 for n in b.names], np.int64)  # loaded index -> bank value
        self.thing = {position[n] + 1: kinds[n] == "thing" for n in b.names}
        self.pamr, self.instances = bool(pamr), bool(instances)
        self.spec = cvataa.DetectionFunctionSpec(
            labels=[cvataa.label_spec(n, position[n] + 1, type="mask") for n in b.names])

    def detect(self, context, image) -> list:
        """PIL image -> mask (or polygon) shapes, `frame=0`, label ids from `spec`."""
        import cvat_sdk.auto_annotation as cvataa
        from cvat_sdk.masks import encode_mask

        from ..segment import to_rgb_array

        res = self.seg.segment(np.array(to_rgb_array(image)), pamr=self.pamr, return_scores=True)
        own = own_scores(res)
        labels = self.value[res.labels]
        threshold = context.conf_threshold
        shapes = []
        for v in (int(x) for x in np.unique(labels) if x):
            mask = labels == v
            parts = [mask]
            if self.instances and self.thing.get(v):
                lab, n = components(mask)
                parts = [lab == k for k in range(1, n + 1)]
            for m in parts:
                if threshold is not None and float(own[m].mean()) < threshold:
                    continue
                if context.conv_mask_to_poly:
                    shapes += [cvataa.polygon(v, pts) for pts in polygons(m)]
                else:
                    shapes.append(cvataa.mask(v, encode_mask(m)))
        return shapes


def polygons(mask: np.ndarray) -> list[list[float]]:
    """Outer contours of a boolean mask as flat `[x0, y0, x1, y1, ...]` lists (at least 3 points each)."""
    from skimage import measure

    out = []
    for c in measure.find_contours(np.pad(mask, 1).astype(np.float32), 0.5):
        c = measure.approximate_polygon(c - 1, tolerance=1.0)
        if len(c) >= 3:
            out.append(np.clip(c[:, ::-1], 0, None).ravel().tolist())
    return out


def create(bank: str, **params) -> OVDiffFunction:
    """cvat-cli's entry point: `-p bank=str:URI` and the optional `version`, `classes`, `device`, `pamr`,
    `instances`."""
    return OVDiffFunction(bank, **params)
