"""The package's metrics, through Ray's own metrics API (`ray.util.metrics`; `ray.serve.metrics` inside Serve
replicas, which adds the deployment / replica / application tags).

Ray exports them in Prometheus text on each node's metrics export port (`ray start --metrics-export-port P`,
`ray.init(_metrics_export_port=P)`, `ovdiff serve --metrics-port P`) after its reporting interval (a few seconds),
beside Ray's own series, and Ray prefixes every name with `ray_`: `ovdiff_requests` below is scraped as
`ray_ovdiff_requests_total` (a counter gets `_total`; a histogram `_bucket` / `_sum` / `_count`).

Recording is a no-op in a process without Ray (the FastAPI app under TestClient, a plain script) and when
`OVDIFF_METRICS=0` (the metrics-off side of `bench/serve_bench.py`). `METRICS` is the one list of names, kinds,
descriptions and tag keys: the README's table and `deploy/grafana-dashboard.json` are checked against it.

Gauges stay on `/metrics` for as long as the process that set them lives. Ray's metrics agent keeps a gauge's
value only for two reporting intervals (`metrics_report_interval_ms`, 10 s by default) after the process last set
it, and a process exports only what it set in the interval: a value set once (the bank a replica loaded) was gone
from the scrape about 20-30 s later. So this module remembers the last value of every gauge series it set and a
daemon thread of the process (`_Keeper`) sets them all again every `refresh_seconds()` (half the reporting interval,
at most 5 s). A series whose process ends (a replaced replica) ages out as before.
"""
from __future__ import annotations

import logging
import os
import threading
from dataclasses import dataclass

log = logging.getLogger("ovdiff.metrics")
ENV = "OVDIFF_METRICS"
PREFIX = "ray_"  # what Ray puts in front of every custom metric's name

LATENCY_BUCKETS = [0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0]


@dataclass(frozen=True)
class Spec:
    """One series: `kind` counter | gauge | histogram, what it counts, its tag keys."""

    name: str
    kind: str
    description: str
    tags: tuple[str, ...] = ()
    serve: bool = False  # recorded inside Serve replicas (ray.serve.metrics: deployment/replica tags added)


METRICS: dict[str, Spec] = {s.name: s for s in (
    # the service (ingress replicas)
    Spec("ovdiff_requests", "counter", "HTTP requests answered, by route and status code", ("route", "status"), True),
    Spec("ovdiff_request_seconds", "histogram", "HTTP request latency (seconds) by route", ("route",), True),
    Spec("ovdiff_segment_stage_seconds", "histogram", "segment request latency by stage (seconds): validate, "
         "admission, decode, features, prefilter, matching, upsample, regions, pamr, segment (the model call), encode",
         ("stage",), True),
    Spec("ovdiff_admission_refusals", "counter", "requests refused for load: reason pixels (the pixel budget) or "
         "queue (the segmenter's queue is full)", ("reason",), True),
    Spec("ovdiff_queue_depth", "gauge", "segment requests on this ingress replica between validation and answer "
         "(waiting for pixels or for the segmenter)", (), True),
    # the segmenter replicas (bank served, reloads)
    Spec("ovdiff_bank_version", "gauge", "version of the bank this replica serves, by bank id", ("bank",), True),
    Spec("ovdiff_bank_classes", "gauge", "classes in the served bank version", ("bank",), True),
    Spec("ovdiff_bank_reload_failures", "counter", "followed bank versions that failed to load (the old one keeps "
         "serving)", ("bank",), True),
    # live-bank jobs (the job manager replica)
    Spec("ovdiff_jobs", "gauge", "live-bank jobs by state (queued, running, done, failed)", ("state",), True),
    Spec("ovdiff_job_classes", "counter", "classes finished by live-bank jobs, by outcome", ("outcome",), True),
    # build_bank (the driver)
    Spec("ovdiff_build_classes", "counter", "classes finished by build_bank, by status (built, failed, fatal)",
         ("bank", "status")),
    Spec("ovdiff_build_attempts", "counter", "class attempts by build_bank (more than classes when retried)",
         ("bank",)),
    Spec("ovdiff_build_stage_seconds", "counter", "seconds spent per class-pipeline stage (generate, attribution, "
         "masks, crf_wait, features, prototypes, text, write)", ("bank", "stage")),
    Spec("ovdiff_build_device_seconds", "counter", "worker seconds of built classes by device (cpu, cuda:0, ...)",
         ("bank", "device")),
    Spec("ovdiff_build_worker_restarts", "counter", "class workers whose start failed transiently and were started "
         "again", ("bank",)),
    # label_dataset (the driver)
    Spec("ovdiff_label_images", "counter", "images finished by label_dataset, by status (labelled, unreadable, failed)",
         ("status",)),
)}


class _Registry:
    """The metric objects of this process, made on first use (Ray must be up by then)."""

    def __init__(self):
        self._made: dict[str, object] = {}
        self._lock = threading.Lock()
        self._off: bool | None = None

    def off(self) -> bool:
        if self._off is None:
            self._off = os.environ.get(ENV, "1").strip().lower() in ("0", "false", "off", "no")
        return self._off

    def get(self, name: str):
        m = self._made.get(name)
        if m is not None:
            return m
        if self.off():
            return None
        try:
            import ray

            if not ray.is_initialized():
                return None
            spec = METRICS[name]
            if spec.serve:
                from ray.serve import metrics as mod
            else:
                from ray.util import metrics as mod
            with self._lock:
                m = self._made.get(name)
                if m is None:
                    kw = {"description": spec.description, "tag_keys": spec.tags}
                    if spec.kind == "counter":
                        m = mod.Counter(name, **kw)
                    elif spec.kind == "gauge":
                        m = mod.Gauge(name, **kw)
                    else:
                        m = mod.Histogram(name, boundaries=LATENCY_BUCKETS, **kw)
                    self._made[name] = m
            return m
        except Exception as e:  # noqa: BLE001 - metrics never break the work they measure
            log.warning("metric %s unavailable: %s: %s", name, type(e).__name__, e)
            self._off = True
            return None


_REG = _Registry()


def refresh_seconds() -> float:
    """How often the keeper sets the gauges again: half of Ray's reporting interval, at most 5 s."""
    try:
        import ray

        ms = float(ray._config.metrics_report_interval_ms())  # noqa: SLF001 - the interval Ray exports at
    except Exception:  # noqa: BLE001 - an older Ray without the accessor
        ms = 10_000.0
    return max(0.5, min(5.0, ms / 2000.0))


class _Keeper:
    """The last value of each gauge series this process set, set again every `refresh_seconds()` by one daemon
    thread (started with the first gauge) for the life of the process."""

    def __init__(self):
        self.values: dict[tuple, tuple[str, float, dict | None]] = {}
        self._lock = threading.Lock()
        self._thread: threading.Thread | None = None

    def remember(self, name: str, value: float, tags: dict[str, str] | None) -> None:
        key = (name, tuple(sorted((tags or {}).items())))
        with self._lock:
            self.values[key] = (name, value, tags)
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name="ovdiff-gauges", daemon=True)
                self._thread.start()

    def refresh(self) -> int:
        """Set every remembered series again; returns how many."""
        with self._lock:
            items = list(self.values.values())
        for name, value, tags in items:
            m = _REG.get(name)
            if m is not None:
                try:
                    m.set(value, tags=tags)
                except Exception as e:  # noqa: BLE001 - metrics never break the work they measure
                    log.warning("gauge %s not refreshed: %s: %s", name, type(e).__name__, e)
        return len(items)

    def _run(self) -> None:
        import time

        period = refresh_seconds()
        while True:
            time.sleep(period)
            self.refresh()


_KEEP = _Keeper()


def _tags(tags: dict | None) -> dict[str, str] | None:
    return {k: str(v) for k, v in tags.items()} if tags else None


def inc(name: str, value: float = 1.0, tags: dict | None = None) -> None:
    """Add `value` to counter `name` (a name in METRICS) with `tags`."""
    m = _REG.get(name)
    if m is not None and value > 0:
        m.inc(value, tags=_tags(tags))


def set_gauge(name: str, value: float, tags: dict | None = None) -> None:
    """Set gauge `name` to `value` for `tags`; the value stays exported (set again every few seconds by `_Keeper`)
    until the process ends or sets another value."""
    m = _REG.get(name)
    if m is not None:
        t = _tags(tags)
        m.set(float(value), tags=t)
        _KEEP.remember(name, float(value), t)


def observe(name: str, value: float, tags: dict | None = None) -> None:
    """Record one observation (seconds) in histogram `name`."""
    m = _REG.get(name)
    if m is not None:
        m.observe(float(value), tags=_tags(tags))


def enabled() -> bool:
    """Whether this process records (Ray up, not switched off)."""
    if _REG.off():
        return False
    try:
        import ray

        return ray.is_initialized()
    except ImportError:  # pragma: no cover - ray is a dependency
        return False


def exported_name(name: str) -> str:
    """The name Prometheus sees: Ray's prefix, plus `_total` for a counter."""
    return PREFIX + name + ("_total" if METRICS[name].kind == "counter" else "")


def export_port() -> int | None:
    """This node's metrics export port (Prometheus text at http://<node>:<port>/metrics), when Ray is up."""
    try:
        import ray

        node = ray._private.worker.global_worker.node  # noqa: SLF001 - the port is only known here
        return int(node.metrics_export_port)
    except Exception:  # noqa: BLE001 - Ray not started
        return None
