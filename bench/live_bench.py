"""A live bank: classes added over HTTP, latency during a reload, memory of replicas sharing one bank copy.

On a local Ray with the Serve app following a copy of the toy bank (`follow_latest`, `reload_poll_s` 1, one
segmenter replica):

- `add_to_first_200_s`: from `POST /v1/classes` (two toy classes) to the first 200 of a segment request that names
  them (the client polls the job, then segments), against `build_bank_two_classes_s`: `build_bank` adding the same
  two classes to a copy of the bank (the batch way, before a restart that it does not count);
- p50/p99 of segment requests at concurrency 4, steady vs during a reload (a job adds a class; requests run from the
  POST until the replica answers from the new version and 2 s after), `reload_p50_ratio` / `reload_p99_ratio`,
  and how many failed (goal 0);
- memory on one node with a bank of >= 200 MB (random prototypes of the toy recipe's shapes): the node's memory
  (sum of PSS) with 1 and with 3 replicas; per replica the unique memory (USS) with the bank shared
  (`share_bank`: memory-mapped node-local copy) and with a copy each, against the same replicas serving the 10-class
  toy bank; `extra_replica_bank_fraction` = (USS with the big bank - USS with the small bank) / bank size (goal
  < 0.10), and the same for a copy each (about 1).

    python bench/live_bench.py [--bank-mb 220] [--requests 40]
"""
from __future__ import annotations

import argparse
import asyncio
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from ovdiff_ray.demo import free_port

REPO = Path(__file__).resolve().parents[1]
TOKEN = "bench-admin-token"
AUTH = {"Authorization": f"Bearer {TOKEN}"}
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("RAY_DATA_DISABLE_PROGRESS_BARS", "1")


def emit(name: str, value) -> None:
    print(f"{name}: {value:.4g}" if isinstance(value, float) else f"{name}: {value}", flush=True)


def note(msg: str) -> None:
    print(f"# {msg}", file=sys.stderr, flush=True)


def serve_app(port: int, name: str, **args):
    from ray import serve

    from ovdiff_ray.serve.app import build_app

    t0 = time.perf_counter()
    serve.run(build_app(args), name=name, route_prefix=f"/{name}")
    return f"http://127.0.0.1:{port}/{name}", time.perf_counter() - t0


async def fire(base: str, data: bytes, n: int | None, conc: int, stop: asyncio.Event | None = None,
               out: list | None = None):
    import httpx

    out = [] if out is None else out

    async def worker(c):
        while (n is None and not stop.is_set()) or (n is not None and len(out) < n):
            t0 = time.perf_counter()
            try:
                r = await c.post("/v1/segment", files=[("image", ("s.png", data, "image/png"))])
                out.append((time.perf_counter() - t0, r.status_code, r.json().get("bank", {}).get("version")))
            except Exception as e:  # noqa: BLE001 - counted as a failure
                out.append((time.perf_counter() - t0, repr(e), None))

    async with httpx.AsyncClient(base_url=base, timeout=120) as c:
        await asyncio.gather(*(worker(c) for _ in range(conc)))
    return out


def live_part(tmp: Path, port: int, toy_bank: str, requests: int) -> None:
    import httpx

    from ovdiff_ray.build_bank import main as build_bank
    from ovdiff_ray.models.toy import scenes_main

    root = tmp / "live-bank"
    shutil.copytree(toy_bank, root)
    token = tmp / "token"
    token.write_text(TOKEN)
    voc = tmp / "scenes.tsv"
    voc.write_text("name\tkind\npurple ring\tthing\norange dots\tstuff\ncyan star\tthing\nred circle\tthing\n")
    assert scenes_main(["--vocab", str(voc), "--n", "2", "--out", str(tmp / "scenes"), "--seed", "3"]) == 0
    data = (tmp / "scenes" / "images" / "0000.png").read_bytes()
    base, secs = serve_app(port, "live", bank=str(root), follow_latest=True, reload_poll_s=1.0,
                           admin_token_file=str(token), num_replicas=1, max_batch_size=2, max_ongoing_requests=4,
                           build={"workers": 1, "cpus_per_worker": 0.5})
    emit("app_start_s", secs)  # what a restart costs the batch way
    with httpx.Client(base_url=base, timeout=120) as c:
        for _ in range(4):
            c.post("/v1/segment", files=[("image", ("s.png", data, "image/png"))])  # warm
        t0 = time.perf_counter()
        r = c.post("/v1/classes", headers=AUTH, json={"classes": [{"name": "purple ring"},
                                                                   {"name": "orange dots", "kind": "stuff"}]})
        assert r.status_code == 202, r.text
        job = r.json()["job"]
        while c.get(f"/v1/jobs/{job}", headers=AUTH).json()["state"] not in ("done", "failed"):
            time.sleep(0.1)
        t_job = time.perf_counter() - t0
        while True:
            s = c.post("/v1/segment", files=[("image", ("s.png", data, "image/png")),
                                             ("classes", (None, "purple ring, orange dots"))])
            if s.status_code == 200:
                break
            time.sleep(0.05)
        first = time.perf_counter() - t0
        emit("add_job_done_s", t_job)
        emit("add_to_first_200_s", first)
    # the batch way: build_bank of the same two classes into a copy of the original bank
    copy = tmp / "batch-bank"
    shutil.copytree(toy_bank, copy)
    names = (REPO / "bank" / "vocab" / "toy.tsv").read_text().rstrip("\n") + "\npurple ring\tthing\norange dots\tstuff\n"
    (tmp / "more.tsv").write_text(names)
    t0 = time.perf_counter()
    assert build_bank(["--vocab", str(tmp / "more.tsv"), "--recipe", "toy", "--out", str(copy), "--workers", "1",
                       "--cpus-per-worker", "0.5"]) == 0
    batch = time.perf_counter() - t0
    emit("build_bank_two_classes_s", batch)
    emit("build_bank_plus_restart_s", batch + secs)
    emit("add_to_first_200_vs_build_bank", first / batch)
    emit("add_to_first_200_vs_build_bank_plus_restart", first / (batch + secs))

    steady = asyncio.run(fire(base, data, requests, 4))

    async def during():
        import httpx as hx

        stop = asyncio.Event()
        async with hx.AsyncClient(timeout=120) as c:
            got: list = []
            task = asyncio.create_task(fire(base, data, None, 4, stop, got))
            await asyncio.sleep(0.5)
            r = await c.post(f"{base}/v1/classes", headers=AUTH, json={"classes": [{"name": "cyan star"}]})
            assert r.status_code == 202, r.text
            job = r.json()["job"]
            t0 = time.perf_counter()
            while (j := (await c.get(f"{base}/v1/jobs/{job}", headers=AUTH)).json())["state"] not in ("done", "failed"):
                await asyncio.sleep(0.1)
            emit("add_one_class_warm_worker_job_s", time.perf_counter() - t0)
            while not any(v == j["version"] for *_, v in got):  # the replica answers from the new version
                await asyncio.sleep(0.1)
            await asyncio.sleep(2.0)  # a little of the new version too
            stop.set()
            return await task

    reload = asyncio.run(during())
    steady2 = asyncio.run(fire(base, data, requests, 4))
    for name, res in (("steady", steady + steady2), ("reload", reload)):
        lat = np.array([t for t, code, _ in res if code == 200]) * 1000
        emit(f"{name}_requests", len(res))
        emit(f"{name}_failed", sum(code != 200 for _, code, _ in res))
        emit(f"{name}_p50_ms", float(np.percentile(lat, 50)))
        emit(f"{name}_p99_ms", float(np.percentile(lat, 99)))
    emit("reload_versions_seen", ",".join(str(v) for v in sorted({v for *_, v in reload})))
    for q in (50, 99):
        s = np.percentile([t for t, c, _ in steady + steady2 if c == 200], q)
        r = np.percentile([t for t, c, _ in reload if c == 200], q)
        emit(f"reload_p{q}_ratio", float(r / s))
    from ray import serve

    serve.delete("live")


def big_bank(root: Path, toy_bank: str, mb: float) -> float:
    """A bank of the toy recipe with random prototypes, about `mb` MB of fp16 vectors; returns its size in MB."""
    from ovdiff_ray.prototypes import ClassPrototypes, ProtoSet
    from ovdiff_ray.store import Location, commit_manifest, load_bank, new_manifest, write_shard

    ref = load_bank(toy_bank)
    loc = Location(str(root))
    dims = {ex: a.dim for ex, a in ref.extractors.items()}
    names = [f"{c} {s}" for s in ("circle", "square", "triangle", "star", "ring", "cross")
             for c in ("red", "orange", "yellow", "green", "cyan", "blue", "purple", "magenta")][:40]
    rows = int(mb * 2**20 / (2 * sum(dims.values())) / len(names))
    g = np.random.default_rng(0)
    entries = []
    for i, n in enumerate(names):
        sets = {}
        for ex, d in dims.items():
            v = g.standard_normal((rows, d)).astype(np.float32)
            v /= np.linalg.norm(v, axis=1, keepdims=True)
            kind = np.array(["fg"] * (rows // 2) + ["bg"] * (rows - rows // 2))
            sets[ex] = ProtoSet(v, kind, np.array(["part"] * rows), np.full(rows, -1, np.int16))
        t = g.standard_normal(ref.text.shape[1]).astype(np.float32)
        p = ClassPrototypes(n, "thing", sets, t / np.linalg.norm(t))
        entries.append({**write_shard(loc, p, i).to_entry(), "id": i})
    commit_manifest(loc, new_manifest("big-bank", 1, ref.manifest["recipe"], entries))
    return sum(e["bytes"] for e in entries) / 2**20


def replica_memory(base: str, n: int) -> list[dict]:
    """Memory of each segmenter replica: the operators' `/v1/status` (the public /healthz carries no pid) until n
    distinct replicas answered; then psutil on their pids."""
    import httpx
    import psutil

    pids: dict[int, None] = {}
    t0 = time.time()
    while len(pids) < n and time.time() - t0 < 60:
        r = httpx.get(base + "/v1/status", headers=AUTH, timeout=30)
        r.raise_for_status()
        pids[r.json()["pid"]] = None
    if len(pids) < n:
        raise RuntimeError(f"{base}/v1/status: only {len(pids)} of {n} replicas answered in 60 s")
    out = []
    for pid in pids:
        m = psutil.Process(pid).memory_full_info()
        out.append({"rss": m.rss / 2**20, "pss": m.pss / 2**20, "uss": m.uss / 2**20})
    return out


def memory_part(tmp: Path, port: int, toy_bank: str, bank_mb: float) -> None:
    from ray import serve

    root = tmp / "big-bank"
    size = big_bank(root, toy_bank, bank_mb)
    emit("bank_mb", size)
    runs = {}
    for label, uri, share, n in (("small_shared_3", toy_bank, True, 3), ("big_shared_1", str(root), True, 1),
                                 ("big_shared_3", str(root), True, 3), ("big_copy_3", str(root), False, 3)):
        base, secs = serve_app(port, label, bank=uri, share_bank=share, num_replicas=n, num_cpus=0.5,
                               max_batch_size=1, max_ongoing_requests=2)
        time.sleep(2)
        mem = replica_memory(base, n)
        runs[label] = mem
        note(f"{label}: ready in {secs:.1f}s; " + "; ".join(f"rss {m['rss']:.0f} pss {m['pss']:.0f} uss "
                                                            f"{m['uss']:.0f} MB" for m in mem))
        serve.delete(label)
        time.sleep(2)
    mean = lambda k, f: float(np.mean([m[f] for m in runs[k]]))  # noqa: E731
    emit("node_pss_1_replica_mb", sum(m["pss"] for m in runs["big_shared_1"]))
    emit("node_pss_3_replicas_mb", sum(m["pss"] for m in runs["big_shared_3"]))
    emit("node_pss_3_replicas_copy_each_mb", sum(m["pss"] for m in runs["big_copy_3"]))
    emit("node_rss_sum_3_replicas_mb", sum(m["rss"] for m in runs["big_shared_3"]))
    emit("replica_uss_small_bank_mb", mean("small_shared_3", "uss"))
    emit("replica_uss_big_shared_mb", mean("big_shared_3", "uss"))
    emit("replica_uss_big_copy_mb", mean("big_copy_3", "uss"))
    emit("extra_replica_bank_fraction", (mean("big_shared_3", "uss") - mean("small_shared_3", "uss")) / size)
    emit("extra_replica_bank_fraction_copy_each", (mean("big_copy_3", "uss") - mean("small_shared_3", "uss")) / size)
    extra = (sum(m["pss"] for m in runs["big_shared_3"]) - sum(m["pss"] for m in runs["big_shared_1"])) / 2
    emit("node_pss_per_extra_replica_mb", extra)
    base = mean("small_shared_3", "pss")  # a replica without the big bank (Python, Ray, torch, models), PSS
    emit("node_pss_per_extra_replica_minus_replica_baseline_mb", extra - base)
    emit("extra_replica_node_fraction", (extra - base) / size)  # goal < 0.10
    for k in ("big_shared_3", "big_copy_3"):  # the node's memory for the bank, 3 replicas, in banks
        emit(f"node_bank_memory_over_bank_{k}", (sum(m["pss"] for m in runs[k]) - 3 * base) / size)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--bank-mb", type=float, default=220.0, help="size of the big bank (default 220 MB)")
    ap.add_argument("--requests", type=int, default=40, help="steady-state requests per round (default 40)")
    ap.add_argument("--skip-memory", action="store_true", help="only the live part")
    ap.add_argument("--skip-live", action="store_true", help="only the memory part")
    a = ap.parse_args(argv)
    import ray
    from ray import serve

    from ovdiff_ray.build_bank import main as build_bank

    t_all = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="live-bench-") as d:
        tmp = Path(d)
        os.environ["OVDIFF_BANK_CACHE"] = str(tmp / "bank-cache")
        ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, logging_level="WARNING",
                 runtime_env={"env_vars": {"OVDIFF_BANK_CACHE": os.environ["OVDIFF_BANK_CACHE"],
                                           "OVDIFF_ADMIN_TOKEN": TOKEN}})  # opens /v1/status (replica pids)
        try:
            toy = str(tmp / "toy-bank")
            assert build_bank(["--vocab", str(REPO / "bank" / "vocab" / "toy.tsv"), "--recipe", "toy", "--out", toy,
                               "--workers", "2"]) == 0
            port = free_port()
            serve.start(http_options={"host": "127.0.0.1", "port": port})
            if not a.skip_live:
                live_part(tmp, port, toy, a.requests)
            if not a.skip_memory:
                memory_part(tmp, port, toy, a.bank_mb)
        finally:
            serve.shutdown()
            ray.shutdown()
    print(f"summary: live bench done in {time.perf_counter() - t_all:.0f}s (2 shared CPU cores: timings are noisy)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
