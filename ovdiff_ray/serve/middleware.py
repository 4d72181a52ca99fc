"""ASGI middleware of the service: body size limit, body read deadline, and a last guard for what escapes.

    Metrics  ->  Guard  ->  BodyLimit  ->  BodyDeadline  ->  FastAPI routes

- `BodyLimit` refuses bodies over `limits.max_upload_bytes` (Content-Length first, then while streaming): 413.
- `BodyDeadline` gives the whole body `limits.body_timeout_s` from the first read: a trickled body, or a
  Content-Length larger than what is sent, gets 408 with `Connection: close` instead of holding a connection.
- `Metrics` counts every answer by route and status (`ovdiff_requests`) and times it (`ovdiff_request_seconds`):
  routes are the app's templates (`/v1/jobs/{id}`), anything else `other`, so a scanner cannot grow the series.
- `Guard` turns a client that went away mid-upload into one INFO line (no traceback, no 5xx), and any unexpected
  exception into a logged traceback plus a plain JSON 500.
"""
from __future__ import annotations

import asyncio
import logging
import time

from fastapi.responses import JSONResponse
from starlette.requests import ClientDisconnect

from .. import logs, metrics
from .errors import error_response
from .limits import Limits, RequestError

log = logging.getLogger("ovdiff.serve")
access = logging.getLogger("ovdiff.serve.access")
BODY_METHODS = ("POST", "PUT", "PATCH")


async def _limits(backend) -> Limits:
    try:
        return (await backend.catalog()).limits
    except Exception:  # noqa: BLE001 - the route reports the backend problem; keep the default limits here
        return Limits()


class BodyLimit:
    """Refuse request bodies over `limits.max_upload_bytes`, so an oversized upload is never read whole."""

    def __init__(self, app, backend):
        self.app, self.backend = app, backend

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or scope["method"] not in BODY_METHODS:
            return await self.app(scope, receive, send)
        limit = (await _limits(self.backend)).max_upload_bytes
        too_large = RequestError(413, f"upload too large: more than {limit:,} bytes", {"max_upload_bytes": limit},
                                 "too_large")
        length = dict(scope["headers"]).get(b"content-length")
        if length is not None and length.isdigit() and (len(length) > 18 or int(length) > limit):
            return await error_response(too_large, {"Connection": "close"})(scope, receive, send)
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


class BodyDeadline:
    """The whole request body must arrive within `limits.body_timeout_s` of the first read, else 408 + close."""

    def __init__(self, app, backend):
        self.app, self.backend = app, backend

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or scope["method"] not in BODY_METHODS:
            return await self.app(scope, receive, send)
        timeout = (await _limits(self.backend)).body_timeout_s
        deadline: float | None = None
        done = False

        async def timed():
            nonlocal deadline, done
            if done:  # after the body: only a disconnect can come; never time that out
                return await receive()
            if deadline is None:
                deadline = time.monotonic() + timeout
            try:
                msg = await asyncio.wait_for(receive(), max(0.0, deadline - time.monotonic()))
            except asyncio.TimeoutError:
                log.info("request body not received within %gs: answering 408", timeout)
                raise RequestError(408, f"request body not received within {timeout:g}s (slow or incomplete "
                                        "upload)", {"body_timeout_s": timeout}, "read_timeout") from None
            if msg["type"] != "http.request" or not msg.get("more_body", False):
                done = True
            return msg

        await self.app(scope, timed, send)


class Guard:
    """Outermost: a client disconnect is an INFO line; an unexpected exception a logged traceback + JSON 500."""

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        started = False

        async def tracked(msg):
            nonlocal started
            if msg["type"] == "http.response.start":
                started = True
            await send(msg)

        try:
            await self.app(scope, receive, tracked)
        except ClientDisconnect:
            log.info("client disconnected during %s %s (request dropped)", scope["method"], scope["path"][:200])
            if not started:  # nobody reads it; keeps the access log truthful (4xx, not 5xx)
                await JSONResponse({"error": "client disconnected before the request was read", "detail": None,
                                    "code": "client_disconnected"}, status_code=400)(scope, receive, send)
        except RequestError as e:  # raised inside receive() after the route gave up on it
            if not started:
                await error_response(e, {"Connection": "close"} if e.status == 408 else None)(scope, receive, send)
        except Exception:  # noqa: BLE001
            log.exception("unhandled error in %s %s", scope["method"], scope["path"][:200])
            if not started:
                await JSONResponse({"error": "internal error (details in the service log)", "detail": None,
                                    "code": "internal"}, status_code=500)(scope, receive, tracked)


ROUTES = ("/", "/healthz", "/v1/segment", "/v1/bank", "/v1/status", "/v1/classes", "/v1/jobs", "/predict", "/setup",
          "/health", "/favicon.ico", "/openapi.json", "/docs", "/redoc")


def route_of(path: str) -> str:
    """A request path -> the route template it counts under (bounded set: unknown paths are `other`)."""
    if path in ROUTES:
        return path
    if path.startswith("/v1/jobs/") and "/" not in path[len("/v1/jobs/"):]:
        return "/v1/jobs/{id}"
    return "other"


class Metrics:
    """Outermost: one count per answer (route template, status) and its latency, in Ray's metrics."""

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        t0 = time.perf_counter()
        status = 500
        path = scope["path"]
        root = scope.get("root_path", "")
        if root and path.startswith(root):
            path = path[len(root):] or "/"
        logs.set_context(request_id=request_id(scope), route=route_of(path), bank_id=None, bank_version=None,
                         job_id=None)
        on = metrics.enabled()
        if not on and not logs.json_enabled():
            return await self.app(scope, receive, send)

        async def counted(msg):
            nonlocal status
            if msg["type"] == "http.response.start":
                status = msg["status"]
            await send(msg)

        try:
            await self.app(scope, receive, counted)
        finally:
            route, secs = route_of(path), time.perf_counter() - t0
            if on:
                metrics.inc("ovdiff_requests", 1, {"route": route, "status": status})
                metrics.observe("ovdiff_request_seconds", secs, {"route": route})
            if logs.json_enabled():
                access.info("%s %s %d", scope["method"], route, status,
                            extra={"status": status, "ms": round(1000 * secs, 1), "method": scope["method"]})


def request_id(scope) -> str:
    """The client's X-Request-ID (printable, at most 64 characters), else Serve's request id, else a new one."""
    given = dict(scope.get("headers") or []).get(b"x-request-id", b"")
    if given and len(given) <= 64 and given.isascii() and given.decode().isprintable():
        return given.decode()
    try:
        from ray.serve.context import _get_serve_request_context

        rid = _get_serve_request_context().request_id
        if rid:
            return rid
    except Exception:  # noqa: BLE001 - outside Serve (TestClient)
        pass
    import uuid

    return uuid.uuid4().hex[:16]
