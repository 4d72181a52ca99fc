"""Backends: what the routes call to reach the model. `LocalBackend` runs the engine in this process (tests,
notebooks); `ServeBackend` calls the segmenter deployment through a DeploymentHandle.

Failures of the segmenter side become `Overloaded` (503/429 + Retry-After, a plain message; the details go to the
log): a full queue, no replica, or a replica that died mid-request (then the request is retried once on another
replica: segmentation is idempotent).
"""
from __future__ import annotations

import asyncio
import logging
import os
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Protocol

from .engine import Catalog, Engine, Job, ServiceConfig
from .. import metrics
from .errors import Overloaded
from .limits import RequestError

log = logging.getLogger("ovdiff.serve")
SEGMENTER = "OVDiffSegmenter"
MAX_BANKS_PER_REPLICA = int(os.environ.get("OVDIFF_MAX_BANKS_PER_REPLICA", "3"))
HEALTH_TIMEOUT_S = 0.8  # the segmenter's answer to /healthz; the route answers within about 1 s


class Backend(Protocol):
    """What the routes call. `health()` returns `{"status": ok|degraded, "checks": {...}, ...details}`."""

    async def catalog(self) -> Catalog: ...

    async def segment(self, key: str, job: Job) -> dict: ...

    async def health(self) -> dict: ...


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
        return {**self.engine.health(), "banks_loaded": list(self.segmenters)}


class ServeBackend:
    """Calls the segmenter deployment through a DeploymentHandle (looked up by name: the factory form builds the
    app on the ingress replica, where the bound handle is not in scope). The catalog is cached for `ttl_s`."""

    def __init__(self, deployment: str = SEGMENTER, app_name: str | None = None, ttl_s: float = 10.0):
        self.deployment, self.app_name, self.ttl_s = deployment, app_name, ttl_s
        self._handle = None
        self._jobs = None
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

    async def refresh(self) -> Catalog:
        """The catalog fetched now (a replica may serve a newer version of a followed bank)."""
        return await self._call(self._fetch(), 30.0)

    @property
    def jobs(self):
        if self._jobs is None:
            from ray import serve

            from .jobs import JOBS

            app = self.app_name or serve.get_replica_context().app_name
            self._jobs = serve.get_deployment_handle(JOBS, app_name=app)
        return self._jobs

    async def submit_classes(self, uri: str, classes: list[dict], rebuild: bool = False) -> dict:
        return await self._call(self.jobs.submit.remote(uri, classes, rebuild), 60.0)

    async def edit_classes(self, uri: str, action: str, names: list[str]) -> dict:
        return await self._call(self.jobs.edit.remote(uri, action, names), 60.0)

    async def job(self, job_id: str) -> dict | None:
        return await self._call(self.jobs.get.remote(job_id), 30.0)

    async def segment(self, key: str, job: Job) -> dict:
        timeout = self._catalog.request_timeout_s if self._catalog else 120.0
        for attempt in (1, 2):
            try:
                return await self._call(self.handle.options(multiplexed_model_id=key).segment.remote(job), timeout)
            except _Lost as e:
                log.warning("segmenter replica lost during a request (attempt %d): %s", attempt, e.detail)
                if attempt == 2:
                    raise Overloaded("segmenter restarting: the replica serving this request stopped; retry "
                                     "shortly", 503, 5.0, "unavailable") from None
        raise AssertionError("unreachable")

    async def health(self) -> dict:
        """Within HEALTH_TIMEOUT_S: the segmenter's own report, or `unavailable` with the reason."""
        try:
            return await self._call(self.handle.health.remote(), HEALTH_TIMEOUT_S)
        except (_Lost, Overloaded, RequestError) as e:
            reason = (e.detail if isinstance(e, _Lost) else f"no answer within {HEALTH_TIMEOUT_S:g}s"
                      if isinstance(e, RequestError) and e.code == "timeout" else str(e))
            return {"status": "unavailable", "checks": {"segmenter": "unavailable"}, "reason": reason}

    @staticmethod
    async def _call(response, timeout: float):
        import ray.exceptions as rex
        from ray.serve.exceptions import BackPressureError, DeploymentUnavailableError

        try:
            return await asyncio.wait_for(response, timeout)
        except BackPressureError as e:
            retry = e.retry_after_s if e.retry_after_s is not None else 2.0
            queued = e.args[1] if len(e.args) > 1 else "max_queued_requests"
            metrics.inc("ovdiff_admission_refusals", 1, {"reason": "queue"})
            raise Overloaded(f"segmenter busy: its queue is full ({queued} requests waiting); retry in {retry:g}s",
                             e.status_code, retry) from None
        except DeploymentUnavailableError as e:
            log.warning("segmenter unavailable: %s", e.message)
            raise Overloaded("segmenter unavailable: no replica is ready; retry shortly", 503, 5.0,
                             "unavailable") from None
        except (rex.RayActorError, rex.ActorUnavailableError, rex.WorkerCrashedError, rex.NodeDiedError,
                rex.ObjectLostError) as e:
            raise _Lost(f"{e.__class__.__name__}: {str(e)[:2000]}") from None
        except asyncio.TimeoutError:
            if hasattr(response, "cancel"):
                response.cancel()
            raise RequestError(504, f"segmentation took longer than {timeout:g}s", {"timeout_s": timeout},
                               "timeout") from None


class _Lost(Exception):
    """A replica died or became unreachable (details for the log only)."""

    def __init__(self, detail: str):
        super().__init__(detail)
        self.detail = detail
