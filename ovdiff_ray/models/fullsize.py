"""The paper's models at full size with random weights, built offline from their configs (no hub), for
`bench/class_bench.py`: Stable Diffusion 1.5 (UNet 320-640-1280-1280, VAE 128-256-512-512, CLIP ViT-L/14 text
tower), DINO ViT-B/8 (timm `vit_base_patch8_224`), CLIP ViT-B/16 (`open_clip:ViT-B-16` without a pretrained tag is
open_clip's own random-weights path). Each is written in its library's format and loads back through the same
`from_pretrained` / `local-dir:` code as real weights; the costs are the real models' costs, the outputs are noise.
"""
from __future__ import annotations

from pathlib import Path

import torch

from .tiny import write_clip_tokenizer

SEED = 1234


def build_sd15(folder: Path, device: str = "cpu", dtype: torch.dtype = torch.float16) -> Path:
    """SD 1.5's architecture (its published configs) with random weights -> `save_pretrained(folder)`."""
    from diffusers import AutoencoderKL, DPMSolverMultistepScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    folder = Path(folder)
    torch.manual_seed(SEED)
    with torch.device(device):
        unet = UNet2DConditionModel(
            sample_size=64, in_channels=4, out_channels=4, layers_per_block=2,
            block_out_channels=(320, 640, 1280, 1280),
            down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
            up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
            cross_attention_dim=768, attention_head_dim=8, norm_num_groups=32)
        vae = AutoencoderKL(
            in_channels=3, out_channels=3, latent_channels=4, layers_per_block=2, norm_num_groups=32,
            block_out_channels=(128, 256, 512, 512), down_block_types=("DownEncoderBlock2D",) * 4,
            up_block_types=("UpDecoderBlock2D",) * 4, sample_size=512)
        text = CLIPTextModel(CLIPTextConfig(
            vocab_size=49408, hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
            max_position_embeddings=77, projection_dim=768, hidden_act="quick_gelu", bos_token_id=49406,
            eos_token_id=49407, pad_token_id=49407))
    write_clip_tokenizer(folder / "tokenizer")
    scheduler = DPMSolverMultistepScheduler(
        beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", num_train_timesteps=1000, steps_offset=1)
    pipe = StableDiffusionPipeline(
        vae=vae.to(dtype), text_encoder=text.to(dtype), tokenizer=CLIPTokenizer.from_pretrained(folder / "tokenizer"),
        unet=unet.to(dtype), scheduler=scheduler, safety_checker=None, feature_extractor=None, image_encoder=None,
        requires_safety_checker=False)
    pipe.save_pretrained(folder, safe_serialization=True)
    return folder


def build_dino_b8(folder: Path) -> Path:
    """timm `vit_base_patch8_224` (DINO ViT-B/8: width 768, depth 12, no head) with random weights."""
    import timm
    from timm.models import save_for_hf

    torch.manual_seed(SEED)
    model = timm.create_model("vit_base_patch8_224", pretrained=False, num_classes=0)
    save_for_hf(model, str(folder), model_args={"num_classes": 0}, safe_serialization=True)
    return Path(folder)


CLIP_B16 = "open_clip:ViT-B-16"  # open_clip's random-weights path (no pretrained tag)


def fullsize_refs(root: Path, device: str = "cpu") -> dict[str, str]:
    """Build (once) the random full-size models under `root` -> {"sd": folder, "dino": folder, "clip": ref}."""
    from .weights import quiet_loading

    root = Path(root)
    out = {"sd": root / "sd15", "dino": root / "dino_vitb8"}
    with torch.random.fork_rng(devices=[]), quiet_loading():
        if not (out["sd"] / "model_index.json").is_file():
            build_sd15(out["sd"], device)
        if not (out["dino"] / "config.json").is_file():
            build_dino_b8(out["dino"])
    return {"sd": str(out["sd"]), "dino": str(out["dino"]), "clip": CLIP_B16}
