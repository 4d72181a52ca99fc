"""Model adapters on tiny random models: attribution, token spans, generation, weights (folder / S3), extractors."""
from __future__ import annotations

import dataclasses
import json
import shutil

import numpy as np
import pytest
import torch

from ovdiff_ray.models.base import image_seed
from ovdiff_ray.recipe import ClassifierConfig, load_recipe

pytestmark = pytest.mark.filterwarnings("ignore::FutureWarning", "ignore::UserWarning")


@pytest.fixture(scope="session")
def tiny_recipe():
    return load_recipe("tiny")


@pytest.fixture(scope="session")
def tiny_folders(_model_cache):
    """The three tiny models, built once per session into OVDIFF_CACHE."""
    from ovdiff_ray.models.weights import resolve_model

    return {n: resolve_model(f"tiny:{n}") for n in ("sd", "dino", "clip")}


# ---------------------------------------------------------------------------------------------------------------
# attribution: pure functions on hand-made attention


def _probs(b=1, heads=2, h=4, w=4, t=5):
    """Softmax-like attention `[B, heads, h*w, T]`: span tokens 1-2 take the top-left 2x2 quadrant, token 0 the rest."""
    p = torch.zeros(b, heads, h, w, t)
    p[..., 0] = 1.0
    p[:, 0, :2, :2] = torch.tensor([0, 1.0, 0, 0, 0])  # head 0: all on token 1
    p[:, 1, :2, :2] = torch.tensor([0, 0.5, 0.5, 0, 0])  # head 1: split over tokens 1 and 2
    return p.reshape(b, heads, h * w, t)


def test_token_heatmap_known_answer():
    from ovdiff_ray.models.diffusion import token_heatmap

    heat = token_heatmap(_probs(), span=(1, 3), hw=(4, 4), grid=4)  # no resampling at the same size
    want = torch.zeros(1, 4, 4)
    want[0, :2, :2] = 0.5  # mean over the 2 span tokens = 0.5 for both heads
    torch.testing.assert_close(heat, want)
    # a single-token span picks that token only: head 0 -> 1, head 1 -> 0.5, mean 0.75
    assert torch.allclose(token_heatmap(_probs(), (1, 2), (4, 4), 4)[0, :2, :2], torch.tensor(0.75))


def test_token_heatmap_upsampled_and_averaged():
    from ovdiff_ray.models.diffusion import AttributionStore, finish_attribution, minmax, token_heatmap

    store = AttributionStore()
    store.add(token_heatmap(_probs(h=4, w=4), (1, 3), (4, 4), grid=8))  # a 4x4 layer
    store.add(token_heatmap(_probs(h=2, w=2), (1, 3), (2, 2), grid=8))  # a 2x2 layer: all positions on the span
    mean = store.mean()
    assert mean.shape == (1, 8, 8) and store.count == 2 and (mean >= 0).all()  # clamped after bicubic
    assert mean[0, :4, :4].mean() > mean[0, 4:, 4:].mean()
    out = finish_attribution(mean, (16, 16))
    assert out.shape == (1, 16, 16)
    assert out.min() == 0 and torch.isclose(out.max(), torch.tensor(1.0))
    peak = divmod(int(out[0].argmax()), 16)
    assert peak[0] < 8 and peak[1] < 8 and out[0, 8:, 8:].mean() < 0.2 < 0.6 < out[0, :8, :8].mean()
    assert minmax(torch.ones(1, 3, 3)).abs().max() == 0  # a constant map does not divide by zero


def test_processor_takes_conditional_half():
    """The processor's heat map equals the hand computation on the second (conditional) half of the batch."""
    from diffusers.models.attention_processor import Attention

    from ovdiff_ray.models.diffusion import AttributionProcessor, AttributionStore, token_heatmap

    torch.manual_seed(0)
    attn = Attention(query_dim=16, cross_attention_dim=8, heads=2, dim_head=8).eval()
    store = AttributionStore()
    attn.set_processor(AttributionProcessor(store))
    b, hw, t = 2, (4, 4), 6
    hs, ctx = torch.randn(2 * b, 16, 16), torch.randn(2 * b, t, 8)
    store.span, store.n_images, store.latent_hw, store.grid, store.active = (2, 4), b, hw, 4, True
    with torch.no_grad():
        out = attn(hs, encoder_hidden_states=ctx)
        q = attn.to_q(hs[b:]).view(b, 16, 2, 8).transpose(1, 2)
        k = attn.to_k(ctx[b:]).view(b, t, 2, 8).transpose(1, 2)
        probs = (q @ k.transpose(-1, -2) * attn.scale).softmax(-1)
    assert out.shape == hs.shape
    torch.testing.assert_close(store.mean(), token_heatmap(probs, (2, 4), hw, 4))
    store.reset(), setattr(store, "active", False)
    attn(hs, encoder_hidden_states=ctx)
    assert store.count == 0  # inactive: plain attention, nothing captured


# ---------------------------------------------------------------------------------------------------------------
# token spans


@pytest.mark.parametrize("name", ["a", "good", "picture frame", "aerosol can", "xylophonist", "zzyzx quokkanaut"])
def test_token_span(tiny_folders, name):
    from transformers import CLIPTokenizer

    from ovdiff_ray.models.diffusion import token_span

    tok = CLIPTokenizer.from_pretrained(f"{tiny_folders['sd']}/tokenizer")
    template = "A good picture of a {name}"
    start, end = token_span(tok, template, name)
    ids = tok(template.format(name=name)).input_ids
    assert start == 6  # BOS + "a good picture of a"
    assert tok.decode(ids[start:end]).strip() == name
    assert end - start == len(tok(name, add_special_tokens=False).input_ids)
    if name in ("xylophonist", "zzyzx quokkanaut"):
        assert end - start >= 2  # split into several tokens, all of them in the span
    # a template with a suffix and no prefix
    s2, e2 = token_span(tok, "{name} on a table", name)
    assert s2 == 1 and e2 == 1 + (end - start)


# ---------------------------------------------------------------------------------------------------------------
# generation


def test_generate_independent_of_batch_size(tiny_recipe, tiny_folders):
    from ovdiff_ray.models.diffusion import DiffusionGenerator

    r4 = dataclasses.replace(tiny_recipe, generation=dataclasses.replace(tiny_recipe.generation, batch_size=4))
    r1 = dataclasses.replace(tiny_recipe, generation=dataclasses.replace(tiny_recipe.generation, batch_size=1))
    g4, g1 = DiffusionGenerator(r4, "cpu"), DiffusionGenerator(r1, "cpu")
    assert g4.pipe.unet is g1.pipe.unet  # one UNet per process, shared
    a, b = g4.generate("picture frame", 4, seed=7), g1.generate("picture frame", 4, seed=7)
    res = tiny_recipe.generation.resolution
    assert a.images.shape == (4, res, res, 3) and a.images.dtype == np.uint8
    assert a.attributions.shape == (4, res, res) and a.attributions.dtype == np.float32
    assert a.seeds == b.seeds == [image_seed(7, "picture frame", i) for i in range(4)]
    # same seeds -> same images; batched BLAS may round differently, so allow 1/255 on <1% of pixels
    diff = np.abs(a.images.astype(int) - b.images)
    assert diff.max() <= 1 and (diff > 0).mean() < 0.01
    np.testing.assert_allclose(a.attributions, b.attributions, atol=1e-4)
    for att in a.attributions:
        assert att.min() == 0 and abs(att.max() - 1) < 1e-6
    assert not np.array_equal(a.images[0], a.images[1])  # per-image seeds differ
    again = g4.generate("picture frame", 2, seed=7)  # a prefix of the same class's set
    np.testing.assert_array_equal(again.images, a.images[:2])
    assert set(g4.timings) == {"generate", "attribution"}


def test_prompt_names_and_template(tiny_recipe):
    from ovdiff_ray.models.diffusion import DiffusionGenerator

    gen = dataclasses.replace(tiny_recipe.generation, prompt_names={"aeroplane": "airplane"})
    g = DiffusionGenerator(dataclasses.replace(tiny_recipe, generation=gen), "cpu")
    assert g.prompt("aeroplane") == "A good picture of a airplane"
    assert g.prompt("cat") == "A good picture of a cat"
    assert g.prompt("tvmonitor", prompt_name="monitor") == "A good picture of a monitor"


# ---------------------------------------------------------------------------------------------------------------
# weights: tiny builds, folders, S3 prefixes


def _dino_cfg(tiny_recipe, model):
    cfg = next(e for e in tiny_recipe.extractors if e.type == "dino")
    return dataclasses.replace(cfg, model=model)


def test_tiny_build_is_deterministic(tmp_path, tiny_folders):
    from ovdiff_ray.models import tiny
    from ovdiff_ray.models.weights import sha256_file

    tiny.build("dino", tmp_path / "dino")
    assert sha256_file(tmp_path / "dino" / "model.safetensors") == sha256_file(
        tiny_folders["dino"] + "/model.safetensors")


def test_weights_folder_and_s3_roundtrip(tmp_path, s3, tiny_recipe, tiny_folders):
    """Tiny weights copied to a folder and uploaded to an S3 prefix load back with identical outputs."""
    from ovdiff_ray.models.classifier import ClipClassifier
    from ovdiff_ray.models.extractors import DinoExtractor, SDExtractor
    from ovdiff_ray.models.weights import RECORD, cache_root, model_hash, resolve_model, upload_folder

    refs = {}
    for name, src in tiny_folders.items():
        folder = tmp_path / name
        shutil.copytree(src, folder, ignore=shutil.ignore_patterns(RECORD))
        upload_folder(folder, f"{s3}/models/{name}/v1")
        refs[name] = [f"tiny:{name}", str(folder), f"{s3}/models/{name}/v1"]
    local = resolve_model(refs["dino"][2])
    assert local.startswith(str(cache_root() / "models" / "s3"))
    assert "model.safetensors" in json.loads(open(f"{local}/{RECORD}").read())  # verified hashes, recorded
    assert resolve_model(refs["dino"][2]) == local  # copied once, then reused
    assert len({model_hash(r) for r in refs["dino"]}) == 1  # same content, same hash

    x = torch.rand(2, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    dino = [DinoExtractor.from_config(_dino_cfg(tiny_recipe, r))(x) for r in refs["dino"]]
    sd_cfg = next(e for e in tiny_recipe.extractors if e.type == "sd")
    sd = [SDExtractor.from_config(dataclasses.replace(sd_cfg, model=r))(x) for r in refs["sd"]]
    clip = [ClipClassifier(ClassifierConfig(model=r, image_size=64)) for r in refs["clip"]]
    text = [c.encode_text(["a cat", "a dog"]) for c in clip]
    for outs in (dino, sd, [torch.from_numpy(t) for t in text]):
        for o in outs[1:]:
            torch.testing.assert_close(o, outs[0], rtol=0, atol=0)


def test_s3_corrupted_file_fails_sha256(tmp_path, s3, tiny_folders):
    import boto3

    from ovdiff_ray.models.weights import WeightsIntegrityError, cache_root, resolve_model, upload_folder

    uri = f"{s3}/models/dino-corrupt/v1"
    upload_folder(tiny_folders["dino"], uri)
    bucket = s3[len("s3://"):]
    client = boto3.client("s3")
    body = bytearray(client.get_object(Bucket=bucket, Key="models/dino-corrupt/v1/model.safetensors")["Body"].read())
    body[1000] ^= 0xFF
    client.put_object(Bucket=bucket, Key="models/dino-corrupt/v1/model.safetensors", Body=bytes(body))
    for _ in range(2):  # nothing half-copied is left to be picked up by a retry
        with pytest.raises(WeightsIntegrityError, match=r"sha256 mismatch for model\.safetensors"):
            resolve_model(uri)
    left = list((cache_root() / "models" / "s3" / bucket).glob("*"))
    assert all(p.name.endswith(".lock") for p in left), left


def test_missing_models_name_themselves(tmp_path, s3, tiny_recipe):
    from ovdiff_ray.models.extractors import build_extractor
    from ovdiff_ray.models.weights import ModelLoadError, ModelNotFoundError, model_hash, resolve_model

    missing = str(tmp_path / "no-such-model")
    with pytest.raises(ModelNotFoundError, match="no-such-model"):
        resolve_model(missing)
    with pytest.raises(ModelNotFoundError, match=r"tiny:xyz.*known: tiny:sd"):
        resolve_model("tiny:xyz")
    with pytest.raises(ModelNotFoundError, match="nothing-here"):
        resolve_model(f"{s3}/nothing-here")
    with pytest.raises(ModelNotFoundError, match="no-such-model"):
        build_extractor(_dino_cfg(tiny_recipe, missing), "cpu")
    with pytest.raises(ModelLoadError, match="timm/no-such-model.dino"):  # a hub id not in the offline cache
        build_extractor(_dino_cfg(tiny_recipe, "timm/no-such-model.dino"), "cpu")
    assert resolve_model("stable-diffusion-v1-5/stable-diffusion-v1-5") == "stable-diffusion-v1-5/stable-diffusion-v1-5"
    assert model_hash("open_clip:ViT-B-16/openai") == "open_clip:ViT-B-16/openai"


# ---------------------------------------------------------------------------------------------------------------
# extractors and classifier


def test_extractor_shapes(tiny_recipe, tiny_folders):
    from ovdiff_ray.models import build_extractors
    from ovdiff_ray.models.base import Extractor

    exts = build_extractors(tiny_recipe, "cpu")
    assert [e.name for e in exts] == ["sd", "dino", "clip"]
    assert [(e.dim, e.stride) for e in exts] == [(96, 8), (64, 8), (64, 16)]
    for e, cfg in zip(exts, tiny_recipe.extractors):
        assert isinstance(e, Extractor) and e.view_size == cfg.view_size
        for h, w in ((64, 64), (96, 80)):
            f = e(torch.rand(2, 3, h, w))
            assert f.shape == (2, e.dim, h // e.stride, w // e.stride) and f.dtype == torch.float32
            assert torch.isfinite(f).all()


def test_sd_paper_layers_give_7680_channels():
    from diffusers import UNet2DConditionModel

    from ovdiff_ray.models.extractors import SDExtractor, layer_dims

    with torch.device("meta"):  # the SD 1.5 UNet architecture, no weights
        unet = UNet2DConditionModel(cross_attention_dim=768, sample_size=64)
    layers = load_recipe("paper").extractors[0].layers
    assert sum(layer_dims(unet, layers)) == 7680
    assert min(SDExtractor._level_factor(n, 4) for n in layers) == 1  # 64x64 grid at 512px: stride 8


def test_clip_classifier(tiny_folders):
    from ovdiff_ray.models import build_classifier
    from ovdiff_ray.models.base import Classifier

    clf = build_classifier(load_recipe("tiny"), "cpu")
    assert isinstance(clf, Classifier) and clf.dim == 32
    t = clf.encode_text(["a cat", "a dog", "a cat"])
    assert t.shape == (3, 32) and t.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(t, axis=1), 1, rtol=1e-5)
    np.testing.assert_array_equal(t[0], t[2])
    assert len(clf._text) >= 2 and clf.encode_text([]).shape == (0, 32)
    im = clf.encode_image(torch.rand(2, 3, 80, 96))
    assert im.shape == (2, 32)
    np.testing.assert_allclose(np.linalg.norm(im, axis=1), 1, rtol=1e-5)
