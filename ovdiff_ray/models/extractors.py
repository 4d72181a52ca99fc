"""Dense feature extractors (OVDIFF.md section 4): images `[B, 3, H, W]` in [0, 1] -> features `[B, D, h, w]`.

- `SDExtractor`: VAE latent (sample, x scaling factor), DDPM noise at `timestep` (fixed seed), one UNet pass with
  the empty prompt; the `to_q` outputs of the named layers, each brought to the largest layer grid and concatenated.
- `DinoExtractor`: timm ViT keys of one block (after norm1, heads concatenated, prefix tokens dropped), any input
  size (`dynamic_img_size`).
- `ClipExtractor`: open_clip ViT keys of one block (after ln_1), position embeddings interpolated to the input grid.
"""
from __future__ import annotations

import threading

import torch
import torch.nn.functional as F

from ..recipe import ExtractorConfig
from .diffusion import layer_hw, load_pipeline, torch_dtype
from .weights import ModelLoadError, is_local_ref, resolve_model

IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
CLIP_MEAN, CLIP_STD = (0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711)
_MODELS: dict[tuple, object] = {}
_LOCK = threading.Lock()


def build_extractor(cfg: ExtractorConfig, device: str = "cpu"):
    """Extractor named by `cfg.type` (sd | dino | clip)."""
    kinds = {"sd": SDExtractor.from_config, "dino": DinoExtractor.from_config, "clip": ClipExtractor.from_config}
    if cfg.type not in kinds:
        raise ValueError(f"extractor {cfg.name!r}: unknown type {cfg.type!r} (known: {', '.join(kinds)})")
    return kinds[cfg.type](cfg, device)


def normalise(images: torch.Tensor, kind: str) -> torch.Tensor:
    """[0, 1] images -> `imagenet` | `clip` statistics, or `sd` ([-1, 1])."""
    if kind == "sd":
        return images * 2 - 1
    mean, std = {"imagenet": (IMAGENET_MEAN, IMAGENET_STD), "clip": (CLIP_MEAN, CLIP_STD)}[kind]
    mean = torch.tensor(mean, device=images.device, dtype=images.dtype).view(1, 3, 1, 1)
    std = torch.tensor(std, device=images.device, dtype=images.dtype).view(1, 3, 1, 1)
    return (images - mean) / std


def fit_multiple(images: torch.Tensor, multiple: int) -> torch.Tensor:
    """Resize `[B, 3, H, W]` so both sides are multiples of `multiple` (nearest multiple, at least one)."""
    h, w = images.shape[-2:]
    th, tw = (max(multiple, round(s / multiple) * multiple) for s in (h, w))
    if (th, tw) == (h, w):
        return images
    return F.interpolate(images, size=(th, tw), mode="bilinear", align_corners=False, antialias=True)


def _cached(key: tuple, load):
    with _LOCK:
        if key not in _MODELS:
            _MODELS[key] = load()
        return _MODELS[key]


def _autocast(device: str):
    return torch.autocast("cuda", dtype=torch.float16, enabled=str(device).startswith("cuda"))


# ----------------------------------------------------------------------------------------------------------------
# Stable Diffusion


def to_q_name(unet, name: str) -> str:
    """Module path of a cross-attention `to_q` Linear (OVDIFF.md 4: the query projections of `attn2`).

    A block path is completed to its first transformer block's cross-attention: `up_blocks.1.attentions.0` (or
    `....transformer_blocks.0`) -> `....transformer_blocks.0.attn2.to_q`; an attention module (`...attn2`) -> its
    `to_q`. Naming `attn1` (self-attention) explicitly is allowed; any other module is an error naming what to give.
    """
    mod = unet.get_submodule(name)
    if isinstance(mod, torch.nn.Linear):
        return name
    if hasattr(mod, "to_q") and isinstance(mod.to_q, torch.nn.Linear):
        return name + ".to_q"
    if hasattr(mod, "attn2"):  # a transformer block
        if getattr(mod, "attn2") is None:
            raise ValueError(f"UNet layer {name!r} has no cross-attention (attn2); name an attention's to_q")
        return name + ".attn2.to_q"
    if hasattr(mod, "transformer_blocks"):  # a Transformer2DModel (the `attentions.N` of a block)
        return to_q_name(unet, name + ".transformer_blocks.0")
    raise ValueError(f"UNet layer {name!r} is a {type(mod).__name__}, not an attention layer: name a cross-attention "
                     f"query projection, e.g. '{name}.attentions.0.transformer_blocks.0.attn2.to_q'")


def layer_dims(unet, names: list[str]) -> list[int]:
    """Channels of each named `to_q` output (SD 1.5 paper layers: 7680 in all)."""
    return [unet.get_submodule(to_q_name(unet, n)).out_features for n in names]


class SDExtractor:
    """`to_q` outputs of UNet attention layers after one denoising pass on the noised VAE latent."""

    def __init__(self, pipe, cfg: ExtractorConfig, device: str = "cpu", seed: int = 0):
        from diffusers import DDPMScheduler

        self.name, self.view_size, self.device = cfg.name, cfg.view_size, device
        self.unet, self.vae, self.timestep, self.seed = pipe.unet, pipe.vae, cfg.timestep, seed
        self.scheduler = DDPMScheduler.from_config(pipe.scheduler.config)
        self.layers = [self._layer_name(n) for n in cfg.layers]
        if not self.layers:
            raise ValueError(f"extractor {cfg.name!r}: `layers` is empty")
        self.dim = sum(layer_dims(self.unet, self.layers))
        levels = len(self.unet.config.block_out_channels)
        self.factor = max(2 ** (levels - 1), 1) * pipe.vae_scale_factor  # input must divide by this
        self.stride = pipe.vae_scale_factor * min(self._level_factor(n, levels) for n in self.layers)
        with torch.no_grad():
            ids = pipe.tokenizer([""], padding="max_length", max_length=pipe.tokenizer.model_max_length,
                                 return_tensors="pt").input_ids.to(device)
            self.empty = pipe.text_encoder(ids)[0]  # [1, 77, C]

    @classmethod
    def from_config(cls, cfg: ExtractorConfig, device: str = "cpu"):
        return cls(load_pipeline(cfg.model, device, torch_dtype("auto", device)), cfg, device)

    def _layer_name(self, name: str) -> str:
        try:
            return to_q_name(self.unet, name)
        except AttributeError:
            raise ValueError(f"extractor {self.name!r}: the UNet has no layer {name!r}") from None
        except ValueError as e:
            raise ValueError(f"extractor {self.name!r}: {e}") from None

    @staticmethod
    def _level_factor(name: str, levels: int) -> int:
        """Downsampling of a layer's grid relative to the latent, from its block name."""
        parts = name.split(".")
        if parts[0] == "down_blocks":
            return 2 ** int(parts[1])
        if parts[0] == "up_blocks":
            return 2 ** (levels - 1 - int(parts[1]))
        return 2 ** (levels - 1)

    @torch.no_grad()
    def latents(self, x: torch.Tensor) -> torch.Tensor:
        """`[B, 3, H, W]` in [-1, 1] -> noised latents at `timestep`; the same fixed-seed noise for every image."""
        dist = self.vae.encode(x).latent_dist
        shape = dist.mean.shape[1:]
        g = torch.Generator("cpu").manual_seed(self.seed)
        eps, noise = (torch.randn(shape, generator=g).to(x.device, x.dtype) for _ in range(2))
        z = (dist.mean + dist.std * eps) * self.vae.config.scaling_factor
        t = torch.tensor([self.timestep], device=x.device)
        return self.scheduler.add_noise(z, noise.expand_as(z), t)

    @torch.no_grad()
    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        dtype = self.unet.dtype
        x = normalise(fit_multiple(images.to(self.device, torch.float32), self.factor), "sd").to(dtype)
        z = self.latents(x)
        feats: dict[str, torch.Tensor] = {}
        hooks = [self.unet.get_submodule(n).register_forward_hook(self._hook(n, feats)) for n in self.layers]
        try:
            t = torch.full((len(z),), self.timestep, device=z.device)
            self.unet(z, t, encoder_hidden_states=self.empty.expand(len(z), -1, -1))
        finally:
            for h in hooks:
                h.remove()
        return self._assemble([feats[n] for n in self.layers], z.shape[-2:])

    @staticmethod
    def _hook(name: str, out: dict):
        def hook(module, args, output):
            out[name] = output
        return hook

    def _assemble(self, feats: list[torch.Tensor], latent_hw) -> torch.Tensor:
        """`[B, n_i, C_i]` per layer -> `[B, sum C_i, h, w]` at the largest layer grid (bilinear)."""
        grids = [layer_hw(f.shape[1], tuple(latent_hw)) for f in feats]
        size = max(grids, key=lambda g: g[0] * g[1])
        maps = []
        for f, (h, w) in zip(feats, grids):
            m = f.float().transpose(1, 2).reshape(len(f), -1, h, w)
            maps.append(m if (h, w) == size else F.interpolate(m, size=size, mode="bilinear", align_corners=False))
        return torch.cat(maps, 1)


# ----------------------------------------------------------------------------------------------------------------
# DINO (timm)


def timm_name(ref: str) -> tuple[str, bool]:
    """Model reference -> (timm model name, pretrained): local folder, hub id, `hf-hub:` or `timm:<name>`."""
    if ref.startswith("timm:"):
        return ref[len("timm:"):], True
    path = resolve_model(ref)
    if is_local_ref(path):
        return "local-dir:" + path, True
    return (path if path.startswith("hf-hub:") else "hf-hub:" + path), True


def load_timm(ref: str, device: str = "cpu"):
    """timm model for a reference (cached per process), eval mode, any input size."""
    import timm

    def load():
        name, pretrained = timm_name(ref)
        try:
            model = timm.create_model(name, pretrained=pretrained, dynamic_img_size=True, num_classes=0)
        except (OSError, RuntimeError, ValueError) as e:
            raise ModelLoadError(f"cannot load timm model {ref!r} ({name}): {e}") from e
        return model.to(device).eval()

    return _cached(("timm", ref, str(device)), load)


class DinoExtractor:
    """Keys of ViT block `block` (after norm1; heads concatenated; prefix tokens dropped) -> `[B, D, h, w]`."""

    def __init__(self, model, cfg: ExtractorConfig, device: str = "cpu"):
        self.model, self.device, self.name, self.view_size = model, device, cfg.name, cfg.view_size
        self.block = cfg.block % len(model.blocks)
        self.stride = model.patch_embed.patch_size[0]
        self.dim = model.blocks[self.block].attn.qkv.out_features // 3
        self.norm = "imagenet" if cfg.normalise == "default" else cfg.normalise

    @classmethod
    def from_config(cls, cfg: ExtractorConfig, device: str = "cpu"):
        return cls(load_timm(cfg.model, device), cfg, device)

    @torch.no_grad()
    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        x = normalise(fit_multiple(images.to(self.device, torch.float32), self.stride), self.norm)
        h, w = x.shape[-2] // self.stride, x.shape[-1] // self.stride
        out = {}
        hook = self.model.blocks[self.block].attn.qkv.register_forward_hook(lambda m, a, o: out.update(qkv=o))
        try:
            with _autocast(self.device):
                self.model.forward_intermediates(x, indices=[self.block], stop_early=True, intermediates_only=True)
        finally:
            hook.remove()
        keys = out["qkv"][:, self.model.num_prefix_tokens:, self.dim:2 * self.dim].float()  # [B, h*w, D]
        return keys.transpose(1, 2).reshape(len(x), self.dim, h, w)


# ----------------------------------------------------------------------------------------------------------------
# CLIP (open_clip)


def open_clip_name(ref: str) -> tuple[str, str | None]:
    """Reference -> (open_clip model name, pretrained tag): `open_clip:ARCH[/TAG]`, local folder, or hub id."""
    if ref.startswith("open_clip:"):
        arch, _, tag = ref[len("open_clip:"):].partition("/")
        return arch, tag or None
    path = resolve_model(ref)
    if is_local_ref(path):
        return "local-dir:" + path, None
    return (path if path.startswith("hf-hub:") else "hf-hub:" + path), None


def load_open_clip(ref: str, device: str = "cpu"):
    """(open_clip model, tokenizer) for a reference, cached per process; `open_clip:ARCH` alone = random weights."""
    import open_clip

    def load():
        name, tag = open_clip_name(ref)
        quick_gelu = bool(tag and (open_clip.get_pretrained_cfg(name, tag) or {}).get("quick_gelu"))  # openai
        try:
            model = open_clip.create_model(name, pretrained=tag, device=device, force_quick_gelu=quick_gelu)
            tokenizer = open_clip.get_tokenizer(name)
        except (OSError, RuntimeError, ValueError) as e:
            raise ModelLoadError(f"cannot load open_clip model {ref!r} ({name}): {e}") from e
        return model.eval(), tokenizer

    return _cached(("open_clip", ref, str(device)), load)


class ClipExtractor:
    """Keys of visual transformer block `block` (after ln_1) with interpolated position embeddings."""

    def __init__(self, model, cfg: ExtractorConfig, device: str = "cpu"):
        self.visual, self.device, self.name, self.view_size = model.visual, device, cfg.name, cfg.view_size
        blocks = self.visual.transformer.resblocks
        self.block = cfg.block % len(blocks)
        self.stride = self.visual.conv1.kernel_size[0]
        self.dim = self.visual.conv1.out_channels
        self.norm = "clip" if cfg.normalise == "default" else cfg.normalise

    @classmethod
    def from_config(cls, cfg: ExtractorConfig, device: str = "cpu"):
        return cls(load_open_clip(cfg.model, device)[0], cfg, device)

    def pos_embed(self, h: int, w: int) -> torch.Tensor:
        """`[1 + h*w, D]` position embeddings, the patch part bicubically resized from the trained grid."""
        pe = self.visual.positional_embedding
        gh, gw = self.visual.grid_size
        if (h, w) == (gh, gw):
            return pe
        grid = pe[1:].reshape(1, gh, gw, -1).permute(0, 3, 1, 2).float()
        grid = F.interpolate(grid, size=(h, w), mode="bicubic", align_corners=False)
        return torch.cat([pe[:1], grid.permute(0, 2, 3, 1).reshape(h * w, -1).to(pe.dtype)])

    @torch.no_grad()
    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        v = self.visual
        x = normalise(fit_multiple(images.to(self.device, torch.float32), self.stride), self.norm)
        with _autocast(self.device):
            x = v.conv1(x)  # [B, D, h, w]
            b, d, h, w = x.shape
            x = x.flatten(2).transpose(1, 2)
            cls = v.class_embedding.to(x.dtype).expand(b, 1, -1)
            x = v.ln_pre(torch.cat([cls, x], 1) + self.pos_embed(h, w).to(x.dtype))
            batch_first = getattr(v.transformer, "batch_first", True)
            x = x if batch_first else x.transpose(0, 1)
            for blk in v.transformer.resblocks[:self.block]:
                x = blk(x)
            x = x if batch_first else x.transpose(0, 1)
            blk = v.transformer.resblocks[self.block]
            y = blk.ln_1(x)
            wk = blk.attn.in_proj_weight[d:2 * d]
            bk = blk.attn.in_proj_bias[d:2 * d] if blk.attn.in_proj_bias is not None else None
            keys = F.linear(y, wk, bk)[:, 1:].float()  # [B, h*w, D]
        return keys.transpose(1, 2).reshape(b, d, h, w)

