"""Foreground/background masks: MaskCut on synthetic features, the fg/bg rule on hand-made maps, masker dispatch."""
from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from ovdiff_ray.models.masks import fg_bg_masks, maskcut
from ovdiff_ray.recipe import MasksConfig, load_recipe


def _regions(h=16, w=16, d=32, noise=0.3, seed=0):
    """Features `[D, h, w]`: a rectangle with one feature vector on a background with another, plus noise."""
    rng = np.random.default_rng(seed)
    rect = np.zeros((h, w), bool)
    rect[4:11, 5:12] = True
    a, b = rng.normal(size=d), rng.normal(size=d)
    feats = np.where(rect[None], a[:, None, None], b[:, None, None]) + noise * rng.normal(size=(d, h, w))
    return feats, rect, rng


def test_maskcut_separates_two_regions():
    feats, rect, _ = _regions()
    masks = maskcut(feats, n=3, tau=0.15)
    assert masks.dtype == bool and masks.shape[1:] == rect.shape and 1 <= len(masks) <= 3
    np.testing.assert_array_equal(masks[0], rect)  # the object, not the background (corner rule)


def test_maskcut_next_cut_uses_remaining_patches():
    feats, rect, rng = _regions()
    corner = np.zeros_like(rect)
    corner[12:, :4] = True
    feats[:, corner] = rng.normal(size=(feats.shape[0], 1)) + 0.3 * rng.normal(size=(feats.shape[0], corner.sum()))
    masks = maskcut(feats, n=3, tau=0.15)
    assert len(masks) >= 2
    assert not (masks[0] & masks[1]).any()  # disjoint: each cut only sees what earlier cuts left
    found = {tuple(np.argwhere(m).min(0)) for m in masks[:2] if m.sum() in (rect.sum(), corner.sum())}
    assert found == {(4, 5), (12, 0)}, [m.sum() for m in masks]


def test_maskcut_degenerate_inputs():
    assert maskcut(np.ones((8, 1, 2)), n=3).shape == (0, 1, 2)  # too few patches to cut
    assert maskcut(np.zeros((8, 4, 4)), n=0).shape == (0, 4, 4)


def _cfg(**kw):
    return MasksConfig(**{"fg_threshold": 0.5, "bg_threshold": 0.2, "erode": 1, **kw})


def test_fg_bg_with_instance_masks():
    h = w = 12
    attr = np.full((h, w), 0.1, np.float32)
    attr[2:6, 2:6] = 0.9  # the class's object
    attr[7:11, 7:11] = 0.05  # another object, least attributed
    inst = np.zeros((2, h, w), bool)
    inst[0, 2:6, 2:6] = True
    inst[1, 7:11, 7:11] = True
    fg, bg = fg_bg_masks(attr, inst, _cfg())
    np.testing.assert_array_equal(fg, inst[0])  # highest mean attribution wins
    # background: the lowest-weight candidate (instance 1, not the complement), attribution < 0.2, eroded once
    want = np.zeros((h, w), bool)
    want[8:10, 8:10] = True
    np.testing.assert_array_equal(bg, want)


def test_fg_bg_complement_and_overlap():
    h = w = 10
    attr = np.zeros((h, w), np.float32)
    attr[:, :5] = 0.8
    inst = np.zeros((2, h, w), bool)
    inst[0, :, :5] = True  # weight 0.8
    inst[1, :, 3:7] = True  # overlaps instance 0 on columns 3-4; weight 0.4
    fg, bg = fg_bg_masks(attr, inst, _cfg(erode=0))
    assert fg[:, :5].all() and not fg[:, 5:].any()  # overlap goes to the higher-weight candidate
    assert bg[:, 7:].all() and not bg[:, :7].any()  # the complement (weight 0) is the worst candidate
    assert not (fg & bg).any()


@pytest.mark.parametrize("instances", [None, np.zeros((0, 8, 8), bool), np.zeros((2, 8, 8), bool)])
def test_fg_bg_no_masks_uses_thresholds(instances):
    attr = np.linspace(0, 1, 64, dtype=np.float32).reshape(8, 8)
    fg, bg = fg_bg_masks(attr, instances, _cfg(erode=0))
    np.testing.assert_array_equal(fg, attr > 0.5)
    np.testing.assert_array_equal(bg, attr < 0.2)


def test_fg_bg_empty_foreground():
    fg, bg = fg_bg_masks(np.zeros((8, 8), np.float32), None, _cfg())
    assert not fg.any()  # the caller skips such an image
    assert bg.sum() == 8 * 8  # all low; no erosion without instance masks (the authors' code)


# ---------------------------------------------------------------------------------------------------------------
# maskers


def test_build_instance_masker_maskcut_on_tiny_dino():
    from ovdiff_ray.models.masks import MaskCut, build_instance_masker

    recipe = load_recipe("tiny")
    masker = build_instance_masker(recipe, "cpu")
    assert isinstance(masker, MaskCut)
    images = np.random.default_rng(0).integers(0, 255, size=(2, 48, 40, 3), dtype=np.uint8)
    out = masker.batch(images)
    assert len(out) == 2
    for m in out + [masker(images[0])]:
        assert m.dtype == bool and m.shape[1:] == (48, 40) and len(m) <= recipe.masks.maskcut_n


def test_maskcut_masker_without_masks():
    import torch

    from ovdiff_ray.models.masks import MaskCut

    masker = MaskCut(lambda x: torch.ones(len(x), 8, 1, 2), MasksConfig(maskcut_size=16))  # too few patches
    out = masker(np.zeros((20, 30, 3), np.uint8))
    assert out.shape == (0, 20, 30) and out.dtype == bool


def test_build_instance_masker_dispatch():
    from ovdiff_ray.models.masks import build_instance_masker

    recipe = load_recipe("tiny")
    assert build_instance_masker(dataclasses.replace(recipe, masks=_cfg(method="none"))) is None
    no_dino = dataclasses.replace(recipe, extractors=[e for e in recipe.extractors if e.type != "dino"])
    with pytest.raises(ValueError, match="DINO extractor"):
        build_instance_masker(no_dino)
    try:
        import detectron2  # noqa: F401
    except ImportError:
        with pytest.raises(RuntimeError, match=r"detectron2.*\.\[cutler\]"):
            build_instance_masker(dataclasses.replace(recipe, masks=_cfg(method="cutler")))
