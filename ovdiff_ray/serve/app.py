"""Ray Serve application: a FastAPI ingress (factory form) in front of a batched, multiplexed segmenter deployment.

    HTTP -> OVDiffIngress  --DeploymentHandle-->  OVDiffSegmenter
            validates the form and the image      @serve.batch per bank (multiplexed id), banks + models
            (header, pixel budget, one decode,    loaded once per replica, the model work in one thread
            upright, downscaled to the working    off the event loop; no decoding or encoding here
            size), encodes mask / RLE / overlay

One module, one job: `app` (this file: the app factory, the deployments, the builder, the CLI), `routes` (the
APIRouter), `middleware` (body limit, body read deadline, last guard), `errors` (one error schema and its handlers),
`backends` (in-process or through Serve), `admission` (pixel budget), `engine` (banks, models, encoders) and
`limits` (request validation and decoding). Another router joins with one line in `make_app`.

Run it with `ovdiff serve --bank URI`, `serve run deploy/serve.yaml` or `serve deploy deploy/serve.yaml`. Routes:

- `POST /v1/segment`  multipart `image`; optional `classes` (comma-separated), `format` (png | rle | overlay),
  `pamr` (bool), `bank` (id, id@vN or configured name), `regions` (on/off or none | superpixels | sam; default:
  the bank recipe's `segmentation.regions`). JSON: `bank`, `width`, `height` (the upload's, EXIF
  orientation applied), `classes` (label value -> name for the values present; 0 = background, c + 1 = bank class
  c), the mask (`mask` base64 PNG, uint8 or uint16 per bank / `rle` COCO RLE per class / `overlay` base64 PNG +
  `legend`), `kept` and `timing`.
- `GET /v1/bank[?bank=REF]` id, version, classes, recipe summary; `GET /healthz` public status (ok / degraded /
  503); `GET /v1/status` operator details behind `OVDIFF_ADMIN_TOKEN`; `GET /` the try-it page. No /docs or /redoc
  unless `docs: true`; `/openapi.json` documents every route and every error status.
- `POST /v1/classes`, `GET /v1/jobs/ID` and `missing=build` (admin token): classes added to a followed bank while it
  is served (`live.py`, `jobs.py`); followed banks reload new versions without a restart (`reload.py`).

Errors are JSON `{"error": message, "detail": ..., "code": ...}` (`errors.ErrorBody`): 400 bad field / truncated
image / unknown, empty or too many classes, 404 unknown bank, 408 body not received within `body_timeout_s`, 413
upload or pixel count over the limits, 415 not an image or not multipart, 503 (or 429) with `Retry-After` when the
pixel budget or the segmenter's queue is full, a replica is restarting, or a bank's storage is down; 500 only for
a bug, with a plain message (the traceback is in the log).

Several banks are served side by side by Serve model multiplexing keyed by `<bank_id>@v<version>`: one replica keeps
up to `OVDIFF_MAX_BANKS_PER_REPLICA` (3) banks, and banks whose recipes name the same models share one copy of them
(bench/serve_bench.py measures a bank switch and an extra bank's memory against a whole replica per bank).
"""
from __future__ import annotations

import asyncio
import logging
import math
import os
import sys
import threading
import time
from pathlib import Path
from typing import Any, Literal

from fastapi import APIRouter, FastAPI
from pydantic import BaseModel, ConfigDict, Field
from ray import serve
from ray.serve.handle import DeploymentHandle

from .backends import MAX_BANKS_PER_REPLICA, SEGMENTER, Backend, LocalBackend, ServeBackend, _Worker
from .engine import BankSpec, Engine, Job, ServiceConfig, bank_entry
from .errors import Overloaded, document_errors, install_error_handlers
from .http_guard import HOOK as HTTP_GUARD
from ..preflight.device import DEVICES, device_help, resolve_device
from .limits import Limits, RequestError
from .. import logs
from .middleware import BodyDeadline, BodyLimit, Guard, Metrics
from .routes import router
from . import bankview
from . import live
from .jobs import JOBS, BankJobsDeployment, BuildSettings
from .reload import LiveBanks
from ..cli_help import Parser

__all__ = ["make_app", "build_app", "main", "LocalBackend", "ServeBackend", "Overloaded", "SegmenterDeployment",
           "IngressDeployment", "AppArgs"]
log = logging.getLogger("ovdiff.serve")
INGRESS = "OVDiffIngress"
APP_NAME = "ovdiff"


# ------------------------------------------------------------------------------------------------ the app

def make_app(backend: Backend, extra_routers: tuple[APIRouter, ...] = (), docs: bool = False,
             admin_token: str | None = None, labelstudio=None) -> FastAPI:
    """The FastAPI app of the service over any `Backend` (testable with TestClient, no Ray needed).

    `docs` turns on /docs and /redoc (they load assets from CDNs); `admin_token` (default `$OVDIFF_ADMIN_TOKEN`)
    opens the operators' `/v1/status`. Trailing-slash redirects are off (a redirect would echo the client's Host).
    `labelstudio`: settings of the Label Studio ML backend routes (`serve/labelstudio.py`; default: from the
    environment)."""
    from .. import __version__

    app = FastAPI(title="OVDiff segmentation", version=__version__, redirect_slashes=False,
                  docs_url="/docs" if docs else None, redoc_url="/redoc" if docs else None,
                  description="Open-vocabulary segmentation with a prototype bank (see GET / for a try-it page).")
    install_error_handlers(app)
    app.include_router(router(backend, admin_token))
    app.include_router(bankview.router(backend))  # GET /bank and /v1/bank/classes...: the bank view (issue 26)
    for extra in extra_routers:  # other route modules join here: app.include_router(module.router(backend))
        app.include_router(extra)
    app.add_middleware(BodyDeadline, backend=backend)  # innermost of the three
    app.add_middleware(BodyLimit, backend=backend)
    app.add_middleware(Guard)
    app.add_middleware(Metrics)  # outermost: counts what Guard answers too
    openapi = app.openapi

    def documented() -> dict:
        if app.openapi_schema is None:
            app.openapi_schema = document_errors(openapi())
        return app.openapi_schema

    app.openapi = documented  # type: ignore[method-assign]
    live.add_live_routes(app, backend)  # POST /v1/classes, GET /v1/jobs/ID (admin token; off without one)
    from .labelstudio import mount_labelstudio

    mount_labelstudio(app, backend, labelstudio)  # POST /predict, POST /setup, GET /health: Label Studio's protocol
    return app


# ------------------------------------------------------------------------------------------- deployments

def ingress_app() -> FastAPI:
    """App factory for `serve.ingress`: evaluated on each ingress replica."""
    # Overlays are drawn by ovdiff_ray.segment, which imports torch (about a second): import it now, in the
    # background, rather than in the first overlay request.
    threading.Thread(target=lambda: __import__("ovdiff_ray.segment"), name="warm-imports", daemon=True).start()
    logs.configure()  # OVDIFF_LOG_FORMAT=json: JSON lines
    return make_app(ServeBackend(), docs=os.environ.get("OVDIFF_DOCS", "0") == "1")


@serve.deployment(name=SEGMENTER, max_ongoing_requests=6, max_queued_requests=64,
                  ray_actor_options={"num_cpus": 1, "num_gpus": 0}, health_check_period_s=10,
                  health_check_timeout_s=30)
class SegmenterDeployment:
    """Loads banks and their recipe's models once per replica; dynamic batching per bank (the multiplexed id)."""

    def __init__(self):
        logs.configure()  # OVDIFF_LOG_FORMAT=json: JSON lines
        self.engine: Engine | None = None
        self.default = None  # the default bank's Segmenter, pinned outside the multiplexer's LRU
        self.worker: _Worker | None = None
        self.live: LiveBanks | None = None  # followed banks (hot reload), outside the multiplexer too

    async def reconfigure(self, user_config: dict):
        cfg = ServiceConfig.from_dict(user_config)
        threads = cfg.torch_threads or _replica_cpus()
        if self.worker is None or self.worker.threads != threads:
            self.worker = _Worker(threads)
        engine = await self.worker(Engine, cfg)
        default = await self.worker(engine.load, engine.catalog.default)
        live = LiveBanks(engine, cfg.reload_poll_s, self._wait_commit if cfg.admin.get("jobs") else None)
        initial = {k: (default if k == engine.catalog.default else await self.worker(engine.load, k))
                   for k in engine.catalog.admin.get("live", [])}
        if self.live is not None:
            self.live.stop()
        self.engine, self.default, self.live = engine, default, live
        live.start(initial)
        # in the background (ready meanwhile; requests queue behind it): one line when it is over the timeout
        self._warmup = asyncio.ensure_future(self.worker(engine.warm_up, default))
        self._batch.set_max_batch_size(cfg.max_batch_size)
        self._batch.set_batch_wait_timeout_s(cfg.batch_wait_timeout_s)
        _check_batching(cfg.max_batch_size)

    async def check_health(self):
        if self.engine is None or self.default is None:
            raise RuntimeError("bank and models not loaded (no user_config applied yet)")

    async def _wait_commit(self, seen: int, timeout: float) -> dict:
        from ray import serve

        handle = serve.get_deployment_handle(JOBS, app_name=serve.get_replica_context().app_name)
        return await handle.wait_commit.remote(seen, timeout)

    async def health(self) -> dict:
        """`status`/`checks` (public) plus details for operators: banks, replica, pid, memory, storage error."""
        await self.check_health()
        import psutil

        mem = psutil.Process().memory_full_info()
        out = {**self.engine.health(), "replica": _replica_id(), "pid": os.getpid(),
               "rss_mb": round(mem.rss / 2**20, 1), "uss_mb": round(mem.uss / 2**20, 1),
               "pss_mb": round(getattr(mem, "pss", mem.rss) / 2**20, 1)}
        if self.live is not None and self.live.status:
            out["live"] = self.live.health()
            bad = {k: v["reload_error"] for k, v in out["live"].items() if v.get("reload_error")}
            if bad:
                out["status"] = "degraded"
                out["checks"] = {**out.get("checks", {}), "bank_reload": "degraded"}  # public; details below
                out["reload_error"] = "; ".join(f"{k}: v{v['version']} failed to load ({v['error']}), still "
                                                f"serving v{out['live'][k]['version']}" for k, v in bad.items())
        return out

    async def describe(self) -> dict:
        await self.check_health()
        return self.engine.catalog.to_dict()

    @serve.multiplexed(max_num_models_per_replica=MAX_BANKS_PER_REPLICA)
    async def bank(self, key: str):
        if key == self.engine.catalog.default:
            return self.default
        return await self.worker(self.engine.load, key)

    async def segment(self, job: Job) -> dict:
        await self.check_health()
        return await self._batch(job)

    @serve.batch(max_batch_size=4, batch_wait_timeout_s=0.005)
    async def _batch(self, jobs: list[Job]) -> list[dict]:
        key = serve.get_multiplexed_model_id() or self.engine.catalog.default
        try:
            # one Segmenter for the whole batch: a reload that switches meanwhile does not touch this batch
            seg = self.live.get(key) if self.live is not None else None
            seg = seg or await self.bank(key)
        except RequestError as e:
            return [{"status": e.status, **e.to_dict()} for _ in jobs]
        return await self.worker(self.engine.run, seg, jobs)


@serve.deployment(name=INGRESS, max_ongoing_requests=256, max_queued_requests=1024, ray_actor_options={"num_cpus": 0})
@serve.ingress(ingress_app)
class IngressDeployment:
    """HTTP front: validates requests (no model here) and forwards them to the segmenter."""

    def __init__(self, segmenter: DeploymentHandle, jobs: DeploymentHandle | None = None):
        # bound so that the application deploys them; the routes look them up by name
        self.segmenter, self.jobs = segmenter, jobs


def _replica_cpus() -> int:
    try:
        import ray

        return max(1, int(ray.get_runtime_context().get_assigned_resources().get("CPU", 1)))
    except Exception:  # noqa: BLE001
        return 1


def _replica_id() -> str:
    try:
        from ray import serve

        return serve.get_replica_context().replica_id.unique_id
    except Exception:  # noqa: BLE001
        return "local"


def _check_batching(max_batch_size: int) -> None:
    try:
        from ray import serve

        ongoing = serve.get_replica_context()._deployment_config.max_ongoing_requests
    except Exception:  # noqa: BLE001
        return
    if ongoing <= max_batch_size:
        log.warning("max_ongoing_requests (%s) <= max_batch_size (%s): batches can never fill; raise "
                    "max_ongoing_requests", ongoing, max_batch_size)


# ------------------------------------------------------------------------------------------ app builder

class AppArgs(BaseModel):
    """Arguments of `build_app` (the `args:` of a Serve config file)."""

    model_config = ConfigDict(extra="forbid")

    bank: str | None = None  # one bank URI ...
    version: int | None = None  # ... and its version (default: latest at build time)
    banks: list[str | dict] = Field(default_factory=list)  # or several: URI or {uri, version, name}; first = default
    pin_versions: bool = True  # resolve "latest" once, here, so every replica serves the same version
    follow_latest: bool = False  # banks given without a version follow `latest` (hot reload; overrides pinning)
    reload_poll_s: float = Field(10.0, gt=0)  # how often replicas read `latest`
    share_bank: bool = True  # one copy of a bank's arrays per node (memory-mapped, node-local cache)
    admin_token_file: str | None = None  # the admin token's file (else OVDIFF_ADMIN_TOKEN on the ingress)
    metrics: bool = True  # record the ovdiff_* series (false: OVDIFF_METRICS=0 in the app's replicas)
    build: dict = Field(default_factory=dict)  # job settings: workers, gpus_per_worker, limits (jobs.BuildSettings)
    limits: dict = Field(default_factory=dict)
    max_batch_size: int = Field(4, ge=1)
    batch_wait_timeout_s: float = Field(0.005, ge=0)
    device: str | None = None
    torch_threads: int | None = None
    request_timeout_s: float = Field(120.0, gt=0)
    storage: dict | None = None
    num_replicas: int | None = Field(None, ge=1)  # fixed replica count; else autoscaling below
    min_replicas: int = Field(1, ge=0)
    max_replicas: int = Field(1, ge=1)
    target_ongoing_requests: float = Field(4.0, gt=0)
    max_ongoing_requests: int | None = Field(None, ge=1)  # default: 1.5 x max_batch_size (above the batch size)
    max_queued_requests: int | None = Field(None, ge=-1)  # -1: unbounded; None: from the latency budget below
    latency_budget_s: float = Field(4.0, gt=0)  # the longest a request should wait in the queue ...
    request_cost_s: float = Field(0.25, gt=0)  # ... at this many seconds per request (measured, full batches)
    backpressure_status: Literal[503, 429] = 503
    retry_after_s: float = Field(2.0, ge=0)
    num_cpus: float = Field(1.0, ge=0)
    num_gpus: float = Field(0.0, ge=0)
    memory_gb: float | None = Field(None, gt=0)
    ingress_replicas: int = Field(1, ge=1)


def service_config(a: AppArgs) -> ServiceConfig:
    banks = [BankSpec.of(b) for b in a.banks]
    if a.bank:
        banks.insert(0, BankSpec(a.bank, a.version))
    if not banks:
        raise ValueError("no bank: set `bank: URI` (or `banks: [...]`) in the application args")
    banks = [BankSpec(_absolute(b.uri), b.version, b.name) for b in banks]  # replicas may not share our cwd
    if a.pin_versions:
        banks = [b if a.follow_latest and b.version is None else BankSpec(b.uri, bank_entry(b, a.storage).version, b.name)
                 for b in banks]
    build = BuildSettings.from_dict(a.build)
    admin = {"token_file": _absolute(a.admin_token_file) if a.admin_token_file else None,
             "max_classes_per_request": build.max_classes_per_request, "jobs": a.follow_latest}
    return ServiceConfig(banks, Limits.from_dict(a.limits), a.max_batch_size, a.batch_wait_timeout_s, a.device,
                         a.torch_threads, a.request_timeout_s, a.storage, a.follow_latest, a.reload_poll_s,
                         a.share_bank, admin)


def _absolute(uri: str) -> str:
    if "://" in uri and not uri.startswith("file://"):
        return uri
    return str(Path(uri.removeprefix("file://")).expanduser().resolve())


def queue_size(a: AppArgs, ongoing: int) -> int:
    """`max_queued_requests`: as configured, or what the replicas drain within the latency budget beyond the
    requests they already hold: floor(replicas x budget / cost) - replicas x ongoing, at least 1."""
    if a.max_queued_requests is not None:
        return a.max_queued_requests
    replicas = a.num_replicas or max(1, a.min_replicas)
    return max(1, math.floor(replicas * a.latency_budget_s / a.request_cost_s) - replicas * ongoing)


def build_app(args: dict | AppArgs):
    """Serve application builder: `serve run ovdiff_ray.serve.app:build_app bank=URI` or a config's import_path."""
    a = args if isinstance(args, AppArgs) else AppArgs.model_validate(dict(args or {}))
    cfg = service_config(a)
    ongoing = a.max_ongoing_requests or max(a.max_batch_size + 1, int(a.max_batch_size * 1.5 + 0.5))
    if ongoing <= a.max_batch_size:
        raise ValueError(f"max_ongoing_requests ({ongoing}) must be above max_batch_size ({a.max_batch_size}), or "
                         "a replica can never hold a full batch")
    actor = {"num_cpus": a.num_cpus, "num_gpus": a.num_gpus}
    if a.memory_gb:
        actor["memory"] = int(a.memory_gb * 2**30)
    off = {} if a.metrics else {"runtime_env": {"env_vars": {"OVDIFF_METRICS": "0"}}}
    actor.update(off)
    opts: dict[str, Any] = dict(user_config=cfg.to_dict(), max_ongoing_requests=ongoing,
                                max_queued_requests=queue_size(a, ongoing), ray_actor_options=actor,
                                backpressure_config={"status_code": a.backpressure_status,
                                                     "retry_after_s": a.retry_after_s})
    if a.num_replicas:
        opts["num_replicas"] = a.num_replicas
    else:
        if a.max_replicas < a.min_replicas:
            raise ValueError(f"max_replicas ({a.max_replicas}) < min_replicas ({a.min_replicas})")
        opts["autoscaling_config"] = {"min_replicas": a.min_replicas, "max_replicas": a.max_replicas,
                                      "target_ongoing_requests": a.target_ongoing_requests}
    segmenter = SegmenterDeployment.options(**opts).bind()
    ingress = {"num_replicas": a.ingress_replicas}
    if off:
        ingress["ray_actor_options"] = {"num_cpus": 0, **off}
    if not a.follow_latest:
        return IngressDeployment.options(**ingress).bind(segmenter)
    jobs = BankJobsDeployment.options(user_config={"build": BuildSettings.from_dict(a.build).to_dict(),
                                                   "storage": a.storage,
                                                   "banks": [b.uri for b in cfg.banks if b.version is None]},
                                      **({"ray_actor_options": {"num_cpus": 0, **off}} if off else {})).bind()
    return IngressDeployment.options(**ingress).bind(segmenter, jobs)


# -------------------------------------------------------------------------------------------------- CLI

def _interrupt(*_):
    raise KeyboardInterrupt


def main(argv: list[str] | None = None) -> int:
    """`ovdiff serve --bank URI [--port P] [--host H] [--replicas N | --min-replicas A --max-replicas B] ...`."""
    ap = Parser(prog="ovdiff serve", description="Start the segmentation service on a local Ray "
                                 "(or --address) with Ray Serve; Ctrl-C stops it.")
    ap.add_argument("--bank", action="append", required=True, metavar="URI",
                    help="bank location (folder or s3://bucket/prefix); repeat to serve several, the first is the "
                         "default; URI@N pins version N")
    ap.add_argument("--host", default="127.0.0.1", help="HTTP address to listen on")
    ap.add_argument("--port", type=int, default=8000, help="HTTP port")
    g = ap.add_mutually_exclusive_group()
    g.add_argument("--replicas", type=int, default=None, help="fixed number of segmenter replicas (default: autoscaling, --min-replicas to --max-replicas)")
    g.add_argument("--min-replicas", type=int, default=None, help="autoscaling lower bound (default 1)")
    ap.add_argument("--max-replicas", type=int, default=None, help="autoscaling upper bound (default min)")
    ap.add_argument("--num-cpus", type=float, default=1.0, help="CPUs per segmenter replica")
    ap.add_argument("--num-gpus", type=float, default=0.0,
                    help="GPUs per segmenter replica (default 0; 1 on a GPU cluster: real models with 0 need --device "
                         "cpu)")
    ap.add_argument("--device", choices=DEVICES, default="auto", help=device_help("replica"))
    ap.add_argument("--max-batch-size", type=int, default=4, help="images per model call (dynamic batching)")
    ap.add_argument("--request-timeout", type=float, default=120.0, metavar="S",
                    help="seconds a request's segmentation may take before the answer is 504 (the service says at "
                         "start when its warm-up segmentation already takes longer)")
    ap.add_argument("--max-queued-requests", type=int, default=None,
                    help="segmenter queue (default: sized from --latency-budget)")
    ap.add_argument("--latency-budget", type=float, default=4.0, metavar="S",
                    help="seconds a request may wait in the queue before it is refused up front (default 4)")
    ap.add_argument("--header-timeout", type=float, default=15.0, metavar="S",
                    help="408 and close when a request's headers take longer than this (default 15)")
    ap.add_argument("--shutdown-timeout", type=float, default=20.0, metavar="S",
                    help="on Ctrl-C / SIGTERM, seconds in-flight requests get before Ray is stopped (default 20)")
    ap.add_argument("--address", default=None, help="Ray cluster address (default: start a local Ray)")
    ap.add_argument("--follow", action="store_true",
                    help="follow each bank's latest version (hot reload; banks given without @N) and accept "
                         "POST /v1/classes when an admin token is set (OVDIFF_ADMIN_TOKEN or --admin-token-file)")
    ap.add_argument("--reload-poll-s", type=float, default=None, help="with --follow: seconds between reads of "
                    "`latest` (default 10; a job of this service is picked up at once)")
    ap.add_argument("--admin-token-file", default=None, help="file whose first line is the admin token (default: "
                    "$OVDIFF_ADMIN_TOKEN; neither: the admin routes are off)")
    ap.add_argument("--build-gpus-per-worker", type=float, default=None,
                    help="with --follow: GPUs per class-building worker (default 0, as on CPU machines)")
    ap.add_argument("--build-workers", type=int, default=None, help="with --follow: class-building workers (default 1)")
    ap.add_argument("--log-format", choices=("text", "json"), default="text",
                    help="json: every console line a JSON object: the service's own log lines with request_id, "
                         "job_id, bank_id and bank_version, one access line per answer, Ray's and Serve's lines "
                         "converted (Serve's log files in its JSON encoding)")
    ap.add_argument("--verbose", action="store_true",
                    help="Serve's INFO lines (controller, proxy, one access line per request) and Ray's native lines "
                         "on the terminal too; without it they are only in Ray's log folder (session_*/logs/serve/)")
    ap.add_argument("--metrics-port", type=int, default=None, metavar="P",
                    help="the local Ray's metrics export port: Prometheus text at http://127.0.0.1:P/metrics, the "
                         "service's series as ray_ovdiff_* beside Ray's and Serve's (default: a port Ray picks, "
                         "printed at start; on a cluster, each node's `ray start --metrics-export-port`)")
    a = ap.parse_args(argv)
    js = a.log_format == "json"
    from .. import terminal

    own_terminal = terminal.install(verbose=a.verbose, json_lines=js)  # Ray's lines off our terminal, or all JSON
    if a.metrics_port is not None and a.address is not None:
        ap.error("--metrics-port sets the port of a local Ray; a cluster's nodes set theirs with "
                 "`ray start --metrics-export-port`")
    if a.metrics_port is not None and not 0 < a.metrics_port < 65536:
        ap.error(f"--metrics-port {a.metrics_port}: not a TCP port")
    if not a.request_timeout > 0:
        ap.error(f"--request-timeout {a.request_timeout:g}: must be > 0 seconds")
    if a.max_replicas is not None and a.replicas is not None:
        ap.error("--max-replicas goes with --min-replicas, not --replicas")
    for flag in ("reload_poll_s", "build_gpus_per_worker", "build_workers"):
        if getattr(a, flag) is not None and not a.follow:
            ap.error(f"--{flag.replace('_', '-')} needs --follow (it sets how followed banks reload and build)")
    a.reload_poll_s = 10.0 if a.reload_poll_s is None else a.reload_poll_s
    a.build_gpus_per_worker = 0.0 if a.build_gpus_per_worker is None else a.build_gpus_per_worker
    a.build_workers = 1 if a.build_workers is None else a.build_workers
    banks = []
    for ref in a.bank:
        uri, _, ver = ref.rpartition("@") if "@" in ref and ref.rsplit("@", 1)[1].isdigit() else (ref, "", "")
        banks.append({"uri": uri, "version": int(ver) if ver else None})
    lo = a.min_replicas if a.min_replicas is not None else 1
    from ..preflight import run_for_load  # issue 16: banks, their models and the replicas' GPUs before Ray starts

    if run_for_load("ovdiff serve", [(b["uri"], b["version"]) for b in banks], address=a.address,
                    workers=a.replicas or lo, gpus=a.num_gpus, cpus=a.num_cpus, what="replica",
                    flags=("--replicas", "--num-gpus", "--num-cpus"), device=a.device,
                    builds=("--build-gpus-per-worker", a.build_gpus_per_worker) if a.follow else None):
        return 2
    args = dict(banks=banks, num_replicas=a.replicas, min_replicas=lo, max_replicas=max(lo, a.max_replicas or lo, 1),
                num_cpus=a.num_cpus, num_gpus=a.num_gpus, max_batch_size=a.max_batch_size,
                request_timeout_s=a.request_timeout, max_queued_requests=a.max_queued_requests, latency_budget_s=a.latency_budget,
                follow_latest=a.follow, reload_poll_s=a.reload_poll_s, admin_token_file=a.admin_token_file,
                device=None if a.device == "auto" else a.device,
                build={"gpus_per_worker": a.build_gpus_per_worker, "workers": a.build_workers})
    from ..store.fs import StoreError

    try:
        app = build_app(args)
    except (ValueError, OSError, StoreError) as e:
        print(f"ovdiff serve: error: {e}", file=sys.stderr)
        return 2
    import signal

    import ray

    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    own_ray = not ray.is_initialized() and a.address is None
    if own_terminal:
        terminal.quiet_serve_logger(a.verbose)
        if not a.verbose:
            logging.getLogger("ray._private.authentication.authentication_token_setup").setLevel(logging.ERROR)
    if not ray.is_initialized():  # the hook gives Serve's proxy a header read timeout (serve/http_guard.py)
        extra = {"_metrics_export_port": a.metrics_port} if a.metrics_port is not None else {}
        ray.init(address=a.address, include_dashboard=False, logging_level="WARNING",
                 runtime_env={"worker_process_setup_hook": HTTP_GUARD,
                              "env_vars": {"OVDIFF_HEADER_TIMEOUT_S": str(a.header_timeout),
                                           "OVDIFF_LOG_FORMAT": a.log_format,
                                           "OVDIFF_LOG_TEXT": "1"}}, **extra)
        if own_terminal:
            terminal.forward_worker_lines(a.verbose, js)
    from ..metrics import export_port

    port = export_port()
    if port:
        terminal.say("ovdiff serve: metrics (Prometheus text, series ray_ovdiff_*) at "
                     f"http://127.0.0.1:{port}/metrics", js)
    t0 = time.perf_counter()
    try:
        serve.start(http_options={"host": a.host, "port": a.port, "keep_alive_timeout_s": 15})
        serve.run(app, name=APP_NAME, route_prefix="/",
                  logging_config={"encoding": "JSON"} if a.log_format == "json" else None)
        url = f"http://{a.host}:{a.port}/"
        terminal.say(f"ovdiff serve: {len(banks)} bank(s), models on {resolve_device(a.device, a.num_gpus)}, "
                     f"ready in {time.perf_counter() - t0:.1f}s at {url} (try-it page), POST {url}v1/segment; "
                     "Ctrl-C to stop", js)
        signal.signal(signal.SIGTERM, _interrupt)
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        terminal.say(f"ovdiff serve: stopping (in-flight requests get up to {a.shutdown_timeout:g}s)", js)
    finally:
        signal.signal(signal.SIGTERM, signal.SIG_IGN)  # a second SIGTERM must not cut the stop short
        terminal.say(stop(own_ray, a.shutdown_timeout), js)
    return 0


def _bounded(fn, timeout_s: float) -> tuple[bool, str]:
    """Run `fn` in a daemon thread for at most `timeout_s`: (finished, error text)."""
    err: list[str] = []

    def run():
        try:
            fn()
        except Exception as e:  # noqa: BLE001
            err.append(f"{e.__class__.__name__}: {e}")

    t = threading.Thread(target=run, name="ovdiff-stop", daemon=True)
    t.start()
    t.join(timeout_s)
    return not t.is_alive(), "; ".join(err)


def stop(own_ray: bool, timeout_s: float) -> str:
    """Delete the application (replicas finish in-flight requests) within `timeout_s`, then stop the Ray this
    process started (which ends Serve's controller and proxy at once, without their 30 s drain). Returns the
    summary line, which says what happened."""
    import ray

    t0 = time.perf_counter()
    done, err = _bounded(lambda: serve.delete(APP_NAME), timeout_s)
    app_msg = ("application stopped" if done and not err else f"application stop failed ({err})" if done else
               f"application did not stop within {timeout_s:g}s")
    ray_done, ray_err = True, ""
    if own_ray:  # in the main thread: it ends the processes this Ray started (controller and proxy included)
        try:
            ray.shutdown()
        except Exception as e:  # noqa: BLE001
            ray_err = f"{e.__class__.__name__}: {e}"
        ray_msg = "local Ray stopped" if not ray_err else f"local Ray stop incomplete ({ray_err})"
    else:
        ray_msg = "the cluster's Ray and Serve left running"
    ok = done and not err and (not own_ray or (ray_done and not ray_err))
    return (f"summary: served until stopped; {app_msg}, {ray_msg} in {time.perf_counter() - t0:.1f}s"
            + ("" if ok else " (not clean)"))
