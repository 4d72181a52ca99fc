"""One class, whole chain: support images -> attribution -> fg/bg masks -> features -> prototypes.

`sample_class(name, recipe)` runs it in one process (a test, a Ray actor, `ovdiff preview`); `SamplingModels` holds
the models so an actor loads them once.
"""
from __future__ import annotations

import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .models import (Classifier, Extractor, Generator, InstanceMasker, build_classifier, build_extractors,
                     build_generator, build_masker, default_device)
from .pipeline.class_pipeline import ClassPipeline, EmptySupportError, SampleArtifacts
from .pipeline.instances import CrfPool
from .prototypes import ClassPrototypes
from .recipe import Recipe, load_recipe
from .cli_help import Parser

__all__ = ["ClassPipeline", "EmptySupportError", "SampleArtifacts", "SamplingModels", "sample_class"]


@dataclass
class SamplingModels:
    generator: Generator
    extractors: list[Extractor]
    classifier: Classifier
    masker: InstanceMasker | None
    device: str
    recipe: Recipe | None = None
    crf_workers: int = 0  # processes for MaskCut's dense CRF beside the device (0: inline)
    _crf: CrfPool | None = None

    @classmethod
    def load(cls, recipe: Recipe, device: str | None = None, crf_workers: int = 0) -> "SamplingModels":
        device = device or default_device()
        return cls(build_generator(recipe, device), build_extractors(recipe, device), build_classifier(recipe, device),
                   build_masker(recipe, device), device, recipe, crf_workers)

    @property
    def crf(self) -> CrfPool:
        """The CRF process pool of these models (started on first use, kept for every class)."""
        if self._crf is None:
            self._crf = CrfPool(self.crf_workers)
        return self._crf

    def pipeline(self, recipe: Recipe | None = None) -> ClassPipeline:
        """The device class pipeline of `recipe` (default: the one the models were loaded for) over these models;
        cheap to build, it shares the models and their CRF pool."""
        recipe = recipe or self.recipe
        if recipe is None:
            raise ValueError("SamplingModels.pipeline: pass the recipe (or load with SamplingModels.load(recipe))")
        return ClassPipeline.from_models(recipe, self, self.crf)


def sample_class(name: str, recipe: Recipe, models: SamplingModels | None = None, kind: str = "thing",
                 artifacts: list | None = None, prompt: str = "", path: str = "device") -> ClassPrototypes:
    """Build the prototypes of one class. Deterministic for (recipe.seed, name, prompt). `prompt`: the vocabulary's
    words for the class (else the recipe's `prompt_names`, else the name), used for the support-set prompt and
    the class text embedding. Appends SampleArtifacts to `artifacts` when given.

    `path`: `device` (the class pipeline on the models' device, `pipeline/`) or `host` (the numpy reference,
    `sample_host.py`, as before the device pipeline)."""
    models = models or SamplingModels.load(recipe)
    if path == "host":
        from .sample_host import sample_class_host  # the reference path, imported only when asked for

        return sample_class_host(name, recipe, models, kind=kind, artifacts=artifacts, prompt=prompt)
    if path != "device":
        raise ValueError(f"sample_class: unknown path {path!r} (device | host)")
    return models.pipeline(recipe)(name, kind=kind, prompt=prompt, artifacts=artifacts)


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
    ap = Parser(prog="ovdiff preview",
                                 description="Sample one class and write what the bank would hold for it.")
    ap.add_argument("name", help="class name, e.g. 'red circle' (toy) or 'aerosol can'")
    ap.add_argument("--recipe", default="toy", help="recipe name (bank/recipes) or YAML file (default: toy)")
    ap.add_argument("--out", required=True, help="output folder")
    ap.add_argument("--n", type=int, default=None, help="support images (default: the recipe's n_images)")
    ap.add_argument("--kind", choices=["thing", "stuff"], default="thing", help="the class's kind")
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
