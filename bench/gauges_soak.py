"""Gauges that stay (issue 29): `ovdiff serve --metrics-port` on a toy bank, `/metrics` scraped every 5 s for 2
minutes from the gauges' first export (segment requests running through the middle minute); prints in what share
of scrapes each gauge was present. Not in `make bench` (2.5 minutes):

    python bench/gauges_soak.py [--bank URI] [--minutes 2] [--every 5]

Without a bank it builds the toy bank (bank/vocab/toy.tsv, recipe toy) in a temporary folder first."""
from __future__ import annotations

import argparse
import os
import re
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parents[1]
GAUGES = ("ray_ovdiff_bank_version", "ray_ovdiff_bank_classes", "ray_ovdiff_queue_depth")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--bank", default=None, help="bank URI (default: build the toy bank in a temporary folder)")
    ap.add_argument("--minutes", type=float, default=2.0, help="how long to scrape (default 2)")
    ap.add_argument("--every", type=float, default=5.0, help="seconds between scrapes (default 5)")
    a = ap.parse_args()
    env = {**os.environ, "RAY_USAGE_STATS_ENABLED": "0", "PYTHONPATH": str(ROOT)}
    tmp = tempfile.TemporaryDirectory()
    bank = a.bank
    if bank is None:
        bank = str(Path(tmp.name) / "bank")
        subprocess.run([sys.executable, "-m", "ovdiff_ray.build_bank", "--vocab", str(ROOT / "bank/vocab/toy.tsv"),
                        "--recipe", "toy", "--out", bank, "--workers", "1"], check=True, env=env,
                       stdout=subprocess.DEVNULL)
    scenes = Path(tmp.name) / "scenes"
    subprocess.run([sys.executable, "-m", "ovdiff_ray.cli", "toy-scenes", "--n", "1", "--out", str(scenes)],
                   check=True, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    image = (scenes / "images" / "0000.png").read_bytes()
    port, mport = free_port(), free_port()
    p = subprocess.Popen([sys.executable, "-m", "ovdiff_ray.cli", "serve", "--bank", bank, "--port", str(port),
                          "--metrics-port", str(mport), "--replicas", "1", "--num-cpus", "0.5"],
                         stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
    lines: list[str] = []
    threading.Thread(target=lambda: lines.extend(iter(p.stdout.readline, "")), daemon=True).start()
    stop, loading, answered = threading.Event(), threading.Event(), []

    def load():
        with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=60) as c:
            while not stop.is_set():
                if loading.is_set():
                    try:
                        answered.append(c.post("/v1/segment",
                                               files={"image": ("s.png", image, "image/png")}).status_code)
                    except httpx.HTTPError as e:  # counted, and the load goes on
                        answered.append(type(e).__name__)
                else:
                    time.sleep(0.2)

    try:
        t0 = time.time()
        while not any("ready in" in x for x in lines) and time.time() - t0 < 300 and p.poll() is None:
            time.sleep(0.5)
        assert any("ready in" in x for x in lines), "".join(lines)[-2000:]
        ready = time.time()
        while time.time() - ready < 120:  # Ray exports a new series after its reporting interval (10 s)
            text = httpx.get(f"http://127.0.0.1:{mport}/metrics", timeout=10).text
            if all(re.search(rf"^{g}\{{", text, re.M) for g in GAUGES):
                break
            time.sleep(1)
        first = time.time() - ready
        threading.Thread(target=load, daemon=True).start()
        n = int(a.minutes * 60 / a.every)
        seen = {g: 0 for g in GAUGES}
        seen_loaded, scrapes_loaded, gaps = 0, 0, []
        start = time.time()
        for i in range(n):
            loading.set() if n // 4 <= i < 3 * n // 4 else loading.clear()
            text = httpx.get(f"http://127.0.0.1:{mport}/metrics", timeout=10).text
            missing = []
            for g in GAUGES:
                if re.search(rf"^{g}\{{", text, re.M):
                    seen[g] += 1
                else:
                    missing.append(g)
            if missing:  # what else was in that scrape: a gauge gone alone, or the node's whole export short
                series = len([x for x in text.splitlines() if x.startswith("ray_")])
                counter = bool(re.search(r"^ray_ovdiff_requests_total\{", text, re.M))
                gaps.append(f"t={time.time() - start:.0f}s missing {','.join(m.removeprefix('ray_ovdiff_') for m in missing)}"
                            f" (ray_ series in the scrape: {series}, requests counter there: {counter})")
            if loading.is_set():
                scrapes_loaded += 1
                seen_loaded += bool(re.search(r"^ray_ovdiff_queue_depth\{", text, re.M))
            time.sleep(max(0.0, start + (i + 1) * a.every - time.time()))
    finally:
        alive = p.poll() is None
        stop.set()
        p.send_signal(signal.SIGTERM)
        try:
            p.wait(120)
        except subprocess.TimeoutExpired:
            p.kill()
        tmp.cleanup()
    print(f"first_seen_s: {first:.1f} (after the service said ready)")
    print(f"scrapes: {n} (every {a.every:g} s over {a.minutes:g} min from then)")
    for g in GAUGES:
        print(f"{g.removeprefix('ray_ovdiff_')}_present_pct: {100 * seen[g] / n:.1f}")
    ok = sum(1 for x in answered if x == 200)
    print(f"queue_depth_present_while_requests_pct: {100 * seen_loaded / max(1, scrapes_loaded):.1f} "
          f"({scrapes_loaded} scrapes, {ok} of {len(answered)} requests answered 200)")
    print(f"service_alive_at_end: {str(alive).lower()}")
    for g in gaps:
        print("  gap:", g)
    for x in lines:  # the service's own warnings, for a reader of a bad run
        if "WARNING" in x or "ERROR" in x or "Traceback" in x:
            print("  serve:", x.rstrip()[:300], file=sys.stderr)
    return 0 if all(v == n for v in seen.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
