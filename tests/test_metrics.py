"""Metrics scraped by a real Prometheus server (Debian's `prometheus`; `make test` installs it when missing),
started here on 127.0.0.1 with a scrape config pointing at the session Ray's metrics export port.

A known workload, then exact values: the service's requests by route and status (10 segment requests answered
200, one upload that is not an image answered 415, every pixel-budget refusal counted once), the bank version
served, and a build's classes, attempts, stage seconds and device seconds. The gauges (bank version and classes,
queue depth) are in every scrape of a whole minute, requests running."""
from __future__ import annotations

import asyncio
import json
import shutil
import subprocess
import time
from pathlib import Path

import httpx
import pytest

from ovdiff_ray import metrics
from tests.conftest import free_port

ROOT = Path(__file__).resolve().parents[1]
APP = "metrics-test"


def prometheus_binary() -> str:
    path = shutil.which("prometheus")
    assert path, ("Debian's `prometheus` is not installed: `make test` installs it (apt-get install prometheus); "
                  "on another system install Prometheus 2.x and put it on PATH")
    return path


@pytest.fixture(scope="module")
def prometheus(ray_local, tmp_path_factory):
    """A Prometheus server scraping this node's Ray metrics export port every second; yields its query URL."""
    port = metrics.export_port()
    assert port, "the session's Ray has no metrics export port"
    d = tmp_path_factory.mktemp("prometheus")
    (d / "prometheus.yml").write_text(
        "global: {scrape_interval: 1s, evaluation_interval: 1s}\n"
        "scrape_configs:\n"
        f"  - job_name: ray\n    static_configs: [{{targets: ['127.0.0.1:{port}']}}]\n")
    web = free_port()
    log = open(d / "prometheus.log", "wb")
    proc = subprocess.Popen([prometheus_binary(), f"--config.file={d / 'prometheus.yml'}",
                             f"--storage.tsdb.path={d / 'data'}", f"--web.listen-address=127.0.0.1:{web}"],
                            stdout=log, stderr=subprocess.STDOUT)
    base = f"http://127.0.0.1:{web}"
    try:
        t0 = time.time()
        while time.time() - t0 < 60:
            assert proc.poll() is None, (d / "prometheus.log").read_text()[-2000:]
            try:
                if httpx.get(base + "/-/ready", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            time.sleep(0.3)
        else:
            raise AssertionError("prometheus did not become ready in 60 s")
        yield base
    finally:
        proc.terminate()
        try:
            proc.wait(20)
        except subprocess.TimeoutExpired:
            proc.kill()
        log.close()


def query(base: str, promql: str) -> dict[tuple, float]:
    """An instant query -> {sorted label items (without __name__): value}."""
    r = httpx.get(base + "/api/v1/query", params={"query": promql}, timeout=10)
    r.raise_for_status()
    body = r.json()
    assert body["status"] == "success", body
    return {tuple(sorted((k, v) for k, v in s["metric"].items() if k != "__name__")): float(s["value"][1])
            for s in body["data"]["result"]}


def total(base: str, promql: str) -> float | None:
    res = query(base, promql)
    return sum(res.values()) if res else None


def wait_value(base: str, promql: str, want, timeout: float = 90.0):
    """Poll Prometheus until `sum(promql)` equals `want` (or `want(value)` is true); Ray reports every few seconds."""
    t0, got = time.time(), None
    while time.time() - t0 < timeout:
        got = total(base, promql)
        if got is not None and (want(got) if callable(want) else abs(got - want) < 1e-9):
            return got
        time.sleep(1)
    raise AssertionError(f"{promql}: {got} after {timeout:g}s, expected {want}")


def gauges_stay(base: str, service: str, image: bytes, series: dict[str, str], window_s: int = 60) -> None:
    """Each of `series` is in every one of Prometheus' scrapes (one a second) of the last `window_s` seconds, while
    segment requests run for most of that window: `count_over_time(series[w])` equals the number of scrapes
    (`sum_over_time(up[w])`), evaluated at one instant. Ray's agent drops a gauge two reporting intervals (~20 s)
    after its process last set it, so a value set once (a bank loaded at start) failed this before the keeper."""
    import threading

    stop, answered = threading.Event(), []

    def load():
        with httpx.Client(base_url=service, timeout=60) as c:
            while not stop.is_set():
                answered.append(c.post("/v1/segment", files={"image": ("s.png", image, "image/png")}).status_code)

    t = threading.Thread(target=load, daemon=True)
    t.start()
    try:
        time.sleep(window_s - 5)
    finally:
        stop.set()
        t.join(60)
    assert answered and set(answered) <= {200, 503} and 200 in answered, answered[:20]
    time.sleep(6)  # the window's end: a few scrapes after the last request, the gauges still there
    at = time.time()
    # successful scrapes (up == 1; a scrape that timed out on a busy machine has up == 0 and no samples at all)
    scrapes = total(base, f'sum_over_time(up{{job="ray"}}[{window_s}s] @ {at:.3f})')
    assert scrapes and scrapes >= window_s * 0.5, scrapes  # Prometheus scraped about once a second
    seen = {what: total(base, f'count_over_time({sel}[{window_s}s] @ {at:.3f})') for what, sel in series.items()}
    assert all(v == scrapes for v in seen.values()), f"present in how many of {scrapes} scrapes of {window_s}s: {seen}"


def test_service_metrics_scraped_by_prometheus(prometheus, toy_bank, toy_scenes):
    from ray import serve

    from ovdiff_ray.serve.app import build_app
    from ovdiff_ray.store.fs import Location
    from ovdiff_ray.store.shards import read_manifest

    data = (Path(toy_scenes) / "images" / "0000.png").read_bytes()
    port = free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    # a budget of one scene's pixels and no waiting: a second concurrent request is refused (503, reason pixels)
    from PIL import Image

    w, h = Image.open(Path(toy_scenes) / "images" / "0000.png").size
    try:
        serve.run(build_app({"bank": toy_bank, "num_replicas": 1, "max_batch_size": 2, "num_cpus": 0.5,
                             "limits": {"max_inflight_pixels": w * h, "admission_wait_s": 0.01}}),
                  name=APP, route_prefix=f"/{APP}")
        base = f"http://127.0.0.1:{port}/{APP}"
        with httpx.Client(base_url=base, timeout=60) as c:
            for _ in range(10):
                r = c.post("/v1/segment", files={"image": ("s.png", data, "image/png")})
                assert r.status_code == 200, r.text
            r = c.post("/v1/segment", files={"image": ("s.png", b"not an image at all", "image/png")})
            assert r.status_code == 415, r.text

        async def burst():
            async with httpx.AsyncClient(base_url=base, timeout=60) as ac:
                rs = await asyncio.gather(*(ac.post("/v1/segment", files={"image": ("s.png", data, "image/png")})
                                            for _ in range(4)))
            return [r.status_code for r in rs]

        codes = asyncio.run(burst())
        assert set(codes) <= {200, 503} and codes.count(503) >= 1, codes
        ok, refused = 10 + codes.count(200), codes.count(503)
        bank = read_manifest(Location(toy_bank))

        sel = f'application="{APP}",route="/v1/segment"'
        wait_value(prometheus, f'ray_ovdiff_requests_total{{{sel},status="200"}}', ok)
        wait_value(prometheus, f'ray_ovdiff_requests_total{{{sel},status="415"}}', 1)
        wait_value(prometheus, f'ray_ovdiff_requests_total{{{sel},status="503"}}', refused)
        wait_value(prometheus, f'ray_ovdiff_admission_refusals_total{{application="{APP}",reason="pixels"}}',
                   refused)
        wait_value(prometheus, f'ray_ovdiff_request_seconds_count{{{sel}}}', ok + 1 + refused)
        # every answered segment request timed per stage, the segmenter's own stages among them
        for stage in ("decode", "segment", "encode", "features", "matching"):
            wait_value(prometheus, f'ray_ovdiff_segment_stage_seconds_count{{application="{APP}",stage="{stage}"}}',
                       ok)
        wait_value(prometheus, f'ray_ovdiff_bank_version{{application="{APP}",bank="{bank["bank_id"]}"}}',
                   bank["version"])
        wait_value(prometheus, f'ray_ovdiff_bank_classes{{application="{APP}",bank="{bank["bank_id"]}"}}',
                   len(bank["classes"]))
        wait_value(prometheus, f'ray_ovdiff_queue_depth{{application="{APP}"}}', 0)
        gauges_stay(prometheus, base, data, {
            "bank_version": f'ray_ovdiff_bank_version{{application="{APP}",bank="{bank["bank_id"]}"}}',
            "bank_classes": f'ray_ovdiff_bank_classes{{application="{APP}",bank="{bank["bank_id"]}"}}',
            "queue_depth": f'ray_ovdiff_queue_depth{{application="{APP}"}}'})
    finally:
        serve.shutdown()  # other modules start Serve with their own HTTP port


def test_build_metrics_scraped_by_prometheus(prometheus, tmp_path):
    from ovdiff_ray.build_bank import main as build_main
    from ovdiff_ray.store.fs import Location
    from ovdiff_ray.store.shards import read_manifest

    vocab = tmp_path / "v.tsv"
    vocab.write_text("name\tkind\nred circle\tthing\nblue square\tthing\ngreen stripes\tstuff\n")
    out = tmp_path / "bank"
    assert build_main(["--vocab", str(vocab), "--recipe", "toy", "--out", str(out), "--workers", "1"]) == 0
    m = read_manifest(Location(str(out)))
    bid = m["bank_id"]
    wait_value(prometheus, f'ray_ovdiff_build_classes_total{{bank="{bid}",status="built"}}', 3)
    wait_value(prometheus, f'ray_ovdiff_build_attempts_total{{bank="{bid}"}}', 3)
    # stage seconds: Prometheus holds what the records in the manifest sum to, stage by stage
    stages: dict[str, float] = {}
    for c in m["classes"]:
        for k, v in c["build"]["stages"].items():
            stages[k] = stages.get(k, 0.0) + v
    assert {"generate", "features", "write"} <= set(stages)
    for k, v in stages.items():
        if v <= 0:  # a stage that took under a millisecond everywhere (Ray's counters take only values > 0)
            continue
        wait_value(prometheus, f'ray_ovdiff_build_stage_seconds_total{{bank="{bid}",stage="{k}"}}',
                   lambda got, v=v: abs(got - v) < 1e-6 + 1e-6 * v)
    dev = sum(c["build"]["worker_seconds"] for c in m["classes"])
    wait_value(prometheus, f'ray_ovdiff_build_device_seconds_total{{bank="{bid}",device="cpu"}}',
               lambda got: abs(got - dev) < 1e-6 + 1e-6 * dev)


def test_metric_names_are_documented_and_on_the_dashboard():
    """Every series of `metrics.METRICS` is in the README's table and on a panel of the Grafana dashboard, and the
    dashboard names no ovdiff series that does not exist."""
    import re

    readme = (ROOT / "README.md").read_text()
    dash = json.loads((ROOT / "deploy" / "grafana-dashboard.json").read_text())
    exprs = " ".join(t["expr"] for p in dash["panels"] for t in p.get("targets", []))
    for name in metrics.METRICS:
        assert f"`{metrics.exported_name(name)}`" in readme, name
        assert metrics.exported_name(name) in exprs or f"ray_{name}_" in exprs, name
    known = {metrics.exported_name(n) for n in metrics.METRICS} | {f"ray_{n}_{s}" for n in metrics.METRICS
                                                                    for s in ("bucket", "count", "sum")}
    used = set(re.findall(r"ray_ovdiff_[a-z_]+", exprs))
    assert used and used <= known, used - known


def test_recording_is_a_no_op_without_ray_or_when_off(monkeypatch):
    """The app under TestClient (no Ray) and OVDIFF_METRICS=0 record nothing and never fail."""
    reg = metrics._Registry()
    monkeypatch.setenv(metrics.ENV, "0")
    assert reg.off() and reg.get("ovdiff_requests") is None
    with pytest.raises(KeyError):
        metrics.METRICS["ovdiff_not_a_metric"]


def test_ovdiff_serve_metrics_port(toy_bank, toy_scenes, tmp_path):
    """`ovdiff serve --metrics-port M` (its own local Ray): Prometheus text at http://127.0.0.1:M/metrics carries
    the service's series after a request; SIGTERM stops it with its summary line. Its terminal carries our lines:
    no Serve INFO line (access lines included) without --verbose."""
    import os
    import re
    import signal
    import sys

    port, mport = free_port(), free_port()
    env = {**os.environ, "RAY_USAGE_STATS_ENABLED": "0"}
    p = subprocess.Popen([sys.executable, "-m", "ovdiff_ray.cli", "serve", "--bank", toy_bank, "--port", str(port),
                          "--metrics-port", str(mport), "--replicas", "1", "--num-cpus", "0.5"],
                         stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
    lines: list[str] = []
    reader = __import__("threading").Thread(target=lambda: lines.extend(iter(p.stdout.readline, "")), daemon=True)
    reader.start()
    try:
        t0 = time.time()
        while not any("ready in" in x for x in lines) and time.time() - t0 < 180 and p.poll() is None:
            time.sleep(0.5)
        assert any("ready in" in x for x in lines), "".join(lines)[-3000:]
        assert any(f"metrics (Prometheus text, series ray_ovdiff_*) at http://127.0.0.1:{mport}/metrics" in x
                   for x in lines), "".join(lines)[-3000:]
        data = (Path(toy_scenes) / "images" / "0001.png").read_bytes()
        r = httpx.post(f"http://127.0.0.1:{port}/v1/segment", files={"image": ("s.png", data, "image/png")},
                       timeout=120)
        assert r.status_code == 200, r.text
        rx = re.compile(r'^ray_ovdiff_requests_total\{[^}]*route="/v1/segment"[^}]*status="200"[^}]*\} 1(\.0)?$',
                        re.M)
        t0, text = time.time(), ""
        while time.time() - t0 < 90 and not rx.search(text):
            time.sleep(1)
            text = httpx.get(f"http://127.0.0.1:{mport}/metrics", timeout=10).text
        assert rx.search(text), [x for x in text.splitlines() if "ovdiff" in x][:20]
        assert "ray_ovdiff_segment_stage_seconds_bucket" in text and "# TYPE ray_ovdiff_requests_total counter" in text
    finally:
        p.send_signal(signal.SIGTERM)
        try:
            p.wait(120)
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait(30)
        reader.join(10)
    assert p.returncode == 0 and any(x.startswith("summary: served until stopped") for x in lines), lines[-5:]
    # the terminal at default verbosity: our lines and warnings, no Serve INFO line (the access log among them), no
    # Ray native line or bracketed Ray timestamp, no token note
    serve_info = re.compile(r"\bINFO \d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3} \S+ .*-- ")
    assert not [x for x in lines if serve_info.search(x)], [x for x in lines if serve_info.search(x)][:5]
    assert not [x for x in lines if "POST /v1/segment 200" in x or "core_worker" in x or "Token authentication" in x]
    assert not [x for x in lines if re.match(r"^\s*\[20\d\d-", x)]
    assert any("loaded bank" in x for x in lines)  # the service's own INFO line
