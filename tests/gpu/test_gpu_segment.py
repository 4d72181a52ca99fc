"""The Segmenter on the device vs the CPU: one image and batches with scores, confidence, the pre-filter, PAMR,
superpixel and SAM regions; the toy recipe (labels that mean something) and the tiny recipe (the real architectures:
SD UNet, DINO ViT, CLIP ViT; fp16 on CUDA)."""
from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch
from PIL import Image

from ovdiff_ray.segment import Segmenter
from ovdiff_ray.store.bank import Bank

from .compare import LABEL_AGREEMENT, SCORE_MAD, agreement, toy_scenes

pytestmark = pytest.mark.gpu


def images() -> list[np.ndarray]:
    """Three toy scenes, one of them 150 x 100 (windows snapped at the border, a non-square whole view)."""
    s = toy_scenes(3, 128, seed=10)
    s[1] = np.asarray(Image.fromarray(s[1]).resize((150, 100)))
    return s


def pair(recipe, protos, device, sam: bool = False) -> tuple[Segmenter, Segmenter]:
    """(device segmenter, CPU segmenter) over the same in-memory bank."""
    recipe = _with_tiny_sam(recipe) if sam else recipe
    bank = Bank.from_prototypes(protos, recipe)
    return Segmenter.from_bank(bank, device), Segmenter.from_bank(bank, "cpu")


def _with_tiny_sam(recipe):
    import copy

    r = copy.deepcopy(recipe)
    r.segmentation.sam = dataclasses.replace(r.segmentation.sam, model="tiny:sam", pred_iou_thresh=0.0,
                                             stability_score_thresh=0.0)
    return r


def assert_same(dev, cpu, mad: float, scores: bool = True, kept: bool = True) -> None:
    for d, c in zip(dev, cpu, strict=True):
        if kept:
            assert d.kept == c.kept
        assert agreement(d.labels, c.labels) >= LABEL_AGREEMENT, agreement(d.labels, c.labels)
        assert d.confidence.shape == c.confidence.shape == d.labels.shape
        assert float(np.abs(d.confidence - c.confidence).mean()) <= mad
        if scores:
            assert d.scores.shape == c.scores.shape
            assert float(np.abs(d.scores - c.scores).mean()) <= mad


@pytest.fixture(scope="module")
def toy_pair(toy_protos, device):
    return pair(*toy_protos, device)


@pytest.fixture(scope="module")
def tiny_pair(tiny_protos, device):
    return pair(*tiny_protos, device)


def test_toy_segment_and_batch_with_scores(toy_pair, device):
    """The pre-filter keeps the same classes; labels, scores and confidence agree; a batch on the device gives its
    one-image results."""
    dseg, cseg = toy_pair
    assert dseg.device.type == torch.device(device).type
    imgs = images()
    dev = dseg.segment_batch(imgs, return_scores=True)
    cpu = cseg.segment_batch(imgs, return_scores=True)
    assert_same(dev, cpu, SCORE_MAD["fp32"])
    assert any(len(np.unique(r.labels)) > 1 for r in cpu)  # not an all-background comparison
    one = dseg.segment(imgs[1], return_scores=True)
    assert agreement(one.labels, dev[1].labels) >= LABEL_AGREEMENT
    plain = dseg.segment_batch(imgs)  # without scores: the chunked upsample-argmax path
    assert all(agreement(p.labels, c.labels) >= LABEL_AGREEMENT for p, c in zip(plain, cpu))


def test_tiny_models_segment_batch(tiny_pair, precision):
    """The real architectures on the device (fp16 on CUDA) against fp32 on the CPU. The pre-filter is compared by
    its image embeddings (random weights put classes at near-ties), labels with the pre-filter off."""
    dseg, cseg = tiny_pair
    imgs = images()
    dev = dseg.segment_batch(imgs, return_scores=True, ablate=["no_prefilter"])
    cpu = cseg.segment_batch(imgs, return_scores=True, ablate=["no_prefilter"])
    assert_same(dev, cpu, SCORE_MAD[precision])
    x = [torch.from_numpy(np.array(i)).permute(2, 0, 1).float().div(255) for i in imgs]
    ed = dseg._prefilter.image_embeddings([t.to(dseg.device) for t in x])
    ec = cseg._prefilter.image_embeddings(x)
    cos = (ed * ec).sum(1) / np.linalg.norm(ed, axis=1) / np.linalg.norm(ec, axis=1)
    assert cos.min() >= 0.99, cos


def test_min_confidence_marks_the_same_pixels(toy_pair):
    dseg, cseg = toy_pair
    for img in images():
        d, c = dseg.segment(img), cseg.segment(img)
        for t in (0.3, 0.5):
            assert agreement(d.confidence < t, c.confidence < t) >= LABEL_AGREEMENT


def test_pamr(toy_pair):
    dseg, cseg = toy_pair
    imgs = images()
    dev = dseg.segment_batch(imgs, pamr=True, return_scores=True)
    cpu = cseg.segment_batch(imgs, pamr=True, return_scores=True)
    assert_same(dev, cpu, SCORE_MAD["fp32"])
    assert all(d.timings["pamr"] > 0 for d in dev)


@pytest.mark.parametrize("regions", ["superpixels", "sam"])
def test_regions(toy_protos, device, regions):
    """Snapping to superpixels (scikit-image on the host) and to SAM's automatic masks (the tiny random SAM through
    the real mask-generation pipeline, on the device)."""
    dseg, cseg = pair(*toy_protos, device, sam=regions == "sam")
    imgs = images()[:2]
    dev = dseg.segment_batch(imgs, regions=regions, return_scores=True)
    cpu = cseg.segment_batch(imgs, regions=regions, return_scores=True)
    assert_same(dev, cpu, SCORE_MAD["fp32"])
    assert all(d.timings["regions"] > 0 for d in dev)
