"""A header read timeout for the uvicorn server inside Serve's HTTP proxy (uvicorn has none).

Uvicorn arms no timer while a connection waits for (or trickles) its request line and headers, so an idle or
slowloris connection is held for as long as the client likes. `install()` patches uvicorn's HTTP protocols so
that the headers of each request must arrive within `OVDIFF_HEADER_TIMEOUT_S` (default 15 s) of the connection
opening or of the previous response; otherwise the connection is closed, after a `408 Request Timeout` when part of
a request had arrived.
The body has its own deadline in the app (`middleware.BodyDeadline`).

It must run in the proxy's process: `ovdiff serve` (and the tests) pass it to `ray.init` as the job's
`worker_process_setup_hook`, which Serve's controller and proxies inherit. On a cluster started otherwise, put the
timeout in the load balancer in front of Serve (nginx `client_header_timeout`, an ALB's idle timeout).
"""
from __future__ import annotations

import json
import logging
import os

log = logging.getLogger("ovdiff.serve")
HOOK = "ovdiff_ray.serve.http_guard.install"
_BODY = json.dumps({"error": "request headers not received in time", "detail": None,
                    "code": "read_timeout"}).encode()
RESPONSE_408 = (b"HTTP/1.1 408 Request Timeout\r\ncontent-type: application/json\r\nconnection: close\r\n"
                b"content-length: " + str(len(_BODY)).encode() + b"\r\n\r\n" + _BODY)


def header_timeout_s() -> float:
    return float(os.environ.get("OVDIFF_HEADER_TIMEOUT_S", "15"))


def _arm(self) -> None:
    _disarm(self)
    self._ovdiff_partial = False
    transport = getattr(self, "transport", None)
    if transport is None or transport.is_closing():
        return
    self._ovdiff_header_timer = self.loop.call_later(header_timeout_s(), _expire, self)


def _disarm(self) -> None:
    t = getattr(self, "_ovdiff_header_timer", None)
    if t is not None:
        t.cancel()
        self._ovdiff_header_timer = None


def _expire(self) -> None:
    """Part of a request arrived: 408 + close. Nothing arrived (a new or kept-alive idle connection): close quietly,
    as uvicorn's keep-alive timeout does; a 408 there could be read as the answer to the client's next request."""
    self._ovdiff_header_timer = None
    if not self.transport.is_closing():
        if getattr(self, "_ovdiff_partial", False):
            log.info("request headers not received within %gs: 408 and close", header_timeout_s())
            self.transport.write(RESPONSE_408)
        self.transport.close()


def _patch(cls, headers_done: str | None) -> None:
    if getattr(cls, "_ovdiff_guarded", False):
        return
    made, complete, lost, received = (cls.connection_made, cls.on_response_complete, cls.connection_lost,
                                      cls.data_received)

    def data_received(self, data, *a, **k):
        if data:
            self._ovdiff_partial = True
        return received(self, data, *a, **k)

    def connection_made(self, transport, *a, **k):
        made(self, transport, *a, **k)
        _arm(self)

    def on_response_complete(self, *a, **k):
        complete(self, *a, **k)
        _arm(self)  # the next request's headers get the same deadline

    def connection_lost(self, exc, *a, **k):
        _disarm(self)
        lost(self, exc, *a, **k)

    cls.connection_made, cls.on_response_complete, cls.connection_lost = (connection_made, on_response_complete,
                                                                         connection_lost)
    cls.data_received = data_received
    if headers_done == "on_headers_complete":
        done = cls.on_headers_complete

        def on_headers_complete(self, *a, **k):
            _disarm(self)
            return done(self, *a, **k)

        cls.on_headers_complete = on_headers_complete
    else:  # h11: a request cycle exists once the headers are parsed
        handle = cls.handle_events

        def handle_events(self, *a, **k):
            out = handle(self, *a, **k)
            if self.cycle is not None and not self.cycle.response_complete:
                _disarm(self)
            return out

        cls.handle_events = handle_events
    cls._ovdiff_guarded = True


def install() -> None:
    """Patch uvicorn's httptools and h11 protocols in this process (idempotent; a no-op without uvicorn)."""
    try:
        from uvicorn.protocols.http.h11_impl import H11Protocol
    except ImportError:
        return
    _patch(H11Protocol, None)
    try:
        from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol
    except ImportError:
        return
    _patch(HttpToolsProtocol, "on_headers_complete")
