"""Vocabulary validation: every rejection names the file and line."""
from __future__ import annotations

from pathlib import Path

import pytest

from ovdiff_ray.vocab import load_vocab

VOCABS = Path(__file__).resolve().parents[1] / "bank" / "vocab"


@pytest.mark.parametrize("name,count", [("voc21", 21), ("context60", 60), ("coco_object81", 81), ("lvis1203", 1203),
                                        ("ade150", 150)])
def test_shipped_vocabularies_load(name, count):
    v = load_vocab(VOCABS / f"{name}.tsv")
    assert len(v) == count and len(v.sha256) == 64
    assert all(c.kind in ("thing", "stuff") for c in v.classes)


def test_txt_is_all_things(tmp_path):
    p = tmp_path / "v.txt"
    p.write_text("cat\nhot dog\n\n".replace("\n\n", "\n"))
    v = load_vocab(p)
    assert v.names == ["cat", "hot dog"] and {c.kind for c in v.classes} == {"thing"}


@pytest.mark.parametrize("body,suffix,message", [
    ("name\tkind\ncat\tthing\n\tthing\n", ".tsv", r"v.tsv:3: empty class name"),
    ("cat\n\ndog\n", ".txt", r"v.txt:2: empty class name"),
    ("name\tkind\ncat\tthing\nCat \tthing\n", ".tsv", r"v.tsv:3: duplicate class 'Cat' \(first on line 2\)"),
    ("hot dog\nhot   DOG\n", ".txt", r"v.txt:2: duplicate class"),
    ("name\tkind\n" + "x" * 201 + "\tthing\n", ".tsv", r"v.tsv:2: class name longer than 200"),
    ("name\tkind\nca\x07t\tthing\n", ".tsv", r"v.tsv:2: control character '\\x07'"),
    ("name\tkind\ncat\tanimal\n", ".tsv", r"v.tsv:2: unknown kind 'animal'"),
    ("name\tkind\ncat\n", ".tsv", r"v.tsv:2: expected 2 tab-separated columns"),
    ("name\tkind\tprompt\ncat\tthing\ta\tb\n", ".tsv", r"v.tsv:2: expected 3 tab-separated columns"),
    ("name\tkind\tprompt\ncat\tthing\tc\x07t\n", ".tsv", r"v.tsv:2 \(prompt\): control character"),
    ("name\tprompt\ncat\tthing\n", ".tsv", r"v.tsv:1: expected the header"),
    ("cat\tthing\n", ".tsv", r"v.tsv:1: expected the header"),
])
def test_rejections(tmp_path, body, suffix, message):
    p = tmp_path / f"v{suffix}"
    p.write_text(body, encoding="utf-8")
    with pytest.raises(ValueError, match=message):
        load_vocab(p)


def test_prompt_column(tmp_path):
    p = tmp_path / "v.tsv"
    p.write_text("name\tkind\tprompt\nkeyboard\tthing\tcomputer keyboard\nsky\tstuff\t\ncat\tthing\ncow\tthing\tcow\n")
    v = load_vocab(p)
    assert v.names == ["keyboard", "sky", "cat", "cow"]
    assert v.prompts == ["computer keyboard", "sky", "cat", "cow"]
    assert [c.prompt for c in v.classes] == ["computer keyboard", "", "", ""]
    assert v.kind("sky") == "stuff"


def test_not_utf8(tmp_path):
    p = tmp_path / "v.txt"
    p.write_bytes(b"cat\ndog\ncaf\xe9\n")
    with pytest.raises(ValueError, match=r"v.txt:3: not UTF-8"):
        load_vocab(p)


def test_missing_and_wrong_suffix(tmp_path):
    with pytest.raises(ValueError, match="does not exist"):
        load_vocab(tmp_path / "nope.tsv")
    (tmp_path / "v.csv").write_text("cat\n")
    with pytest.raises(ValueError, match=r"expected a \.tsv or \.txt"):
        load_vocab(tmp_path / "v.csv")
