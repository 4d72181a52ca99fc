"""label_dataset throughput on a local Ray (1 and 2 workers) against a single-process `Segmenter.segment` loop.

For each recipe (toy, tiny): build a small bank, write N toy scenes, then
- `loop`: one process, `Segmenter.from_bank` + `segment` over the images with one torch thread, as an actor with
  one CPU runs (warm: after one warm-up image; cold: model load and warm-up included, as a job pays them);
- `rayK`: `label_dataset --format coco --workers K` end to end (Ray Data, actor start-up, model load, part writes,
  COCO assembly), and its steady rate after the first block arrived.
Ratios: `rayK_vs_loop_cold` (end to end against the cold loop: the orchestration overhead, > 1 is faster),
`steady_rayK_vs_loop` (against the warm loop), `scaling_2v1` (steady 2-worker rate over 1-worker rate; 2 cores here,
so at most 2). Prints `name: value` lines.

    python bench/label_bench.py [--images 48] [--recipes toy,tiny] [--workers 1,2]
"""
from __future__ import annotations

import argparse
import contextlib
import io
import os
import shutil
import tempfile
import time
import warnings
from pathlib import Path

warnings.filterwarnings("ignore")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("RAY_DATA_DISABLE_PROGRESS_BARS", "1")
os.environ.setdefault("OVDIFF_CACHE", os.path.join(tempfile.gettempdir(), "ovdiff-bench-cache"))

import ray  # noqa: E402

from ovdiff_ray import label  # noqa: E402
from ovdiff_ray.build_bank import main as build_main  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
TOY_VOCAB = ROOT / "bank" / "vocab" / "toy.tsv"
TINY_CLASSES = ["dog", "cat", "grass", "sky"]


def out(name: str, value) -> None:
    print(f"{name}: {value:.4g}" if isinstance(value, float) else f"{name}: {value}", flush=True)


def quiet():
    return contextlib.ExitStack() if os.environ.get("BENCH_VERBOSE") else _silenced()


@contextlib.contextmanager
def _silenced():
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
        yield


def build(recipe: str, tmp: Path) -> str:
    if recipe == "toy":
        vocab = TOY_VOCAB
    else:
        vocab = tmp / "tiny.tsv"
        vocab.write_text("name\tkind\n" + "".join(f"{c}\t{'stuff' if c in ('grass', 'sky') else 'thing'}\n"
                                                  for c in TINY_CLASSES))
    bank = str(tmp / f"bank-{recipe}")
    t0 = time.perf_counter()
    with quiet():
        rc = build_main(["--vocab", str(vocab), "--recipe", recipe, "--out", bank, "--workers", "2"])
    assert rc == 0, f"build_bank failed for {recipe}"
    out(f"{recipe}.bank_build_s", time.perf_counter() - t0)
    return bank


def loop(recipe: str, bank: str, images: list[Path]) -> tuple[float, float]:
    """Single-process baseline: (cold images/s incl. load + warm-up, warm images/s)."""
    import torch

    from ovdiff_ray.segment import Segmenter, read_image
    from ovdiff_ray.store.bank import Bank

    torch.set_num_threads(1)  # an actor with num_cpus=1 gets OMP_NUM_THREADS=1; two threads on 2 busy cores thrash
    t0 = time.perf_counter()
    seg = Segmenter.from_bank(Bank.load(bank), "cpu")
    seg.segment(read_image(images[0]))  # warm-up, as each actor pays it
    t1 = time.perf_counter()
    for p in images:
        seg.segment(read_image(p))
    t2 = time.perf_counter()
    out(f"{recipe}.loop.load_and_warmup_s", t1 - t0)
    out(f"{recipe}.loop.images_per_s", len(images) / (t2 - t1))
    return len(images) / (t2 - t0), len(images) / (t2 - t1)


def job(recipe: str, bank: str, images: Path, workers: int, tmp: Path) -> label.Progress:
    prog = label.Progress()
    t0 = time.perf_counter()
    with quiet():
        rc = label.run(label.parse_args(["--images", str(images), "--bank", bank, "--format", "coco",
                                         "--out", str(tmp / f"out-{recipe}-{workers}"),
                                         "--workers", str(workers), "--batch-size", "2"]), prog)
    wall = time.perf_counter() - t0
    assert rc == 0 and prog.labelled == len(list(images.glob("*.png"))), f"label_dataset failed ({recipe}, {workers})"
    out(f"{recipe}.ray{workers}.wall_s", wall)
    out(f"{recipe}.ray{workers}.first_block_s", prog.first_s)
    out(f"{recipe}.ray{workers}.images_per_s", prog.labelled / wall)
    out(f"{recipe}.ray{workers}.steady_images_per_s", prog.steady_rate)
    return prog


def bench(recipe: str, n: int, workers: list[int], tmp: Path) -> None:
    from ovdiff_ray.models.toy import scenes_main

    bank = build(recipe, tmp)
    images = tmp / f"scenes-{recipe}"
    with quiet():
        scenes_main(["--vocab", str(TOY_VOCAB), "--n", str(n), "--out", str(images), "--seed", "1"])
    files = sorted((images / "images").glob("*.png"))
    cold, warm = loop(recipe, bank, files)
    out(f"{recipe}.loop.cold_images_per_s", cold)
    steady = {}
    for k in workers:
        t0 = time.perf_counter()
        prog = job(recipe, bank, images / "images", k, tmp)
        out(f"{recipe}.ray{k}_vs_loop_cold", prog.labelled / (time.perf_counter() - t0) / cold)
        out(f"{recipe}.steady_ray{k}_vs_loop", prog.steady_rate / warm)
        steady[k] = prog.steady_rate
    if 1 in steady and 2 in steady and steady[1] > 0:
        out(f"{recipe}.scaling_2v1", steady[2] / steady[1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--images", type=int, default=48)
    ap.add_argument("--recipes", default="toy,tiny")
    ap.add_argument("--workers", default="1,2")
    a = ap.parse_args()
    workers = [int(w) for w in a.workers.split(",")]
    ray.init(num_cpus=max(workers), include_dashboard=False, log_to_driver=False,
             runtime_env={"env_vars": {"OVDIFF_CACHE": os.environ["OVDIFF_CACHE"], "HF_HUB_OFFLINE": "1"}})
    tmp = Path(tempfile.mkdtemp(prefix="label-bench-"))
    out("sizes", f"images={a.images} workers={a.workers} cpus={max(workers)} batch_size=2 device=cpu torch_threads=1")
    try:
        for recipe in a.recipes.split(","):
            try:
                bench(recipe, a.images, workers, tmp)
            except Exception as e:  # noqa: BLE001 - report and go on to the next recipe
                out(f"{recipe}.error", f"{type(e).__name__}: {e}".splitlines()[0])
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
        ray.shutdown()


if __name__ == "__main__":
    main()
