"""Faults that must not end a build, and ones that must end it at once: a class worker whose start meets a storage
error is started again (with backoff) and the build finishes, its records counting the restarts; a worker whose
model cannot be found fails the build on its first start. Also the build report over the records."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from ovdiff_ray import build_bank as bb
from ovdiff_ray.build_report import format_report, report
from ovdiff_ray.store.fs import Location
from ovdiff_ray.store.shards import read_manifest
from ovdiff_ray.worker_start import start_with_retries

VOCAB = "name\tkind\nred circle\tthing\nblue square\tthing\ngreen stripes\tstuff\n"


def _count_start(worker) -> int:
    """Append one line to `<bank>/../starts` (shared by every worker process); returns the starts before it."""
    f = Path(worker.loc.uri.removeprefix("file://")).parent / "starts"
    n = len(f.read_text().splitlines()) if f.exists() else 0
    with open(f, "a") as fh:
        fh.write(f"{worker.node}\n")
    return n


class FlakyStartWorker(bb.ClassWorker):
    """The first two starts (over all its processes) fail as a weights copy from S3 does when the store answers 503."""

    start_backoff_s = 0.2

    def load_models(self):
        if _count_start(self) < 2:
            raise OSError("weights copy from s3://models/tiny: 503 SlowDown (injected)")
        return super().load_models()


class MissingModelWorker(bb.ClassWorker):
    start_backoff_s = 0.2

    def load_models(self):
        from ovdiff_ray.models.weights import ModelNotFoundError

        _count_start(self)
        raise ModelNotFoundError("model 's3://models/nope' not found: no such prefix (injected)")


def build(tmp_path, capsys, worker, monkeypatch) -> tuple[int, str, str]:
    monkeypatch.setattr(bb, "ClassWorker", worker)
    (tmp_path / "v.tsv").write_text(VOCAB)
    rc = bb.main(["--vocab", str(tmp_path / "v.tsv"), "--recipe", "toy", "--out", str(tmp_path / "bank"),
                  "--workers", "1"])
    out, err = capsys.readouterr()
    return rc, out, err


def test_worker_start_retried_after_storage_errors(ray_local, tmp_path, capsys, monkeypatch):
    rc, out, err = build(tmp_path, capsys, FlakyStartWorker, monkeypatch)
    assert rc == 0, err[-3000:]
    assert "summary: built 3, skipped 0, failed 0," in out
    assert len((tmp_path / "starts").read_text().splitlines()) == 3  # two failed starts, then one that loaded
    m = read_manifest(Location(str(tmp_path / "bank")))
    assert sorted(c["name"] for c in m["classes"]) == ["blue square", "green stripes", "red circle"]
    recs = [c["build"] for c in m["classes"]]
    assert all(r["worker_start_attempts"] == 3 and r["attempts"] == 1 and r["runs"] == 1 for r in recs)
    assert all(r["device"] == "cpu" and r["gpus"] == 0 and r["node"] for r in recs)
    for r in recs:  # the record's stages are what sample_class timed, plus the shard write
        assert {"generate", "features", "prototypes", "write"} <= set(r["stages"])
        assert sum(r["stages"].values()) == pytest.approx(r["seconds"], abs=0.02 + 0.05 * r["seconds"])
    rep = report(m)
    assert rep.worker_restarts == 2 and rep.recorded == 3 and rep.attempts == 3


def test_worker_start_with_a_missing_model_fails_at_once(ray_local, tmp_path, capsys, monkeypatch):
    rc, out, err = build(tmp_path, capsys, MissingModelWorker, monkeypatch)
    assert rc == 2
    assert "(stopped: a failure no retry can fix)" in out and "summary: built 0," in out
    assert "ModelNotFoundError: model 's3://models/nope' not found" in err
    assert len((tmp_path / "starts").read_text().splitlines()) == 1  # never started again
    assert read_manifest(Location(str(tmp_path / "bank"))) is None  # nothing committed


def test_start_with_retries_policy():
    waits, calls = [], []

    def flaky():
        calls.append(1)
        if len(calls) < 3:
            raise ConnectionError("connection reset by peer")
        return "models"

    s = start_with_retries(flaky, "w", lambda e: False, attempts=5, base_s=1.0, sleep=waits.append)
    assert (s.value, s.attempts, len(s.errors)) == ("models", 3, 2)
    assert 0.8 <= waits[0] <= 1.2 and 1.6 <= waits[1] <= 2.4  # exponential backoff, jittered
    with pytest.raises(ConnectionError):  # the last transient error is raised as it is
        start_with_retries(lambda: (_ for _ in ()).throw(ConnectionError("down")), "w", lambda e: False,
                           attempts=2, base_s=0.0, sleep=lambda s: None)
    calls.clear()

    def bad():
        calls.append(1)
        raise ValueError("not a storage problem")

    with pytest.raises(ValueError):  # neither transient nor permanent: not retried
        start_with_retries(bad, "w", lambda e: False, attempts=5, base_s=0.0, sleep=lambda s: None)
    assert len(calls) == 1


def manifest_with_records() -> dict:
    def rec(stages, worker, attempts=1, gpus=1.0, starts=1):
        ws = sum(stages.values())
        return {"stages": stages, "seconds": ws, "worker_seconds": ws * attempts, "attempts": attempts,
                "node": "10.0.0.1" if worker == "a" else "10.0.0.2", "worker": worker, "device": "cuda:0",
                "gpus": gpus, "worker_start_attempts": starts}

    return {"bank_id": "b", "version": 3, "failed": [{"name": "x", "error": "e", "attempts": 3}], "classes": [
        {"name": "cat", "build": rec({"generate": 100.0, "masks": 20.0, "write": 1.0}, "a", starts=2)},
        {"name": "dog", "build": rec({"generate": 150.0, "masks": 30.0, "write": 2.0}, "a", attempts=2, starts=2)},
        {"name": "owl", "build": rec({"generate": 60.0, "masks": 10.0, "write": 1.0}, "b", gpus=2.0)},
        {"name": "old"},  # built before records existed
    ]}


def test_build_report_sums_records_by_hand():
    r = report(manifest_with_records(), top=2, price_per_hour=1.5)
    assert r.classes == 4 and r.recorded == 3 and r.failed == 1
    assert r.stages == {"generate": 310.0, "masks": 60.0, "write": 4.0}
    assert [c["name"] for c in r.slowest] == ["dog", "cat"] and r.slowest[0]["seconds"] == 364.0
    assert (r.attempts, r.retried, r.worker_restarts) == (4, 1, 1)  # worker a restarted once (counted once)
    # device seconds: cat 121 x 1 GPU + dog 364 x 1 + owl 71 x 2 GPUs = 627 s
    assert r.total_device_hours == pytest.approx(627 / 3600)
    assert r.to_dict()["cost"] == pytest.approx(round(627 / 3600 * 1.5, 4))
    assert r.nodes == {"10.0.0.1": 2, "10.0.0.2": 1}
    text = format_report(r)
    assert "generate" in text and "310.0" in text and "82.9%" in text  # 310 / 374
    assert "at $1.5/device-hour: $0.26" in text and "dog" in text


def test_bank_inspect_report_cli(tmp_path, capsys):
    from ovdiff_ray.store.inspect import main as inspect_main
    from ovdiff_ray.store.shards import commit_manifest, new_manifest

    loc = Location(str(tmp_path / "bank"))
    m = manifest_with_records()
    for c in m["classes"]:  # the fields a manifest entry needs besides the record
        c.update(kind="thing", shard=f"shards/{c['name']}.parquet", rows=1, sha256="0" * 64, bytes=1)
    commit_manifest(loc, new_manifest("b", 3, {"name": "toy"}, m["classes"], failed=m["failed"]))
    assert inspect_main(["inspect", str(tmp_path / "bank"), "--report", "--price-per-hour", "2", "--json"]) == 0
    rep = json.loads(capsys.readouterr().out)["report"]
    assert rep["stages"]["generate"] == 310.0 and rep["cost"] == pytest.approx(round(627 / 3600 * 2, 4))
    assert inspect_main(["inspect", str(tmp_path / "bank"), "--report", "--top", "1"]) == 0
    out = capsys.readouterr().out
    assert "build report: bank b v3: 4 classes, 3 with a build record" in out and "slowest 1:" in out
    assert "give --price-per-hour for a cost" in out
    with pytest.raises(SystemExit):
        inspect_main(["inspect", str(tmp_path / "bank"), "--price-per-hour", "2"])
    assert "--price-per-hour needs --report" in capsys.readouterr().err


def test_a_name_the_generator_cannot_draw_fails_at_once_and_the_others_build(tmp_path):
    """ClassWorker itself (no Ray): `purple banana` is no toy word: one attempt, not `retries + 1`; the next class
    builds."""
    import numpy as np

    from ovdiff_ray.recipe import load_recipe

    from ovdiff_ray.build_report import mark_run

    w = bb.ClassWorker(load_recipe("toy").to_dict(), str(tmp_path / "bank"), None, retries=2)
    mark_run(Location(str(tmp_path / "bank")), "red circle", "lost-node:77", 1)  # a worker lost mid-class before
    rows = w({"class_id": np.array([0, 1]), "name": np.array(["purple banana", "red circle"]),
              "kind": np.array(["thing", "thing"])})
    assert rows["status"] == ["failed", "ok"] and rows["attempts"] == [1, 1]
    assert rows["error"][0].startswith("ToyNameError: toy class name 'purple banana'") and \
        "(after 1 attempt)" in rows["error"][0]
    rec = json.loads(rows["entry"][1])["build"]
    assert rec["attempts"] == 1 and rec["runs"] == 2  # this worker's attempt and the lost worker's run
    assert report({"bank_id": "b", "version": 1, "classes": [{"name": "red circle", "build": rec}]}).retried == 1


def test_job_records_round_trip_and_unfinished(tmp_path):
    from ovdiff_ray.serve import job_records as jr

    loc = Location(str(tmp_path / "bank"))
    jr.save(loc, {"job": "a" * 16, "state": "running", "created": 2.0}, [{"name": "cyan ring", "kind": "thing"}])
    jr.save(loc, {"job": "b" * 16, "state": "done", "created": 1.0}, [])
    jr.save(loc, {"job": "c" * 16, "state": "queued", "created": 1.0}, [{"name": "x"}])
    assert jr.load(loc, "a" * 16)["resume"] == {"classes": [{"name": "cyan ring", "kind": "thing"}]}
    assert "resume" not in jr.public(jr.load(loc, "a" * 16)) and jr.load(loc, "d" * 16) is None
    assert [r["job"] for r in jr.unfinished(loc)] == ["c" * 16, "a" * 16]  # oldest first, done ones left
    with pytest.raises(ValueError, match="not a job id"):
        jr.load(loc, "../../etc/passwd")
    assert sorted(p.name for p in (tmp_path / "bank" / "jobs").iterdir()) == [f"{c * 16}.json" for c in "abc"]
