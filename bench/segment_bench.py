"""Segmentation cost: per-image time by stage, and the matching step on an LVIS-size bank against a plain matmul.

1. Per image at 448 px (paper geometry: short side 448, windows 448/224 and 336/224 plus the whole image, SD views
   at 512, CLIP at 448, DINO kept), broken down into features, pre-filter, matching, upsampling and PAMR. The tiny
   recipe's models (random weights) on a 20-class bank, and the toy recipe's for comparison. Bank support images come
   from the toy generator so that building the bank takes seconds; the timed part is segmentation only.
2. The matching step alone (gathered prototypes, one fp32 matmul per extractor and view, per-class max), on a
   synthetic LVIS-size bank: 1203 classes, per class and extractor 1 + 64 + 32 foreground and as many background
   prototypes, dims 7680 (SD) / 768 (DINO) / 768 (CLIP), fp16 storage. Pixels per view as the paper's views give
   them (SD 64x64, DINO 56x56, CLIP 28x28). Two cases: 10 classes kept by the pre-filter, and the pre-filter off
   (faiss class-level retrieval keeps `retrieval_classes` = 64). Each is reported as a ratio against a plain
   `torch.mm(prototypes [R, D], pixels [D, N])` (fp32, the same operands) timed alternately with it: matmul time /
   match time, i.e. the share of the matmul's throughput the whole step keeps (goal: >= 0.5).

3. Snapping to class-agnostic regions (`segmentation.regions`, issue 11) at 448 px: the region map (superpixels
   with paper-plus.yaml's setting, the same at full resolution (`max_pixels: 0`), FreeDA's defaults, and SAM's automatic masks from the tiny random SAM, `tiny:sam`,
   through the same mask-generation pipeline as real weights) and the vote over a 21-class score map, on a real
   photo (scikit-image's astronaut, 448 x 448) and a 448 x 597 toy scene. Baseline: PAMR (paper settings) on the same
   score map in the same process (`ratio_vs_pamr` = regions time / PAMR time).

Prints `name: value` lines.

    python bench/segment_bench.py [--images 2] [--skip-pipeline] [--skip-matching] [--skip-regions] [--repeats 3]
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
import warnings

import numpy as np
import torch

warnings.filterwarnings("ignore")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("OVDIFF_CACHE", os.path.join(tempfile.gettempdir(), "ovdiff-bench-cache"))

from ovdiff_ray.models import toy  # noqa: E402
from ovdiff_ray.recipe import load_recipe  # noqa: E402
from ovdiff_ray.segment import TIMING_KEYS, Segmenter, Switches  # noqa: E402
from ovdiff_ray.store.bank import Bank, BankArrays  # noqa: E402

LVIS_DIMS = {"sd": 7680, "dino": 768, "clip": 768}
LVIS_PIXELS = {"sd": 64 * 64, "dino": 56 * 56, "clip": 28 * 28}


def out(name: str, value) -> None:
    print(f"{name}: {value:.4g}" if isinstance(value, float) else f"{name}: {value}", flush=True)


# ------------------------------------------------------------------------------------------- 1. per image

def paper_geometry(recipe) -> None:
    """Segmentation geometry of paper.yaml on any recipe (models and prototypes untouched)."""
    paper = load_recipe("paper")
    recipe.segmentation.short_side = paper.segmentation.short_side
    recipe.segmentation.windows = paper.segmentation.windows
    views = {e.type: (e.view_size, e.max_side) for e in paper.extractors}
    for e in recipe.extractors:
        if e.type in views:
            e.view_size, e.max_side = views[e.type]


def small_bank(recipe_name: str) -> Bank:
    """A 20-class bank for `recipe_name`'s extractors, support images from the toy generator (fast)."""
    from ovdiff_ray.sample import SamplingModels, sample_class

    recipe = load_recipe(recipe_name)
    names = [f"{c} {s}" for c in toy.COLOURS for s in toy.SHAPES][:20]
    recipe.generation.generator = "toy"
    recipe.generation.n_images = min(recipe.generation.n_images, 4)
    recipe.generation.resolution = 64 if recipe_name == "tiny" else recipe.generation.resolution
    models = SamplingModels.load(recipe, "cpu")
    protos = [sample_class(n, recipe, models) for n in names]
    return Bank.from_prototypes(protos, recipe, bank_id=f"bench-{recipe_name}")


def bench_pipeline(recipe_name: str, n_images: int) -> None:
    bank = small_bank(recipe_name)
    paper_geometry(bank.recipe)
    seg = Segmenter.from_bank(bank, "cpu")
    names = [f"{c} {s}" for c in toy.COLOURS for s in toy.SHAPES][:20]
    rng = np.random.default_rng(0)
    imgs = []
    for _ in range(n_images):
        img, _ = toy.make_scene(names, ["thing"] * 20, rng, 448)
        imgs.append(np.concatenate([img, img[:, :149]], 1))  # 448 x 597, a 4:3 photo
    seg.segment(imgs[0], pamr=True)  # warm-up: model load paths, subset-prompt text embeddings
    for pamr in (False, True):
        tot = dict.fromkeys(TIMING_KEYS, 0.0)
        wall = 0.0
        for img in imgs:
            t0 = time.perf_counter()
            r = seg.segment(img, pamr=pamr)
            wall += time.perf_counter() - t0
            for k in TIMING_KEYS:
                tot[k] += r.timings[k]
        tag = f"per_image.{recipe_name}{'.pamr' if pamr else ''}"
        for k in TIMING_KEYS:
            if k != "pamr" or pamr:
                out(f"{tag}.{k}_s", tot[k] / len(imgs))
        out(f"{tag}.total_s", wall / len(imgs))
    loop = batch = 0.0
    for _ in range(2):  # alternating, so both see the same background load
        t0 = time.perf_counter()
        for img in imgs:
            seg.segment(img)
        t1 = time.perf_counter()
        seg.segment_batch(imgs)
        loop, batch = loop + t1 - t0, batch + time.perf_counter() - t1
    out(f"per_image.{recipe_name}.batch{len(imgs)}_s", batch / 2 / len(imgs))
    out(f"per_image.{recipe_name}.batch{len(imgs)}_vs_loop.speedup", loop / batch)
    out(f"per_image.{recipe_name}.views", len(__import__("ovdiff_ray.segment", fromlist=["make_views"]).make_views(
        448, 597, seg.seg.windows, seg.seg.whole_image)))


# ------------------------------------------------------------------------------------------- 2. matching

def lvis_bank(n_classes: int = 1203, per_kind: int = 97, touched: int = 10, seed: int = 0) -> Bank:
    """Synthetic LVIS-size bank. Big arrays are `np.zeros` (pages untouched cost no memory) with random unit rows
    for every class-level prototype (retrieval reads them) and for the first `touched` classes; DINO/CLIP fully
    random. Matmul speed does not depend on the values."""
    recipe = load_recipe("paper")
    rng = np.random.default_rng(seed)
    per_class = 2 * per_kind
    rows = n_classes * per_class
    kind = np.tile(np.repeat(np.array([0, 1], np.uint8), per_kind), n_classes)
    level1 = np.array([0] + [1] * 64 + [2] * (per_kind - 65), np.uint8)
    level = np.tile(np.concatenate([level1, level1]), n_classes)
    arrays = {}
    for ex, d in LVIS_DIMS.items():
        v = np.zeros((rows, d), np.float16)
        fill = np.nonzero(level == 0)[0] if d > 1000 else np.arange(rows)
        if d > 1000:
            fill = np.union1d(fill, np.arange(touched * per_class))
        for i in range(0, len(fill), 8192):
            idx = fill[i:i + 8192]
            x = rng.standard_normal((len(idx), d), dtype=np.float32)
            v[idx] = (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float16)
        arrays[ex] = BankArrays(v, np.repeat(np.arange(n_classes, dtype=np.int32), per_class), kind, level,
                                np.arange(0, rows + 1, per_class, dtype=np.int64))
    names = [f"class {i}" for i in range(n_classes)]
    text = rng.standard_normal((n_classes, 512)).astype(np.float32)
    return Bank("lvis-synthetic", 0, recipe, names, ["thing"] * n_classes, text, arrays)


class _NoModel:
    """Stands in for extractors/classifier: the matching bench never calls a model."""

    def __init__(self, name: str):
        self.name, self.view_size, self.dim, self.stride = name, 0, 0, 8


def timed(fn, repeats: int) -> float:
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return best


def timed_pair(a, b, repeats: int) -> tuple[float, float]:
    """Best of `repeats` for two functions run alternately (shared machines drift)."""
    ta = tb = float("inf")
    for _ in range(repeats):
        ta = min(ta, timed(a, 1))
        tb = min(tb, timed(b, 1))
    return ta, tb


def bench_matching(repeats: int) -> None:
    t0 = time.perf_counter()
    bank = lvis_bank()
    out("match.bank_build_s", time.perf_counter() - t0)
    out("match.bank_rows_per_extractor", int(bank.extractors["sd"].vectors.shape[0]))
    seg = Segmenter(bank, [_NoModel(e) for e in LVIS_DIMS], classifier=None, device="cpu")
    g = torch.Generator().manual_seed(0)
    feats = {ex: torch.randn(1, d, int(np.sqrt(LVIS_PIXELS[ex])), int(np.sqrt(LVIS_PIXELS[ex])), generator=g)
             for ex, d in LVIS_DIMS.items()}

    # retrieval (pre-filter off): pooled whole-image features vs the class-level prototypes of all 1203 classes
    whole = {ex: f[0] for ex, f in feats.items()}
    seg.retrieve(whole, list(range(len(bank.names))), 64)  # builds the faiss indexes once
    out("match.retrieval_s", timed(lambda: seg.retrieve(whole, list(range(len(bank.names))), 64), repeats))
    retrieved = seg.retrieve(whole, list(range(len(bank.names))), 64)

    cases = {"kept10": list(range(10)), "prefilter_off": retrieved}
    for case, kept in cases.items():
        tot_match = tot_mm = 0.0
        for ex in LVIS_DIMS:
            t0 = time.perf_counter()
            gathered = seg.gather(ex, kept, Switches())
            out(f"match.{case}.{ex}.gather_s", time.perf_counter() - t0)
            f = feats[ex]
            pix = f[0].flatten(1)  # [D, N], as match reads it
            t_mm, t_match = timed_pair(lambda: torch.mm(gathered.protos, pix), lambda: seg.match(f, gathered),
                                       repeats)
            d, n = pix.shape
            r = gathered.protos.shape[0]
            out(f"match.{case}.{ex}.shape", f"{n}x{d}x{r}")
            out(f"match.{case}.{ex}.matmul_s", t_mm)
            out(f"match.{case}.{ex}.match_s", t_match)
            out(f"match.{case}.{ex}.gflops", 2 * n * d * r / t_match / 1e9)
            out(f"match.{case}.{ex}.ratio_vs_matmul", t_mm / t_match)
            tot_match += t_match
            tot_mm += t_mm
        out(f"match.{case}.ratio_vs_matmul", tot_mm / tot_match)


# ------------------------------------------------------------------------------------------- 3. regions

def regions_images() -> dict[str, np.ndarray]:
    from PIL import Image
    from skimage import data

    names = [f"{c} {s}" for c in toy.COLOURS for s in toy.SHAPES][:20]
    scene, _ = toy.make_scene(names, ["thing"] * 20, np.random.default_rng(1), 448)
    photo = np.asarray(Image.fromarray(data.astronaut()).resize((448, 448), Image.BILINEAR))
    return {"photo448": photo, "toy448x597": np.concatenate([scene, scene[:, :149]], 1)}


def bench_regions(repeats: int) -> None:
    import dataclasses

    from ovdiff_ray.pamr import pamr_refine
    from ovdiff_ray.regions import RegionSnapper, snap_scores

    seg = load_recipe("paper-plus").segmentation
    seg.sam = dataclasses.replace(seg.sam, model="tiny:sam", pred_iou_thresh=0.0, stability_score_thresh=0.0)
    freeda = copy_cfg(seg, dataclasses.replace(seg.superpixels, scale=100.0, sigma=1.0, min_size=20))
    full = copy_cfg(seg, dataclasses.replace(seg.superpixels, max_pixels=0))  # no downscaling
    g = torch.Generator().manual_seed(0)
    for tag, img in regions_images().items():
        x = torch.from_numpy(img).permute(2, 0, 1).float() / 255
        scores = torch.rand(21, *img.shape[:2], generator=g)
        t_pamr = timed(lambda: pamr_refine(x, scores, seg.pamr_iters, seg.pamr_dilations), repeats)
        out(f"regions.{tag}.baseline.pamr_s", t_pamr)
        for name, cfg, method in (("superpixels", seg, "superpixels"), ("superpixels_full_res", full, "superpixels"),
                                  ("superpixels_freeda", freeda, "superpixels"), ("tiny_sam", seg, "sam")):
            snapper = RegionSnapper(cfg)
            reg = snapper.regions(x, method)  # warm-up: SAM loads here
            t_map = timed(lambda: snapper.regions(x, method), repeats)
            t_vote = timed(lambda: snap_scores(scores, reg, "vote"), repeats)
            t_mean = timed(lambda: snap_scores(scores, reg, "mean"), repeats)
            out(f"regions.{tag}.{name}.regions", int(reg.max()) + 1)
            out(f"regions.{tag}.{name}.map_s", t_map)
            out(f"regions.{tag}.{name}.vote_s", t_vote)
            out(f"regions.{tag}.{name}.mean_s", t_mean)
            out(f"regions.{tag}.{name}.total_s", t_map + t_vote)
            out(f"regions.{tag}.{name}.ratio_vs_pamr", (t_map + t_vote) / t_pamr)


def copy_cfg(seg, superpixels):
    import copy

    c = copy.deepcopy(seg)
    c.superpixels = superpixels
    return c


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--images", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--recipes", default="tiny,toy", help="comma-separated recipes for the per-image breakdown")
    ap.add_argument("--skip-pipeline", action="store_true")
    ap.add_argument("--skip-matching", action="store_true")
    ap.add_argument("--skip-regions", action="store_true")
    a = ap.parse_args(argv)
    t0 = time.perf_counter()
    out("torch_threads", torch.get_num_threads())
    if not a.skip_pipeline:
        for r in a.recipes.split(","):
            bench_pipeline(r.strip(), a.images)
    if not a.skip_matching:
        bench_matching(a.repeats)
    if not a.skip_regions:
        bench_regions(a.repeats)
    out("bench_total_s", time.perf_counter() - t0)
    return 0


if __name__ == "__main__":
    sys.exit(main())
