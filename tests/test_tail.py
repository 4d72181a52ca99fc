"""Issue 23, no class left behind: each switch on a small constructed case (a thin thing beside stuff of its own
colour keeps its pixels; a scene whose stuff the vocabulary names has no background pixels), the opening against a
plain scipy loop, the recipes and ablation names, and a whole-vocabulary (48 + 40 classes) toy eval with a floor on
the worst class. Issue 27's recall past the pre-filter (`thing_proposals`): a circle the pre-filter drops is
recovered, an image whose things were all kept gains nothing, the vote and the crop box by hand."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from scipy import ndimage

from ovdiff_ray import evaluate
from ovdiff_ray.models import toy
from ovdiff_ray.precedence import background_present, opened_shares
from ovdiff_ray.recipe import RecipeError, load_recipe, recipe_from_dict
from ovdiff_ray.segment import ABLATIONS, Segmenter, Switches
from ovdiff_ray.store.bank import Bank

ALL = ([(f"{c} {s}", "thing") for c in toy.COLOURS for s in toy.SHAPES]
       + [(f"{c} {t}", "stuff") for c in toy.COLOURS for t in toy.TEXTURES])
NAMES = [n for n, _ in ALL]
KINDS = [k for _, k in ALL]

_CACHE: dict[str, object] = {}


def protos_of(names_kinds):
    """Toy-recipe prototypes, each class sampled once per test session."""
    from ovdiff_ray.sample import SamplingModels, sample_class

    recipe = load_recipe("toy")
    todo = [(n, k) for n, k in names_kinds if n not in _CACHE]
    if todo:
        models = SamplingModels.load(recipe, "cpu")
        for n, k in todo:
            _CACHE[n] = sample_class(n, recipe, models, kind=k)
    return [_CACHE[n] for n, _ in names_kinds]


def segmenter(protos, **seg) -> Segmenter:
    recipe = load_recipe("toy")
    for k, v in seg.items():
        setattr(recipe.segmentation, k, v)
    return Segmenter.from_bank(Bank.from_prototypes(protos, recipe), "cpu")


def whole_vocab_scene(seed: int, index: int) -> tuple[np.ndarray, np.ndarray]:
    """Scene `index` of the toy world's whole vocabulary drawn as bench/vocab_bench.py draws them (scene seed
    `seed`); labels index NAMES from 1 (0 background, 255 ignore)."""
    rng = np.random.default_rng(seed)
    seeds = [rng.integers(2 ** 63) for _ in range(index + 1)]
    return toy.make_scene(NAMES, KINDS, np.random.default_rng(seeds[index]), 128)


def label_of(lab: np.ndarray, name: str) -> np.ndarray:
    return lab == NAMES.index(name) + 1


# ---------------------------------------------------------------------------------------------- the opening

def reference_opened_shares(win: np.ndarray, n: int, radius: int) -> np.ndarray:
    """Plain scipy: per row, erosion with a square (outside the image counts as inside), then dilation (outside
    counts as outside), kept inside the row's own pixels."""
    square = np.ones((2 * radius + 1, 2 * radius + 1), bool)
    out = np.zeros(n)
    for r in range(n):
        m = win == r
        opened = ndimage.binary_dilation(ndimage.binary_erosion(m, square, border_value=1), square) & m
        out[r] = opened.sum() / win.size
    return out


def test_opening_drops_a_thin_ring_and_keeps_a_region():
    h = w = 96
    yy, xx = np.mgrid[:h, :w]
    win = np.zeros((h, w), np.int64)
    win[:, 60:] = 2  # a region 36 px wide
    r = np.hypot(yy - 40, xx - 28)
    win[(r >= 14) & (r <= 18)] = 1  # a ring 5 px wide
    win[5, 5] = 3  # one stray pixel
    t = torch.from_numpy(win)
    plain = opened_shares(t, 4, 0).numpy()
    assert np.allclose(plain, np.bincount(win.ravel(), minlength=4) / win.size)
    for radius in (1, 2, 3, 5):
        got = opened_shares(t, 4, radius).numpy()
        assert np.allclose(got, reference_opened_shares(win, 4, radius), atol=1e-7), radius
    got = opened_shares(t, 4, 3).numpy()
    assert got[1] == 0 and got[3] == 0  # narrower than the 7 px square
    assert got[2] == pytest.approx(plain[2])  # the region keeps every pixel, at the image border too


def test_background_present_counts_the_argmax_with_ties_to_background():
    s = torch.zeros(3, 10, 10)
    s[1, :, :5] = 0.5  # class 1 wins half
    s[2, :, 5:8] = -0.2  # negative scores count as 0: ties go to background (30% + 20%)
    assert background_present(s, 0.5) and not background_present(s, 0.51)


# ------------------------------------------------------------------------------- constructed cases, each switch

# scene 36 of the whole vocabulary (scene seed 6089, a development draw): a blue ring on yellow grain beside purple
# waves; blue checks, named but absent, wins most of the thin ring's pixels in the whole view
RING_CASE = [("orange star", "thing"), ("blue ring", "thing"), ("yellow grain", "stuff"), ("blue checks", "stuff"),
             ("purple waves", "stuff")]


def test_stuff_opening_keeps_a_thin_thing_from_same_colour_stuff():
    img, lab = whole_vocab_scene(6000 + 1 + 88, 36)
    ring = label_of(lab, "blue ring")
    assert ring.sum() > 800 and not label_of(lab, "blue checks").any()
    protos = protos_of(RING_CASE)
    on = segmenter(protos, stuff_opening=0.025)
    off = segmenter(protos, stuff_opening=0.0)
    value = on.bank.index("blue ring") + 1
    res_on, res_off = on.segment(img), off.segment(img)
    assert "blue checks" in res_off.kept and "blue checks" not in res_on.kept
    assert (res_off.labels[ring] == value).mean() < 0.2  # without the opening, the ring goes to blue checks
    assert (res_on.labels[ring] == value).mean() > 0.9
    # the stuff that is there stays, and the ablation name turns the switch off again
    assert {"yellow grain", "purple waves"} <= set(res_on.kept)
    assert np.array_equal(on.segment(img, ablate=["no_stuff_opening"]).labels, res_off.labels)


def test_background_presence_named_stuff_leaves_no_background():
    """Scene 60 of the same draw: a green star on blue checks. With blue checks named, no pixel is background; the
    star's background prototypes (its typical background is another texture) win 5% of them without the switch.
    With blue checks not named, the background is real and stays."""
    img, lab = whole_vocab_scene(6000 + 1 + 88, 60)
    assert set(np.unique(lab)) - {255} == {NAMES.index("green star") + 1, NAMES.index("blue checks") + 1}
    protos = protos_of([("green star", "thing"), ("blue checks", "stuff")])
    on = segmenter(protos, background_min_area=0.15)
    off = segmenter(protos, background_min_area=0.0)
    assert (off.segment(img).labels == 0).mean() > 0.02
    res = on.segment(img)
    assert (res.labels == 0).sum() == 0
    assert (res.labels[label_of(lab, "blue checks")] == on.bank.index("blue checks") + 1).mean() > 0.97
    assert np.array_equal(on.segment(img, ablate=["no_background_presence"]).labels, off.segment(img).labels)
    # only the star named: blue checks is background, and background is still matched
    star = segmenter(protos[:1], background_min_area=0.15)
    res = star.segment(img)
    assert (res.labels[label_of(lab, "blue checks")] == 0).mean() > 0.9


# ------------------------------------------------------------------------------------------ recipes and names

def test_recipes_paper_off_toy_and_paper_plus_on_and_bad_values_refused():
    for name, on in (("paper", False), ("paper-plus", True), ("toy", True)):
        sw = Switches.of(load_recipe(name).segmentation, (), [])
        assert (sw.stuff_opening, sw.background_presence) == (on, on), name
    plus = load_recipe("paper-plus").segmentation
    for name in ("no_stuff_opening", "no_background_presence"):
        assert name in ABLATIONS
        assert getattr(Switches.of(plus, [name], []), name[3:]) is False
    d = load_recipe("toy").to_dict()
    d["segmentation"]["stuff_opening"] = 0.7
    with pytest.raises(RecipeError, match="stuff_opening must be in"):
        recipe_from_dict(d, "bad.yaml")
    d["segmentation"]["stuff_opening"], d["segmentation"]["background_min_area"] = 0.0, 1.5
    with pytest.raises(RecipeError, match="background_min_area"):
        recipe_from_dict(d, "bad.yaml")


# --------------------------------------------------------------------------------- the whole vocabulary, a floor

@pytest.mark.timeout(1800)  # 88 classes sampled + 24 scenes: about 45 s of CPU, far longer on a crowded machine
def test_whole_vocabulary_toy_eval_holds_a_floor_on_the_tail():
    """All 48 things and 40 stuff classes, 24 scenes of a draw used neither in development nor in the README
    figures (scene seed 31337), the toy recipe as shipped: no background predicted (no scene holds any; without
    issue 23's switches background is predicted, IoU 0, nanmean 0.897), and the tail above floors a little under
    what it measures (nanmean 0.915, the 5th-worst class 0.55, 10% of the classes under 0.70). The worst classes
    themselves are 0.00 here (so a floor on them would be 0): three things the pre-filter misses in the one scene
    that holds each."""
    protos = protos_of(ALL)
    rng = np.random.default_rng(31337)
    scenes = [toy.make_scene(NAMES, KINDS, np.random.default_rng(rng.integers(2 ** 63)), 128) for _ in range(24)]
    s = segmenter(protos)
    lut = np.array([0] + [NAMES.index(n) + 1 for n in s.bank.names])
    conf = sum(evaluate.confusion(lab, lut[s.segment(img).labels], len(NAMES) + 1) for img, lab in scenes)
    m, mn, iou = evaluate.miou(conf)
    seen = np.sort(iou[np.isfinite(iou)])
    under = float((seen < 0.70).mean())
    worst = sorted(zip(seen.round(3), np.array(["background"] + NAMES)[np.isfinite(iou)]))[:6]
    assert np.isnan(iou[0]), worst  # no scene holds background, and none is predicted
    assert mn >= 0.90 and seen[4] >= 0.50 and under <= 0.16, (mn, under, worst)


# ----------------------------------------------------------------- issue 27: recall past the pre-filter

THREE_CIRCLES = [("red circle", "thing"), ("blue circle", "thing"), ("yellow circle", "thing"),
                 ("red ring", "thing"), ("blue square", "thing"), ("green grain", "stuff")]


def circles_image(colours=("red", "blue", "yellow"), seed: int = 0) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    """Flat circles of the given colours (radius 20 px, far apart) on plain grey, 128 px; their masks by name."""
    rng = np.random.default_rng(seed)
    img = np.full((128, 128, 3), 128.0)
    masks = {}
    for (cy, cx), colour in zip([(32, 32), (32, 96), (94, 64)], colours):
        cov = toy.shape_coverage("circle", 128, 128, cy, cx, 20, 0.0)
        img = img * (1 - cov[..., None]) + np.array(toy.COLOURS[colour], float) * cov[..., None]
        masks[f"{colour} circle"] = cov >= 0.5
    return toy.finish(img, rng), masks


def test_thing_proposals_recover_a_circle_the_classifier_drops():
    """Three circles, the pre-filter allowed two candidates (`max_candidates: 2`): it drops one circle, whose pixels
    go to others. With `thing_proposals` the prototypes propose its region and the classifier, shown the region's
    crop, names it: it is kept and labelled. The ablation name turns the switch off again."""
    img, masks = circles_image()
    protos = protos_of(THREE_CIRCLES)
    off = segmenter(protos, max_candidates=2, thing_proposals=0)
    on = segmenter(protos, max_candidates=2, thing_proposals=3)
    res_off, res_on = off.segment(img), on.segment(img)
    things_off = [k for k in res_off.kept if k.endswith("circle")]
    assert len(things_off) == 2  # the pre-filter keeps two of the three
    dropped = next(n for n in masks if n not in things_off)
    value = on.bank.index(dropped) + 1
    assert (res_off.labels[masks[dropped]] == value).mean() == 0
    assert dropped in res_on.kept and set(res_on.kept) >= set(things_off)
    assert (res_on.labels[masks[dropped]] == value).mean() > 0.9
    for name in things_off:  # the kept circles keep their pixels
        assert (res_on.labels[masks[name]] == on.bank.index(name) + 1).mean() > 0.9
    assert "red ring" not in res_on.kept and "blue square" not in res_on.kept  # nothing the image does not hold
    assert np.array_equal(on.segment(img, ablate=["no_thing_proposals"]).labels, res_off.labels)


def test_thing_proposals_add_nothing_where_the_pre_filter_missed_nothing():
    """Two circles, both kept by the pre-filter: the proposals find nothing to add, and the labels are those
    without the switch."""
    img, masks = circles_image(("red", "blue"))
    protos = protos_of(THREE_CIRCLES)
    off = segmenter(protos, max_candidates=2, thing_proposals=0)
    on = segmenter(protos, max_candidates=2, thing_proposals=3)
    res_off, res_on = off.segment(img), on.segment(img)
    assert sorted(k for k in res_off.kept if on.bank.kinds[on.bank.index(k)] == "thing") == sorted(masks)
    assert res_on.kept == res_off.kept and np.array_equal(res_on.labels, res_off.labels)


def test_proposals_vote_and_region_box_by_hand():
    from ovdiff_ray.proposals import propose, region_box

    # 10 cells, 4 classes (0, 1 things; 2 stuff; 3 a thing not asked); -2 = retrieved by no extractor
    total = np.full((10, 4), -2.0, np.float32)
    total[:6, 2] = 1.0  # stuff wins 6 cells
    total[6:9, 1] = 1.5  # thing 1 wins 3 cells
    total[9, 0] = 0.5  # thing 0 wins 1 cell
    total[:, 3] = 3.0  # not asked: never proposed, never wins
    assert propose(total, [0, 1, 2], [], [0, 1], 0.1, 5, floor=-2.0) == [1, 0]
    assert propose(total, [0, 1, 2], [], [0, 1], 0.2, 5, floor=-2.0) == [1]
    assert propose(total, [0, 1, 2], [1], [0, 1], 0.1, 5, floor=-2.0) == [0]  # kept classes are not proposed
    assert propose(total, [0, 1, 2], [], [0, 1], 0.1, 1, floor=-2.0) == [1]  # at most `limit`
    total[9] = -2.0  # a cell no asked class was retrieved for votes for none
    assert propose(total, [0, 1, 2], [], [0, 1], 0.1, 5, floor=-2.0) == [1]
    m = torch.zeros(40, 40, dtype=torch.bool)
    m[10:20, 12:16] = True  # largest part: 10 x 4
    m[35, 35] = True  # a stray pixel
    assert region_box(m, 0.5) == (slice(5, 25), slice(10, 18))  # grown by 5 and 2; 8 px at least: 4 -> 8
    assert region_box(m, 0.0) == (slice(10, 20), slice(10, 18))


def test_thing_proposals_recipes_and_bad_values():
    for name in ("paper", "paper-plus", "toy"):
        d = load_recipe(name).to_dict()
        assert d["segmentation"]["thing_proposals"] == 0, name  # measured, not better on the toy world: off
        d["segmentation"]["thing_proposals"] = 3
        seg = recipe_from_dict(d, "x.yaml").segmentation
        assert Switches.of(seg, (), []).thing_proposals is True
        assert Switches.of(seg, ["no_thing_proposals"], []).thing_proposals is False
    assert "no_thing_proposals" in ABLATIONS
    d = load_recipe("toy").to_dict()
    d["segmentation"]["thing_proposals"] = 65
    with pytest.raises(RecipeError, match="thing_proposals must be in 0..64"):
        recipe_from_dict(d, "bad.yaml")


# ------------------------------------------------------- issue 27: background presence by its margin

def test_background_margin_counts_only_pixels_background_leads_clearly():
    s = torch.zeros(3, 10, 10)
    s[0] = 0.5
    s[1, :5] = 0.49  # background leads by a hair over half the image (a named stuff under another name)
    s[2, 5:7] = 0.2  # ... and clearly over 20%
    s[2, 7:] = 0.9  # class 2 wins the rest
    assert background_present(s, 0.3) and background_present(s, 0.69)  # issue 23's rule: 70% won
    assert not background_present(s, 0.3, margin=0.05)  # only 20% led by >= 0.05
    assert background_present(s, 0.2, margin=0.05) and not background_present(s, 0.2, margin=0.31)
    assert background_present(s[:1], 0.5, margin=0.05)  # nothing else named: background leads everywhere


def test_background_margin_drops_background_that_leads_named_stuff_by_a_hair():
    """Scene 60 of the development draw (a green star on blue checks, both named, no background): the star's
    background prototypes win 5% of the whole view, each pixel by a hair. With `background_min_area` lowered to 2%
    background passes issue 23's rule and takes pixels; counted by its margin it wins none, and is not matched."""
    img, lab = whole_vocab_scene(6000 + 1 + 88, 60)
    protos = protos_of([("green star", "thing"), ("blue checks", "stuff")])
    off = segmenter(protos, background_min_area=0.02, background_margin=0.0)
    on = segmenter(protos, background_min_area=0.02, background_margin=0.05)
    res_off, res_on = off.segment(img), on.segment(img)
    assert (res_off.labels == 0).mean() > 0.02
    assert (res_on.labels == 0).sum() == 0
    assert (res_on.labels[label_of(lab, "blue checks")] == on.bank.index("blue checks") + 1).mean() > 0.97
    assert np.array_equal(on.segment(img, ablate=["no_background_margin"]).labels, res_off.labels)


def test_background_margin_keeps_real_background():
    """Scene 60 of the development draw with only the green star named: the blue checks around it are background
    no named class explains, led by a clear margin; the switch changes no label."""
    img, lab = whole_vocab_scene(6000 + 1 + 88, 60)
    protos = protos_of([("green star", "thing")])
    on = segmenter(protos, background_min_area=0.15, background_margin=0.05)
    off = segmenter(protos, background_min_area=0.15, background_margin=0.0)
    res = on.segment(img)
    assert (res.labels[label_of(lab, "blue checks")] == 0).mean() > 0.9
    assert np.array_equal(res.labels, off.segment(img).labels)


def test_background_margin_recipes_and_bad_values():
    for name in ("paper", "paper-plus", "toy"):
        d = load_recipe(name).to_dict()
        d["segmentation"]["background_min_area"], d["segmentation"]["background_margin"] = 0.15, 0.05
        seg = recipe_from_dict(d, "x.yaml").segmentation
        assert Switches.of(seg, (), []).background_margin is True
        assert Switches.of(seg, ["no_background_margin"], []).background_margin is False
    assert load_recipe("paper").segmentation.background_margin == 0  # the paper has no such rule
    for name in ("paper-plus", "toy"):  # measured better at the whole vocabulary, no change at 10-60 classes
        assert Switches.of(load_recipe(name).segmentation, (), []).background_margin is True, name
    d = load_recipe("toy").to_dict()
    d["segmentation"]["background_margin"] = 1.5
    with pytest.raises(RecipeError, match="background_margin must be in"):
        recipe_from_dict(d, "bad.yaml")
    d["segmentation"]["background_min_area"], d["segmentation"]["background_margin"] = 0.0, 0.05
    with pytest.raises(RecipeError, match="needs background_min_area > 0"):
        recipe_from_dict(d, "bad.yaml")
