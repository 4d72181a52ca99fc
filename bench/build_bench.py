"""Orchestration efficiency of build_bank on a local Ray with 2 workers, toy and tiny recipes, 40 classes.

efficiency = (sum of per-class worker seconds / workers) / wall time (goal >= 0.85); also the time to the first
committed class and the overhead per class (scheduling, shard write, commit) in milliseconds. `steady_efficiency`
leaves out the start-up (Ray Data planning, actor start, model loading: paid once per build, not per class), which
is what matters for real classes (~210 s each on a GPU). `toy64` is the toy recipe at the paper's N = 64 images.

    python bench/build_bench.py [--classes 40] [--recipes toy,tiny]
"""
from __future__ import annotations

import argparse
import contextlib
import io
import shutil
import tempfile
import threading
import time
from pathlib import Path

import ray

from ovdiff_ray.build_bank import main as build_main
from ovdiff_ray.store import Location, read_manifest

COLOURS = ["red", "orange", "yellow", "green", "cyan", "blue", "purple", "magenta"]
SHAPES = ["circle", "square", "triangle", "star", "ring", "cross"]


def bench(recipe: str, n: int, workers: int, tmp: Path) -> dict:
    if recipe == "toy64":
        text = (Path(__file__).resolve().parents[1] / "bank" / "recipes" / "toy.yaml").read_text()
        (tmp / "toy64.yaml").write_text(text.replace("n_images: 16", "n_images: 64"))
        recipe = str(tmp / "toy64.yaml")
    names = [f"{c} {s}" for s in SHAPES for c in COLOURS][:n]
    vocab = tmp / f"{recipe}.tsv"
    vocab.write_text("name\tkind\n" + "".join(f"{x}\tthing\n" for x in names))
    out = str(tmp / f"bank-{Path(recipe).stem}")
    first: dict = {}

    def watch(t0: float) -> None:
        while "t" not in first:
            if Location(out).exists("manifests/latest"):
                first["t"] = time.perf_counter() - t0
            time.sleep(0.05)

    t0 = time.perf_counter()
    w = threading.Thread(target=watch, args=(t0,), daemon=True)
    w.start()
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
        rc = build_main(["--vocab", str(vocab), "--recipe", recipe, "--out", out, "--workers", str(workers),
                         "--commit-every", "1"])
    wall = time.perf_counter() - t0
    first.setdefault("t", float("nan"))
    assert rc == 0, f"build_bank failed for {recipe}"
    m = read_manifest(Location(out))
    secs = [c["seconds"] for c in m["classes"]]
    work = sum(secs)
    startup = first["t"] - min(secs)  # until the first worker could start its first class
    return {"wall_s": wall, "work_s": work, "first_commit_s": first["t"],
            "efficiency": work / workers / wall, "steady_efficiency": work / workers / (wall - startup),
            "overhead_ms": (wall - startup - work / workers) / n * 1000, "per_class_s": work / n}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--classes", type=int, default=40)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--recipes", default="toy,tiny,toy64")
    a = ap.parse_args()
    ray.init(num_cpus=a.workers, include_dashboard=False, log_to_driver=False)
    tmp = Path(tempfile.mkdtemp(prefix="build-bench-"))
    print(f"sizes: classes={a.classes} workers={a.workers} commit_every=1")
    try:
        for recipe in a.recipes.split(","):
            r = bench(recipe, a.classes, a.workers, tmp)
            for k, v in r.items():
                print(f"{recipe}_{k}: {v:.3f}")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
        ray.shutdown()


if __name__ == "__main__":
    main()
