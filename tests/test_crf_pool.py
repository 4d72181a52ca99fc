"""MaskCut's CRF pool (pipeline/instances.py, issue 28): its children import neither torch nor Ray and print nothing;
a child killed mid-class (as the OOM killer does) is replaced and the class goes on, inside a real Ray actor of
`build_bank`, which commits every class exactly once."""
from __future__ import annotations

import json
import os
import re
import signal
from pathlib import Path

import numpy as np

from ovdiff_ray import build_bank as bb
from ovdiff_ray.densecrf import crf_image
from ovdiff_ray.pipeline import instances
from ovdiff_ray.recipe import load_recipe
from ovdiff_ray.store.fs import Location
from ovdiff_ray.store.shards import read_manifest


def job(seed: int = 0):
    rng = np.random.default_rng(seed)
    img = rng.integers(0, 255, (64, 64, 3), dtype=np.uint8)
    img[16:48, 16:48] = (230, 30, 30)
    grids = np.zeros((2, 8, 8), bool)
    grids[0, 2:6, 2:6] = True
    grids[1, :2, :] = True
    return img, grids


def test_children_import_neither_torch_nor_ray_and_print_nothing(capfd, monkeypatch):
    monkeypatch.setattr(instances, "CHILD_ARGS", ("-P", "-X", "importtime"))  # the child lists its imports
    pool = instances.CrfPool(2)
    try:
        got = pool.wait([pool.submit(*job(s)) for s in range(3)])
    finally:
        pool.close()
    assert all(np.array_equal(g, crf_image(*job(s))) for s, g in enumerate(got))
    err = capfd.readouterr().err
    imported = {m.group(1).strip().split(".")[0] for m in re.finditer(r"^import time:.*\|\s*(\S+)\s*$", err, re.M)}
    assert {"numpy", "pydensecrf"} <= imported
    assert not imported & {"torch", "ray", "ovdiff_ray"}, sorted(imported & {"torch", "ray", "ovdiff_ray"})
    pool = instances.CrfPool(2)
    monkeypatch.setattr(instances, "CHILD_ARGS", ("-P",))
    try:
        pool.wait([pool.submit(*job(s)) for s in range(3)])
    finally:
        pool.close()
    assert capfd.readouterr() == ("", "")  # a normal run prints nothing (no resource_tracker, no warnings)


def test_a_killed_child_is_replaced_and_its_job_runs_again():
    pool = instances.CrfPool(1)
    try:
        first = pool.wait([pool.submit(*job())])[0]
        os.kill(pool.pids()[0], signal.SIGKILL)
        again = pool.wait([pool.submit(*job())])[0]
    finally:
        pool.close()
    assert np.array_equal(first, again) and pool.restarts == 1


class KillOneCrfChild(bb.ClassWorker):
    """Kills its CRF child on the first CRF job of the build (over every worker process: a marker file)."""

    def load_models(self):
        models = super().load_models()
        pool = models.crf
        marker = Path(self.loc.uri.removeprefix("file://")).parent / "killed"
        real = pool._call

        def call(child, image, grids):
            if not marker.exists():
                marker.write_text(json.dumps({"pid": child.pid}))
                os.kill(child.pid, signal.SIGKILL)
                child.proc.wait()
            return real(child, image, grids)

        pool._call = call
        return models


def test_a_crf_child_killed_mid_class_in_a_ray_actor_and_every_class_commits_once(ray_local, tmp_path, capsys,
                                                                                   monkeypatch):
    r = load_recipe("tiny").to_dict()
    r["masks"]["maskcut_crf"] = True
    (tmp_path / "crf.yaml").write_text(json.dumps(r))
    (tmp_path / "v.tsv").write_text("name\tkind\ncat\tthing\ndog\tthing\n")
    monkeypatch.setattr(bb, "ClassWorker", KillOneCrfChild)
    rc = bb.main(["--vocab", str(tmp_path / "v.tsv"), "--recipe", str(tmp_path / "crf.yaml"),
                  "--out", str(tmp_path / "bank"), "--workers", "1", "--cpus-per-worker", "1"])
    out, err = capsys.readouterr()
    assert rc == 0, err[-3000:]
    assert (tmp_path / "killed").exists()  # a child was killed mid-class ...
    assert "summary: built 2, skipped 0, failed 0," in out
    m = read_manifest(Location(str(tmp_path / "bank")))
    assert sorted(c["name"] for c in m["classes"]) == ["cat", "dog"]  # ... every class exactly once ...
    assert all(c["build"]["attempts"] == 1 for c in m["classes"])  # ... none retried: the pool recovered in-class
    assert "resource_tracker" not in out + err and "BrokenProcessPool" not in out + err
