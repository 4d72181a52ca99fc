"""Tiny random models of the paper's architectures, built offline from configs (no hub).

Each builder writes a folder in the library's own format, so it loads back through exactly the code path real
weights take: `tiny:sd` a diffusers `StableDiffusionPipeline` (`save_pretrained`), `tiny:dino` a timm ViT/8
(`config.json` + `model.safetensors`, loaded with `timm.create_model("local-dir:...")`), `tiny:clip` an open_clip
ViT/16 (`open_clip_config.json` + `open_clip_model.safetensors`, loaded with `"local-dir:..."`), `tiny:sam` a transformers
`SamModel` + `SamProcessor` (`save_pretrained`). Builds are seeded,
so the same version gives the same weights on every machine. `weights.resolve_model("tiny:<name>")` caches them.
"""
from __future__ import annotations

import gzip
import json
from pathlib import Path
from typing import Callable

import torch

VERSION = 1  # bump when a builder changes, so caches rebuild
SEED = 1234


def clip_bpe() -> tuple[dict[str, int], list[str]]:
    """open_clip's bundled BPE as a transformers CLIP vocabulary: (vocab, merges); ids equal open_clip's."""
    from open_clip.tokenizer import bytes_to_unicode, default_bpe

    lines = gzip.open(default_bpe()).read().decode("utf-8").split("\n")
    merges = lines[1:49152 - 256 - 2 + 1]
    words = list(bytes_to_unicode().values())
    words += [w + "</w>" for w in words]
    words += ["".join(m.split()) for m in merges]
    words += ["<|startoftext|>", "<|endoftext|>"]
    return {w: i for i, w in enumerate(words)}, merges


def write_clip_tokenizer(folder: Path) -> None:
    """`vocab.json` + `merges.txt` in `folder`, loadable with `CLIPTokenizer.from_pretrained(folder)`."""
    from transformers import CLIPTokenizer

    vocab, merges = clip_bpe()
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "vocab.json").write_text(json.dumps(vocab), encoding="utf-8")
    (folder / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n", encoding="utf-8")
    CLIPTokenizer.from_pretrained(folder, model_max_length=77).save_pretrained(folder)


def build_sd(folder: Path) -> None:
    """Stable Diffusion 1.x layout: UNet (32, 64), 4-block VAE (x8 latents), 2-layer CLIP text model."""
    from diffusers import AutoencoderKL, DPMSolverMultistepScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    torch.manual_seed(SEED)
    unet = UNet2DConditionModel(
        sample_size=8, in_channels=4, out_channels=4, layers_per_block=2, block_out_channels=(32, 64),
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=32, attention_head_dim=2, norm_num_groups=32)
    vae = AutoencoderKL(
        in_channels=3, out_channels=3, latent_channels=4, layers_per_block=1, norm_num_groups=8,
        block_out_channels=(8, 16, 16, 16), down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4, sample_size=64)
    text = CLIPTextModel(CLIPTextConfig(
        vocab_size=49408, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
        max_position_embeddings=77, projection_dim=32, bos_token_id=49406, eos_token_id=49407, pad_token_id=49407))
    write_clip_tokenizer(folder / "tokenizer")
    tokenizer = CLIPTokenizer.from_pretrained(folder / "tokenizer")
    scheduler = DPMSolverMultistepScheduler(
        beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", num_train_timesteps=1000, steps_offset=1)
    pipe = StableDiffusionPipeline(
        vae=vae, text_encoder=text, tokenizer=tokenizer, unet=unet, scheduler=scheduler, safety_checker=None,
        feature_extractor=None, image_encoder=None, requires_safety_checker=False)
    pipe.save_pretrained(folder, safe_serialization=True)


def build_dino(folder: Path) -> None:
    """timm `vit_base_patch8_224` architecture at width 64, depth 2 (DINO-style: no head)."""
    import timm
    from timm.models import save_for_hf

    args = dict(embed_dim=64, depth=2, num_heads=2, num_classes=0)
    torch.manual_seed(SEED)
    model = timm.create_model("vit_base_patch8_224", pretrained=False, **args)
    save_for_hf(model, str(folder), model_args=args, safe_serialization=True)


TINY_CLIP_CFG = {
    "embed_dim": 32,
    "vision_cfg": {"image_size": 64, "layers": 2, "width": 64, "head_width": 32, "patch_size": 16},
    "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 2},
}
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


def build_clip(folder: Path) -> None:
    """open_clip ViT/16 (2 layers, width 64) with a 2-layer text tower; `open_clip_config.json` + safetensors."""
    import open_clip
    from safetensors.torch import save_file

    torch.manual_seed(SEED)
    model = open_clip.CLIP(**TINY_CLIP_CFG)
    folder.mkdir(parents=True, exist_ok=True)
    cfg = {"model_cfg": TINY_CLIP_CFG,
           "preprocess_cfg": {"mean": list(CLIP_MEAN), "std": list(CLIP_STD), "interpolation": "bicubic",
                              "resize_mode": "shortest"}}
    (folder / "open_clip_config.json").write_text(json.dumps(cfg, indent=2))
    state = {k: v.contiguous() for k, v in model.state_dict().items()}
    save_file(state, str(folder / "open_clip_model.safetensors"))


TINY_SAM_SIZE = 24  # the image side SAM's processor resizes and pads to (patch 2 -> 12 x 12 embeddings)


def build_sam(folder: Path) -> None:
    """transformers `SamModel` at the size of transformers' own SAM tests (vision: image 24, patch 2, hidden 36,
    2 layers, 4 heads; prompt encoder and mask decoder at width 32) + a `SamProcessor` that resizes to 24."""
    from transformers import (SamConfig, SamImageProcessor, SamMaskDecoderConfig, SamModel, SamProcessor,
                              SamPromptEncoderConfig, SamVisionConfig)

    torch.manual_seed(SEED)
    s = TINY_SAM_SIZE
    vision = SamVisionConfig(image_size=s, patch_size=2, hidden_size=36, num_hidden_layers=2, num_attention_heads=4,
                             output_channels=32, num_pos_feats=16, window_size=14, global_attn_indexes=[1])
    prompt = SamPromptEncoderConfig(image_size=s, patch_size=2, hidden_size=32, mask_input_channels=4)
    decoder = SamMaskDecoderConfig(hidden_size=32, mlp_dim=64, num_hidden_layers=2, num_attention_heads=4,
                                   iou_head_hidden_dim=32)
    model = SamModel(SamConfig(vision_config=vision, prompt_encoder_config=prompt, mask_decoder_config=decoder))
    model.save_pretrained(folder, safe_serialization=True)
    processor = SamProcessor(SamImageProcessor(size={"longest_edge": s}, pad_size={"height": s, "width": s},
                                               mask_size={"longest_edge": s // 2},
                                               mask_pad_size={"height": s // 2, "width": s // 2}))
    processor.save_pretrained(folder)


BUILDERS: dict[str, Callable[[Path], None]] = {"sd": build_sd, "dino": build_dino, "clip": build_clip,
                                               "sam": build_sam}


def build(name: str, folder: str | Path) -> Path:
    """Write tiny model `name` into `folder` (created). Deterministic: same VERSION, same bytes of weights."""
    if name not in BUILDERS:
        raise ValueError(f"unknown tiny model 'tiny:{name}' (known: {', '.join('tiny:' + k for k in BUILDERS)})")
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    from .weights import quiet_loading

    with torch.random.fork_rng(devices=[]), quiet_loading():
        BUILDERS[name](folder)
    return folder
