"""Evaluation: mIoU against an independent reference, the toy world end to end with ablations, a VOC-layout
folder, and clear errors for bad dataset folders and banks that do not cover a dataset."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from ovdiff_ray import evaluate
from ovdiff_ray.models import toy
from ovdiff_ray.recipe import load_recipe
from ovdiff_ray.vocab import load_vocab

ROOT = Path(__file__).resolve().parents[1]
VOCAB = str(ROOT / "bank" / "vocab" / "toy.tsv")


def write_bank(root, protos, recipe) -> str:
    from ovdiff_ray.store.fs import Location
    from ovdiff_ray.store.shards import commit_manifest, new_manifest, write_shard

    loc = Location(str(root))
    entries = [write_shard(loc, p, i).to_entry() for i, p in enumerate(protos)]
    commit_manifest(loc, new_manifest("eval-test", 1, recipe.to_dict(), entries))
    return str(root)


def sample_all(recipe, names_kinds):
    from ovdiff_ray.sample import SamplingModels, sample_class

    models = SamplingModels.load(recipe, "cpu")
    return [sample_class(n, recipe, models, kind=k) for n, k in names_kinds]


# `toy_bank` (tests/conftest.py): the toy vocabulary built by `build_bank` on the session's local Ray.


# ------------------------------------------------------------------------------------------------- metrics

def reference_ious(gts: list[np.ndarray], preds: list[np.ndarray], n: int) -> np.ndarray:
    """Per-class IoU by counting masks class by class (no confusion matrix)."""
    out = []
    for c in range(n):
        tp = fp = fn = 0
        for g, p in zip(gts, preds):
            valid = g != 255
            tp += int(((g == c) & (p == c) & valid).sum())
            fp += int(((g != c) & (p == c) & valid).sum())
            fn += int(((g == c) & (p != c) & valid).sum())
        out.append(tp / (tp + fp + fn) if tp + fp + fn else np.nan)
    return np.array(out)


def test_miou_matches_an_independent_reference():
    rng = np.random.default_rng(0)
    n = 7
    gts, preds = [], []
    for _ in range(3):
        g = rng.choice([0, 1, 2, 3, 5], size=(40, 50)).astype(np.int64)  # 4 and 6 never in the ground truth
        g[rng.random(g.shape) < 0.1] = 255
        p = rng.choice([0, 1, 2, 3, 5, 6], size=g.shape, p=[0.3, 0.2, 0.2, 0.1, 0.1, 0.1])  # 6 only predicted
        p = np.where(rng.random(g.shape) < 0.5, np.where(g == 255, 0, g), p)
        gts.append(g)
        preds.append(p)
    conf = sum(evaluate.confusion(g, p, n) for g, p in zip(gts, preds))
    m, m_nan, iou = evaluate.miou(conf)
    ref = reference_ious(gts, preds, n)
    assert np.isnan(iou[4]) and np.isnan(ref[4]) and iou[6] == 0 == ref[6]
    assert np.allclose(iou, ref, equal_nan=True)
    assert m == pytest.approx(np.nan_to_num(ref).mean()) and m_nan == pytest.approx(np.nanmean(ref))
    assert m < m_nan  # the absent class counts as 0 in one convention only
    assert conf.sum() == sum(int((g != 255).sum()) for g in gts)
    with pytest.raises(evaluate.DatasetError, match="label value 9"):
        evaluate.confusion(np.full((2, 2), 9), np.zeros((2, 2)), n)


# ------------------------------------------------------------------------------------------------ toy world

def test_toy_end_to_end_with_ablations(toy_bank, tmp_path, capsys):
    scenes = tmp_path / "scenes"
    assert toy.scenes_main(["--vocab", VOCAB, "--n", "30", "--out", str(scenes), "--seed", "11"]) == 0
    capsys.readouterr()
    rc = evaluate.main(["--dataset", "toy", "--bank", toy_bank, "--root", str(scenes), "--json", "--no-progress",
                        "--ablate", "no_background", "no_prefilter", "--overlays", "2", "--out", str(tmp_path / "ov")])
    assert rc == 0
    res = json.loads(capsys.readouterr().out)
    assert res["images"] == 30 and set(res["per_class"]) == {"background", *load_vocab(VOCAB).names}
    assert res["miou"] >= 0.80, res
    for ab in ("no_background", "no_prefilter"):
        assert res["ablations"][ab]["miou"] <= res["miou"] - 0.03, (ab, res["ablations"][ab]["miou"], res["miou"])
    assert len(list((tmp_path / "ov").glob("*_pred.png"))) == 2
    # where pixels go: the top confusions and per-class losses agree with the per-class IoU
    conf = res["confusion"]
    assert 0 < len(conf["top"]) <= 10 and conf["top"] == sorted(conf["top"], key=lambda p: -p["pixels"])
    assert all(p["true"] != p["predicted"] and p["pixels"] > 0 for p in conf["top"])
    for name, c in conf["per_class"].items():
        lost = c["to_background"] + sum(c["to_classes"].values())
        assert 0 <= lost <= 1 + 1e-6 and name not in c["to_classes"]
        assert res["per_class"][name] is None or res["per_class"][name] <= 1 - lost + 1e-3


def test_toy_table_output(toy_bank, tmp_path, capsys):
    scenes = tmp_path / "scenes"
    toy.write_scenes(VOCAB, 3, str(scenes), seed=2, progress=False)
    assert evaluate.main(["--dataset", "toy", "--bank", toy_bank, "--root", str(scenes), "--no-progress",
                          "--ablate", "only:toy"]) == 0
    out = capsys.readouterr().out
    assert "red circle" in out and "only:toy" in out and "eval toy: mIoU" in out
    assert "top confusions" in out


def test_per_class_table_is_sorted_worst_first():
    """The printed per-class IoU runs from the worst class up; classes with no IoU (absent from ground truth and
    prediction) come last, as `-`; the runs table follows."""
    per = {"background": 0.9, "a": 0.5, "b": None, "c": 0.2, "d": 0.5}
    assert evaluate.worst_first(per) == [("c", 0.2), ("a", 0.5), ("d", 0.5), ("background", 0.9), ("b", None)]
    rows = [evaluate.Scores("full", 0.42, 0.525, per, 3, 1.0),
            evaluate.Scores("no_background", 0.30, 0.4, per, 3, 1.0)]
    ds = evaluate.Dataset("toy", list(per), [], Path("."))
    lines = evaluate.format_table(rows, ds).splitlines()
    assert lines[0].split()[:3] == ["class", "(worst", "first)"]
    assert [ln.split()[0] for ln in lines[1:6]] == ["c", "a", "d", "background", "b"]
    assert lines[1].split()[-1] == "20.00" and lines[5].split()[-1] == "-"
    runs = lines[lines.index("") + 1:]
    assert runs[1].split()[:3] == ["full", "42.00", "52.50"] and runs[2].split()[-2] == "-12.00"


# --------------------------------------------------------------------------------------------- VOC layout

VOC_AS_TOY = ["red circle", "red square", "red triangle", "green star", "green ring", "green cross", "blue circle",
              "blue square", "blue triangle", "yellow star", "yellow ring", "yellow cross", "cyan circle",
              "cyan square", "cyan triangle", "magenta star", "magenta ring", "magenta cross", "orange circle",
              "purple square"]


def voc_palette() -> list[int]:
    pal = []
    for i in range(256):
        r = g = b = 0
        c = i
        for j in range(8):
            r |= ((c >> 0) & 1) << (7 - j)
            g |= ((c >> 1) & 1) << (7 - j)
            b |= ((c >> 2) & 1) << (7 - j)
            c >>= 3
        pal += [r, g, b]
    return pal


def make_voc(root, n: int = 3) -> list[str]:
    """A VOC2012-layout folder of toy scenes whose things stand for the 20 VOC classes, in VOC order."""
    voc = root / "VOCdevkit" / "VOC2012"
    for d in ("JPEGImages", "SegmentationClass", "ImageSets/Segmentation"):
        (voc / d).mkdir(parents=True)
    ids = [f"2007_{i:06d}" for i in range(n)]
    for k, iid in enumerate(ids):
        img, lab = toy.make_scene(VOC_AS_TOY, ["thing"] * 20, np.random.default_rng(k), 128)
        Image.fromarray(img).save(voc / "JPEGImages" / f"{iid}.jpg", quality=95)
        p = Image.fromarray(lab, mode="P")
        p.putpalette(voc_palette())
        p.save(voc / "SegmentationClass" / f"{iid}.png")
    (voc / "ImageSets" / "Segmentation" / "val.txt").write_text("\n".join(ids[:2]) + "\n")
    return ids


def test_voc_layout_folder_evaluates(tmp_path, capsys, toy_bank):
    """The tiny recipe's models (SD / DINO / CLIP extractors, CLIP pre-filter; random weights) on a VOC folder.

    Support images come from the toy generator (each VOC class drawn as a toy thing via prompt_names) so that the
    bank builds in seconds; tiny SD sampling takes about 10 s a class here. Random weights: the numbers are not
    meaningful, the dataset reading, class mapping, metrics and JSON are."""
    recipe = load_recipe("tiny")
    names = load_vocab(ROOT / "bank" / "vocab" / "voc21.tsv").names[1:]
    recipe.generation.generator = "toy"
    recipe.generation.resolution = 64
    recipe.generation.n_images = 2
    recipe.generation.prompt_names = dict(zip(names, VOC_AS_TOY))
    bank = write_bank(tmp_path / "vocbank", sample_all(recipe, [(n, "thing") for n in names]), recipe)
    make_voc(tmp_path)
    assert evaluate.main(["--dataset", "voc21", "--bank", bank, "--root", str(tmp_path), "--json",
                          "--no-progress", "--ablate", "no_prefilter"]) == 0
    res = json.loads(capsys.readouterr().out)
    assert res["images"] == 2 and list(res["per_class"])[:3] == ["background", "aeroplane", "bicycle"]
    assert len(res["per_class"]) == 21 and set(res["ablations"]) == {"no_prefilter"}
    ious = [v for v in res["per_class"].values() if v is not None]
    assert all(0 <= v <= 1 for v in ious) and len(ious) >= 2  # background + at least one class seen
    assert 0 <= res["miou"] <= res["miou_nanmean"] <= 1
    assert res["miou"] == pytest.approx(sum(ious) / 21)
    # the same images segmented here, the palette PNGs read as plain indices, predictions mapped to VOC ids by
    # name, IoUs counted class by class: a wrong palette read or a shifted class index gives other numbers
    from ovdiff_ray.segment import Segmenter
    from ovdiff_ray.store.bank import Bank

    seg = Segmenter.from_bank(Bank.load(bank))
    voc = tmp_path / "VOCdevkit" / "VOC2012"
    gts, preds = [], []
    for iid in (voc / "ImageSets" / "Segmentation" / "val.txt").read_text().split():
        gts.append(np.array(Image.open(voc / "SegmentationClass" / f"{iid}.png")).astype(np.int64))
        labels = seg.segment(np.array(Image.open(voc / "JPEGImages" / f"{iid}.jpg").convert("RGB")), names).labels
        to_voc = np.array([0] + [names.index(n) + 1 for n in seg.bank.names])
        preds.append(to_voc[labels])
    ref = reference_ious(gts, preds, 21)
    got = np.array([np.nan if v is None else v for v in res["per_class"].values()])
    assert np.allclose(got, ref, equal_nan=True, atol=1e-6), (got, ref)
    assert len(set(np.unique(np.concatenate([g.ravel() for g in gts]))) - {0, 255}) >= 3  # classes to confuse

    # the toy bank does not cover VOC: a clear error listing the missing classes
    assert evaluate.main(["--dataset", "voc21", "--bank", toy_bank, "--root", str(tmp_path), "--json"]) == 2
    err = capsys.readouterr().err
    assert "does not cover 20 of the 20 voc21 classes" in err and "aeroplane" in err


def test_bad_dataset_folders_are_clear_errors(tmp_path, toy_bank):
    with pytest.raises(evaluate.DatasetError, match="does not exist"):
        evaluate.load_dataset("voc21", tmp_path / "nope")
    (tmp_path / "VOC2012" / "JPEGImages").mkdir(parents=True)
    with pytest.raises(evaluate.DatasetError, match="val.txt is missing"):
        evaluate.load_dataset("voc21", tmp_path)
    (tmp_path / "VOC2012" / "ImageSets" / "Segmentation").mkdir(parents=True)
    (tmp_path / "VOC2012" / "ImageSets" / "Segmentation" / "val.txt").write_text("a\n")
    with pytest.raises(evaluate.DatasetError, match="SegmentationClass is missing"):
        evaluate.load_dataset("voc21", tmp_path)
    (tmp_path / "VOC2012" / "SegmentationClass").mkdir()
    with pytest.raises(evaluate.DatasetError, match="listed files are missing"):
        evaluate.load_dataset("voc21", tmp_path)
    with pytest.raises(evaluate.DatasetError, match="SegmentationContext/val.txt is missing"):
        evaluate.load_dataset("context60", tmp_path)
    with pytest.raises(evaluate.DatasetError, match="_instanceTrainIds.png"):
        evaluate.load_dataset("coco_object81", tmp_path)
    with pytest.raises(evaluate.DatasetError, match="classes.tsv"):
        evaluate.load_dataset("toy", tmp_path)
    assert evaluate.main(["--dataset", "toy", "--bank", toy_bank, "--root", str(tmp_path / "nope")]) == 2
