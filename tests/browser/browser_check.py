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


def test_page_examples_picker_hover_and_provenance(served, toy_bank, toy_scenes, tmp_path):
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
                         capture_output=True, text=True, timeout=180)
    assert run.returncode == 0, run.stderr[-3000:]
    out = json.loads(run.stdout.strip().splitlines()[-1])

    assert out["before_result_hidden"]  # no broken image or empty legend before the first result
    assert bank.bank_id in out["bank_line"] and out["picker"] == bank.names
    assert len(out["examples"]) == 6 and out["truth_shown"] and out["example_legend"]
    assert out["chips"] == [name]  # the picked class
    expected = seg.segment(read_image(image), classes=[name])
    found = sorted(set(expected.classes.values()) - {"background"})
    assert found == [name] and [x for x in out["legend"] if not x.startswith("unsure")] == found
    h, w = read_image(image).shape[:2]
    assert out["labels_size"] == [w, h] and "ms" in out["timing"]
    assert out["found_pixel"]  # the class is drawn in its name's colour
    assert out["hover"].startswith(name) and "confidence" in out["hover"] and "top:" in out["hover"]
    assert name in out["explain"] and "support images" in out["explain"] and "%" in out["explain"]
    assert "purple hexagon" in out["picker_error"] and "not a class" in out["picker_error"]
    assert out["page_errors"] == []
    assert shot.stat().st_size > 10_000
