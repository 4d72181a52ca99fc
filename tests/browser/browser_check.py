"""The try-it page in Debian's headless Chromium, driven by Playwright, against the Serve app on local Ray.

Not part of `make test` (a fresh machine has no Chromium): `make test-browser` installs Debian's chromium and
playwright-core (tests/browser/package-lock.json), then runs this file.
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path

import pytest

HERE = Path(__file__).resolve().parent


@pytest.fixture(scope="module")
def served(ray_local, toy_bank):
    from ray import serve

    from ovdiff_ray.demo import free_port
    from ovdiff_ray.serve.app import build_app

    port = free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    try:
        serve.run(build_app({"bank": toy_bank, "num_replicas": 1, "num_cpus": 1}), name="ovdiff-page", route_prefix="/")
        yield f"http://127.0.0.1:{port}/"
    finally:
        serve.shutdown()


def test_page_segments_an_upload_and_shows_errors(served, toy_bank, toy_scenes, tmp_path):
    from ovdiff_ray.segment import Segmenter, read_image
    from ovdiff_ray.store.bank import Bank

    assert shutil.which("node") and (HERE / "node_modules" / "playwright-core").is_dir(), "run `make test-browser`"
    image = Path(toy_scenes) / "images" / "0005.png"
    shot = Path(os.environ.get("PAGE_SHOT", tmp_path / "page.png"))
    bank = Bank.load(toy_bank)
    seg = Segmenter.from_bank(bank)
    full = seg.segment(read_image(image))
    cls = max((v for v in full.classes if v), key=lambda v: (full.labels == v).sum())  # the biggest class found
    name = full.classes[cls]
    run = subprocess.run(["node", str(HERE / "page_check.js"), served, str(image), name, str(shot)],
                         capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr[-3000:]
    out = json.loads(run.stdout.strip().splitlines()[-1])

    assert bank.bank_id in out["bank_line"] and out["hints"] == bank.names
    assert out["classes_field"].strip(" ,") == name  # the clicked hint went into the field
    expected = seg.segment(read_image(image), classes=[name])
    found = sorted(set(expected.classes.values()) - {"background"})
    assert found == [name] and out["legend"] == found  # the legend lists the classes the service found
    h, w = read_image(image).shape[:2]
    assert out["overlay_size"][0] == w and out["overlay_size"][1] >= h  # the picture, its legend strip below
    assert "ms" in out["timing"]
    assert "purple hexagon" in out["error"] and "unknown" in out["error"].lower()
    assert out["page_errors"] == [] or all("400" in e for e in out["page_errors"])  # only the refused request
    assert shot.stat().st_size > 10_000
