"""`ovdiff` command: subcommands dispatch to the module that owns them (`module:function(argv) -> int`)."""
from __future__ import annotations

import importlib
import sys

COMMANDS = {
    "demo": ("ovdiff_ray.demo:main", "run the main job on the embedded default (toy world, local folder, local Ray)"),
    "bank": ("ovdiff_ray.store.inspect:main", "bank inspect | show | audit | remove | rename | alias | diff URI ... "
             "(a bank's contents, support sets, suspects, fixes)"),
    "preview": ("ovdiff_ray.sample:preview_main", "sample one class and write its support set, masks and shard"),
    "toy-scenes": ("ovdiff_ray.models.toy:scenes_main", "write toy-world scenes with ground truth"),
    "eval": ("ovdiff_ray.evaluate:main", "mIoU on toy | voc21 | context60 | coco_object81"),
    "segment": ("ovdiff_ray.segment:main", "segment one image and write an overlay PNG"),
    "serve": ("ovdiff_ray.serve.app:main", "start the Serve HTTP endpoint locally"),
    "vocab": ("ovdiff_ray.vocab_import:import_main", "vocab import FILE --out FILE.tsv (COCO/LVIS JSON or .txt)"),
    "weights": ("ovdiff_ray.mirror:main", "weights mirror --recipe R --to DIR|s3://... (for clusters without hub)"),
}

USAGE = "usage: ovdiff COMMAND [ARGS...]\n\ncommands:\n" + "\n".join(
    f"  {name:<11} {doc}" for name, (_, doc) in COMMANDS.items()) + "\n\nRun `ovdiff COMMAND --help` for a command's options."


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] in ("-h", "--help"):
        print(USAGE)
        return 0
    cmd, rest = argv[0], argv[1:]
    if cmd not in COMMANDS:
        print(f"ovdiff: unknown command {cmd!r}\n\n{USAGE}", file=sys.stderr)
        return 2
    mod, fn = COMMANDS[cmd][0].split(":")
    return int(getattr(importlib.import_module(mod), fn)(rest) or 0)


if __name__ == "__main__":
    sys.exit(main())
