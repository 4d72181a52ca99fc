"""`explain` (ovdiff_ray/explain.py): the prototypes that won a class's pixels, checked against a plain argmax loop
on a bank built from toy classes; support images named by index and seed redraw the support set; a stored bank keeps
`source` and part members, and a bank from before part members says so; `explain=true` over HTTP."""
from __future__ import annotations

import hashlib
import io

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
import torch.nn.functional as F

from ovdiff_ray.explain import NO_MEMBERS, explain
from ovdiff_ray.models import toy
from ovdiff_ray.recipe import load_recipe
from ovdiff_ray.store.bank import Bank

VOCAB = [("red circle", "thing"), ("green star", "thing"), ("blue square", "thing"), ("yellow checks", "stuff")]


@pytest.fixture(scope="module")
def built():
    from ovdiff_ray.sample import SamplingModels, sample_class

    r = load_recipe("toy")
    m = SamplingModels.load(r, "cpu")
    return r, [sample_class(n, r, m, kind=k) for n, k in VOCAB]


@pytest.fixture(scope="module")
def case(built):
    from ovdiff_ray.segment import Segmenter

    r, protos = built
    seg = Segmenter.from_bank(Bank.from_prototypes(protos, r), "cpu")
    img, _ = toy.make_scene([n for n, _ in VOCAB], [k for _, k in VOCAB], np.random.default_rng(3), 128)
    return seg, img, seg.segment(img)


def plain_wins(seg, img, res, ex: str, value: int) -> dict[int, int]:
    """Pixels of label `value` won by each fg row of its class (extractor `ex`), by a plain loop over rows."""
    a = seg.bank.extractors[ex]
    x = torch.from_numpy(img).permute(2, 0, 1).float().div(255)
    f = seg.extractors[ex](x[None]).float()[0].numpy()  # toy scenes are at the short side already
    d, fh, fw = f.shape
    rows = [i for i in range(a.offsets[value - 1], a.offsets[value]) if a.kind[i] == 0]
    best = np.zeros((fh, fw), np.int64)
    for yy in range(fh):
        for xx in range(fw):
            sims = [float(np.dot(a.vectors[i].astype(np.float32), f[:, yy, xx])) for i in rows]
            best[yy, xx] = rows[int(np.argmax(sims))]
    up = F.interpolate(torch.from_numpy(best)[None, None].float(), size=res.labels.shape, mode="nearest")[0, 0]
    up = up.long().numpy()
    wins: dict[int, int] = {}
    for row in up[res.labels == value]:
        wins[int(row)] = wins.get(int(row), 0) + 1
    return wins


def test_explain_names_the_prototype_that_truly_won(case):
    seg, img, res = case
    out = explain(seg, img, res, top=3)
    assert set(out) == {int(v) for v in np.unique(res.labels)}
    things = [v for v in out if v > 0]
    assert things
    for v in things:
        for ex in seg.extractors:
            wins = plain_wins(seg, img, res, ex, v)
            total = sum(wins.values())
            got = [w for w in out[v].prototypes if w.extractor == ex]
            want = sorted(wins.items(), key=lambda kv: -kv[1])[:3]
            assert got[0].row == want[0][0], (v, ex)
            assert got[0].share == pytest.approx(want[0][1] / total, abs=1e-6)
            assert all(w.owner == seg.bank.names[v - 1] and w.kind == "fg" for w in got)


def test_support_images_are_named_by_index_and_seed_that_redraw_them(case, built):
    seg, img, res = case
    r, protos = built
    gen = toy.ToyGenerator(r)
    named = 0
    for v, ce in explain(seg, img, res, top=5).items():
        for w in ce.prototypes:
            if w.support is None:
                assert w.level == "class"
                continue
            assert w.level in ("instance", "part") and len(w.support) == len(w.seeds) >= 1
            support = gen.generate(w.owner, r.generation.n_images, r.seed)
            for i, s in zip(w.support, w.seeds):
                assert support.seeds[i] == s
                assert np.array_equal(gen.draw(w.owner, s)[0], support.images[i])
                named += 1
    assert named > 0


def test_a_stored_bank_keeps_source_and_members_and_an_old_one_says_so(built, tmp_path):
    from ovdiff_ray.segment import Segmenter
    from ovdiff_ray.store.fs import Location
    from ovdiff_ray.store.shards import commit_manifest, encode_shard, new_manifest, write_shard

    r, protos = built
    loc = Location(str(tmp_path / "bank"))
    entries = [write_shard(loc, p, i).to_entry() for i, p in enumerate(protos)]
    commit_manifest(loc, new_manifest("explain-test", 1, r.to_dict(), entries))
    bank = Bank.load(str(tmp_path / "bank"))
    mem = Bank.from_prototypes(protos, r)
    for ex, a in bank.extractors.items():
        assert np.array_equal(a.source, mem.extractors[ex].source)
    seg = Segmenter.from_bank(bank, "cpu")
    img, _ = toy.make_scene([n for n, _ in VOCAB], [k for _, k in VOCAB], np.random.default_rng(3), 128)
    res = seg.segment(img)
    stored = explain(seg, img, res, top=8)
    memory = explain(Segmenter.from_bank(mem, "cpu"), img, res, top=8)
    assert {v: [w.to_dict() for w in e.prototypes] for v, e in stored.items()} == \
        {v: [w.to_dict() for w in e.prototypes] for v, e in memory.items()}
    assert any(w.level == "part" and w.support for e in stored.values() for w in e.prototypes)
    # the same bank as written before issue 21: shards without the members column
    old = Location(str(tmp_path / "old"))
    old_entries = []
    for i, p in enumerate(protos):
        t = pq.read_table(pa.BufferReader(encode_shard(p, i))).drop_columns(["members"])
        buf = io.BytesIO()
        pq.write_table(t, buf)
        data = buf.getvalue()
        key = f"shards/c{i}.parquet"
        old.write_bytes(key, data)
        old_entries.append({**entries[i], "shard": key, "sha256": hashlib.sha256(data).hexdigest(),
                            "bytes": len(data)})
    commit_manifest(old, new_manifest("explain-old", 1, r.to_dict(), old_entries))
    seg_old = Segmenter.from_bank(Bank.load(str(tmp_path / "old")), "cpu")
    out = explain(seg_old, img, seg_old.segment(img), top=8)
    parts = [(e, w) for e in out.values() for w in e.prototypes if w.level == "part"]
    assert parts and all(w.support is None and e.note == NO_MEMBERS for e, w in parts)
    assert any(w.level == "instance" and w.support for e in out.values() for w in e.prototypes)
