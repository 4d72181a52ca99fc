"""A real 2-node Ray cluster on this machine (head 127.0.0.2, worker 127.0.0.3): `ray job submit`, a worker node
killed mid-build, a driver killed mid-build. Processes are ended by their own PIDs, never `ray stop`."""
from __future__ import annotations

import os
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

from ovdiff_ray.store import Location, load_bank, read_manifest

from .conftest import free_port

ROOT = Path(__file__).resolve().parents[1]
RAY = str(Path(sys.executable).parent / "ray")
COLOURS = ["red", "orange", "yellow", "green", "cyan", "blue", "purple", "magenta"]
SHAPES = ["circle", "square", "triangle", "star", "ring", "cross"]


def procs_matching(*needles: str, where: str = "cmdline") -> list[int]:
    """PIDs whose cmdline (or environment) contains every needle."""
    pids = []
    for d in Path("/proc").iterdir():
        if not d.name.isdigit() or int(d.name) == os.getpid():
            continue
        try:
            text = (d / where).read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        if all(n in text for n in needles):
            pids.append(int(d.name))
    return pids


def descendants(pids: list[int]) -> list[int]:
    """`pids` and every process below them."""
    children: dict[int, list[int]] = {}
    for d in Path("/proc").iterdir():
        if d.name.isdigit():
            try:
                ppid = int((d / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            children.setdefault(ppid, []).append(int(d.name))
    out, todo = set(), list(pids)
    while todo:
        p = todo.pop()
        if p not in out:
            out.add(p)
            todo += children.get(p, [])
    return sorted(out)


def kill(pids: list[int]) -> None:
    for p in pids:
        try:
            os.kill(p, signal.SIGKILL)
        except ProcessLookupError:
            pass


class Cluster:
    def __init__(self, tmp: Path):
        self.tmp = tmp
        self.port, self.dash = free_port(), free_port()
        self.env = {**os.environ, "RAY_AUTH_MODE": "token", "RAY_USAGE_STATS_ENABLED": "0",
                    "RAY_DATA_DISABLE_PROGRESS_BARS": "1", "PYTHONPATH": str(ROOT),
                    "PATH": f"{Path(sys.executable).parent}:{os.environ.get('PATH', '')}"}
        # token auth (Ray's default): a token of this cluster's own, so nothing depends on ~/.ray/auth_token
        token = tmp / "auth_token"
        token.write_text(secrets.token_hex(32))
        token.chmod(0o600)
        self.env["RAY_AUTH_TOKEN_PATH"] = str(token)
        self.address = f"127.0.0.2:{self.port}"
        self.dashboard = f"http://127.0.0.2:{self.dash}"
        self.node_ids: set[str] = set()

    def ray(self, *args: str, timeout: int = 60, node: str = "") -> subprocess.CompletedProcess:
        # every process a node starts inherits OVDIFF_TEST_NODE, so it can be found (and killed) by its environment
        env = {**self.env, "OVDIFF_TEST_NODE": f"{self.tmp}@{node}"} if node else self.env
        return subprocess.run(["timeout", str(timeout), RAY, *args], env=env, capture_output=True, text=True,
                              timeout=timeout + 10)

    @staticmethod
    def node_ports() -> list[str]:
        """Ports of a node's agents, all free: nodes on one machine (and the session's local Ray) must not share the
        defaults (the dashboard agent's 52365 among them), or a node's job agent never comes up."""
        flags = ("--dashboard-agent-listen-port", "--dashboard-agent-grpc-port", "--runtime-env-agent-port",
                 "--metrics-export-port", "--node-manager-port", "--object-manager-port")
        return [x for f in flags for x in (f, str(free_port()))]

    def start_head(self) -> None:
        r = self.ray("start", "--head", *self.node_ports(), "--ray-client-server-port", str(free_port()),
                     "--node-ip-address", "127.0.0.2", "--port", str(self.port), "--num-cpus", "2",
                     "--temp-dir", str(self.tmp / "ray"), "--include-dashboard", "true", "--dashboard-host", "127.0.0.2",
                     "--dashboard-port", str(self.dash), "--disable-usage-stats", node="127.0.0.2")
        self.record_node_ids()
        assert r.returncode == 0, r.stderr + r.stdout

    def start_worker(self, ip: str) -> None:
        r = self.ray("start", "--address", self.address, "--node-ip-address", ip, *self.node_ports(), "--num-cpus", "2",
                     node=ip)
        self.record_node_ids()
        assert r.returncode == 0, r.stderr + r.stdout

    def kill_node(self, ip: str) -> int:
        pids = descendants(procs_matching(f"OVDIFF_TEST_NODE={self.tmp}@{ip}", where="environ"))
        kill(pids)
        return len(pids)

    def stop(self) -> None:
        """End every process of this cluster: marked ones, their children, and anything on its node ids."""
        pids = descendants(procs_matching(f"OVDIFF_TEST_NODE={self.tmp}@", where="environ"))
        for node_id in self.node_ids:
            pids += procs_matching(f"RAY_NODE_ID={node_id}", where="environ")
        kill(sorted(set(pids)))

    def record_node_ids(self) -> None:
        for p in procs_matching(f"OVDIFF_TEST_NODE={self.tmp}@", where="environ"):
            try:
                env = (Path("/proc") / str(p) / "environ").read_bytes().split(b"\0")
            except OSError:
                continue
            self.node_ids |= {e.split(b"=", 1)[1].decode() for e in env if e.startswith(b"RAY_NODE_ID=")}

    def submit(self, *args: str, wait: bool = True) -> subprocess.CompletedProcess | subprocess.Popen:
        cmd = [RAY, "job", "submit", "--address", self.dashboard]
        cmd += [] if wait else ["--no-wait"]
        cmd += ["--", "build_bank", *args]
        for _ in range(30):  # the head's job agent takes a few seconds to come up after `ray start`
            r = subprocess.run(cmd, env=self.env, capture_output=True, text=True, timeout=400 if wait else 60)
            if "No available agent to submit job" not in r.stdout + r.stderr:
                return r
            time.sleep(2)
        return r


@pytest.fixture(scope="module")
def cluster():
    # a short temp dir: Ray's AF_UNIX socket paths under it must stay below 108 bytes
    tmp = Path(tempfile.mkdtemp(prefix="ovr-", dir="/tmp"))
    c = Cluster(tmp)
    try:
        c.start_head()
        c.start_worker("127.0.0.3")
        yield c
    finally:
        c.stop()
        shutil.rmtree(tmp, ignore_errors=True)


def vocab(tmp: Path, n: int) -> str:
    names = [f"{c} {s}" for s in SHAPES for c in COLOURS][:n]
    p = tmp / f"vocab{n}.tsv"
    p.write_text("name\tkind\n" + "".join(f"{x}\tthing\n" for x in names))
    return str(p)


def slow_recipe(tmp: Path) -> str:
    """The toy recipe with more support images, so a class takes a couple of seconds."""
    text = (ROOT / "bank" / "recipes" / "toy.yaml").read_text()
    p = tmp / "toy_slow.yaml"
    p.write_text(text.replace("n_images: 16", "n_images: 48").replace("batch_size: 16", "batch_size: 8"))
    return str(p)


def check_exactly_once(out: str, n: int) -> None:
    m = read_manifest(Location(out))
    names = [c["name"] for c in m["classes"]]
    assert len(names) == n == len(set(names))
    bank = load_bank(out)  # every shard's sha256 verified
    assert len(bank.names) == n
    referenced = {c["shard"] for c in m["classes"]}
    assert len(referenced) == n


def wait_for(pred, timeout: float, what: str) -> None:
    end = time.time() + timeout
    while time.time() < end:
        if pred():
            return
        time.sleep(0.3)
    raise AssertionError(f"timed out waiting for {what}")


def test_ray_job_submit(cluster, tmp_path):
    out = str(tmp_path / "bank")
    r = cluster.submit("--vocab", str(ROOT / "bank/vocab/toy.tsv"), "--recipe", "toy", "--out", out)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert "summary: built 10, skipped 0, failed 0" in r.stdout
    check_exactly_once(out, 10)


def test_worker_node_killed_mid_build(cluster, tmp_path):
    out = str(tmp_path / "bank")
    n = 16
    args = ["--vocab", vocab(tmp_path, n), "--recipe", slow_recipe(tmp_path), "--out", out, "--workers", "4",
            "--commit-every", "2"]
    r = cluster.submit(*args, wait=False)
    assert r.returncode == 0, r.stderr
    job_id = [l for l in r.stdout.splitlines() if "submitted successfully" in l][0].split("'")[1]
    wait_for(lambda: Location(out).exists("manifests/latest"), 240, "the first commit")
    assert cluster.kill_node("127.0.0.3") > 0
    assert len(read_manifest(Location(out))["classes"]) < n  # killed mid-build
    cluster.start_worker("127.0.0.4")  # the autoscaler's replacement node
    logs = cluster.ray("job", "logs", "--address", cluster.dashboard, "--follow", job_id, timeout=400)
    status = cluster.ray("job", "status", "--address", cluster.dashboard, job_id)
    assert "succeeded" in status.stdout.lower(), logs.stdout[-3000:] + status.stdout
    check_exactly_once(out, n)
    assert len(Location(out).list("shards")) >= n  # orphans from killed attempts are allowed, never referenced


def test_driver_killed_then_resumed(cluster, tmp_path):
    out = str(tmp_path / "bank")
    n = 12
    voc = vocab(tmp_path, n)
    args = ["--vocab", voc, "--recipe", slow_recipe(tmp_path), "--out", out, "--workers", "2", "--commit-every", "2"]
    r = cluster.submit(*args, wait=False)
    assert r.returncode == 0, r.stderr
    wait_for(lambda: Location(out).exists("manifests/latest"), 240, "the first commit")
    drivers = procs_matching("build_bank", out)
    assert drivers, "driver process not found"
    kill(drivers)
    first = read_manifest(Location(out))
    assert 0 < len(first["classes"]) < n
    r = cluster.submit(*args)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    done = len(read_manifest(Location(out), first["version"])["classes"])
    line = [l for l in r.stdout.splitlines() if l.startswith("summary:")][-1]
    built = int(line.split("built ")[1].split(",")[0])
    skipped = int(line.split("skipped ")[1].split(",")[0])
    assert skipped >= done and built + skipped == n
    check_exactly_once(out, n)
