"""Attribution (OVDIFF.md 2) against a plain re-implementation on a narrow UNet with SD 1.5's block layout.

The reference hooks every cross-attention module itself, recomputes each head's softmax attention from `to_q` /
`to_k` on the conditional half, and averages with explicit loops over calls (layers x steps) and heads.
"""
from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch
import torch.nn.functional as F

pytestmark = pytest.mark.filterwarnings("ignore::FutureWarning", "ignore::UserWarning")

NAME = "aerosol can"  # more than one CLIP token


def narrow_sd15_unet():
    """SD 1.5's UNet layout (3 cross-attention down blocks, a cross-attention mid block, 3 cross-attention up
    blocks, 2 layers per block): 16 cross-attention layers, at width 32."""
    from diffusers import UNet2DConditionModel

    torch.manual_seed(0)
    return UNet2DConditionModel(
        sample_size=16, in_channels=4, out_channels=4, layers_per_block=2, block_out_channels=(32, 32, 32, 32),
        down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
        up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
        cross_attention_dim=32, attention_head_dim=2, norm_num_groups=8).eval()


def ref_span(tokenizer, prompt: str, name: str) -> tuple[int, int]:
    """The name's tokens: the last place the name's own token ids appear in the encoded prompt."""
    ids = tokenizer(prompt).input_ids
    name_ids = tokenizer(name, add_special_tokens=False).input_ids
    for start in range(len(ids) - len(name_ids), -1, -1):
        if ids[start:start + len(name_ids)] == name_ids:
            return start, start + len(name_ids)
    raise AssertionError("name not in prompt")


def ref_minmax(a: np.ndarray) -> np.ndarray:
    lo, hi = a.min(), a.max()
    return (a - lo) / max(hi - lo, 1e-8)


def test_attribution_sums_all_16_cross_attention_layers_and_steps(tiny_sd_folder):
    from diffusers import StableDiffusionPipeline

    from ovdiff_ray.models.diffusion import DiffusionGenerator
    from ovdiff_ray.recipe import load_recipe

    base = StableDiffusionPipeline.from_pretrained(tiny_sd_folder, safety_checker=None, feature_extractor=None,
                                                   requires_safety_checker=False)
    unet = narrow_sd15_unet()
    pipe = StableDiffusionPipeline(**{**base.components, "unet": unet})
    recipe = load_recipe("tiny")
    steps, res = 2, 128  # latent 16x16: layers at 16, 8, 4 and 2 (SD 1.5 at 512: 64, 32, 16, 8)
    recipe.generation = dataclasses.replace(recipe.generation, steps=steps, resolution=res, n_images=1, batch_size=1)
    gen = DiffusionGenerator(recipe, "cpu", pipe=pipe)

    calls = []  # (module, hidden_states, context) of every cross-attention call

    def hook(module, args, kwargs, output):
        ctx = kwargs.get("encoder_hidden_states")
        if ctx is not None:
            calls.append((module, kwargs.get("hidden_states", args[0] if args else None), ctx))

    attn2 = [m for n, m in gen.pipe.unet.named_modules() if n.endswith("attn2")]
    assert len(attn2) == 16
    handles = [m.register_forward_hook(hook, with_kwargs=True) for m in attn2]
    try:
        out = gen.generate(NAME, 1, seed=3)
    finally:
        for h in handles:
            h.remove()
    assert len(calls) == 16 * steps  # every layer at every step

    prompt = recipe.generation.prompt_template.format(name=NAME)
    s0, s1 = ref_span(gen.pipe.tokenizer, prompt, NAME)
    assert s1 - s0 >= 2
    lat = res // 8
    total = np.zeros((64, 64))
    for module, hs, ctx in calls:
        hs, ctx = hs[-1:].float(), ctx[-1:].float()  # conditional half: the last of the guidance batch
        n = hs.shape[1]
        side = int(round(n ** 0.5))
        assert side * side == n and lat % side == 0
        heads = module.heads
        q = module.to_q(hs)[0]  # [n, C]
        k = module.to_k(ctx)[0]  # [T, C]
        d = q.shape[1] // heads
        layer = np.zeros((64, 64))
        for hd in range(heads):
            qh, kh = q[:, hd * d:(hd + 1) * d], k[:, hd * d:(hd + 1) * d]
            probs = torch.softmax(qh @ kh.T / d ** 0.5, dim=-1)  # [n, T]
            m = probs[:, s0:s1].mean(1).reshape(1, 1, side, side)  # row-major latent grid
            m = F.interpolate(m, size=(64, 64), mode="bicubic", align_corners=False).clamp(min=0)
            layer += m[0, 0].detach().numpy()
        total += layer / heads
    mean = total / len(calls)
    ref = ref_minmax(mean)
    ref = F.interpolate(torch.from_numpy(ref)[None, None].float(), size=(res, res), mode="bilinear",
                        align_corners=False)[0, 0].numpy()
    ref = ref_minmax(ref)
    got = out.attributions[0]
    assert got.shape == (res, res)
    np.testing.assert_allclose(got, ref, atol=2e-4)
    assert got.min() == 0 and abs(got.max() - 1) < 1e-6
