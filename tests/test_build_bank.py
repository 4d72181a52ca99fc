"""build_bank on a real local Ray: local folder and moto S3, resume, extend, failures, bad input."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from ovdiff_ray.build_bank import main as build_main
from ovdiff_ray.store import Location, load_bank, read_manifest
from ovdiff_ray.store.inspect import main as inspect_main

ROOT = Path(__file__).resolve().parents[1]
TOY = str(ROOT / "bank" / "vocab" / "toy.tsv")
TOY_NAMES = [l.split("\t")[0] for l in (ROOT / "bank" / "vocab" / "toy.tsv").read_text().splitlines()[1:]]


def vocab_file(tmp_path: Path, names: list[str], kinds: list[str] | None = None) -> str:
    kinds = kinds or ["thing"] * len(names)
    p = tmp_path / f"v{len(names)}.tsv"
    p.write_text("name\tkind\n" + "".join(f"{n}\t{k}\n" for n, k in zip(names, kinds)))
    return str(p)


def shard_keys(uri: str) -> list[str]:
    return Location(uri).list("shards")


def test_toy_bank_local_rebuild_and_extend(ray_local, tmp_path, capsys):
    out = str(tmp_path / "bank")
    assert build_main(["--vocab", TOY, "--recipe", "toy", "--out", out, "--workers", "2"]) == 0
    summary = capsys.readouterr().out.strip().splitlines()[-1]
    assert summary.startswith("summary: built 10, skipped 0, failed 0") and summary.endswith(f"bank {out} v1")
    bank = load_bank(out)
    assert bank.names == TOY_NAMES and bank.version == 1  # vocabulary order, whichever worker finished first
    assert len(shard_keys(out)) == 10
    # rebuilding the same vocabulary commits nothing
    assert build_main(["--vocab", TOY, "--recipe", "toy", "--out", out]) == 0
    text = capsys.readouterr().out
    assert "nothing to build: committed nothing" in text and "summary: built 0, skipped 10" in text
    assert read_manifest(Location(out))["version"] == 1
    # an extended vocabulary adds only the new classes, reusing the old shards
    before = set(shard_keys(out))
    ext = vocab_file(tmp_path, TOY_NAMES + ["purple ring", "orange dots"],
                     [bank.kinds[bank.index(n)] for n in TOY_NAMES] + ["thing", "stuff"])
    assert build_main(["--vocab", ext, "--recipe", "toy", "--out", out]) == 0
    assert "summary: built 2, skipped 10, failed 0" in capsys.readouterr().out
    m = read_manifest(Location(out))
    assert m["version"] == 2 and [c["name"] for c in m["classes"]][-2:] == ["purple ring", "orange dots"]
    assert {c["shard"] for c in m["classes"][:10]} == before and len(shard_keys(out)) == 12
    assert m["classes"][-1]["kind"] == "stuff" and m["vocab_sha256"] and m["recipe"]["name"] == "toy"
    # inspect sees the 12 classes and verifies every shard
    assert inspect_main(["inspect", out, "--json", "--verify"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["num_classes"] == 12 and info["version"] == 2 and info["verified"]


def test_toy_bank_on_s3(ray_local, s3, capsys):
    out = f"{s3}/banks/toy"
    assert build_main(["--vocab", TOY, "--recipe", "toy", "--out", out]) == 0
    assert "summary: built 10, skipped 0, failed 0" in capsys.readouterr().out
    bank = load_bank(out)
    assert sorted(bank.names) == sorted(TOY_NAMES)
    assert len(shard_keys(out)) == 10 and Location(out).exists("manifests/latest")
    assert build_main(["--vocab", TOY, "--recipe", "toy", "--out", out]) == 0
    assert "nothing to build" in capsys.readouterr().out


def test_undrawable_class_fails_at_once_then_reported(ray_local, tmp_path, capsys):
    """A name the generator cannot draw is an error no retry fixes: one attempt (not `--retries` + 1), reported,
    and the other classes build. (Retries of transient failures: tests/test_build_faults.py.)"""
    out = str(tmp_path / "bank")
    voc = vocab_file(tmp_path, ["red circle", "red blob", "blue star"])
    rc = build_main(["--vocab", voc, "--recipe", "toy", "--out", out, "--retries", "2"])
    cap = capsys.readouterr()
    assert rc == 1
    assert "summary: built 2, skipped 0, failed 1" in cap.out
    assert "failed: red blob: ToyNameError" in cap.err and "unknown shape or texture 'blob'" in cap.err
    assert "(after 1 attempt)" in cap.err
    m = read_manifest(Location(out))
    assert sorted(c["name"] for c in m["classes"]) == ["blue star", "red circle"]
    assert m["failed"][0]["name"] == "red blob" and m["failed"][0]["attempts"] == 1
    # the next run retries only the failed class
    rc = build_main(["--vocab", voc, "--recipe", "toy", "--out", out, "--retries", "0"])
    assert rc == 1 and "summary: built 0, skipped 2, failed 1" in capsys.readouterr().out


def test_bad_vocab_or_recipe_fails_before_work(tmp_path, capsys):
    out = tmp_path / "bank"
    bad = tmp_path / "bad.tsv"
    bad.write_text("name\tkind\nred circle\tthing\nRed Circle\tthing\n")
    assert build_main(["--vocab", str(bad), "--recipe", "toy", "--out", str(out)]) == 2
    assert "bad.tsv:3: duplicate class 'Red Circle'" in capsys.readouterr().err
    assert build_main(["--vocab", TOY, "--recipe", "nope", "--out", str(out)]) == 2
    assert "unknown recipe 'nope'" in capsys.readouterr().err
    r = tmp_path / "r.yaml"
    r.write_text((ROOT / "bank" / "recipes" / "toy.yaml").read_text() + "\nextra_knob: 1\n")
    assert build_main(["--vocab", TOY, "--recipe", str(r), "--out", str(out)]) == 2
    assert "unknown key extra_knob" in capsys.readouterr().err
    assert not out.exists()


def test_recipe_change_refused_without_new_bank(ray_local, tmp_path, capsys):
    out = str(tmp_path / "bank")
    voc = vocab_file(tmp_path, ["red circle"])
    assert build_main(["--vocab", voc, "--recipe", "toy", "--out", out]) == 0
    r = tmp_path / "toy2.yaml"
    r.write_text((ROOT / "bank" / "recipes" / "toy.yaml").read_text().replace("parts: 8", "parts: 4"))
    capsys.readouterr()
    assert build_main(["--vocab", voc, "--recipe", str(r), "--out", out]) == 2
    assert "a bank never mixes recipes" in capsys.readouterr().err
    assert read_manifest(Location(out))["version"] == 1
    assert build_main(["--vocab", voc, "--recipe", str(r), "--out", out, "--new-bank"]) == 0
    m = read_manifest(Location(out))
    assert m["version"] == 2 and m["recipe"]["prototypes"]["parts"] == 4 and len(m["classes"]) == 1


def test_help_mentions_every_flag(capsys):
    with pytest.raises(SystemExit) as e:
        build_main(["--help"])
    assert e.value.code == 0
    text = capsys.readouterr().out
    for flag in ("--vocab", "--recipe", "--out", "--workers", "--gpus-per-worker", "--cpus-per-worker", "--address",
                 "--bank-id", "--max-failures", "--commit-every", "--new-bank", "--rebuild", "ray job submit"):
        assert flag in text


def test_ctrl_c_stops_with_a_committed_version(tmp_path):
    """SIGINT to a running `python -m ovdiff_ray.build_bank` (its own local Ray): exit 130, what was built is committed."""
    import os
    import signal
    import subprocess
    import sys
    import time

    names = [f"{c} {s}" for s in ("circle", "square", "triangle") for c in ("red", "orange", "yellow", "green", "cyan", "blue")]
    voc = vocab_file(tmp_path, names)
    out = tmp_path / "bank"
    env = {**os.environ, "RAY_DATA_DISABLE_PROGRESS_BARS": "1"}
    p = subprocess.Popen([sys.executable, "-m", "ovdiff_ray.build_bank", "--vocab", voc, "--recipe", "toy", "--out",
                          str(out), "--commit-every", "2", "--workers", "1"], stdout=subprocess.PIPE,
                         stderr=subprocess.STDOUT, text=True, env=env)
    t0 = time.time()
    while not (out / "manifests" / "latest").exists() and time.time() - t0 < 180 and p.poll() is None:
        time.sleep(0.2)
    p.send_signal(signal.SIGINT)
    text, _ = p.communicate(timeout=180)
    assert p.returncode == 130, text[-2000:]
    summary = [l for l in text.splitlines() if l.startswith("summary:")][-1]
    assert summary.endswith("(interrupted)")
    built = int(summary.split("built ")[1].split(",")[0])
    m = read_manifest(Location(str(out)))
    assert 2 <= len(m["classes"]) == built < len(names)
    assert len(load_bank(str(out)).names) == built
    # the command's own lines only: Ray's start-up notes and Ray Data's INFO lines stay in Ray's log folder
    for noise in ("Token authentication is enabled", "Progress bars disabled", "Starting execution of Dataset",
                  "Execution plan of Dataset", " INFO "):
        assert noise not in text, noise


def test_bank_from_before_a_recipe_key_extends_and_a_changed_value_refuses(ray_local, tmp_path, capsys):
    """A manifest written before a key existed (here: issue 11's `segmentation.regions*`) reads that key as its
    default; the recipe with the same default extends the bank, one with another value does not."""
    from ovdiff_ray.store.shards import commit_manifest

    out = str(tmp_path / "bank")
    r = tmp_path / "plain.yaml"
    toy_lines = (ROOT / "bank" / "recipes" / "toy.yaml").read_text().splitlines()
    start = next(i for i, line in enumerate(toy_lines) if line.strip().startswith("regions:"))
    end = next(i for i, line in enumerate(toy_lines) if line.strip().startswith("min_size:"))
    r.write_text("\n".join(toy_lines[:start] + toy_lines[end + 1:]) + "\n")  # toy without its regions: the defaults
    assert build_main(["--vocab", vocab_file(tmp_path, ["red circle"]), "--recipe", str(r), "--out", out]) == 0
    old = read_manifest(Location(out))
    for k in ("regions", "regions_mode", "regions_stage", "superpixels", "sam"):
        del old["recipe"]["segmentation"][k]  # as an older package wrote it
    commit_manifest(Location(out), {**old, "version": 2})
    capsys.readouterr()
    voc2 = vocab_file(tmp_path, ["red circle", "blue star"])
    assert build_main(["--vocab", voc2, "--recipe", str(r), "--out", out]) == 0
    assert "summary: built 1, skipped 1, failed 0" in capsys.readouterr().out
    m = read_manifest(Location(out))
    assert m["version"] == 3 and [c["name"] for c in m["classes"]] == ["red circle", "blue star"]
    assert m["recipe"]["segmentation"]["regions"] == "none"  # written in full from now on
    assert build_main(["--vocab", voc2, "--recipe", "toy", "--out", out]) == 2  # regions: superpixels differs
    assert "a bank never mixes recipes" in capsys.readouterr().err
    assert read_manifest(Location(out))["version"] == 3
