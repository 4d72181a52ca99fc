"""Fixing a bank (issue 26): rebuild in place, remove (tombstone), rename, alias, prompt-change detection, diff, and
concurrent commits (ids unique, a class once) on a local folder and on moto S3. Label values are manifest positions
and must never move; every test checks that nothing but the edited class changed."""
from __future__ import annotations

import json
import shlex
import shutil
import threading
from pathlib import Path

import numpy as np
import pytest

from ovdiff_ray.build_bank import BuildState
from ovdiff_ray.build_bank import main as build_main
from ovdiff_ray.models import toy
from ovdiff_ray.recipe import load_recipe
from ovdiff_ray.store import Location, load_bank, read_manifest
from ovdiff_ray.store.edits import diff, merge_built
from ovdiff_ray.store.inspect import main as bank_main
from ovdiff_ray.store.schema import SCHEMA_TOMBSTONES, SCHEMA_VERSION
from ovdiff_ray.store.shards import commit_manifest, new_manifest
from ovdiff_ray.vocab import from_names


def copy_bank(src: str, tmp_path: Path) -> str:
    dst = tmp_path / "bank"
    shutil.copytree(src, dst)
    return str(dst)


def files(uri: str) -> list[str]:
    return sorted(str(p.relative_to(uri)) for p in Path(uri).rglob("*") if p.is_file())


def same_except(a: list[dict], b: list[dict], changed: set[int]) -> None:
    """Manifest entries equal at every position but `changed` (label values = positions never move)."""
    assert len(a) == len(b)
    for i, (x, y) in enumerate(zip(a, b)):
        if i not in changed:
            assert x == y, f"position {i} changed: {x['name']}"


def scenes(names, kinds, n, seed):
    rng = np.random.default_rng(seed)
    return [toy.make_scene(names, kinds, np.random.default_rng(rng.integers(2 ** 63)), 96) for _ in range(n)]


# -- remove / rename / alias (no build) -----------------------------------------------------------------------
def test_remove_tombstones_a_class_and_keeps_every_label_value(toy_bank, tmp_path, capsys):
    from ovdiff_ray.segment import Segmenter

    uri = copy_bank(toy_bank, tmp_path)
    m1 = read_manifest(Location(uri))
    names = [c["name"] for c in m1["classes"]]
    gone = names.index("green star")
    import argparse

    from ovdiff_ray.label.plan import resolve_job
    from ovdiff_ray.store.fs import StorageConfig

    def plan_labels(out: Path):
        args = argparse.Namespace(bank=uri, classes=None, bank_version=None, out=str(out), pamr=False,
                                  min_confidence=None)
        return resolve_job(args, Location(str(out)), StorageConfig.from_env())

    started = tmp_path / "started"  # a labelling job started before the removal
    started.mkdir()
    (started / "job.json").write_text(json.dumps(plan_labels(started)[0]))
    assert bank_main(["remove", uri, "Green Star"]) == 0
    out = capsys.readouterr().out
    assert "removed 1 class (green star)" in out and f"v{m1['version'] + 1}" in out
    m2 = read_manifest(Location(uri))
    assert m2["version"] == m1["version"] + 1 and m2["schema"] == SCHEMA_TOMBSTONES  # older readers refuse it
    same_except(m1["classes"], m2["classes"], {gone})
    t = m2["classes"][gone]
    assert t["name"] == "green star" and t["removed"] == m2["version"] and t["shard"] == "" and t["id"] == \
        m1["classes"][gone]["id"]
    # the bank loads with the tombstone at its place: never resolved, never predicted
    bank = load_bank(uri)
    assert bank.names == names and bank.removed == {gone} and gone not in bank.resolve(None)
    with pytest.raises(KeyError, match="green star"):
        bank.resolve(["green star"])
    seg = Segmenter.from_bank(bank, "cpu")
    kinds = [c["kind"] for c in m1["classes"]]
    seen = set()
    for img, lab in scenes(names, kinds, 6, 2611):
        labels = seg.segment(img).labels
        seen |= set(np.unique(labels).tolist())
        assert gone + 1 not in labels  # even where the scene shows a green star
    assert seen - {0}, "the other classes are still predicted"
    # label outputs: the classes of a new labelling job skip the removed value and keep every other one; a job
    # started before keeps the version it started with
    job, classes, _, _ = plan_labels(tmp_path / "labels")
    assert job["bank_version"] == m2["version"] and classes == {i + 1: n for i, n in enumerate(names) if i != gone}
    from ovdiff_ray.label.labelstudio import label_config

    assert "green star" not in label_config(list(classes.values()))  # labelstudio.xml, classes.json, COCO: p.classes
    job, old_classes, _, _ = plan_labels(started)
    assert job["bank_version"] == m1["version"] and old_classes == {i + 1: n for i, n in enumerate(names)}
    # inspect verifies the live shards and lists the tombstone apart
    assert bank_main(["inspect", uri, "--json", "--verify"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["verified"] and info["num_classes"] == len(names) - 1 and info["removed"] == ["green star"]
    # removing it again, or an unknown class: an error naming it, nothing written
    before = files(uri)
    assert bank_main(["remove", uri, "green star"]) == 1
    assert "remove 'green star': the class was removed in v" in capsys.readouterr().err
    assert bank_main(["remove", uri, "red circle", "purple blob"]) == 1
    err = capsys.readouterr().err
    assert "remove 'purple blob': no such class in the bank" in err and "nothing was written" in err
    assert files(uri) == before
    # a plain build of a vocabulary that still lists it skips it and says so; nothing is committed
    voc = tmp_path / "v.tsv"
    voc.write_text("name\tkind\n" + "".join(f"{n}\t{k}\n" for n, k in zip(names, kinds)))
    assert build_main(["--vocab", str(voc), "--recipe", "toy", "--out", uri]) == 0
    cap = capsys.readouterr()
    assert f"class 'green star' was removed in v{m2['version']}: skipped (its label value {gone + 1}" in cap.err
    assert files(uri) == before


def test_rename_and_alias_keep_label_value_and_shard(toy_bank, tmp_path, capsys):
    uri = copy_bank(toy_bank, tmp_path)
    m1 = read_manifest(Location(uri))
    names = [c["name"] for c in m1["classes"]]
    i = names.index("yellow ring")
    assert bank_main(["rename", uri, "yellow ring", "golden ring"]) == 0
    assert f"renamed 'yellow ring' to 'golden ring' (label value {i + 1}, shard unchanged)" in capsys.readouterr().out
    assert bank_main(["alias", uri, "golden ring", "halo"]) == 0
    assert "'halo' is now an alias of 'golden ring'" in capsys.readouterr().out
    m3 = read_manifest(Location(uri))
    assert m3["version"] == m1["version"] + 2 and m3["schema"] == SCHEMA_VERSION
    same_except(m1["classes"], m3["classes"], {i})
    e0, e = m1["classes"][i], m3["classes"][i]
    assert (e["name"], e["aliases"], e["prompt"]) == ("golden ring", ["halo"], "yellow ring")
    assert (e["shard"], e["sha256"], e["id"]) == (e0["shard"], e0["sha256"], e0["id"])
    bank = load_bank(uri)
    assert bank.resolve(["halo"]) == bank.resolve(["Golden Ring"]) == [i]
    assert bank.prompts[i] == "yellow ring"  # the words its shard (and text row) were drawn from
    with pytest.raises(KeyError):
        bank.resolve(["yellow ring"])
    # a name or alias already taken, an unknown class: errors naming it, nothing written
    before = files(uri)
    assert bank_main(["rename", uri, "red circle", "HALO"]) == 1
    assert "rename to 'HALO': already the name or an alias of a class ('golden ring')" in capsys.readouterr().err
    assert bank_main(["alias", uri, "no such", "x"]) == 1
    assert "alias 'no such': no such class in the bank" in capsys.readouterr().err
    assert files(uri) == before
    # the diff lists the rename and the alias, nothing else
    assert bank_main(["diff", uri, str(m1["version"]), str(m3["version"]), "--json"]) == 0
    d = json.loads(capsys.readouterr().out)
    assert d["renamed"] == [{"value": i + 1, "from": "yellow ring", "to": "golden ring"}]
    assert d["aliases_added"] == [{"value": i + 1, "name": "golden ring", "alias": "halo"}]
    assert not d["rebuilt"] and not d["removed"] and not d["added"] and not d["prompt_changed"]


# -- rebuild and prompt-change detection (build_bank on the local Ray) ---------------------------------------
def test_changed_prompt_is_named_then_rebuilt_in_place(ray_local, tmp_path, capsys):
    out = str(tmp_path / "bank")
    wrong, fixed = tmp_path / "wrong.tsv", tmp_path / "fixed.tsv"
    rows = [("red circle", "thing", ""), ("blue star", "thing", "green triangle"), ("green triangle", "thing", ""),
            ("orange waves", "stuff", "")]
    wrong.write_text("name\tkind\tprompt\n" + "".join(f"{n}\t{k}\t{p}\n" for n, k, p in rows))
    fixed.write_text("name\tkind\tprompt\n" + "".join(f"{n}\t{k}\t\n" for n, k, _ in rows))
    assert build_main(["--vocab", str(wrong), "--recipe", "toy", "--out", out]) == 0
    m1 = read_manifest(Location(out))
    assert m1["classes"][1]["prompt"] == "green triangle"  # the manifest records the words a class was drawn from
    capsys.readouterr()
    # the corrected vocabulary without --rebuild: named with the command that fixes it, nothing committed
    before = files(out)
    assert build_main(["--vocab", str(fixed), "--recipe", "toy", "--out", out]) == 0
    cap = capsys.readouterr()
    assert "class 'blue star' changed (prompt 'green triangle' in the bank, 'blue star' in the vocabulary): " \
           "not rebuilt" in cap.err
    cmd = f"build_bank --vocab {fixed} --recipe toy --out {out} --rebuild 'blue star'"
    assert cmd in cap.err and "(1 changed, not rebuilt)" in cap.out
    assert files(out) == before
    # --rebuild with a bad name: the error names it, nothing written
    assert build_main(["--vocab", str(fixed), "--recipe", "toy", "--out", out, "--rebuild", "purple blob"]) == 2
    assert "--rebuild 'purple blob': not a class of bank" in capsys.readouterr().err
    other = tmp_path / "other.tsv"
    other.write_text("name\tkind\nred circle\tthing\n")
    assert build_main(["--vocab", str(other), "--recipe", "toy", "--out", out, "--rebuild", "blue star"]) == 2
    assert f"--rebuild 'blue star': not in --vocab {other}" in capsys.readouterr().err
    assert files(out) == before
    # the printed command: one new version, the class in place, every other entry (shard, sha256, id) as it was
    assert build_main(shlex.split(cmd)[1:]) == 0
    assert "summary: built 1 (1 rebuilt in place), skipped 3" in capsys.readouterr().out
    m2 = read_manifest(Location(out))
    assert m2["version"] == m1["version"] + 1
    same_except(m1["classes"], m2["classes"], {1})
    e0, e = m1["classes"][1], m2["classes"][1]
    assert e["name"] == "blue star" and e["id"] == e0["id"] and "prompt" not in e and e["shard"] != e0["shard"]
    assert load_bank(out).names == [n for n, *_ in rows]
    assert bank_main(["diff", out, str(m1["version"]), str(m2["version"])]) == 0
    text = capsys.readouterr().out
    assert "rebuilt              2  blue star" in text
    assert "prompt changed       2  blue star: 'green triangle' -> '(name)'" in text
    assert text.strip().splitlines()[-1] == f"summary: v{m1['version']} -> v{m2['version']}: 0 added, 1 rebuilt, " \
                                            "0 removed, 0 revived, 0 renamed, 1 prompt changed"
    # the same rebuild again draws the same shard: nothing new is committed
    assert build_main(shlex.split(cmd)[1:]) == 0
    assert read_manifest(Location(out))["version"] == m2["version"]
    # a removed class comes back at its label value with --rebuild
    assert bank_main(["remove", out, "green triangle"]) == 0
    assert build_main(["--vocab", str(fixed), "--recipe", "toy", "--out", out, "--rebuild", "green triangle"]) == 0
    m4 = read_manifest(Location(out))
    assert m4["version"] == m2["version"] + 2 and m4["schema"] == SCHEMA_VERSION
    same_except(m2["classes"], m4["classes"], {2})
    back, was = m4["classes"][2], m2["classes"][2]
    assert [back[k] for k in ("name", "id", "shard", "sha256")] == [was[k] for k in ("name", "id", "shard", "sha256")]
    assert "removed" not in back  # drawn again from the same words: the same shard, at the same label value


# -- concurrent commits ---------------------------------------------------------------------------------------
def fake_entry(name: str, cid: int, tag: str = "") -> dict:
    """A manifest entry as a worker returns it (the commit never reads shards)."""
    return {"name": name, "kind": "thing", "shard": f"shards/{name.replace(' ', '-')}{tag}.parquet",
            "sha256": f"{name}{tag}".ljust(64, "0")[:64], "rows": 1, "id": cid}


@pytest.mark.parametrize("where", ["local", "s3"])
def test_racing_builds_and_rebuilds_commit_each_class_once_with_unique_ids(where, tmp_path, request):
    """Writers that planned against the same version (so they propose the same ids) race the conditional write;
    a rebuild and a remove race with them. Every class lands once, ids never repeat, positions never move."""
    uri = str(tmp_path / "bank") if where == "local" else f"{request.getfixturevalue('s3')}/race"
    loc = Location(uri)
    recipe = load_recipe("toy")
    base = [fake_entry(n, i) for i, n in enumerate(["red circle", "red square", "blue star"])]
    commit_manifest(loc, new_manifest("race", 1, recipe.to_dict(), base))
    batches = [["green star", "yellow ring"], ["yellow ring", "cyan cross"], ["magenta dots", "green star"],
               ["purple ring"], ["orange square", "cyan cross"]]
    barrier = threading.Barrier(len(batches) + 2)
    errors = []

    def writer(names, rebuild=False):
        try:
            m = read_manifest(Location(uri))
            state = BuildState.of(Location(uri), m, from_names(names or ["red square"]))
            if rebuild:  # red square drawn again, in place
                state.pending_entries = [fake_entry("red square", 1, "-v2")]
                state.rebuild_ids = {1}
            else:  # proposed ids as `pending_classes` hands them out from the version it read
                state.pending_entries = [fake_entry(n, len(m["classes"]) + j) for j, n in enumerate(names)]
            barrier.wait()
            state.commit()
        except Exception as e:  # noqa: BLE001
            errors.append(e)

    def remover():
        from ovdiff_ray.store.edits import commit_edit, remove

        try:
            barrier.wait()
            commit_edit(Location(uri), lambda c, v: remove(c, ["blue star"], v), {"removed": ["blue star"]})
        except Exception as e:  # noqa: BLE001
            errors.append(e)

    threads = [threading.Thread(target=writer, args=(b,)) for b in batches]
    threads += [threading.Thread(target=writer, args=([], True)), threading.Thread(target=remover)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert not errors, errors
    m = read_manifest(loc)
    names = [c["name"] for c in m["classes"]]
    expected = {"red circle", "red square", "blue star"} | {n for b in batches for n in b}
    assert sorted(names) == sorted(expected) and len(names) == len(set(names))  # each class exactly once
    ids = [c["id"] for c in m["classes"]]
    assert len(ids) == len(set(ids)) and ids == list(range(len(ids)))  # unique; = position for new classes
    assert names[:3] == ["red circle", "red square", "blue star"]  # positions never move
    assert m["classes"][1]["shard"].endswith("-v2.parquet") and m["classes"][2]["removed"] is not None
    # the versions form one chain: each extends the one before, position by position
    for v in range(2, m["version"] + 1):
        a, b = read_manifest(loc, v - 1), read_manifest(loc, v)
        assert [c["name"] for c in b["classes"][:len(a["classes"])]] == [c["name"] for c in a["classes"]]


def test_merge_re_derives_ids_from_the_manifest_it_extends():
    base = [fake_entry("a", 0), fake_entry("b", 1)]
    winner = merge_built(base, [fake_entry("c", 2)]).classes  # another writer got there first with id 2
    mine = merge_built(winner, [fake_entry("d", 2), fake_entry("c", 3)])  # planned against `base`: id 2 again
    assert [(c["name"], c["id"]) for c in mine.classes] == [("a", 0), ("b", 1), ("c", 2), ("d", 3)]
    assert mine.added == ["d"] and mine.skipped == ["c"]
    d = diff({"version": 1, "classes": base}, {"version": 2, "classes": mine.classes})
    assert d["added"] == [{"value": 3, "name": "c"}, {"value": 4, "name": "d"}] and not d["rebuilt"]
