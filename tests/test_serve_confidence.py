"""`POST /v1/segment` with `scores=true` and `min_confidence` (issue 21), through the FastAPI app over an in-process
backend: the confidence map equals the Python segmenter's, unsure pixels are 255 in PNG masks and absent from RLE."""
from __future__ import annotations

import base64
import io
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from ovdiff_ray.riskcoverage import quantize
from ovdiff_ray.serve.app import LocalBackend, make_app
from ovdiff_ray.serve.engine import decode_png

from .test_serve_app import CountingBackend


@pytest.fixture(scope="module")
def service(toy_bank):
    from fastapi.testclient import TestClient

    backend = CountingBackend(LocalBackend({"banks": [{"uri": toy_bank}], "torch_threads": 1}))
    with TestClient(make_app(backend)) as client:
        yield client, backend


@pytest.fixture(scope="module")
def segmenter(toy_bank):
    from ovdiff_ray.segment import Segmenter
    from ovdiff_ray.store.bank import Bank

    return Segmenter.from_bank(Bank.load(toy_bank))


def scene(toy_scenes, i=0) -> bytes:
    return (Path(toy_scenes) / "images" / f"{i:04d}.png").read_bytes()


def post(client, data: bytes, **fields):
    return client.post("/v1/segment", files={"image": ("s.png", data, "image/png")}, data=fields)


def png16(b64: str) -> np.ndarray:
    with Image.open(io.BytesIO(base64.b64decode(b64))) as im:
        return np.asarray(im).astype(np.int64)


def test_scores_true_returns_the_python_confidence_map(service, segmenter, toy_scenes):
    client, _ = service
    data = scene(toy_scenes, 1)
    r = post(client, data, scores="true")
    assert r.status_code == 200, r.text
    body = r.json()
    rgb = np.asarray(Image.open(io.BytesIO(data)).convert("RGB"))
    res = segmenter.segment(rgb)
    conf = png16(body["confidence"])
    assert conf.shape == (body["height"], body["width"]) == res.labels.shape
    assert body["confidence_scale"] == 65535
    assert np.array_equal(conf, quantize(res.confidence).astype(np.int64))
    assert np.array_equal(decode_png(body["mask"]), res.labels)
    assert set(body["class_confidence"]) == set(body["classes"])
    for v, c in body["class_confidence"].items():
        assert c == pytest.approx(float(res.confidence[res.labels == int(v)].mean()), abs=1e-5)
    assert set(body["topk"]) == set(body["classes"])
    for v, best in body["topk"].items():
        assert 1 <= len(best) <= 3 and [b["score"] for b in best] == sorted((b["score"] for b in best), reverse=True)
        assert all(b["name"] == body["classes"].get(str(b["id"]), b["name"]) for b in best)
    plain = post(client, data).json()
    assert "confidence" not in plain and "topk" not in plain and plain["mask"] == body["mask"]


def test_min_confidence_marks_unsure_pixels_in_png_and_leaves_them_out_of_rle(service, segmenter, toy_scenes):
    client, _ = service
    data = scene(toy_scenes, 2)
    rgb = np.asarray(Image.open(io.BytesIO(data)).convert("RGB"))
    res = segmenter.segment(rgb)
    # a quantile of the distinct values: with the bank's fit calibration, labels that fit their pixels as the bank's
    # own support images do are all at 1 (issue 28), so plain pixel quantiles can land on 1
    t = float(np.quantile(np.unique(res.confidence), 0.3))
    assert 0 < t < 1
    body = post(client, data, min_confidence=str(t)).json()
    mask = decode_png(body["mask"])
    unsure = res.confidence < t
    assert body["unsure_value"] == 255 and body["unsure_pixels"] == int(unsure.sum()) > 0
    assert np.array_equal(mask == 255, unsure)
    assert np.array_equal(mask[~unsure], res.labels[~unsure])
    rle = post(client, data, min_confidence=str(t), format="rle").json()["rle"]
    from pycocotools import mask as mu

    assert "255" not in rle
    covered = np.zeros(mask.shape, bool)
    for v, r in rle.items():
        m = mu.decode({"size": r["size"], "counts": r["counts"].encode()}).astype(bool)
        assert np.array_equal(m, mask == int(v))
        covered |= m
    assert not (covered & unsure).any()


def test_bad_min_confidence_is_a_400_that_never_reaches_the_model(service, toy_scenes):
    client, backend = service
    before = backend.calls
    for bad in ("1.5", "-1", "lots", "nan"):
        r = post(client, scene(toy_scenes), min_confidence=bad)
        assert r.status_code == 400, (bad, r.text)
        assert "min_confidence" in r.json()["error"] and "[0, 1]" in r.json()["error"]
    r = post(client, scene(toy_scenes), scores="maybe")
    assert r.status_code == 400 and "'scores'" in r.json()["error"]
    assert backend.calls == before


def test_explain_true_returns_the_winning_prototypes_per_class(service, segmenter, toy_scenes):
    from ovdiff_ray.explain import explain

    client, _ = service
    data = scene(toy_scenes, 1)
    body = post(client, data, explain="true").json()
    assert set(body["explain"]) == set(body["classes"])
    rgb = np.asarray(Image.open(io.BytesIO(data)).convert("RGB"))
    want = {str(v): e.to_dict() for v, e in explain(segmenter, rgb, segmenter.segment(rgb)).items()}
    assert body["explain"] == want
    for v, e in body["explain"].items():
        assert e["name"] == body["classes"][v] and e["prototypes"]
        for p in e["prototypes"]:
            assert p["extractor"] in ("toy", "toyctx") and p["level"] in ("class", "instance", "part")
            assert p["support"] is None or len(p["support"]) == len(p["seeds"]) <= 8
    assert "explain" not in post(client, data).json()
