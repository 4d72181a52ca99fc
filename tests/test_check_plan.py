"""`build_bank --check` says exactly what the build will write: the bank id it prints is the id the build commits
(no random part), and its cost estimate uses the measured per-class seconds of the recipe's models where one
exists (paper.yaml's: 17.7 s on an H200), the paper's 210 s scaled otherwise."""
from __future__ import annotations

import re
from pathlib import Path

import pytest

from ovdiff_ray import preflight
from ovdiff_ray.recipe import load_recipe

ROOT = Path(__file__).resolve().parents[1]


def test_check_names_the_bank_id_the_build_writes(ray_local, tmp_path, capsys):
    from ovdiff_ray.build_bank import main as build_main
    from ovdiff_ray.store.fs import Location
    from ovdiff_ray.store.shards import read_manifest

    vocab = tmp_path / "v.tsv"
    vocab.write_text("name\tkind\nred circle\tthing\n")
    out = tmp_path / "bank"
    args = ["--vocab", str(vocab), "--recipe", "toy", "--out", str(out), "--workers", "1"]
    assert build_main(args + ["--check"]) == 0
    said = re.findall(r"would write bank (\S+) v1 to", capsys.readouterr().out)
    assert len(said) == 1 and not out.exists()
    assert build_main(args + ["--check"]) == 0  # the same inputs, the same id
    assert re.findall(r"would write bank (\S+) v1 to", capsys.readouterr().out) == said
    assert build_main(args) == 0
    assert read_manifest(Location(str(out)))["bank_id"] == said[0]
    # another location: another id (a bank id names one bank)
    assert build_main(["--vocab", str(vocab), "--recipe", "toy", "--out", str(tmp_path / "other"), "--check"]) == 0
    other = re.findall(r"would write bank (\S+) v1 to", capsys.readouterr().out)
    assert other and other[0] != said[0] and other[0].startswith("toy-")


def test_bank_id_help_says_how_it_is_formed(capsys):
    from ovdiff_ray.build_bank import main as build_main

    with pytest.raises(SystemExit):
        build_main(["--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "RECIPE-VOCAB8-HASH6" in text and "--check prints it" in text


def test_estimate_uses_the_measured_cost_of_the_recipes_models():
    paper = preflight.class_cost(load_recipe("paper"))
    assert paper.seconds == pytest.approx(17.7) and "measured 17.7 s a class of these models on one H200" in paper.basis
    plus = preflight.class_cost(load_recipe("paper-plus"))
    assert "measured 17.7 s" in plus.basis  # the same models
    tiny = load_recipe("tiny")
    c = preflight.class_cost(tiny)
    g = tiny.generation
    assert c.seconds == pytest.approx(210 * (g.n_images / 64) * (g.steps / 30) * (g.resolution / 512) ** 2)
    assert c.basis.startswith("no measurement of these models: the paper's 210 s")
    assert preflight.class_cost(load_recipe("toy")) is None
