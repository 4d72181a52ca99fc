"""`ovdiff bank remove | rename | alias | diff`: fix a bank's class list without rebuilding, or see what changed.

    ovdiff bank remove URI NAME [NAME ...]     tombstone classes: their label values stay reserved, no other moves
    ovdiff bank rename URI OLD NEW             same label value and shard, a new name
    ovdiff bank alias URI NAME ALIAS           another name that resolves to the class
    ovdiff bank diff URI A B [--json]          added, rebuilt, removed, revived, renamed, prompt changed

Each edit commits one new version (a conditional write, retried against a concurrent writer) and prints a summary
line; a bad name is an error that names it, and nothing is written. Rebuilding a class is `build_bank --rebuild`.
"""
from __future__ import annotations

import argparse
import json
import sys

from .edits import EditError, alias, commit_edit, diff, format_diff, remove, rename
from .fs import Location, StoreError
from .schema import ManifestError
from .shards import read_manifest

ACTIONS = ("remove", "rename", "alias", "diff")


def parser() -> argparse.ArgumentParser:
    from ..cli_help import Parser

    ap = Parser(prog="ovdiff bank", description=__doc__.split("\n\n")[0], epilog=__doc__.split("\n\n", 1)[1])
    add_parsers(ap.add_subparsers(dest="action", required=True))
    return ap


def add_parsers(sub) -> None:
    """remove | rename | alias | diff as subparsers of `ovdiff bank` (`sub`: its `add_subparsers()` action)."""
    uri = "bank location: local folder, file:// or s3://bucket/prefix"
    r = sub.add_parser("remove", help="tombstone classes (their label values stay reserved)")
    r.add_argument("uri", help=uri)
    r.add_argument("names", nargs="+", metavar="NAME", help="classes to remove (names or aliases)")
    n = sub.add_parser("rename", help="give a class a new name (same label value and shard)")
    n.add_argument("uri", help=uri)
    n.add_argument("old", help="the class's name (or an alias)")
    n.add_argument("new", help="its new name")
    a = sub.add_parser("alias", help="add another name for a class")
    a.add_argument("uri", help=uri)
    a.add_argument("name", help="the class's name")
    a.add_argument("alias", help="the other name")
    d = sub.add_parser("diff", help="what changed between two versions")
    d.add_argument("uri", help=uri)
    d.add_argument("a", type=int, help="older version")
    d.add_argument("b", type=int, help="newer version")
    d.add_argument("--json", action="store_true", help="print one JSON object")


def main(argv: list[str]) -> int:
    return run(parser().parse_args(argv))


def run(a: argparse.Namespace) -> int:
    """Apply the edit (or print the diff) of parsed arguments `a`."""
    prog = f"ovdiff bank {a.action}"
    try:
        loc = Location(a.uri)
        if a.action == "diff":
            ma, mb = read_manifest(loc, a.a), read_manifest(loc, a.b)
            if ma is None or mb is None:
                raise ManifestError(f"{a.uri}: no committed bank here (no manifests/)")
            d = diff(ma, mb)
            print(json.dumps(d) if a.json else "\n".join(format_diff(d)))
            return 0
        if a.action == "remove":
            edit, change = (lambda c, v: remove(c, a.names, v)), {"removed": list(a.names)}
        elif a.action == "rename":
            edit, change = (lambda c, v: rename(c, a.old, a.new)), {"renamed": [[a.old, a.new]]}
        else:
            edit, change = (lambda c, v: alias(c, a.name, a.alias)), {"aliased": [[a.name, a.alias]]}
        m, summary = commit_edit(loc, edit, change)
    except (EditError, StoreError, ManifestError, OSError) as e:
        print(f"{prog}: error: {e}{'' if a.action == 'diff' else '; nothing was written'}", file=sys.stderr)
        return 1
    print(f"summary: {summary}; committed bank {m['bank_id']} v{m['version']} at {a.uri}")
    return 0
