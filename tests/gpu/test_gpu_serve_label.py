"""What the service and the labelling jobs run per batch, on the device vs the CPU, without Ray: the Serve engine's
batched `run()` (scores, PAMR, confidence, min_confidence, explain), `label_dataset`'s labeller (the Ray Data UDF of
the job, called directly on a batch dict) and `ovdiff_ray.data.Segment` (the Ray Data UDF for pipelines of your own).
Each loads a bank committed in a local folder."""
from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from .compare import LABEL_AGREEMENT, SCORE_MAD, agreement, toy_scenes

pytestmark = pytest.mark.gpu


def images() -> list[np.ndarray]:
    s = toy_scenes(3, 128, seed=20)
    s[2] = np.asarray(Image.fromarray(s[2]).resize((150, 100)))
    return s


def engine(bank_dir: str, device: str):
    from ovdiff_ray.serve.engine import BankSpec, Engine, ServiceConfig

    e = Engine(ServiceConfig(banks=[BankSpec(bank_dir)], device=device, share_bank=False))
    return e, e.load(e.catalog.default)


def jobs():
    from ovdiff_ray.serve.engine import Job

    a, b, c = images()
    return [Job(a), Job(b, pamr=True, scores=True), Job(c, confidence=True, min_confidence=0.5), Job(a, explain=True),
            Job(b, classes=("red circle", "blue star"))]


def test_engine_run_batch(toy_bank_dir, device):
    """One batch of five requests (grouped by options inside `run`), every option the service offers."""
    de, dseg = engine(toy_bank_dir, device)
    ce, cseg = engine(toy_bank_dir, "cpu")
    assert str(dseg.device).split(":")[0] == device.split(":")[0]
    dev, cpu = de.run(dseg, jobs()), ce.run(cseg, jobs())
    assert len(dev) == len(cpu) == 5
    for d, c in zip(dev, cpu):
        assert d["status"] == c["status"] == 200, (d.get("error"), c.get("error"))
        assert d["labels"].dtype == c["labels"].dtype
        assert agreement(d["labels"], c["labels"]) >= LABEL_AGREEMENT
        assert d["kept"] == c["kept"]
        if "confidence" in c:
            assert float(np.abs(d["confidence"] - c["confidence"]).mean()) <= SCORE_MAD["fp32"]
    assert set(dev[1]["region_scores"]) == set(cpu[1]["region_scores"])
    for v, s in cpu[1]["region_scores"].items():
        assert abs(dev[1]["region_scores"][v] - s) <= 0.02
    assert dev[2]["class_confidence"].keys() == cpu[2]["class_confidence"].keys()
    # explain: per class, the same winning prototypes per extractor, shares within 0.02
    ed, ec = dev[3]["explain"], cpu[3]["explain"]
    assert ed.keys() == ec.keys() and ec
    for v in ec:
        wd = {winner(p): p["share"] for p in ed[v]["prototypes"]}
        wc = {winner(p): p["share"] for p in ec[v]["prototypes"]}
        top_c = max(wc, key=wc.get)
        assert top_c in wd and abs(wd[top_c] - wc[top_c]) <= 0.02


def winner(p: dict) -> tuple:
    """A winning prototype, by what names it (extractor, level, kind, owner class, support images)."""
    return p["extractor"], p["level"], p["kind"], p["class"], tuple(p["support"] or ())


def test_labeller_batch(toy_bank_dir, device, tmp_path):
    """`label_dataset`'s UDF: decode, segment the batch with scores, encode rows (RLE, scores, confidence)."""
    from ovdiff_ray.label.encode import OK, labels_of
    from ovdiff_ray.label.labeller import Labeller

    names = []
    for i, img in enumerate(images()):
        Image.fromarray(img).save(tmp_path / f"im{i}.png")
        names.append(f"im{i}.png")
    batch = {"path": np.array(names), "size": np.array([(tmp_path / n).stat().st_size for n in names])}
    rows = {}
    for dev in (device, "cpu"):
        lab = Labeller(toy_bank_dir, 1, None, str(tmp_path), device=dev, min_confidence=0.5)
        assert str(lab.seg.device).split(":")[0] == dev.split(":")[0]
        rows[dev] = lab(batch).to_pylist()
    for d, c in zip(rows[device], rows["cpu"]):
        assert d["status"] == c["status"] == OK, (d["error"], c["error"])
        assert agreement(labels_of(d), labels_of(c)) >= LABEL_AGREEMENT
        assert agreement(labels_of(d, 255), labels_of(c, 255)) >= LABEL_AGREEMENT  # the unsure pixels too


def test_data_udf_batch(toy_bank_dir, device):
    """`ovdiff_ray.data.Segment` on a batch dict of one image size (stacked columns) and of mixed sizes."""
    from ovdiff_ray.data import Segment

    same = toy_scenes(2, 128, seed=30)
    for batch in ({"image": np.stack(same)}, {"image": np.array(images(), dtype=object)}):
        out = {d: Segment(toy_bank_dir, device=d, min_confidence=0.5)(dict(batch)) for d in (device, "cpu")}
        for k in ("labels", "confidence", "unsure"):
            assert len(out[device][k]) == len(batch["image"])
        for ld, lc, ud, uc, cd, cc in zip(out[device]["labels"], out["cpu"]["labels"], out[device]["unsure"],
                                          out["cpu"]["unsure"], out[device]["confidence"], out["cpu"]["confidence"]):
            assert agreement(ld, lc) >= LABEL_AGREEMENT
            assert agreement(ud, uc) >= LABEL_AGREEMENT
            assert float(np.abs(cd - cc).mean()) <= SCORE_MAD["fp32"]
