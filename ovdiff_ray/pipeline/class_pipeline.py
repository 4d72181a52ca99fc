"""The class pipeline on the models' device: one class -> its prototypes, like a diffusers pipeline of stages.

    generate -> attribute -> instance masks (MaskCut batched on the device; CRF jobs beside it) -> fg/bg ->
    features on the grid -> pooled means -> k-means (deterministic, one-hot updates) -> prototypes

Every stage takes and returns tensors on `device`; only the prototypes (`ProtoSet`, a few hundred rows per
extractor), the text embedding and a few integers cross to the host. Host-only work (MaskCut's dense CRF) runs in a
`CrfPool` while the device draws the next batch of images: the device waits only for the last batch's CRF jobs.
The host path (`sample_host.sample_class_host`, numpy between the models) stays as the reference.

Shapes: support images `[N, 3, H, W]` float in [0, 1]; attributions `[N, H, W]`; instance masks `[N, M, H, W]`
bool; fg / bg `[N, H, W]` bool; features `[b, D, h, w]` per extractor batch.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F

from ..prototypes import ClassPrototypes, to_support_indices
from ..recipe import Recipe
from .fgbg import FgBg, fg_bg_batch
from .instances import CrfPool, DeviceMaskCut, HostMasker, InstanceBatch
from .pooling import ExtractorPool
from .record import support_signals


class EmptySupportError(RuntimeError):
    """Every support image of a class had an empty foreground."""


@dataclass
class SampleArtifacts:
    """What a preview shows, on the host: support images, attributions and the fg/bg masks, per image."""

    images: np.ndarray  # [N, H, W, 3] uint8
    attributions: np.ndarray  # [N, H, W] float32
    fg: np.ndarray  # [N, H, W] bool
    bg: np.ndarray  # [N, H, W] bool
    kept: np.ndarray  # [N] bool: images with a non-empty foreground


@dataclass
class SupportBatch:
    """One batch of support images on the device: `images [b, 3, H, W]` float in [0, 1], `attributions
    [b, H, W]` float32, their seeds; `host_images [b, H, W, 3]` uint8 when the generator drew them on the host
    (the toy world), else None."""

    seeds: list[int]
    images: torch.Tensor
    attributions: torch.Tensor
    host_images: np.ndarray | None = None


@dataclass
class DeviceSupport:
    """The whole support set of a class on the device, with its fg/bg masks (`FgBg`) and instance masks."""

    seeds: list[int]
    images: torch.Tensor  # [N, 3, H, W]
    attributions: torch.Tensor  # [N, H, W]
    instances: torch.Tensor | None  # [N, M, H, W] bool
    masks: FgBg


class StageClock:
    """Seconds per stage, synchronised with the device at each stage boundary (a few syncs per class)."""

    def __init__(self, device: str):
        self.cuda = str(device).startswith("cuda") and torch.cuda.is_available()
        self.seconds: dict[str, float] = {}
        self._t = self._now()

    def _now(self) -> float:
        if self.cuda:
            torch.cuda.synchronize()
        return time.perf_counter()

    def lap(self, stage: str) -> None:
        t = self._now()
        self.seconds[stage] = self.seconds.get(stage, 0.0) + t - self._t
        self._t = t


def support_batches(generator, name: str, n: int, seed: int, words: str, batch: int, device):
    """Yields `SupportBatch`es: a device generator's batches as they are drawn, or a host generator's set cut
    into batches and moved to the device."""
    if hasattr(generator, "generate_batches"):
        for seeds, images, attr in generator.generate_batches(name, n, seed, prompt_name=words):
            yield SupportBatch(seeds, images, attr)
        return
    s = generator.generate(name, n, seed, prompt_name=words)
    for i in range(0, n, batch):
        imgs = s.images[i:i + batch]
        t = torch.from_numpy(np.ascontiguousarray(imgs)).to(device).permute(0, 3, 1, 2).float().div(255)
        yield SupportBatch(list(s.seeds[i:i + batch]), t, torch.from_numpy(s.attributions[i:i + batch]).to(device),
                           imgs)


@dataclass
class ClassPipeline:
    """Stages of one class on `device`. Build once per actor (`from_models`); call per class."""

    recipe: Recipe
    generator: object
    extractors: list
    classifier: object
    masker: DeviceMaskCut | HostMasker | None
    device: str
    crf: CrfPool = field(default_factory=CrfPool)

    @classmethod
    def from_models(cls, recipe: Recipe, models, crf: CrfPool | None = None) -> "ClassPipeline":
        """From `sample.SamplingModels`: MaskCut's DINO goes onto the device path (with `recipe.masks`), any other
        masker stays a host masker. `crf`: the pool for MaskCut's CRF (default: inline)."""
        from ..models.masks import MaskCut

        crf = crf or CrfPool(0)
        masker = models.masker
        if isinstance(masker, MaskCut):
            masker = DeviceMaskCut(masker.extractor, recipe.masks, crf)
        elif masker is not None:
            masker = HostMasker(masker)
        return cls(recipe, models.generator, models.extractors, models.classifier, masker, models.device, crf)

    # -- stages ------------------------------------------------------------------------------------------------
    def support(self, name: str, words: str, clock: StageClock) -> DeviceSupport:
        """generate + attribute + instance masks (batch by batch, the CRF beside the device) + fg/bg."""
        g = self.recipe.generation
        seeds, images, attrs, pending = [], [], [], []
        for sb in support_batches(self.generator, name, g.n_images, self.recipe.seed, words, g.batch_size,
                                  self.device):
            clock.lap("generate")
            seeds += sb.seeds
            images.append(sb.images)
            attrs.append(sb.attributions)
            if isinstance(self.masker, HostMasker):
                pending.append(self.masker(sb.images, sb.host_images))
            elif self.masker is not None:
                pending.append(self.masker(sb.images))
            clock.lap("masks")
        imgs, attr = torch.cat(images), torch.cat(attrs)
        inst = self._instances(pending, imgs.shape[-2:])
        clock.lap("crf_wait")
        masks = fg_bg_batch(attr, inst, self.recipe.masks)
        clock.lap("masks")
        return DeviceSupport(seeds, imgs, attr, inst, masks)

    def _instances(self, pending: list[InstanceBatch], size) -> torch.Tensor | None:
        if self.masker is None:
            return None
        parts = [p.result() for p in pending]
        m = max(p.shape[1] for p in parts)
        h, w = size
        return torch.cat([F.pad(p, (0, 0, 0, 0, 0, m - p.shape[1])) if p.shape[1] < m else p for p in parts]) \
            if m else torch.zeros(sum(len(p) for p in parts), 0, h, w, dtype=torch.bool, device=self.device)

    @torch.no_grad()
    def prototypes(self, images: torch.Tensor, fg: torch.Tensor, bg: torch.Tensor, clock: StageClock) -> dict:
        """Kept images `[K, 3, H, W]` and their fg/bg -> {extractor name: ProtoSet}, features pooled batch by
        batch on the device."""
        g, p = self.recipe.generation, self.recipe.prototypes
        sets = {}
        for cfg, ex in zip(self.recipe.extractors, self.extractors):
            pool = ExtractorPool(ex.dim, p.mask_grid)
            for i in range(0, len(images), g.batch_size):
                x = images[i:i + g.batch_size]
                if cfg.input_size and x.shape[-1] != cfg.input_size:
                    x = F.interpolate(x, size=(cfg.input_size, cfg.input_size), mode="bilinear",
                                      align_corners=False, antialias=True)
                feats = ex(x.to(self.device))
                pool.add(feats.to(self.device), fg[i:i + g.batch_size], bg[i:i + g.batch_size], i)
            clock.lap("features")
            sets[cfg.name] = pool.to_protoset(p.parts, p.kmeans_iters, p.seed, p.max_pixels, p.kmeans_tol)
            clock.lap("prototypes")
        return sets

    def __call__(self, name: str, kind: str = "thing", prompt: str = "", artifacts: list | None = None,
                 ) -> ClassPrototypes:
        """One class -> ClassPrototypes. Deterministic for (recipe.seed, name, prompt); the same prototypes as the
        host path within float rounding. Appends `sample.SampleArtifacts` (host copies) to `artifacts` when
        given."""
        words = self.recipe.generation.prompt_name(name, prompt)
        waited0 = self.crf.waited
        host0 = self.masker.seconds if isinstance(self.masker, HostMasker) else 0.0
        clock = StageClock(self.device)
        sup = self.support(name, words, clock)
        text = self.classifier.encode_text([self.recipe.classifier.text_template.format(name=words)])[0]
        clock.lap("text")
        kept, record = support_signals(self.recipe, self.classifier, kind, name, text, sup.images, sup.masks.fg,
                                       sup.masks.bg, sup.instances, sup.seeds)
        clock.lap("record")  # issue 26: classifier signals, agreement filter, thumbnails (the store encodes them)
        if artifacts is not None:
            artifacts.append(SampleArtifacts(
                (sup.images * 255).round().byte().permute(0, 2, 3, 1).cpu().numpy(), sup.attributions.cpu().numpy(),
                sup.masks.fg.cpu().numpy(), sup.masks.bg.cpu().numpy(), kept.cpu().numpy()))
        n_kept = int(kept.sum())
        if n_kept == 0:
            raise EmptySupportError(f"class {name!r}: every one of {len(kept)} support images has an empty "
                                    "foreground")
        idx = kept.nonzero()[:, 0]
        sets = self.prototypes(sup.images[idx], sup.masks.fg[idx], sup.masks.bg[idx], clock)
        kept_index = idx.cpu().numpy()  # sources and part members name support images (issue 21: provenance)
        for ps in sets.values():
            to_support_indices(ps, kept_index)
        seconds = dict(clock.seconds)
        split = getattr(self.generator, "timings", None)
        if split and "attribution" in split:
            seconds["attribution"] = split["attribution"]
            seconds["generate"] = max(0.0, seconds.get("generate", 0.0) - split["attribution"])
        host = (self.crf.waited - waited0) + ((self.masker.seconds - host0) if isinstance(self.masker, HostMasker)
                                              else 0.0)
        info = {"n_images": len(kept), "kept": n_kept, "seconds": seconds, "total_s": sum(clock.seconds.values()),
                "host_s": host, "seeds": list(sup.seeds), "kept_mask": kept.cpu().tolist()}
        return ClassPrototypes(name, kind, sets, np.asarray(text, np.float32), info,
                               prompt=words if words != name else "", support=record)
