"""Help = code, for every command and subcommand (found by walking argparse's own tree, `tests/cli_tree.py`, so a
subcommand added later is covered): every option is in `--help` with help text, a value's default is shown (or the
help says what happens without it), required options are required; `ovdiff --help`'s summaries name only flags that
exist and every required one; flags that only make sense with another are refused alone. No Ray."""
from __future__ import annotations

import argparse
import re
import subprocess
import sys
from pathlib import Path

import pytest

from ovdiff_ray import cli
from tests.cli_tree import all_parsers, parser_of, programs, walk

ROOT = Path(__file__).resolve().parents[1]
PARSERS = all_parsers()


def options(p: argparse.ArgumentParser) -> list[argparse.Action]:
    return [a for a in p._actions if not isinstance(a, (argparse._HelpAction, argparse._SubParsersAction))]


def test_the_tree_holds_every_command():
    names = set(PARSERS)
    assert {"build_bank", "label_dataset", "ovdiff bank inspect", "ovdiff vocab import", "ovdiff weights mirror",
            "ovdiff serve", "ovdiff toy-scenes"} <= names, names
    assert all(f"ovdiff {c}" in names for c in cli.COMMANDS)


@pytest.mark.parametrize("name", sorted(PARSERS))
def test_help_lists_every_flag_with_its_default(name):
    p = PARSERS[name]
    text = " ".join(p.format_help().split())  # argparse wraps lines: compare with whitespace collapsed
    usage = " ".join(p.format_usage().split())
    bad = []
    for a in options(p):
        what = a.option_strings[0] if a.option_strings else a.dest
        if a.help in (None, argparse.SUPPRESS) or not a.help.strip():
            bad.append(f"{what}: no help text")
            continue
        if a.option_strings and not all(o in text for o in a.option_strings):
            bad.append(f"{what}: not in --help")
        takes_value = a.nargs != 0
        if a.required:
            # argparse shows a required option without brackets in the usage line
            shown = a.option_strings[0] if a.option_strings else (a.metavar or a.dest)
            if a.option_strings and re.search(rf"\[{re.escape(shown)}[\s\]]", usage):
                bad.append(f"{what}: required but shown as optional")
        elif takes_value and a.option_strings:
            rendered = p._get_formatter()._expand_help(a) if a.help else ""
            if "default" not in rendered.lower():
                bad.append(f"{what}: no default in its help ({rendered!r})")
    assert not bad, f"{name}: " + "; ".join(bad)


def test_ovdiff_summaries_name_real_flags_and_every_required_one():
    bad = []
    for cmd, (target, doc) in cli.COMMANDS.items():
        tree = dict(walk(f"ovdiff {cmd}", parser_of(target)))
        flags = {o for p in tree.values() for a in options(p) for o in a.option_strings}
        for f in re.findall(r"(?<![\w-])--[a-z][a-z0-9-]*", doc):
            if f not in flags:
                bad.append(f"ovdiff {cmd}: summary names {f}, which no parser of it takes")
        for name, p in tree.items():
            for a in options(p):
                if a.required and a.option_strings and a.option_strings[0] not in doc:
                    bad.append(f"{name}: required {a.option_strings[0]} missing from the summary")
    assert not bad, bad
    out = subprocess.run([sys.executable, "-m", "ovdiff_ray.cli", "--help"], capture_output=True, text=True,
                         cwd=ROOT, timeout=60)
    assert out.returncode == 0
    for cmd, (_, doc) in cli.COMMANDS.items():
        assert f"ovdiff {cmd} {doc}" in out.stdout


@pytest.mark.parametrize("argv, needs", [
    (["inspect", "somewhere", "--top", "3"], "--top needs --report"),
    (["inspect", "somewhere", "--price-per-hour", "2"], "--price-per-hour needs --report"),
])
def test_bank_inspect_refuses_report_flags_without_report(argv, needs, capsys, tmp_path):
    from ovdiff_ray.store.inspect import main

    with pytest.raises(SystemExit) as e:
        main([a.replace("somewhere", str(tmp_path / "nothing")) for a in argv])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert needs in err and "ovdiff bank: error:" in err


def test_serve_refuses_follow_flags_without_follow(capsys):
    from ovdiff_ray.serve.app import main

    for argv, flag in ((["--reload-poll-s", "5"], "--reload-poll-s"), (["--build-workers", "2"], "--build-workers"),
                       (["--build-gpus-per-worker", "1"], "--build-gpus-per-worker")):
        with pytest.raises(SystemExit) as e:
            main(["--bank", "/nonexistent/bank", *argv])
        assert e.value.code == 2
        assert f"{flag} needs --follow" in capsys.readouterr().err


def test_toy_scenes_runs_on_its_defaults(tmp_path, monkeypatch):
    """`--vocab` and `--out` have defaults (the shipped toy vocabulary, ./toy-scenes) that work as shown."""
    from ovdiff_ray.models.toy import scenes_main

    monkeypatch.chdir(tmp_path)
    assert scenes_main(["--n", "1", "--size", "32"]) == 0
    assert (tmp_path / "toy-scenes" / "images" / "0000.png").is_file()
    assert (tmp_path / "toy-scenes" / "classes.tsv").read_text().startswith("name\tkind\n")
    with pytest.raises(SystemExit):
        scenes_main(["--json"])  # --json is for --list


def test_programs_are_the_console_scripts():
    """The programs walked are the package's console scripts (pyproject's [project.scripts])."""
    import tomllib

    scripts = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"]
    assert set(scripts) == {"build_bank", "label_dataset", "ovdiff"}
    assert {n.split()[0] for n in programs()} == set(scripts)
