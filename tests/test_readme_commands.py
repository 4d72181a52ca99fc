"""The README's Commands section stays true to the code: each row's command runs `--help` (the program and its
subcommand exist), every flag the row names is one that command takes, and every option the command requires is in
the row. Fast, no Ray started."""
from __future__ import annotations

import re
from pathlib import Path

import pytest

from tests.cli_tree import all_parsers, programs

ROOT = Path(__file__).resolve().parents[1]
FLAG = re.compile(r"(?<![\w-])--[a-z][a-z0-9-]*")


def command_rows() -> list[tuple[str, str]]:
    """(command cell, whole row) of each row of the README's Commands table."""
    text = (ROOT / "README.md").read_text()
    section = text.split("\n## Commands\n", 1)[1].split("\n## ", 1)[0]
    rows = []
    for line in section.splitlines():
        if line.startswith("| `"):
            cell = line.split("`", 2)[1]
            rows.append((cell.replace("\\|", "|"), line.replace("\\|", "|")))
    return rows


ROWS = command_rows()
PARSERS = all_parsers()


def command_of(cell: str) -> str:
    """The longest command (`build_bank`, `ovdiff bank inspect`, ...) the cell starts with."""
    words = cell.split()
    for n in range(len(words), 0, -1):
        if " ".join(words[:n]) in PARSERS:
            return " ".join(words[:n])
    raise AssertionError(f"README Commands: {cell!r} is no command of this package")


def test_the_table_covers_every_program():
    assert len(ROWS) >= 10
    named = {command_of(c) for c, _ in ROWS}
    for prog in programs():
        assert any(n == prog or n.startswith(prog + " ") for n in named), f"{prog} has no row in README Commands"


@pytest.mark.parametrize("cell, row", ROWS, ids=[c.split(" [")[0][:40] for c, _ in ROWS])
def test_readme_command_parses(cell, row, capsys):
    name = command_of(cell)
    words = name.split()
    prog, sub = (" ".join(words[:2]), words[2:]) if words[0] == "ovdiff" else (words[0], words[1:])
    # the command's own --help, through its console script's entry point (pyproject's [project.scripts])
    import importlib
    import tomllib

    from ovdiff_ray import cli

    if words[0] == "ovdiff":
        call = lambda argv: cli.main([words[1], *argv])  # noqa: E731
    else:
        target = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"][prog]
        mod, fn = target.split(":")
        call = getattr(importlib.import_module(mod), fn)
    with pytest.raises(SystemExit) as e:
        call([*sub, "--help"])
    assert e.value.code == 0
    help_text = capsys.readouterr().out
    assert help_text.startswith("usage: " + name), help_text[:200]
    p = PARSERS[name]
    takes = {o for a in p._actions for o in a.option_strings}
    unknown = [f for f in FLAG.findall(row) if f not in takes and f != "--help"]
    # a flag of another command may be quoted in the "what" column (e.g. serve's --num-gpus); the command cell must
    # hold only this command's flags
    assert not [f for f in FLAG.findall(cell) if f not in takes], (name, [f for f in FLAG.findall(cell)
                                                                          if f not in takes])
    assert all(f in help_text for f in FLAG.findall(cell))
    required = [a.option_strings[0] for a in p._actions if a.required and a.option_strings]
    assert all(r in cell for r in required), (name, required)
    assert not unknown, (name, unknown)
