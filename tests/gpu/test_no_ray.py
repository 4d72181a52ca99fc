"""The GPU tier runs where Ray is not installed (the lent device machine): every module it reaches imports
without Ray."""
from __future__ import annotations

import subprocess
import sys

import pytest

pytestmark = pytest.mark.gpu
MODULES = ["ovdiff_ray.segment", "ovdiff_ray.explain", "ovdiff_ray.serve.engine", "ovdiff_ray.serve.outputs",
           "ovdiff_ray.label.labeller", "ovdiff_ray.label.encode", "ovdiff_ray.data", "ovdiff_ray.sample",
           "ovdiff_ray.pipeline.class_pipeline", "ovdiff_ray.models.fullsize", "tests.gpu.compare"]
BLOCK = """
import importlib, sys
class NoRay:
    def find_spec(self, name, path=None, target=None):
        if name == "ray" or name.startswith("ray."):
            raise ImportError(f"no module named {name!r} (blocked: the device machine has no Ray)")
sys.meta_path.insert(0, NoRay())
for m in sys.argv[1:]:
    importlib.import_module(m)
assert not any(k == "ray" or k.startswith("ray.") for k in sys.modules)
print("imported", len(sys.argv) - 1)
"""


def test_tier_modules_import_without_ray():
    r = subprocess.run([sys.executable, "-c", BLOCK, *MODULES], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    assert f"imported {len(MODULES)}" in r.stdout
