"""Dense features (OVDIFF.md 4) by hand on tiny real-architecture models with random weights: SD `attn2.to_q`
queries of a noised latent, DINO keys of the last block, CLIP keys of a block after ln_1 with interpolated position
embeddings."""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from ovdiff_ray.recipe import ExtractorConfig

pytestmark = pytest.mark.filterwarnings("ignore::FutureWarning", "ignore::UserWarning")


# ---------------------------------------------------------------------------------------------------------- SD

@pytest.fixture(scope="module")
def sd_pipe(tiny_sd_folder):
    from diffusers import StableDiffusionPipeline

    return StableDiffusionPipeline.from_pretrained(tiny_sd_folder, safety_checker=None, feature_extractor=None,
                                                   requires_safety_checker=False)


def test_sd_layers_are_cross_attention_queries(sd_pipe):
    from ovdiff_ray.models.extractors import SDExtractor

    cfg = ExtractorConfig(name="sd", type="sd", model="tiny:sd", timestep=200,
                          layers=["down_blocks.0.attentions.0", "up_blocks.1.attentions.1.transformer_blocks.0",
                                  "up_blocks.1.attentions.2.transformer_blocks.0.attn2",
                                  "mid_block.attentions.0.transformer_blocks.0.attn2.to_q"])
    ex = SDExtractor(sd_pipe, cfg)
    assert all(n.endswith("attn2.to_q") for n in ex.layers), ex.layers
    for bad in ("down_blocks.0.resnets.0", "conv_in"):
        with pytest.raises(ValueError, match=r"not an attention layer.*attn2\.to_q"):
            SDExtractor(sd_pipe, ExtractorConfig(name="sd", type="sd", model="tiny:sd", layers=[bad]))


def test_sd_noised_latent_and_features_by_hand(sd_pipe):
    from ovdiff_ray.models.extractors import SDExtractor

    layers = ["down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_q",
              "up_blocks.1.attentions.0.transformer_blocks.0.attn2.to_q",
              "mid_block.attentions.0.transformer_blocks.0.attn2.to_q"]
    ex = SDExtractor(sd_pipe, ExtractorConfig(name="sd", type="sd", model="tiny:sd", timestep=200, layers=layers))
    torch.manual_seed(5)
    images = torch.rand(2, 3, 64, 64)
    vae, unet = sd_pipe.vae, sd_pipe.unet
    assert vae.config.scaling_factor == pytest.approx(0.18215)  # SD 1.x
    # noised latent: sqrt(abar_t) z + sqrt(1 - abar_t) eps, z = VAE sample x scaling factor, abar from the betas
    betas = torch.linspace(0.00085 ** 0.5, 0.012 ** 0.5, 1000, dtype=torch.float64) ** 2  # scaled_linear
    abar = 1.0
    for t in range(201):
        abar *= 1 - betas[t].item()
    with torch.no_grad():
        dist = vae.encode(images * 2 - 1).latent_dist
        g = torch.Generator().manual_seed(0)
        e1 = torch.randn(dist.mean.shape[1:], generator=g)
        e2 = torch.randn(dist.mean.shape[1:], generator=g)
        z = (dist.mean + dist.std * e1) * 0.18215
        ref_latent = math.sqrt(abar) * z + math.sqrt(1 - abar) * e2
        got_latent = ex.latents(images * 2 - 1)
    torch.testing.assert_close(got_latent, ref_latent.float(), atol=1e-5, rtol=1e-4)

    # the features: every named to_q output, [B, n, C] -> [B, C, h, w] row-major, bilinear to the largest grid
    outs = {}
    handles = [unet.get_submodule(n).register_forward_hook(lambda m, a, o, n=n: outs.setdefault(n, o))
               for n in layers]
    try:
        with torch.no_grad():
            ids = sd_pipe.tokenizer([""], padding="max_length", max_length=77, return_tensors="pt").input_ids
            empty = sd_pipe.text_encoder(ids)[0]
            unet(ref_latent.float(), torch.tensor([200, 200]), encoder_hidden_states=empty.expand(2, -1, -1))
            got = ex(images)
    finally:
        for h in handles:
            h.remove()
    maps = []
    for n in layers:
        o = outs[n]
        side = int(round(o.shape[1] ** 0.5))
        m = torch.zeros(2, o.shape[2], side, side)
        for i in range(side):
            for j in range(side):
                m[:, :, i, j] = o[:, i * side + j]
        maps.append(F.interpolate(m, size=(8, 8), mode="bilinear", align_corners=False) if side != 8 else m)
    ref = torch.cat(maps, 1)
    assert got.shape == (2, sum(unet.get_submodule(n).out_features for n in layers), 8, 8)
    torch.testing.assert_close(got, ref, atol=1e-4, rtol=1e-4)


# -------------------------------------------------------------------------------------------------------- DINO

IMAGENET = (torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1), torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1))


def ref_dino_keys(model, images: torch.Tensor) -> torch.Tensor:
    """Keys of the last block by hand: patches + position embeddings, blocks, then norm1 -> qkv -> k."""
    x = (images - IMAGENET[0]) / IMAGENET[1]
    b, _, hh, ww = x.shape
    p = model.patch_embed.patch_size[0]
    h, w = hh // p, ww // p
    tok = model.patch_embed(x)
    tok = model._pos_embed(tok)
    tok = model.norm_pre(tok)
    for blk in model.blocks[:-1]:
        tok = blk(tok)
    last = model.blocks[-1]
    qkv = last.attn.qkv(last.norm1(tok))  # [B, N, 3 * D]: q, k, v, heads concatenated in each
    d = qkv.shape[-1] // 3
    keys = qkv[:, model.num_prefix_tokens:, d:2 * d]
    out = torch.zeros(b, d, h, w)
    for i in range(h):
        for j in range(w):
            out[:, :, i, j] = keys[:, i * w + j]  # row-major patch order
    return out


def test_dino_keys_non_square_and_transposed(_model_cache):
    from ovdiff_ray.models.extractors import DinoExtractor, load_timm

    model = load_timm("tiny:dino")
    ex = DinoExtractor(model, ExtractorConfig(name="dino", type="dino", model="tiny:dino"))
    torch.manual_seed(1)
    img = torch.rand(1, 3, 48, 80)  # 6 x 10 patches
    with torch.no_grad():
        for x in (img, img.transpose(-1, -2).contiguous()):
            got, ref = ex(x), ref_dino_keys(model, x)
            assert got.shape == ref.shape == (1, ex.dim, x.shape[-2] // 8, x.shape[-1] // 8)
            torch.testing.assert_close(got, ref, atol=1e-4, rtol=1e-4)


# -------------------------------------------------------------------------------------------------------- CLIP

def ref_clip_keys(model, images: torch.Tensor, block: int) -> torch.Tensor:
    """Keys of `block` by hand: conv1 patches, class token, position embeddings resized bicubically from the trained
    grid, ln_pre, the blocks before, then ln_1 and the key rows of in_proj."""
    v = model.visual
    x = (images - IMAGENET[0]) / IMAGENET[1]
    pat = v.conv1(x)  # [B, D, h, w]
    b, d, h, w = pat.shape
    tokens = [v.class_embedding.expand(b, d)]
    for i in range(h):
        for j in range(w):
            tokens.append(pat[:, :, i, j])
    seq = torch.stack(tokens, 1)  # [B, 1 + h*w, D]
    pe = v.positional_embedding
    gh = gw = int(round((pe.shape[0] - 1) ** 0.5))
    grid = torch.zeros(1, d, gh, gw)
    for i in range(gh):
        for j in range(gw):
            grid[0, :, i, j] = pe[1 + i * gw + j]
    grid = F.interpolate(grid, size=(h, w), mode="bicubic", align_corners=False)
    pos = [pe[0]] + [grid[0, :, i, j] for i in range(h) for j in range(w)]
    seq = v.ln_pre(seq + torch.stack(pos)[None])
    for blk in v.transformer.resblocks[:block]:
        seq = blk(seq) if getattr(v.transformer, "batch_first", True) else blk(seq.transpose(0, 1)).transpose(0, 1)
    blk = v.transformer.resblocks[block]
    y = blk.ln_1(seq)
    keys = y @ blk.attn.in_proj_weight[d:2 * d].T + blk.attn.in_proj_bias[d:2 * d]
    out = torch.zeros(b, d, h, w)
    for i in range(h):
        for j in range(w):
            out[:, :, i, j] = keys[:, 1 + i * w + j]
    return out


def narrow_vit_b16_clip(quick_gelu: bool = True):
    """open_clip ViT-B/16's layout (12 blocks, patch 16, 224 px: a 14 x 14 trained grid) at width 64."""
    import open_clip

    torch.manual_seed(2)
    return open_clip.CLIP(embed_dim=32, quick_gelu=quick_gelu,
                          vision_cfg={"image_size": 224, "layers": 12, "width": 64, "head_width": 32, "patch_size": 16},
                          text_cfg={"context_length": 77, "vocab_size": 49408, "width": 32, "heads": 2,
                                    "layers": 1}).eval()


def test_clip_block10_keys_interpolated():
    """Block 10 of 12 (the paper's), QuickGELU as the openai weights, a 3 x 5 grid from the 14 x 14 one."""
    from ovdiff_ray.models.extractors import ClipExtractor

    model = narrow_vit_b16_clip()
    assert type(model.visual.transformer.resblocks[0].mlp.gelu).__name__ == "QuickGELU"
    ex = ClipExtractor(model, ExtractorConfig(name="clip", type="clip", model="x", block=10, normalise="imagenet"))
    x = torch.rand(1, 3, 48, 80)
    with torch.no_grad():
        got, ref = ex(x), ref_clip_keys(model, x, 10)
    assert got.shape == (1, 64, 3, 5)
    torch.testing.assert_close(got, ref, atol=2e-4, rtol=2e-4)


def test_openai_clip_weights_get_quick_gelu(monkeypatch):
    """`open_clip:ViT-B-16/openai` is created with QuickGELU (the openai weights were trained with it); a tag
    without it is not."""
    import open_clip

    from ovdiff_ray.models import extractors

    seen = []

    def fake_create(name, pretrained=None, device="cpu", force_quick_gelu=False, **kw):
        seen.append((name, pretrained, force_quick_gelu))  # no weights offline: the narrow model stands in
        return narrow_vit_b16_clip(quick_gelu=force_quick_gelu)

    monkeypatch.setattr(open_clip, "create_model", fake_create)
    monkeypatch.setattr(extractors, "_MODELS", {})
    model, _ = extractors.load_open_clip("open_clip:ViT-B-16/openai")
    assert seen[-1] == ("ViT-B-16", "openai", True)
    assert type(model.visual.transformer.resblocks[0].mlp.gelu).__name__ == "QuickGELU"
    extractors.load_open_clip("open_clip:ViT-B-16/laion2b_s34b_b88k")
    assert seen[-1] == ("ViT-B-16", "laion2b_s34b_b88k", False)
