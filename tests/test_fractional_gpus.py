"""Build reports count a fractional GPU as its fraction (issue 28): a class worker asking Ray for 0.5 GPU records
0.5, and its class's device hours are half of a whole GPU's. A fresh local Ray in a subprocess with one fake GPU (the
session's Ray has none; no CUDA is touched: Ray only assigns the resource)."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from ovdiff_ray.build_report import class_record, device_seconds, report

SCRIPT = r"""
import json, os, tempfile, ray
ray.init(num_cpus=2, num_gpus=1, include_dashboard=False, log_to_driver=False,
         _temp_dir=tempfile.mkdtemp(prefix="ray-fracgpu-"))

@ray.remote
class Worker:
    def device(self):
        from ovdiff_ray.build_report import worker_device
        return worker_device("cuda")

half = [Worker.options(num_gpus=0.5, num_cpus=0).remote() for _ in range(2)]  # both fit on the one GPU at once
whole = Worker.options(num_gpus=0, num_cpus=0).remote()
out = {"half": ray.get([w.device.remote() for w in half]), "none": ray.get(whole.device.remote())}
ray.shutdown()
print(json.dumps(out))
"""


def test_half_a_gpu_counts_as_half():
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1]), "RAY_USAGE_STATS_ENABLED": "0"}
    r = subprocess.run([sys.executable, "-c", SCRIPT], capture_output=True, text=True, env=env, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    out = json.loads(r.stdout.strip().splitlines()[-1])
    assert [tuple(d) for d in out["half"]] == [("cuda:0", 0.5), ("cuda:0", 0.5)]
    assert out["none"][1] == 0.0
    recs = [class_record({"model": 3.0}, 1.0, 3600.0, 3600.0, 1, "w", dev, g) for dev, g in out["half"]]
    assert [device_seconds(rec) for rec in recs] == [1800.0, 1800.0]
    whole = class_record({}, 0.0, 3600.0, 3600.0, 1, "w", "cuda:0", 1.0)
    assert device_seconds(whole) == 3600.0 and device_seconds({**whole, "gpus": 0.0, "device": "cpu"}) == 3600.0
    m = {"bank_id": "b", "version": 1, "classes": [{"name": f"c{i}", "build": rec} for i, rec in enumerate(recs)]}
    assert report(m).total_device_hours == 1.0  # two classes, one hour each on half a GPU
