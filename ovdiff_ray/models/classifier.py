"""CLIP image/text embeddings for the pre-filter and the class text embeddings (OVDIFF.md sections 5-6)."""
from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from ..recipe import ClassifierConfig
from .extractors import CLIP_MEAN, CLIP_STD, load_open_clip


class ClipClassifier:
    """open_clip model: `encode_text(prompts) -> [P, E]`, `encode_image(images) -> [B, E]`, both unit norm.

    Text embeddings are cached per prompt string (the pre-filter's subset step reuses up to 1023 prompts).
    """

    def __init__(self, cfg: ClassifierConfig, device: str = "cpu"):
        self.cfg, self.device = cfg, device
        self.model, self.tokenizer = load_open_clip(cfg.model, device)
        self.dim = self.model.visual.output_dim
        native = getattr(self.model.visual, "image_size", (cfg.image_size, cfg.image_size))
        if tuple(native) != (cfg.image_size, cfg.image_size):
            raise ValueError(f"classifier.image_size: {cfg.image_size} differs from the model's input size "
                             f"{tuple(native)} ({cfg.model!r})")
        pre = getattr(self.model.visual, "preprocess_cfg", {}) or {}
        self.mean = torch.tensor(pre.get("mean", CLIP_MEAN), device=device).view(1, 3, 1, 1)
        self.std = torch.tensor(pre.get("std", CLIP_STD), device=device).view(1, 3, 1, 1)
        self._text: dict[str, np.ndarray] = {}

    @torch.no_grad()
    def encode_text(self, prompts: list[str], batch: int = 256) -> np.ndarray:
        """`prompts` -> `[P, E]` float32, unit norm."""
        todo = list(dict.fromkeys(p for p in prompts if p not in self._text))
        for i in range(0, len(todo), batch):
            chunk = todo[i:i + batch]
            emb = self.model.encode_text(self.tokenizer(chunk).to(self.device))
            emb = F.normalize(emb.float(), dim=-1).cpu().numpy()
            self._text.update(zip(chunk, emb))
        if not prompts:
            return np.zeros((0, self.dim), np.float32)
        return np.stack([self._text[p] for p in prompts]).astype(np.float32)

    @torch.no_grad()
    def encode_image(self, images: torch.Tensor) -> np.ndarray:
        """`images [B, 3, H, W]` in [0, 1] -> `[B, E]` float32, unit norm, at `image_size` (squashed)."""
        s = self.cfg.image_size
        x = images.to(self.device, torch.float32)
        if x.shape[-2:] != (s, s):
            x = F.interpolate(x, size=(s, s), mode="bicubic", align_corners=False, antialias=True).clamp(0, 1)
        emb = self.model.encode_image((x - self.mean) / self.std)
        return F.normalize(emb.float(), dim=-1).cpu().numpy()
