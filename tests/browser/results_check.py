"""The demo's results page (ovdiff_ray/results_page.py, as `ovdiff demo` writes it) in Debian's headless Chromium,
driven by Playwright: every image loads (naturalWidth > 0), every class of the vocabulary is on the per-class IoU
chart, worst first, and the page asks for nothing but its own files.

Not part of `make test` (a fresh machine has no Chromium): `make test-browser` installs Debian's chromium and
playwright-core (tests/browser/package-lock.json), then runs this file with browser_check.py. The page's files and
HTML without a browser: tests/test_results_page.py (in `make test`).
"""
from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent


def test_results_page_images_load_and_every_class_is_charted(toy_bank, toy_scenes, tmp_path):
    from ovdiff_ray.evaluate import confusion, load_dataset, miou, read_label
    from ovdiff_ray.results_page import SceneView, write_results_page
    from ovdiff_ray.segment import Segmenter, read_image
    from ovdiff_ray.store.bank import Bank
    from ovdiff_ray.vocab import fold

    assert shutil.which("node") and (HERE / "node_modules" / "playwright-core").is_dir(), "run `make test-browser`"
    ds = load_dataset("toy", toy_scenes)
    bank = Bank.load(toy_bank)
    seg = Segmenter.from_bank(bank)
    index = {fold(n): i for i, n in enumerate(ds.classes)}
    lut = np.array([0] + [index[fold(n)] for n in bank.names])
    conf = np.zeros((len(ds.classes), len(ds.classes)), np.int64)
    views = []
    for iid, img, lab in ds.items[:4]:
        res = seg.segment(read_image(img))
        truth, pred = read_label(lab), lut[res.labels]
        conf += confusion(truth, pred, len(ds.classes))
        views.append(SceneView(iid, read_image(img), pred, truth, res.confidence))
    _, _, iou = miou(conf)
    page = write_results_page(tmp_path / "demo-out", views, list(ds.classes), iou, ["toy mIoU over 4 scenes"])

    run = subprocess.run(["node", str(HERE / "results_page_check.js"), str(page)], capture_output=True, text=True,
                         timeout=180)
    assert run.returncode == 0, run.stderr[-3000:]
    out = json.loads(run.stdout.strip().splitlines()[-1])
    assert out["errors"] == [] and out["non_file_requests"] == []
    assert out["scenes"] == 4 and len(out["images"]) == 4 * 4  # image, prediction, truth, confidence per scene
    assert all(i["complete"] and i["natural_width"] > 0 for i in out["images"]), out["images"]
    charted = [c for c, _ in out["chart"]]
    assert sorted(charted) == sorted(ds.classes)  # every class of the vocabulary, once
    scored = [float(v) for _, v in out["chart"] if v != "n/a"]
    assert scored == sorted(scored) and len(scored) == int(np.isfinite(iou).sum())  # worst first, n/a last
    assert all(v == "n/a" for _, v in out["chart"][len(scored):])
    # the bars are drawn to scale: a class at IoU v fills v of its track
    for (_, v), bar, track in zip(out["chart"], out["bar_widths"], out["track_widths"]):
        assert abs(bar - (float(v) if v != "n/a" else 0.0) * track) <= 1.5
    assert "toy mIoU over 4 scenes" in out["headline"]
