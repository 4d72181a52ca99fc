"""The CVAT auto-annotation function against cvat-sdk itself (no server): loaded by cvat-cli's own function loader
from `-p NAME=TYPE:VALUE` parameters, its spec validated by cvat-sdk, its shapes checked by the SDK driver's own validator and decoded with
`cvat_sdk.masks.decode_mask` against in-process `Segmenter.segment`."""
from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

SUBSET = "red circle, yellow cross,blue checks"


@pytest.fixture(scope="module")
def function(toy_bank):
    """Loaded by cvat-cli's own loader from `--function-module ovdiff_ray.label.cvat -p bank=str:URI ...`."""
    from cvat_cli._internal.common import FunctionLoader
    from cvat_cli._internal.parsers import parse_function_parameter

    params = dict(parse_function_parameter(p) for p in (f"bank=str:{toy_bank}", f"classes=str:{SUBSET}",
                                                        "device=str:cpu", "pamr=bool:false"))
    return FunctionLoader("ovdiff_ray.label.cvat", None, params).load()


def context(threshold=None, poly=False):
    from cvat_sdk.auto_annotation.driver import _DetectionFunctionContextImpl

    return _DetectionFunctionContextImpl(frame_name="0003.png", conf_threshold=threshold, conv_mask_to_poly=poly)


def task_labels(names):
    """Labels of a CVAT task as the server returns them (ids unrelated to the function's)."""
    from cvat_sdk import models

    return [models.Label(id=500 + i, name=n, type="any", attributes=[], sublabels=[]) for i, n in enumerate(names)]


def test_spec_has_one_mask_label_per_class(function, toy_bank):
    from cvat_sdk.auto_annotation import DetectionFunctionSpec

    from ovdiff_ray.store.bank import Bank

    names = Bank.load(toy_bank).names
    assert isinstance(function.spec, DetectionFunctionSpec)  # attrs validators ran (distinct ids, label specs)
    got = [(lab.name, lab.id, lab.type) for lab in function.spec.labels]
    assert got == [(n, names.index(n) + 1, "mask") for n in ["red circle", "yellow cross", "blue checks"]]


def test_detect_masks_decode_to_segmenter(function, toy_bank, toy_scenes):
    from cvat_sdk.auto_annotation.driver import _AnnotationMapper
    from cvat_sdk.masks import decode_mask

    from ovdiff_ray.segment import Segmenter, read_image
    from ovdiff_ray.store.bank import Bank

    seg = Segmenter.from_bank(Bank.load(toy_bank))
    classes = [c.strip() for c in SUBSET.split(",")]
    names = {lab.id: lab.name for lab in function.spec.labels}
    for n in ("0003.png", "0004.png"):
        path = Path(toy_scenes, "images", n)
        ref = seg.segment(read_image(path), classes=classes).labels
        shapes = function.detect(context(), Image.open(path))
        assert shapes and all(s.type.value == "mask" and s.frame == 0 for s in shapes)
        labels = np.zeros_like(ref)
        for s in shapes:
            m = decode_mask(s.points, image_width=ref.shape[1], image_height=ref.shape[0])
            assert not (labels[m] > 0).any()
            labels[m] = s.label_id
        np.testing.assert_array_equal(labels, ref, err_msg=n)
        # the SDK driver's own check and remapping onto a task's labels (as annotate_task does)
        mapper = _AnnotationMapper(logging.getLogger("t"), function.spec.labels, task_labels(names.values()),
                                   allow_unmatched_labels=False, conv_mask_to_poly=False)
        tags, mapped = mapper.validate_and_remap(shapes, 7)
        assert not tags and len(mapped) == len(shapes)
        assert {s.label_id for s in mapped} <= set(range(500, 503)) and {s.frame for s in mapped} == {7}


def test_threshold_polygons_and_instances(function, toy_bank, toy_scenes):
    from cvat_sdk.auto_annotation.driver import _AnnotationMapper

    import ovdiff_ray.label.cvat as cvat_module

    img = Image.open(Path(toy_scenes, "images", "0003.png"))
    assert function.detect(context(threshold=1.01), img) == []  # no region scores above 1
    polys = function.detect(context(poly=True), img)
    assert polys and all(s.type.value == "polygon" and len(s.points) >= 6 for s in polys)
    mapper = _AnnotationMapper(logging.getLogger("t"), function.spec.labels,
                               task_labels([lab.name for lab in function.spec.labels]),
                               allow_unmatched_labels=False, conv_mask_to_poly=True)
    assert len(mapper.validate_and_remap(polys, 0)[1]) == len(polys)
    from cvat_sdk.masks import decode_mask
    from scipy import ndimage

    inst = cvat_module.create(bank=toy_bank, classes=SUBSET, device="cpu", instances=True)
    things = {lab.id for lab in function.spec.labels if lab.name in ("red circle", "yellow cross")}
    split_any = False
    for n in sorted(p.name for p in Path(toy_scenes, "images").glob("*.png")):
        img = Image.open(Path(toy_scenes, "images", n))
        per_class = function.detect(context(), img)
        split = inst.detect(context(), img)
        assert {s.label_id for s in split} == {s.label_id for s in per_class}
        # one shape per 8-connected component of a thing class (a plain scipy count), one per stuff class
        want = 0
        for s in per_class:
            m = decode_mask(s.points, image_width=img.width, image_height=img.height)
            want += ndimage.label(m, structure=np.ones((3, 3)))[1] if s.label_id in things else 1
        assert len(split) == want, n
        split_any |= len(split) > len(per_class)
    assert split_any  # some scene has a thing class in several pieces
