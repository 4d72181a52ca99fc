"""What a Serve replica runs after the batched model call (issue 28): per request, one failure that request's
alone; explain on the features the segmentation computed (no second extractor pass), with part members loaded once
with the bank (no storage read per request) and on the features' device; the confidence map made only when a
request asks for it."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from ovdiff_ray import confidence as confidence_mod
from ovdiff_ray import explain as explain_mod
from ovdiff_ray.serve.engine import Engine, Job, ServiceConfig

from .fake_device import FakeDevice


@pytest.fixture(scope="module")
def engine(toy_bank):
    e = Engine(ServiceConfig.from_dict({"banks": [{"uri": toy_bank}]}))
    return e, e.load(e.catalog.default)


def scene(toy_scenes, i: int) -> np.ndarray:
    return np.asarray(Image.open(Path(toy_scenes) / "images" / f"{i:04d}.png").convert("RGB"))


class Counting:
    """An extractor that counts its forward passes (everything else delegated)."""

    def __init__(self, inner):
        self.inner, self.calls = inner, 0

    def __call__(self, x):
        self.calls += len(x)
        return self.inner(x)

    def __getattr__(self, name):
        return getattr(self.inner, name)


def test_a_request_whose_post_processing_raises_fails_alone(engine, toy_scenes, monkeypatch, caplog):
    eng, seg = engine
    images = [scene(toy_scenes, i) for i in range(3)]
    real = explain_mod.explain

    def flaky(s, image, result, *a, **k):
        if image is images[1]:
            raise RuntimeError("Expected all tensors to be on the same device")  # what a CUDA replica raised
        return real(s, image, result, *a, **k)

    monkeypatch.setattr(explain_mod, "explain", flaky)
    jobs = [Job(images[0], explain=True), Job(images[1], explain=True), Job(images[2], confidence=True)]
    out = eng.run(seg, jobs)
    assert [o["status"] for o in out] == [200, 500, 200]
    assert out[1]["code"] == "internal" and "post-processing" in out[1]["error"] and "labels" not in out[1]
    assert "same device" in caplog.text  # the traceback goes to the service log, not to the client
    alone = [eng.run(seg, [j])[0] for j in (jobs[0], jobs[2])]
    for got, want in zip((out[0], out[2]), alone):
        assert np.array_equal(got["labels"], want["labels"]) and got["classes"] == want["classes"]
    assert out[0]["explain"] == alone[0]["explain"] and out[0]["explain"]
    assert out[2]["class_confidence"] == alone[1]["class_confidence"]


def test_explain_reuses_the_segmentation_features_and_reads_no_storage(engine, toy_scenes, monkeypatch):
    from ovdiff_ray.store import shards

    eng, seg = engine
    counting = {ex: Counting(e) for ex, e in seg.extractors.items()}
    monkeypatch.setattr(seg, "extractors", counting)
    reads = []
    real_read = shards.read_shard_bytes
    monkeypatch.setattr(shards, "read_shard_bytes", lambda *a, **k: reads.append(a) or real_read(*a, **k))
    img = scene(toy_scenes, 4)
    plain = eng.run(seg, [Job(img)])[0]
    passes = {ex: c.calls for ex, c in counting.items()}
    for c in counting.values():
        c.calls = 0
    explained = eng.run(seg, [Job(img, explain=True), Job(img, explain=True)])
    assert all(o["status"] == 200 for o in explained)
    assert {ex: c.calls for ex, c in counting.items()} == {ex: 2 * n for ex, n in passes.items()}
    assert reads == []  # part members came with the bank
    parts = [w for e in explained[0]["explain"].values() for w in e["prototypes"] if w["level"] == "part"]
    assert parts and all(w["support"] for w in parts)  # and they name their support images
    assert np.array_equal(explained[0]["labels"], plain["labels"])


def test_the_confidence_map_is_made_only_when_a_request_asks(engine, toy_scenes, monkeypatch):
    eng, seg = engine
    calls = []
    real = confidence_mod.upsample_confidence
    monkeypatch.setattr(confidence_mod, "upsample_confidence", lambda *a: calls.append(a[1:]) or real(*a))
    img = scene(toy_scenes, 5)
    plain, scored, thresholded = eng.run(seg, [Job(img), Job(img, confidence=True), Job(img, min_confidence=0.4)])
    assert len(calls) == 2 and "confidence" not in plain and "min_confidence" not in plain
    assert scored["confidence"].shape == img.shape[:2] and thresholded["min_confidence"] == 0.4
    assert np.array_equal(plain["labels"], scored["labels"])


def test_explain_keeps_to_the_device_of_the_features(engine, toy_scenes):
    """On a fake second device (tests/fake_device.py): device tensors never meet host tensors, and nothing calls
    `.numpy()` on them; the explanation is the host run's."""
    _, seg = engine
    img = scene(toy_scenes, 6)
    res = seg.segment(img, keep_features=True)
    want = {v: e.to_dict() for v, e in explain_mod.explain(seg, img, res).items()}
    fd = FakeDevice()
    for f in res.features.feats.values():
        fd.put(f)
    device = seg.device
    try:
        with fd:
            seg.device = fd.device  # the fallback path (features not kept) prepares the image there too
            kept = {v: e.to_dict() for v, e in explain_mod.explain(seg, img, res).items()}
            res.features = None
            again = {v: e.to_dict() for v, e in explain_mod.explain(seg, img, res).items()}
    finally:
        seg.device = device
    assert fd.ops > 0 and kept == want == again
