"""Model families behind small protocols (base.py). `build_*` pick the implementation named by the recipe.

Imports are lazy so a process only pays for the libraries its recipe uses.
"""
from __future__ import annotations

from ..recipe import Recipe
from .base import Classifier, Extractor, Generator, InstanceMasker, SupportSet, image_seed

__all__ = ["Classifier", "Extractor", "Generator", "InstanceMasker", "SupportSet", "image_seed",
           "build_generator", "build_extractors", "build_classifier", "build_masker", "default_device"]


def default_device() -> str:
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def build_generator(recipe: Recipe, device: str | None = None) -> Generator:
    device = device or default_device()
    if recipe.generation.generator == "toy":
        from .toy import ToyGenerator

        return ToyGenerator(recipe)
    from .diffusion import DiffusionGenerator

    return DiffusionGenerator(recipe, device)


def build_extractors(recipe: Recipe, device: str | None = None) -> list[Extractor]:
    device = device or default_device()
    out: list[Extractor] = []
    for cfg in recipe.extractors:
        if cfg.type == "toy":
            from .toy import ToyExtractor

            out.append(ToyExtractor(cfg))
        else:
            from .extractors import build_extractor

            out.append(build_extractor(cfg, device))
    return out


def build_classifier(recipe: Recipe, device: str | None = None) -> Classifier:
    device = device or default_device()
    if recipe.classifier.type == "toy":
        from .toy import ToyClassifier

        return ToyClassifier(recipe.classifier)
    from .classifier import ClipClassifier

    return ClipClassifier(recipe.classifier, device)


def build_masker(recipe: Recipe, device: str | None = None) -> InstanceMasker | None:
    """Instance masker named by `masks.method`; None for `none` (attribution thresholds only)."""
    device = device or default_device()
    if recipe.masks.method == "none":
        return None
    if recipe.generation.generator == "toy" and recipe.masks.method == "maskcut":
        from .toy import ToyMasker

        return ToyMasker(recipe)
    from .masks import build_instance_masker

    return build_instance_masker(recipe, device)
