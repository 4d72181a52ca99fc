"""The class pipeline on the device vs the CPU: MaskCut cutting structured keys with its dense CRF in a process pool
doing real work, and fp16 models end to end (support images drawn by the tiny SD at fp16, features, prototypes,
segmentation with them)."""
from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from ovdiff_ray.recipe import load_recipe
from ovdiff_ray.sample import SamplingModels, sample_class

from .compare import LABEL_AGREEMENT, PROTO_COS, agreement, toy_scenes

pytestmark = pytest.mark.gpu
CLASSES = ["red circle", "blue star"]
DECIDED = 0.05  # a score margin no fp16 rounding of these models' features flips


class StructuredKeys:
    """MaskCut's DINO with keys that have an object to cut: the image's colours on DINO's grid (9 colour monomials)
    through a fixed random projection to DINO's width. Random tiny DINO keys have no structure (MaskCut stops after a
    small first cut and the CRF has little to do); real DINO keys separate objects by appearance, as these do."""

    def __init__(self, inner):
        self.inner = inner
        self.stride, self.dim, self.name = inner.stride, inner.dim, getattr(inner, "name", "dino")
        self.w = torch.randn(inner.dim, 9, generator=torch.Generator().manual_seed(0))

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        g = images.shape[-1] // self.stride
        c = F.adaptive_avg_pool2d(images.float(), g)  # [b, 3, g, g]
        r, gr, b = c[:, 0], c[:, 1], c[:, 2]
        phi = torch.stack([r, gr, b, r * gr, gr * b, r * b, r * r, gr * gr, b * b], 1) - 0.3
        return torch.einsum("dk,bkhw->bdhw", self.w.to(images.device), phi)


def class_recipe():
    r = load_recipe("tiny")
    r.generation.generator = "toy"
    r.generation.n_images = 6
    r.generation.batch_size = 3
    r.masks.method = "maskcut"
    r.masks.maskcut_crf = True
    r.masks.maskcut_n = 2
    return r


def build(device: str, recipe, crf_workers: int):
    """The classes through the device pipeline on `device`, MaskCut on structured keys, the CRF in a pool of
    `crf_workers` processes; -> (prototypes, masks per CRF job)."""
    from ovdiff_ray.models.masks import MaskCut, build_instance_masker

    models = SamplingModels.load(recipe, device, crf_workers=crf_workers)
    models.masker = build_instance_masker(recipe, device)  # MaskCut on the tiny DINO (the toy generator's own
    assert isinstance(models.masker, MaskCut)              # masker is the toy world's)
    models.masker.extractor = StructuredKeys(models.masker.extractor)
    pool = models.crf
    per_job: list[int] = []
    wait = pool.wait

    def counting_wait(futures):
        out = wait(futures)
        per_job.extend(len(m) for m in out)
        return out

    pool.wait = counting_wait
    try:
        protos = [sample_class(c, recipe, models) for c in CLASSES]
    finally:
        pool.close()
    return protos, per_job


def class_level_cosines(a, b) -> list[float]:
    """Cosine of each class-level (fg, bg) prototype of `a` to `b`'s, per extractor; asserts equal row layouts."""
    out = []
    for ex in a.sets:
        A, B = a.sets[ex], b.sets[ex]
        for kind in ("fg", "bg"):
            for level in ("class", "instance", "part"):
                assert ((A.kind == kind) & (A.level == level)).sum() == ((B.kind == kind) & (B.level == level)).sum()
            ma, mb = (A.kind == kind) & (A.level == "class"), (B.kind == kind) & (B.level == "class")
            va, vb = A.vectors[ma].astype(np.float64), B.vectors[mb].astype(np.float64)
            out += list((va * vb).sum(1) / np.linalg.norm(va, axis=1) / np.linalg.norm(vb, axis=1))
    return out


def test_class_pipeline_with_crf_pool(device, precision):
    """The CRF runs in a pool process and keeps masks (real work: most jobs return at least one refined mask);
    the device's prototypes match the CPU's (inline CRF) within PROTO_COS."""
    recipe = class_recipe()
    dev, jobs = build(device, recipe, crf_workers=1)
    cpu, _ = build("cpu", recipe, crf_workers=0)
    assert len(jobs) == len(CLASSES) * recipe.generation.n_images
    assert sum(n > 0 for n in jobs) >= len(jobs) / 2, jobs
    for d, c in zip(dev, cpu):
        assert d.info["kept"] == c.info["kept"] > 0
        cos = class_level_cosines(d, c)
        assert min(cos) >= PROTO_COS[precision], cos


def test_fp16_models_end_to_end(device, precision, tmp_path):
    """Support images drawn by the tiny SD pipeline at fp16 on the device (on a CPU too: torch runs fp16 there,
    slowly), features (fp16 on CUDA, fp32 on a CPU, as the recipe's `auto`), prototypes, then segmentation with the
    bank they make, against everything at fp32 on the CPU."""
    from ovdiff_ray.segment import Segmenter
    from ovdiff_ray.store.bank import Bank

    recipe = load_recipe("tiny")
    recipe.generation.n_images = recipe.generation.batch_size = 2
    recipe.generation.steps = 2
    recipe.masks.method = "none"
    ref = load_recipe("tiny")
    ref.generation.n_images = ref.generation.batch_size = 2
    ref.generation.steps = 2
    ref.masks.method = "none"
    recipe.generation.dtype, ref.generation.dtype = "fp16", "fp32"
    dm, cm = SamplingModels.load(recipe, device), SamplingModels.load(ref, "cpu")
    assert dm.generator.dtype == torch.float16 and cm.generator.dtype == torch.float32
    dev = [sample_class(c, recipe, dm) for c in CLASSES]
    cpu = [sample_class(c, ref, cm) for c in CLASSES]
    for d, c in zip(dev, cpu):
        cos = class_level_cosines(d, c)
        assert min(cos) >= PROTO_COS["fp16"], cos
    dseg = Segmenter.from_bank(Bank.from_prototypes(dev, recipe), device)
    cseg = Segmenter.from_bank(Bank.from_prototypes(cpu, ref), "cpu")
    imgs = toy_scenes(2, 96, seed=40)
    kw = {"ablate": ["no_prefilter"], "return_scores": True}
    for d, c in zip(dseg.segment_batch(imgs, **kw), cseg.segment_batch(imgs, **kw)):
        # two banks (fp16-drawn vs fp32-drawn support images) of random-weight features: compare the labels where
        # the fp32 reference is decided by more than the fp16 tolerance (top-two score margin > DECIDED)
        top2 = np.sort(c.scores, 0)[-2:]
        decided = (top2[1] - top2[0]) > DECIDED
        assert decided.mean() >= 0.1, decided.mean()
        assert agreement(d.labels[decided], c.labels[decided]) >= LABEL_AGREEMENT
