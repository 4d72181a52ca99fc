"""`ovdiff` command: subcommands dispatch to the module that owns them (`module:function(argv) -> int`)."""
from __future__ import annotations

import importlib
import sys

COMMANDS = {
    "demo": ("ovdiff_ray.demo:main", "[--out DIR]: the main job on the embedded default (toy world, local folder, "
                                     "local Ray)"),
    "bank": ("ovdiff_ray.store.inspect:main", "inspect URI [--version N] [--verify] [--json] "
                                              "[--report [--price-per-hour USD] [--top N]] | show URI CLASS --out "
                                              "FILE.png | audit URI [--json] | remove | rename | alias | diff URI A B"),
    "preview": ("ovdiff_ray.sample:preview_main", "NAME --out DIR [--recipe R] [--n N]: one class's support set, "
                                                  "masks and shard"),
    "toy-scenes": ("ovdiff_ray.models.toy:scenes_main", "[--vocab F] [--n N] [--out DIR]: toy-world scenes with "
                                                        "ground truth"),
    "eval": ("ovdiff_ray.evaluate:main", "--dataset toy|voc21|context60|coco_object81 --bank URI [--root DIR]: mIoU"),
    "segment": ("ovdiff_ray.segment:main", "IMAGE --bank URI --out FILE.png [--classes A,B]: one image, an overlay"),
    "serve": ("ovdiff_ray.serve.app:main", "--bank URI [--port P] [--follow] [--metrics-port P] [--log-format json] "
                                           "[--verbose]: the HTTP service"),
    "vocab": ("ovdiff_ray.vocab_import:import_main", "import FILE --out FILE.tsv (COCO/LVIS JSON or .txt)"),
    "weights": ("ovdiff_ray.mirror:main", "mirror --recipe R --to DIR|s3://... (for clusters without hub)"),
}

USAGE = "usage: ovdiff COMMAND [ARGS...]\n\ncommands:\n" + "\n".join(
    f"  ovdiff {name} {doc}" for name, (_, doc) in COMMANDS.items()) + "\n\nRun `ovdiff COMMAND --help` for a command's options."


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
