"""The Ray Data UDF (`ovdiff_ray.data.Segment`) on a real local Ray over `ray.data.read_images`: label maps and
confidence equal the in-process segmenter's, images of different sizes included."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image


def test_segment_udf_over_read_images(ray_local, toy_bank, toy_scenes, tmp_path):
    import ray

    from ovdiff_ray.data import Segment
    from ovdiff_ray.segment import Segmenter, read_image
    from ovdiff_ray.store.bank import Bank

    folder = tmp_path / "images"
    folder.mkdir()
    paths = sorted(Path(toy_scenes, "images").glob("*.png"))[:3]
    for p in paths:
        Image.open(p).save(folder / p.name)
    Image.open(paths[0]).resize((160, 128)).save(folder / "wide.png")  # another size: ragged columns
    ds = ray.data.read_images(str(folder), mode="RGB", include_paths=True)
    out = ds.map_batches(Segment, fn_constructor_kwargs={"bank": toy_bank, "min_confidence": 0.5}, batch_size=2,
                         compute=ray.data.ActorPoolStrategy(size=1), num_cpus=1).take_all()
    assert len(out) == 4
    seg = Segmenter.from_bank(Bank.load(toy_bank), "cpu")
    for row in out:
        res = seg.segment(read_image(row["path"]))
        assert np.array_equal(np.asarray(row["labels"]), res.labels)
        np.testing.assert_allclose(np.asarray(row["confidence"]), res.confidence, atol=1e-6)
        assert np.array_equal(np.asarray(row["unsure"]), res.confidence < 0.5)
        assert json.loads(row["classes"]) == {str(v): n for v, n in res.classes.items()}


def test_segment_udf_refuses_unknown_classes_and_columns(toy_bank):
    from ovdiff_ray.data import Segment
    from ovdiff_ray.segment import SegmentError

    with pytest.raises(SegmentError, match="no such class|unknown classes"):
        Segment(toy_bank, classes=["red circle", "purple unicorn"])
    s = Segment(toy_bank)
    with pytest.raises(KeyError, match="no column 'image'"):
        s({"img": np.zeros((1, 8, 8, 3), np.uint8)})
