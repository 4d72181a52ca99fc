"""The fit calibration (issue 28, ovdiff_ray/confidence.py): recorded per class at build time from how the class's own
support images match its prototypes, stored with the shard, read back with the bank (also through the node-shared
cache), used by the segmenter; and the noisy-feature world (ovdiff_ray/models/noisy.py) at small size, where the raw
formula marks nearly every pixel unsure and the calibrated confidence does not."""
from __future__ import annotations

import copy
import json

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from ovdiff_ray import confidence
from ovdiff_ray.models import toy
from ovdiff_ray.models.noisy import NoisyExtractor, noisy_extractors
from ovdiff_ray.recipe import load_recipe
from ovdiff_ray.sample import SamplingModels, sample_class
from ovdiff_ray.segment import Segmenter
from ovdiff_ray.store import Location, ShardError, commit_manifest, load_bank, new_manifest, write_shard
from ovdiff_ray.store.bank import Bank

VOCAB = [("red circle", "thing"), ("blue star", "thing"), ("green ring", "thing"), ("yellow square", "thing"),
         ("orange stripes", "stuff"), ("cyan grain", "stuff")]


def small_recipe():
    r = load_recipe("toy")
    r.generation.n_images = 8
    r.generation.batch_size = 8
    # issue 27's background_margin (on in toy.yaml) counts background only where it leads clearly; in the noisy
    # world background leads by little, so with it on the calibrated unsure share rises to ~0.42 (measured at the
    # merge): this file checks the calibration, so the presence rule is pinned to the one it was measured with
    r.segmentation.background_margin = 0.0
    return r


@pytest.fixture(scope="module")
def worlds():
    """The small vocabulary built in the clean and in the noisy world (in memory, no Ray)."""
    torch.manual_seed(0)
    recipe = small_recipe()
    out = {}
    for world in ("clean", "noisy"):
        models = SamplingModels.load(recipe, "cpu")
        if world == "noisy":
            models.extractors = noisy_extractors(models.extractors)
        out[world] = (recipe, models, [sample_class(n, recipe, models, kind=k) for n, k in VOCAB])
    return out


def plain_nearest(pixels: np.ndarray, rows: np.ndarray) -> np.ndarray:
    out = []
    for p in pixels:
        best = max(float(np.dot(p, r)) for r in rows)
        out.append(best / max(float(np.linalg.norm(p)), 1e-12))
    return np.array(out)


def test_fit_calibration_matches_plain_loops():
    g = np.random.default_rng(3)
    fg = g.standard_normal((40, 5)) + 1.0
    bg = g.standard_normal((30, 5)) - 1.0
    fg_img = np.repeat(np.arange(4), 10)
    bg_img = np.repeat([0, 2, 3], 10)
    vec = g.standard_normal((6, 5))
    vec /= np.linalg.norm(vec, axis=1, keepdims=True)
    is_fg = np.array([True, True, True, False, False, True])
    rec = confidence.fit_calibration(torch.tensor(fg), torch.tensor(fg_img), torch.tensor(bg), torch.tensor(bg_img),
                                     torch.tensor(vec), torch.tensor(is_fg))
    q = list(confidence.CAL_QUANTILES)
    ff, bb = plain_nearest(fg, vec[is_fg]), plain_nearest(bg, vec[~is_fg])
    want = {"fg": ff, "fg_image": [ff[fg_img == i].mean() for i in range(4)], "fg_other": plain_nearest(bg, vec[is_fg]),
            "bg": bb, "bg_image": [bb[bg_img == i].mean() for i in (0, 2, 3)], "bg_other": plain_nearest(fg, vec[~is_fg])}
    assert rec["quantiles"] == q and set(rec) == {"quantiles", *confidence.CAL_FIELDS}
    for k, v in want.items():
        np.testing.assert_allclose(rec[k], np.quantile(v, q), atol=1e-4, err_msg=k)
    # a class without background pixels gets no record
    assert confidence.fit_calibration(torch.tensor(fg), torch.tensor(fg_img), torch.zeros(0, 5),
                                      torch.zeros(0, dtype=torch.long), torch.tensor(vec), torch.tensor(is_fg)) is None


def test_the_fit_is_measured_against_the_banks_own_fit():
    # a label that fits its pixels as the bank's own support images fit theirs is sure, in any feature space
    raw = torch.zeros(3, 2, 2)
    raw[1, :, :1], raw[2, :, 1:] = 0.5, 0.25
    final = torch.zeros(3, 2, 2)
    final[1, :, :1], final[2, :, 1:] = 1.0, 1.0
    got = confidence.pixel_confidence(raw, final, 0.5)
    assert got[:, 0].tolist() == pytest.approx([1.0, 1.0])
    assert got[:, 1].tolist() == pytest.approx([0.5 ** confidence.FIT_POWER] * 2)
    assert float(confidence.pixel_confidence(raw, final).max()) < 0.01  # the raw formula: 0.5 ** 8
    # the scale of the same fits on toy-like features keeps the raw ranking (a monotone map of the fit)
    a, b = confidence.pixel_confidence(raw, final, 0.99), confidence.pixel_confidence(raw, final)
    assert (a >= b).all() and torch.equal(a.flatten().argsort(), b.flatten().argsort())


def test_calibration_is_stored_with_the_shard_and_read_back(worlds, tmp_path):
    recipe, _, protos = worlds["clean"]
    for p in protos:
        for ex, s in p.sets.items():
            assert s.calibration is not None, (p.name, ex)
            fg = s.calibration["fg"]
            assert fg == sorted(fg) and 0.5 < fg[3] <= 1.0  # toy features match their own class closely
    old = copy.deepcopy(protos[1])
    for s in old.sets.values():
        s.calibration = None  # a shard written before the record
    loc = Location(str(tmp_path / "bank"))
    entries = [write_shard(loc, p, i).to_entry() for i, p in enumerate([protos[0], old, protos[2]])]
    commit_manifest(loc, new_manifest("cal", 1, recipe.to_dict(), entries))
    meta = pq.read_schema(tmp_path / "bank" / entries[0]["shard"]).metadata
    assert json.loads(meta[confidence.CAL_KEY])["toy"] == protos[0].sets["toy"].calibration
    assert confidence.CAL_KEY not in (pq.read_schema(tmp_path / "bank" / entries[1]["shard"]).metadata or {})

    bank = load_bank(str(tmp_path / "bank"))
    mem = Bank.from_prototypes([protos[0], old, protos[2]], recipe)
    for ex in ("toy", "toyctx"):
        cal = bank.extractors[ex].calibration
        assert cal.shape == (3, len(confidence.CAL_FIELDS), len(confidence.CAL_QUANTILES))
        np.testing.assert_allclose(cal[0], confidence.calibration_array(protos[0].sets[ex].calibration))
        assert np.isnan(cal[1]).all() and not np.isnan(cal[[0, 2]]).any()
        np.testing.assert_array_equal(cal, mem.extractors[ex].calibration)
    # the scale: over the classes with a record, the median fg pixel cosine, averaged over the extractors used
    med = confidence.CAL_QUANTILES.index(0.5)
    fi = confidence.CAL_FIELDS.index("fg")
    per = {ex: np.mean([protos[c].sets[ex].calibration["fg"][med] for c in (0, 2)]) for ex in ("toy", "toyctx")}
    assert confidence.fit_scale(bank, ["toy", "toyctx"]) == pytest.approx((per["toy"] + per["toyctx"]) / 2, abs=1e-5)
    assert confidence.fit_scale(bank, ["toy"]) == pytest.approx(np.nanmean(bank.extractors["toy"].calibration[:, fi, med]))
    bare = Bank.from_prototypes([old], recipe)
    assert confidence.fit_scale(bare, ["toy"]) is None  # a bank from before the record: the raw formula

    from ovdiff_ray.store.shared import load_shared

    shared = load_shared(str(tmp_path / "bank"))
    np.testing.assert_array_equal(shared.extractors["toy"].calibration, bank.extractors["toy"].calibration)


def test_a_record_that_does_not_parse_is_a_shard_error(worlds, tmp_path):
    recipe, _, protos = worlds["clean"]
    bad = copy.deepcopy(protos[0])
    bad.sets["toy"].calibration = {"quantiles": [0.5], "fg": [0.9]}
    loc = Location(str(tmp_path / "bank"))
    commit_manifest(loc, new_manifest("cal", 1, recipe.to_dict(), [write_shard(loc, bad, 0).to_entry()]))
    with pytest.raises(ShardError, match="fit calibration of class 'red circle' does not parse: .*quantiles"):
        load_bank(str(tmp_path / "bank"))


def scenes(n: int, seed: int):
    names, kinds = [v[0] for v in VOCAB], [v[1] for v in VOCAB]
    rng = np.random.default_rng(seed)
    return [toy.make_scene(names, kinds, np.random.default_rng(rng.integers(2 ** 63)), 128) for _ in range(n)]


def test_noisy_extractor_appends_independent_noise_deterministically():
    recipe = small_recipe()
    inner = SamplingModels.load(recipe, "cpu").extractors[0]
    ex = NoisyExtractor(inner, extra=16, sigma=0.5)
    x = torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    f = ex(x)
    assert f.shape[1] == inner.dim + 16 and ex.dim == inner.dim + 16
    torch.testing.assert_close(f[:, :inner.dim], inner(x))
    torch.testing.assert_close(ex(x[1:]), f[1:])  # an image's noise does not depend on its batch
    assert not torch.equal(f[0, inner.dim:], f[1, inner.dim:])
    assert abs(float(f[:, inner.dim:].std()) - 0.5) < 0.05


def test_noisy_world_the_raw_formula_is_all_unsure_the_calibrated_one_is_not(worlds):
    imgs = scenes(5, 11)
    shares, cos = {}, {}
    for world in ("clean", "noisy"):
        recipe, models, protos = worlds[world]
        bare = copy.deepcopy(protos)
        for p in bare:
            for s in p.sets.values():
                s.calibration = None
        runs = {}
        for key, ps in (("calibrated", protos), ("raw", bare)):
            bank = Bank.from_prototypes(ps, recipe)
            seg = Segmenter(bank, models.extractors, models.classifier, "cpu")
            runs[key] = [seg.segment(img) for img, _ in imgs]
        for key, res in runs.items():
            valid = np.concatenate([(gt != 255).ravel() for _, gt in imgs])
            conf = np.concatenate([r.confidence.ravel() for r in res])
            shares[world, key] = float((conf[valid] < 0.5).mean())
        # the record changes the confidence only, never the labels
        for a, b in zip(runs["calibrated"], runs["raw"]):
            np.testing.assert_array_equal(a.labels, b.labels)
        med = confidence.CAL_QUANTILES.index(0.5)
        cos[world] = float(np.mean([s.calibration["fg"][med] for p in protos for s in p.sets.values()]))
    assert cos["clean"] > 0.85 and 0.25 < cos["noisy"] < 0.65, cos  # the noisy world matches as real features do
    assert shares["noisy", "raw"] > 0.95, shares  # top * fit ** 8 with fit ~0.5: every pixel unsure
    assert shares["noisy", "calibrated"] < 0.3 and shares["clean", "calibrated"] < 0.3, shares
    assert abs(shares["noisy", "calibrated"] - shares["clean", "calibrated"]) < 0.15, shares


def test_background_a_stuff_class_contests_is_not_confident():
    final = torch.zeros(3, 4, 4)
    final[0, :, :2] = 1.0  # left half labelled background (e.g. by snapping), right half class 1
    final[1, :, 2:] = 1.0
    raw = torch.zeros(3, 4, 4)
    raw[0, :, :2] = 0.9
    raw[1, :, 2:] = 0.95
    raw[2, :, :2] = 0.8  # row 2, a stuff class, matches the background region worse: not contested
    stuff = torch.tensor([False, False, True])
    calm = confidence.pixel_confidence(raw, final, None, stuff)
    torch.testing.assert_close(calm, confidence.pixel_confidence(raw, final))
    raw[2, :, :2] = 0.92  # now the stuff class matches it better on average
    assert confidence.contested_background(raw, final.argmax(0), stuff)
    c = confidence.pixel_confidence(raw, final, None, stuff)
    assert float(c[:, :2].max()) == 0.0
    torch.testing.assert_close(c[:, 2:], calm[:, 2:])  # other labels keep their confidence
    # a thing class that matches it better is no contest (things compete through the labels themselves)
    assert not confidence.contested_background(raw, final.argmax(0), torch.tensor([False, True, False]))
