"""`ovdiff bank show URI CLASS --out FILE.png [--version N] [--cols C] [--side PX]`: a class's support set from its
record (issue 26) as a contact sheet: each support image with its foreground outlined green and its background
red; images the prototypes were not made from are dimmed. Nothing is drawn again: it reads the bank.
"""
from __future__ import annotations

import argparse
import sys

import numpy as np

DIM = 0.35  # brightness of a dropped image's tile


def outline(mask: np.ndarray) -> np.ndarray:
    """`[h, w]` bool -> its inner boundary `[h, w]` bool (a pixel of the mask with a 4-neighbour outside it)."""
    p = np.pad(mask, 1, constant_values=False)
    inner = p[1:-1, 1:-1] & p[:-2, 1:-1] & p[2:, 1:-1] & p[1:-1, :-2] & p[1:-1, 2:]
    return mask & ~inner


def tile(image: np.ndarray, fg: np.ndarray, bg: np.ndarray, kept: bool, side: int) -> np.ndarray:
    """One tile `[side, side, 3]` uint8: the image resized, fg outline green, bg outline red, dimmed if dropped."""
    from PIL import Image

    t = np.asarray(Image.fromarray(image).resize((side, side), Image.BILINEAR)).copy()
    for mask, colour in ((bg, (255, 0, 0)), (fg, (0, 255, 0))):
        m = np.asarray(Image.fromarray(mask.astype(np.uint8) * 255).resize((side, side), Image.NEAREST)) > 127
        t[outline(m)] = colour
    if not kept:
        t = (t * DIM).astype(np.uint8)
    return t


def contact_sheet(record, cols: int = 8, side: int = 160):
    """A `store.support.SupportRecord` -> PIL image: `ceil(N / cols)` rows of `min(N, cols)` tiles of `side` px."""
    from PIL import Image

    n = record.n
    kept = record.kept
    rows = -(-n // cols)
    sheet = np.full((rows * side, min(cols, n) * side, 3), 255, np.uint8)
    for i in range(n):
        fg, bg = record.masks(i)
        r, c = divmod(i, cols)
        sheet[r * side:(r + 1) * side, c * side:(c + 1) * side] = tile(record.image(i), fg, bg, bool(kept[i]), side)
    return Image.fromarray(sheet)


DESCRIPTION = __doc__.split("\n\n")[0].split(": ", 1)[1]


def add_arguments(ap: argparse.ArgumentParser) -> None:
    """`ovdiff bank show`'s arguments (its own parser, or a subparser of `ovdiff bank`)."""
    ap.add_argument("uri", help="bank location: local folder, file:// or s3://bucket/prefix")
    ap.add_argument("name", metavar="CLASS", help="class name (as in the bank; case and spaces folded)")
    ap.add_argument("--out", required=True, help="PNG file to write")
    ap.add_argument("--version", type=int, default=None, help="manifest version (default: latest)")
    ap.add_argument("--cols", type=int, default=8, help="tiles per row (default 8)")
    ap.add_argument("--side", type=int, default=160, help="tile side in pixels (default 160, 16..1024)")


def main(argv: list[str] | None = None) -> int:
    from .cli_help import Parser

    ap = Parser(prog="ovdiff bank show", description=DESCRIPTION)
    add_arguments(ap)
    return run(ap.parse_args(argv), ap)


def run(a: argparse.Namespace, ap: argparse.ArgumentParser) -> int:
    """Write the contact sheet of parsed arguments `a` (`ap` reports argument errors)."""
    if a.cols < 1 or not 16 <= a.side <= 1024:
        ap.error(f"--cols must be >= 1 and --side in 16..1024 (got {a.cols}, {a.side})")
    if not a.out.lower().endswith(".png"):
        ap.error(f"--out {a.out!r}: must name a .png file")
    from .store.fs import Location, StoreError
    from .store.schema import ManifestError
    from .store.shards import read_manifest
    from .store.support import read_record
    from .vocab import fold

    try:
        loc = Location(a.uri)
        m = read_manifest(loc, a.version)
        if m is None:
            raise ManifestError(f"{a.uri}: no committed bank here (no manifests/)")
        live = [c for c in m["classes"] if c.get("removed") is None]  # tombstones have no support record
        by = {fold(n): c for c in live for n in [c["name"], *c.get("aliases", [])]}
        entry = by.get(fold(a.name))
        if entry is None:
            close = [c["name"] for c in live if fold(a.name) in fold(c["name"])][:5]
            hint = f" (did you mean: {', '.join(close)})" if close else ""
            raise KeyError(f"no class {a.name!r} in bank {m['bank_id']} v{m['version']}{hint}")
        rec = read_record(loc, entry)
        sheet = contact_sheet(rec, a.cols, a.side)
        sheet.save(a.out)
    except KeyError as e:
        print(f"ovdiff bank show: error: {e.args[0]}", file=sys.stderr)
        return 1
    except (StoreError, ManifestError, OSError) as e:
        print(f"ovdiff bank show: error: {e}", file=sys.stderr)
        return 1
    k = int(rec.kept.sum())
    print(f"bank show {entry['name']!r} (bank {m['bank_id']} v{m['version']}): {rec.n} support images, {k} kept, "
          f"{rec.n - k} dimmed -> {a.out} ({sheet.width}x{sheet.height})")
    return 0
