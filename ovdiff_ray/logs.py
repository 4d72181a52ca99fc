"""Structured logs (an option): one JSON object a line from the package's loggers (`ovdiff.*`), carrying the ids
that tie a request, a live-bank job and a bank version together.

    {"ts": "2026-12-04T11:02:03.123Z", "level": "INFO", "logger": "ovdiff.serve", "msg": "...",
     "request_id": "...", "job_id": "...", "bank_id": "...", "bank_version": 3, "route": "/v1/segment", ...}

The ids live in context variables (`context(...)`): the service's `Metrics` middleware sets `request_id` (the
client's `X-Request-ID`, else Serve's own request id, else a new one) and `route`, a segment answer adds
`bank_id` / `bank_version`, a job's task sets `job_id` (and the bank's id). `OVDIFF_LOG_FORMAT=json` (the Serve
app's replicas get it from `ovdiff serve --log-format json` or a config's `runtime_env`) switches it on in a process;
plain text stays the default. With JSON on, each HTTP answer also gets one `access` line (route, status, ms).
"""
from __future__ import annotations

import contextvars
import datetime as _dt
import json
import logging
import os
import sys
from contextlib import contextmanager

ENV = "OVDIFF_LOG_FORMAT"
TEXT_ENV = "OVDIFF_LOG_TEXT"  # "1": plain-text lines of the `ovdiff` loggers at INFO on stderr (Serve replicas)
FIELDS = ("request_id", "job_id", "bank_id", "bank_version", "route")
_ctx: dict[str, contextvars.ContextVar] = {k: contextvars.ContextVar(f"ovdiff_{k}", default=None) for k in FIELDS}
_installed: dict[str, logging.Handler] = {}


def json_enabled() -> bool:
    return os.environ.get(ENV, "").strip().lower() == "json"


def set_context(**ids) -> None:
    """Set ids for the rest of this context (this request's / this task's)."""
    for k, v in ids.items():
        _ctx[k].set(v)


@contextmanager
def context(**ids):
    """Ids for the duration of a block."""
    tokens = {k: _ctx[k].set(v) for k, v in ids.items()}
    try:
        yield
    finally:
        for k, t in tokens.items():
            _ctx[k].reset(t)


def current() -> dict:
    """The ids set in this context (unset ones left out)."""
    return {k: v.get() for k, v in _ctx.items() if v.get() is not None}


class JsonFormatter(logging.Formatter):
    """A log record -> one JSON line with the context's ids and any `extra={...}` fields given to the call."""

    SKIP = set(logging.LogRecord("", 0, "", 0, "", (), None).__dict__) | {"message", "asctime"}

    def format(self, record: logging.LogRecord) -> str:
        ts = _dt.datetime.fromtimestamp(record.created, _dt.timezone.utc).isoformat(timespec="milliseconds")
        out = {"ts": ts.replace("+00:00", "Z"), "level": record.levelname, "logger": record.name,
               "msg": record.getMessage(), **current()}
        for k, v in record.__dict__.items():
            if k not in self.SKIP and not k.startswith("_"):
                out[k] = v if isinstance(v, (str, int, float, bool, type(None))) else str(v)
        if record.exc_info:
            out["exc"] = self.formatException(record.exc_info)
        return json.dumps(out, default=str)


def configure(fmt: str | None = None, stream=None, level: int = logging.INFO) -> bool:
    """Install the JSON handler on the `ovdiff` logger when `fmt` (default: `$OVDIFF_LOG_FORMAT`) is `json`;
    returns whether JSON is on. Idempotent per process. With text and `$OVDIFF_LOG_TEXT=1` (`ovdiff serve` sets it
    for its replicas), a plain `LEVEL logger: message` handler instead, so the service's own INFO lines show."""
    fmt = (fmt or os.environ.get(ENV, "")).strip().lower()
    if fmt != "json":
        if os.environ.get(TEXT_ENV) == "1" and "ovdiff" not in _installed:  # `ovdiff serve`'s replicas: our lines
            h = logging.StreamHandler(stream or sys.stderr)
            h.setFormatter(logging.Formatter("%(levelname)s %(name)s: %(message)s"))
            root = logging.getLogger("ovdiff")
            root.addHandler(h)
            root.setLevel(level)
            root.propagate = False
            _installed["ovdiff"] = h
        return False
    os.environ[ENV] = "json"  # processes this one starts (a local Ray's workers) inherit it
    root = logging.getLogger("ovdiff")
    old = _installed.pop("ovdiff", None)
    if old is not None:
        root.removeHandler(old)
    h = logging.StreamHandler(stream or sys.stderr)
    h.setFormatter(JsonFormatter())
    root.addHandler(h)
    root.setLevel(level)
    root.propagate = False  # one line per record, not a JSON line plus the plain one of a root handler
    _installed["ovdiff"] = h
    return True


def reset() -> None:
    """Undo `configure` (tests): plain logging again."""
    h = _installed.pop("ovdiff", None)
    root = logging.getLogger("ovdiff")
    if h is not None:
        root.removeHandler(h)
    root.propagate = True
    os.environ.pop(ENV, None)


def _not_issue_detector(record: logging.LogRecord) -> bool:
    return not record.name.startswith(ISSUE_DETECTION)


ISSUE_DETECTION = "ray.data._internal.issue_detection"  # Ray Data's issue detector (memory, hanging, shuffle)


def quiet_ray(verbose: bool = False) -> None:
    """Our commands' terminal carries their own lines: Ray Data's INFO execution lines and its issue detector's
    reports (the "uses 7.2GiB of memory per worker ... requests 0.0B" block every 30 s) go only to Ray's log folder
    (its session's `logs/ray-data/`, where Ray Data's file handler keeps them), and two one-off notes are dropped:
    token authentication on by default (a local Ray's start-up) and "progress bars disabled" (we draw our own).
    Other warnings and errors still reach the terminal. `verbose`: all of it on the terminal. Call before
    `ray.init`. (Ray's native lines: `terminal.install`.)"""
    import ray.data  # noqa: F401 - configures the `ray.data` loggers, whose console handler is lowered here
    from ray.util.debug import log_once

    for h in logging.getLogger("ray.data").handlers:  # the console one (Ray's PlainRayHandler), not the files
        if isinstance(h, logging.StreamHandler) and not isinstance(h, logging.FileHandler):
            if h.filters.count(_not_issue_detector):
                h.removeFilter(_not_issue_detector)
            if not verbose:
                h.setLevel(max(h.level, logging.WARNING))
                h.addFilter(_not_issue_detector)
    if verbose:
        return
    logging.getLogger("ray._private.authentication.authentication_token_setup").setLevel(logging.ERROR)
    log_once("ray_data_progress_manager_disabled")  # marks the note as already shown
