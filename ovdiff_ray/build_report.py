"""Build records and the build report.

Each class a worker builds carries a `build` record into its manifest entry:

    {"stages": {"generate": s, "attribution": s, "masks": s, "features": s, "prototypes": s, ..., "write": s},
     "seconds": s,          # the successful attempt, sampling + shard write
     "worker_seconds": s,   # every attempt of the class on this worker, failed ones included
     "attempts": n, "node": "<node ip>", "worker": "<host>:<pid>", "device": "cpu" | "cuda:0,1", "gpus": g,
     "worker_start_attempts": n}

(stage names are whatever `sample_class` reports in `info["seconds"]`, plus `write`). The driver turns each result
row into Ray metrics (`record_row`), and `ovdiff bank inspect URI --report` sums the records of a committed
version (`report`, `format_report`): per-stage totals, the slowest classes, device-hours and their price.
"""
from __future__ import annotations

import socket
from dataclasses import dataclass, field

from . import metrics


def node_ip() -> str:
    """This process's Ray node address, as the node registered it (the host name outside Ray)."""
    try:
        import ray

        if ray.is_initialized():
            return str(ray._private.worker.global_worker.node_ip_address)  # noqa: SLF001 - the node's own address
    except Exception:  # noqa: BLE001 - outside Ray
        pass
    return socket.gethostname()


RUNS = "runs/"  # one empty marker per class run: `runs/<class>/<worker>-<n>` (never read by loaders)


def _run_dir(name: str) -> str:
    import hashlib

    from .store.schema import slug

    return f"{RUNS}{slug(name)}-{hashlib.sha256(name.encode()).hexdigest()[:8]}/"


def mark_run(loc, name: str, worker: str, attempt: int) -> None:
    """Note that a worker starts class `name` (attempt `attempt` on that worker). A worker lost mid-class leaves its
    marker, so the class's committed record counts the runs on lost workers too (`runs`)."""
    safe = "".join(ch if ch.isalnum() or ch in "-." else "-" for ch in worker)
    loc.write_bytes(f"{_run_dir(name)}{safe}-{attempt}", b"")


def count_runs(loc, name: str) -> int:
    """Markers of class `name`: every worker's every attempt, lost workers' included (resumed builds too)."""
    return len(loc.list(_run_dir(name)))


def worker_device(models_device: str) -> tuple[str, float]:
    """(`cpu` or `cuda:<Ray's GPU ids>`, GPUs held by this worker) for the record. A fractional GPU counts as its
    fraction (`--gpus-per-worker 0.5`: 0.5, from the resources Ray assigned, not the ids it lists)."""
    gpus: list = []
    held = 0.0
    try:
        import ray

        if ray.is_initialized():
            gpus = list(ray.get_gpu_ids())
            held = float(ray.get_runtime_context().get_assigned_resources().get("GPU", 0.0))
    except Exception:  # noqa: BLE001 - outside Ray
        gpus, held = [], 0.0
    if gpus and not held:  # a task or driver Ray lists GPUs for without an assignment record
        held = float(len(gpus))
    if str(models_device).startswith("cuda") and gpus:
        return "cuda:" + ",".join(str(g) for g in gpus), round(held, 6)
    return str(models_device), round(held, 6)


def class_record(stage_seconds: dict, write_s: float, seconds: float, worker_seconds: float, attempts: int,
                 worker: str, device: str, gpus: float, start_attempts: int = 1, runs: int | None = None) -> dict:
    """The `build` record of one committed class (seconds rounded to ms). `runs`: attempts over all workers (the
    run markers), at least `attempts`."""
    stages = {str(k): round(float(v), 3) for k, v in (stage_seconds or {}).items()}
    stages["write"] = round(float(write_s), 3)
    return {"stages": stages, "seconds": round(seconds, 3), "worker_seconds": round(worker_seconds, 3),
            "attempts": int(attempts), "runs": max(int(attempts), int(runs or 0)), "node": node_ip(),
            "worker": worker, "device": device, "gpus": gpus, "worker_start_attempts": int(start_attempts)}


def record_row(bank_id: str, row: dict, entry: dict | None) -> None:
    """One ClassWorker result row (and its parsed manifest entry when built) -> the build's Ray metrics."""
    if not metrics.enabled():
        return
    status = {"ok": "built"}.get(row["status"], row["status"])
    metrics.inc("ovdiff_build_classes", 1, {"bank": bank_id, "status": status})
    metrics.inc("ovdiff_build_attempts", float(row.get("attempts") or 0), {"bank": bank_id})
    rec = (entry or {}).get("build")
    if not rec:
        return
    for stage, s in rec["stages"].items():
        metrics.inc("ovdiff_build_stage_seconds", s, {"bank": bank_id, "stage": stage})
    metrics.inc("ovdiff_build_device_seconds", device_seconds(rec), {"bank": bank_id, "device": rec["device"]})
    if rec.get("worker_start_attempts", 1) > 1:
        metrics.inc("ovdiff_build_worker_restarts", rec["worker_start_attempts"] - 1, {"bank": bank_id})


def device_seconds(rec: dict) -> float:
    """Seconds of the devices a class held: worker seconds x GPUs, a fraction of a GPU as its fraction (a CPU
    worker, 0 GPUs, counts as one device)."""
    gpus = float(rec.get("gpus") or 0.0)
    return float(rec.get("worker_seconds", rec.get("seconds", 0.0))) * (gpus if gpus > 0 else 1.0)


@dataclass
class Report:
    """A committed version's build records, summed."""

    bank_id: str
    version: int
    classes: int
    recorded: int  # classes with a build record (banks built before records existed have none)
    stages: dict[str, float] = field(default_factory=dict)  # stage -> seconds over all recorded classes
    slowest: list[dict] = field(default_factory=list)  # {name, seconds, attempts, node, device}
    attempts: int = 0  # attempts on the workers that committed the classes
    runs: int = 0  # attempts over all workers, those lost mid-class (a node killed) included
    retried: int = 0  # classes built in more than one attempt
    worker_restarts: int = 0  # extra worker starts seen by the recorded classes' workers (counted once per worker)
    device_hours: dict[str, float] = field(default_factory=dict)  # device kind (cpu / cuda) -> hours
    nodes: dict[str, int] = field(default_factory=dict)  # node -> classes
    failed: int = 0  # classes the manifest lists as failed in the build that committed it
    price_per_hour: float | None = None

    @property
    def total_device_hours(self) -> float:
        return sum(self.device_hours.values())

    def to_dict(self) -> dict:
        d = {k: getattr(self, k) for k in ("bank_id", "version", "classes", "recorded", "stages", "slowest",
                                            "attempts", "runs", "retried", "worker_restarts", "device_hours", "nodes",
                                            "failed", "price_per_hour")}
        d["total_device_hours"] = self.total_device_hours
        if self.price_per_hour is not None:
            d["cost"] = round(self.total_device_hours * self.price_per_hour, 4)
        return d


def report(manifest: dict, top: int = 10, price_per_hour: float | None = None) -> Report:
    """Sum the `build` records of `manifest`'s classes."""
    r = Report(manifest["bank_id"], int(manifest["version"]), len(manifest["classes"]), 0,
               failed=len(manifest.get("failed") or []), price_per_hour=price_per_hour)
    per_class = []
    workers: dict[str, int] = {}
    for c in manifest["classes"]:
        rec = c.get("build")
        if not rec:
            continue
        r.recorded += 1
        for stage, s in rec.get("stages", {}).items():
            r.stages[stage] = r.stages.get(stage, 0.0) + float(s)
        r.attempts += int(rec.get("attempts", 1))
        r.runs += int(rec.get("runs", rec.get("attempts", 1)))
        r.retried += int(rec.get("runs", rec.get("attempts", 1)) > 1)
        workers[rec.get("worker", "")] = max(workers.get(rec.get("worker", ""), 1),
                                             int(rec.get("worker_start_attempts", 1)))
        kind = str(rec.get("device", "cpu")).split(":")[0]
        r.device_hours[kind] = r.device_hours.get(kind, 0.0) + device_seconds(rec) / 3600
        node = str(rec.get("node", "?"))
        r.nodes[node] = r.nodes.get(node, 0) + 1
        per_class.append({"name": c["name"], "seconds": float(rec.get("worker_seconds", rec.get("seconds", 0.0))),
                          "attempts": int(rec.get("attempts", 1)), "node": node, "device": rec.get("device")})
    r.worker_restarts = sum(n - 1 for n in workers.values())
    r.slowest = sorted(per_class, key=lambda d: -d["seconds"])[:top]
    return r


def format_report(r: Report) -> str:
    """The report as text: stages (seconds, share), slowest classes, device-hours and cost."""
    lines = [f"build report: bank {r.bank_id} v{r.version}: {r.classes} classes, {r.recorded} with a build record"]
    if not r.recorded:
        lines.append("  (no build records: this version was built before build records existed)")
        return "\n".join(lines)
    total = sum(r.stages.values()) or 1e-12
    lines.append(f"  {'stage':<16} {'seconds':>10} {'share':>7} {'per class':>10}")
    for stage, s in sorted(r.stages.items(), key=lambda kv: -kv[1]):
        lines.append(f"  {stage:<16} {s:>10.1f} {100 * s / total:>6.1f}% {s / r.recorded:>10.3f}")
    lines.append(f"  {'total':<16} {total:>10.1f} {100.0:>6.1f}% {total / r.recorded:>10.3f}")
    lines.append(f"  attempts {r.attempts} for {r.recorded} classes, {r.runs} runs counting workers lost mid-class "
                 f"({r.retried} classes retried); worker restarts {r.worker_restarts}; failed in the committing "
                 f"build {r.failed}")
    lines.append("  nodes: " + ", ".join(f"{n} {k} classes" for n, k in sorted(r.nodes.items())))
    lines.append(f"  slowest {len(r.slowest)}:")
    for c in r.slowest:
        lines.append(f"    {c['name'][:40]:<40} {c['seconds']:>8.2f} s  attempts {c['attempts']}  {c['node']}  "
                     f"{c['device']}")
    hours = ", ".join(f"{k} {v:.4f} h" for k, v in sorted(r.device_hours.items()))
    cost = (f"; at ${r.price_per_hour:g}/device-hour: ${r.total_device_hours * r.price_per_hour:.2f}"
            if r.price_per_hour is not None else " (give --price-per-hour for a cost)")
    lines.append(f"  device-hours: {r.total_device_hours:.4f} ({hours}){cost}")
    return "\n".join(lines)

