"""The noisy-feature world: any extractor's outputs with an independent random component appended.

A bench and test option only (`bench/confidence_quality.py --noisy`, `tests/test_confidence_calibration.py`), never a
change to the toy world: the toy extractors match a class's own prototypes at cosines of ~0.95, real DINO / CLIP / SD
features at much lower ones. `NoisyExtractor` wraps an extractor and appends `extra` channels of Gaussian noise
(standard deviation `sigma` per channel) to every feature cell, drawn independently per image and cell, the same way
for support images (bank build) and scenes (segmentation). Prototypes average many cells, so their noise part
shrinks, while every pixel keeps its own: a pixel's cosine to its class falls by about `|f| / sqrt(|f|^2 + |n|^2)`
(~0.5 for the defaults on toy features). Labels hold on small vocabularies (12 classes: 0.996 of pixels right against
0.998), not at 52 classes (0.49): each prototype keeps a random component (an instance prototype averages one image's
cells, a k-means part centres on cells whose noise agrees), and the background row, a maximum over hundreds of
background prototypes, wins pixels by the largest of them (README "Confidence").

The noise of an image is seeded by its content (crc32 of its float32 bytes) and the extractor's name, so a run is
deterministic and an image's noise does not depend on the batch it came in.
"""
from __future__ import annotations

import zlib

import torch

EXTRA = 36  # appended channels
SIGMA = 0.47  # per channel: |n| ~ 2.8 against toy feature norms of ~1.5, same-class cosines ~0.45


class NoisyExtractor:
    """`inner(images) [B, D, h, w]` -> `[B, D + extra, h, w]`: the inner features and `extra` noise channels."""

    def __init__(self, inner, extra: int = EXTRA, sigma: float = SIGMA, salt: int = 0):
        self.inner = inner
        self.name = inner.name
        self.view_size = getattr(inner, "view_size", 0)
        self.stride = getattr(inner, "stride", 1)
        self.extra = int(extra)
        self.sigma = float(sigma)
        self.salt = int(salt)
        self.dim = inner.dim + self.extra

    def __getattr__(self, key):  # anything else (device, dtype, ...) is the inner extractor's
        if key == "inner":
            raise AttributeError(key)
        return getattr(self.inner, key)

    def _seed(self, image: torch.Tensor) -> int:
        data = image.detach().float().cpu().contiguous().numpy().tobytes()
        return zlib.crc32(data, zlib.crc32(f"{self.name}/{self.salt}".encode()))

    @torch.no_grad()
    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        f = self.inner(images)
        b, _, h, w = f.shape
        noise = torch.empty(b, self.extra, h, w, dtype=torch.float32)
        for i in range(b):
            g = torch.Generator().manual_seed(self._seed(images[i]))
            noise[i] = torch.randn(self.extra, h, w, generator=g) * self.sigma
        return torch.cat([f, noise.to(device=f.device, dtype=f.dtype)], 1)


def noisy_extractors(extractors: list, extra: int = EXTRA, sigma: float = SIGMA, salt: int = 0) -> list:
    """Every extractor of a list wrapped in `NoisyExtractor`."""
    return [NoisyExtractor(e, extra, sigma, salt) for e in extractors]
