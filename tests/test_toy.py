"""The toy world: determinism, its vocabulary rules, the CLI, and that its models carry the signals the method needs."""
from __future__ import annotations

import hashlib
import json
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from ovdiff_ray.models import toy
from ovdiff_ray.recipe import load_recipe
from ovdiff_ray.vocab import load_vocab

VOCAB = Path(__file__).resolve().parents[1] / "bank" / "vocab" / "toy.tsv"


@pytest.fixture(scope="module")
def recipe():
    return load_recipe("toy")


def _digest(folder: Path) -> dict[str, str]:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def test_scenes_are_deterministic_per_seed(tmp_path):
    v = load_vocab(VOCAB)
    kinds = [c.kind for c in v.classes]
    a = toy.make_scene(v.names, kinds, np.random.default_rng(5), 96)
    b = toy.make_scene(v.names, kinds, np.random.default_rng(5), 96)
    c = toy.make_scene(v.names, kinds, np.random.default_rng(6), 96)
    assert np.array_equal(a[0], b[0]) and np.array_equal(a[1], b[1])
    assert not np.array_equal(a[0], c[0])
    assert a[0].shape == (96, 96, 3) and a[0].dtype == np.uint8 and a[1].dtype == np.uint8
    assert set(np.unique(a[1])) <= set(range(len(v) + 1)) | {255}

    for d, seed in (("x", 3), ("y", 3), ("z", 4)):
        assert toy.scenes_main(["--vocab", str(VOCAB), "--n", "3", "--out", str(tmp_path / d), "--seed", str(seed),
                                "--size", "64"]) == 0
    x, y, z = (_digest(tmp_path / d) for d in "xyz")
    assert x == y and x != z
    assert sorted(x) == ["classes.tsv", "images/0000.png", "images/0001.png", "images/0002.png",
                         "labels/0000.png", "labels/0001.png", "labels/0002.png"]
    assert (tmp_path / "x" / "classes.tsv").read_text() == VOCAB.read_text()


def test_labels_match_what_is_drawn():
    """Every labelled thing pixel has its class's colour; background pixels carry no thing of the vocabulary."""
    v = load_vocab(VOCAB)
    kinds = [c.kind for c in v.classes]
    for seed in range(6):
        img, lab = toy.make_scene(v.names, kinds, np.random.default_rng(seed), 128)
        x = torch.from_numpy(img).permute(2, 0, 1)[None].float() / 255
        hue = toy.colour_channels(x)[0].argmax(0).numpy()
        for i, name in enumerate(v.names, start=1):
            c = toy.parse_name(name)
            m = lab == i
            if m.sum() and not c.is_stuff:
                assert (hue[m] == list(toy.COLOURS).index(c.colour)).mean() > 0.97, name
        assert (lab == 0).any() or (lab > 8).any()  # some background or stuff in every scene


def test_generator_is_deterministic_and_batch_independent(recipe):
    g = toy.ToyGenerator(recipe)
    a = g.generate("red circle", 4, seed=0)
    b = g.generate("red circle", 2, seed=0)
    c = g.generate("red circle", 2, seed=1)
    assert a.images.shape == (4, 128, 128, 3) and a.images.dtype == np.uint8
    assert a.attributions.shape == (4, 128, 128) and a.attributions.dtype == np.float32
    assert a.attributions.min() == 0.0 and a.attributions.max() == 1.0
    assert np.array_equal(a.images[:2], b.images) and a.seeds[:2] == b.seeds
    assert not np.array_equal(a.images[:2], c.images)
    # the attribution points at the object: red pixels are more attributed than the rest
    red = toy.colour_channels(torch.from_numpy(a.images).permute(0, 3, 1, 2).float() / 255)[:, 0].numpy() > 0.5
    assert a.attributions[red].mean() > a.attributions[~red].mean() + 0.3
    s = g.generate("green stripes", 2, seed=0)
    assert toy.colour_channels(torch.from_numpy(s.images).permute(0, 3, 1, 2).float() / 255)[:, 3].mean() > 0.3


@pytest.mark.parametrize("name,word", [("red hexagon", "hexagon"), ("pink circle", "pink"), ("circle", "circle"),
                                       ("big red circle", "big red circle")])
def test_unknown_words_are_errors(recipe, name, word):
    with pytest.raises(ValueError) as e:
        toy.ToyGenerator(recipe).generate(name, 1, 0)
    msg = str(e.value)
    assert word in msg and "colours: red" in msg and "shapes: circle" in msg and "textures: stripes" in msg


def test_list_json(capsys):
    assert toy.scenes_main(["--list", "--json"]) == 0
    words = json.loads(capsys.readouterr().out)
    assert set(words) == {"colours", "shapes", "textures"}
    assert len(words["colours"]) >= 8 and len(words["shapes"]) >= 6 and len(words["textures"]) >= 4


def test_scenes_cli_errors(tmp_path, capsys):
    bad = tmp_path / "bad.tsv"
    bad.write_text("name\tkind\nred circle\tthing\npurple unicorn\tthing\n")
    assert toy.scenes_main(["--vocab", str(bad), "--n", "1", "--out", str(tmp_path / "o")]) == 2
    assert "unicorn" in capsys.readouterr().err
    wrong = tmp_path / "wrong.tsv"
    wrong.write_text("name\tkind\nred stripes\tthing\n")
    assert toy.scenes_main(["--vocab", str(wrong), "--n", "1", "--out", str(tmp_path / "o")]) == 2
    assert "marked thing" in capsys.readouterr().err


def test_toy_vocabulary_is_built_to_be_hard():
    v = load_vocab(VOCAB)
    assert len(v) == 10
    things = [toy.parse_name(c.name) for c in v.classes if c.kind == "thing"]
    stuff = {c.name for c in v.classes if c.kind == "stuff"}
    assert all(toy.parse_name(s).is_stuff for s in stuff) and not any(t.is_stuff for t in things)
    colours = [t.colour for t in things]
    assert len(set(colours)) < len(colours)  # things share colours: confusable without the pre-filter
    assert any(toy.typical_background(t.name).name in stuff for t in things)  # stuff filtering matters


def _feats(ex, img: np.ndarray) -> torch.Tensor:
    f = ex(torch.from_numpy(img).permute(2, 0, 1)[None].float() / 255)[0]
    return torch.nn.functional.normalize(f.flatten(1).mean(1), dim=0)


def test_extractor_colour_shared_texture_distinguishes(recipe):
    ex = toy.ToyExtractor(recipe.extractors[0])
    assert (ex.name, ex.dim, ex.stride) == ("toy", 28, 2)
    rng = np.random.default_rng(0)
    flat = {c: toy.finish(toy.object_layer(toy.ToyClass(c, "circle"), 64, 64, rng), rng) for c in ("red", "blue")}
    field = {n: toy.finish(toy.texture_field(toy.parse_name(n), 64, 64, rng), rng)
             for n in ("red stripes", "red dots", "blue stripes")}
    out = ex(torch.rand(2, 3, 50, 70))
    assert out.shape == (2, 28, 25, 35) and (out >= 0).all()
    cos = lambda a, b: float(_feats(ex, a) @ _feats(ex, b))  # noqa: E731
    assert cos(flat["red"], flat["red"]) > 0.99
    assert cos(flat["red"], flat["blue"]) < 0.6  # only the flatness is shared
    assert cos(field["red stripes"], field["red dots"]) < 0.7  # texture separates stuff of one colour
    assert cos(field["red stripes"], field["blue stripes"]) < 0.7
    assert cos(field["red stripes"], flat["red"]) < 0.7


def test_classifier_finds_the_present_classes():
    v = load_vocab(VOCAB)
    kinds = [c.kind for c in v.classes]
    things = [n for n, k in zip(v.names, kinds) if k == "thing"]
    clf = toy.ToyClassifier(load_recipe("toy").classifier)
    text = clf.encode_text([f"a {n}" for n in things])
    assert np.allclose(np.linalg.norm(text, axis=1), 1, atol=1e-5)
    assert clf.names_in("a red circle and a blue star") == ["red circle", "blue star"]
    pair = clf.encode_text(["a red circle and a blue star"])[0]
    assert pair @ text[things.index("red circle")] > 0.6 and pair @ text[things.index("red square")] < 0.4
    hits = 0
    for seed in range(12):
        img, lab = toy.make_scene(v.names, kinds, np.random.default_rng(100 + seed), 128)
        present = {v.names[i - 1] for i in np.unique(lab) if 0 < i < 255 and kinds[i - 1] == "thing"}
        e = clf.encode_image(torch.from_numpy(img).permute(2, 0, 1)[None].float() / 255)[0]
        top = {things[i] for i in np.argsort(-(text @ e))[: len(present)]}
        hits += top == present
    assert hits >= 9


def test_masker_finds_the_object(recipe):
    g = toy.ToyGenerator(recipe)
    s = g.generate("blue star", 3, 0)
    m = toy.ToyMasker(recipe)
    for img in s.images:
        masks = m(img)
        assert masks.dtype == bool and masks.ndim == 3 and masks.shape[1:] == img.shape[:2]
        blue = toy.colour_channels(torch.from_numpy(img).permute(2, 0, 1)[None].float() / 255)[0, 5].numpy() > 0.5
        ious = [(mk & blue).sum() / (mk | blue).sum() for mk in masks]
        assert max(ious) > 0.85


def test_a_class_samples_fast(recipe):
    from ovdiff_ray.sample import SamplingModels, sample_class

    models = SamplingModels.load(recipe, "cpu")
    t0 = time.perf_counter()
    p = sample_class("yellow cross", recipe, models)
    assert time.perf_counter() - t0 < 5.0
    assert set(p.sets) == {"toy", "toyctx"} and p.info["kept"] >= recipe.generation.n_images - 2
    fg = p.sets["toy"].select("fg", "class")[0]
    bg = p.sets["toy"].select("bg", "class")[0]
    assert fg @ bg < 0.5  # background prototypes differ from the object's
