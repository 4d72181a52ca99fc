"""Issue 10, quality as the vocabulary grows: each switch on a small constructed case, the bounded subset search
against an exhaustive reference, the confusion summary against hand counts, and a 24-class toy eval with a floor."""
from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch

from ovdiff_ray import evaluate
from ovdiff_ray.models import toy
from ovdiff_ray.prefilter import PreFilter
from ovdiff_ray.recipe import load_recipe
from ovdiff_ray.segment import ABLATIONS, Segmenter, Switches
from ovdiff_ray.store.bank import Bank

# blue star's typical background is yellow checks; yellow dots shares its colour only; green stripes is elsewhere
CASE = [("blue star", "thing"), ("green triangle", "thing"), ("yellow dots", "stuff"), ("green stripes", "stuff")]


def sample(names_kinds):
    from ovdiff_ray.sample import SamplingModels, sample_class

    recipe = load_recipe("toy")
    models = SamplingModels.load(recipe, "cpu")
    return [sample_class(n, recipe, models, kind=k) for n, k in names_kinds]


@pytest.fixture(scope="module")
def case_protos():
    return sample(CASE)


def segmenter(protos, **seg) -> Segmenter:
    recipe = load_recipe("toy")
    for k, v in seg.items():
        setattr(recipe.segmentation, k, v)
    return Segmenter.from_bank(Bank.from_prototypes(protos, recipe), "cpu")


def scene(stuff_region: str | None = None, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """A blue star on its typical background (yellow checks), optionally with a half of `stuff_region`.
    Labels: 0 background, 1 blue star, 2 the stuff region."""
    rng = np.random.default_rng(seed)
    s = 128
    img = toy.texture_field(toy.typical_background("blue star"), s, s, rng)
    lab = np.zeros((s, s), np.uint8)
    if stuff_region:
        c = toy.parse_name(stuff_region)
        img[:, : s // 2] = toy.texture_field(c, s, s, rng)[:, : s // 2]
        lab[:, : s // 2] = 2
    cov = toy.shape_coverage("star", s, s, 64, 90, 24, 0.3)
    img = img * (1 - cov[..., None]) + toy.object_layer(toy.ToyClass("blue", "star"), s, s, rng) * cov[..., None]
    lab[cov >= 0.5] = 1
    return toy.finish(img, rng), lab


def bg_accuracy(res, lab, seg) -> float:
    return float((res.labels[lab == 0] == 0).mean())


# ----------------------------------------------------------------------------------------- stuff filter rule

def test_self_stuff_filter_keeps_backgrounds_that_only_share_the_stuff_colour(case_protos):
    """Paper rule (cosine > 0.85): yellow dots removes blue star's yellow-checks background prototypes, and the
    background goes to yellow dots; the `self` rule removes none of them, and the background stays."""
    fixed = segmenter(case_protos, stuff_filter_rule="fixed", stuff_min_area=0.0)
    own = segmenter(case_protos, stuff_filter_rule="self", stuff_min_area=0.0)
    ids = fixed.resolve(["blue star", "yellow dots"])
    sw_fixed = Switches.of(fixed.seg, (), list(fixed.extractors))
    sw_self = Switches.of(own.seg, (), list(own.extractors))
    assert not sw_fixed.stuff_filter_self and sw_self.stuff_filter_self
    none = fixed.gather("toy", ids, Switches(stuff_filter=False)).n_bg
    assert fixed.gather("toy", ids, sw_fixed).n_bg < 0.5 * none
    assert own.gather("toy", ids, sw_self).n_bg == none
    img, lab = scene()
    classes = ["blue star", "yellow dots"]
    assert bg_accuracy(own.segment(img, classes), lab, own) > bg_accuracy(fixed.segment(img, classes), lab, fixed) + 0.2
    assert bg_accuracy(own.segment(img, classes), lab, own) > 0.9
    # the ablation name turns the switch off again
    assert own.segment(img, classes, ablate=["no_stuff_filter_self"]).labels.tolist() == \
        fixed.segment(img, classes).labels.tolist()


def test_both_stuff_filter_rules_against_a_plain_loop(case_protos):
    """Kept background rows = the kept things' bg rows whose cosine to every kept stuff fg row is <= 0.85 (paper),
    or below each stuff class's own threshold (self: min over its instance prototypes of the cosine to its class
    prototype), counted row by row."""
    for rule in ("fixed", "self"):
        seg = segmenter(case_protos, stuff_filter_rule=rule)
        a = seg.bank.extractors["toy"]
        ids = seg.resolve(None)
        want = 0
        for t in ids:
            if seg.bank.kinds[t] == "stuff":
                continue
            r = range(a.offsets[t], a.offsets[t + 1])
            for i in (i for i in r if a.kind[i] == 1):
                b = a.vectors[i].astype(np.float64)
                keep = True
                for s_ in (s_ for s_ in ids if seg.bank.kinds[s_] == "stuff"):
                    rows = [j for j in range(a.offsets[s_], a.offsets[s_ + 1]) if a.kind[j] == 0]
                    cls = [j for j in rows if a.level[j] == 0][0]
                    thr = 0.85
                    if rule == "self":
                        thr = min(float(a.vectors[j].astype(np.float64) @ a.vectors[cls].astype(np.float64))
                                  for j in rows if a.level[j] == 1)
                    for j in rows:
                        c = float(b @ a.vectors[j].astype(np.float64))
                        if (c > thr) if rule == "fixed" else (c >= thr - 1e-6):
                            keep = False
                want += keep
        sw = Switches.of(seg.seg, (), list(seg.extractors))
        assert abs(seg.gather("toy", ids, sw).n_bg - want) <= 1, rule  # fp16 vs fp64 rounding at the threshold


def test_self_stuff_filter_still_drops_a_background_that_is_the_stuff():
    """yellow cross's typical background is green stripes: with that stuff kept, both rules drop most of it."""
    protos = sample([("yellow cross", "thing"), ("green stripes", "stuff")])
    for rule in ("fixed", "self"):
        seg = segmenter(protos, stuff_filter_rule=rule)
        ids = seg.resolve(None)
        sw = Switches.of(seg.seg, (), list(seg.extractors))
        assert seg.gather("toy", ids, sw).n_bg < 0.5 * seg.gather("toy", ids, Switches(stuff_filter=False)).n_bg


# ---------------------------------------------------------------------------------------------- stuff presence

def test_stuff_presence_drops_absent_stuff_and_keeps_present_stuff(case_protos):
    seg = segmenter(case_protos, stuff_filter_rule="self", stuff_min_area=0.05)
    img, lab = scene()
    res = seg.segment(img)
    assert "blue star" in res.kept and not {"yellow dots", "green stripes"} & set(res.kept)
    paper = seg.segment(img, ablate=["no_stuff_presence"])
    assert {"yellow dots", "green stripes"} <= set(paper.kept)
    img2, lab2 = scene("green stripes", seed=1)
    res2 = seg.segment(img2)
    assert "green stripes" in res2.kept and "yellow dots" not in res2.kept
    stuff = seg.bank.index("green stripes") + 1
    assert (res2.labels[lab2 == 2] == stuff).mean() > 0.8
    # dropping absent stuff never costs the present pixels: the result is at least as right as the paper's
    right = lambda r, lb: (np.array([0, seg.bank.index("blue star") + 1, stuff])[lb] == r.labels).mean()  # noqa
    assert right(res, lab) >= right(paper, lab) and right(res2, lab2) >= right(seg.segment(
        img2, ablate=["no_stuff_presence"]), lab2) - 0.01


def test_stuff_presence_costs_no_extra_feature_pass(case_protos):
    """The check's whole-image features are reused for the whole-image view."""
    seg = segmenter(case_protos, stuff_filter_rule="self", stuff_min_area=0.05)
    calls: list[int] = []
    orig = dict(seg.extractors)

    class Counting:
        def __init__(self, e):
            self.e = e

        def __getattr__(self, k):
            return getattr(self.e, k)

        def __call__(self, x):
            calls.append(len(x))
            return self.e(x)

    seg.extractors = {k: Counting(e) for k, e in orig.items()}
    img, _ = scene()
    seg.segment(img)
    with_check = sum(calls)
    calls.clear()
    seg.segment(img, ablate=["no_stuff_presence"])
    assert with_check == sum(calls) > 0


# ----------------------------------------------------------------------------------------- bounded subset search

def reference_best_subset(cands, prompt_of, encode, e):
    """Plain loop over bitmasks, smallest subsets first, first maximum wins."""
    best, best_score = None, -np.inf
    subsets = []
    for size in range(1, len(cands) + 1):
        for mask in range(1, 2 ** len(cands)):
            members = tuple(c for j, c in enumerate(cands) if mask >> j & 1)
            if len(members) == size:
                subsets.append(members)
    subsets.sort(key=lambda s: (len(s), s))
    for s in subsets:
        score = float(encode([prompt_of(s)])[0] @ e)
        if score > best_score:
            best, best_score = s, score
    return best


def toy_prefilter(n_things: int, how: str, upto: int = 4, beam: int = 4):
    names = [f"{c} {s}" for c in toy.COLOURS for s in toy.SHAPES][:n_things]
    recipe = load_recipe("toy")
    recipe.segmentation.subset_search, recipe.segmentation.subset_exhaustive_upto = how, upto
    recipe.segmentation.subset_beam = beam
    clf = toy.ToyClassifier(recipe.classifier)
    text = clf.encode_text([recipe.classifier.text_template.format(name=n) for n in names])
    bank = Bank("pf", 0, recipe, names, ["thing"] * len(names), text, {})
    return PreFilter(bank, clf), clf


@pytest.mark.parametrize("how", ["greedy", "beam"])
def test_bounded_search_equals_exhaustive_when_candidates_are_few(how):
    rng = np.random.default_rng(0)
    pf, clf = toy_prefilter(12, how)
    for n in (1, 2, 3, 4):
        for _ in range(5):
            cands = sorted(rng.choice(12, n, replace=False).tolist())
            e = rng.standard_normal(clf.dim).astype(np.float32)
            e /= np.linalg.norm(e)
            want = reference_best_subset(cands, pf.prompt, clf.encode_text, e)
            assert pf.search(cands, e) == want == pf.search(cands, e, "exhaustive")


def test_bounded_search_finds_the_exhaustive_answer_on_toy_images_with_far_fewer_prompts():
    """10 candidates (1023 subsets): on images of 1-3 toy objects the beam search keeps what the exhaustive search
    keeps while scoring under a tenth of the prompts."""
    things = [(f"{c} {s}", "thing") for c in toy.COLOURS for s in toy.SHAPES]
    exh, clf = toy_prefilter(48, "exhaustive")
    bnd, _ = toy_prefilter(48, "beam")
    rng = np.random.default_rng(5)
    same = 0
    for k in range(8):
        img, _ = toy.make_scene([n for n, _ in things], ["thing"] * 48, np.random.default_rng(rng.integers(1 << 30)))
        x = torch.from_numpy(img).permute(2, 0, 1).float() / 255
        e = exh.image_embeddings([x])[0]
        cands = sorted(np.argsort(-(exh.bank.text @ e))[:10].tolist())
        same += exh.search(cands, e) == bnd.search(cands, e)
    assert same == 8
    assert exh.prompts_scored == 8 * 1023 and bnd.prompts_scored < exh.prompts_scored / 10


# --------------------------------------------------------------------------------------------- recipes, names

def test_recipes_paper_off_toy_and_paper_plus_on():
    paper, plus, toy_r = load_recipe("paper"), load_recipe("paper-plus"), load_recipe("toy")
    for r, on in ((paper, False), (plus, True), (toy_r, True)):
        sw = Switches.of(r.segmentation, (), [])
        assert (sw.stuff_filter_self, sw.stuff_presence, sw.bounded_search) == (on, on, on), r.name
    a, b = paper.to_dict(), plus.to_dict()
    assert {k for k in a if a[k] != b[k]} == {"name", "segmentation"}
    assert {k for k in a["segmentation"] if a["segmentation"][k] != b["segmentation"][k]} == {
        "subset_search", "stuff_filter_rule", "stuff_min_area", "regions", "superpixels",  # issue 10's and 11's
        "stuff_opening", "background_min_area",  # issue 23's
        "background_margin"}  # issue 27's
    for name in ("no_stuff_filter_self", "no_stuff_presence", "no_bounded_search"):
        assert name in ABLATIONS
        assert getattr(Switches.of(plus.segmentation, [name], []), name[3:]) is False


# ------------------------------------------------------------------------------------------ confusion summary

def test_confusion_summary_against_hand_counts():
    classes = ["background", "a", "b"]
    conf = np.array([[50, 30, 20], [10, 40, 0], [0, 5, 0]])
    s = evaluate.confusion_summary(conf, classes, top=3)
    assert s["top"] == [{"true": "background", "predicted": "a", "pixels": 30},
                        {"true": "background", "predicted": "b", "pixels": 20},
                        {"true": "a", "predicted": "background", "pixels": 10}]
    assert s["per_class"]["a"] == {"pixels": 50, "to_background": 0.2, "to_classes": {}}
    assert s["per_class"]["b"] == {"pixels": 5, "to_background": 0.0, "to_classes": {"a": 1.0}}
    assert s["per_class"]["background"]["to_classes"] == {"a": 0.3, "b": 0.2}
    table = evaluate.format_confusions(conf, classes, 2)
    assert "background" in table and "30" in table and "30.0%" in table and "10" not in table.split("\n")[-1]


# -------------------------------------------------------------------------------------------- 24-class toy eval

VOCAB24 = ([(f"{c} {s}", "thing") for c, s in itertools.product(["red", "green", "blue", "yellow", "purple"],
                                                                   ["circle", "square", "star", "cross"])]
           + [("orange stripes", "stuff"), ("cyan dots", "stuff"), ("magenta waves", "stuff"), ("blue grain", "stuff")])


def test_toy_eval_at_24_classes_holds_a_floor():
    """20 things + 4 stuff, 16 scenes not used in development: the toy recipe (issue-10 switches on) above a floor
    a little under what it measures (nanmean 0.927, mIoU with absent classes as 0 0.742, background 0.967)."""
    protos = sample(VOCAB24)
    names, kinds = [n for n, _ in VOCAB24], [k for _, k in VOCAB24]
    rng = np.random.default_rng(2024)
    scenes = [toy.make_scene(names, kinds, np.random.default_rng(rng.integers(1 << 62)), 128) for _ in range(16)]

    def run(**seg):
        s = segmenter(protos, **seg)
        lut = np.array([0] + [names.index(n) + 1 for n in s.bank.names])
        conf = sum(evaluate.confusion(lab, lut[s.segment(img).labels], 25) for img, lab in scenes)
        return evaluate.miou(conf)

    m, mn, iou = run()
    assert mn >= 0.90 and m >= 0.71 and iou[0] >= 0.94, (m, mn, iou[0])
