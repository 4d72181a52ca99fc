"""Serve overhead, dynamic batching and bank multiplexing, against `Segmenter.segment` in-process, in the same run.

For each recipe (toy: toy scenes; tiny: scikit-image photos) a bank is built with `build_bank`, then:

- in process: `Segmenter.segment` on the same images with the replica's torch threads (1 per CPU it holds);
- over HTTP: the Serve app (one segmenter replica, 1 CPU) at concurrency 1, 4 and 16: requests/s and p50/p95
  latency; `overhead` = in-process requests/s / HTTP requests/s - 1 (goal: < 0.20 at concurrency 4);
- (toy) dynamic batching: `max_batch_size` 1 vs 8 at concurrency 16;
- (toy) multiplexing: a second bank version on the same replica: the first request's cost (bank load, models
  shared), alternating banks vs one bank, and the replica's memory per extra bank vs a whole replica (what one
  deployment per bank would cost instead).

    python bench/serve_bench.py [--recipes toy,tiny] [--requests 48] [--concurrency 1,4,16]
"""
from __future__ import annotations

import argparse
import asyncio
import io
import os
import shutil
import socket
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("RAY_DATA_DISABLE_PROGRESS_BARS", "1")


def emit(name: str, value) -> None:
    print(f"{name}: {value:.4g}" if isinstance(value, float) else f"{name}: {value}", flush=True)


def note(msg: str) -> None:
    print(f"# {msg}", file=sys.stderr, flush=True)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def png(rgb: np.ndarray) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(rgb).save(buf, format="PNG")
    return buf.getvalue()


def build(recipe: str, out: Path) -> tuple[str, list[np.ndarray]]:
    """A bank of `recipe` at `out` and the images to send."""
    from ovdiff_ray.build_bank import main as build_bank

    if recipe == "toy":
        from ovdiff_ray.models.toy import scenes_main
        from ovdiff_ray.segment import read_image

        vocab = str(REPO / "bank" / "vocab" / "toy.tsv")
        assert scenes_main(["--vocab", vocab, "--n", "16", "--out", str(out / "scenes"), "--seed", "1"]) == 0
        images = [read_image(p) for p in sorted((out / "scenes" / "images").glob("*.png"))]
    else:
        import skimage.data

        vocab = str(out / "vocab.tsv")
        Path(vocab).write_text("name\tkind\ncat\tthing\nperson\tthing\ncup\tthing\ngrass\tstuff\n")
        images = [np.ascontiguousarray(getattr(skimage.data, n)()[..., :3]) for n in
                  ("astronaut", "coffee", "chelsea", "rocket")]
    uri = str(out / "bank")
    assert build_bank(["--vocab", vocab, "--recipe", recipe, "--out", uri, "--workers", "2"]) == 0
    return uri, images


def stats(lat: list[float], wall: float) -> dict:
    a = np.array(lat) * 1000
    return {"rps": len(lat) / wall, "p50_ms": float(np.percentile(a, 50)), "p95_ms": float(np.percentile(a, 95))}


def in_process(uri: str, images: list[np.ndarray], n: int) -> tuple[dict, dict]:
    """`Segmenter.segment` alone, and with the service's decode + PNG mask encode around it."""
    import torch

    from ovdiff_ray.segment import Segmenter
    from ovdiff_ray.serve.engine import encode_png
    from ovdiff_ray.serve.limits import Limits, decode_image
    from ovdiff_ray.store.bank import Bank

    torch.set_num_threads(1)  # what a 1-CPU replica gets
    seg = Segmenter.from_bank(Bank.load(uri))
    payloads = [png(im) for im in images]
    for im in images[:2]:
        seg.segment(im)
    out = []
    for codec in (False, True):
        lat = []
        t0 = time.perf_counter()
        for i in range(n):
            t = time.perf_counter()
            if codec:
                im = decode_image(payloads[i % len(payloads)], Limits())
                encode_png(seg.segment(im).labels, len(seg.bank.names))
            else:
                seg.segment(images[i % len(images)])
            lat.append(time.perf_counter() - t)
        out.append(stats(lat, time.perf_counter() - t0))
    return out[0], out[1]


async def _fire(base: str, payloads: list[bytes], n: int, conc: int, banks: list[str | None] = (None,)):
    import httpx

    sem = asyncio.Semaphore(conc)
    lat, batches, errors = [], [], []

    async def one(c, i):
        async with sem:
            files = [("image", ("x.png", payloads[i % len(payloads)], "image/png"))]
            if banks[i % len(banks)]:
                files.append(("bank", (None, banks[i % len(banks)])))
            t = time.perf_counter()
            r = await c.post("/v1/segment", files=files)
            lat.append(time.perf_counter() - t)
            if r.status_code != 200:
                errors.append(r.status_code)
            else:
                batches.append(r.json()["timing"]["batch_size"])

    limits = httpx.Limits(max_connections=conc, max_keepalive_connections=conc)
    async with httpx.AsyncClient(base_url=base, timeout=300, limits=limits) as c:
        t0 = time.perf_counter()
        await asyncio.gather(*(one(c, i) for i in range(n)))
        wall = time.perf_counter() - t0
    if errors:
        raise RuntimeError(f"{len(errors)} requests failed: {sorted(set(errors))}")
    return {**stats(lat, wall), "mean_batch": float(np.mean(batches))}


def fire(base, payloads, n, conc, banks=(None,)) -> dict:
    return asyncio.run(_fire(base, payloads, n, conc, list(banks)))


def deploy(args: dict) -> float:
    from ray import serve

    from ovdiff_ray.serve.app import build_app

    t0 = time.perf_counter()
    serve.run(build_app({"num_replicas": 1, "num_cpus": 1, "max_queued_requests": -1, **args}), name="bench",
              route_prefix="/", logging_config={"log_level": "WARNING", "enable_access_log": False})
    return time.perf_counter() - t0


def health(base: str) -> dict:
    import httpx

    return httpx.get(base + "/healthz", timeout=60).json()


def bench_recipe(recipe: str, work: Path, base: str, n: int, concurrency: list[int]) -> None:
    note(f"{recipe}: building the bank")
    uri, images = build(recipe, work / recipe)
    payloads = [png(im) for im in images]
    note(f"{recipe}: in-process baseline ({n} images)")
    ref, ref_codec = in_process(uri, images, n)
    emit(f"{recipe}.inprocess.rps", ref["rps"])
    emit(f"{recipe}.inprocess.p50_ms", ref["p50_ms"])
    emit(f"{recipe}.inprocess_with_codec.rps", ref_codec["rps"])
    note(f"{recipe}: deploying (1 replica, max_batch_size 4)")
    emit(f"{recipe}.replica_start_s", deploy({"bank": uri, "max_batch_size": 4}))
    fire(base, payloads, 4, 1)  # warm-up, not counted
    for c in concurrency:
        note(f"{recipe}: HTTP at concurrency {c}")
        s = fire(base, payloads, max(n, 3 * c), c)
        for k in ("rps", "p50_ms", "p95_ms"):
            emit(f"{recipe}.http.c{c}.{k}", s[k])
        emit(f"{recipe}.http.c{c}.overhead", ref["rps"] / s["rps"] - 1)
        emit(f"{recipe}.http.c{c}.mean_batch", s["mean_batch"])
    if recipe != "toy":
        return
    c = max(concurrency)
    res = {}
    for b in (1, 8):
        note(f"{recipe}: dynamic batching, max_batch_size {b}, concurrency {c}")
        deploy({"bank": uri, "max_batch_size": b, "batch_wait_timeout_s": 0.01})
        fire(base, payloads, 4, 1)
        res[b] = fire(base, payloads, max(n, 3 * c), c)
        emit(f"{recipe}.batch{b}.c{c}.rps", res[b]["rps"])
        emit(f"{recipe}.batch{b}.c{c}.p50_ms", res[b]["p50_ms"])
        emit(f"{recipe}.batch{b}.c{c}.mean_batch", res[b]["mean_batch"])
    emit(f"{recipe}.batch8_vs_batch1.rps_ratio", res[8]["rps"] / res[1]["rps"])

    note(f"{recipe}: multiplexing two bank versions on one replica")
    from ovdiff_ray.store.fs import Location
    from ovdiff_ray.store.shards import commit_manifest, read_manifest

    root = work / recipe / "bank2"
    shutil.copytree(uri, root)
    m = read_manifest(Location(str(root)))
    commit_manifest(Location(str(root)), {**m, "version": m["version"] + 1})  # same classes, a new version
    deploy({"banks": [{"uri": str(root), "version": m["version"]}, {"uri": str(root), "version": m["version"] + 1}],
            "max_batch_size": 4})
    a, b = f"{m['bank_id']}@v{m['version']}", f"{m['bank_id']}@v{m['version'] + 1}"
    fire(base, payloads, 4, 1, [a])
    rss1 = health(base)["rss_mb"]
    t0 = time.perf_counter()
    fire(base, payloads, 1, 1, [b])
    emit(f"{recipe}.mux.first_request_other_bank_ms", 1000 * (time.perf_counter() - t0))
    rss2 = health(base)["rss_mb"]
    one = fire(base, payloads, max(n, 12), 4, [a])
    alt = fire(base, payloads, max(n, 12), 4, [a, b])
    emit(f"{recipe}.mux.one_bank.c4.rps", one["rps"])
    emit(f"{recipe}.mux.alternating.c4.rps", alt["rps"])
    emit(f"{recipe}.mux.alternating_vs_one.rps_ratio", alt["rps"] / one["rps"])
    emit(f"{recipe}.mux.replica_rss_mb", rss1)
    emit(f"{recipe}.mux.extra_bank_rss_mb", rss2 - rss1)
    emit(f"{recipe}.mux.bank_bytes", sum(int(c.get("bytes", 0)) for c in m["classes"]))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--recipes", default="toy,tiny")
    ap.add_argument("--requests", type=int, default=48, help="requests per measurement")
    ap.add_argument("--concurrency", default="1,4,16")
    ap.add_argument("--keep", default=None, help="work folder to keep (default: a temp folder, removed)")
    a = ap.parse_args(argv)
    import ray
    from ray import serve

    work = Path(a.keep or tempfile.mkdtemp(prefix="serve-bench-"))
    work.mkdir(parents=True, exist_ok=True)
    t_start = time.perf_counter()
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, logging_level="ERROR")
    port = free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port},
                logging_config={"log_level": "WARNING", "enable_access_log": False})
    try:
        import torch

        emit("cpus", os.cpu_count())
        emit("replica_torch_threads", 1)
        emit("inprocess_torch_threads", 1)
        del torch
        for recipe in a.recipes.split(","):
            bench_recipe(recipe.strip(), work, f"http://127.0.0.1:{port}", a.requests,
                         [int(c) for c in a.concurrency.split(",")])
    finally:
        serve.shutdown()
        ray.shutdown()
        if not a.keep:
            shutil.rmtree(work, ignore_errors=True)
    emit("wall_s", time.perf_counter() - t_start)
    return 0


if __name__ == "__main__":
    sys.exit(main())
