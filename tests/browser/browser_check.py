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


def test_bank_view_pages_searches_and_loads_thumbnails_lazily(served, toy_bank, tmp_path):
    """The bank view (issue 26): the try-it page links it; 8 classes a page with audit scores; a row's thumbnails
    load only when it scrolls into view; next page; search."""
    from ovdiff_ray.store.fs import Location
    from ovdiff_ray.store.shards import read_manifest

    assert shutil.which("node") and (HERE / "node_modules" / "playwright-core").is_dir(), "run `make test-browser`"
    m = read_manifest(Location(toy_bank))
    names = [c["name"] for c in m["classes"]]
    shot = Path(os.environ.get("BANK_SHOT", tmp_path / "bank.png"))
    run = subprocess.run(["node", str(HERE / "bank_check.js"), served, "star", str(shot)], capture_output=True,
                         text=True, timeout=180)
    assert run.returncode == 0, run.stderr[-3000:]
    out = json.loads(run.stdout.strip().splitlines()[-1])
    assert out["link"] == "bank" and m["bank_id"] in out["bank_line"]
    n = len(names)
    assert out["page1"] == f"1-8 of {n}" and out["page2"] == f"9-{n} of {n}"
    assert len(out["rows1"]) == 8 and not set(out["rows1"]) & set(out["rows2"])
    assert sorted(out["rows1"] + out["rows2"]) == sorted(names)
    assert all(0 < float(s) <= 1 for s in out["scores"])  # audit scores shown
    assert out["last_row_imgs_before_scroll"] == 0  # lazily: below the fold, nothing loaded yet
    n_images = m["recipe"]["generation"]["n_images"]
    assert out["last_row_imgs_after_scroll"] == n_images and out["tile_size"] == [96, 96]
    assert "seed" in out["titles"] and "name agreement" in out["titles"]
    assert sorted(out["search_rows"]) == sorted(x for x in names if "star" in x)
    assert out["search_page"] == f"1-{len(out['search_rows'])} of {len(out['search_rows'])}"
    assert out["page_errors"] == []
    assert shot.stat().st_size > 10_000
