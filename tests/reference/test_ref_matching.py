"""Matching, view ensemble and background (OVDIFF.md 6.3-6.7, issue 12 point 6) against plain loops: sliding
windows + the whole image, per view cosine to every prototype, class = max over its fg rows, background = max over
the kept things' bg rows (stuff-filtered; -1 when none are left), bilinear to the view, clamp, mean over views and
extractors, scores <= 0 -> 0, argmax with ties to the first (background)."""
from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from ovdiff_ray.prototypes import ClassPrototypes, ProtoSet
from ovdiff_ray.recipe import ExtractorConfig, load_recipe
from ovdiff_ray.segment import Segmenter
from ovdiff_ray.store.bank import Bank


class StubExtractor:
    """Fixed features: 4 x 4 average pooling, then a fixed linear map of the colours (+ bias) -> `[B, D, H/4, W/4]`."""

    stride, view_size = 4, 0

    def __init__(self, name: str, dim: int, seed: int):
        g = torch.Generator().manual_seed(seed)
        self.name, self.dim = name, dim
        self.w = torch.randn(dim, 3, generator=g)
        self.b = torch.randn(dim, generator=g) * 0.3

    def __call__(self, x):
        p = F.avg_pool2d(x.float(), 4)
        return torch.einsum("dc,bchw->bdhw", self.w, p) + self.b[None, :, None, None]


def unit(v):
    v = np.asarray(v, np.float32)
    return v / np.linalg.norm(v, axis=-1, keepdims=True)


def ref_views(h, w, windows, whole=True):
    out = []
    for size, stride in windows:
        ys = list(range(0, h - size + 1, stride)) if size < h else [0]
        xs = list(range(0, w - size + 1, stride)) if size < w else [0]
        if size < h and ys[-1] != h - size:
            ys.append(h - size)
        if size < w and xs[-1] != w - size:
            xs.append(w - size)
        for y in ys:
            for x in xs:
                v = (y, x, min(size, h), min(size, w))
                if v not in out:
                    out.append(v)
    if whole and (0, 0, h, w) not in out:
        out.append((0, 0, h, w))
    return out


def ref_segment(img: np.ndarray, protos: list[ClassPrototypes], kept: list[int], extractors, recipe):
    x = torch.from_numpy(img).permute(2, 0, 1).float() / 255
    h, w = x.shape[-2:]
    assert min(h, w) == recipe.segmentation.short_side  # no resize in these tests
    acc = np.zeros((len(kept) + 1, h, w))
    count = np.zeros((h, w))
    stuff_th = recipe.segmentation.stuff_threshold
    for ex in extractors:
        fg = [protos[c].sets[ex.name].select("fg") for c in kept]
        stuff_fg = [protos[c].sets[ex.name].select("fg") for c in kept if protos[c].kind == "stuff"]
        bg = []
        for c in kept:
            if protos[c].kind == "stuff":
                continue
            for row in protos[c].sets[ex.name].select("bg"):
                if all(float(np.dot(row, s)) <= stuff_th for sf in stuff_fg for s in sf):
                    bg.append(row)
        for (y0, x0, vh, vw) in ref_views(h, w, recipe.segmentation.windows):
            f = ex(x[None, :, y0:y0 + vh, x0:x0 + vw])[0].numpy()  # [D, gh, gw]
            gh, gw = f.shape[1:]
            s = np.zeros((len(kept) + 1, gh, gw))
            for i in range(gh):
                for j in range(gw):
                    v = f[:, i, j] / np.linalg.norm(f[:, i, j])
                    s[0, i, j] = max((float(np.dot(r, v)) for r in bg), default=-1.0)
                    for k in range(len(kept)):
                        s[k + 1, i, j] = max(float(np.dot(r, v)) for r in fg[k])
            up = F.interpolate(torch.from_numpy(s)[None], size=(vh, vw), mode="bilinear", align_corners=False)[0]
            acc[:, y0:y0 + vh, x0:x0 + vw] += up.clamp(-1, 1).numpy()
            count[y0:y0 + vh, x0:x0 + vw] += 1
    scores = np.maximum(acc / count, 0)
    labels = np.array([0] + [c + 1 for c in kept])[np.argmax(scores, 0)]  # first maximum: background on ties
    return scores, labels


def protoset(rows_fg, rows_bg):
    v = unit(np.concatenate([rows_fg, rows_bg])) if len(rows_bg) else unit(rows_fg)
    v = v.astype(np.float16).astype(np.float32)  # the bank stores fp16: the reference uses the same values
    n_fg, n_bg = len(rows_fg), len(rows_bg)
    return ProtoSet(v, np.array(["fg"] * n_fg + ["bg"] * n_bg, object),
                    np.array(["class"] + ["part"] * (n_fg - 1) + (["class"] + ["part"] * (n_bg - 1) if n_bg else []),
                             object), np.full(n_fg + n_bg, -1, np.int16))


@pytest.fixture(scope="module")
def world():
    recipe = load_recipe("toy")
    recipe.extractors = [ExtractorConfig(name="s1", type="toy"), ExtractorConfig(name="s2", type="toy")]
    recipe.segmentation = dataclasses.replace(recipe.segmentation, short_side=64, windows=[[48, 32]],
                                              regions="none")  # the paper: no region snapping
    exs = [StubExtractor("s1", 6, 1), StubExtractor("s2", 5, 2)]
    rng = np.random.default_rng(3)
    protos = []
    for i in range(4):  # things 0..3; class 2 is an exact copy of class 1 (ties)
        sets = {}
        for ex in exs:
            if i == 2:
                sets[ex.name] = protos[1].sets[ex.name]
                continue
            fg = rng.normal(size=(3, ex.dim))
            if i == 1:  # class 1 (and its copy, class 2) matches the flat red region
                fg[0] = (ex.w @ (torch.tensor([250.0, 20.0, 20.0]) / 255) + ex.b).numpy()
            sets[ex.name] = protoset(fg, rng.normal(size=(2, ex.dim)))
        protos.append(ClassPrototypes(f"thing {i}", "thing", sets, unit(rng.normal(size=8))))
    # class 3's background rows in s2 equal the stuff class's foreground: the stuff filter removes them all
    stuff_sets = {ex.name: protoset(rng.normal(size=(2, ex.dim)), np.zeros((0, ex.dim))) for ex in exs}
    s2_bg = protos[3].sets["s2"].select("bg")
    stuff_sets["s2"] = protoset(s2_bg, np.zeros((0, 5)))
    protos.append(ClassPrototypes("stuff 4", "stuff", stuff_sets, unit(rng.normal(size=8))))
    bank = Bank.from_prototypes(protos, recipe)
    seg = Segmenter(bank, exs, classifier=None, device="cpu")
    img = np.random.default_rng(4)
    return recipe, exs, protos, seg, img


@pytest.mark.parametrize("shape,classes", [((64, 64), None), ((64, 80), [0, 1, 2]), ((64, 64), [3, 4]),
                                           ((80, 64), [3])])
def test_segmentation_matches_reference(world, shape, classes):
    recipe, exs, protos, seg, rng = world
    img = (rng.random((*shape, 3)) * 255).astype(np.uint8)
    img[: shape[0] // 2, : shape[1] // 2] = (250, 20, 20)  # flat regions give large, distinct scores
    names = None if classes is None else [protos[c].name for c in classes]
    res = seg.segment(img, names, ablate=["no_prefilter"], return_scores=True)
    kept = list(range(len(protos))) if classes is None else sorted(classes)
    ref_scores, ref_labels = ref_segment(img, protos, kept, exs, recipe)
    assert res.kept == [protos[c].name for c in kept]
    np.testing.assert_allclose(res.scores, ref_scores, atol=2e-5)
    np.testing.assert_array_equal(res.labels, ref_labels)
    if 1 in kept and 2 in kept:  # an exact copy never wins: ties go to the first class
        assert not (res.labels == 3).any() and (res.labels == 2).any()


def test_no_background_rows_score_minus_one(world):
    """Class 3 with the stuff class kept: s2 has no background rows left, so s2's background is -1 (not 0), and
    the mean over extractors of a background below 1 can not be positive."""
    recipe, exs, protos, seg, rng = world
    img = (rng.random((64, 64, 3)) * 255).astype(np.uint8)
    res = seg.segment(img, ["thing 3", "stuff 4"], ablate=["no_prefilter"], return_scores=True)
    g = seg.gather("s2", [3, 4], __import__("ovdiff_ray.segment", fromlist=["Switches"]).Switches())
    assert g.n_bg == 0
    assert (res.scores[0] == 0).all()  # (bg_s1 + -1) / 2 <= 0 everywhere
    ref_scores, _ = ref_segment(img, protos, [3, 4], exs, recipe)
    np.testing.assert_allclose(res.scores, ref_scores, atol=2e-5)
    off = seg.segment(img, ["thing 3", "stuff 4"], ablate=["no_prefilter", "no_background"], return_scores=True)
    assert (off.scores[0] == 0).all()  # background switched off: 0, as before
