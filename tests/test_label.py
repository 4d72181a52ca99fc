"""label_dataset on a real local Ray: every format against in-process `Segmenter.segment`, resume, errors, S3, bad args.

One labelling run over the toy scenes (nested folders, a truncated PNG, a text file named .jpg) is shared by the
format checks; a second run skips everything, a third labels one added image; one run reads from and writes to moto.
"""
from __future__ import annotations

import contextlib
import io
import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
from PIL import Image

from ovdiff_ray.label import main as label_main
from ovdiff_ray.store import Location

ALL_FORMATS = "coco,png,labelstudio,parquet"
HELD_BACK = "0011.png"  # added later: labelled alone by the resume test
SUBSET = ["red circle", "yellow cross", "blue checks"]  # the S3 run labels only these


def run_label(args: list[str]) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        rc = label_main(args)
    return rc, out.getvalue(), err.getvalue()


def summary(text: str) -> str:
    return [line for line in text.splitlines() if line.startswith("summary: ")][-1]


def ls_decode(rle: list[int], height: int, width: int) -> np.ndarray:
    """Label Studio brush RLE -> boolean mask, from the documented format (thi.ng rle-pack, as label_studio_sdk's
    converter.brush reads it): bits MSB first; a 32-bit value count, 5-bit word size - 1, four 4-bit run-size
    classes - 1; then until `count` values: 1 bit (1 = one value repeated, 0 = literal values), 2-bit size class,
    run length - 1 in that class's bits, then the value(s) in word-size bits. Values are RGBA bytes, row-major."""
    bits = np.unpackbits(np.asarray(rle, np.uint8))
    pos = 0

    def read(n: int) -> int:
        nonlocal pos
        v = 0
        for b in bits[pos:pos + n]:
            v = (v << 1) | int(b)
        pos += n
        return v

    num, word = read(32), read(5) + 1
    sizes = [read(4) + 1 for _ in range(4)]
    out = np.zeros(num, np.uint8)
    i = 0
    while i < num:
        repeat = read(1)
        j = i + 1 + read(sizes[read(2)])
        if repeat:
            out[i:j] = read(word)
            i = j
        else:
            while i < j:
                out[i] = read(word)
                i += 1
    assert num == height * width * 4
    return out.reshape(height, width, 4)[:, :, 3] > 0


@contextlib.contextmanager
def one_torch_thread():
    """As an actor with one CPU runs (and far faster than 2 threads on 2 busy cores); restored after."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def segmenter(toy_bank):
    from ovdiff_ray.segment import Segmenter
    from ovdiff_ray.store.bank import Bank

    return Segmenter.from_bank(Bank.load(toy_bank), "cpu")


@pytest.fixture(scope="module")
def reference(segmenter, toy_scenes) -> dict[str, np.ndarray]:
    """In-process `Segmenter.segment` label maps of every toy scene (file name -> [H, W] int32)."""
    from ovdiff_ray.segment import read_image

    with one_torch_thread():
        return {p.name: segmenter.segment(read_image(p)).labels
                for p in sorted(Path(toy_scenes, "images").glob("*.png"))}


@pytest.fixture(scope="module")
def labelled(ray_local, toy_bank, toy_scenes, tmp_path_factory) -> dict:
    """The shared run: 11 scenes (3 in `sub/`), a truncated PNG, a text file named .jpg, a .txt; all formats."""
    root = tmp_path_factory.mktemp("label")
    images, out = root / "images", root / "out"
    (images / "sub").mkdir(parents=True)
    for i, p in enumerate(sorted(Path(toy_scenes, "images").glob("*.png"))):
        if p.name != HELD_BACK:
            shutil.copy(p, images / ("sub" if i % 4 == 1 else "") / p.name)
    (images / "broken.png").write_bytes(Path(toy_scenes, "images", "0000.png").read_bytes()[:400])
    (images / "notes.jpg").write_text("not a picture\n")
    (images / "readme.txt").write_text("ignored\n")
    rc, text, err = run_label(["--images", str(images), "--bank", toy_bank, "--out", str(out), "--format", ALL_FORMATS,
                               "--workers", "2", "--batch-size", "2", "--overlays", "2"])
    return {"rc": rc, "out": out, "images": images, "text": text, "err": err}


def path_id(path: str) -> int:
    """The documented image id: the first 53 bits of sha256(path) (written here from the spec)."""
    import hashlib

    return max(1, int(hashlib.sha256(path.encode()).hexdigest()[:16], 16) >> 11)


def file_modes(root: Path) -> set[int]:
    import stat

    return {stat.S_IMODE(p.stat().st_mode) for p in root.rglob("*") if p.is_file()} | {0o666 & ~_umask()}


def _umask() -> int:
    import os

    mask = os.umask(0)
    os.umask(mask)
    return mask


def name_of(path: str) -> str:
    return path.rsplit("/", 1)[-1]


def test_summary_errors_and_overlays(labelled):
    assert labelled["rc"] == 0, labelled["err"][-3000:]
    assert summary(labelled["text"]).startswith("summary: labelled 11, skipped 0, failed 2, ")
    assert summary(labelled["text"]).endswith(f"images/s, out {labelled['out']}")
    errors = {e["path"]: e for e in map(json.loads, (labelled["out"] / "errors.jsonl").read_text().splitlines())}
    assert sorted(errors) == ["broken.png", "notes.jpg"]
    assert "truncated" in errors["broken.png"]["error"] and "not an image" in errors["notes.jpg"]["error"]
    overlays = sorted(p.relative_to(labelled["out"] / "overlays").as_posix()
                      for p in (labelled["out"] / "overlays").rglob("*.png"))
    assert overlays == ["0000.png", "0002.png"]  # the first two listed images (broken.png is unreadable)
    assert Image.open(labelled["out"] / "overlays" / "0000.png").size[0] == 128
    assert len(file_modes(labelled["out"])) == 1  # every file (labels, parts, masks) has the umask's usual mode


def test_coco_matches_segmenter(labelled, reference, toy_bank):
    from pycocotools.coco import COCO

    from ovdiff_ray.store.bank import Bank

    with contextlib.redirect_stdout(io.StringIO()):
        coco = COCO(str(labelled["out"] / "annotations.json"))
    names = Bank.load(toy_bank).names
    assert {c["id"]: c["name"] for c in coco.dataset["categories"]} == {i + 1: n for i, n in enumerate(names)}
    assert sorted(name_of(i["file_name"]) for i in coco.dataset["images"]) == sorted(set(reference) - {HELD_BACK})
    assert any(i["file_name"].startswith("sub/") for i in coco.dataset["images"])
    for img in coco.dataset["images"]:
        labels = np.zeros((img["height"], img["width"]), np.int32)
        for a in coco.loadAnns(coco.getAnnIds(imgIds=img["id"])):
            m = coco.annToMask(a).astype(bool)
            assert isinstance(a["segmentation"]["counts"], str) and a["iscrowd"] == 0
            assert a["area"] == m.sum() and not (labels[m] > 0).any()
            x, y, w, h = a["bbox"]
            ys, xs = np.nonzero(m)
            assert (x, y, w, h) == (xs.min(), ys.min(), xs.max() - xs.min() + 1, ys.max() - ys.min() + 1)
            labels[m] = a["category_id"]
            assert 0 < a["score"] <= 1
        np.testing.assert_array_equal(labels, reference[name_of(img["file_name"])], err_msg=img["file_name"])
        assert img["id"] == path_id(img["file_name"])  # stable: from the path, not the listing order
    info = coco.dataset["info"]
    assert info["images_root"] == str(labelled["images"]) and info["regions"].startswith("semantic: one region")
    results = json.loads((labelled["out"] / "results.json").read_text())
    assert isinstance(results, list) and len(results) == len(coco.dataset["annotations"])
    with contextlib.redirect_stdout(io.StringIO()):
        dt = coco.loadRes(str(labelled["out"] / "results.json"))
    assert len(dt.getAnnIds()) == len(results) and all("score" in a for a in dt.dataset["annotations"])


def test_png_reads_back(labelled, reference):
    out = labelled["out"]
    classes = json.loads((out / "classes.json").read_text())
    assert classes["dtype"] == "uint8" and classes["classes"]["0"] == "background" and len(classes["classes"]) == 11
    masks = sorted(p.relative_to(out / "masks").as_posix() for p in (out / "masks").rglob("*.png"))
    assert len(masks) == 11 and "sub/0001.png" in masks
    for rel in masks:
        with Image.open(out / "masks" / rel) as im:
            assert im.mode == "L"
            np.testing.assert_array_equal(np.asarray(im), reference[name_of(rel)], err_msg=rel)


def test_labelstudio_decodes(labelled, reference, toy_bank):
    from ovdiff_ray.store.bank import Bank

    names = Bank.load(toy_bank).names
    import xml.etree.ElementTree as ET

    bank = Bank.load(toy_bank)
    config = ET.fromstring((labelled["out"] / "labelstudio.xml").read_text())
    (image,) = config.iter("Image")
    (brush,) = config.iter("BrushLabels")
    assert (image.get("name"), image.get("value"), brush.get("name"), brush.get("toName")) == ("image", "$image",
                                                                                             "tag", "image")
    assert [lab.get("value") for lab in brush.iter("Label")] == names
    assert "Label Studio's editor cannot load" in labelled["err"]  # local paths, no --image-url
    tasks = json.loads((labelled["out"] / "tasks.json").read_text())
    assert len(tasks) == 11
    for task in tasks:
        assert task["data"]["image"].endswith(task["data"]["path"]) and Path(task["data"]["image"]).is_file()
        (pred,) = task["predictions"]
        assert pred["model_version"] == f"{bank.bank_id}@v{bank.version}" and 0 < pred["score"] <= 1
        assert all(0 < r["score"] <= 1 and r["from_name"] == "tag" and r["to_name"] == "image"
                   for r in pred["result"])
        ref = reference[name_of(task["data"]["path"])]
        labels = np.zeros_like(ref)
        for r in pred["result"]:
            assert r["type"] == "brushlabels" and r["value"]["format"] == "rle"
            assert (r["original_height"], r["original_width"]) == ref.shape
            (name,) = r["value"]["brushlabels"]
            labels[ls_decode(r["value"]["rle"], *ref.shape)] = names.index(name) + 1
        np.testing.assert_array_equal(labels, ref, err_msg=task["data"]["path"])


def test_parquet_rows_decode(labelled, reference):
    from pycocotools import mask as mu

    table = pq.read_table(labelled["out"] / "labels.parquet")
    rle = table.schema.field("rle").metadata
    assert (rle[b"encoding"], rle[b"order"]) == (b"coco-rle-compressed", b"column-major") and b"height" in rle[b"size"]
    meta = json.loads(table.schema.metadata[b"ovdiff"])
    assert meta["images_root"] == str(labelled["images"]) and meta["bank_version"] == 1 and meta["bank_id"]
    assert meta["classes"][0] == {"value": 0, "name": "background", "kind": "background"} and len(meta["classes"]) == 11
    rows = table.to_pylist()
    assert len(rows) == 11 and {"path", "width", "height", "classes", "rle", "score", "image_id"} <= set(rows[0])
    for r in rows:
        assert len(r["score"]) == len(r["values"]) and all(0 < x <= 1 for x in r["score"])
        assert r["image_id"] == path_id(r["path"])
        assert [c["name"] for c in meta["classes"] if c["value"] in r["values"]] == r["classes"]
        labels = np.zeros((r["height"], r["width"]), np.int32)
        for v, counts in zip(r["values"], r["rle"]):
            labels[mu.decode({"size": [r["height"], r["width"]], "counts": counts.encode()}).astype(bool)] = v
        np.testing.assert_array_equal(labels, reference[name_of(r["path"])], err_msg=r["path"])


def toy_ground_truth(labelled, toy_scenes, instances: bool) -> dict:
    """A COCO ground truth of the labelled scenes, built here from the toy world's label PNGs: semantic (one region
    per class) or, for thing classes, one annotation per 8-connected component; ids unrelated to ours (1000 + i)."""
    from pycocotools import mask as mu
    from scipy import ndimage

    rows = Path(toy_scenes, "classes.tsv").read_text().splitlines()[1:]
    kinds = {i + 1: line.split("\t")[1] for i, line in enumerate(rows)}
    names = {i + 1: line.split("\t")[0] for i, line in enumerate(rows)}
    images, anns = [], []
    paths = sorted(p.relative_to(labelled["images"]).as_posix() for p in labelled["images"].rglob("*.png")
                   if p.name != "broken.png" and p.name != "new.png")
    for i, rel in enumerate(paths):
        gt = np.asarray(Image.open(Path(toy_scenes, "labels", name_of(rel))))
        images.append({"id": 1000 + i, "file_name": rel, "width": gt.shape[1], "height": gt.shape[0]})
        for v in sorted(set(np.unique(gt).tolist()) - {0, 255}):
            lab, n = ndimage.label(gt == v, structure=np.ones((3, 3))) if instances and kinds[v] == "thing" else (
                (gt == v).astype(int), 1)
            for k in range(1, n + 1):
                rle = mu.encode(np.asfortranarray((lab == k).astype(np.uint8)))
                anns.append({"id": len(anns) + 1, "image_id": 1000 + i, "category_id": v, "iscrowd": 0,
                             "area": float(mu.area(rle)), "bbox": mu.toBbox(rle).tolist(),
                             "segmentation": {"size": rle["size"], "counts": rle["counts"].decode()}})
    return {"images": images, "annotations": anns,
            "categories": [{"id": v, "name": n, "supercategory": kinds[v]} for v, n in names.items()]}


@pytest.mark.parametrize("instances", [False, True])
def test_cocoeval_on_toy_ground_truth(labelled, toy_bank, toy_scenes, tmp_path, instances):
    """COCOeval(iouType="segm") on our results.json against toy ground truth: image ids taken from the ground
    truth file by file_name (--coco-images); finalize only (nothing is labelled again)."""
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    gt_doc = toy_ground_truth(labelled, toy_scenes, instances)
    (tmp_path / "gt.json").write_text(json.dumps(gt_doc))
    args = ["--images", str(labelled["images"]), "--bank", toy_bank, "--out", str(labelled["out"]), "--format",
            "coco", "--coco-images", str(tmp_path / "gt.json")] + (["--instances"] if instances else [])
    rc, text, err = run_label(args)
    assert rc == 0 and summary(text).startswith("summary: labelled 0, skipped 13, "), err[-2000:]
    assert "11 of 11 images matched" in text
    ours = json.loads((labelled["out"] / "annotations.json").read_text())
    assert sorted(i["id"] for i in ours["images"]) == sorted(i["id"] for i in gt_doc["images"])
    with contextlib.redirect_stdout(io.StringIO()) as log:
        gt = COCO(str(tmp_path / "gt.json"))
        ev = COCOeval(gt, gt.loadRes(str(labelled["out"] / "results.json")), iouType="segm")
        ev.evaluate()
        ev.accumulate()
        ev.summarize()
    print(f"COCOeval segm ({'instances' if instances else 'semantic'}), {len(gt_doc['images'])} toy scenes: "
          f"AP {ev.stats[0]:.3f} AP50 {ev.stats[1]:.3f} AP75 {ev.stats[2]:.3f} AR100 {ev.stats[8]:.3f}")
    assert "Average Precision" in log.getvalue()
    # measured 0.867 / 0.963 (semantic) and 0.878 / 0.963 (instances) on these 11 scenes; a wrong category id, image
    # id, RLE order or score drops AP far below these floors
    assert ev.stats[1] > 0.93 and ev.stats[0] > 0.82, ev.stats[:2]
    if instances:
        things = {c["id"] for c in ours["categories"] if c["supercategory"] == "thing"}
        per = {}
        for a in ours["annotations"]:
            per.setdefault((a["image_id"], a["category_id"]), []).append(a)
        assert any(len(v) > 1 for (i, c), v in per.items() if c in things)  # some class split into components
        assert all(len(v) == 1 for (i, c), v in per.items() if c not in things)  # stuff stays one region
        assert ours["info"]["regions"].startswith("instances: thing classes split")


def test_coco_images_bad_file_fails_before_writing(labelled, toy_bank, tmp_path):
    out = tmp_path / "out"
    (tmp_path / "gt.json").write_text('{"images": [{"file_name": "a.png"}]}')
    base = ["--images", str(labelled["images"]), "--bank", toy_bank, "--out", str(out), "--format", "coco"]
    rc, _, err = run_label(base + ["--coco-images", str(tmp_path / "gt.json")])
    assert rc == 2 and "gt.json: not a COCO file with images[].file_name/id" in err and not out.exists()
    rc, _, err = run_label(base + ["--coco-images", str(tmp_path / "missing.json")])
    assert rc == 2 and "missing.json: not found" in err and not out.exists()
    rc, _, err = run_label(base[:-1] + ["png", "--coco-images", str(tmp_path / "gt.json")])
    assert rc == 2 and "--coco-images goes with --format coco" in err and not out.exists()


def test_rerun_skips_then_labels_only_a_new_image(labelled, reference, toy_bank, toy_scenes):
    """(Runs after the format checks: it adds an image to the shared folder.)"""
    args = ["--images", str(labelled["images"]), "--bank", toy_bank, "--out", str(labelled["out"]),
            "--format", "coco,png"]
    rc, text, _ = run_label(args)
    assert rc == 0 and summary(text).startswith("summary: labelled 0, skipped 13, failed 0, ")
    before = {i["file_name"]: i["id"] for i in json.loads((labelled["out"] / "annotations.json").read_text())["images"]}
    shutil.copy(Path(toy_scenes, "images", HELD_BACK), labelled["images"] / "sub" / "new.png")
    rc, text, err = run_label(args + ["--workers", "1"])
    assert rc == 0 and summary(text).startswith("summary: labelled 1, skipped 13, failed 0, "), err[-2000:]
    doc = json.loads((labelled["out"] / "annotations.json").read_text())
    assert len(doc["images"]) == 12 and any(i["file_name"] == "sub/new.png" for i in doc["images"])
    after = {i["file_name"]: i["id"] for i in doc["images"]}
    assert {k: after[k] for k in before} == before  # adding an image renumbers nothing
    with Image.open(labelled["out"] / "masks" / "sub" / "new.png") as im:
        np.testing.assert_array_equal(np.asarray(im), reference[HELD_BACK])
    assert len(list((labelled["out"] / "parts").glob("*.parquet"))) == 1  # compacted


def test_s3_in_and_out(ray_local, s3, toy_bank, toy_scenes, segmenter):
    from pycocotools import mask as mu

    from ovdiff_ray.segment import read_image

    with one_torch_thread():  # segment(classes=SUBSET) on the full bank: the job loads only SUBSET's prototypes
        reference = {n: segmenter.segment(read_image(Path(toy_scenes, "images", n)), classes=SUBSET).labels
                     for n in ("0003.png", "0004.png")}

    bank, images, out = f"{s3}/bank", f"{s3}/photos", f"{s3}/labels/run1"
    src = Location(toy_bank)
    dst = Location(bank)
    for p in Path(toy_bank).rglob("*"):
        if p.is_file():
            dst.write_bytes(p.relative_to(src.root).as_posix(), p.read_bytes())
    pics = Location(images)
    pics.write_bytes("a/0003.png", Path(toy_scenes, "images", "0003.png").read_bytes())
    pics.write_bytes("0004.png", Path(toy_scenes, "images", "0004.png").read_bytes())
    rc, text, err = run_label(["--images", images, "--bank", bank, "--out", out, "--format", "coco,png",
                               "--workers", "1", "--classes", "red circle, yellow cross", "blue checks"])
    assert rc == 0 and summary(text).startswith("summary: labelled 2, skipped 0, failed 0, "), err[-3000:]
    res = Location(out)
    doc = json.loads(res.read_bytes("annotations.json"))
    assert sorted(i["file_name"] for i in doc["images"]) == ["0004.png", "a/0003.png"]
    for img in doc["images"]:
        labels = np.zeros((img["height"], img["width"]), np.int32)
        for a in doc["annotations"]:
            if a["image_id"] == img["id"]:
                seg = {**a["segmentation"], "counts": a["segmentation"]["counts"].encode()}
                labels[mu.decode(seg).astype(bool)] = a["category_id"]
        ref = reference[name_of(img["file_name"])]
        np.testing.assert_array_equal(labels, ref)
        mask = Image.open(io.BytesIO(res.read_bytes(f"masks/{img['file_name']}")))
        np.testing.assert_array_equal(np.asarray(mask), ref)
    assert {c["name"] for c in doc["categories"]} == set(SUBSET)  # ids: the full bank's values
    classes = json.loads(res.read_bytes("classes.json"))["classes"]
    assert sorted(classes.values()) == sorted(SUBSET + ["background"]) and res.list("parts")


def test_bad_arguments_fail_before_writing(toy_bank, toy_scenes, tmp_path):
    out = tmp_path / "out"
    images = str(Path(toy_scenes, "images"))
    base = ["--bank", toy_bank, "--out", str(out)]
    rc, _, err = run_label(base + ["--images", images, "--format", "coco", "--classes", "red circle", "purple blob,x"])
    assert rc == 2 and "unknown classes" in err and "purple blob, x" in err
    rc, _, err = run_label(base + ["--images", str(tmp_path / "nowhere"), "--format", "coco"])
    assert rc == 2 and "nowhere: no such folder" in err
    rc, _, err = run_label(base + ["--images", images, "--format", "coco,xml"])
    assert rc == 2 and "unknown format xml" in err
    rc, _, err = run_label(["--bank", str(tmp_path / "nobank"), "--out", str(out), "--images", images, "--format", "png"])
    assert rc == 2 and "no committed bank" in err
    assert not out.exists()
    cli = subprocess.run([sys.executable, "-m", "ovdiff_ray.label", "--help"], capture_output=True, text=True, timeout=60)
    assert cli.returncode == 0 and "--format" in cli.stdout and "labelstudio" in cli.stdout


def test_encoders_round_trip():
    """Brush RLE (long runs split past 2**16 values, random masks) and uint16 PNGs past 255 classes."""
    from ovdiff_ray.label import coco_decode, coco_rle, encode_png, ls_brush_rle

    rng = np.random.default_rng(0)
    masks = [np.ones((200, 300), bool), np.zeros((7, 5), bool), rng.random((48, 64)) > 0.5]
    masks.append(np.pad(np.ones((150, 150), bool), ((30, 1), (0, 9))))
    for m in masks:
        np.testing.assert_array_equal(ls_decode(list(ls_brush_rle(m)), *m.shape), m)
        counts, area, _ = coco_rle(m)
        np.testing.assert_array_equal(coco_decode(counts, *m.shape), m)
        assert area == m.sum()
    labels = rng.integers(0, 1204, (40, 50)).astype(np.int32)
    with Image.open(io.BytesIO(encode_png(labels, "uint16"))) as im:
        assert np.asarray(im).dtype == np.uint16
        np.testing.assert_array_equal(np.asarray(im), labels)


def test_labeller_segments_a_batch_and_isolates_a_failing_image(toy_bank, toy_scenes, reference, tmp_path,
                                                                 monkeypatch):
    """The actor segments a batch in one `segment_batch` call; when it raises, the images go one by one, so only
    the failing image becomes a `failed` row (with its reason) and a bad file an `unreadable` row."""
    from pycocotools import mask as coco_mask

    from ovdiff_ray.label import Labeller

    names = sorted(reference)[:3]
    for n in names:
        shutil.copy(Path(toy_scenes, "images", n), tmp_path / n)
    Image.open(tmp_path / names[1]).resize((77, 128)).save(tmp_path / "odd.png")
    (tmp_path / "bad.png").write_bytes(b"\x89PNG\r\n\x1a\n garbage")
    lab = Labeller(toy_bank, 1, None, str(tmp_path))
    real, calls = lab.seg.segment_batch, []

    def flaky(images, *a, **kw):
        calls.append(len(images))
        if any(im.shape[1] == 77 for im in images):
            raise RuntimeError("boom: the model fell over")
        return real(images, *a, **kw)

    monkeypatch.setattr(lab.seg, "segment_batch", flaky)
    paths = [names[0], "odd.png", "bad.png", names[2]]
    with one_torch_thread():
        rows = lab({"path": np.array(paths), "size": np.array([(tmp_path / p).stat().st_size for p in paths])})
    rows = rows.to_pylist()
    assert [r["status"] for r in rows] == ["ok", "failed", "unreadable", "ok"]
    assert calls[0] == 3 and "boom: the model fell over" in rows[1]["error"] and rows[2]["error"]
    for r in (rows[0], rows[3]):
        ref = reference[r["path"]]
        assert r["values"] == sorted(set(np.unique(ref).tolist()) - {0})
        for v, counts in zip(r["values"], r["counts"]):
            m = coco_mask.decode({"size": [r["height"], r["width"]], "counts": counts.encode()})
            assert np.array_equal(m.astype(bool), ref == v)


def test_parts_of_an_older_version_read_with_nulls(tmp_path):
    """Parts written before scores and image ids existed still read (the new columns null), next to new parts."""
    import pyarrow as pa

    from ovdiff_ray.label.encode import PART_SCHEMA
    from ovdiff_ray.label.parts import read_parts, write_part

    out = Location(str(tmp_path))
    old = pa.schema([f for f in PART_SCHEMA if f.name not in ("score", "inst_score", "image_id")])
    row = dict(path="a.png", size=3, status="ok", error="", width=2, height=1, values=[1], names=["x"],
               counts=["02"], area=[2], bbox=[[0.0, 0.0, 2.0, 1.0]], ls_rle=[], seconds=0.1, worker="w")
    buf = io.BytesIO()
    pq.write_table(pa.Table.from_pylist([row], schema=old), buf)
    out.write_bytes("parts/20260101-000000.parquet", buf.getvalue())
    write_part(out, "parts/20260102-000000.parquet",
               pa.Table.from_pylist([{**row, "path": "b.png", "score": [0.5], "inst_score": [[0.5]], "image_id": 7}],
                                    schema=PART_SCHEMA))
    t, keys = read_parts(out)
    got = {r["path"]: (r["score"], r["image_id"]) for r in t.to_pylist()}
    assert len(keys) == 2 and got == {"a.png": (None, None), "b.png": ([0.5], 7)}
