"""What a class worker's models take in host memory, estimated from the recipe alone (no model is loaded), so that
Ray schedules `build_bank`'s actors by it (`memory=` on the actor pool) instead of by 0 bytes.

    memory = BASE_BYTES + (1 + WORK_MARGIN) x parameter bytes        (models on the CPU)
    memory = BASE_BYTES + the largest model's parameter bytes         (models on a GPU: host copies while loading)

Parameter counts come from the weights when a reference is a local folder (safetensors headers: exact; `.bin`
files: their size at 4 bytes a parameter), else from `KNOWN_PARAMS` (the paper's architectures, by a piece of their
hub reference); `tiny:` / `toy:` models count as nothing. Bytes per parameter: 4 on the CPU (2 with
`generation.dtype: fp16`).
"""
from __future__ import annotations

import json
import struct
from pathlib import Path

from ..recipe import Recipe

BASE_BYTES = 1 << 30  # the worker process itself: Python, torch, Ray's worker, the pipeline's small buffers
WORK_MARGIN = 0.5  # activations, the generator's latents and decodes, the CRF jobs: half the parameters again
KNOWN_PARAMS = {  # parameters by a piece of the hub reference
    "stable-diffusion-v1-5": 1_066_000_000,  # UNet 860M + VAE 84M + CLIP text encoder 123M
    "stable-diffusion-2": 1_290_000_000,
    "vit_base_patch8_224": 86_000_000,  # DINO ViT-B/8
    "vit_base_patch16_224": 86_000_000,
    "vit_small_patch16_224": 22_000_000,
    "vit_small_patch8_224": 22_000_000,
    "ViT-B-16": 150_000_000,  # open_clip image + text towers
    "ViT-B-32": 151_000_000,
    "ViT-L-14": 428_000_000,
}
_ELEMENT_BYTES = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U8": 1,
                  "BOOL": 1, "F8_E4M3": 1, "F8_E5M2": 1}


def _safetensors_params(path: Path) -> int:
    """Elements in a safetensors file, from its header (the first 8 bytes give the header's length). A file whose
    header does not parse is sized as fp32 bytes: loading it is the worker's job, and it fails there with its name."""
    try:
        with open(path, "rb") as f:
            n = struct.unpack("<Q", f.read(8))[0]
            header = json.loads(f.read(min(n, 100 << 20)))
        if not isinstance(header, dict):
            raise ValueError("header is not a JSON object")
    except (OSError, ValueError, struct.error, UnicodeDecodeError):
        return path.stat().st_size // 4
    total = 0
    for k, v in header.items():
        if k == "__metadata__":
            continue
        size = 1
        for s in v["shape"]:
            size *= int(s)
        total += size
    return total


def param_count(ref: str) -> int:
    """Parameters of the model a reference names (0 for tiny / toy models and references we cannot size)."""
    if not ref or ref.startswith(("tiny:", "toy:")):
        return 0
    path = Path(ref.removeprefix("local-dir:")).expanduser()
    if path.is_dir():
        files = [p for p in path.rglob("*") if p.is_file() and "safety_checker" not in p.parts]
        st = [p for p in files if p.suffix == ".safetensors"]
        if st:
            return sum(_safetensors_params(p) for p in st)
        return sum(p.stat().st_size // 4 for p in files if p.suffix in (".bin", ".pth", ".pt"))
    return next((n for key, n in KNOWN_PARAMS.items() if key in ref), 0)


def model_refs(recipe: Recipe) -> list[str]:
    """The distinct model references the class worker loads (a model used twice is loaded once)."""
    refs = []
    if recipe.generation.generator == "diffusers":
        refs.append(recipe.generation.model)
    refs += [e.model for e in recipe.extractors if e.type in ("sd", "dino", "clip")]
    if recipe.classifier.type == "clip":
        refs.append(recipe.classifier.model)
    return list(dict.fromkeys(r for r in refs if r))


def worker_memory(recipe: Recipe, gpu: bool = False) -> int:
    """Bytes of host memory to ask Ray for per class worker (see the module docstring)."""
    per_param = 2 if recipe.generation.dtype == "fp16" else 4
    params = [param_count(r) for r in model_refs(recipe)]
    if gpu:
        return BASE_BYTES + 2 * max(params, default=0)
    return int(BASE_BYTES + (1 + WORK_MARGIN) * per_param * sum(params))
