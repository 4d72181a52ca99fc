"""Our commands' terminals carry our lines: what Ray and Serve print goes to Ray's log folder (where it already is)
and reaches the terminal only with `--verbose`; `--log-format json` makes every console line one JSON object.

Three sources reach a driver's terminal besides our own prints, and each has one owner here:

- **Ray's native lines** (its C++ core worker logs ERROR lines to the process's stderr, file descriptor 2, as well as
  to `logs/python-core-driver-*.log`; e.g. the "has constructor arguments in the object store and max_restarts > 0"
  line of every Ray Data actor pool): `install()` puts a pipe on fd 2 and a reader thread in front of the real
  stderr that drops lines starting with Ray's bracketed timestamp (`[2026-12-06 17:41:47,675 E 9059 9059] ...`)
  unless verbose, and turns every line into JSON when asked. Python's own writes to stderr pass through the same
  reader (a progress bar's partial line at once).
- **Worker and actor output forwarded to the driver** (`log_to_driver`: Serve's replicas, controller and proxy
  print their INFO lines, one per request): `forward_worker_lines()` replaces Ray's printer with one that drops
  Serve's INFO/DEBUG lines and Ray's native lines unless verbose, and writes JSON objects (with `pid` and `actor`)
  in JSON mode.
- **Python loggers of the driver** (`ray.serve`'s "Started Serve ...", Ray's start-up notes): `quiet_serve_logger`
  keeps `ray.serve`'s warnings only, unless verbose.

Only a real program's terminal is taken over: `install()` does nothing when `sys.stderr` is not the process's own
(a test's captured stream, an embedding application).
"""
from __future__ import annotations

import atexit
import datetime as _dt
import json
import logging
import os
import re
import sys
import threading

ANSI = re.compile(r"\x1b\[[0-9;]*m")
# Ray's C++ logs: [2026-12-06 17:41:47,675 E 9059 9059] core_worker.cc:2465: message
RAY_NATIVE = re.compile(r"^\[(?P<ts>\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3}) (?P<lvl>[DIWEF]) \d+ \d+\] (?P<msg>.*)$")
# Serve's text format: INFO 2026-12-06 17:43:41,587 ovdiff_OVDiffIngress qcky73z5 <request id> -- GET /healthz 200 1ms
SERVE_TEXT = re.compile(r"^(?P<lvl>DEBUG|INFO|WARNING|ERROR|CRITICAL) (?P<ts>\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3}) "
                        r"(?P<component>\S+) (?P<ids>.*?)-- (?P<msg>.*)$")
# Ray's Python loggers: 2026-12-06 17:42:54,869\tWARNING authentication_token_setup.py:85 -- message
RAY_PY = re.compile(r"^(?P<ts>\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3})\s+(?P<lvl>DEBUG|INFO|WARNING|ERROR|CRITICAL) "
                    r"(?P<where>\S+) -- (?P<msg>.*)$")
NATIVE_START = re.compile(rb"\[\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3} [DIWEF] \d+ \d+\] ")
NATIVE_LEVELS = {"D": "DEBUG", "I": "INFO", "W": "WARNING", "E": "ERROR", "F": "CRITICAL"}
QUIET_LEVELS = ("DEBUG", "INFO")


def _iso(ts: str | None) -> str:
    """`2026-12-06 17:41:47,675` (local time) or None (now) -> ISO 8601 UTC with milliseconds, like logs.py."""
    try:
        t = _dt.datetime.strptime(ts, "%Y-%m-%d %H:%M:%S,%f").astimezone() if ts else _dt.datetime.now().astimezone()
    except ValueError:
        t = _dt.datetime.now().astimezone()
    return t.astimezone(_dt.timezone.utc).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def is_ray_noise(line: str) -> bool:
    """Whether a line is Ray's or Serve's own chatter that the terminal shows only with --verbose: a native Ray log
    line, or a Serve INFO/DEBUG line (the access log among them)."""
    line = ANSI.sub("", line).strip()
    if RAY_NATIVE.match(line):
        return True
    m = SERVE_TEXT.match(line)
    return bool(m and m.group("lvl") in QUIET_LEVELS)


def as_json(line: str, default_level: str = "INFO", **fields) -> str:
    """One console line -> one JSON object (a line that already is one keeps its fields, `fields` added)."""
    text = ANSI.sub("", line).rstrip("\r\n")
    s = text.strip()
    if s.startswith("{"):
        try:
            obj = json.loads(s)
            if isinstance(obj, dict):
                return json.dumps({**obj, **{k: v for k, v in fields.items() if k not in obj}}, default=str)
        except ValueError:
            pass
    out: dict = {"ts": None, "level": default_level, "logger": "console", "msg": s}
    if m := RAY_NATIVE.match(s):
        out.update(ts=m.group("ts"), level=NATIVE_LEVELS[m.group("lvl")], logger="ray.native", msg=m.group("msg"))
    elif m := SERVE_TEXT.match(s):
        out.update(ts=m.group("ts"), level=m.group("lvl"), logger="ray.serve", msg=m.group("msg"),
                   component=m.group("component"))
        ids = m.group("ids").split()
        if len(ids) >= 2:
            out.update(replica=ids[0], request_id=ids[1])
    elif m := RAY_PY.match(s):
        out.update(ts=m.group("ts"), level=m.group("lvl"), logger="ray", msg=m.group("msg"), where=m.group("where"))
    out["ts"] = _iso(out["ts"])
    out.update(fields)
    return json.dumps(out, default=str)


class LineFilter:
    """The rule of the terminal, byte chunks in, `write(bytes)` out: Ray's noise dropped unless `verbose`, every line
    a JSON object when `json_lines`; a progress bar's partial line through at once."""

    def __init__(self, verbose: bool, json_lines: bool, write):
        self.verbose, self.json_lines, self.write = verbose, json_lines, write
        self.buf = b""

    def feed(self, chunk: bytes) -> None:
        self.buf = self._feed(self.buf + chunk)

    def flush(self) -> None:
        buf, self.buf = self._feed(self.buf), b""
        if buf:
            self._emit(buf if buf.endswith(b"\n") else buf + b"\n")

    def _emit(self, raw: bytes) -> None:
        text = raw.decode("utf-8", "replace")
        if not self.verbose and is_ray_noise(text):
            return
        if self.json_lines and text.strip():
            raw = (as_json(text, "WARNING") + "\n").encode()
        elif self.json_lines:
            return  # a blank line is not a JSON object
        self.write(raw)

    def _feed(self, buf: bytes) -> bytes:
        """Emit what `buf` holds that is complete; returns the rest. A native line can follow a progress bar's
        partial line in one write (`...?class/s][2026-12-06 ...] core_worker.cc ...`): it is cut off and judged as
        its own line."""
        while (nl := buf.find(b"\n")) >= 0:
            line, buf = buf[:nl + 1], buf[nl + 1:]
            m = NATIVE_START.search(line)
            if m and m.start() > 0:
                self._emit(line[:m.start()])
                line = line[m.start():]
            self._emit(line)
        if buf and not self.json_lines:
            # a partial line (a progress bar's "\r..."): through at once, up to where a native line may begin
            m = NATIVE_START.search(buf)
            if m:
                cut = m.start()
            else:
                i = buf.rfind(b"[")
                cut = i if i >= 0 and b"]" not in buf[i:] and b"\r" not in buf[i:] else len(buf)
            if cut:
                self._emit(buf[:cut])
                buf = buf[cut:]
        return buf


class _Stderr:
    """fd 2 through a pipe: a reader thread passes each chunk through a `LineFilter` on its way to the real
    stderr."""

    def __init__(self, verbose: bool, json_lines: bool):
        self.real = os.dup(2)
        self.filter = LineFilter(verbose, json_lines, self._write)
        r, self.w = os.pipe()
        self.r = os.fdopen(r, "rb", buffering=0)
        sys.stderr.flush()
        os.dup2(self.w, 2)
        self.marker = b"\x00ovdiff-terminal-end\x00\n"
        self.thread = threading.Thread(target=self._run, name="ovdiff-stderr", daemon=True)
        self.thread.start()
        atexit.register(self.close)

    def _write(self, raw: bytes) -> None:
        try:
            os.write(self.real, raw)
        except OSError:
            pass

    def _run(self) -> None:
        while True:
            try:
                chunk = self.r.read(65536)
            except OSError:
                return
            if not chunk:
                break
            if self.marker in chunk:
                self.filter.feed(chunk.replace(self.marker, b""))
                self.filter.flush()
                return
            self.filter.feed(chunk)

    def close(self) -> None:
        try:
            sys.stdout.flush()
            sys.stderr.flush()
        except (OSError, ValueError):
            pass
        os.dup2(self.real, 2)  # from here on, stderr is the terminal again
        try:
            os.write(self.w, self.marker)
            os.close(self.w)
        except OSError:
            pass
        self.thread.join(5)


_installed: dict[str, object] = {}


def install(verbose: bool = False, json_lines: bool = False) -> bool:
    """Take over this program's stderr (see the module's docstring); returns whether it did. Idempotent."""
    if "stderr" in _installed:
        return True
    if sys.stderr is not sys.__stderr__ or sys.stderr is None:
        return False  # not our terminal (a test's capture, an embedding app): leave it alone
    try:
        sys.__stderr__.fileno()
    except (AttributeError, OSError, ValueError):
        return False
    _installed["stderr"] = _Stderr(verbose, json_lines)
    _installed["mode"] = (verbose, json_lines)
    return True


def quiet_serve_logger(verbose: bool = False) -> None:
    """The driver's `ray.serve` logger ("Started Serve in namespace ...", "Application ... is ready"): warnings and
    errors only, unless verbose. A filter on the logger itself, so Serve resetting its handlers keeps it."""
    lg = logging.getLogger("ray.serve")
    for f in list(lg.filters):
        if getattr(f, "_ovdiff", False):
            lg.removeFilter(f)
    if verbose:
        return
    f = logging.Filter()
    f.filter = lambda record: record.levelno >= logging.WARNING  # type: ignore[method-assign]
    f._ovdiff = True  # type: ignore[attr-defined]
    lg.addFilter(f)


def forward_worker_lines(verbose: bool = False, json_lines: bool = False) -> None:
    """Replace Ray's printer of worker / actor output (after `ray.init`, in the driver): Ray's native lines and
    Serve's INFO/DEBUG lines only when verbose; each line a JSON object (`pid`, `actor` added) in JSON mode."""
    from ray._private import worker as rw

    disp = rw.global_worker_stdstream_dispatcher
    ignore_prefix = rw._should_ignore_worker_log_prefix(rw.global_worker)  # noqa: SLF001

    def handler(data: dict) -> None:
        lines = [x for x in data.get("lines", []) if verbose or not is_ray_noise(x)]
        if not lines:
            return
        if not json_lines:
            rw.print_to_stdstream({**data, "lines": lines}, ignore_prefix=ignore_prefix)
            return
        if data.get("pid") == "autoscaler":  # as Ray's printer: the autoscaler's events only, not its status dumps
            lines = list(rw.filter_autoscaler_events(lines))
        sink = sys.stderr if data.get("is_err") else sys.stdout
        actor = data.get("actor_name") or data.get("task_name") or None
        for x in lines:
            if x.strip():
                emit(as_json(x, "WARNING" if data.get("is_err") else "INFO", pid=data.get("pid"), actor=actor), sink)

    disp.remove_handler("ray_print_logs")
    disp.remove_handler("ovdiff_print_logs")
    disp.add_handler("ovdiff_print_logs", handler)


def say(msg: str, json_lines: bool = False, level: str = "INFO", logger: str = "ovdiff", file=None) -> None:
    """One of our own lines on the terminal: as is, or as a JSON object in JSON mode."""
    if json_lines:
        msg = json.dumps({"ts": _iso(None), "level": level, "logger": logger, "msg": msg})
    emit(msg, file or sys.stdout)


_EMIT = threading.Lock()


def emit(line: str, file) -> None:
    """One whole line in one write, under one lock: Ray's printer thread and ours never interleave halves of lines
    (`print` writes the text and its newline separately)."""
    with _EMIT:
        file.write(line + "\n")
        file.flush()
