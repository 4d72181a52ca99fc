"""Ray Serve application: a FastAPI ingress (factory form) in front of a batched, multiplexed segmenter deployment.

    HTTP -> OVDiffIngress  --DeploymentHandle-->  OVDiffSegmenter
            validates the form and the image      @serve.batch per bank (multiplexed id), banks + models
            (header, then one full decode),       loaded once per replica, the model work in one thread
            encodes the mask / RLE / overlay      off the event loop; no decoding or encoding here

A bad request is answered by the ingress and never reaches the segmenter; the segmenter's CPU (or GPU) goes to the
model.

Run it with `ovdiff serve --bank URI`, `serve run deploy/serve.yaml` or `serve deploy deploy/serve.yaml`. Routes:

- `POST /v1/segment`  multipart `image`; optional `classes` (comma-separated), `format` (png | rle | overlay),
  `pamr` (bool), `bank` (id, id@vN or configured name), `regions` (on/off or none | superpixels | sam; default:
  the bank recipe's `segmentation.regions`). JSON: `bank`, `width`, `height`, `classes` (label value ->
  name for the values present; 0 = background, c + 1 = bank class c), the mask (`mask` base64 PNG, uint8 or uint16
  per bank / `rle` COCO RLE per class / `overlay` base64 PNG + `legend`), `kept` and `timing`.
- `GET /v1/bank[?bank=REF]` id, version, classes, recipe summary; `GET /healthz`; `GET /` the try-it page.

Errors are JSON `{"error": message, "detail": ..., "code": ...}`: 400 bad field / truncated image / unknown, empty or
too many classes, 404 unknown bank, 413 upload or pixel count over the limits, 415 not an image or not multipart,
503 (or 429) with `Retry-After` when the segmenter's queue (`max_queued_requests`) is full.

Several banks are served side by side by Serve model multiplexing keyed by `<bank_id>@v<version>`: one replica keeps
up to `OVDIFF_MAX_BANKS_PER_REPLICA` (3) banks, and banks whose recipes name the same models share one copy of them
(bench/serve_bench.py measures a bank switch and an extra bank's memory against a whole replica per bank).
"""
from __future__ import annotations

import argparse
import asyncio
import logging
import math
import os
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Literal, Protocol

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse, Response
from pydantic import BaseModel, ConfigDict, Field
from ray import serve
from ray.serve.handle import DeploymentHandle
from starlette.datastructures import UploadFile
from starlette.exceptions import HTTPException as StarletteHTTPException

from .engine import BankSpec, Catalog, Engine, Job, ServiceConfig, bank_entry, encode
from .limits import (Limits, RequestError, check_classes, decode_image, parse_bool, parse_format,
                     parse_regions, split_classes)

log = logging.getLogger("ovdiff.serve")
STATIC = Path(__file__).resolve().parent / "static"
SEGMENTER = "OVDiffSegmenter"
INGRESS = "OVDiffIngress"
APP_NAME = "ovdiff"
FIELDS = ("image", "classes", "format", "pamr", "bank", "regions")
MAX_BANKS_PER_REPLICA = int(os.environ.get("OVDIFF_MAX_BANKS_PER_REPLICA", "3"))


class Overloaded(Exception):
    """The segmenter refused the request (queue full or no replica): 503/429 with Retry-After."""

    def __init__(self, message: str, status: int = 503, retry_after_s: float | None = 2.0):
        super().__init__(message)
        self.status, self.retry_after_s = status, retry_after_s


class Backend(Protocol):
    """What the routes call. `LocalBackend` runs the engine in-process; `ServeBackend` calls the deployment."""

    async def catalog(self) -> Catalog: ...

    async def segment(self, key: str, job: Job) -> dict: ...

    async def health(self) -> dict: ...


# ------------------------------------------------------------------------------------------------ the app

class BodyLimit:
    """ASGI middleware: refuse request bodies over `limits.max_upload_bytes` (Content-Length first, then while
    streaming), so an oversized upload is never read whole."""

    def __init__(self, app, backend: Backend):
        self.app, self.backend = app, backend

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or scope["method"] not in ("POST", "PUT", "PATCH"):
            return await self.app(scope, receive, send)
        try:
            limit = (await self.backend.catalog()).limits.max_upload_bytes
        except Exception:  # noqa: BLE001 - the route reports the backend problem; keep the default limit here
            limit = Limits().max_upload_bytes
        too_large = RequestError(413, f"upload too large: more than {limit:,} bytes", {"max_upload_bytes": limit},
                                 "too_large")
        length = dict(scope["headers"]).get(b"content-length")
        if length is not None and length.isdigit() and int(length) > limit:
            return await error_response(too_large)(scope, receive, send)
        seen = 0

        async def limited():
            nonlocal seen
            msg = await receive()
            if msg["type"] == "http.request":
                seen += len(msg.get("body", b""))
                if seen > limit:
                    raise too_large
            return msg

        await self.app(scope, limited, send)


def error_response(e: RequestError | Overloaded, headers: dict | None = None) -> JSONResponse:
    if isinstance(e, Overloaded):
        hdr = {"Retry-After": str(max(1, math.ceil(e.retry_after_s)))} if e.retry_after_s is not None else {}
        return JSONResponse({"error": str(e), "detail": {"retry_after_s": e.retry_after_s}, "code": "overloaded"},
                            status_code=e.status, headers=hdr)
    return JSONResponse(e.to_dict(), status_code=e.status, headers=headers)


def make_app(backend: Backend) -> FastAPI:
    """The FastAPI app of the service over any `Backend` (testable with TestClient, no Ray needed)."""
    from .. import __version__

    app = FastAPI(title="OVDiff segmentation", version=__version__,
                  description="Open-vocabulary segmentation with a prototype bank (see GET / for a try-it page).")
    app.add_middleware(BodyLimit, backend=backend)
    page = (STATIC / "index.html").read_text()

    @app.exception_handler(RequestError)
    async def _request_error(request: Request, e: RequestError):
        return error_response(e)

    @app.exception_handler(Overloaded)
    async def _overloaded(request: Request, e: Overloaded):
        return error_response(e)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, e: StarletteHTTPException):
        msg = {404: f"no route {request.method} {request.url.path}", 405: f"method {request.method} not allowed on "
               f"{request.url.path}"}.get(e.status_code, str(e.detail))
        return JSONResponse({"error": msg, "detail": e.detail, "code": "http"}, status_code=e.status_code,
                            headers=getattr(e, "headers", None))

    @app.exception_handler(RequestValidationError)
    async def _validation_error(request: Request, e: RequestValidationError):
        errs = [{"field": ".".join(str(x) for x in err.get("loc", ())[1:]), "problem": err.get("msg")}
                for err in e.errors()]
        return JSONResponse({"error": "invalid request: " + "; ".join(f"{x['field']}: {x['problem']}" for x in errs),
                             "detail": errs, "code": "bad_field"}, status_code=400)

    @app.get("/", response_class=HTMLResponse, include_in_schema=False)
    async def index() -> HTMLResponse:
        return HTMLResponse(page)

    @app.get("/favicon.ico", include_in_schema=False)
    async def favicon() -> Response:
        return Response(status_code=204)

    @app.get("/healthz")
    async def healthz() -> JSONResponse:
        try:
            info = await backend.health()
        except Exception as e:  # noqa: BLE001 - unhealthy is an answer, not a crash
            return JSONResponse({"error": f"unhealthy: {e.__class__.__name__}: {e}", "detail": None,
                                 "code": "unhealthy"}, status_code=503)
        return JSONResponse({"status": "ok", **info})

    @app.get("/v1/bank")
    async def bank_info(bank: str | None = None) -> JSONResponse:
        cat = await _catalog(backend)
        e = cat.resolve(bank)
        return JSONResponse({**e.public(), "default": cat.default, "limits": cat.limits.to_dict(),
                             "banks": [b.public(with_classes=False) for b in cat.banks.values()]})

    @app.post("/v1/segment", openapi_extra={"requestBody": {"required": True, "content": {"multipart/form-data": {
        "schema": {"type": "object", "required": ["image"], "properties": {
            "image": {"type": "string", "format": "binary"},
            "classes": {"type": "string", "description": "comma-separated subset of the bank's classes"},
            "format": {"type": "string", "enum": ["png", "rle", "overlay"], "default": "png"},
            "pamr": {"type": "boolean", "default": False},
            "bank": {"type": "string", "description": "bank id, id@vN or configured name (default: the first)"},
            "regions": {"type": "string", "description": "snap labels to regions: on/off or none | superpixels | "
                                                         "sam (default: the bank recipe's)"}}}}}}})
    async def segment(request: Request) -> JSONResponse:
        t0 = time.perf_counter()
        cat = await _catalog(backend)
        fields, data = await read_form(request, cat.limits)
        fmt = parse_format(fields.get("format"))
        pamr = parse_bool("pamr", fields.get("pamr"))
        regions = parse_regions(fields.get("regions"))
        entry = cat.resolve(fields.get("bank"))
        classes = check_classes(split_classes(fields.get("classes"), cat.limits), entry.names, entry.key)
        t1 = time.perf_counter()
        image = await asyncio.to_thread(decode_image, data, cat.limits)  # header first, then a full decode
        t2 = time.perf_counter()
        try:
            result = await backend.segment(entry.key, Job(image, tuple(classes) if classes else None, pamr, regions))
            if result.get("status", 200) != 200:
                return JSONResponse({k: result.get(k) for k in ("error", "detail", "code")},
                                    status_code=result["status"])
            body = await asyncio.to_thread(encode, image, result, fmt)
        except (RequestError, Overloaded):
            raise
        except Exception as e:  # noqa: BLE001 - e.g. a replica that died mid-request: a JSON 500, not a crash
            log.exception("segment request failed")
            raise RequestError(500, f"segmentation failed: {e.__class__.__name__}: {str(e)[:300]}", None,
                               "internal") from None
        body["timing"] = {"total_ms": round(1000 * (time.perf_counter() - t0), 1),
                          "validate_ms": round(1000 * (t2 - t0), 1), "decode_ms": round(1000 * (t2 - t1), 1),
                          **body["timing"]}
        return JSONResponse(body)

    return app


async def _catalog(backend: Backend) -> Catalog:
    try:
        return await backend.catalog()
    except (RequestError, Overloaded):
        raise
    except Exception as e:  # noqa: BLE001
        raise Overloaded(f"segmenter unavailable: {e.__class__.__name__}: {e}", 503, 5.0) from None


async def read_form(request: Request, limits: Limits) -> tuple[dict[str, str], bytes]:
    """The multipart form -> (text fields, image bytes); every shape problem is a RequestError."""
    ctype = request.headers.get("content-type", "")
    if not ctype.lower().startswith("multipart/form-data"):
        raise RequestError(415, f"expected a multipart/form-data upload with an `image` file, got content type "
                                f"{ctype[:60] or 'none'!r}", {"content_type": ctype[:200]}, "not_multipart")
    try:
        form = await request.form(max_files=2, max_fields=len(FIELDS) + 4, max_part_size=limits.max_field_bytes)
    except StarletteHTTPException as e:
        raise RequestError(400, f"malformed multipart form: {e.detail}", None, "bad_form") from None
    try:
        names = list(form.keys())
        unknown = sorted(set(names) - set(FIELDS))
        if unknown:
            raise RequestError(400, f"unknown form field(s) {', '.join(map(repr, unknown))} (known: "
                                    f"{', '.join(FIELDS)})", {"unknown": unknown, "known": list(FIELDS)}, "bad_field")
        twice = sorted({n for n in names if len(form.getlist(n)) > 1})
        if twice:
            raise RequestError(400, f"form field(s) given more than once: {', '.join(twice)}", {"fields": twice},
                               "bad_field")
        upload = form.get("image")
        if upload is None:
            raise RequestError(400, "missing form field 'image' (the image file to segment)", {"field": "image"},
                               "missing_image")
        if not isinstance(upload, UploadFile):
            raise RequestError(400, "form field 'image' must be a file upload, got a text value",
                               {"field": "image"}, "bad_field")
        fields = {}
        for n in FIELDS[1:]:
            v = form.get(n)
            if v is not None and not isinstance(v, str):
                raise RequestError(400, f"form field {n!r} must be text, got a file", {"field": n}, "bad_field")
            if v is not None:
                fields[n] = v
        data = await upload.read(limits.max_upload_bytes + 1)
    finally:
        await form.close()
    if not data:
        raise RequestError(400, "empty upload: the `image` file has no bytes", {"field": "image"}, "empty_upload")
    return fields, data


# ---------------------------------------------------------------------------------------------- backends

class _Worker:
    """One thread for the model work of a process: the event loop stays free and models are never used twice at
    once."""

    def __init__(self, threads: int | None = None):
        self.threads = threads
        self.pool = ThreadPoolExecutor(1, thread_name_prefix="ovdiff-segment", initializer=self._init)

    def _init(self):
        if self.threads:
            import torch

            torch.set_num_threads(self.threads)

    async def __call__(self, fn, *args):
        return await asyncio.get_running_loop().run_in_executor(self.pool, fn, *args)


class LocalBackend:
    """The engine in this process (tests, notebooks): same validation, batching of one."""

    def __init__(self, config: ServiceConfig | dict, max_banks: int = MAX_BANKS_PER_REPLICA):
        self.config = config if isinstance(config, ServiceConfig) else ServiceConfig.from_dict(config)
        self.engine = Engine(self.config)
        self.worker = _Worker(self.config.torch_threads)
        self.max_banks = max_banks
        self.segmenters: dict[str, Any] = {}
        self.segmenters[self.engine.catalog.default] = self.worker.pool.submit(
            self.engine.load, self.engine.catalog.default).result()

    async def catalog(self) -> Catalog:
        return self.engine.catalog

    async def segment(self, key: str, job: Job) -> dict:
        seg = self.segmenters.pop(key, None)
        if seg is None:
            try:
                seg = await self.worker(self.engine.load, key)
            except RequestError as e:
                return {"status": e.status, **e.to_dict()}
            while len(self.segmenters) >= self.max_banks:
                self.segmenters.pop(next(iter(self.segmenters)))
        self.segmenters[key] = seg  # most recently used last
        return (await self.worker(self.engine.run, seg, [job]))[0]

    async def health(self) -> dict:
        return {"banks_loaded": list(self.segmenters), "default": self.engine.catalog.default}


class ServeBackend:
    """Calls the segmenter deployment through a DeploymentHandle (looked up by name: the factory form builds the
    app on the ingress replica, where the bound handle is not in scope). The catalog is cached for `ttl_s`."""

    def __init__(self, deployment: str = SEGMENTER, app_name: str | None = None, ttl_s: float = 10.0):
        self.deployment, self.app_name, self.ttl_s = deployment, app_name, ttl_s
        self._handle = None
        self._catalog: Catalog | None = None
        self._fetched = 0.0
        self._refresh: asyncio.Task | None = None

    @property
    def handle(self):
        if self._handle is None:
            from ray import serve

            app = self.app_name or serve.get_replica_context().app_name
            self._handle = serve.get_deployment_handle(self.deployment, app_name=app)
        return self._handle

    async def _fetch(self) -> Catalog:
        d = await self.handle.describe.remote()
        self._catalog, self._fetched = Catalog.from_dict(d), time.monotonic()
        return self._catalog

    async def catalog(self) -> Catalog:
        if self._catalog is None:
            return await self._call(self._fetch(), 30.0)
        if time.monotonic() - self._fetched > self.ttl_s and (self._refresh is None or self._refresh.done()):
            self._refresh = asyncio.create_task(self._quiet_fetch())  # serve the cached copy meanwhile
        return self._catalog

    async def _quiet_fetch(self):
        try:
            await self._fetch()
        except Exception as e:  # noqa: BLE001 - keep the cached catalog
            log.warning("catalog refresh failed: %s", e)

    async def segment(self, key: str, job: Job) -> dict:
        timeout = self._catalog.request_timeout_s if self._catalog else 120.0
        return await self._call(self.handle.options(multiplexed_model_id=key).segment.remote(job), timeout)

    async def health(self) -> dict:
        return await self._call(self.handle.health.remote(), 10.0)

    @staticmethod
    async def _call(response, timeout: float):
        from ray.serve.exceptions import BackPressureError, DeploymentUnavailableError

        try:
            return await asyncio.wait_for(response, timeout)
        except BackPressureError as e:
            retry = e.retry_after_s if e.retry_after_s is not None else 2.0
            queued = e.args[1] if len(e.args) > 1 else "max_queued_requests"
            raise Overloaded(f"segmenter busy: its queue is full ({queued} requests waiting); retry in {retry:g}s",
                             e.status_code, retry) from None
        except DeploymentUnavailableError as e:
            raise Overloaded(f"segmenter unavailable: {e.message}", 503, 5.0) from None
        except asyncio.TimeoutError:
            if hasattr(response, "cancel"):
                response.cancel()
            raise RequestError(504, f"segmentation took longer than {timeout:g}s", {"timeout_s": timeout},
                               "timeout") from None


# ------------------------------------------------------------------------------------------- deployments

def ingress_app() -> FastAPI:
    """App factory for `serve.ingress`: evaluated on each ingress replica."""
    import threading

    # Overlays are drawn by ovdiff_ray.segment, which imports torch (about a second): import it now, in the
    # background, rather than in the first overlay request.
    threading.Thread(target=lambda: __import__("ovdiff_ray.segment"), name="warm-imports", daemon=True).start()
    return make_app(ServeBackend())


@serve.deployment(name=SEGMENTER, max_ongoing_requests=6, max_queued_requests=64,
                  ray_actor_options={"num_cpus": 1, "num_gpus": 0}, health_check_period_s=10,
                  health_check_timeout_s=30)
class SegmenterDeployment:
    """Loads banks and their recipe's models once per replica; dynamic batching per bank (the multiplexed id)."""

    def __init__(self):
        self.engine: Engine | None = None
        self.default = None  # the default bank's Segmenter, pinned outside the multiplexer's LRU
        self.worker: _Worker | None = None

    async def reconfigure(self, user_config: dict):
        cfg = ServiceConfig.from_dict(user_config)
        threads = cfg.torch_threads or _replica_cpus()
        if self.worker is None or self.worker.threads != threads:
            self.worker = _Worker(threads)
        engine = await self.worker(Engine, cfg)
        default = await self.worker(engine.load, engine.catalog.default)
        self.engine, self.default = engine, default
        self._batch.set_max_batch_size(cfg.max_batch_size)
        self._batch.set_batch_wait_timeout_s(cfg.batch_wait_timeout_s)
        _check_batching(cfg.max_batch_size)

    async def check_health(self):
        if self.engine is None or self.default is None:
            raise RuntimeError("bank and models not loaded (no user_config applied yet)")

    async def health(self) -> dict:
        await self.check_health()
        import psutil

        return {"default": self.engine.catalog.default, "banks": list(self.engine.catalog.banks),
                "replica": _replica_id(), "rss_mb": round(psutil.Process().memory_info().rss / 2**20, 1)}

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
            seg = await self.bank(key)
        except RequestError as e:
            return [{"status": e.status, **e.to_dict()} for _ in jobs]
        return await self.worker(self.engine.run, seg, jobs)


@serve.deployment(name=INGRESS, max_ongoing_requests=256, max_queued_requests=1024, ray_actor_options={"num_cpus": 0})
@serve.ingress(ingress_app)
class IngressDeployment:
    """HTTP front: validates requests (no model here) and forwards them to the segmenter."""

    def __init__(self, segmenter: DeploymentHandle):
        self.segmenter = segmenter  # bound so that the application deploys it; the routes look it up by name


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
    max_queued_requests: int = Field(64, ge=-1)  # -1: unbounded (no backpressure)
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
        banks = [BankSpec(b.uri, bank_entry(b, a.storage).version, b.name) for b in banks]
    return ServiceConfig(banks, Limits.from_dict(a.limits), a.max_batch_size, a.batch_wait_timeout_s, a.device,
                         a.torch_threads, a.request_timeout_s, a.storage)


def _absolute(uri: str) -> str:
    if "://" in uri and not uri.startswith("file://"):
        return uri
    return str(Path(uri.removeprefix("file://")).expanduser().resolve())


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
    opts: dict[str, Any] = dict(user_config=cfg.to_dict(), max_ongoing_requests=ongoing,
                                max_queued_requests=a.max_queued_requests, ray_actor_options=actor,
                                backpressure_config={"status_code": a.backpressure_status,
                                                     "retry_after_s": a.retry_after_s})
    if a.num_replicas:
        opts["num_replicas"] = a.num_replicas
    else:
        if a.max_replicas < a.min_replicas:
            raise ValueError(f"max_replicas ({a.max_replicas}) < min_replicas ({a.min_replicas})")
        opts["autoscaling_config"] = {"min_replicas": a.min_replicas, "max_replicas": a.max_replicas,
                                      "target_ongoing_requests": a.target_ongoing_requests}
    return IngressDeployment.options(num_replicas=a.ingress_replicas).bind(SegmenterDeployment.options(**opts).bind())


# -------------------------------------------------------------------------------------------------- CLI

def _interrupt(*_):
    raise KeyboardInterrupt


def main(argv: list[str] | None = None) -> int:
    """`ovdiff serve --bank URI [--port P] [--host H] [--replicas N | --min-replicas A --max-replicas B] ...`."""
    ap = argparse.ArgumentParser(prog="ovdiff serve", description="Start the segmentation service on a local Ray "
                                 "(or --address) with Ray Serve; Ctrl-C stops it.")
    ap.add_argument("--bank", action="append", required=True, metavar="URI",
                    help="bank location (folder or s3://bucket/prefix); repeat to serve several, the first is the "
                         "default; URI@N pins version N")
    ap.add_argument("--host", default="127.0.0.1")
    ap.add_argument("--port", type=int, default=8000)
    g = ap.add_mutually_exclusive_group()
    g.add_argument("--replicas", type=int, default=None, help="fixed number of segmenter replicas")
    g.add_argument("--min-replicas", type=int, default=None, help="autoscaling lower bound (default 1)")
    ap.add_argument("--max-replicas", type=int, default=None, help="autoscaling upper bound (default min)")
    ap.add_argument("--num-cpus", type=float, default=1.0, help="CPUs per segmenter replica")
    ap.add_argument("--num-gpus", type=float, default=0.0, help="GPUs per segmenter replica (0 on CPU machines)")
    ap.add_argument("--max-batch-size", type=int, default=4)
    ap.add_argument("--max-queued-requests", type=int, default=64)
    ap.add_argument("--address", default=None, help="Ray cluster address (default: start a local Ray)")
    a = ap.parse_args(argv)
    if a.max_replicas is not None and a.replicas is not None:
        ap.error("--max-replicas goes with --min-replicas, not --replicas")
    banks = []
    for ref in a.bank:
        uri, _, ver = ref.rpartition("@") if "@" in ref and ref.rsplit("@", 1)[1].isdigit() else (ref, "", "")
        banks.append({"uri": uri, "version": int(ver) if ver else None})
    lo = a.min_replicas if a.min_replicas is not None else 1
    args = dict(banks=banks, num_replicas=a.replicas, min_replicas=lo, max_replicas=max(lo, a.max_replicas or lo, 1),
                num_cpus=a.num_cpus, num_gpus=a.num_gpus, max_batch_size=a.max_batch_size,
                max_queued_requests=a.max_queued_requests)
    from ..store.fs import StoreError

    try:
        app = build_app(args)
    except (ValueError, OSError, StoreError) as e:
        print(f"ovdiff serve: error: {e}", file=sys.stderr)
        return 2
    import signal

    import ray

    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    if not ray.is_initialized():
        ray.init(address=a.address, include_dashboard=False, logging_level="WARNING")
    t0 = time.perf_counter()
    try:
        serve.start(http_options={"host": a.host, "port": a.port})
        serve.run(app, name=APP_NAME, route_prefix="/")
        url = f"http://{a.host}:{a.port}/"
        print(f"ovdiff serve: {len(banks)} bank(s), ready in {time.perf_counter() - t0:.1f}s at {url} "
              f"(try-it page), POST {url}v1/segment; Ctrl-C to stop", flush=True)
        signal.signal(signal.SIGTERM, _interrupt)
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        print("ovdiff serve: stopping", flush=True)
    finally:
        serve.shutdown()
        ray.shutdown()
    print("summary: served until stopped; Serve and Ray shut down cleanly")
    return 0
