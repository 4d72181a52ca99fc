"""What a run will do, decided before any work: inputs validated, the listing diffed against the output."""
from __future__ import annotations

import argparse
import datetime as _dt
import json
import os
from dataclasses import dataclass, field

import pyarrow.fs as pafs

from ..store.fs import Location, StorageConfig
from ..store.schema import manifest_key
from ..store.shards import read_manifest
from ..vocab import fold
from .encode import OK, UNREADABLE, error_row, image_id
from .parts import read_parts

FORMATS = ("coco", "png", "labelstudio", "parquet")
IMAGE_EXTS = (".jpg", ".jpeg", ".png", ".webp")


class LabelError(ValueError):
    """A bad argument or input found before any work starts; the message names it."""

@dataclass
class Item:
    path: str  # key under the images root
    size: int  # bytes


@dataclass
class Plan:
    """Everything decided before any work: validated inputs, the listing, and what is pending."""

    images: Location
    out: Location
    formats: list[str]
    job: dict  # settings the output was (or is now) started with; job.json
    classes: dict[int, str]  # bank value -> name, requested classes
    kinds: dict[int, str]
    listing: list[Item]
    pending: list[Item]
    oversize: list[dict]  # error rows for files over --max-bytes (never sent to a worker)
    ignored: int  # files with other extensions
    skipped: int  # already labelled (or known unreadable) and unchanged
    known_bad: int  # unreadable before, same size: skipped (still in errors.jsonl)
    new_job: bool
    masks: dict[str, str] = field(default_factory=dict)  # image path -> masks/... key
    confs: dict[str, str] = field(default_factory=dict)  # image path -> confidence/... key (--scores)
    gt_ids: dict[str, int] | None = None  # --coco-images: file_name -> ground-truth image id

    @property
    def png_dtype(self) -> str:
        return "uint16" if max(self.classes, default=0) >= 255 else "uint8"  # 255 / 65535: unsure


def parse_formats(text: str) -> list[str]:
    formats = [f.strip().lower() for f in text.split(",") if f.strip()]
    bad = [f for f in formats if f not in FORMATS]
    if bad or not formats:
        raise LabelError(f"--format {text!r}: unknown format {', '.join(bad) or '(none)'} (known: {', '.join(FORMATS)})")
    return list(dict.fromkeys(formats))


def parse_classes(values: list[str] | None) -> list[str] | None:
    if values is None:
        return None
    names = [n.strip() for v in values for n in v.split(",") if n.strip()]
    if not names:
        raise LabelError("--classes: empty class list; name at least one class of the bank")
    return names


def list_images(loc: Location, exclude: str | None = None) -> tuple[list[Item], int]:
    """Image files under `loc` (recursive, sorted; hidden names and `exclude/` skipped) and how many other files."""
    info = loc.fs.get_file_info(loc.root)
    if info.type == pafs.FileType.File:
        raise LabelError(f"--images {loc.uri}: is a file, not a folder")
    if info.type == pafs.FileType.NotFound and not loc.is_s3:
        raise LabelError(f"--images {loc.uri}: no such folder")
    try:
        infos = loc.fs.get_file_info(pafs.FileSelector(loc.root, recursive=True, allow_not_found=True))
    except OSError as e:
        raise LabelError(f"--images {loc.uri}: cannot list it: {e}") from None
    items, ignored = [], 0
    for i in infos:
        if i.type != pafs.FileType.File:
            continue
        rel = i.path[len(loc.root) + 1:] if loc.root else i.path
        if any(part.startswith(".") for part in rel.split("/")) or (exclude and rel.startswith(exclude + "/")):
            continue
        if os.path.splitext(rel)[1].lower() in IMAGE_EXTS:
            items.append(Item(rel, int(i.size or 0)))
        else:
            ignored += 1
    if not items:
        raise LabelError(f"--images {loc.uri}: no images found ({', '.join(IMAGE_EXTS)}; {ignored} other files)")
    return sorted(items, key=lambda it: it.path), ignored


def mirror_names(paths: list[str], folder: str) -> dict[str, str]:
    """Image path -> `<folder>/<path with .png>`; when two images share a stem, the later keeps its extension."""
    out, taken = {}, set()
    for p in sorted(paths):
        key = f"{folder}/{os.path.splitext(p)[0]}.png"
        if key in taken:
            key = f"{folder}/{p}.png"
        taken.add(key)
        out[p] = key
    return out


def inside(out: Location, images: Location) -> str | None:
    """`out`'s path relative to the images root when it lies inside it (excluded from the listing)."""
    if out.is_s3 == images.is_s3 and out.root.startswith(images.root + "/"):
        return out.root[len(images.root) + 1:]
    return None


def read_job(out: Location) -> dict | None:
    if not out.exists("job.json"):
        return None
    try:
        return json.loads(out.read_bytes("job.json", 2 ** 20))
    except ValueError as e:
        raise LabelError(f"{out.display('job.json')}: not valid JSON ({e}); choose another --out") from None


def resolve_job(args: argparse.Namespace, out: Location, storage: StorageConfig) -> tuple[dict, dict, dict, bool]:
    """Settings of this run (bank, version, classes) checked against those the output was started with."""
    old = read_job(out)
    requested = parse_classes(args.classes)
    version = args.bank_version or (old or {}).get("bank_version")
    m = read_manifest(Location(args.bank, storage), version)
    if m is None:
        raise LabelError(f"--bank {args.bank}: no committed bank there (no manifests/)")
    live = [i for i, c in enumerate(m["classes"]) if c.get("removed") is None]  # removed classes: never labelled
    position = {fold(n): i for i in live for n in [m["classes"][i]["name"], *m["classes"][i].get("aliases", [])]}
    names = requested if requested is not None else (old or {}).get("classes")
    if names is not None:
        unknown = [n for n in names if fold(n) not in position]
        if unknown:
            raise LabelError(f"--classes: unknown classes (not in bank {m['bank_id']} v{m['version']}): "
                             f"{', '.join(unknown)}")
        ids = sorted({position[fold(n)] for n in names})
    else:
        ids = live
    job = {"tool": "label_dataset", "bank": args.bank, "bank_id": m["bank_id"], "bank_version": m["version"],
           "bank_manifest": manifest_key(m["version"]),
           "classes": [m["classes"][i]["name"] for i in ids] if names is not None else None, "pamr": args.pamr}
    minc = getattr(args, "min_confidence", None)
    job["min_confidence"] = float(minc if minc is not None else (old or {}).get(
        "min_confidence", recipe_min_confidence(m)))
    if not 0.0 <= job["min_confidence"] <= 1.0:
        raise LabelError(f"--min-confidence {job['min_confidence']}: expected a number in [0, 1] (0 = off)")
    if old is not None:
        old = {"min_confidence": 0.0, **old}  # a job from before issue 21 had no unsure pixels
        diff = [k for k in ("bank_id", "bank_version", "classes", "pamr", "min_confidence") if old.get(k) != job[k]]
        if diff:
            said = ", ".join(f"{k}={old.get(k)!r} (now {job[k]!r})" for k in diff)
            raise LabelError(f"--out {args.out} already holds labels made with other settings: {said}; repeat "
                             "those settings to resume, or choose another --out")
    classes = {i + 1: m["classes"][i]["name"] for i in ids}
    kinds = {i + 1: m["classes"][i].get("kind", "thing") for i in ids}
    return job, classes, kinds, old is None


def recipe_min_confidence(m: dict) -> float:
    """The bank recipe's `segmentation.min_confidence` (0 when the manifest's recipe predates it)."""
    return float(((m.get("recipe") or {}).get("segmentation") or {}).get("min_confidence", 0.0) or 0.0)


def plan(args: argparse.Namespace) -> Plan:
    """Validate everything and diff the listing against the output. Writes nothing."""
    formats = parse_formats(args.format)
    for name in ("batch_size", "max_pixels", "max_bytes"):
        if getattr(args, name) < 1:
            raise LabelError(f"--{name.replace('_', '-')} must be >= 1")
    if args.workers is not None and args.workers < 1 or args.overlays < 0 or args.gpus_per_worker < 0:
        raise LabelError("--workers must be >= 1, --overlays and --gpus-per-worker >= 0")
    storage = StorageConfig.from_env()
    images, out = Location(args.images, storage), Location(args.out, storage)
    if not out.is_s3 and os.path.isfile(out.root):
        raise LabelError(f"--out {args.out}: is a file, not a folder")
    job, classes, kinds, new_job = resolve_job(args, out, storage)
    listing, ignored = list_images(images, inside(out, images))
    ids: dict[int, str] = {}
    for it in listing:
        other = ids.setdefault(image_id(it.path), it.path)
        if other != it.path:
            raise LabelError(f"--images: {other} and {it.path} hash to the same COCO image id; rename one")
    gt_ids = None
    if getattr(args, "coco_images", None):
        if "coco" not in formats:
            raise LabelError("--coco-images goes with --format coco")
        from .coco import read_gt_images

        gt_ids = read_gt_images(args.coco_images)
    latest = {r["path"]: r for r in read_parts(out, ["path", "size", "status"])[0].to_pylist()}
    pending, oversize, known_bad = [], [], 0
    for it in listing:
        r = latest.get(it.path)
        if r is not None and r["size"] == it.size and (r["status"] == OK or
                                                        (r["status"] == UNREADABLE and not args.retry_errors)):
            known_bad += r["status"] != OK
            continue
        if it.size > args.max_bytes:
            oversize.append(error_row(it.path, it.size, UNREADABLE,
                                      f"{it.size} bytes, over the limit of {args.max_bytes} (--max-bytes)"))
        else:
            pending.append(it)
    skipped = len(listing) - len(pending) - len(oversize)
    if args.limit is not None:
        pending = pending[: max(0, args.limit)]
    p = Plan(images, out, formats, job, classes, kinds, listing, pending, oversize, ignored, skipped, known_bad,
             new_job, gt_ids=gt_ids)
    p.masks = mirror_names([it.path for it in listing], "masks")
    p.confs = mirror_names([it.path for it in listing], "confidence")
    return p

def info(p: Plan) -> dict:
    from .. import __version__

    return {"description": f"ovdiff labels of {p.images.uri}", "images_root": p.images.uri,
            "bank": p.job["bank"], "bank_id": p.job["bank_id"],
            "bank_version": p.job["bank_version"], "pamr": p.job["pamr"], "version": __version__,
            "min_confidence": p.job.get("min_confidence", 0.0),
            "date_created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")}

