"""Our commands' terminals carry our lines (`ovdiff_ray/terminal.py`, `logs.quiet_ray`): `build_bank` run as a
program prints no Ray native line (the core_worker "constructor arguments" error every Ray Data actor pool logged),
no bracketed Ray timestamp and no Ray Data issue-detector block; the line rules and the issue-detector routing
unit by unit. `ovdiff serve`'s terminal: tests/test_metrics.py (default: no Serve INFO or access line) and
`test_serve_verbose_json_lines` below (`--verbose --log-format json`: the access lines, every line JSON)."""
from __future__ import annotations

import json
import logging
import os
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx

from ovdiff_ray import logs, terminal
from tests.conftest import free_port

ROOT = Path(__file__).resolve().parents[1]
NATIVE = ("[2026-12-06 17:41:47,675 E 9059 9059] core_worker.cc:2465: Actor with class name: "
          "'MapWorker(MapBatches(ClassWorker))' and ID: 'b41b' has constructor arguments in the object store and "
          "max_restarts > 0.")
ACCESS = ("\x1b[36m(ServeReplica:ovdiff:OVDiffIngress pid=1)\x1b[0m INFO 2026-12-06 17:43:41,637 ovdiff_OVDiffIngress "
          "qcky73z5 5c9ebb40-d7c0 -- POST /v1/segment 400 14.0ms")
BRACKETED = re.compile(r"^\s*\[20\d\d-\d\d-\d\d ")
ISSUE_BLOCK = ("memory per worker", "issue_detectors_config", "Found 1 issues", "To disable issue detection")


def test_line_rules():
    assert terminal.is_ray_noise(NATIVE)
    assert terminal.is_ray_noise(ACCESS.split("\x1b[0m ", 1)[1])
    assert not terminal.is_ray_noise("WARNING 2026-12-06 17:43:41,637 controller 11460 -- Deployment is unhealthy")
    assert not terminal.is_ray_noise("summary: built 10, skipped 0, failed 0")
    assert not terminal.is_ray_noise("INFO ovdiff.serve: loaded bank toy-x v1 (10 classes) in 0.3s")
    j = json.loads(terminal.as_json(NATIVE))
    assert j["level"] == "ERROR" and j["logger"] == "ray.native" and j["msg"].startswith("core_worker.cc:2465")
    j = json.loads(terminal.as_json(ACCESS.split("\x1b[0m ", 1)[1], pid=1, actor="ServeReplica:ovdiff:OVDiffIngress"))
    assert (j["level"], j["logger"], j["msg"], j["request_id"]) == ("INFO", "ray.serve", "POST /v1/segment 400 14.0ms",
                                                                    "5c9ebb40-d7c0")
    assert j["ts"] == "2026-12-06T17:43:41.637Z" or j["ts"].endswith("Z")
    j = json.loads(terminal.as_json('{"level": "INFO", "msg": "x"}', pid=7))
    assert j == {"level": "INFO", "msg": "x", "pid": 7}
    j = json.loads(terminal.as_json("Traceback (most recent call last):", "WARNING"))
    assert j["level"] == "WARNING" and j["msg"] == "Traceback (most recent call last):"


def test_line_filter_cuts_native_lines_out_of_a_progress_bar():
    """The byte stream of fd 2, chunk by chunk: a progress bar's partial line passes at once; a native line written
    right after it (same line, as in build_bank's output before) is cut off and dropped, even split across reads;
    with verbose it passes; in JSON mode every emitted line parses."""
    out: list[bytes] = []
    f = terminal.LineFilter(False, False, out.append)
    f.feed(b"build_bank:   0%|          | 0/10 [00:00<?, ?class/s]")
    assert b"".join(out) == b"build_bank:   0%|          | 0/10 [00:00<?, ?class/s]"  # at once, no newline
    f.feed(NATIVE.encode()[:20])  # "[2026-12-06 17:41:47" arrives first
    f.feed(NATIVE.encode()[20:] + b"\n\rbuild_bank:  10%|# | 1/10 [00:04<00:43,  4.85s/class]")
    f.feed(b"\nsummary: built 10\n")
    f.flush()
    text = b"".join(out).decode()
    assert "core_worker" not in text and "[2026-12-06" not in text
    assert text.endswith("\rbuild_bank:  10%|# | 1/10 [00:04<00:43,  4.85s/class]\nsummary: built 10\n")
    out.clear()
    f = terminal.LineFilter(True, False, out.append)
    f.feed(b"bar 0%" + NATIVE.encode() + b"\n")
    f.flush()
    assert b"".join(out) == b"bar 0%" + NATIVE.encode() + b"\n"  # verbose: all of it, in order
    out.clear()
    f = terminal.LineFilter(True, True, out.append)
    f.feed(b"plain text\n" + NATIVE.encode() + b"\n\n" + b'{"level": "INFO", "msg": "ours"}\n' + b"tail")
    f.flush()
    objs = [json.loads(x) for x in b"".join(out).decode().splitlines()]
    assert [o["msg"] for o in objs][:1] == ["plain text"] and objs[1]["logger"] == "ray.native"
    assert objs[2] == {"level": "INFO", "msg": "ours"} and objs[3]["msg"] == "tail" and len(objs) == 4


def test_issue_detector_reports_stay_off_the_console():
    """After quiet_ray, Ray Data's console handler refuses the issue detector's records (its file handler keeps
    them) and still passes other warnings; verbose lets them through."""
    name = logs.ISSUE_DETECTION + ".issue_detector_manager"
    rec = logging.LogRecord(name, logging.WARNING, __file__, 1, "Operator 'X' uses 7.2GiB of memory per worker", (),
                            None)
    other = logging.LogRecord("ray.data._internal.execution", logging.WARNING, __file__, 1, "a real warning", (), None)
    try:
        logs.quiet_ray()
        console = [h for h in logging.getLogger("ray.data").handlers
                   if isinstance(h, logging.StreamHandler) and not isinstance(h, logging.FileHandler)]
        files = [h for h in logging.getLogger("ray.data").handlers if h not in console]
        assert console and files
        assert not any(h.filter(rec) for h in console) and all(h.filter(other) for h in console)
        assert all(h.filter(rec) for h in files)
        logs.quiet_ray(verbose=True)
        assert all(h.filter(rec) for h in console)
    finally:
        logs.quiet_ray()


def test_build_bank_terminal_carries_only_our_lines(tmp_path):
    vocab = tmp_path / "v.tsv"
    vocab.write_text("name\tkind\nred circle\tthing\nblue square\tthing\n")
    out = tmp_path / "bank"
    env = {**os.environ, "RAY_USAGE_STATS_ENABLED": "0", "PYTHONPATH": str(ROOT)}
    p = subprocess.run([sys.executable, "-m", "ovdiff_ray.build_bank", "--vocab", str(vocab), "--recipe", "toy",
                        "--out", str(out), "--workers", "1"], capture_output=True, text=True, env=env, timeout=600,
                       cwd=tmp_path)
    assert p.returncode == 0, p.stderr[-3000:]
    text = p.stdout + p.stderr
    lines = [x for x in re.split(r"[\r\n]", text) if x.strip()]
    assert not [x for x in lines if "core_worker" in x], text[-3000:]
    assert not [x for x in lines if BRACKETED.match(x)], text[-3000:]
    assert not [x for x in lines if any(k in x for k in ISSUE_BLOCK)], text[-3000:]
    assert not [x for x in lines if "Token authentication" in x], text[-3000:]
    # ours: the plan line first, the progress bar, the summary last (a real warning of Ray's, e.g. an actor
    # restarted on a loaded machine, still reaches the terminal)
    assert p.stdout.splitlines()[0].startswith("build_bank: bank toy-")
    assert p.stdout.splitlines()[-1].startswith("summary: built 2, skipped 0, failed 0")
    assert any(x.startswith("build_bank: 100%") for x in lines), lines[-5:]


def test_serve_verbose_json_lines(toy_bank, tmp_path):
    """`ovdiff serve --verbose --log-format json`: Serve's INFO lines (the access line of each request) are on the
    terminal, and every line of it, stdout and stderr, Ray's, Serve's and ours, is one JSON object."""
    port = free_port()
    env = {**os.environ, "RAY_USAGE_STATS_ENABLED": "0", "PYTHONPATH": str(ROOT)}
    p = subprocess.Popen([sys.executable, "-m", "ovdiff_ray.cli", "serve", "--bank", toy_bank, "--port", str(port),
                          "--replicas", "1", "--num-cpus", "0.5", "--verbose", "--log-format", "json"],
                         stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env, cwd=tmp_path)
    lines: list[str] = []
    reader = threading.Thread(target=lambda: lines.extend(iter(p.stdout.readline, "")), daemon=True)
    reader.start()
    try:
        t0 = time.time()
        while not any("ready in" in x for x in lines) and time.time() - t0 < 300 and p.poll() is None:
            time.sleep(0.5)
        assert any("ready in" in x for x in lines), "".join(lines)[-3000:]
        r = httpx.post(f"http://127.0.0.1:{port}/v1/segment", files={"image": ("s.png", b"nope", "image/png")},
                       timeout=60)
        assert r.status_code == 415, r.text
        t0 = time.time()
        while time.time() - t0 < 30 and not any("POST /v1/segment 415" in x and '"ray.serve"' in x for x in lines):
            time.sleep(0.5)
    finally:
        p.send_signal(signal.SIGTERM)
        try:
            p.wait(120)
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait(30)
        reader.join(10)
    assert p.returncode == 0
    objs = []
    for x in lines:
        if x.strip():
            obj = json.loads(x)  # every line parses
            assert isinstance(obj, dict) and obj.get("msg") is not None and obj.get("level"), x
            objs.append(obj)
    access = [o for o in objs if o.get("logger") == "ray.serve" and o["msg"].startswith("POST /v1/segment 415")]
    assert access and access[0]["actor"].startswith("ServeReplica:") and access[0]["request_id"], objs[-20:]
    assert any(o["msg"].startswith("summary: served until stopped") for o in objs)
    assert any(o.get("logger") == "ray.serve" and "Application 'ovdiff' is ready" in o["msg"] for o in objs)
