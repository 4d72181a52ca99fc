"""Support-set records (issue 26): written beside each shard by the class worker, verified like shards, read back;
`ovdiff bank show` draws them; `ovdiff bank audit` ranks a constructed bad class first."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from ovdiff_ray.audit import ClassData, audit_classes
from ovdiff_ray.prototypes import ClassPrototypes, ProtoSet
from ovdiff_ray.store.fs import Location
from ovdiff_ray.store.inspect import main as bank_main
from ovdiff_ray.store.shards import commit_manifest, new_manifest, write_shard
from ovdiff_ray.store.support import instance_bits, read_record, write_record
from ovdiff_ray.support import DROP_EMPTY, DROP_FILTER, SupportData, agreement_filter


def synthetic_support(n=5, size=32, mode="full", seed=0) -> SupportData:
    """Images of flat colours with a square foreground, a background band, two instance masks."""
    rng = np.random.default_rng(seed)
    images = rng.integers(0, 256, (n, size, size, 3), dtype=np.uint8)
    fg = np.zeros((n, size, size), bool)
    fg[:, 8:20, 8:20] = True
    bg = np.zeros((n, size, size), bool)
    bg[:, 24:, :] = True
    inst = np.zeros((n, 2, size, size), bool)
    inst[:, 0, 8:20, 8:20] = True
    inst[:, 1, 0:4, 0:30] = True
    kept = np.array([True] * (n - 2) + [False, False])
    dropped = [""] * (n - 2) + [DROP_EMPTY, DROP_FILTER]
    emb = rng.standard_normal((n, 8)).astype(np.float32)
    emb /= np.linalg.norm(emb, axis=1, keepdims=True)
    sig = {k: rng.random(n).astype(np.float32) for k in ("name_agreement", "prompt_agreement", "fg_coverage",
                                                          "bg_coverage", "n_instances")}
    return SupportData(images, fg, bg, inst, [int(x) for x in rng.integers(0, 2**62, n)], kept, dropped,
                       (size, size), sig, emb, emb[0], emb[1], mode)


def one_class(name="red circle", support=None) -> ClassPrototypes:
    v = np.eye(4, dtype=np.float32)[:2]
    ps = ProtoSet(v, np.array(["fg", "bg"]), np.array(["class", "class"]), np.array([-1, -1], np.int16))
    return ClassPrototypes(name, "thing", {"toy": ps}, np.eye(8, dtype=np.float32)[0], {}, support=support)


def committed_bank(root: Path, support: SupportData) -> dict:
    loc = Location(str(root))
    p = one_class(support=support)
    e = {**write_shard(loc, p, 0).to_entry(), "id": 0,
         "support": write_record(loc, p.name, p.kind, p.prompt, support).to_entry()}
    from ovdiff_ray.recipe import load_recipe

    m = new_manifest("t", 1, load_recipe("toy").to_dict(), [e])
    commit_manifest(loc, m)
    return e


def test_record_round_trip_is_exact_for_full_images(tmp_path):
    s = synthetic_support(mode="full")
    e = committed_bank(tmp_path, s)
    assert e["support"]["key"].startswith("support/red-circle-") and e["support"]["rows"] == 5
    rec = read_record(Location(str(tmp_path)), e)
    assert rec.n == 5 and rec.seeds == s.seeds and rec.kept.tolist() == s.kept.tolist()
    assert rec.column("dropped").tolist() == s.dropped
    for i in range(5):
        assert np.array_equal(rec.image(i), s.images[i])  # PNG: lossless
        fg, bg = rec.masks(i)
        assert np.array_equal(fg, s.fg[i]) and np.array_equal(bg, s.bg[i])
        assert np.array_equal(rec.instances(i), s.instances[i])
    for k, v in s.signals.items():
        assert np.array_equal(rec.signal(k), v)
    assert np.allclose(rec.embeddings(), s.embeddings, atol=2e-3)  # float16
    assert np.allclose(rec.text("name"), s.name_text, atol=2e-3)
    assert rec.meta["class"] == "red circle" and rec.meta["mode"] == "full"


def test_thumbnails_are_jpeg_and_instances_pack_into_bits():
    bits = instance_bits(np.stack([np.eye(4, dtype=bool), np.ones((4, 4), bool)]))
    assert bits.dtype == np.uint8 and bits[0, 0] == 3 and bits[0, 1] == 2
    assert instance_bits(np.zeros((9, 2, 2), bool)).dtype == np.uint16
    from ovdiff_ray.store.support import encode_record, decode_record

    rec = decode_record(encode_record("a", "thing", "", synthetic_support(mode="thumbnails")), "mem")
    assert rec.image_bytes(0)[:2] == b"\xff\xd8" and rec.column("image_format")[0] == "jpeg"


def test_inspect_verify_finds_a_corrupt_thumbnail(tmp_path, capsys):
    e = committed_bank(tmp_path, synthetic_support(mode="thumbnails"))
    assert bank_main(["inspect", str(tmp_path), "--verify", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["verified_records"] == 1
    path = tmp_path / e["support"]["key"]
    data = bytearray(path.read_bytes())
    start = bytes(data).index(b"\xff\xd8")  # the first thumbnail's JPEG bytes
    data[start + 200] ^= 0xFF
    path.write_bytes(bytes(data))
    assert bank_main(["inspect", str(tmp_path), "--verify"]) == 1
    err = capsys.readouterr().err
    assert "sha256 mismatch for the support record of class 'red circle'" in err and e["support"]["key"] in err


def test_class_worker_writes_the_record_beside_the_shard(tmp_path):
    from ovdiff_ray.build_bank import ClassWorker
    from ovdiff_ray.models.base import image_seed
    from ovdiff_ray.recipe import load_recipe

    recipe = load_recipe("toy")
    recipe.generation.n_images = 4
    w = ClassWorker(recipe.to_dict(), str(tmp_path), None, device="cpu")
    r = w.build_one(3, "red circle", "thing")
    assert r["status"] == "ok", r["error"]
    entry = json.loads(r["entry"])
    sup = entry["support"]
    assert sup["mode"] == "thumbnails" and sup["rows"] == 4 and (tmp_path / sup["key"]).is_file()
    rec = read_record(Location(str(tmp_path)), entry)
    assert rec.seeds == [image_seed(recipe.seed, "red circle", i) for i in range(4)]
    assert int(rec.kept.sum()) == entry["n_images"]
    assert rec.image(0).shape == (128, 128, 3)  # 128 px toy images are not upscaled to 192
    assert (rec.signal("name_agreement") > 0.5).all()  # the toy classifier sees red circles
    masks = [rec.masks(i) for i in range(4)]
    assert all(0.02 < fg.mean() < 0.5 and not (fg & bg).any() for fg, bg in masks)
    assert any(bg.any() for _, bg in masks)
    # bank.support_record: none -> no record, no reference
    recipe.bank.support_record = "none"
    w2 = ClassWorker(recipe.to_dict(), str(tmp_path / "none"), None, device="cpu")
    e2 = json.loads(w2.build_one(0, "red circle", "thing")["entry"])
    assert "support" not in e2 and not (tmp_path / "none" / "support").exists()


def test_agreement_filter_drops_outliers_but_keeps_the_minimum():
    a = np.array([0.8, 0.82, 0.79, 0.81, 0.2, 0.8])
    cand = np.array([True, True, True, True, True, False])
    assert agreement_filter(a, cand, 3.0, 0.5).tolist() == [True, True, True, True, False, False]
    many_low = np.array([0.9, 0.1, 0.1, 0.1])
    assert agreement_filter(many_low, np.ones(4, bool), 3.0, 0.5).sum() >= 2


def _audit_world(n_classes=12, n_images=8, seed=0):
    """Classes whose support-image embeddings sit near their own name's text, and fg prototypes of their own."""
    rng = np.random.default_rng(seed)
    names = [f"class {i}" for i in range(n_classes)]
    texts = rng.standard_normal((n_classes, 16)).astype(np.float32)
    texts /= np.linalg.norm(texts, axis=1, keepdims=True)
    protos = rng.standard_normal((n_classes, 8)).astype(np.float32)

    def cls(i, looks_like):
        emb = texts[looks_like] + 0.3 * rng.standard_normal((n_images, 16)).astype(np.float32)
        emb /= np.linalg.norm(emb, axis=1, keepdims=True)
        bg = rng.standard_normal(8).astype(np.float32)
        sig = {"name_agreement": emb @ texts[i], "prompt_agreement": emb @ texts[looks_like],
               "fg_coverage": np.full(n_images, 0.15 + 0.01 * rng.random(), np.float32),
               "bg_coverage": np.full(n_images, 0.5, np.float32), "n_instances": np.ones(n_images, np.float32)}
        fg = protos[looks_like] + 0.02 * rng.standard_normal(8).astype(np.float32)
        return ClassData({"toy": fg}, {"toy": bg}, texts[looks_like], np.ones(n_images, bool), sig, emb, texts[i])

    return names, cls


def test_audit_ranks_a_class_built_from_another_class_s_words_first():
    names, cls = _audit_world()
    bad = 5  # its prompt named class 2: its images and prototypes are class 2's
    data = [cls(i, 2 if i == bad else i) for i in range(len(names))]
    entries = [{"name": n, "kind": "thing", **({"prompt": names[2]} if i == bad else {})} for i, n in enumerate(names)]
    audits = audit_classes(entries, data)
    assert audits[0].name == "class 5" and audits[0].reasons
    assert audits[0].confused_with[0] == "class 2" and audits[0].nearest[0][0] == "class 2"
    assert any("look like 'class 2'" in r for r in audits[0].reasons)
    assert audits[0].score < min(a.score for a in audits[2:])
    assert not any(a.reasons for a in audits if a.name not in ("class 5", "class 2"))
    # the same world without the bad class: nothing is a suspect
    clean = audit_classes([{"name": n, "kind": "thing"} for n in names], [cls(i, i) for i in range(len(names))])
    assert not any(a.reasons for a in clean)


def test_bank_show_writes_a_sheet_with_the_expected_tiles(tmp_path, capsys):
    from PIL import Image

    s = synthetic_support(n=5, size=32, mode="full")
    s.images[:] = 200  # plain grey images: the outlines and the dimming are all that differ
    committed_bank(tmp_path, s)
    out = tmp_path / "sheet.png"
    assert bank_main(["show", str(tmp_path), "Red Circle", "--out", str(out), "--cols", "3", "--side", "64"]) == 0
    assert "5 support images, 3 kept, 2 dimmed" in capsys.readouterr().out
    sheet = np.asarray(Image.open(out).convert("RGB"))
    assert sheet.shape == (2 * 64, 3 * 64, 3)
    tiles = [sheet[r * 64:(r + 1) * 64, c * 64:(c + 1) * 64] for r in range(2) for c in range(3)][:5]
    for t in tiles[:3]:
        assert ((t == (0, 255, 0)).all(-1)).sum() > 40  # fg outline (square 8..20 of 32 -> 16..40 of 64)
        assert ((t == (255, 0, 0)).all(-1)).sum() > 40  # bg outline
        assert t[32, 5].tolist() == [200, 200, 200]
    for t in tiles[3:]:  # dropped images are dimmed
        assert t[32, 5].tolist() == [70, 70, 70]
    assert (sheet[64:, 128:] == 255).all()  # the sixth cell is empty
    # bad input: an unknown class names itself, and nothing is written
    bad = tmp_path / "none.png"
    assert bank_main(["show", str(tmp_path), "purple hexagon", "--out", str(bad)]) == 1
    assert "no class 'purple hexagon'" in capsys.readouterr().err and not bad.exists()
