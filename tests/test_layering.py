"""The core never imports the service layer (DESIGN.md, fourth wave): segmenting, scoring confidence and explaining a
result, in a fresh interpreter, leave no `ovdiff_ray.serve` module in `sys.modules` (lazy imports inside functions
included: the script runs the functions, not only the imports)."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

SCRIPT = r"""
import json, sys
import numpy as np
from ovdiff_ray import confidence, explain, segment
from ovdiff_ray.models import toy
from ovdiff_ray.recipe import load_recipe
from ovdiff_ray.sample import SamplingModels, sample_class
from ovdiff_ray.store.bank import Bank

from dataclasses import replace
r = load_recipe("toy")
r = replace(r, generation=replace(r.generation, n_images=4))  # a small support set: this checks imports, not quality
m = SamplingModels.load(r, "cpu")
vocab = [("red circle", "thing"), ("yellow checks", "stuff")]
bank = Bank.from_prototypes([sample_class(n, r, m, kind=k) for n, k in vocab], r)
seg = segment.Segmenter.from_bank(bank, "cpu")
img, _ = toy.make_scene([n for n, _ in vocab], [k for _, k in vocab], np.random.default_rng(3), 96)
res = seg.segment(img, return_scores=True, keep_features=True)
out = explain.explain(seg, img, res)
assert res.confidence is not None and out
print(json.dumps(sorted(k for k in sys.modules if k.startswith("ovdiff_ray"))))
"""


def test_segment_confidence_and_explain_never_import_the_service_layer():
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    r = subprocess.run([sys.executable, "-c", SCRIPT], capture_output=True, text=True, env=env, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    mods = json.loads(r.stdout.strip().splitlines()[-1])
    assert "ovdiff_ray.explain" in mods and "ovdiff_ray.segment" in mods and "ovdiff_ray.labelmaps" in mods
    assert [m for m in mods if m.startswith("ovdiff_ray.serve")] == []
