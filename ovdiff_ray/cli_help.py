"""One help style for every command (`build_bank`, `label_dataset`, each `ovdiff COMMAND`): descriptions and epilogs
as written, and every option that takes a value with its default. An option whose default is not a plain value
(None: "not set") says in its own help what happens without it (`tests/test_cli_help.py` checks every parser)."""
from __future__ import annotations

import argparse


class HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """argparse's help, descriptions kept as written, `(default: X)` after each option whose default is a value and
    whose help does not already say it."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        if ("default" in text.lower() or action.required or action.nargs == 0 or not action.option_strings
                or action.default in (None, argparse.SUPPRESS) or action.default == []):
            return text
        return text + " (default: %(default)s)"


class Parser(argparse.ArgumentParser):
    """`argparse.ArgumentParser` with `HelpFormatter`; its subcommands' parsers (`add_subparsers`) get it too."""

    def __init__(self, *args, formatter_class=HelpFormatter, **kw):
        super().__init__(*args, formatter_class=formatter_class, **kw)
