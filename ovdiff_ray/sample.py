"""One class, whole chain: support images -> attribution -> fg/bg masks -> features -> prototypes.

`sample_class(name, recipe)` runs it in one process (a test, a Ray actor, `ovdiff preview`); `SamplingModels` holds
the models so an actor loads them once.
"""
from __future__ import annotations

import argparse
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from .models import (Classifier, Extractor, Generator, InstanceMasker, build_classifier, build_extractors,
                     build_generator, build_masker, default_device)
from .models.masks import fg_bg_masks
from .prototypes import ClassPrototypes, masked_pixels, protoset_from_pixels
from .recipe import Recipe, load_recipe


class EmptySupportError(RuntimeError):
    """Every support image of a class had an empty foreground."""


@dataclass
class SamplingModels:
    generator: Generator
    extractors: list[Extractor]
    classifier: Classifier
    masker: InstanceMasker | None
    device: str

    @classmethod
    def load(cls, recipe: Recipe, device: str | None = None) -> "SamplingModels":
        device = device or default_device()
        return cls(build_generator(recipe, device), build_extractors(recipe, device), build_classifier(recipe, device),
                   build_masker(recipe, device), device)


@dataclass
class SampleArtifacts:
    """What a preview shows: support images, attributions and the fg/bg masks, per kept image."""

    images: np.ndarray  # [N, H, W, 3] uint8
    attributions: np.ndarray  # [N, H, W] float32
    fg: np.ndarray  # [N, H, W] bool
    bg: np.ndarray  # [N, H, W] bool
    kept: np.ndarray  # [N] bool: images with a non-empty foreground


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


def sample_class(name: str, recipe: Recipe, models: SamplingModels | None = None, kind: str = "thing",
                 artifacts: list | None = None, prompt: str = "") -> ClassPrototypes:
    """Build the prototypes of one class. Deterministic for (recipe.seed, name, prompt). `prompt`: the vocabulary's
    words for the class (else the recipe's `prompt_names`, else the name), used for the support-set prompt and
    the class text embedding. Appends SampleArtifacts to `artifacts` when given."""
    models = models or SamplingModels.load(recipe)
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
        _support_indices(sets[cfg.name], np.nonzero(kept)[0])
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


def _support_indices(ps, kept_index: np.ndarray) -> None:
    """Sources and part members count the kept images; make them support image indices (issue 21: provenance
    names the support images and their seeds, `models.base.image_seed(recipe.seed, name, index)`)."""
    ps.source = np.where(ps.source >= 0, kept_index[np.maximum(ps.source, 0)], -1).astype(np.int16)
    if ps.members is not None:
        for i, m in enumerate(ps.members):
            if m is not None:
                ps.members[i] = tuple(int(kept_index[j]) for j in m)


# -- ovdiff preview ---------------------------------------------------------------------------------------------
def heatmap(a: np.ndarray) -> np.ndarray:
    """[H, W] in [0, 1] -> [H, W, 3] uint8, dark blue (0) to yellow (1)."""
    a = np.clip(a, 0, 1)[..., None]
    lo, hi = np.array([20, 20, 90], np.float32), np.array([255, 230, 40], np.float32)
    return (lo + (hi - lo) * a).astype(np.uint8)


def contact_sheet(a: SampleArtifacts, cols: int = 8, side: int = 160):
    """Images with fg (green) and bg (red) mask outlines, in a grid."""
    from PIL import Image
    from skimage.segmentation import find_boundaries

    tiles = []
    for img, fg, bg, kept in zip(a.images, a.fg, a.bg, a.kept):
        t = img.copy()
        t[find_boundaries(fg, mode="inner")] = (0, 255, 0)
        t[find_boundaries(bg, mode="inner")] = (255, 0, 0)
        if not kept:
            t = (t * 0.35).astype(np.uint8)
        tiles.append(np.asarray(Image.fromarray(t).resize((side, side))))
    rows = -(-len(tiles) // cols)
    sheet = np.full((rows * side, min(cols, len(tiles)) * side, 3), 255, np.uint8)
    for i, tile in enumerate(tiles):
        r, c = divmod(i, cols)
        sheet[r * side:(r + 1) * side, c * side:(c + 1) * side] = tile
    return Image.fromarray(sheet)


def preview_main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="ovdiff preview",
                                 description="Sample one class and write what the bank would hold for it.")
    ap.add_argument("name", help="class name, e.g. 'red circle' (toy) or 'aerosol can'")
    ap.add_argument("--recipe", default="toy", help="recipe name (bank/recipes) or YAML file (default: toy)")
    ap.add_argument("--out", required=True, help="output folder")
    ap.add_argument("--n", type=int, default=None, help="support images (default: the recipe's n_images)")
    ap.add_argument("--kind", choices=["thing", "stuff"], default="thing")
    ap.add_argument("--prompt", default="", help="words for the class in prompts (default: the recipe's "
                    "prompt_names, else the name), like a vocabulary's prompt column")
    a = ap.parse_args(argv)
    from PIL import Image

    from .store.fs import Location
    from .store.shards import write_shard
    from .vocab import VocabError, from_names

    try:
        from_names([a.name])
        recipe = load_recipe(a.recipe)
    except (VocabError, ValueError) as e:
        print(f"ovdiff preview: error: {e}", file=sys.stderr)
        return 2
    if a.n:
        recipe.generation.n_images = a.n
    out = Path(a.out)
    for sub in ("images", "attribution", "masks"):
        (out / sub).mkdir(parents=True, exist_ok=True)
    arts: list[SampleArtifacts] = []
    t0 = time.perf_counter()
    try:
        protos = sample_class(a.name, recipe, kind=a.kind, artifacts=arts, prompt=a.prompt.strip())
    except EmptySupportError as e:
        protos = None
        print(f"ovdiff preview: {e}", file=sys.stderr)
    art = arts[0]
    for i, (img, attr, fg, bg) in enumerate(zip(art.images, art.attributions, art.fg, art.bg)):
        Image.fromarray(img).save(out / "images" / f"{i:03d}.png")
        Image.fromarray(heatmap(attr)).save(out / "attribution" / f"{i:03d}.png")
        m = np.zeros(fg.shape, np.uint8)
        m[bg], m[fg] = 1, 2
        Image.fromarray(np.array([[0, 0, 0], [200, 40, 40], [40, 200, 40]], np.uint8)[m]).save(
            out / "masks" / f"{i:03d}.png")
    contact_sheet(art).save(out / "contact_sheet.png")
    if protos is None:
        return 1
    info = write_shard(Location(str(out)), protos, 0)
    n = {k: len(v) for k, v in protos.sets.items()}
    print(f"preview {a.name!r}: {protos.info['kept']}/{protos.info['n_images']} images kept, prototypes {n}, "
          f"shard {out / info.shard}, contact sheet {out / 'contact_sheet.png'}, {time.perf_counter() - t0:.1f}s")
    return 0
