"""Bank storage on local disk and on a real moto S3 server: round trip, corruption, conflicts, subsets."""
from __future__ import annotations

import io
import json
import threading
from contextlib import redirect_stdout

import numpy as np
import pyarrow.dataset as ds
import pyarrow.parquet as pq
import pytest
import torch

from ovdiff_ray.prototypes import ClassPrototypes, build_protoset
from ovdiff_ray.recipe import load_recipe
from ovdiff_ray.store import (CommitConflict, Location, ManifestError, ShardError, commit_manifest, load_bank,
                              new_manifest, read_manifest, write_shard)
from ovdiff_ray.store.inspect import main as inspect_main

RECIPE = load_recipe("tiny")


def make_protos(name: str, seed: int, kind: str = "thing") -> ClassPrototypes:
    g = np.random.default_rng(seed)
    sets = {}
    for j, e in enumerate(RECIPE.extractors):
        d = 8 * (j + 1)  # different dims per extractor
        f = torch.tensor(g.standard_normal((3, d, 8, 8)), dtype=torch.float32)
        fg = torch.zeros(3, 32, 32, dtype=torch.bool)
        fg[:, 4:20, 6:22] = True
        sets[e.name] = build_protoset(f, fg, ~fg, parts=3, iters=5, seed=seed)
    text = g.standard_normal(12).astype(np.float32)
    return ClassPrototypes(name, kind, sets, text / np.linalg.norm(text))


def build(uri: str, names=("cat", "dog", "traffic light"), version: int = 1, prev: list | None = None):
    loc = Location(uri)
    protos = [make_protos(n, i) for i, n in enumerate(names)]
    base = len(prev or [])
    entries = (prev or []) + [write_shard(loc, p, base + i).to_entry() for i, p in enumerate(protos)]
    commit_manifest(loc, new_manifest("test-bank", version, RECIPE.to_dict(), entries))
    return loc, protos, entries


def check_equal(bank, protos):
    assert bank.names == [p.name for p in protos]
    for c, p in enumerate(protos):
        np.testing.assert_allclose(bank.text[c], p.text.astype(np.float16), atol=1e-3)
        for ex, s in p.sets.items():
            arr = bank.extractors[ex]
            rows = arr.vectors[arr.rows_of(c)].astype(np.float32)
            # stored sorted by (kind, level); compare as sorted sets of rows
            order = np.lexsort((s.level != "class", s.kind != "fg"))
            assert rows.shape == s.vectors.shape
            np.testing.assert_allclose(np.sort(rows, 0), np.sort(s.vectors.astype(np.float16).astype(np.float32), 0),
                                       atol=1e-3)
            assert (arr.kind[arr.rows_of(c)] == (s.kind[order] == "bg")).all()


@pytest.fixture(params=["local", "s3"])
def bank_uri(request, tmp_path):
    if request.param == "local":
        return str(tmp_path / "bank")
    return request.getfixturevalue("s3") + "/banks/b1"


def test_round_trip(bank_uri):
    loc, protos, entries = build(bank_uri)
    bank = load_bank(bank_uri)
    assert (bank.bank_id, bank.version) == ("test-bank", 1)
    check_equal(bank, protos)
    assert bank.extractors["clip"].dim == 24 and bank.recipe.name == "tiny"
    # v2 adds one class and reuses the old shards byte for byte
    _, new, entries2 = build(bank_uri, names=("zebra",), version=2, prev=entries)
    assert [e["shard"] for e in entries2[:3]] == [e["shard"] for e in entries]
    bank2 = load_bank(bank_uri)
    assert bank2.version == 2 and bank2.names == ["cat", "dog", "traffic light", "zebra"]
    check_equal(bank2, protos + new)
    assert load_bank(bank_uri, version=1).names == ["cat", "dog", "traffic light"]


def test_rewrite_is_idempotent(tmp_path):
    loc = Location(str(tmp_path))
    a = write_shard(loc, make_protos("cat", 0), 0)
    b = write_shard(loc, make_protos("cat", 0), 0)
    assert a == b and len(loc.list("shards")) == 1


def test_shard_layout_and_independent_reader(tmp_path):
    loc, protos, entries = build(str(tmp_path))
    f = pq.ParquetFile(tmp_path / entries[0]["shard"])
    assert f.metadata.num_row_groups == len(RECIPE.extractors) + 1  # one per extractor + text row
    assert f.schema_arrow.field("vector").metadata[b"encoding"] == b"float16-le"
    # plain pyarrow.dataset over the shard files sees the same vectors
    t = ds.dataset(str(tmp_path / "shards"), format="parquet").to_table(
        filter=(ds.field("class_name") == "dog") & (ds.field("extractor") == "dino"))
    d = t.column("dim")[0].as_py()
    vec = np.frombuffer(b"".join(t.column("vector").to_pylist()), "<f2").reshape(-1, d).astype(np.float32)
    bank = load_bank(str(tmp_path))
    arr = bank.extractors["dino"]
    np.testing.assert_array_equal(np.sort(vec, 0), np.sort(arr.vectors[arr.rows_of(1)].astype(np.float32), 0))


def test_subset_reads_only_those_shards(bank_uri):
    loc, protos, entries = build(bank_uri)
    # destroy the cat shard: loading dog + traffic light must not touch it
    loc.write_bytes(entries[0]["shard"], b"garbage")
    bank = load_bank(bank_uri, classes=["Traffic  Light", "dog"])
    assert bank.names == ["dog", "traffic light"]
    check_equal(bank, protos[1:])
    with pytest.raises(KeyError, match="unknown classes.*unicorn"):
        load_bank(bank_uri, classes=["dog", "unicorn"])


def test_corrupt_and_missing_shard(bank_uri):
    loc, protos, entries = build(bank_uri)
    data = bytearray(loc.read_bytes(entries[1]["shard"]))
    data[len(data) // 2] ^= 0xFF
    loc.write_bytes(entries[1]["shard"], bytes(data))
    with pytest.raises(ShardError, match=r"sha256 mismatch for class 'dog'"):
        load_bank(bank_uri)
    if loc.is_s3:
        loc.s3.delete_object(Bucket=loc.bucket, Key=loc.s3_key(entries[2]["shard"]))
    else:
        (__import__("pathlib").Path(loc.path(entries[2]["shard"]))).unlink()
    with pytest.raises(ShardError, match=r"class 'traffic light' is missing.*not found"):
        load_bank(bank_uri, classes=["traffic light"])
    out = io.StringIO()
    with redirect_stdout(out):
        assert inspect_main(["inspect", bank_uri, "--verify"]) == 1


def test_bad_manifests(tmp_path):
    loc, _, _ = build(str(tmp_path))
    raw = loc.read_bytes("manifests/v000001.json")
    loc.write_bytes("manifests/v000001.json", raw[: len(raw) // 2])
    with pytest.raises(ManifestError, match=r"v000001.json: manifest does not parse"):
        load_bank(str(tmp_path))
    m = json.loads(raw)
    m["schema"] = "ovdiff-bank/99"
    loc.write_bytes("manifests/v000001.json", json.dumps(m).encode())
    with pytest.raises(ManifestError, match=r"unknown manifest schema 'ovdiff-bank/99'"):
        load_bank(str(tmp_path))
    with pytest.raises(ManifestError, match="version 7 does not exist"):
        load_bank(str(tmp_path), version=7)
    with pytest.raises(ManifestError, match="no committed bank"):
        load_bank(str(tmp_path / "empty"))


def test_two_writers_one_wins(bank_uri):
    loc, protos, entries = build(bank_uri)
    results, barrier = {}, threading.Barrier(2)

    def writer(name: str, seed: int):
        p = make_protos(name, seed)
        e = write_shard(Location(bank_uri), p, 3).to_entry()
        m = new_manifest("test-bank", 2, RECIPE.to_dict(), entries + [e])
        barrier.wait()
        try:
            commit_manifest(Location(bank_uri), m)
            results[name] = "won"
        except CommitConflict as err:
            results[name] = str(err)

    ts = [threading.Thread(target=writer, args=a) for a in (("lion", 10), ("tiger", 11))]
    [t.start() for t in ts]
    [t.join() for t in ts]
    winners = [n for n, r in results.items() if r == "won"]
    assert len(winners) == 1, results
    loser = ({"lion", "tiger"} - set(winners)).pop()
    assert "already exists: another writer committed it" in results[loser]
    m = read_manifest(Location(bank_uri))
    assert m["version"] == 2 and [c["name"] for c in m["classes"]] == ["cat", "dog", "traffic light", winners[0]]
    assert load_bank(bank_uri).names[-1] == winners[0]


def test_manifest_refuses_duplicate_class(tmp_path):
    loc, _, entries = build(str(tmp_path))
    with pytest.raises(ManifestError, match="lists a class twice"):
        commit_manifest(loc, new_manifest("test-bank", 2, RECIPE.to_dict(), entries + entries[:1]))
    assert not loc.exists("manifests/v000002.json")


def test_inspect_json(bank_uri):
    build(bank_uri)
    out = io.StringIO()
    with redirect_stdout(out):
        assert inspect_main(["inspect", bank_uri, "--json", "--verify"]) == 0
    info = json.loads(out.getvalue())
    assert info["bank_id"] == "test-bank" and info["version"] == 1 and info["num_classes"] == 3
    assert info["classes"] == ["cat", "dog", "traffic light"]
    assert info["extractors"]["dino"]["dim"] == 16 and info["extractors"]["dino"]["prototypes"] > 0
    assert info["bytes"] > 0 and info["verified"] is True


def test_storage_config_from_env_never_shows_secrets(monkeypatch):
    from ovdiff_ray.store.fs import StorageConfig

    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://127.0.0.1:9")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "s3cr3t-value")
    cfg = StorageConfig.from_env()
    assert cfg.endpoint_url == "http://127.0.0.1:9" and "s3cr3t" not in repr(cfg)
    loc = Location("s3://bucket/prefix", cfg)
    assert loc.root == "bucket/prefix" and loc.is_s3
    with pytest.raises(Exception, match="unsupported scheme 'gs'"):
        Location("gs://bucket/x")
