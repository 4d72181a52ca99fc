"""The Serve application under failure, over real HTTP on 127.0.0.1 (`serve.run` on the session's local Ray):

- slow clients: an idle connection, trickled headers and a body that never finishes are answered 408 or closed
  within the configured timeouts (headers: OVDIFF_HEADER_TIMEOUT_S=3 in conftest's Ray; body: 2 s) while normal
  requests keep being served;
- storage faults: the bank lives on this module's own moto S3 server, which is stopped mid-test: the service keeps
  serving the loaded bank, refuses the one it cannot load with 503 + Retry-After, /healthz says storage is degraded,
  and all recovers when the storage is back;
- replica death: the segmenter replica is killed (by the PID Ray reports for this application's replica) under light
  load: no 500 reaches a client, every failure is a 503 with Retry-After, and the service recovers by itself.
"""
from __future__ import annotations

import os
import shutil
import signal
import socket
import threading
import time
from pathlib import Path

import httpx
import pytest

from tests.conftest import free_port


APP = "ovdiff-faults"
BODY_TIMEOUT_S = 2.0
HEADER_TIMEOUT_S = 3.0  # conftest's ray_local sets OVDIFF_HEADER_TIMEOUT_S=3 for Serve's proxy
CONFIG = dict(max_batch_size=2, max_ongoing_requests=4, max_queued_requests=16, retry_after_s=1, num_cpus=1,
              num_replicas=1, request_timeout_s=30, limits={"body_timeout_s": BODY_TIMEOUT_S})


class Moto:
    """A moto S3 server of this module's own, which the tests stop and start again (same port, same data)."""

    def __init__(self):
        from moto.server import ThreadedMotoServer

        self.cls, self.port = ThreadedMotoServer, free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.server = None
        self.start()

    def start(self):
        self.server = self.cls(ip_address="127.0.0.1", port=self.port, verbose=False)
        self.server.start()

    def stop(self):
        self.server.stop()


@pytest.fixture(scope="module")
def served(ray_local, toy_bank, tmp_path_factory):
    """Two versions of the toy bank on S3 (moto); the app serves v1 (default) and v2 ("small", loaded on demand)."""
    import logging

    import boto3
    from ray import serve

    from ovdiff_ray.serve.app import build_app
    from ovdiff_ray.store.fs import Location
    from ovdiff_ray.store.shards import commit_manifest, read_manifest

    logging.getLogger("werkzeug").setLevel(logging.ERROR)
    moto = Moto()
    root = tmp_path_factory.mktemp("serve-faults") / "bank"
    shutil.copytree(toy_bank, root)
    m = read_manifest(Location(str(root)))
    commit_manifest(Location(str(root)), {**m, "version": m["version"] + 1, "classes": m["classes"][:4]})
    s3 = boto3.client("s3", endpoint_url=moto.url, region_name="us-east-1", aws_access_key_id="testing",
                      aws_secret_access_key="testing")
    s3.create_bucket(Bucket="faults")
    for f in root.rglob("*"):
        if f.is_file() and not f.name.startswith("."):
            s3.put_object(Bucket="faults", Key=f"bank/{f.relative_to(root)}", Body=f.read_bytes())
    storage = {"endpoint_url": moto.url, "region": "us-east-1", "access_key": "testing", "secret_key": "testing"}
    port = free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port, "keep_alive_timeout_s": 5})
    try:
        serve.run(build_app({"banks": [{"uri": "s3://faults/bank", "version": m["version"]},
                                       {"uri": "s3://faults/bank", "version": m["version"] + 1, "name": "small"}],
                             "storage": storage, **CONFIG}), name=APP, route_prefix="/")
        yield f"http://127.0.0.1:{port}", m, moto
    finally:
        serve.shutdown()
        moto.stop()


def scene(toy_scenes, i: int) -> bytes:
    return (Path(toy_scenes) / "images" / f"{i:04d}.png").read_bytes()


def post(url: str, data: bytes, timeout: float = 40, **fields) -> httpx.Response:
    files = [("image", ("s.png", data, "image/png"))] + [(k, (None, v)) for k, v in fields.items()]
    return httpx.post(url + "/v1/segment", files=files, timeout=timeout)


class Load:
    """Background clients posting a small image in a loop; records (time, status, retry-after, body code)."""

    def __init__(self, url: str, data: bytes, clients: int = 2, pause_s: float = 0.05):
        self.url, self.data, self.pause_s = url, data, pause_s
        self.stop = threading.Event()
        self.results: list[tuple[float, int, str | None, str | None]] = []
        self.threads = [threading.Thread(target=self._run, daemon=True) for _ in range(clients)]

    def _run(self):
        while not self.stop.is_set():
            try:
                r = post(self.url, self.data)
                code = None if r.status_code == 200 else r.json().get("code")
                self.results.append((time.monotonic(), r.status_code, r.headers.get("retry-after"), code))
            except Exception as e:  # noqa: BLE001 - a transport error is a result too (and fails the test)
                self.results.append((time.monotonic(), -1, None, repr(e)))
            time.sleep(self.pause_s)

    def __enter__(self):
        for t in self.threads:
            t.start()
        return self

    def __exit__(self, *exc):
        self.stop.set()
        for t in self.threads:
            t.join(60)


def _read_until_closed(sock: socket.socket, limit_s: float) -> tuple[bytes, float]:
    t0 = time.monotonic()
    sock.settimeout(limit_s)
    data = b""
    try:
        while True:
            chunk = sock.recv(4096)
            if not chunk:
                break
            data += chunk
    except (socket.timeout, ConnectionResetError):
        pass
    return data, time.monotonic() - t0


def test_slow_clients_get_408_or_closed_while_others_are_served(served, toy_scenes):
    url, _, _ = served
    port = int(url.rsplit(":", 1)[1])
    out: dict[str, tuple[bytes, float]] = {}

    def idle():
        with socket.create_connection(("127.0.0.1", port)) as s:
            out["idle"] = _read_until_closed(s, 20)

    def trickle_headers():
        with socket.create_connection(("127.0.0.1", port)) as s:
            t0 = time.monotonic()
            head = b"GET /healthz HTTP/1.1\r\nHost: x\r\nX-Slow: " + b"a" * 100
            try:
                for b in head:  # one byte every 0.25 s: never finishes within the timeout
                    s.sendall(bytes([b]))
                    time.sleep(0.25)
            except OSError:
                pass
            data, _ = _read_until_closed(s, 20)
            out["trickled headers"] = (data, time.monotonic() - t0)

    def unfinished_body():
        with socket.create_connection(("127.0.0.1", port)) as s:
            s.sendall(b"POST /v1/segment HTTP/1.1\r\nHost: x\r\nContent-Type: multipart/form-data; boundary=x\r\n"
                      b"Content-Length: 100000\r\n\r\n--x\r\nContent-Disposition: form-data; name=\"image\"; "
                      b"filename=\"a.png\"\r\n\r\n" + b"\x89PNG" + b"\0" * 500)
            out["unfinished body"] = _read_until_closed(s, 20)

    with Load(url, scene(toy_scenes, 0)) as load:
        slow = [threading.Thread(target=f) for f in (idle, trickle_headers, unfinished_body)]
        for t in slow:
            t.start()
        for t in slow:
            t.join(30)
    for name, (data, dt) in out.items():
        print(f"{name}: {data[:12]!r} after {dt:.1f}s")
    assert set(out) == {"idle", "trickled headers", "unfinished body"}
    data, dt = out["idle"]  # nothing sent: closed quietly (as a keep-alive timeout does)
    assert data == b"" and HEADER_TIMEOUT_S - 0.5 <= dt < HEADER_TIMEOUT_S + 5, (data[:200], dt)
    data, dt = out["trickled headers"]
    assert data.startswith(b"HTTP/1.1 408") and b"read_timeout" in data, data[:200]
    assert HEADER_TIMEOUT_S - 0.5 <= dt < HEADER_TIMEOUT_S + 5, dt
    data, dt = out["unfinished body"]
    assert data.startswith(b"HTTP/1.1 408") and b"read_timeout" in data, data[:300]
    assert BODY_TIMEOUT_S - 0.5 <= dt < BODY_TIMEOUT_S + 6, dt
    codes = [c for _, c, _, _ in load.results]
    assert len(codes) >= 5 and set(codes) == {200}, codes  # normal requests went on meanwhile


def test_storage_down_keeps_serving_and_health_says_degraded(served, toy_scenes):
    url, m, moto = served
    data = scene(toy_scenes, 1)
    assert post(url, data).status_code == 200
    assert httpx.get(url + "/healthz", timeout=5).json() == {"status": "ok",
                                                             "checks": {"segmenter": "ok", "storage": "ok"}}
    moto.stop()
    try:
        t0 = time.monotonic()
        r = post(url, data, bank="small")  # v2 was never loaded: it needs the storage
        print(f"bank load with storage down answered {r.status_code} in {time.monotonic() - t0:.1f}s")
        assert r.status_code == 503 and r.json()["code"] == "storage_unavailable", r.text
        assert r.headers["retry-after"] and "storage is unavailable" in r.json()["error"]
        assert "127.0.0.1" not in r.text and "testing" not in r.text  # no endpoint or credentials
        for _ in range(3):  # the loaded bank keeps being served
            ok = post(url, data)
            assert ok.status_code == 200 and ok.json()["bank"]["version"] == m["version"], ok.text
        t0 = time.monotonic()
        h = httpx.get(url + "/healthz", timeout=5)
        assert time.monotonic() - t0 < 1.5
        assert h.status_code == 200 and h.json() == {"status": "degraded",
                                                     "checks": {"segmenter": "ok", "storage": "degraded"}}
    finally:
        moto.start()
    r = post(url, data, bank="small")
    assert r.status_code == 200 and r.json()["bank"]["version"] == m["version"] + 1, r.text
    assert httpx.get(url + "/healthz", timeout=5).json()["status"] == "ok"


def _segmenter_pid() -> int:
    """The PID of this application's segmenter replica, as the replica reports it through Serve."""
    from ray import serve

    h = serve.get_deployment_handle("OVDiffSegmenter", app_name=APP)
    return int(h.health.remote().result(timeout_s=10)["pid"])


def test_replica_killed_under_load_gives_503s_and_recovers(served, toy_scenes):
    url, _, _ = served
    pid = _segmenter_pid()
    assert pid != os.getpid()
    health: list[tuple[float, int, float]] = []
    with Load(url, scene(toy_scenes, 2), clients=2, pause_s=0.1) as load:
        time.sleep(1.0)
        t_kill = time.monotonic()
        os.kill(pid, signal.SIGKILL)
        recovered = None
        while time.monotonic() - t_kill < 60:
            t0 = time.monotonic()
            try:
                h = httpx.get(url + "/healthz", timeout=5)
                health.append((t0 - t_kill, h.status_code, time.monotonic() - t0))
            except httpx.TimeoutException:
                health.append((t0 - t_kill, -1, time.monotonic() - t0))
            after = [(t, c) for t, c, _, _ in load.results if t > t_kill]
            fails = [t for t, c in after if c != 200]
            if fails and any(c == 200 and t > max(fails) for t, c in after) or (
                    not fails and sum(c == 200 for _, c in after) >= 6 and _new_pid(pid)):
                recovered = time.monotonic() - t_kill
                break
            time.sleep(0.3)
    after = [r for r in load.results if r[0] > t_kill]
    codes = [c for _, c, _, _ in after]
    print(f"replica {pid} killed: recovered in {recovered if recovered is None else round(recovered, 1)}s; "
          f"{len(codes)} requests after the kill: {codes.count(200)} ok, {codes.count(503)} 503; "
          f"/healthz slowest {max(d for _, _, d in health):.2f}s, statuses {sorted(set(c for _, c, _ in health))}")
    assert recovered is not None, codes
    assert 500 not in codes and -1 not in codes, after
    for _, c, retry, code in after:
        if c != 200:
            assert c == 503 and retry and code in ("unavailable", "overloaded"), (c, retry, code)
    assert max(d for _, _, d in health) < 2.0  # /healthz: about 1 s at most server-side (+ HTTP on a busy machine)
    assert post(url, scene(toy_scenes, 3)).status_code == 200


def _new_pid(old: int) -> bool:
    try:
        return _segmenter_pid() != old
    except Exception:  # noqa: BLE001 - not back yet
        return False
