"""`ovdiff bank inspect URI [--version N] [--verify] [--json] [--report [--price-per-hour P] [--top N]]`: what a
committed bank holds; `--report` adds the build report (per-stage seconds, slowest classes, device-hours, cost) from
the classes' build records (`ovdiff_ray/build_report.py`)."""
from __future__ import annotations

import json
import sys

from .fs import Location, StoreError
from .schema import ManifestError
from .shards import read_manifest, read_shard_bytes
from ..cli_help import Parser


def summarize(m: dict) -> dict:
    extractors: dict[str, dict] = {}
    for c in m["classes"]:
        for ex, n in c.get("prototypes", {}).items():
            e = extractors.setdefault(ex, {"dim": c.get("dims", {}).get(ex, 0), "prototypes": 0})
            e["prototypes"] += n
    r = m["recipe"]
    g = r.get("generation", {})
    return {
        "bank_id": m["bank_id"], "version": m["version"], "created": m.get("created"),
        "num_classes": sum(c.get("removed") is None for c in m["classes"]),
        "classes": [c["name"] for c in m["classes"] if c.get("removed") is None],
        "removed": [c["name"] for c in m["classes"] if c.get("removed") is not None],
        "kinds": {k: sum(c["kind"] == k and c.get("removed") is None for c in m["classes"]) for k in ("thing", "stuff")},
        "extractors": extractors, "bytes": sum(int(c.get("bytes", 0)) for c in m["classes"]),
        "recipe": {"name": r.get("name"), "generator": g.get("generator"), "n_images": g.get("n_images"),
                   "steps": g.get("steps"), "masks": r.get("masks", {}).get("method"),
                   "parts": r.get("prototypes", {}).get("parts"),
                   "extractors": [e.get("name") for e in r.get("extractors", [])]},
        "failed": m.get("failed", []),
    }


def main(argv: list[str] | None = None) -> int:
    from .. import audit, show
    from . import edit_cli

    ap = Parser(prog="ovdiff bank", description="Inspect, show, audit and fix a committed prototype bank.",
                epilog="Rebuild classes in place: build_bank --rebuild NAME ... (see `build_bank --help`).")
    sub = ap.add_subparsers(dest="action", required=True)
    show.add_arguments(sub.add_parser("show", help="a class's support set as a contact sheet (fg green, bg red, "
                                      "dropped images dimmed)", description=show.DESCRIPTION))
    audit.add_arguments(sub.add_parser("audit", help="rank classes worst first, suspects with reasons in words",
                                       description=audit.DESCRIPTION))
    edit_cli.add_parsers(sub)
    ins = sub.add_parser("inspect", help="show a bank's version, classes, extractors and size")
    ins.add_argument("uri", help="bank location: local folder, file:// or s3://bucket/prefix")
    ins.add_argument("--version", type=int, default=None, help="manifest version (default: latest)")
    ins.add_argument("--verify", action="store_true", help="read every shard and check its sha256")
    ins.add_argument("--json", action="store_true", help="print one JSON object")
    ins.add_argument("--report", action="store_true",
                     help="the build report: seconds per stage, slowest classes, attempts, nodes, device-hours")
    ins.add_argument("--price-per-hour", type=float, default=None, metavar="USD",
                     help="with --report: price of one device-hour (e.g. a GPU instance's), to print the cost "
                          "(default: no cost)")
    ins.add_argument("--top", type=int, default=None, help="with --report: how many of the slowest classes (default 10)")
    a = ap.parse_args(argv)
    if a.action == "show":
        return show.run(a, ap)
    if a.action == "audit":
        return audit.run(a)
    if a.action in edit_cli.ACTIONS:
        return edit_cli.run(a)
    if a.price_per_hour is not None and (a.price_per_hour < 0 or not a.report):
        ap.error("--price-per-hour needs --report (it prices the report's device-hours) and a price of at least 0")
    if a.top is not None and not a.report:
        ap.error("--top needs --report (it picks how many of the slowest classes the report lists)")
    if a.top is not None and a.top < 1:
        ap.error(f"--top {a.top}: must be at least 1")
    try:
        loc = Location(a.uri)
        m = read_manifest(loc, a.version)
        if m is None:
            raise ManifestError(f"{a.uri}: no committed bank here (no manifests/)")
        info = summarize(m)
        if a.verify:
            from .support import verify_record

            records = 0
            for c in m["classes"]:
                if c.get("removed") is not None:  # a tombstone has no shard
                    continue
                read_shard_bytes(loc, c)
                if c.get("support"):  # issue 26: the support record too (sha256, every image and mask decodes)
                    verify_record(loc, c)
                    records += 1
            info["verified"] = True
            info["verified_records"] = records
        if a.report:
            from ..build_report import report

            rep = report(m, a.top or 10, a.price_per_hour)
            info["report"] = rep.to_dict()
    except (StoreError, ManifestError, OSError) as e:
        print(f"ovdiff bank inspect: error: {e}", file=sys.stderr)
        return 1
    if a.json:
        print(json.dumps(info))
        return 0
    print(f"bank {info['bank_id']} v{info['version']} at {a.uri} (created {info['created']})")
    print(f"classes: {info['num_classes']} ({info['kinds']['thing']} thing, {info['kinds']['stuff']} stuff)")
    for ex, e in info["extractors"].items():
        print(f"  extractor {ex}: dim {e['dim']}, {e['prototypes']} prototypes")
    print(f"bytes: {info['bytes']:,}  recipe: {info['recipe']}")
    if info["failed"]:
        print(f"failed classes: {', '.join(f['name'] for f in info['failed'])}")
    if a.verify:
        print(f"verified: all {info['num_classes']} shards match their sha256, and {info['verified_records']} "
              "support records (sha256, images and masks decode)")
    if a.report:
        from ..build_report import format_report

        print(format_report(rep))
    return 0
