"""Time per class of prototype sampling, by stage (generate, attribution, masks, features, k-means).

1. The tiny and toy recipes through `sample_class`, as the tests and the demo run them.
2. The paper's real architectures with random weights (SD 1.5 UNet/VAE/text encoder built from their configs, timm
   `vit_base_patch8_224`, open_clip `ViT-B-16`): N support images at 512 px, fp32 on CPU (fp16 on GPU), a few
   denoising steps, extrapolated to the paper's 30 steps (and to N = 64). Reports each stage's share and the share
   of time spent outside model forward passes (goal: under 10%).

Prints `name: value` lines.

    python bench/sample_bench.py [--quick] [--steps 2] [--n 2] [--resolution 512] [--device cpu] [--skip-real]
"""
from __future__ import annotations

import argparse
import dataclasses
import logging
import os
import sys
import tempfile
import time
import warnings
from collections import defaultdict

import torch

warnings.filterwarnings("ignore")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("OVDIFF_CACHE", os.path.join(tempfile.gettempdir(), "ovdiff-bench-cache"))

from ovdiff_ray.recipe import ClassifierConfig, load_recipe  # noqa: E402
from ovdiff_ray.sample import SamplingModels, sample_class  # noqa: E402

STAGES = ("generate", "attribution", "masks", "features", "kmeans", "text")
CLASSES = ["aerosol can", "picture frame", "dog"]
TOY_CLASSES = ["red circle", "blue square", "green triangle"]


def out(name: str, value) -> None:
    print(f"{name}: {value:.4g}" if isinstance(value, float) else f"{name}: {value}", flush=True)


def stage_seconds(protos, models) -> dict[str, float]:
    """sample_class's own timings, with the generator's split of generate vs attribution when it reports one."""
    s = dict(protos.info["seconds"])
    split = getattr(models.generator, "timings", None) or {"generate": s["generate"], "attribution": 0.0}
    return {"generate": split["generate"], "attribution": split["attribution"], "masks": s["masks"],
            "features": s["features"], "kmeans": s["prototypes"], "text": s["text"],
            "total": protos.info["total_s"]}


def bench_recipe(name: str, classes: list[str], device: str) -> None:
    recipe = load_recipe(name)
    t0 = time.perf_counter()
    models = SamplingModels.load(recipe, device)
    out(f"{name}.load_s", time.perf_counter() - t0)
    sample_class(classes[0], recipe, models)  # warm-up: first calls pay one-off kernel setup
    acc = defaultdict(float)
    for c in classes:
        for k, v in stage_seconds(sample_class(c, recipe, models), models).items():
            acc[k] += v
    out(f"{name}.classes", len(classes))
    out(f"{name}.n_images", recipe.generation.n_images)
    for k in (*STAGES, "total"):
        out(f"{name}.{k}_s_per_class", acc[k] / len(classes))


# ---------------------------------------------------------------------------------------------------------------
# real architectures, random weights


class ForwardTimer:
    """Seconds inside model forward passes: hooks on every module, only the outermost call counts.

    Keyed by `<model>.<stage>`, where `stage()` names the current stage (e.g. generate vs other)."""

    def __init__(self, sync: bool):
        self.sync, self.depth, self.start, self.key = sync, 0, 0.0, ""
        self.seconds: dict[str, float] = defaultdict(float)
        self.stage = lambda: "all"

    def attach(self, label: str, root: torch.nn.Module) -> None:
        for m in root.modules():
            m.register_forward_pre_hook(lambda *a, _l=label: self._enter(_l))
            m.register_forward_hook(lambda *a: self._exit())

    def _now(self) -> float:
        if self.sync:
            torch.cuda.synchronize()
        return time.perf_counter()

    def _enter(self, label: str) -> None:
        if self.depth == 0:
            self.key, self.start = f"{label}.{self.stage()}", self._now()
        self.depth += 1

    def _exit(self) -> None:
        self.depth -= 1
        if self.depth == 0:
            self.seconds[self.key] += self._now() - self.start

    def total(self) -> float:
        return sum(self.seconds.values())


def real_sd_pipeline(device: str, dtype: torch.dtype):
    """StableDiffusionPipeline with the SD 1.5 architecture and random weights (the real BPE tokenizer)."""
    from diffusers import AutoencoderKL, DPMSolverMultistepScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    from ovdiff_ray.models.weights import quiet_loading, resolve_model

    torch.manual_seed(0)
    unet = UNet2DConditionModel(sample_size=64, cross_attention_dim=768)  # defaults = the SD 1.x UNet
    vae = AutoencoderKL(block_out_channels=(128, 256, 512, 512), down_block_types=("DownEncoderBlock2D",) * 4,
                        up_block_types=("UpDecoderBlock2D",) * 4, layers_per_block=2, latent_channels=4,
                        sample_size=512)
    text = CLIPTextModel(CLIPTextConfig(vocab_size=49408, hidden_size=768, intermediate_size=3072,
                                        num_hidden_layers=12, num_attention_heads=12, max_position_embeddings=77,
                                        hidden_act="quick_gelu", projection_dim=768))
    tokenizer = CLIPTokenizer.from_pretrained(resolve_model("tiny:sd") + "/tokenizer")
    scheduler = DPMSolverMultistepScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                                            num_train_timesteps=1000, steps_offset=1)
    pipe = StableDiffusionPipeline(vae=vae, text_encoder=text, tokenizer=tokenizer, unet=unet, scheduler=scheduler,
                                   safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    with quiet_loading():
        return pipe.to(device, dtype)


def real_models(recipe, device: str):
    import timm

    from ovdiff_ray.models.classifier import ClipClassifier
    from ovdiff_ray.models.diffusion import DiffusionGenerator, torch_dtype
    from ovdiff_ray.models.extractors import ClipExtractor, DinoExtractor, SDExtractor, load_open_clip
    from ovdiff_ray.models.masks import MaskCut

    pipe = real_sd_pipeline(device, torch_dtype(recipe.generation.dtype, device))
    dino_model = timm.create_model("vit_base_patch8_224", pretrained=False, dynamic_img_size=True,
                                   num_classes=0).to(device).eval()
    cfg = {e.type: e for e in recipe.extractors}
    logging.getLogger().setLevel(logging.ERROR)  # open_clip warns that ViT-B-16 has no pretrained weights
    clip_model = load_open_clip(recipe.classifier.model, device)[0]  # "open_clip:ViT-B-16": random weights
    dino = DinoExtractor(dino_model, cfg["dino"], device)
    extractors = [SDExtractor(pipe, cfg["sd"], device), dino, ClipExtractor(clip_model, cfg["clip"], device)]
    models = SamplingModels(DiffusionGenerator(recipe, device, pipe=pipe), extractors,
                            ClipClassifier(recipe.classifier, device), MaskCut(dino, recipe.masks), device)
    return models, {"unet": pipe.unet, "vae": pipe.vae, "text_encoder": pipe.text_encoder, "dino": dino_model,
                    "clip": clip_model}


def real_recipe(n: int, steps: int, res: int, dtype: str):
    r = load_recipe("paper")
    r.generation = dataclasses.replace(r.generation, n_images=n, batch_size=n, steps=steps, resolution=res,
                                       dtype=dtype)
    r.extractors = [dataclasses.replace(e, input_size=min(e.input_size, res) if e.input_size else res)
                    for e in r.extractors]
    r.classifier = ClassifierConfig(model="open_clip:ViT-B-16", image_size=224)
    return r


def bench_real(n: int, steps: int, res: int, device: str) -> None:
    dtype = "fp16" if device.startswith("cuda") else "fp32"
    recipe = real_recipe(n, steps, res, dtype)
    t0 = time.perf_counter()
    models, roots = real_models(recipe, device)
    out("real.build_s", time.perf_counter() - t0)
    for k, v in (("n_images", n), ("steps", steps), ("resolution", res), ("dtype", dtype), ("device", device)):
        out(f"real.{k}", v)
    timer = ForwardTimer(sync=device.startswith("cuda"))
    store = models.generator.store
    timer.stage = lambda: "generate" if store.active else "other"
    for label, m in roots.items():
        timer.attach(label, m)
    protos = sample_class("aerosol can", recipe, models)
    s = stage_seconds(protos, models)
    total = s["total"]
    for k in STAGES:
        out(f"real.{k}_s", s[k])
        out(f"real.{k}_share", s[k] / total)
    out("real.total_s", total)
    for k, v in sorted(timer.seconds.items()):
        out(f"real.forward.{k}_s", v)
    # attribution capture runs inside the UNet's forward hooks: count it as outside the model's own work
    outside = total - timer.total() + s["attribution"]
    out("real.forward_s", timer.total())
    out("real.outside_forward_s", outside)
    out("real.outside_forward_share", outside / total)
    # extrapolate: 30 steps (UNet time per step), then N = 64 images (linear in N)
    per_step = timer.seconds["unet.generate"] / steps
    gen30 = s["generate"] + (30 - steps) * per_step
    attr30 = s["attribution"] * 30 / steps
    total30 = total - s["generate"] - s["attribution"] + gen30 + attr30
    out("real.unet_s_per_step", per_step)
    out("real.extrapolated_30_steps.generate_s", gen30)
    out("real.extrapolated_30_steps.attribution_s", attr30)
    out(f"real.extrapolated_30_steps.total_s_per_class_n{n}", total30)
    out("real.extrapolated_30_steps.total_s_per_class_n64", total30 * 64 / n)
    out("real.extrapolated_30_steps.outside_forward_share", (outside - s["attribution"] + attr30) / total30)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="1 class per recipe; real models at 256 px, N=1, 1 step")
    ap.add_argument("--steps", type=int, default=2, help="denoising steps for the real architectures (default 2)")
    ap.add_argument("--n", type=int, default=2, help="support images for the real architectures (default 2)")
    ap.add_argument("--resolution", type=int, default=512)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--skip-real", action="store_true", help="tiny and toy recipes only")
    a = ap.parse_args(argv)
    if a.quick:
        a.steps, a.n, a.resolution = 1, 1, 256
    classes = CLASSES[:1] if a.quick else CLASSES[:3]
    out("torch_threads", torch.get_num_threads())
    bench_recipe("tiny", classes, a.device)
    bench_recipe("toy", TOY_CLASSES[:len(classes)], a.device)
    if not a.skip_real:
        bench_real(a.n, a.steps, a.resolution, a.device)
    return 0


if __name__ == "__main__":
    sys.exit(main())
