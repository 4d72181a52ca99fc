"""Prototypes against a numpy reference; sample_class determinism; `ovdiff preview`."""
from __future__ import annotations

import copy
from pathlib import Path

import numpy as np
import pytest
import torch

from ovdiff_ray.cli import main as cli_main
from ovdiff_ray.prototypes import build_protoset, kmeans
from ovdiff_ray.recipe import load_recipe
from ovdiff_ray.sample import EmptySupportError, SamplingModels, sample_class


def unit(x: np.ndarray) -> np.ndarray:
    return x / np.linalg.norm(x, axis=-1, keepdims=True)


def test_prototypes_match_numpy_reference():
    rng = np.random.default_rng(0)
    feats = rng.standard_normal((3, 5, 4, 4)).astype(np.float32)  # [N, D, h, w]
    fg = np.zeros((3, 8, 8), bool)
    fg[0, :4, :4] = True  # image 0: cells (0..1, 0..1)
    fg[1, 4:, :] = True  # image 1: bottom half
    fg[2, 0, 0] = True  # image 2: one pixel -> cell (0, 0) counts as inside
    bg = ~fg
    bg[2] = False  # image 2 has no background
    ps = build_protoset(torch.from_numpy(feats), torch.from_numpy(fg), torch.from_numpy(bg), parts=2, iters=30)
    cell = lambda m: m.reshape(3, 4, 2, 4, 2).any((2, 4))  # any coverage of a 2x2 block  # noqa: E731
    pix = feats.transpose(0, 2, 3, 1)  # [N, h, w, D]
    for kind, mask in (("fg", cell(fg)), ("bg", cell(bg))):
        allp = pix[mask]
        np.testing.assert_allclose(ps.select(kind, "class")[0], unit(allp.mean(0)), atol=1e-5)
        inst = [unit(pix[i][mask[i]].mean(0)) for i in range(3) if mask[i].any()]
        np.testing.assert_allclose(ps.select(kind, "instance"), np.stack(inst), atol=1e-5)
        assert list(ps.source[(ps.kind == kind) & (ps.level == "instance")]) == [i for i in range(3) if mask[i].any()]
        # parts: a k-means fixed point -- every centroid is the mean of the pixels nearest to it
        parts = ps.select(kind, "part")
        assert len(parts) == 2
        raw = kmeans(torch.from_numpy(allp), 2, iters=30).numpy()
        assign = ((allp[:, None] - raw[None]) ** 2).sum(-1).argmin(1)
        for k in range(2):
            np.testing.assert_allclose(raw[k], allp[assign == k].mean(0), atol=1e-4)
        np.testing.assert_allclose(parts, unit(raw), atol=1e-5)
    assert np.allclose(np.linalg.norm(ps.vectors, axis=1), 1, atol=1e-5)


def test_non_finite_pixels_are_dropped():
    feats = torch.ones(1, 3, 2, 2)
    feats[0, :, 0, 0] = float("nan")
    fg = torch.ones(1, 2, 2, dtype=torch.bool)
    ps = build_protoset(feats, fg, torch.zeros_like(fg), parts=0)
    assert np.isfinite(ps.vectors).all() and len(ps) == 2  # class + instance, no bg rows
    np.testing.assert_allclose(ps.vectors[0], np.ones(3) / np.sqrt(3), atol=1e-6)


@pytest.fixture(scope="module")
def toy():
    r = load_recipe("toy")
    return r, SamplingModels.load(r, "cpu")


def test_sample_class_is_deterministic_and_batch_independent(toy):
    recipe, models = toy
    r1, r4 = copy.deepcopy(recipe), copy.deepcopy(recipe)
    r1.generation.batch_size, r4.generation.batch_size = 1, 4
    a, b = sample_class("red circle", r1, models), sample_class("red circle", r4, models)
    assert set(a.sets) == {e.name for e in recipe.extractors}
    for ex in a.sets:  # the toy models are per-image computations: identical, not merely close
        np.testing.assert_array_equal(a.sets[ex].vectors, b.sets[ex].vectors)
        assert (a.sets[ex].level == b.sets[ex].level).all()
        assert (a.sets[ex].kind == "fg").any() and (a.sets[ex].kind == "bg").any()
    np.testing.assert_array_equal(a.text, b.text)
    assert a.info["kept"] > 0
    other = sample_class("blue star", recipe, models)
    assert not np.allclose(a.sets["toy"].vectors[0], other.sets["toy"].vectors[0])


def test_empty_support_set_raises(toy):
    recipe, models = toy
    r = copy.deepcopy(recipe)
    r.masks.method, r.masks.fg_threshold = "none", 2.0  # nothing can be foreground
    m = SamplingModels(models.generator, models.extractors, models.classifier, None, "cpu")
    with pytest.raises(EmptySupportError, match="'red circle': every one of 16 support images has an empty foreground"):
        sample_class("red circle", r, m)


def test_preview_writes_its_files(tmp_path, capsys):
    out = tmp_path / "preview"
    assert cli_main(["preview", "green star", "--recipe", "toy", "--out", str(out), "--n", "6"]) == 0
    for sub in ("images", "attribution", "masks"):
        assert sorted(p.name for p in (out / sub).iterdir()) == [f"{i:03d}.png" for i in range(6)]
    assert (out / "contact_sheet.png").stat().st_size > 1000
    shards = list((out / "shards").glob("green-star-*.parquet"))
    assert len(shards) == 1
    assert "preview 'green star': " in capsys.readouterr().out


def test_preview_rejects_bad_input(tmp_path, capsys):
    assert cli_main(["preview", "red\x07circle", "--recipe", "toy", "--out", str(tmp_path / "p")]) == 2
    assert "control character" in capsys.readouterr().err
    assert cli_main(["preview", "red circle", "--recipe", "nope", "--out", str(tmp_path / "p")]) == 2
    assert "unknown recipe 'nope'" in capsys.readouterr().err
    assert not (tmp_path / "p").exists()


def test_recipe_errors_name_the_key(tmp_path):
    from ovdiff_ray.recipe import RecipeError

    base = (Path(__file__).resolve().parents[1] / "bank" / "recipes" / "tiny.yaml").read_text()
    cases = [
        (base.replace("steps: 4", "steps: four"), r"generation.steps: expected int, got str"),
        (base.replace("steps: 4", "steps: 4\n  stepz: 4"), r"unknown key generation.stepz"),
        (base.replace("method: maskcut", "method: sam"), r"masks.method: 'sam' is not one of"),
        (base.replace("    model: tiny:dino\n", ""), r"extractors\[1\].model: missing model reference"),
        (base + "\nfoo: 1\n", r"unknown key foo"),
    ]
    for i, (text, msg) in enumerate(cases):
        p = tmp_path / f"r{i}.yaml"
        p.write_text(text)
        with pytest.raises(RecipeError, match=msg):
            load_recipe(p)
    assert load_recipe("paper").generation.n_images == 64
