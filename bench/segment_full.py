"""Segmentation at full size: paper.yaml's geometry and models (random weights) over an LVIS-size bank.

Not in `make bench` (the `*_bench.py` glob): at full size one image takes minutes on a CPU. `make bench-full` runs it
with one image; `bench/gpu_check.sh` runs it on a lent GPU.

- Models: the paper's architectures at full size with random weights (`ovdiff_ray/models/fullsize.py`: SD 1.5,
  DINO ViT-B/8, CLIP ViT-B/16; 2.4 GB, built once into `--models`), loaded as a user's own weights; fp16 on a GPU
  (the recipe's `auto`), fp32 on a CPU.
- Geometry: paper.yaml's (short side 448; windows 448/224 and 336/224 plus the whole image; SD views at 512, CLIP at
  448, DINO kept with the long side capped at 800), on 448 x 597 photos (scikit-image's, a 4:3 crop).
- Bank: 1203 classes (LVIS size), per class and extractor 1 + 64 + 32 foreground and as many background prototypes
  (the paper's N = 64 and K = 32), dims 7680 / 768 / 768, fp16, class text embeddings of dim 512; random unit rows
  synthesised directly (only the rows matching reads are filled; the rest are untouched zero pages). Pre-filter on
  (exhaustive subset search over at most 10 candidates, as the paper).

Measured (one definition of device time for every figure, `bench/devicetime.py`):

- per image: wall, seconds per stage (the Segmenter's own timings), seconds inside model forward passes (every
  extractor call and the classifier's image and text encoders, synchronised around each call) and the share of the
  image outside them (`full.outside_forward_share`, goal <= 0.05);
- bytes crossing to the host per image (every `.cpu()`, `.numpy()`, `.tolist()`, `.item()`; on a CPU run, what
  would cross) beyond the outputs asked for (a request for the label map only, `confidence=False`: int32 at the
  input size): `full.d2h_extra_mb_per_image` (goal <= 1 MB), of which the pre-filter's text embeddings for subset
  prompts not yet cached (`full.d2h_text_embeddings_mb_per_image`; none once an image's prompts are cached);
- on a GPU also: images per second for batches of 1, 4 and 16 images (`segment_batch`, the labelling job's case),
  p50 latency of one image (the service's case) and the device-busy share of the batch-16 run, from kernel time.

    python bench/segment_full.py --images 1                  # this machine's CPU: ~10 minutes
    python bench/segment_full.py                             # a GPU: batches 1, 4, 16 and p50 over 10 runs
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np
import torch

warnings.filterwarnings("ignore")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "bench")]

from class_bench import D2H, sync  # noqa: E402
from devicetime import DeviceTime, fmt  # noqa: E402

from ovdiff_ray.models import build_classifier, build_extractors, default_device  # noqa: E402
from ovdiff_ray.recipe import load_recipe  # noqa: E402
from ovdiff_ray.segment import TIMING_KEYS, Segmenter, make_views  # noqa: E402
from ovdiff_ray.store.bank import Bank, BankArrays  # noqa: E402

N_CLASSES, N_INSTANCES, N_PARTS = 1203, 64, 32
IMAGE_HW = (448, 597)


def out(name: str, value) -> None:
    print(f"{name}: {value:.4g}" if isinstance(value, float) else f"{name}: {value}", flush=True)


def paper_recipe(models_dir: Path, device: str, size: str):
    """paper.yaml with the random full-size models (`size` full), or the tiny recipe's models under paper.yaml's
    geometry (`size` tiny: a smoke run in seconds)."""
    paper = load_recipe("paper")
    if size == "tiny":
        recipe = load_recipe("tiny")
        recipe.segmentation = paper.segmentation
        views = {e.type: (e.view_size, e.max_side) for e in paper.extractors}
        for e in recipe.extractors:
            e.view_size, e.max_side = views[e.type]
        return recipe
    from ovdiff_ray.models.fullsize import fullsize_refs

    refs = fullsize_refs(models_dir, device if device.startswith("cuda") else "cpu")
    for e in paper.extractors:
        e.model = refs[e.type]
    paper.classifier.model = refs["clip"]
    paper.generation.model = refs["sd"]
    return paper


def lvis_bank(recipe, dims: dict[str, int], text_dim: int, seed: int = 0) -> Bank:
    """1203 classes x (1 + 64 + 32) fg and as many bg prototypes per extractor, fp16 unit rows. Rows are random
    where matching can read them (all of DINO/CLIP; SD's class-level rows, the rest of SD stays untouched zero pages
    so 3.6 GB of SD prototypes cost memory only where read: a kept class's SD rows score 0, which costs the matmul
    the same)."""
    rng = np.random.default_rng(seed)
    per_kind = 1 + N_INSTANCES + N_PARTS
    per_class = 2 * per_kind
    rows = N_CLASSES * per_class
    kind = np.tile(np.repeat(np.array([0, 1], np.uint8), per_kind), N_CLASSES)
    level1 = np.array([0] + [1] * N_INSTANCES + [2] * N_PARTS, np.uint8)
    level = np.tile(np.concatenate([level1, level1]), N_CLASSES)
    arrays = {}
    for ex, d in dims.items():
        v = np.zeros((rows, d), np.float16)
        fill = np.nonzero(level == 0)[0] if d > 2048 else np.arange(rows)
        for i in range(0, len(fill), 8192):
            idx = fill[i:i + 8192]
            x = rng.standard_normal((len(idx), d), dtype=np.float32)
            v[idx] = (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float16)
        arrays[ex] = BankArrays(v, np.repeat(np.arange(N_CLASSES, dtype=np.int32), per_class), kind, level,
                                np.arange(0, rows + 1, per_class, dtype=np.int64))
    text = rng.standard_normal((N_CLASSES, text_dim)).astype(np.float32)
    text /= np.linalg.norm(text, axis=1, keepdims=True)
    names = [f"class {i}" for i in range(N_CLASSES)]
    return Bank("lvis-synthetic", 0, recipe, names, ["thing"] * N_CLASSES, text, arrays)


def photos(n: int) -> list[np.ndarray]:
    """`n` distinct 448 x 597 RGB photos: crops of scikit-image's bundled photos, resized."""
    from PIL import Image
    from skimage import data

    srcs = [data.astronaut(), data.coffee(), data.chelsea(), data.rocket(), data.immunohistochemistry()]
    h, w = IMAGE_HW
    out_ = []
    for i in range(n):
        src = srcs[i % len(srcs)]
        k = i // len(srcs)
        sh, sw = src.shape[:2]
        ch, cw = int(sh * (1 - 0.05 * (k % 4))), int(sw * (1 - 0.05 * (k % 4)))  # a different crop per round
        y0, x0 = (sh - ch) * (k % 2), (sw - cw) * ((k // 2) % 2)
        crop = Image.fromarray(np.ascontiguousarray(src[y0:y0 + ch, x0:x0 + cw, :3]))
        out_.append(np.asarray(crop.resize((w, h), Image.BILINEAR)))
    return out_


class ForwardTimer:
    """Seconds inside model forward passes (device-synchronised around each call) while `on`."""

    def __init__(self, device: str):
        self.device, self.seconds, self.calls, self.on = device, 0.0, 0, False

    def wrap(self, fn):
        def inner(*a, **k):
            if not self.on:
                return fn(*a, **k)
            sync(self.device)
            t0 = time.perf_counter()
            try:
                return fn(*a, **k)
            finally:
                sync(self.device)
                self.seconds += time.perf_counter() - t0
                self.calls += 1
        return inner


class _Timed:
    """An extractor whose `__call__` is timed (attributes delegated)."""

    def __init__(self, inner, timer: ForwardTimer):
        self._inner, self._call = inner, timer.wrap(inner.__call__)

    def __call__(self, images):
        return self._call(images)

    def __getattr__(self, name):
        return getattr(self._inner, name)


def instrumented(seg: Segmenter, img: np.ndarray, timer: ForwardTimer, d2h: D2H, device: str) -> dict:
    """One image, every counter on: wall, stages, forward seconds, bytes to the host, prompts encoded."""
    prompts0 = seg.prompts_encoded
    timer.seconds, timer.calls, timer.on = 0.0, 0, True
    sync(device)
    t0 = time.perf_counter()
    with d2h.counting():
        res = seg.segment(img, confidence=False)  # the service's default request: the label map only
    sync(device)
    wall = time.perf_counter() - t0
    timer.on = False
    return {"wall": wall, "forward": timer.seconds, "calls": timer.calls, "d2h": d2h.bytes, "res": res,
            "prompts": seg.prompts_encoded - prompts0}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="auto", help="auto | cpu | cuda")
    ap.add_argument("--images", type=int, default=None,
                    help="images for the instrumented per-image pass (default: 1 on a CPU, 4 on a GPU)")
    ap.add_argument("--batches", default=None,
                    help="comma-separated batch sizes for images/s (default: 1,4,16 on a GPU, none on a CPU)")
    ap.add_argument("--repeats", type=int, default=10, help="one-image runs for the p50 (GPU; default 10)")
    ap.add_argument("--models", default=str(ROOT / ".cache" / "fullsize"),
                    help="folder for the random full-size models (built once, 2.4 GB)")
    ap.add_argument("--size", choices=["full", "tiny"], default="full",
                    help="full: the paper's architectures (default); tiny: tiny models, paper geometry (smoke run)")
    a = ap.parse_args(argv)
    t_start = time.perf_counter()
    device = default_device() if a.device == "auto" else a.device
    cuda = device.startswith("cuda")
    n_images = a.images if a.images is not None else (4 if cuda else 1)
    batches = [int(b) for b in (a.batches if a.batches is not None else ("1,4,16" if cuda else "")).split(",") if b]
    if not cuda:
        torch.set_num_threads(max(1, os.cpu_count() or 1))
    out("full.device", torch.cuda.get_device_name(0) if cuda else f"cpu ({torch.get_num_threads()} threads)")
    out("full.size", a.size)

    t0 = time.perf_counter()
    recipe = paper_recipe(Path(a.models), device, a.size)
    extractors = build_extractors(recipe, device)
    classifier = build_classifier(recipe, device)
    out("full.models_load_s", time.perf_counter() - t0)
    t0 = time.perf_counter()
    bank = lvis_bank(recipe, {e.name: e.dim for e in extractors}, classifier.dim)
    out("full.bank_build_s", time.perf_counter() - t0)
    out("full.bank_classes", len(bank.names))
    for ex, arr in bank.extractors.items():
        out(f"full.bank_rows.{ex}", f"{arr.vectors.shape[0]}x{arr.dim}")

    timer = ForwardTimer(device)
    seg = Segmenter(bank, [_Timed(e, timer) for e in extractors], classifier, device)
    classifier.encode_image = timer.wrap(classifier.encode_image)
    classifier.encode_text = timer.wrap(classifier.encode_text)
    imgs = photos(max(n_images, max(batches, default=1)) + 1)
    h, w = IMAGE_HW
    sh = seg.seg.short_side
    out("full.image", f"{w}x{h}")
    out("full.views", len(make_views(sh, round(w * sh / h), seg.seg.windows, seg.seg.whole_image)))
    d2h = D2H()
    d2h.install()
    if cuda:  # warm-up: kernels, cuDNN autotuning, allocator
        seg.segment(imgs[-1])

    # -- 1. per image, instrumented ----------------------------------------------------------------------------
    runs = [instrumented(seg, img, timer, d2h, device) for img in imgs[:n_images]]
    n = len(runs)
    wall = sum(r["wall"] for r in runs) / n
    fwd = sum(r["forward"] for r in runs) / n
    stages = {k: sum(r["res"].timings[k] for r in runs) / n for k in TIMING_KEYS}
    outputs_b = h * w * 4  # the label map asked for: int32 at the input size
    d2h_b = sum(r["d2h"] for r in runs) / n
    out("full.images_instrumented", n)
    out("full.kept_classes_mean", float(np.mean([len(r["res"].kept) for r in runs])))
    out("full.prompts_encoded_per_image", float(np.mean([r["prompts"] for r in runs])))
    out("full.wall_s_per_image", wall)
    for k in TIMING_KEYS:
        out(f"full.stage.{k}_s", stages[k])
    out("full.forward_calls_per_image", float(np.mean([r["calls"] for r in runs])))
    out("full.forward_s_per_image", fwd)
    out("full.outside_forward_s_per_image", wall - fwd)
    out("full.outside_forward_share", (wall - fwd) / max(wall, 1e-9))
    out("full.d2h_mb_per_image", d2h_b / 2**20)
    out("full.outputs_mb_per_image", outputs_b / 2**20)
    out("full.d2h_extra_mb_per_image", max(0.0, d2h_b - outputs_b) / 2**20)
    text_b = float(np.mean([r["prompts"] for r in runs])) * classifier.dim * 4  # float32 rows of encode_text
    out("full.d2h_text_embeddings_mb_per_image", text_b / 2**20)  # pre-filter cache misses (subset prompts)

    # -- 2. throughput and latency (GPU), counters off --------------------------------------------------------
    for b in batches:
        batch = imgs[:b]
        seg.segment_batch(batch)  # this batch's shapes once (allocator, prompts)
        reps = max(1, 16 // b)
        with DeviceTime(device) as dt:
            for _ in range(reps):
                seg.segment_batch(batch)
        if dt.error:
            out(f"full.profiler_error_batch{b}", dt.error)
        out(f"full.images_per_s_batch{b}", b * reps / dt.wall_s)
        out(f"full.device_busy_share_batch{b}", fmt(dt.busy_share))
        out(f"full.host_s_per_image_batch{b}", fmt(None if dt.host_s is None else dt.host_s / (b * reps), ".4f"))
        if b == 16:
            out("full.device_busy_share", fmt(dt.busy_share))
    if cuda and a.repeats:
        lat = []
        for i in range(a.repeats):
            img = imgs[i % len(imgs)]
            sync(device)
            t0 = time.perf_counter()
            seg.segment(img)
            sync(device)
            lat.append(time.perf_counter() - t0)
        out("full.p50_ms_one_image", 1000 * statistics.median(lat))
        out("full.peak_device_gib", torch.cuda.max_memory_allocated() / 2**30)
    if not cuda:
        out("full.device_busy_share", "n/a")
    out("full.bench_s", time.perf_counter() - t_start)
    print(f"summary: segment_full {a.size} on {device}: {wall:.2f}s per image, outside forward "
          f"{(wall - fwd) / max(wall, 1e-9):.1%}, d2h extra {max(0.0, d2h_b - outputs_b) / 2**20:.2f} MB/image",
          flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
