"""Support images + DAAM-style cross-attention attribution from a diffusers Stable Diffusion pipeline.

OVDIFF.md sections 1-2. Every image's initial latents come from its own `torch.Generator` seeded with
`image_seed(bank seed, class name, index)`, so images do not depend on batch size, worker or retry. An
`AttributionProcessor` on every cross-attention layer (`attn2`) averages, over heads, layers and steps, the
conditional half's softmax attention to the class name's tokens.
"""
from __future__ import annotations

import logging
import math
import threading
import time
import warnings

import numpy as np
import torch
import torch.nn.functional as F

from ..recipe import Recipe
from .base import SupportSet, image_seed
from .weights import ModelLoadError, quiet_loading, resolve_model

log = logging.getLogger(__name__)

SCHEDULERS = {"dpm_multistep": "DPMSolverMultistepScheduler", "ddim": "DDIMScheduler", "pndm": "PNDMScheduler"}
_PIPELINES: dict[tuple[str, str, torch.dtype], object] = {}
_LOCK = threading.Lock()


def torch_dtype(name: str, device: str) -> torch.dtype:
    """Recipe dtype (`auto` | `fp32` | `fp16`) -> torch dtype; `auto` is fp16 on GPU, fp32 on CPU."""
    if name == "auto":
        return torch.float16 if str(device).startswith("cuda") else torch.float32
    return {"fp32": torch.float32, "fp16": torch.float16}[name]


def load_pipeline(ref: str, device: str, dtype: torch.dtype):
    """`StableDiffusionPipeline` for a model reference, loaded once per (folder, device, dtype) in a process.

    The generator and the SD feature extractor share it (one copy of the UNet in memory).
    """
    from diffusers import StableDiffusionPipeline

    path = resolve_model(ref)
    key = (path, str(device), dtype)
    with _LOCK:
        if key not in _PIPELINES:
            try:
                with warnings.catch_warnings(), quiet_loading():
                    warnings.simplefilter("ignore")
                    pipe = StableDiffusionPipeline.from_pretrained(
                        path, torch_dtype=dtype, safety_checker=None, feature_extractor=None,
                        requires_safety_checker=False)
            except (OSError, ValueError, EnvironmentError) as e:
                raise ModelLoadError(f"cannot load diffusion model {ref!r} (resolved to {path}): {e}") from e
            pipe.to(device)
            pipe.set_progress_bar_config(disable=True)
            for m in (pipe.unet, pipe.vae, pipe.text_encoder):
                m.eval()
            _PIPELINES[key] = pipe
        return _PIPELINES[key]


def make_scheduler(name: str, config):
    import diffusers

    return getattr(diffusers, SCHEDULERS[name]).from_config(config)


# ----------------------------------------------------------------------------------------------------------------
# token span


def token_span(tokenizer, template: str, name: str) -> tuple[int, int]:
    """Token positions `[start, end)` of `name` in the encoded prompt `template.format(name=name)`.

    Counts the tokens of the template's prefix (before `{name}`), so names that repeat prefix words ("a", "good",
    "picture frame") are found where they are, and multi-token names get their whole span. Position 0 is BOS.
    """
    def ids(text: str) -> list[int]:
        return tokenizer(text, add_special_tokens=False).input_ids

    prefix = template.split("{name}")[0]
    start = 1 + len(ids(prefix))
    name_ids = ids(name)
    full = ids(template.format(name=name))
    if full[start - 1:start - 1 + len(name_ids)] == name_ids:
        end = start + len(name_ids)
    else:  # the suffix merged with the name (e.g. "{name}s"): take the tokens that differ from the prefix
        end = 1 + len(ids(prefix + name))
        log.warning("name %r does not tokenize alone in %r; using tokens %d..%d", name, template, start, end)
    limit = tokenizer.model_max_length - 1  # last position is EOS
    if start >= limit or not name_ids:
        raise ValueError(f"class name {name!r} has no tokens inside the prompt's {limit} tokens ({template!r})")
    return start, min(end, limit)


# ----------------------------------------------------------------------------------------------------------------
# attribution (pure functions)


def token_heatmap(probs: torch.Tensor, span: tuple[int, int], hw: tuple[int, int], grid: int) -> torch.Tensor:
    """probs `[B, heads, h*w, T]` (softmax over T) -> `[B, grid, grid]`.

    Mean over the span's tokens, per head bicubic upsampling to grid x grid, clamp at 0, mean over heads.
    """
    b, heads, n, _ = probs.shape
    maps = probs[..., span[0]:span[1]].float().mean(-1).reshape(b * heads, 1, *hw)
    maps = F.interpolate(maps, size=(grid, grid), mode="bicubic", align_corners=False).clamp_(min=0)
    return maps.reshape(b, heads, grid, grid).mean(1)


def minmax(x: torch.Tensor, eps: float = 1e-8) -> torch.Tensor:
    """Per-image min-max normalisation of `[B, H, W]` to [0, 1] (a constant map becomes 0)."""
    lo = x.amin(dim=(1, 2), keepdim=True)
    hi = x.amax(dim=(1, 2), keepdim=True)
    return (x - lo) / (hi - lo).clamp(min=eps)


def finish_attribution(mean_map: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """`[B, g, g]` mean heat map -> `[B, H, W]`: min-max, bilinear upsampling to image size, min-max again."""
    x = minmax(mean_map.float())
    x = F.interpolate(x[:, None], size=size, mode="bilinear", align_corners=False)[:, 0]
    return minmax(x)


def layer_hw(n_tokens: int, latent_hw: tuple[int, int]) -> tuple[int, int]:
    """Grid of a UNet layer with `n_tokens` positions, given the latent grid (layers downsample by powers of 2)."""
    factor = math.sqrt(latent_hw[0] * latent_hw[1] / n_tokens)
    h, w = round(latent_hw[0] / factor), round(latent_hw[1] / factor)
    if h * w != n_tokens:  # odd sizes: downsampling rounds up
        f = 2 ** round(math.log2(factor))
        h, w = math.ceil(latent_hw[0] / f), math.ceil(latent_hw[1] / f)
    return h, w


# ----------------------------------------------------------------------------------------------------------------
# attention capture


class AttributionStore:
    """Running sum of token heat maps for the images of one batch; `active` only during generation."""

    def __init__(self):
        self.active = False
        self.profile = False  # synchronise CUDA around captures so `seconds` is exact
        self.span = (1, 2)
        self.n_images = 0
        self.latent_hw = (64, 64)
        self.grid = 64
        self.reset()

    def reset(self) -> None:
        self.sum: torch.Tensor | None = None
        self.count = 0
        self.seconds = 0.0

    def add(self, heat: torch.Tensor) -> None:
        self.sum = heat if self.sum is None else self.sum + heat
        self.count += 1

    def mean(self) -> torch.Tensor:
        if self.sum is None:
            raise RuntimeError("no cross-attention was captured (no attn2 layers ran)")
        return self.sum / self.count


class AttributionProcessor:
    """Cross-attention processor: the usual SDPA output, plus (when the store is active) the conditional half's
    per-head softmax attention to the class tokens, turned into a heat map and added to the store."""

    def __init__(self, store: AttributionStore):
        from diffusers.models.attention_processor import AttnProcessor2_0

        self.store = store
        self.inner = AttnProcessor2_0()

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None, **kw):
        out = self.inner(attn, hidden_states, encoder_hidden_states, attention_mask, temb)
        if self.store.active and encoder_hidden_states is not None and hidden_states.ndim == 3:
            self.capture(attn, hidden_states, encoder_hidden_states)
        return out

    @torch.no_grad()
    def capture(self, attn, hidden_states: torch.Tensor, context: torch.Tensor) -> None:
        """hidden_states `[2B or B, h*w, C]`, context `[2B or B, T, C']`: conditional half = last B rows."""
        s = self.store
        t0 = _clock(s.profile)
        hs, ctx = hidden_states[-s.n_images:], context[-s.n_images:]
        b, n, _ = hs.shape
        q = attn.to_q(hs).view(b, n, attn.heads, -1).transpose(1, 2)  # [B, heads, n, d]
        k = attn.to_k(ctx).view(b, ctx.shape[1], attn.heads, -1).transpose(1, 2)  # [B, heads, T, d]
        probs = (q.float() @ k.float().transpose(-1, -2) * attn.scale).softmax(-1)  # [B, heads, n, T]
        s.add(token_heatmap(probs, s.span, layer_hw(n, s.latent_hw), s.grid))
        s.seconds += _clock(s.profile) - t0


def _clock(sync: bool) -> float:
    if sync and torch.cuda.is_available():
        torch.cuda.synchronize()
    return time.perf_counter()


def install_attribution(unet) -> AttributionStore:
    """Register an `AttributionProcessor` on every `attn2` of `unet` (once per UNet); returns its store."""
    store = getattr(unet, "_ovdiff_attribution", None)
    if store is None:
        store = AttributionStore()
        procs = {name: AttributionProcessor(store) if name.endswith("attn2.processor") else proc
                 for name, proc in unet.attn_processors.items()}
        unet.set_attn_processor(procs)
        unet._ovdiff_attribution = store
    return store


# ----------------------------------------------------------------------------------------------------------------
# generator


class DiffusionGenerator:
    """`generate(name, n, seed)` -> `SupportSet` with a diffusers text-to-image pipeline (OVDIFF.md sections 1-2).

    `timings` holds the seconds of the last call: `generate` (pipeline, without capture) and `attribution`.
    """

    def __init__(self, recipe: Recipe, device: str = "cpu", pipe=None):
        """`pipe`: an already loaded pipeline to use instead of `generation.model` (benchmarks, tests)."""
        from diffusers import StableDiffusionPipeline

        self.recipe, self.cfg, self.device = recipe, recipe.generation, device
        self.dtype = torch_dtype(self.cfg.dtype, device)
        base = pipe if pipe is not None else load_pipeline(self.cfg.model, device, self.dtype)
        scheduler = make_scheduler(self.cfg.scheduler, base.scheduler.config)
        comps = {**base.components, "scheduler": scheduler}
        comps.update(safety_checker=None, feature_extractor=None, requires_safety_checker=False)
        self.pipe = StableDiffusionPipeline(**comps)
        self.pipe.set_progress_bar_config(disable=True)
        self.store = install_attribution(self.pipe.unet)
        self.timings: dict[str, float] = {}

    def prompt(self, name: str, prompt_name: str | None = None) -> str:
        pname = prompt_name or self.cfg.prompt_names.get(name, name)
        return self.cfg.prompt_template.format(name=pname)

    def latents(self, seeds: list[int]) -> torch.Tensor:
        """`[B, 4, H/8, W/8]` initial noise, each image from its own CPU generator (device independent)."""
        c = self.pipe.unet.config.in_channels
        side = self.cfg.resolution // self.pipe.vae_scale_factor
        noise = [torch.randn((c, side, side), generator=torch.Generator("cpu").manual_seed(s)) for s in seeds]
        return torch.stack(noise).to(self.device, self.dtype)

    def generate(self, name: str, n: int, seed: int, prompt_name: str | None = None) -> SupportSet:
        pname = prompt_name or self.cfg.prompt_names.get(name, name)
        seeds = [image_seed(seed, name, i) for i in range(n)]
        images, attrs, spent = [], [], 0.0
        t0 = time.perf_counter()
        for i in range(0, n, self.cfg.batch_size):
            imgs, att = self._batch(pname, seeds[i:i + self.cfg.batch_size])
            images.append(imgs)
            attrs.append(att)
            spent += self.store.seconds
        total = time.perf_counter() - t0
        self.timings = {"generate": total - spent, "attribution": spent}
        return SupportSet(np.concatenate(images), np.concatenate(attrs), seeds)

    def generate_batches(self, name: str, n: int, seed: int, prompt_name: str | None = None):
        """The device path: yields `(seeds, images [b, 3, H, W] float in [0, 1] quantised to 8 bits, attributions
        [b, H, W] float32)` per batch, both on the pipeline's device (nothing crosses to the host). The same images
        and attributions as `generate`. `timings` is updated as batches are drawn."""
        pname = prompt_name or self.cfg.prompt_names.get(name, name)
        seeds = [image_seed(seed, name, i) for i in range(n)]
        self.timings = {"generate": 0.0, "attribution": 0.0}
        for i in range(0, n, self.cfg.batch_size):
            t0 = _clock(True)
            images, att = self._batch(pname, seeds[i:i + self.cfg.batch_size], on_device=True)
            total = _clock(True) - t0
            self.timings["generate"] += total - self.store.seconds
            self.timings["attribution"] += self.store.seconds
            yield seeds[i:i + self.cfg.batch_size], images, att

    @torch.no_grad()
    def _batch(self, pname: str, seeds: list[int], on_device: bool = False):
        """One pipeline call: `[b, H, W, 3]` uint8 images and `[b, H, W]` float32 attributions (numpy), or with
        `on_device` the images `[b, 3, H, W]` float and attributions as tensors on the pipeline's device."""
        cfg, b, res = self.cfg, len(seeds), self.cfg.resolution
        s = self.store
        s.reset()
        s.span = token_span(self.pipe.tokenizer, cfg.prompt_template, pname)
        s.n_images, s.grid = b, self.recipe.attribution.grid
        s.latent_hw = (res // self.pipe.vae_scale_factor,) * 2
        s.active = True
        try:
            out = self.pipe(
                prompt=[cfg.prompt_template.format(name=pname)] * b,
                negative_prompt=[cfg.negative_prompt] * b if cfg.negative_prompt else None,
                height=res, width=res, num_inference_steps=cfg.steps, guidance_scale=cfg.guidance,
                latents=self.latents(seeds), output_type="pt" if on_device else "np")
        finally:
            s.active = False
        t0 = _clock(s.profile)
        att = finish_attribution(s.mean(), (res, res)).float()
        s.seconds += _clock(s.profile) - t0
        if on_device:  # [b, 3, H, W] as the host path's uint8 images / 255
            return (out.images.float().clamp(0, 1) * 255).round().div(255), att
        att = att.cpu().numpy().astype(np.float32)
        images = (np.clip(out.images, 0, 1) * 255).round().astype(np.uint8)
        return images, att
