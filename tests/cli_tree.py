"""The argparse parsers of every command, found without running one: each program's `main` is called with its
parser's `parse_known_args` replaced by a trap that hands back the parser. Subcommands are walked through argparse's
own subparser actions, so a subcommand added anywhere is covered without a list here."""
from __future__ import annotations

import argparse
import importlib
from typing import Iterator

from ovdiff_ray import cli


class _Caught(Exception):
    def __init__(self, parser: argparse.ArgumentParser):
        super().__init__(parser.prog)
        self.parser = parser


def _trap(self, args=None, namespace=None):  # noqa: ARG001 - the signature of parse_known_args
    raise _Caught(self)


def parser_of(target: str) -> argparse.ArgumentParser:
    """`module:function` -> the parser that function builds (it is stopped before parsing anything)."""
    mod, fn = target.split(":")
    main = getattr(importlib.import_module(mod), fn)
    orig = argparse.ArgumentParser.parse_known_args
    argparse.ArgumentParser.parse_known_args = _trap
    try:
        main(["--help"])
    except _Caught as c:
        return c.parser
    finally:
        argparse.ArgumentParser.parse_known_args = orig
    raise AssertionError(f"{target} returned without parsing its arguments")


def programs() -> dict[str, argparse.ArgumentParser]:
    """Every command line program: `build_bank`, `label_dataset` and each `ovdiff COMMAND`."""
    out = {"build_bank": parser_of("ovdiff_ray.build_bank:main"), "label_dataset": parser_of("ovdiff_ray.label:main")}
    for name, (target, _) in cli.COMMANDS.items():
        out[f"ovdiff {name}"] = parser_of(target)
    return out


def subparsers(p: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    return {name: sp for a in p._actions if isinstance(a, argparse._SubParsersAction)  # noqa: SLF001
            for name, sp in a.choices.items()}


def walk(name: str, p: argparse.ArgumentParser) -> Iterator[tuple[str, argparse.ArgumentParser]]:
    """`(command words, parser)` for `p` and every subcommand below it."""
    yield name, p
    for sub, sp in subparsers(p).items():
        yield from walk(f"{name} {sub}", sp)


def all_parsers() -> dict[str, argparse.ArgumentParser]:
    return {k: v for name, p in programs().items() for k, v in walk(name, p)}
