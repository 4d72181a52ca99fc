"""LVIS/COCO vocabularies as published: names kept, prompts derived; `ovdiff vocab import`; build_bank --vocab JSON."""
from __future__ import annotations

import json
from pathlib import Path

from ovdiff_ray.build_bank import main as build_main
from ovdiff_ray.cli import main as cli_main
from ovdiff_ray.vocab import load_vocab
from ovdiff_ray.vocab_import import derive_prompt, read_vocabulary

ROOT = Path(__file__).resolve().parents[1]

# Categories as lvis_v1_val.json has them (id, name, synonyms, def; other fields dropped), out of id order.
LVIS = {"categories": [
    {"id": 56, "name": "bow_(weapon)", "synonyms": ["bow_(weapon)"], "def": "a weapon for shooting arrows"},
    {"id": 1, "name": "aerosol_can", "synonyms": ["aerosol_can", "spray_can"],
     "def": "a dispenser that holds a substance under pressure"},
    {"id": 57, "name": "bow_(decorative_ribbons)", "synonyms": ["bow_(decorative_ribbons)"],
     "def": "a decorative interlacing of ribbons"},
    {"id": 687, "name": "mat_(gym_equipment)", "synonyms": ["mat_(gym_equipment)", "gym_mat"],
     "def": "sports equipment consisting of a piece of thick padding on the floor for gymnastics"},
    {"id": 173, "name": "bus_(vehicle)", "synonyms": ["bus_(vehicle)", "autobus", "charabanc", "double-decker"],
     "def": "a vehicle carrying many passengers; used for public transport"},
    {"id": 1074, "name": "truffle_(chocolate)", "synonyms": ["truffle_(chocolate)", "chocolate_truffle"],
     "def": "creamy chocolate candy"},
    {"id": 92, "name": "Bible", "synonyms": ["Bible"], "def": "the sacred writings of the Christian religions"},
]}
EXPECTED = {  # name as published -> prompt, by the rule in vocab_import (written out here, not computed)
    "aerosol_can": "aerosol can",
    "bow_(weapon)": "bow (weapon)",
    "bow_(decorative_ribbons)": "bow (decorative ribbons)",
    "Bible": "Bible",
    "bus_(vehicle)": "bus (vehicle)",  # synonyms without the head word ("autobus") are not taken
    "mat_(gym_equipment)": "gym mat",
    "truffle_(chocolate)": "chocolate truffle",
}
ID_ORDER = ["aerosol_can", "bow_(weapon)", "bow_(decorative_ribbons)", "Bible", "bus_(vehicle)",
            "mat_(gym_equipment)", "truffle_(chocolate)"]


def test_lvis_json_names_kept_prompts_derived(tmp_path):
    p = tmp_path / "lvis_v1_val.json"
    p.write_text(json.dumps({"info": {}, "images": [], "annotations": [], **LVIS}))
    v = read_vocabulary(p)
    assert v.names == ID_ORDER  # sorted by category id, the published label order
    assert {c.name: c.text for c in v.classes} == EXPECTED
    assert all(c.kind == "thing" for c in v.classes)
    assert v.prompts[v.names.index("bow_(weapon)")] == "bow (weapon)"


def test_txt_of_lvis_names_gets_the_same_derivation(tmp_path):
    p = tmp_path / "lvis.txt"
    p.write_text("".join(n + "\n" for n in ID_ORDER))
    v = read_vocabulary(p)
    want = dict(EXPECTED, **{"mat_(gym_equipment)": "mat (gym equipment)",  # no synonyms in a .txt
                             "truffle_(chocolate)": "truffle (chocolate)"})
    assert v.names == ID_ORDER and {c.name: c.text for c in v.classes} == want
    plain = tmp_path / "plain.txt"
    plain.write_text("red circle\nblue star\n")
    assert [c.prompt for c in read_vocabulary(plain).classes] == ["", ""]


def test_derive_prompt_rule():
    assert derive_prompt("cab_(taxi)", ["cab_(taxi)", "taxi", "taxicab"]) == "cab (taxi)"  # no head word "cab"
    assert derive_prompt("mouse_(computer_equipment)", ["mouse_(computer_equipment)", "computer_mouse"]) == \
        "computer mouse"
    assert derive_prompt("poker_(fire_stirring_tool)", ["poker_(fire_stirring_tool)", "stove_poker", "fire_hook"]) \
        == "stove poker"
    assert derive_prompt("pan_(for_cooking)", ["pan_(for_cooking)", "panful", "cooking_pan"]) == "cooking pan"
    assert derive_prompt("  flip-flop__(sandal) ") == "flip-flop (sandal)"


def test_coco_panoptic_categories_give_kinds(tmp_path):
    p = tmp_path / "panoptic.json"
    p.write_text(json.dumps({"categories": [{"id": 1, "name": "person", "isthing": 1},
                                            {"id": 184, "name": "tree-merged", "isthing": 0},
                                            {"id": 149, "name": "rug-merged", "isthing": 0}]}))
    v = read_vocabulary(p)
    assert v.names == ["person", "rug-merged", "tree-merged"] and [c.kind for c in v.classes] == ["thing", "stuff", "stuff"]


def test_bad_json_names_the_category(tmp_path, capsys):
    p = tmp_path / "bad.json"
    out = tmp_path / "out.tsv"
    p.write_text(json.dumps({"categories": [{"id": 1, "name": "cat"}, {"id": 2, "name": "Cat"}]}))
    assert cli_main(["vocab", "import", str(p), "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert "bad.json: categories[1] ('Cat'): duplicate class 'Cat'" in err and not out.exists()
    p.write_text(json.dumps({"categories": [{"id": 1}]}))
    assert cli_main(["vocab", "import", str(p), "--out", str(out)]) == 2
    assert "categories[0]: expected an object with a string 'name'" in capsys.readouterr().err and not out.exists()
    p.write_text("{not json")
    assert cli_main(["vocab", "import", str(p), "--out", str(out)]) == 2
    assert "bad.json: not valid JSON" in capsys.readouterr().err and not out.exists()


def test_vocab_import_writes_a_tsv_for_review(tmp_path, capsys):
    src = tmp_path / "lvis.json"
    src.write_text(json.dumps(LVIS))
    out = tmp_path / "lvis.tsv"
    assert cli_main(["vocab", "import", str(src), "--out", str(out)]) == 0
    text = capsys.readouterr().out
    assert "summary: 7 classes" in text and "6 prompts differ from the name" in text
    lines = out.read_text().splitlines()
    assert lines[0] == "name\tkind\tprompt" and "bow_(weapon)\tthing\tbow (weapon)" in lines
    assert "mat_(gym_equipment)\tthing\tgym mat" in lines and "Bible\tthing\tBible" in lines
    v = load_vocab(out)
    assert {c.name: c.text for c in v.classes} == EXPECTED
    assert cli_main(["vocab", "import", str(src), "--out", str(out)]) == 2  # no silent overwrite
    assert "exists (pass --force" in capsys.readouterr().err


def test_build_bank_takes_a_json_vocab(tmp_path, capsys):
    src = tmp_path / "lvis.json"
    src.write_text(json.dumps(LVIS))
    out = tmp_path / "bank"
    assert build_main(["--vocab", str(src), "--recipe", "toy", "--out", str(out), "--check"]) == 0
    text = capsys.readouterr().out
    assert f"vocab {src}: 7 classes (7 thing, 0 stuff)" in text
    assert "would build 7 classes (aerosol_can, bow_(weapon), bow_(decorative_ribbons), Bible, bus_(vehicle), ...)" \
        in text
    assert not out.exists()


def test_lvis1203_has_the_prompt_column():
    path = ROOT / "bank" / "vocab" / "lvis1203.tsv"
    assert path.read_text().splitlines()[0] == "name\tkind\tprompt"
    v = load_vocab(path)
    by = {c.name: c.text for c in v.classes}
    assert len(v) == 1203 and v.names[0] == "aerosol can" and v.names[-1] == "zucchini"
    assert by["bow (weapon)"] == "bow (weapon)" and by["mouse (computer equipment)"] == "computer mouse"
    assert by["mat (gym equipment)"] == "gym mat" and by["bus (vehicle)"] == "bus (vehicle)"
    assert sum(c.text != c.name for c in v.classes) == 14
