"""What `prototypes.support_filter: clip` would drop in a built bank (issue 26; not in `make bench`).

The filter is a function of each thing class's support record (its images' agreement with the class text and the
kept flags), so it is computed exactly from the records of a bank built with the filter off: per class, the images
it would drop. A class it drops nothing from gets bit-identical prototypes with the filter on (the pipeline is
deterministic), so only the listed classes can change the bank's mIoU.

    python bench/support_filter_quality.py BANK_URI [--mads 3] [--keep 0.5]
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from ovdiff_ray.store.fs import Location  # noqa: E402
from ovdiff_ray.store.shards import read_manifest  # noqa: E402
from ovdiff_ray.store.support import read_record  # noqa: E402
from ovdiff_ray.support import agreement_filter  # noqa: E402


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("bank")
    ap.add_argument("--mads", type=float, default=3.0)
    ap.add_argument("--keep", type=float, default=0.5)
    a = ap.parse_args()
    loc = Location(a.bank)
    m = read_manifest(loc)
    things = images = dropped = changed = 0
    for e in m["classes"]:
        if e["kind"] != "thing" or not e.get("support"):
            continue
        r = read_record(loc, e)
        keep = agreement_filter(r.signal("prompt_agreement"), r.kept, a.mads, a.keep)
        d = int(r.kept.sum() - keep.sum())
        things, images, dropped, changed = things + 1, images + r.n, dropped + d, changed + (d > 0)
        if d:
            print(f"filter.class: {e['name']!r} drops {d} of {r.n}")
    print(f"filter.things: {things}  images: {images}  dropped: {dropped}  classes_changed: {changed}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
