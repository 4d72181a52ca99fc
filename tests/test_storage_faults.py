"""Storage faults during a bank build and a labelling run: moto's S3 behind a proxy that answers 503 SlowDown to
chosen writes (tests/faults.py). The build retries with backoff, then fails naming the storage with nothing
half-committed, and a rerun resumes; the labelling job stops naming the storage, and a rerun resumes from the parts
it kept. (The service side, serving through a storage outage, is in test_serve_faults.py.)"""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import boto3
import pytest

from .faults import FaultProxy

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture()
def proxy(s3, moto_server, monkeypatch):
    """The fault proxy in front of the test's moto bucket; the driver and its Ray workers go through it."""
    p = FaultProxy(moto_server)
    monkeypatch.setenv("AWS_ENDPOINT_URL", p.url)
    monkeypatch.setenv("OVDIFF_STORAGE_BACKOFF_S", "0.2")  # the driver's commit retries (workers keep 0.5 s)
    yield p, s3
    p.close()


def _keys(moto_server: str, uri: str, sub: str) -> list[str]:
    bucket, _, prefix = uri.removeprefix("s3://").partition("/")
    c = boto3.client("s3", endpoint_url=moto_server, region_name="us-east-1")
    pages = c.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=f"{prefix}/{sub}".lstrip("/"))
    return sorted(o["Key"] for page in pages for o in page.get("Contents", []))


def test_build_retries_then_fails_naming_storage_and_resumes(proxy, moto_server, ray_local, toy_bank, tmp_path,
                                                           capsys):
    from ovdiff_ray.build_bank import main as build_main
    from ovdiff_ray.store.fs import Location
    from ovdiff_ray.store.shards import commit_manifest, read_manifest

    fp, bucket = proxy
    # v1 on S3: the toy bank's first 8 classes (its shards uploaded as they are)
    local = tmp_path / "bank"
    shutil.copytree(toy_bank, local)
    m = read_manifest(Location(str(local)))
    shutil.rmtree(local / "manifests")
    commit_manifest(Location(str(local)), {**m, "version": 1, "classes": m["classes"][:8]})
    for c in m["classes"][8:]:  # the two classes v1 lacks: their shards are written by the build below
        (local / c["shard"]).unlink()
    uri = f"{bucket}/bank"
    c = boto3.client("s3", endpoint_url=moto_server, region_name="us-east-1")
    for f in local.rglob("*"):
        if f.is_file() and not f.name.startswith("."):
            c.put_object(Bucket=bucket.removeprefix("s3://"), Key=f"bank/{f.relative_to(local)}",
                         Body=f.read_bytes())
    manifests_before = _keys(moto_server, uri, "manifests/")
    args = ["--vocab", str(ROOT / "bank" / "vocab" / "toy.tsv"), "--recipe", "toy", "--out", uri, "--workers", "1"]

    # every manifest write answers 503, and the first two shard writes too (a burst the retries absorb): the two
    # missing classes are built, their commit is retried with backoff, then refused
    burst = [2]

    def rule(method, path):
        if method not in ("PUT", "POST"):
            return False
        if "/shards/" in path and burst[0] > 0:
            burst[0] -= 1
            return True
        return "/manifests/" in path

    fp.rule = rule
    capsys.readouterr()
    assert build_main(args) == 3
    out, err = capsys.readouterr()
    assert f"{uri}: commit of v2: storage unavailable after 4 attempts" in err, err
    assert "nothing past v1 was committed" in err and "rerun to resume" in err
    assert "failed 0" in out  # the shard burst was retried away
    print(f"build: {fp.failed} requests answered 503; {err.strip().splitlines()[-1][:240]}")
    assert burst == [0] and fp.failed >= 2 + 4  # the burst, then at least one request per commit attempt
    after = read_manifest(Location(uri))
    assert after["version"] == 1 and [x["name"] for x in after["classes"]] == [x["name"] for x in m["classes"][:8]]
    assert _keys(moto_server, uri, "manifests/") == manifests_before  # nothing half-committed
    shards = _keys(moto_server, uri, "shards/")

    fp.heal()  # the storage is back: the rerun resumes and commits
    assert build_main(args) == 0
    done = read_manifest(Location(uri))
    names = [x["name"] for x in done["classes"]]
    assert done["version"] == 2 and names == [x["name"] for x in m["classes"]] and len(set(names)) == len(names)
    assert _keys(moto_server, uri, "shards/") == shards  # the retried classes' shards were reused, not rewritten


def test_labelling_stops_naming_storage_and_resumes(proxy, ray_local, toy_bank, toy_scenes, capsys):
    from ovdiff_ray.label import main as label_main
    from ovdiff_ray.store.fs import Location

    fp, bucket = proxy
    out = f"{bucket}/labels"
    written = [0]

    def rule(method, path):  # the first part is stored, then the storage fails every further part
        if method in ("PUT", "POST") and "/parts/" in path:
            written[0] += 1
            return written[0] > 1
        return False

    fp.rule = rule
    args = ["--images", str(Path(toy_scenes) / "images"), "--bank", toy_bank, "--out", out, "--format", "coco",
            "--batch-size", "4", "--workers", "1"]
    capsys.readouterr()
    assert label_main(args) == 1
    text, err = capsys.readouterr()
    assert f"{out}: storage unavailable" in err and "rerun to resume" in err, err
    print("labelling stopped:", [line for line in err.splitlines() if "storage" in line][0][:200])
    fp.heal()
    capsys.readouterr()
    assert label_main(args) == 0
    text, _ = capsys.readouterr()
    summary = [line for line in text.splitlines() if line.startswith("summary:")][0]
    assert "labelled 8, skipped 4" in summary, summary  # resumed: the stored block is not labelled again
    coco = json.loads(Location(out).read_bytes("annotations.json"))
    assert len(coco["images"]) == 12 and len({i["file_name"] for i in coco["images"]}) == 12
