"""Chaos build: `build_bank` on a two-node Ray cluster into S3 while the cluster's ordinary faults happen.

What runs: a head (127.0.0.2) and a worker node (127.0.0.3) started with `ray start` on this machine (token auth of
their own, `--temp-dir` of their own; see tests/test_cluster.py), moto's S3 server behind a fault proxy that
answers 503 SlowDown to a random `--s3-fault-rate` (5%) of all S3 calls, and `ray job submit -- build_bank` of
`--classes N` classes with the tiny recipe (real diffusers / timm / open_clip architectures, tiny random weights)
into `s3://chaos/bank`. During the build the worker node is killed `--node-kills` (3) times, each time started
again a few seconds later, and one class worker is killed while it starts (its models loading). A build that ends
before all its classes are committed is started again (`builds_ended_early` counts those: the resumes an operator
would do by hand); at most `--max-resumes`.

At the end: every class is in the committed manifest exactly once, every shard is read back and its sha256 checked
(`load_bank`), and the build report over the records (`ovdiff bank inspect --report`) is printed: attempts, worker
restarts, per-stage seconds. Lines:

    classes_committed: N   exactly_once: true|false   builds_ended_early: K   shards_verified: true|false
    node_kills: 3   actor_kills_at_start: 1   s3_faults_injected: F   s3_calls: C   wall_s: ...

    python bench/chaos_build.py [--classes 200] [--runs 1] [--node-kills 3] [--s3-fault-rate 0.05]
"""
from __future__ import annotations

import argparse
import os
import random
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from tests.faults import FaultProxy  # noqa: E402 - the repo's S3 fault proxy
from tests.test_cluster import Cluster, descendants, kill, procs_matching  # noqa: E402 - the 2-node cluster

BUCKET = "chaos"


def emit(name: str, value) -> None:
    print(f"{name}: {value:.4g}" if isinstance(value, float) else f"{name}: {value}", flush=True)


def note(msg: str) -> None:
    print(f"# {msg}", file=sys.stderr, flush=True)


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Chaos:
    """The fault schedule: node kills at times spread over the expected build, one actor killed at start."""

    def __init__(self, cluster: Cluster, node_kills: int, first_s: float, every_s: float, marker_pids=None):
        self.c, self.left, self.first_s, self.every_s = cluster, node_kills, first_s, every_s
        self.marker_pids = marker_pids  # () -> pids of the workers that have started a class (run markers)
        self.node_kills = 0
        self.actor_kills = 0
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self.run, daemon=True)

    def worker_pids(self) -> set[int]:
        """ClassWorker actor processes on the worker node."""
        on_node = set(descendants(procs_matching(f"OVDIFF_TEST_NODE={self.c.tmp}@127.0.0.3", where="environ")))
        return {p for p in procs_matching("ClassWorker") if p in on_node}

    def kill_one_starting_actor(self, timeout: float = 60.0) -> None:
        """Kill the first ClassWorker process that appears on the (restarted) worker node, within 0.5 s of it
        appearing: its models are still loading."""
        seen = self.worker_pids()
        end = time.time() + timeout
        while time.time() < end and not self.stop.is_set():
            new = self.worker_pids() - seen
            if new:
                time.sleep(0.3)
                kill(sorted(new)[:1])
                self.actor_kills += 1
                note(f"killed class worker pid {sorted(new)[0]} while it started")
                return
            time.sleep(0.1)

    def busy_for(self) -> float:
        """Seconds the oldest ClassWorker on the worker node has lived (0 when none)."""
        import psutil

        ages = []
        for p in self.worker_pids():
            try:
                ages.append(time.time() - psutil.Process(p).create_time())
            except psutil.Error:
                pass
        return max(ages, default=0.0)

    def building(self) -> bool:
        """A class worker on the worker node has started a class (its run marker is there): it is mid-class."""
        if self.marker_pids is None:
            return False
        try:
            return bool(self.worker_pids() & self.marker_pids())
        except Exception:  # noqa: BLE001 - the listing failed: look again
            return False

    def run(self) -> None:
        """Kill the worker node once a class worker there has started a class (so a class is in flight there), or
        has lived `first_s`; start it again, and repeat (`every_s`) once it is back and building again."""
        t0 = time.time()
        wait = self.first_s
        while self.left > 0 and not self.stop.is_set():
            if self.busy_for() < wait and not self.building():
                time.sleep(0.3)
                continue
            n = self.c.kill_node("127.0.0.3")
            self.node_kills += 1
            self.left -= 1
            note(f"t={time.time() - t0:.0f}s: worker node killed ({n} processes); starting it again in 3 s")
            time.sleep(3)
            try:
                self.c.start_worker("127.0.0.3")
            except AssertionError as e:
                note(f"worker node did not start again: {str(e)[:300]}")
            if self.actor_kills == 0:
                self.kill_one_starting_actor()
            wait = self.every_s


def one_run(args, run: int, work: Path) -> dict:
    import boto3
    from moto.server import ThreadedMotoServer

    import logging

    logging.getLogger("werkzeug").setLevel(logging.ERROR)
    port = free_port()
    moto = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    moto.start()
    proxy = FaultProxy(f"http://127.0.0.1:{port}")
    rng = random.Random(1000 + run)
    calls = [0]

    def rule(method, path):
        calls[0] += 1
        return rng.random() < args.s3_fault_rate

    tmp = Path(tempfile.mkdtemp(prefix="ovc-", dir="/tmp"))  # short: Ray's socket paths must stay < 108 bytes
    c = Cluster(tmp)
    aws = {"AWS_ENDPOINT_URL": proxy.url, "AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing",
           "AWS_DEFAULT_REGION": "us-east-1", "OVDIFF_WORKER_START_BACKOFF_S": "1"}
    c.env.update(aws)
    boto3.client("s3", endpoint_url=f"http://127.0.0.1:{port}", region_name="us-east-1",
                 aws_access_key_id="testing", aws_secret_access_key="testing").create_bucket(Bucket=BUCKET)
    vocab = work / f"chaos{args.classes}.tsv"
    vocab.write_text("name\tkind\n" + "".join(f"chaos class {i:04d}\tthing\n" for i in range(args.classes)))
    out = f"s3://{BUCKET}/bank-{run}"
    ended_early, t0 = 0, time.perf_counter()
    chaos = None
    try:
        c.start_head()
        c.start_worker("127.0.0.3")
        proxy.rule = rule
        s3 = boto3.client("s3", endpoint_url=f"http://127.0.0.1:{port}", region_name="us-east-1",
                          aws_access_key_id="testing", aws_secret_access_key="testing")

        def marker_pids() -> set[int]:
            """Pids in the run markers' names (`<host>-<pid>-<attempt>`), straight from moto (no faults)."""
            pids = set()
            for page in s3.get_paginator("list_objects_v2").paginate(Bucket=BUCKET, Prefix=f"bank-{run}/runs/"):
                for o in page.get("Contents", []):
                    parts = o["Key"].rsplit("/", 1)[-1].split("-")
                    if len(parts) >= 3 and parts[-2].isdigit():
                        pids.add(int(parts[-2]))
            return pids

        chaos = Chaos(c, args.node_kills, args.first_kill_s, args.kill_every_s, marker_pids)
        chaos.thread.start()
        for attempt in range(args.max_resumes + 1):
            r = c.submit("--vocab", str(vocab), "--recipe", args.recipe, "--out", out, "--workers", "4",
                         "--commit-every", "8")
            lines = (r.stdout + r.stderr).splitlines()
            summary = [x for x in lines if x.startswith("summary:")]
            note(f"run {run} build {attempt + 1}: exit {r.returncode}: {summary[-1] if summary else lines[-5:]}")
            if r.returncode == 0 and summary and "failed 0" in summary[-1]:
                break
            ended_early += 1
        chaos.stop.set()
        chaos.thread.join(120)
        proxy.rule = lambda m, p: False  # the checks read through the proxy without faults
        return check(out, args.classes, aws) | {
            "builds_ended_early": ended_early, "node_kills": chaos.node_kills, "actor_kills_at_start":
            chaos.actor_kills, "s3_faults_injected": proxy.failed, "s3_calls": calls[0],
            "wall_s": time.perf_counter() - t0}
    finally:
        if chaos is not None:
            chaos.stop.set()
        c.stop()
        shutil.rmtree(tmp, ignore_errors=True)
        proxy.close()
        moto.stop()


def check(out: str, n: int, aws: dict) -> dict:
    os.environ.update(aws)
    from ovdiff_ray.build_report import format_report, report
    from ovdiff_ray.store import Location, load_bank, read_manifest

    m = read_manifest(Location(out))
    names = [c["name"] for c in (m or {}).get("classes", [])]
    once = m is not None and len(names) == len(set(names)) and len({c["shard"] for c in m["classes"]}) == len(names)
    try:
        verified = len(load_bank(out).names) == len(names)  # every shard's sha256 checked
    except Exception as e:  # noqa: BLE001 - reported as not verified
        note(f"load_bank failed: {type(e).__name__}: {e}")
        verified = False
    if m is not None:
        print(format_report(report(m, top=3)), file=sys.stderr, flush=True)
    rep = report(m) if m is not None else None
    return {"classes_committed": len(set(names)), "exactly_once": once and len(names) == n,
            "shards_verified": verified, "class_attempts": rep.attempts if rep else 0,
            "class_runs": rep.runs if rep else 0,
            "worker_restarts": rep.worker_restarts if rep else 0, "classes_retried": rep.retried if rep else 0,
            "classes_by_node": ",".join(f"{k}={v}" for k, v in sorted(rep.nodes.items())) if rep else ""}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--classes", type=int, default=200, help="classes to build (default 200)")
    ap.add_argument("--runs", type=int, default=1, help="independent runs, each on a fresh cluster and S3 (default 1)")
    ap.add_argument("--recipe", default="tiny")
    ap.add_argument("--node-kills", type=int, default=3)
    ap.add_argument("--first-kill-s", type=float, default=30.0,
                    help="kill the worker node once a class worker there has started a class (its run marker), or "
                         "has lived this long (default 30)")
    ap.add_argument("--kill-every-s", type=float, default=30.0,
                    help="after a restart, the same for the next kill (default 30)")
    ap.add_argument("--s3-fault-rate", type=float, default=0.05)
    ap.add_argument("--max-resumes", type=int, default=5)
    a = ap.parse_args(argv)
    if a.classes < 1 or a.runs < 1 or not 0 <= a.s3_fault_rate < 1:
        ap.error("--classes and --runs must be at least 1, --s3-fault-rate in [0, 1)")
    work = Path(tempfile.mkdtemp(prefix="chaos-"))
    results = []
    try:
        for run in range(a.runs):
            r = one_run(a, run, work)
            results.append(r)
            print(f"# run {run + 1}/{a.runs}", flush=True)
            for k in ("classes_committed", "exactly_once", "builds_ended_early", "shards_verified", "node_kills",
                      "actor_kills_at_start", "s3_faults_injected", "s3_calls", "class_attempts", "class_runs",
                      "classes_retried", "worker_restarts", "classes_by_node", "wall_s"):
                v = r[k]
                emit(k, str(v).lower() if isinstance(v, bool) else v)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    ok = all(r["exactly_once"] and r["shards_verified"] for r in results)
    print(f"summary: {len(results)} run(s) of {a.classes} classes: committed "
          f"{', '.join(str(r['classes_committed']) for r in results)}; exactly once: {str(ok).lower()}; builds "
          f"ended early: {sum(r['builds_ended_early'] for r in results)}; node kills "
          f"{sum(r['node_kills'] for r in results)}, S3 faults {sum(r['s3_faults_injected'] for r in results)}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
