"""Typed recipe: every knob of the method, loaded from YAML (`bank/recipes/*.yaml`).

A recipe is plain data. Unknown keys, wrong types and missing required values are errors that name the key
(`generation.steps: expected int, got str`). `Recipe.to_dict()` round-trips and is what a bank's manifest records.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

REPO_ROOT = Path(__file__).resolve().parents[1]
RECIPE_DIRS = [Path(p) for p in os.environ.get("OVDIFF_RECIPE_PATH", "").split(os.pathsep) if p] + [
    REPO_ROOT / "bank" / "recipes"
]
MAX_RECIPE_BYTES = 1 << 20


class RecipeError(ValueError):
    """A recipe that does not parse or does not validate; the message names the file and key."""


@dataclass
class GenerationConfig:
    """Support-set generation (OVDIFF.md section 1)."""

    generator: str = "diffusers"  # diffusers | toy
    model: str = ""  # model reference: hub id, folder, s3:// prefix, or tiny:<name>
    n_images: int = 64
    batch_size: int = 8
    steps: int = 30
    guidance: float = 8.0
    scheduler: str = "dpm_multistep"  # dpm_multistep | ddim | pndm
    resolution: int = 512
    prompt_template: str = "A good picture of a {name}"
    negative_prompt: str = "text, low quality, blurry, cartoon, meme, low resolution, bad, poor, faded"
    prompt_names: dict[str, str] = field(default_factory=dict)  # name -> prompt text, for vocabularies without one
    dtype: str = "auto"  # auto (fp16 on GPU, fp32 on CPU) | fp32 | fp16

    def prompt_name(self, name: str, prompt: str = "") -> str:
        """The words for class `name` wherever it becomes text: the vocabulary's prompt column, else this recipe's
        `prompt_names`, else the name."""
        return prompt or self.prompt_names.get(name, name)


@dataclass
class AttributionConfig:
    """DAAM-style cross-attention attribution (OVDIFF.md section 2)."""

    grid: int = 64  # heads/layers are upsampled to grid x grid before averaging


@dataclass
class MasksConfig:
    """Foreground/background rule (OVDIFF.md section 3)."""

    method: str = "maskcut"  # maskcut | cutler | none
    maskcut_n: int = 3  # instance masks per image
    maskcut_tau: float = 0.15
    maskcut_size: int = 224  # image side fed to DINO for MaskCut (MaskCut's own: 480)
    maskcut_crf: bool = False  # MaskCut's dense-CRF post-processing (needs pydensecrf2: pip install -e .[crf])
    cutler_weights: str = ""
    cutler_score: float = 0.35
    fg_threshold: float = 0.5  # fallback: fg = attribution > this
    bg_threshold: float = 0.2  # bg = attribution < this
    erode: int = 1


@dataclass
class ExtractorConfig:
    """One dense feature extractor (OVDIFF.md section 4); each gives a separate set of prototypes."""

    name: str = ""
    type: str = ""  # sd | dino | clip | toy
    model: str = ""
    view_size: int = 0  # segmentation: views resized to this square side; 0 = keep (long side capped)
    max_side: int = 800
    timestep: int = 200  # sd only
    layers: list[str] = field(default_factory=list)  # sd only: attention modules whose to_q is taken
    block: int = -1  # dino/clip: block whose keys are taken (-1 = last)
    normalise: str = "default"  # default | imagenet | clip
    input_size: int = 0  # support images resized to this before extraction (0 = as generated)


@dataclass
class PrototypesConfig:
    """Prototype kinds (OVDIFF.md section 5)."""

    parts: int = 32
    kmeans_iters: int = 50  # at most; k-means stops earlier at a fixed point
    seed: int = 0
    max_pixels: int = 200_000  # pixels sampled per region for k-means; 0 = all (the authors)
    mask_grid: str = "any"  # masks onto the feature grid: any (max pooling) | centre (the authors' bilinear > 0)
    kmeans_tol: float = 0.0  # scikit-learn's tolerance stop (the authors' KMeans: 1e-4); 0 = the fixed point only
    # issue 26 (off in paper.yaml): drop thing support images whose classifier agreement with the class text is an
    # outlier below the class's others before prototypes are made (T2S-style CLIP filter; ovdiff_ray/support.py)
    support_filter: str = "off"  # off | clip
    support_filter_mads: float = 3.0  # dropped below median - this x 1.4826 MAD of the class's agreements
    support_filter_keep: float = 0.5  # at least this share of a class's images stays


@dataclass
class ClassifierConfig:
    """Pre-filter classifier and text embeddings (OVDIFF.md sections 5-6)."""

    type: str = "clip"  # clip | toy
    model: str = ""
    text_template: str = "a {name}"
    image_size: int = 224


@dataclass
class SuperpixelConfig:
    """scikit-image superpixels for `segmentation.regions: superpixels` (FreeDA's defaults: felzenszwalb on the image
    in [0, 1], scale 100, sigma 1.0, min_size 20). Each method reads only its own keys."""

    method: str = "felzenszwalb"  # felzenszwalb | slic | quickshift | watershed
    scale: float = 100.0  # felzenszwalb: higher -> larger segments
    sigma: float = 1.0  # felzenszwalb, slic, quickshift: Gaussian pre-smoothing
    min_size: int = 20  # felzenszwalb: smallest segment (pixels)
    n_segments: int = 250  # slic and watershed: about how many segments
    slic_compactness: float = 10.0  # slic: colour vs space (higher = squarer)
    kernel_size: float = 3.0  # quickshift
    max_dist: float = 6.0  # quickshift
    ratio: float = 0.5  # quickshift: colour vs space
    watershed_compactness: float = 0.001  # watershed on the Sobel gradient (compact watershed)
    # > 0: images over this many pixels are segmented downscaled to it (min_size scaled alike), region ids upsampled
    # nearest: ~2.6x faster at 448 x 448 for 0.09 s (bench/segment_bench.py `regions.*`); 0 = full resolution
    max_pixels: int = 0


@dataclass
class SamRegionsConfig:
    """SAM automatic masks for `segmentation.regions: sam` (CorrCLIP's settings: 8 points per side, predicted-IoU
    and stability thresholds 0.4, one mask per point). `model`: hub id, folder, s3:// prefix or `tiny:sam`."""

    model: str = "facebook/sam-vit-base"
    points_per_side: int = 8  # a points_per_side^2 grid of point prompts
    points_per_batch: int = 64
    pred_iou_thresh: float = 0.4
    stability_score_thresh: float = 0.4
    crops_nms_thresh: float = 0.7  # box IoU of the NMS between masks
    multimask_output: bool = False  # one mask per point (CorrCLIP); true = SAM's three, all filtered


@dataclass
class SegmentationConfig:
    """Test-time segmentation (OVDIFF.md section 6); booleans are ablation switches."""

    short_side: int = 448
    windows: list[list[int]] = field(default_factory=lambda: [[448, 224], [336, 224]])
    whole_image: bool = True
    prefilter: bool = True
    max_candidates: int = 10
    background: bool = True
    stuff_filter: bool = True
    stuff_threshold: float = 0.85
    class_mean_only: bool = False
    retrieval_classes: int = 64  # no pre-filter over a large vocabulary: faiss class retrieval keeps this many
    # beyond the paper (issue 10; off in paper.yaml): see ovdiff_ray/prefilter.py and ovdiff_ray/matching.py
    subset_search: str = "exhaustive"  # exhaustive (paper, 2^n - 1 prompts) | greedy | beam
    subset_beam: int = 4  # subsets kept per size by the beam search
    subset_exhaustive_upto: int = 4  # bounded searches are exhaustive over at most this many candidates
    stuff_filter_rule: str = "fixed"  # fixed (paper: cosine > stuff_threshold) | self (per stuff class, its own spread)
    stuff_min_area: float = 0.0  # > 0: a stuff class is kept only if it wins this share of the whole-image view
    # issue 23 (off in paper.yaml): see ovdiff_ray/precedence.py
    stuff_opening: float = 0.0  # > 0: stuff presence counts won pixels after an opening of this radius (x short side)
    background_min_area: float = 0.0  # > 0: background is matched only if it wins this share of the whole view
    background_margin: float = 0.0  # > 0 (issue 27): ... and a pixel counts only where background leads by this
    # issue 27 (off in paper.yaml): thing classes proposed by the prototypes past the pre-filter (proposals.py)
    thing_proposals: int = 0  # > 0: at most this many thing classes the pre-filter dropped are proposed per image
    proposal_grid: int = 16  # cells on the short side of the whole view that vote for their nearest class
    proposal_min_share: float = 0.03  # a thing is proposed when it is the nearest class in this share of cells
    proposal_min_area: float = 0.02  # a proposal marks a region if it wins this share of the whole view
    proposal_context: float = 0.25  # the region's box grows by this x its size before the classifier sees it
    pamr_iters: int = 10
    pamr_dilations: list[int] = field(default_factory=lambda: [1, 2, 4, 8, 12, 24])
    # labels snapped to class-agnostic regions (regions.py): none (the paper) | superpixels | sam
    regions: str = "none"
    regions_mode: str = "vote"  # vote: each region takes its pixels' majority label | mean: region mean of scores
    regions_stage: str = "after_pamr"  # with PAMR on: snap its output (after_pamr) or its input (before_pamr)
    superpixels: SuperpixelConfig = field(default_factory=SuperpixelConfig)
    sam: SamRegionsConfig = field(default_factory=SamRegionsConfig)
    # issue 21: pixels under this confidence (ovdiff_ray/confidence.py) are "unsure", left unlabelled; 0 = off
    min_confidence: float = 0.0


@dataclass
class BankConfig:
    """What a bank keeps beside the prototypes (issue 26): each class's support-set record (`store/support.py`)."""

    support_record: str = "thumbnails"  # thumbnails | full (images as generated, PNG) | none (no record)
    thumbnail_size: int = 192  # long side of a thumbnail (128-256 px); images are never upscaled


@dataclass
class Recipe:
    name: str = ""
    seed: int = 0
    generation: GenerationConfig = field(default_factory=GenerationConfig)
    attribution: AttributionConfig = field(default_factory=AttributionConfig)
    masks: MasksConfig = field(default_factory=MasksConfig)
    extractors: list[ExtractorConfig] = field(default_factory=list)
    prototypes: PrototypesConfig = field(default_factory=PrototypesConfig)
    classifier: ClassifierConfig = field(default_factory=ClassifierConfig)
    segmentation: SegmentationConfig = field(default_factory=SegmentationConfig)
    bank: BankConfig = field(default_factory=BankConfig)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def sha256(self) -> str:
        blob = json.dumps(self.to_dict(), sort_keys=True).encode()
        return hashlib.sha256(blob).hexdigest()

    def model_refs(self) -> dict[str, str]:
        """Every model reference in the recipe, keyed by where it is used."""
        refs = {"generation": self.generation.model, "classifier": self.classifier.model}
        refs.update({f"extractor.{e.name}": e.model for e in self.extractors})
        if self.segmentation.regions == "sam":
            refs["segmentation.sam"] = self.segmentation.sam.model
        return {k: v for k, v in refs.items() if v}

    def summary(self) -> str:
        ex = ",".join(f"{e.name}:{e.type}" for e in self.extractors)
        g = self.generation
        return (f"{self.name}: {g.generator} N={g.n_images} steps={g.steps} cfg={g.guidance} "
                f"masks={self.masks.method} K={self.prototypes.parts} extractors=[{ex}]")


_CHOICES = {
    "generation.generator": {"diffusers", "toy"},
    "generation.scheduler": {"dpm_multistep", "ddim", "pndm"},
    "generation.dtype": {"auto", "fp32", "fp16"},
    "masks.method": {"maskcut", "cutler", "none"},
    "extractors.type": {"sd", "dino", "clip", "toy"},
    "extractors.normalise": {"default", "imagenet", "clip"},
    "classifier.type": {"clip", "toy"},
    "prototypes.mask_grid": {"any", "centre"},
    "prototypes.support_filter": {"off", "clip"},
    "bank.support_record": {"thumbnails", "full", "none"},
    "segmentation.subset_search": {"exhaustive", "greedy", "beam"},
    "segmentation.stuff_filter_rule": {"fixed", "self"},
    "segmentation.regions": {"none", "superpixels", "sam"},
    "segmentation.regions_mode": {"vote", "mean"},
    "segmentation.regions_stage": {"before_pamr", "after_pamr"},
    "segmentation.superpixels.method": {"felzenszwalb", "slic", "quickshift", "watershed"},
}


def _check_type(value: Any, tp: Any, key: str) -> Any:
    origin = typing.get_origin(tp)
    if dataclasses.is_dataclass(tp):
        return _build(tp, value, key)
    if origin is list:
        if not isinstance(value, list):
            raise RecipeError(f"{key}: expected a list, got {type(value).__name__}")
        (item_tp,) = typing.get_args(tp)
        return [_check_type(v, item_tp, f"{key}[{i}]") for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            raise RecipeError(f"{key}: expected a mapping, got {type(value).__name__}")
        k_tp, v_tp = typing.get_args(tp)
        return {_check_type(k, k_tp, key): _check_type(v, v_tp, f"{key}.{k}") for k, v in value.items()}
    if tp is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if tp in (int, float, str, bool):
        if isinstance(value, bool) and tp is not bool or not isinstance(value, tp):
            raise RecipeError(f"{key}: expected {tp.__name__}, got {type(value).__name__} ({value!r})")
        return value
    if isinstance(tp, types.UnionType):  # pragma: no cover - not used today
        return value
    raise RecipeError(f"{key}: unsupported type {tp}")


def _build(cls: type, data: Any, prefix: str) -> Any:
    if not isinstance(data, dict):
        raise RecipeError(f"{prefix or 'recipe'}: expected a mapping, got {type(data).__name__}")
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - names)
    if unknown:
        where = f"{prefix}." if prefix else ""
        raise RecipeError(f"unknown key {where}{unknown[0]} (known: {', '.join(sorted(names))})")
    kwargs = {}
    for name, value in data.items():
        key = f"{prefix}.{name}" if prefix else name
        kwargs[name] = _check_type(value, hints[name], key)
        choice_key = key.split("[")[0] if not key.startswith("extractors") else "extractors." + name
        allowed = _CHOICES.get(choice_key)
        if allowed is not None and kwargs[name] not in allowed:
            raise RecipeError(f"{key}: {kwargs[name]!r} is not one of {sorted(allowed)}")
    return cls(**kwargs)


def _validate(r: Recipe) -> None:
    if not r.extractors:
        raise RecipeError("extractors: at least one extractor is required")
    seen = set()
    for i, e in enumerate(r.extractors):
        if not e.name or not e.type:
            raise RecipeError(f"extractors[{i}]: 'name' and 'type' are required")
        if e.name in seen:
            raise RecipeError(f"extractors[{i}].name: duplicate extractor name {e.name!r}")
        seen.add(e.name)
        if e.type != "toy" and not e.model:
            raise RecipeError(f"extractors[{i}].model: missing model reference for extractor {e.name!r}")
    if r.generation.generator == "diffusers" and not r.generation.model:
        raise RecipeError("generation.model: missing model reference for the diffusers generator")
    if r.classifier.type == "clip" and not r.classifier.model:
        raise RecipeError("classifier.model: missing model reference for the CLIP classifier")
    if r.generation.n_images < 1 or r.generation.batch_size < 1:
        raise RecipeError("generation.n_images and generation.batch_size must be >= 1")
    if "{name}" not in r.generation.prompt_template:
        raise RecipeError("generation.prompt_template: must contain {name}")
    if r.prototypes.parts < 0:
        raise RecipeError("prototypes.parts: must be >= 0")
    if r.prototypes.max_pixels < 0:
        raise RecipeError("prototypes.max_pixels: must be >= 0 (0 = all pixels)")
    if not 0.0 <= r.segmentation.min_confidence <= 1.0:
        raise RecipeError(f"segmentation.min_confidence: {r.segmentation.min_confidence} is not in [0, 1] (0 = off)")
    pf = r.prototypes
    if pf.support_filter_mads <= 0 or not 0 < pf.support_filter_keep <= 1:
        raise RecipeError(f"prototypes: support_filter_mads must be > 0 and support_filter_keep in (0, 1] (got "
                          f"{pf.support_filter_mads}, {pf.support_filter_keep})")
    if not 32 <= r.bank.thumbnail_size <= 1024:
        raise RecipeError(f"bank.thumbnail_size: {r.bank.thumbnail_size} is not in 32..1024 (128-256 suggested)")
    sam = r.segmentation.sam
    if r.segmentation.regions == "sam" and not sam.model:
        raise RecipeError("segmentation.sam.model: missing model reference for regions: sam")
    if not 1 <= sam.points_per_side <= 64 or sam.points_per_batch < 1:
        raise RecipeError("segmentation.sam.points_per_side must be in 1..64 and points_per_batch >= 1")
    sg = r.segmentation
    if not (0 <= sg.stuff_opening < 0.5 and 0 <= sg.background_min_area <= 1 and 0 <= sg.stuff_min_area <= 1):
        raise RecipeError("segmentation: stuff_opening must be in [0, 0.5), stuff_min_area and background_min_area "
                          f"in [0, 1] (got {sg.stuff_opening}, {sg.stuff_min_area}, {sg.background_min_area})")
    if not 0 <= sg.background_margin <= 1 or (sg.background_margin > 0 and sg.background_min_area <= 0):
        raise RecipeError(f"segmentation: background_margin must be in [0, 1] and needs background_min_area > 0 "
                          f"(got {sg.background_margin}, background_min_area {sg.background_min_area})")
    if not (0 <= sg.thing_proposals <= 64 and 1 <= sg.proposal_grid <= 128 and 0 <= sg.proposal_min_share <= 1
            and 0 <= sg.proposal_min_area <= 1 and 0 <= sg.proposal_context <= 4):
        raise RecipeError("segmentation: thing_proposals must be in 0..64, proposal_grid in 1..128, "
                          "proposal_min_share and proposal_min_area in [0, 1], proposal_context in [0, 4] (got "
                          f"{sg.thing_proposals}, {sg.proposal_grid}, {sg.proposal_min_share}, {sg.proposal_min_area}, "
                          f"{sg.proposal_context})")
    sp = r.segmentation.superpixels
    if sp.min_size < 1 or sp.n_segments < 1 or sp.scale <= 0:
        raise RecipeError("segmentation.superpixels: min_size and n_segments must be >= 1 and scale > 0")
    if sp.max_pixels != 0 and sp.max_pixels < 1024:
        raise RecipeError(f"segmentation.superpixels.max_pixels: 0 (full resolution) or at least 1024, got "
                          f"{sp.max_pixels}")


def recipe_from_dict(data: dict[str, Any], source: str = "recipe") -> Recipe:
    try:
        r = _build(Recipe, data, "")
        _validate(r)
    except RecipeError as e:
        raise RecipeError(f"{source}: {e}") from None
    return r


def resolve_recipe_path(name_or_path: str | os.PathLike) -> Path:
    p = Path(name_or_path)
    if p.suffix in (".yaml", ".yml") or p.exists():
        if not p.is_file():
            raise RecipeError(f"recipe file {p} does not exist")
        return p
    for d in RECIPE_DIRS:
        cand = d / f"{name_or_path}.yaml"
        if cand.is_file():
            return cand
    known = sorted({q.stem for d in RECIPE_DIRS if d.is_dir() for q in d.glob("*.yaml")})
    raise RecipeError(f"unknown recipe {str(name_or_path)!r}: not a file, and not one of {known}")


def load_recipe(name_or_path: str | os.PathLike) -> Recipe:
    """Load a recipe by name (`bank/recipes/<name>.yaml`) or by path."""
    path = resolve_recipe_path(name_or_path)
    if path.stat().st_size > MAX_RECIPE_BYTES:
        raise RecipeError(f"{path}: larger than {MAX_RECIPE_BYTES} bytes")
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (yaml.YAMLError, UnicodeDecodeError) as e:
        raise RecipeError(f"{path}: not valid YAML: {e}") from None
    data = data or {}
    data.setdefault("name", path.stem)
    return recipe_from_dict(data, str(path))
