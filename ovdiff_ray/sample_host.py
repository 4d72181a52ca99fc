"""The host path of one class (the reference the device pipeline is checked against; `bench/class_bench.py`'s
`old`): the models' outputs cross to the host and everything between them runs in numpy, one image at a time.

Kept as it was before the device pipeline (`pipeline/`), so tests and the class bench can compare the two.
"""
from __future__ import annotations

import time

import numpy as np
import torch
import torch.nn.functional as F

from .models import Extractor, InstanceMasker
from .models.masks import fg_bg_masks
from .pipeline.class_pipeline import EmptySupportError, SampleArtifacts
from .prototypes import ClassPrototypes, masked_pixels, protoset_from_pixels, to_support_indices
from .recipe import Recipe


def _instances(masker: InstanceMasker | None, images: np.ndarray) -> list:
    """Instance masks per image (`[M, H, W]` bool each), batched when the masker can; None per image without one."""
    if masker is None:
        return [None] * len(images)
    if hasattr(masker, "batch"):
        return list(masker.batch(images))
    return [masker(img) for img in images]


def _to_tensor(images: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(images).permute(0, 3, 1, 2).float().div(255)  # [N, 3, H, W]


@torch.no_grad()
def _features(ex: Extractor, images: torch.Tensor, fg: torch.Tensor, bg: torch.Tensor, size: int, batch: int,
              mask_grid: str = "any"):
    """Per image fg/bg pixel features of one extractor, batch by batch (full maps never all in memory)."""
    fgp, bgp = [], []
    for i in range(0, len(images), batch):
        x = images[i:i + batch]
        if size and x.shape[-1] != size:
            x = F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False, antialias=True)
        feats = ex(x).float().cpu()  # [b, D, h, w]
        fgp += masked_pixels(feats, fg[i:i + batch], mask_grid)
        bgp += masked_pixels(feats, bg[i:i + batch], mask_grid)
    return fgp, bgp


def sample_class_host(name: str, recipe: Recipe, models, kind: str = "thing",
                 artifacts: list | None = None, prompt: str = "") -> ClassPrototypes:
    """Build the prototypes of one class. Deterministic for (recipe.seed, name, prompt). `prompt`: the vocabulary's
    words for the class (else the recipe's `prompt_names`, else the name), used for the support-set prompt and
    the class text embedding. Appends SampleArtifacts to `artifacts` when given."""
    t = {"generate": time.perf_counter()}
    g = recipe.generation
    words = g.prompt_name(name, prompt)
    support = models.generator.generate(name, g.n_images, recipe.seed, prompt_name=words)
    t["masks"] = time.perf_counter()
    fgs, bgs = [], []
    for img, attr, inst in zip(support.images, support.attributions, _instances(models.masker, support.images)):
        fg, bg = fg_bg_masks(attr, inst, recipe.masks)
        fgs.append(fg)
        bgs.append(bg)
    fg, bg = np.stack(fgs), np.stack(bgs)
    kept = fg.reshape(len(fg), -1).any(1)
    if artifacts is not None:
        artifacts.append(SampleArtifacts(support.images, support.attributions, fg, bg, kept))
    if not kept.any():
        raise EmptySupportError(f"class {name!r}: every one of {len(fg)} support images has an empty foreground")
    images = _to_tensor(support.images[kept])
    fg_t, bg_t = torch.from_numpy(fg[kept]), torch.from_numpy(bg[kept])
    t["features"] = time.perf_counter()
    sets, kmeans_s = {}, 0.0
    p = recipe.prototypes
    for cfg, ex in zip(recipe.extractors, models.extractors):
        fgp, bgp = _features(ex, images, fg_t, bg_t, cfg.input_size, g.batch_size, p.mask_grid)
        k0 = time.perf_counter()
        sets[cfg.name] = protoset_from_pixels(fgp, bgp, ex.dim, p.parts, p.kmeans_iters, p.seed, p.max_pixels,
                                              models.device)
        to_support_indices(sets[cfg.name], np.nonzero(kept)[0])
        kmeans_s += time.perf_counter() - k0
    t["text"] = time.perf_counter()
    text = models.classifier.encode_text([recipe.classifier.text_template.format(name=words)])[0]
    t["end"] = time.perf_counter()
    marks = list(t.values())
    seconds = {k: marks[i + 1] - marks[i] for i, k in enumerate(list(t)[:-1])}
    seconds["features"] -= kmeans_s
    seconds["prototypes"] = kmeans_s
    split = getattr(models.generator, "timings", None)  # diffusers: pipeline vs attribution capture
    if split and "attribution" in split:
        seconds["attribution"] = split["attribution"]
        seconds["generate"] -= split["attribution"]
    info = {"n_images": int(len(fg)), "kept": int(kept.sum()), "seconds": seconds, "total_s": marks[-1] - marks[0]}
    return ClassPrototypes(name, kind, sets, np.asarray(text, np.float32), info, prompt=words if words != name else "")
