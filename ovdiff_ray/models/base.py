"""Small protocols every model family implements (real libraries and the toy world alike).

Images travel as float tensors in [0, 1], `[B, 3, H, W]`; masks and attribution maps as numpy arrays at image size.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol, runtime_checkable

import numpy as np
import torch


@dataclass
class SupportSet:
    """Support images of one class and their attribution maps."""

    images: np.ndarray  # [N, H, W, 3] uint8
    attributions: np.ndarray  # [N, H, W] float32, min-max normalised to [0, 1]
    seeds: list[int]  # one seed per image


@runtime_checkable
class Generator(Protocol):
    """Text -> support images + attribution (diffusers pipeline or the toy world)."""

    def generate(self, name: str, n: int, seed: int, prompt_name: str | None = None) -> SupportSet:
        """Draw `n` images of class `name`; image i uses seed `image_seed(seed, name, i)`."""
        ...


@runtime_checkable
class Extractor(Protocol):
    """Dense features: `images [B, 3, H, W] in [0, 1]` -> `feats [B, D, h, w]`."""

    name: str
    dim: int
    stride: int  # input pixels per feature cell (at the extractor's own input size)
    view_size: int  # square side views are resized to at segmentation time; 0 = keep

    def __call__(self, images: torch.Tensor) -> torch.Tensor: ...


@runtime_checkable
class InstanceMasker(Protocol):
    """Class-agnostic instance masks: `image [H, W, 3] uint8` -> `masks [M, H, W] bool` (M may be 0)."""

    def __call__(self, image: np.ndarray) -> np.ndarray: ...


@runtime_checkable
class Classifier(Protocol):
    """Image/text embeddings in one space, L2-normalised, for the pre-filter and class text embeddings."""

    dim: int

    def encode_text(self, prompts: list[str]) -> np.ndarray:
        """`prompts` -> `[P, E]` float32, unit norm."""
        ...

    def encode_image(self, images: torch.Tensor) -> np.ndarray:
        """`images [B, 3, H, W] in [0, 1]` -> `[B, E]` float32, unit norm."""
        ...


def image_seed(bank_seed: int, name: str, index: int) -> int:
    """Seed of support image `index` of class `name`: independent of batch size, worker and retry."""
    import hashlib

    h = hashlib.sha256(f"{bank_seed}\x00{name}\x00{index}".encode()).digest()
    return int.from_bytes(h[:8], "little") & 0x7FFF_FFFF_FFFF_FFFF
