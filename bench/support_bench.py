"""What the support-set record costs (issue 26): time as a share of a class's build, and bytes, on the toy and tiny
recipes; and its size at the paper's geometry (64 images of 512 px, thumbnails of 192 px) for an LVIS bank.

Per recipe, one class built whole (the device pipeline on the CPU, after a warm-up class), then its record's parts
timed on the same support set: `signals` (the pre-filter classifier over the support images: the audit's and the
agreement filter's input), `thumbnails` (resize + masks to the host), `encode_write` (JPEG/PNG + Parquet + write).

    python bench/support_bench.py
"""
from __future__ import annotations

import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from ovdiff_ray.pipeline.class_pipeline import StageClock  # noqa: E402
from ovdiff_ray.pipeline.record import embed_images, support_signals  # noqa: E402
from ovdiff_ray.recipe import load_recipe  # noqa: E402
from ovdiff_ray.sample import SamplingModels  # noqa: E402
from ovdiff_ray.store.fs import Location  # noqa: E402
from ovdiff_ray.store.support import encode_record, write_record  # noqa: E402
from ovdiff_ray.support import SupportData  # noqa: E402


def recipe_costs(name: str, classes: tuple[str, str], tmp: str) -> None:
    recipe = load_recipe(name)
    models = SamplingModels.load(recipe, "cpu")
    pipe = models.pipeline(recipe)
    pipe(classes[0])  # warm-up: first calls pay for lazy initialisation
    t0 = time.perf_counter()
    p = pipe(classes[1])
    total = time.perf_counter() - t0
    t0 = time.perf_counter()
    info = write_record(Location(tmp), p.name, p.kind, p.prompt, p.support)
    enc_write = time.perf_counter() - t0
    sup = pipe.support(classes[1], classes[1], StageClock("cpu"))
    t0 = time.perf_counter()
    embed_images(pipe.classifier, sup.images, recipe.classifier.image_size)
    signals = time.perf_counter() - t0
    t0 = time.perf_counter()
    support_signals(recipe, pipe.classifier, "thing", classes[1], p.text, sup.images, sup.masks.fg, sup.masks.bg,
                    sup.instances, sup.seeds)
    both = time.perf_counter() - t0
    thumbs = max(0.0, both - signals)
    total_w = total + enc_write  # the class's build: pipeline + its record's write (the shard's write not counted)
    print(f"support.{name}.class_s: {total_w:.3f}")
    print(f"support.{name}.signals_s: {signals:.3f}  share: {signals / total_w:.4f}")
    print(f"support.{name}.thumbnails_s: {thumbs:.4f}  encode_write_s: {enc_write:.4f}  "
          f"record_share: {(thumbs + enc_write) / total_w:.4f}")
    print(f"support.{name}.all_share: {(signals + thumbs + enc_write) / total_w:.4f}")
    print(f"support.{name}.bytes_per_class: {info.bytes}  images: {info.rows}")


def paper_size() -> None:
    """A record at the paper's geometry from real photos (skimage's bundled images at 512 px) -> bytes x 1203."""
    from PIL import Image
    from skimage import data

    photos = [data.astronaut(), data.coffee(), data.chelsea(), data.rocket(), data.hubble_deep_field()]
    n = 64
    images = np.stack([np.asarray(Image.fromarray(photos[i % len(photos)]).resize((512, 512))) for i in range(n)])
    yy, xx = np.mgrid[:512, :512]
    fg = np.stack([(yy - 256) ** 2 + (xx - 256 - i) ** 2 < (140 + i) ** 2 for i in range(n)])
    bg = ~fg & ((yy < 60) | (yy > 452))[None]
    inst = np.stack([fg, (yy < 100)[None].repeat(n, 0), (xx < 80)[None].repeat(n, 0)], 1)
    rng = np.random.default_rng(0)
    emb = rng.standard_normal((n, 512)).astype(np.float32)
    sig = {k: rng.random(n).astype(np.float32) for k in ("name_agreement", "prompt_agreement", "fg_coverage",
                                                          "bg_coverage", "n_instances")}

    def thumbs(a, side=192, nearest=False):
        mode = Image.NEAREST if nearest else Image.BILINEAR
        return np.stack([np.asarray(Image.fromarray(x).resize((side, side), mode)) for x in a])

    t0 = time.perf_counter()
    th = SupportData(thumbs(images), thumbs(fg.astype(np.uint8), nearest=True) > 0,
                     thumbs(bg.astype(np.uint8), nearest=True) > 0,
                     np.stack([thumbs(inst[:, k].astype(np.uint8), nearest=True) > 0 for k in range(3)], 1),
                     list(range(n)), np.ones(n, bool), [""] * n, (512, 512), sig, emb, emb[0], emb[0], "thumbnails")
    b_thumb = len(encode_record("x", "thing", "", th))
    t_thumb = time.perf_counter() - t0
    full = SupportData(images, fg, bg, inst, list(range(n)), np.ones(n, bool), [""] * n, (512, 512), sig, emb,
                       emb[0], emb[0], "full")
    b_full = len(encode_record("x", "thing", "", full))
    print(f"support.paper.thumbnails_bytes_per_class: {b_thumb}  lvis_1203_GB: {b_thumb * 1203 / 1e9:.2f}  "
          f"encode_s: {t_thumb:.2f} (of ~17.7 s per class on an H200: {t_thumb / 17.7:.4f})")
    print(f"support.paper.full_bytes_per_class: {b_full}  lvis_1203_GB: {b_full * 1203 / 1e9:.2f}")


def main() -> int:
    with tempfile.TemporaryDirectory() as tmp:
        recipe_costs("toy", ("red circle", "blue star"), tmp)
        recipe_costs("tiny", ("cat", "dog"), tmp)
    paper_size()
    return 0


if __name__ == "__main__":
    sys.exit(main())
