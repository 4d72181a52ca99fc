"""The demo's results page without a browser (ovdiff_ray/results_page.py): the PNGs it writes decode to the label
maps' colours, unsure pixels are hatched, every class is on the chart once, worst first, and the page refers to no
URL outside its folder. In headless Chromium: tests/browser/results_check.py (`make test-browser`)."""
from __future__ import annotations

import re

import numpy as np
from PIL import Image

from ovdiff_ray.results_page import IGNORE, SceneView, colour, confidence_picture, write_results_page

CLASSES = ["background", "red circle", "blue ring", "green grain", "never seen"]


def scenes():
    rng = np.random.default_rng(0)
    out = []
    for k in range(2):
        truth = np.zeros((40, 50), np.int64)
        truth[5:20, 5:25] = 1
        truth[25:, :] = 3
        truth[0, :] = IGNORE
        pred = truth.copy()
        pred[0, :] = 0
        pred[5:10, 5:25] = 2  # part of the circle called a ring
        conf = np.where(pred == truth, 0.9, 0.2).astype(np.float32)
        out.append(SceneView(f"scene {k}/x", rng.integers(0, 255, (40, 50, 3), dtype=np.uint8), pred, truth, conf,
                             12.0))
    return out


def test_page_files_chart_and_hatching(tmp_path):
    iou = np.array([0.9, 0.5, 0.0, 1.0, np.nan])
    page = write_results_page(tmp_path, scenes(), CLASSES, iou, ["headline: 2 scenes", "measured <here>"],
                              min_confidence=0.5)
    text = page.read_text()
    srcs = re.findall(r"src='([^']+)'", text)
    assert len(srcs) == 8 and all((tmp_path / s).is_file() for s in srcs)
    assert not re.search(r"(href|src)=['\"]?(https?:|//)", text)  # nothing from outside the folder
    assert "measured &lt;here&gt;" in text  # headline escaped
    chart = re.findall(r"<li class='[^']*' data-class='([^']+)' data-iou='([^']+)'>", text)
    assert chart == [("blue ring", "0.000"), ("red circle", "0.500"), ("background", "0.900"),
                     ("green grain", "1.000"), ("never seen", "n/a")]
    stem = "scene_0_x"
    pred = np.asarray(Image.open(tmp_path / "results" / f"{stem}-prediction.png"))
    truth = np.asarray(Image.open(tmp_path / "results" / f"{stem}-truth.png"))
    assert tuple(pred[7, 10]) == colour(2) and tuple(pred[15, 10]) == colour(1) and tuple(pred[30, 3]) == colour(3)
    assert tuple(truth[0, 0]) == (128, 128, 128) and tuple(truth[7, 10]) == colour(1)
    conf = np.asarray(Image.open(tmp_path / "results" / f"{stem}-confidence.png")).astype(int)
    unsure = conf[5:10, 5:25]
    assert (unsure[..., 0] >= 40).all() and ((unsure == 40).all(-1)).any() and (unsure[..., 0] >= 160).any()
    sure = conf[25:, :]
    assert (sure == 229).all()  # int(0.9 * 255): plain grey, no hatching


def test_confidence_picture_hatches_only_unsure_pixels():
    c = np.full((12, 12), 0.8, np.float32)
    c[:, :6] = 0.1
    rgb = confidence_picture(c, 0.5)
    left, right = rgb[:, :6].astype(int), rgb[:, 6:].astype(int)
    assert (right == 204).all()  # 0.8 * 255, grey
    dark = (left == 40).all(-1)
    assert 0.2 < dark.mean() < 0.5 and (left[~dark][:, 0] == 160).all()  # stripes, the rest tinted red
