"""One bank copy per node (store/shared.py), the `latest` pointer naming its manifest, and label_dataset keeping
the version it started with."""
from __future__ import annotations

import contextlib
import io
import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from ovdiff_ray.store import Location, ManifestError, ShardError, commit_manifest, load_bank, read_manifest
from ovdiff_ray.store.shared import cache_root, is_shared, load_shared


@pytest.fixture()
def bank_copy(toy_bank, tmp_path, monkeypatch) -> str:
    monkeypatch.setenv("OVDIFF_BANK_CACHE", str(tmp_path / "cache"))
    root = tmp_path / "bank"
    shutil.copytree(toy_bank, root)
    return str(root)


def test_latest_pointer_names_the_manifest_and_old_pointers_still_read(bank_copy):
    loc = Location(bank_copy)
    m = read_manifest(loc)
    ptr = json.loads(Path(bank_copy, "manifests", "latest").read_text())
    assert ptr == {"version": m["version"], "manifest": f"manifests/v{m['version']:06d}.json"}
    assert Path(bank_copy, ptr["manifest"]).is_file()  # an outside reader needs nothing else
    Path(bank_copy, "manifests", "latest").write_text(json.dumps({"version": m["version"]}))  # written before
    assert read_manifest(loc)["version"] == m["version"]
    commit_manifest(loc, {**m, "version": m["version"] + 1, "classes": m["classes"][:2]})  # moves an old pointer
    assert json.loads(Path(bank_copy, "manifests", "latest").read_text())["manifest"].endswith(
        f"v{m['version'] + 1:06d}.json")
    Path(bank_copy, "manifests", "latest").write_text(json.dumps({"version": 1, "manifest": "manifests/x.json"}))
    with pytest.raises(ManifestError, match="names 'manifests/x.json' for version 1"):
        read_manifest(loc)


@pytest.fixture(params=["in-process", "child-process"])
def builder(request, monkeypatch):
    """Cache entries built in this process (small banks) or in a child process (large ones)."""
    from ovdiff_ray.store import shared

    if request.param == "child-process":
        monkeypatch.setattr(shared, "IN_PROCESS_MAX_BYTES", 0)
    return request.param


def test_shared_bank_equals_the_loaded_one_and_is_mapped_once(bank_copy, builder):
    ref = load_bank(bank_copy)
    a = load_shared(bank_copy)
    assert is_shared(a) and not is_shared(ref)
    assert a.names == ref.names and a.kinds == ref.kinds and a.version == ref.version
    np.testing.assert_array_equal(a.text, ref.text)
    for ex, arr in ref.extractors.items():
        for f in ("vectors", "class_idx", "kind", "level", "offsets"):
            np.testing.assert_array_equal(getattr(a.extractors[ex], f), getattr(arr, f))
        with pytest.raises(ValueError, match="read-only"):
            a.extractors[ex].vectors[0, 0] = 0  # shared read-only
    entries = [p for p in cache_root().rglob("meta.json")]
    assert len(entries) == 1
    stamp = entries[0].stat().st_mtime_ns
    b = load_shared(bank_copy)  # a second process (or replica) maps the same files: nothing is rebuilt
    assert entries[0].stat().st_mtime_ns == stamp and len(list(cache_root().rglob("meta.json"))) == 1
    assert b.extractors[ex].vectors.filename == a.extractors[ex].vectors.filename
    sub = load_shared(bank_copy, classes=["blue star", "red circle"])
    assert sub.names == ["red circle", "blue star"] and len(list(cache_root().rglob("meta.json"))) == 2


def test_a_corrupt_shard_is_never_cached(bank_copy, builder):
    loc = Location(bank_copy)
    m = read_manifest(loc)
    shard = Path(bank_copy, m["classes"][3]["shard"])
    shard.write_bytes(shard.read_bytes()[:-10] + b"0123456789")
    with pytest.raises(ShardError, match="sha256 mismatch"):
        load_shared(bank_copy)
    assert not list(cache_root().rglob("meta.json"))
    assert not [p for p in cache_root().rglob("*") if p.suffix == ".npy"]


def test_label_dataset_keeps_its_bank_version(ray_local, bank_copy, toy_scenes, tmp_path):
    from ovdiff_ray.label import Labeller
    from ovdiff_ray.label import main as label_main

    images, out = tmp_path / "images", tmp_path / "out"
    images.mkdir()
    for i in (0, 1):
        shutil.copy(Path(toy_scenes, "images", f"{i:04d}.png"), images)
    args = ["--images", str(images), "--bank", bank_copy, "--out", str(out), "--format", "coco", "--workers", "1"]
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
        assert label_main(args) == 0
    loc = Location(bank_copy)
    m = read_manifest(loc)
    job = json.loads((out / "job.json").read_text())
    assert job["bank_version"] == m["version"] and job["bank_manifest"] == f"manifests/v{m['version']:06d}.json"
    commit_manifest(loc, {**m, "version": m["version"] + 1, "classes": m["classes"][:2]})  # a newer, smaller bank
    shutil.copy(Path(toy_scenes, "images", "0004.png"), images)
    with contextlib.redirect_stdout(io.StringIO()) as text, contextlib.redirect_stderr(io.StringIO()):
        assert label_main(args) == 0
    assert "summary: labelled 1, skipped 2" in text.getvalue()
    assert json.loads((out / "job.json").read_text()) == job
    doc = json.loads((out / "annotations.json").read_text())
    assert doc["info"]["bank_version"] == m["version"] and len(doc["categories"]) == len(m["classes"])
    new = next(i["id"] for i in doc["images"] if i["file_name"] == "0004.png")
    cats = {a["category_id"] for a in doc["annotations"] if a["image_id"] == new}
    assert cats - {1, 2}, "the new image was labelled with the job's version, not the newer 2-class one"
    lab = Labeller(bank_copy, m["version"], None, str(images))  # what each labelling actor holds: the shared copy
    assert is_shared(lab.seg.bank) and lab.seg.bank.version == m["version"]
