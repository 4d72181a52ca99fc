"""label_dataset --scores --min-confidence (issue 21) on a real local Ray: confidence PNGs equal the Python
segmenter's, unsure pixels are 255 in PNG masks, absent from COCO RLE and Label Studio brushes, their own RLE in
Parquet; tasks are scored by confidence."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
from PIL import Image

from ovdiff_ray.label.encode import coco_decode
from ovdiff_ray.riskcoverage import quantize

from .test_label import ls_decode, one_torch_thread, run_label

MIN_CONF = 0.8


@pytest.fixture(scope="module")
def python_results(toy_bank, toy_scenes):
    from ovdiff_ray.segment import Segmenter, read_image
    from ovdiff_ray.store.bank import Bank

    seg = Segmenter.from_bank(Bank.load(toy_bank), "cpu")
    with one_torch_thread():
        return {p.name: seg.segment(read_image(p)) for p in sorted(Path(toy_scenes, "images").glob("*.png"))[:4]}


@pytest.fixture(scope="module")
def labelled(ray_local, toy_bank, toy_scenes, python_results, tmp_path_factory):
    root = tmp_path_factory.mktemp("label-conf")
    images, out = root / "images", root / "out"
    images.mkdir()
    for name in python_results:
        shutil.copy(Path(toy_scenes, "images", name), images / name)
    rc, text, err = run_label(["--images", str(images), "--bank", toy_bank, "--out", str(out), "--format",
                               "coco,png,labelstudio,parquet", "--workers", "1", "--batch-size", "2", "--scores",
                               "--min-confidence", str(MIN_CONF)])
    assert rc == 0, err
    return out


def test_confidence_pngs_equal_the_python_segmenter(labelled, python_results):
    for name, res in python_results.items():
        with Image.open(labelled / "confidence" / name) as im:
            got = np.asarray(im).astype(np.int64)
        assert np.array_equal(got, quantize(res.confidence).astype(np.int64)), name


def test_unsure_pixels_in_every_format(labelled, python_results):
    doc = json.loads((labelled / "classes.json").read_text())
    assert doc["unsure"]["value"] == 255 and doc["unsure"]["min_confidence"] == MIN_CONF
    table = {r["path"]: r for r in pq.read_table(labelled / "labels.parquet").to_pylist()}
    coco = json.loads((labelled / "annotations.json").read_text())
    tasks = {t["data"]["path"]: t for t in json.loads((labelled / "tasks.json").read_text())}
    total_unsure = 0
    for name, res in python_results.items():
        unsure = res.confidence < MIN_CONF
        total_unsure += int(unsure.sum())
        with Image.open(labelled / "masks" / name) as im:
            mask = np.asarray(im).astype(np.int64)
        assert np.array_equal(mask == 255, unsure), name
        assert np.array_equal(mask[~unsure], res.labels[~unsure]), name
        r = table[name]
        h, w = unsure.shape
        got = coco_decode(r["unsure"], h, w) if r["unsure"] else np.zeros_like(unsure)
        assert np.array_equal(got, unsure) and r["unsure_area"] == int(unsure.sum())
        assert r["confidence"] == pytest.approx(float(res.confidence.mean()), abs=1e-5)
        assert len(r["class_confidence"]) == len(r["values"]) == len(r["topk"])
        iid = r["image_id"]
        for a in coco["annotations"]:
            if a["image_id"] == iid:
                m = coco_decode(a["segmentation"]["counts"], h, w)
                assert not (m & unsure).any() and np.array_equal(m, mask == a["category_id"])
                assert 0 <= a["confidence"] <= 1
        pred = tasks[name]["predictions"][0]
        assert pred["score"] == pytest.approx(r["confidence"], abs=1e-5)
        for res_ in pred["result"]:
            m = ls_decode(res_["value"]["rle"], h, w)
            assert not (m & unsure).any()
    assert total_unsure > 0, "the threshold left no pixel unsure: the test checks nothing"


def test_bad_min_confidence_fails_before_writing(toy_bank, toy_scenes, tmp_path):
    out = tmp_path / "out"
    rc, _, err = run_label(["--images", str(Path(toy_scenes, "images")), "--bank", toy_bank, "--out", str(out),
                            "--format", "png", "--min-confidence", "1.5"])
    assert rc == 2 and "--min-confidence 1.5: expected a number in [0, 1]" in err
    assert not out.exists()
