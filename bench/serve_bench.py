"""Serve overhead, dynamic batching and bank multiplexing, against `Segmenter.segment` in-process, in the same run.

For each recipe (toy: toy scenes sent as PNG; tiny: scikit-image photos sent as JPEG) a bank is built with
`build_bank`, then:

- in process: `Segmenter.segment` on the same images with the replica's torch threads (1);
- over HTTP: the Serve app (one segmenter replica, 1 torch thread) at concurrency 1, 4 and 16: requests/s and
  p50/p95 latency; `overhead` = in-process requests/s / HTTP requests/s - 1 (goal: < 0.20 at concurrency 4).
  In-process and HTTP rounds alternate, so both see the same background load on a shared machine. Also: CPU ms
  per request by process (segmenter replica, ingress replica, proxy, other Ray processes, this client),
  `serve_cpu_overhead` = the service's CPU per request / the in-process model CPU - 1, and `model_busy` = the share
  of wall time the replica's model thread computes (requests/s x server-side model ms);
- (toy) concurrency 4 with PAMR on (a heavier model call): the overhead is a fixed cost per request;
- (toy) dynamic batching: `max_batch_size` 1 vs 4 vs 8 at concurrency 16 (three apps side by side, alternating);
- (toy) multiplexing: a second bank version on the same replica: the first request's cost (bank load, models
  shared), alternating banks vs one bank, and the replica's memory per extra bank vs a whole replica (what one
  deployment per bank would cost instead);
- (toy) hardening: p50/p99 of small requests, idle and while 8 clients send 4096x4096 PNGs, "before" (no early
  downscale, no pixel budget: `max_work_side` 8192, `max_inflight_pixels` unbounded) vs "after" (the limits of
  deploy/serve.yaml), two apps side by side in the same run; and concurrency 32 against the shipped config (queue
  from the latency budget, 1 replica): the share refused (503 + Retry-After), how fast refusals come back, and the
  p99 of the accepted requests;
- (toy) metrics: latency at concurrency 4 with the ovdiff_* metrics recorded vs switched off (`metrics: false`),
  two apps side by side, alternating rounds: `metrics.latency_cost_p50` (goal <= 0.02).

    python bench/serve_bench.py [--recipes toy,tiny] [--requests 24] [--rounds 2] [--concurrency 1,4,16]
                                [--only hardening|metrics]
"""
from __future__ import annotations

import argparse
import asyncio
import io
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from ovdiff_ray.demo import free_port, png_bytes

REPO = Path(__file__).resolve().parents[1]
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("RAY_DATA_DISABLE_PROGRESS_BARS", "1")


def emit(name: str, value) -> None:
    print(f"{name}: {value:.4g}" if isinstance(value, float) else f"{name}: {value}", flush=True)


def note(msg: str) -> None:
    print(f"# {msg}", file=sys.stderr, flush=True)


def jpeg(rgb: np.ndarray) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(rgb).save(buf, format="JPEG", quality=90)
    return buf.getvalue()


def build(recipe: str, out: Path) -> tuple[str, list[np.ndarray], list[bytes]]:
    """A bank of `recipe` at `out`, the images and their uploads (toy scenes as PNG, photos as JPEG)."""
    from ovdiff_ray.build_bank import main as build_bank

    if recipe == "toy":
        from ovdiff_ray.models.toy import scenes_main
        from ovdiff_ray.segment import read_image

        vocab = str(REPO / "bank" / "vocab" / "toy.tsv")
        assert scenes_main(["--vocab", vocab, "--n", "16", "--out", str(out / "scenes"), "--seed", "1"]) == 0
        images = [read_image(p) for p in sorted((out / "scenes" / "images").glob("*.png"))]
        payloads = [png_bytes(im) for im in images]
    else:
        import skimage.data

        out.mkdir(parents=True, exist_ok=True)
        vocab = str(out / "vocab.tsv")
        Path(vocab).write_text("name\tkind\ncat\tthing\nperson\tthing\ncup\tthing\ngrass\tstuff\n")
        from ovdiff_ray.serve.limits import Limits, decode_image

        payloads = [jpeg(np.ascontiguousarray(getattr(skimage.data, n)()[..., :3])) for n in
                    ("astronaut", "coffee", "chelsea", "rocket")]
        images = [decode_image(p, Limits()) for p in payloads]  # in process: the very pixels the service sees
    uri = str(out / "bank")
    assert build_bank(["--vocab", vocab, "--recipe", recipe, "--out", uri, "--workers", "2"]) == 0
    return uri, images, payloads


def stats(lat: list[float], wall: float) -> dict:
    a = np.array(lat) * 1000
    return {"rps": len(lat) / wall, "p50_ms": float(np.percentile(a, 50)), "p95_ms": float(np.percentile(a, 95))}


class InProcess:
    """`Segmenter.segment` in this process with the replica's torch threads, on the same images."""

    def __init__(self, uri: str, images: list[np.ndarray]):
        import torch

        from ovdiff_ray.segment import Segmenter
        from ovdiff_ray.store.bank import Bank

        torch.set_num_threads(1)  # what a replica holding 1 CPU gets
        self.seg = Segmenter.from_bank(Bank.load(uri))
        self.images = images
        for im in images[:2]:
            self.seg.segment(im)

    def run(self, n: int, pamr: bool = False) -> tuple[list[float], float, float]:
        """Latencies, wall seconds and CPU seconds of `n` calls."""
        lat = []
        c0, t0 = time.process_time(), time.perf_counter()
        for i in range(n):
            t = time.perf_counter()
            self.seg.segment(self.images[i % len(self.images)], pamr=pamr)
            lat.append(time.perf_counter() - t)
        return lat, time.perf_counter() - t0, time.process_time() - c0


async def _fire(url: str, payloads: list[bytes], n: int, conc: int, banks: list[str | None] = (None,),
                fields: dict | None = None):
    import httpx

    sem = asyncio.Semaphore(conc)
    lat, timing, errors = [], [], []

    async def one(c, i):
        async with sem:
            files = [("image", ("x.png", payloads[i % len(payloads)], "image/png"))]
            if banks[i % len(banks)]:
                files.append(("bank", (None, banks[i % len(banks)])))
            files += [(k, (None, v)) for k, v in (fields or {}).items()]
            t = time.perf_counter()
            r = await c.post(url, files=files)
            lat.append(time.perf_counter() - t)
            if r.status_code != 200:
                errors.append(r.status_code)
            else:
                timing.append(r.json()["timing"])

    limits = httpx.Limits(max_connections=conc, max_keepalive_connections=conc)
    async with httpx.AsyncClient(timeout=300, limits=limits) as c:
        t0 = time.perf_counter()
        await asyncio.gather(*(one(c, i) for i in range(n)))
        wall = time.perf_counter() - t0
    if errors:
        raise RuntimeError(f"{len(errors)} requests failed: {sorted(set(errors))}")
    return lat, wall, timing


def fire(url, payloads, n, conc, banks=(None,), fields=None):
    return asyncio.run(_fire(url, payloads, n, conc, list(banks), fields))


def cpu_seconds(app: str) -> dict[str, float]:
    """CPU seconds so far of this Ray's processes by role (this process = the client)."""
    import psutil

    out = dict.fromkeys(("segmenter", "ingress", "proxy", "ray_other", "client"), 0.0)
    for p in psutil.Process().children(recursive=True):
        try:
            cmd = " ".join(p.cmdline())
            t = p.cpu_times()
        except psutil.Error:
            continue
        role = ("segmenter" if f"ServeReplica:{app}:OVDiffSegmenter" in cmd else
                "ingress" if f"ServeReplica:{app}:OVDiffIngress" in cmd else
                "proxy" if "ProxyActor" in cmd else "ray_other")
        out[role] += t.user + t.system
    t = psutil.Process().cpu_times()
    out["client"] = t.user + t.system
    return out


def deploy(name: str, args: dict) -> float:
    """One app per configuration (route /<name>), side by side, so measurements can alternate without redeploys."""
    from ray import serve

    from ovdiff_ray.serve.app import build_app

    t0 = time.perf_counter()
    serve.run(build_app({"num_replicas": 1, "num_cpus": 0.5, "torch_threads": 1, "max_queued_requests": -1, **args}),
              name=name, route_prefix=f"/{name}", logging_config={"log_level": "WARNING", "enable_access_log": False})
    return time.perf_counter() - t0


ADMIN_TOKEN = "bench-operator-token"  # /v1/status (replica memory) is for operators only


def health(url: str) -> dict:
    import httpx

    return httpx.get(url + "/v1/status", headers={"authorization": f"Bearer {ADMIN_TOKEN}"}, timeout=60).json()


async def _fire_all(url: str, payload: bytes, n: int, conc: int) -> list[tuple[int, float, str | None]]:
    """`n` posts at concurrency `conc`, errors included: (status, seconds, Retry-After)."""
    import httpx

    sem = asyncio.Semaphore(conc)
    out = []

    async def one(c):
        async with sem:
            t = time.perf_counter()
            r = await c.post(url, files=[("image", ("x.png", payload, "image/png"))])
            out.append((r.status_code, time.perf_counter() - t, r.headers.get("retry-after")))

    limits = httpx.Limits(max_connections=conc, max_keepalive_connections=conc)
    async with httpx.AsyncClient(timeout=300, limits=limits) as c:
        await asyncio.gather(*(one(c) for _ in range(n)))
    return out


def big_png(side: int = 4096) -> bytes:
    """A side x side PNG of about 50 KB (flat regions): cheap to send, costly to decode, upsample and encode."""
    from PIL import Image

    a = np.zeros((side, side, 3), np.uint8)
    a[:, side // 2:] = (200, 30, 30)
    a[side // 4: 3 * side // 4, side // 4: 3 * side // 4] = (30, 200, 30)
    buf = io.BytesIO()
    Image.fromarray(a).save(buf, format="PNG", compress_level=9)
    return buf.getvalue()


async def _small_beside_large(url: str, small: bytes, large: bytes, n: int, clients: int = 8):
    """p50/p99 of `n` sequential small requests, idle, then while `clients` loop sending `large`."""
    import httpx

    async def post(c, data):
        t = time.perf_counter()
        r = await c.post(url, files=[("image", ("x.png", data, "image/png"))])
        return r.status_code, time.perf_counter() - t

    async with httpx.AsyncClient(timeout=600) as c:
        await post(c, large)  # warm-up
        idle = [(await post(c, small))[1] for _ in range(n)]
        stop, big = asyncio.Event(), []

        async def loop():
            while not stop.is_set():
                big.append(await post(c, large))

        tasks = [asyncio.create_task(loop()) for _ in range(clients)]
        await asyncio.sleep(2.0)
        loaded = []
        for _ in range(n):
            code, dt = await post(c, small)
            loaded.append(dt if code == 200 else float("nan"))
        stop.set()
        await asyncio.gather(*tasks)
    return idle, loaded, big


def bench_hardening(uri: str, payloads: list[bytes], base: str, n: int) -> None:
    import yaml
    from ray import serve

    shipped = yaml.safe_load((REPO / "deploy" / "serve.yaml").read_text())["applications"][0]
    limits = shipped["args"]["limits"]
    large = big_png()
    note(f"hardening: small requests beside 8 clients of 4096x4096 PNGs ({len(large) // 1024} KB each), before "
         "vs after")
    before = {**limits, "max_work_side": 8192, "max_inflight_pixels": 10**12}
    for name, lim in (("hard-before", before), ("hard-after", limits)):
        deploy(name, {"bank": uri, "max_batch_size": 4, "limits": lim, "request_timeout_s": 600})
    for name in ("hard-before", "hard-after"):
        idle, loaded, big = asyncio.run(_small_beside_large(f"{base}/{name}/v1/segment", payloads[0], large, n))
        tag = name.split("-")[1]
        emit(f"toy.large8.{tag}.small_idle_p50_ms", 1000 * float(np.percentile(idle, 50)))
        emit(f"toy.large8.{tag}.small_p50_ms", 1000 * float(np.nanpercentile(loaded, 50)))
        emit(f"toy.large8.{tag}.small_p99_ms", 1000 * float(np.nanpercentile(loaded, 99)))
        emit(f"toy.large8.{tag}.small_failed", int(np.isnan(loaded).sum()))
        emit(f"toy.large8.{tag}.large_done", len(big))
        emit(f"toy.large8.{tag}.large_refused", sum(c != 200 for c, _ in big))
        emit(f"toy.large8.{tag}.large_p50_ms", 1000 * float(np.median([t for c, t in big if c == 200] or [0])))
        emit(f"toy.large8.{tag}.ingress_rss_mb", _ingress_rss_mb(name))
    for name in ("hard-before", "hard-after"):
        serve.delete(name)

    note("hardening: concurrency 32 against the shipped config (1 replica)")
    seg = next(d for d in shipped["deployments"] if d["name"] == "OVDiffSegmenter")
    args = {k: v for k, v in shipped["args"].items() if k != "banks"}
    from ovdiff_ray.serve.app import AppArgs, queue_size

    queue = queue_size(AppArgs.model_validate({**args, "bank": uri, "num_replicas": 1}), seg["max_ongoing_requests"])
    deploy("shipped", {**args, "bank": uri, "max_ongoing_requests": seg["max_ongoing_requests"],
                       "max_queued_requests": queue})
    url = f"{base}/shipped/v1/segment"
    asyncio.run(_fire_all(url, payloads[0], 4, 1))
    res = asyncio.run(_fire_all(url, payloads[0], 8 * 32, 32))
    ok = [t for c, t, _ in res if c == 200]
    refused = [(t, r) for c, t, r in res if c in (503, 429)]
    other = [c for c, _, _ in res if c not in (200, 503, 429)]
    emit("toy.shipped.c32.queue", queue)
    emit("toy.shipped.c32.requests", len(res))
    emit("toy.shipped.c32.refused_share", len(refused) / len(res))
    emit("toy.shipped.c32.refused_with_retry_after", sum(1 for _, r in refused if r))
    emit("toy.shipped.c32.refused_p99_ms", 1000 * float(np.percentile([t for t, _ in refused], 99)) if refused
         else 0.0)
    emit("toy.shipped.c32.accepted_p50_ms", 1000 * float(np.percentile(ok, 50)))
    emit("toy.shipped.c32.accepted_p99_ms", 1000 * float(np.percentile(ok, 99)))
    emit("toy.shipped.c32.other_statuses", len(other))
    serve.delete("shipped")


def _ingress_rss_mb(app: str) -> float:
    import psutil

    for p in psutil.Process().children(recursive=True):
        try:
            if f"ServeReplica:{app}:OVDiffIngress" in " ".join(p.cmdline()):
                return p.memory_info().rss / 2**20
        except psutil.Error:
            continue
    return float("nan")


def bench_recipe(recipe: str, work: Path, base: str, n: int, concurrency: list[int], rounds: int) -> None:
    from ray import serve

    note(f"{recipe}: building the bank")
    uri, images, payloads = build(recipe, work / recipe)
    mux = recipe == "toy"
    if mux:  # a second version of the same bank (same classes) for the multiplexing measurement
        from ovdiff_ray.store.fs import Location
        from ovdiff_ray.store.shards import commit_manifest, read_manifest

        m = read_manifest(Location(uri))
        commit_manifest(Location(uri), {**m, "version": m["version"] + 1})
        banks = [{"uri": uri, "version": m["version"]}, {"uri": uri, "version": m["version"] + 1}]
        v1, v2 = (f"{m['bank_id']}@v{m['version'] + k}" for k in (0, 1))
    else:
        banks = [uri]
    note(f"{recipe}: deploying (1 replica, max_batch_size 4) and the in-process baseline")
    main = f"{recipe}-b4"
    emit(f"{recipe}.replica_start_s", deploy(main, {"banks": banks, "max_batch_size": 4}))
    url = f"{base}/{main}"
    ref = InProcess(uri, images)
    rss1 = health(url)["rss_mb"]
    fire(url + "/v1/segment", payloads, 4, 1)  # warm-up, not counted
    for c in concurrency:
        note(f"{recipe}: concurrency {c}, {rounds} rounds of in-process then HTTP")
        n_c = max(n, 2 * c)
        il, iw, icpu, hl, hw, tm = [], 0.0, 0.0, [], 0.0, []
        cpu = dict.fromkeys(("segmenter", "ingress", "proxy", "ray_other", "client"), 0.0)
        for _ in range(rounds):  # alternate so that both see the same background load
            lat, wall, used = ref.run(n_c)
            il += lat
            iw += wall
            icpu += used
            c0 = cpu_seconds(main)
            lat, wall, timing = fire(url + "/v1/segment", payloads, n_c, c)
            c1 = cpu_seconds(main)
            hl += lat
            hw += wall
            tm += timing
            for k in cpu:
                cpu[k] += c1[k] - c0[k]
        i, h = stats(il, iw), stats(hl, hw)
        per = {k: 1000 * v / len(hl) for k, v in cpu.items()}
        model_ms = 1000 * icpu / len(il)
        if c == concurrency[0]:
            emit(f"{recipe}.inprocess.rps", i["rps"])
            emit(f"{recipe}.inprocess.p50_ms", i["p50_ms"])
            emit(f"{recipe}.inprocess.cpu_ms_per_image", model_ms)
        for k in ("rps", "p50_ms", "p95_ms"):
            emit(f"{recipe}.http.c{c}.{k}", h[k])
        seg_ms = float(np.median([t["segment_ms"] for t in tm]))
        emit(f"{recipe}.http.c{c}.server_segment_ms_p50", seg_ms)
        emit(f"{recipe}.http.c{c}.model_busy", h["rps"] * seg_ms / 1000)
        emit(f"{recipe}.http.c{c}.mean_batch", float(np.mean([t["batch_size"] for t in tm])))
        for k, v in per.items():
            emit(f"{recipe}.http.c{c}.cpu_ms_per_request.{k}", v)
        serve_cpu = per["segmenter"] + per["ingress"] + per["proxy"] + per["ray_other"]
        emit(f"{recipe}.http.c{c}.serve_cpu_overhead", serve_cpu / model_ms - 1)
        emit(f"{recipe}.http.c{c}.inprocess_rps_same_rounds", i["rps"])
        emit(f"{recipe}.http.c{c}.overhead", i["rps"] / h["rps"] - 1)
    if not mux:
        serve.delete(main)
        return

    note(f"{recipe}: a heavier model call (PAMR on) at concurrency 4")
    n_p = max(n // 2, 8)
    il, iw, hl, hw = [], 0.0, [], 0.0
    for _ in range(rounds):
        lat, wall, _ = ref.run(n_p, pamr=True)
        il, iw = il + lat, iw + wall
        lat, wall, _ = fire(url + "/v1/segment", payloads, n_p, 4, fields={"pamr": "true"})
        hl, hw = hl + lat, hw + wall
    i, h = stats(il, iw), stats(hl, hw)
    emit(f"{recipe}.pamr.inprocess.p50_ms", i["p50_ms"])
    emit(f"{recipe}.pamr.http.c4.rps", h["rps"])
    emit(f"{recipe}.pamr.http.c4.p50_ms", h["p50_ms"])
    emit(f"{recipe}.pamr.http.c4.overhead", i["rps"] / h["rps"] - 1)

    c = max(concurrency)
    note(f"{recipe}: dynamic batching, max_batch_size 1 vs 4 vs 8 at concurrency {c} (max_ongoing_requests 12)")
    for b in (1, 4, 8):
        deploy(f"{recipe}-batch{b}", {"bank": uri, "version": m["version"], "max_batch_size": b,
                                      "max_ongoing_requests": 12})
        fire(f"{base}/{recipe}-batch{b}/v1/segment", payloads, 4, 1)
    res: dict[int, list] = {1: [[], 0.0, []], 4: [[], 0.0, []], 8: [[], 0.0, []]}
    for _ in range(rounds):
        for b in (1, 4, 8):
            lat, wall, timing = fire(f"{base}/{recipe}-batch{b}/v1/segment", payloads, max(n, 2 * c), c)
            res[b][0] += lat
            res[b][1] += wall
            res[b][2] += timing
    for b in (1, 4, 8):
        s = stats(res[b][0], res[b][1])
        emit(f"{recipe}.batch{b}.c{c}.rps", s["rps"])
        emit(f"{recipe}.batch{b}.c{c}.p50_ms", s["p50_ms"])
        emit(f"{recipe}.batch{b}.c{c}.mean_batch", float(np.mean([t["batch_size"] for t in res[b][2]])))
    emit(f"{recipe}.batch8_vs_batch1.rps_ratio",
         stats(res[8][0], res[8][1])["rps"] / stats(res[1][0], res[1][1])["rps"])
    for b in (1, 4, 8):
        serve.delete(f"{recipe}-batch{b}")

    note(f"{recipe}: multiplexing two bank versions on one replica")
    t0 = time.perf_counter()
    fire(url + "/v1/segment", payloads, 1, 1, [v2])
    emit(f"{recipe}.mux.first_request_other_bank_ms", 1000 * (time.perf_counter() - t0))
    rss2 = health(url)["rss_mb"]
    one, alt = [[], 0.0], [[], 0.0]
    for _ in range(rounds):
        for acc, which in ((one, [v1]), (alt, [v1, v2])):
            lat, wall, _ = fire(url + "/v1/segment", payloads, max(n, 12), 4, which)
            acc[0] += lat
            acc[1] += wall
    emit(f"{recipe}.mux.one_bank.c4.rps", stats(*one)["rps"])
    emit(f"{recipe}.mux.alternating_banks.c4.rps", stats(*alt)["rps"])
    emit(f"{recipe}.mux.alternating_vs_one.rps_ratio", stats(*alt)["rps"] / stats(*one)["rps"])
    emit(f"{recipe}.mux.replica_rss_mb", rss1)
    emit(f"{recipe}.mux.extra_bank_rss_mb", rss2 - rss1)
    emit(f"{recipe}.mux.bank_bytes", sum(int(c.get("bytes", 0)) for c in m["classes"]))
    serve.delete(main)


def bench_metrics(uri: str, payloads: list[bytes], base: str, n: int, rounds: int) -> None:
    """The cost of recording the ovdiff_* metrics: two apps side by side on the same bank, one with `metrics:
    false` (OVDIFF_METRICS=0 in its replicas), alternating rounds at concurrency 4; p50 / mean latency ratio."""
    from ray import serve

    for name, on in (("metrics-on", True), ("metrics-off", False)):
        deploy(name, {"bank": uri, "max_batch_size": 4, "metrics": on})
        fire(f"{base}/{name}/v1/segment", payloads, 8, 4)  # warm-up, not counted
    lat: dict[str, list[float]] = {"metrics-on": [], "metrics-off": []}
    for r in range(rounds):
        order = ("metrics-on", "metrics-off") if r % 2 == 0 else ("metrics-off", "metrics-on")
        for name in order:
            got, _, _ = fire(f"{base}/{name}/v1/segment", payloads, n, 4)
            lat[name] += got
    on, off = (np.array(lat[k]) * 1000 for k in ("metrics-on", "metrics-off"))
    emit("metrics.c4.requests_each", len(on))
    emit("metrics.on.c4.p50_ms", float(np.median(on)))
    emit("metrics.off.c4.p50_ms", float(np.median(off)))
    emit("metrics.on.c4.mean_ms", float(on.mean()))
    emit("metrics.off.c4.mean_ms", float(off.mean()))
    emit("metrics.latency_cost_p50", float(np.median(on)) / float(np.median(off)) - 1)  # goal <= 0.02
    emit("metrics.latency_cost_mean", float(on.mean()) / float(off.mean()) - 1)
    for name in lat:
        serve.delete(name)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--recipes", default="toy,tiny")
    ap.add_argument("--requests", type=int, default=24, help="requests per round and measurement")
    ap.add_argument("--rounds", type=int, default=2, help="alternating rounds per measurement")
    ap.add_argument("--concurrency", default="1,4,16")
    ap.add_argument("--keep", default=None, help="work folder to keep (default: a temp folder, removed)")
    ap.add_argument("--only", default=None, choices=["hardening", "metrics"],
                    help="only the hardening measurements (toy bank; large images, shipped config at c32), or only "
                         "the metrics cost (toy bank; metrics on vs off at concurrency 4)")
    a = ap.parse_args(argv)
    import ray
    from ray import serve

    work = Path(a.keep or tempfile.mkdtemp(prefix="serve-bench-"))
    work.mkdir(parents=True, exist_ok=True)
    t_start = time.perf_counter()
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, logging_level="ERROR",
             runtime_env={"env_vars": {"OVDIFF_ADMIN_TOKEN": ADMIN_TOKEN}})
    port = free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port},
                logging_config={"log_level": "WARNING", "enable_access_log": False})
    try:
        emit("cpus", os.cpu_count())
        emit("torch_threads_replica_and_inprocess", 1)
        base = f"http://127.0.0.1:{port}"
        if a.only in (None, "metrics"):
            uri, _, payloads = build("toy", work / "metrics")
            bench_metrics(uri, payloads, base, max(a.requests, 24), 2 * a.rounds)
        if a.only is None:
            for recipe in a.recipes.split(","):
                bench_recipe(recipe.strip(), work, base, a.requests, [int(c) for c in a.concurrency.split(",")],
                             a.rounds)
        if (a.only is None and "toy" in a.recipes.split(",")) or a.only == "hardening":
            uri, _, payloads = build("toy", work / "hardening")
            bench_hardening(uri, payloads, base, 8)  # 8 small requests each way: "before" takes ~10-30 s each
    finally:
        serve.shutdown()
        ray.shutdown()
        if not a.keep:
            shutil.rmtree(work, ignore_errors=True)
    emit("wall_s", time.perf_counter() - t_start)
    return 0


if __name__ == "__main__":
    sys.exit(main())
