"""`label_dataset`: label a folder or bucket of images with a prototype bank, on Ray Data; resumable.

The driver lists the images (local folder, file:// or s3://bucket/prefix; nested folders; jpg, jpeg, png, webp),
skips those the output already holds and sends the rest through Ray Data (`from_items` -> `map_batches(Labeller)`
under an actor pool). Each Labeller loads the models and only the requested classes' prototypes once, reads and
decodes its images itself (an unreadable file becomes an error row, never a stopped job) and returns compact rows:
per-class COCO RLE, plus Label Studio brush RLE or a class-index PNG when those formats are asked; no dense maps.
The driver writes each block as it arrives as a Parquet part under `<out>/parts/` (a crash loses only the images in
flight), then assembles the requested formats from all parts, so any format can be added later without relabelling:

    coco         annotations.json: images, categories, one RLE annotation per class per image (pycocotools)
    png          masks/<input path>.png: class index (uint8; uint16 past 255) + classes.json
    labelstudio  tasks.json: Label Studio pre-annotation tasks (brushlabels, Label Studio brush RLE)
    parquet      labels.parquet: one row per image (path, width, height, classes, per-class RLE, area, bbox)

and errors.jsonl (one line per unreadable or failed image, with the reason), overlays/ (--overlays N). Label values
are the bank's: 0 background, c + 1 = class c of the bank manifest, stable across class subsets. Exit status: 0 when
every image was labelled or is listed as unreadable in errors.jsonl, 1 when labelling itself failed for some, 2 on
bad arguments (nothing written), 130 on Ctrl-C (what arrived is kept).

    label_dataset --images ./photos --bank ./banks/toy --out ./labels --format coco,png --overlays 8
    ray job submit --address http://HEAD:8265 -- label_dataset --images s3://b/photos --bank s3://b/banks/lvis \\
        --out s3://b/labels/lvis --format coco --classes dog cat "picture frame" --gpus-per-worker 1 --workers 8
"""
from __future__ import annotations

import argparse
import datetime as _dt
import io
import json
import math
import os
import signal
import socket
import sys
import time
import traceback
import uuid
from dataclasses import dataclass, field
from urllib.parse import quote

import numpy as np
import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from .store.fs import Location, StorageConfig, StoreError
from .store.schema import ManifestError, manifest_key
from .store.shards import read_manifest
from .vocab import fold

FORMATS = ("coco", "png", "labelstudio", "parquet")
IMAGE_EXTS = (".jpg", ".jpeg", ".png", ".webp")
OK, UNREADABLE, FAILED = "ok", "unreadable", "failed"
MAX_PIXELS = 100_000_000
MAX_BYTES = 256 * 2 ** 20
LS_RLE_SIZES = (3, 4, 8, 16)  # Label Studio's run-length size classes (bits)

ROW_SCHEMA = pa.schema([
    ("path", pa.string()),  # key under --images, '/'-separated
    ("size", pa.int64()),  # bytes when listed: a file whose size changed is labelled again
    ("status", pa.string()),  # ok | unreadable (bad input) | failed (labelling raised)
    ("error", pa.string()),
    ("width", pa.int32()),
    ("height", pa.int32()),
    ("values", pa.list_(pa.int32())),  # label values present, background excluded, ascending
    ("names", pa.list_(pa.string())),
    ("counts", pa.list_(pa.string())),  # COCO compressed RLE counts (ASCII), column-major
    ("area", pa.list_(pa.int64())),
    ("bbox", pa.list_(pa.list_(pa.float64()))),  # [x, y, w, h]
    ("ls_rle", pa.list_(pa.binary())),  # Label Studio brush RLE per class (when labelstudio is asked)
    ("png", pa.binary()),  # class-index PNG (when png is asked); written as a file, not kept in parts
    ("seconds", pa.float64()),
    ("worker", pa.string()),
])
PART_SCHEMA = ROW_SCHEMA.remove(ROW_SCHEMA.get_field_index("png"))


class LabelError(ValueError):
    """A bad argument or input found before any work starts; the message names it."""


class ImageError(Exception):
    """A file that is not a readable image (not a ValueError, so decoder ValueErrors can be wrapped)."""


# ------------------------------------------------------------------------------------------------ encoders

def decode_image(data: bytes, max_pixels: int = MAX_PIXELS) -> np.ndarray:
    """Image file bytes -> `[H, W, 3]` uint8 (as `segment.read_image` decodes); ImageError with the reason."""
    from PIL import Image, UnidentifiedImageError

    from .segment import to_rgb_array

    try:
        with Image.open(io.BytesIO(data)) as im:
            w, h = im.size
            if w * h > max_pixels:
                raise ImageError(f"{w}x{h} image: {w * h} pixels, over the limit of {max_pixels} (--max-pixels)")
            im.load()
            return np.array(to_rgb_array(im))  # writable, as torch.from_numpy wants
    except UnidentifiedImageError:
        raise ImageError(f"not an image ({len(data)} bytes that no image decoder recognises)") from None
    except Image.DecompressionBombError as e:
        raise ImageError(f"too many pixels (decompression bomb): {e}") from None
    except (OSError, SyntaxError, ValueError, EOFError, IndexError) as e:
        raise ImageError(f"corrupt or truncated image ({type(e).__name__}: {e})") from None


def coco_rle(mask: np.ndarray) -> tuple[str, int, list[float]]:
    """Boolean mask `[H, W]` -> (COCO compressed RLE counts as ASCII, area, bbox [x, y, w, h])."""
    from pycocotools import mask as mu

    rle = mu.encode(np.asfortranarray(mask, dtype=np.uint8))
    return rle["counts"].decode("ascii"), int(mu.area(rle)), [float(v) for v in mu.toBbox(rle)]


def coco_decode(counts: str, height: int, width: int) -> np.ndarray:
    """COCO compressed RLE counts -> boolean mask `[H, W]`."""
    from pycocotools import mask as mu

    return mu.decode({"size": [height, width], "counts": counts.encode("ascii")}).astype(bool)


def _pack_bits(values: np.ndarray, widths: np.ndarray) -> bytes:
    """Fields (value, width in bits), most significant bit first, then 1-8 zero bits as Label Studio pads."""
    shifts = np.arange(31, -1, -1, dtype=np.uint64)
    bits = (values.astype(np.uint64)[:, None] >> shifts) & np.uint64(1)
    stream = bits[shifts[None, :] < widths.astype(np.uint64)[:, None]].astype(np.uint8)
    return np.packbits(np.concatenate([stream, np.zeros(8 - stream.size % 8, np.uint8)])).tobytes()


def ls_brush_rle(mask: np.ndarray) -> bytes:
    """Label Studio brush RLE of a boolean mask `[H, W]`: the bytes `label_studio_sdk.converter.brush.mask2rle`
    gives for the mask as 0/255 (pixels row-major, each repeated over RGBA), in thi.ng rle-pack's format: a 32-bit
    count, 5-bit word size - 1, four 4-bit run-size classes - 1, then per run: 1 (a repeat), the size class (2 bits),
    the run length - 1 in that class's bits, the 8-bit value; runs over 2**16 are split as the SDK splits them."""
    flat = np.ascontiguousarray(mask, dtype=bool).ravel()
    starts = np.flatnonzero(np.r_[True, flat[1:] != flat[:-1]]) if flat.size else np.zeros(0, np.int64)
    runs = np.diff(np.r_[starts, flat.size]).astype(np.int64) * 4
    cls = (runs > 8).astype(np.int64) + (runs > 16) + (runs > 256)
    pieces = np.where(runs > 2 ** 16, (runs - 1) // 2 ** 16 + 1, 1)
    which = np.repeat(np.arange(len(runs)), pieces)
    nth = np.arange(len(which)) - np.repeat(np.cumsum(pieces) - pieces, pieces)
    length = np.where(nth < pieces[which] - 1, 2 ** 16, runs[which] - (pieces[which] - 1) * 2 ** 16)
    tok_cls = cls[which]
    vals = np.stack([np.ones_like(length), tok_cls, length - 1, np.where(flat[starts][which], 255, 0)], 1)
    widths = np.stack([np.ones_like(length), np.full_like(length, 2), np.array(LS_RLE_SIZES)[tok_cls],
                       np.full_like(length, 8)], 1)
    head_v = np.array([flat.size * 4, 8 - 1] + [s - 1 for s in LS_RLE_SIZES])
    head_w = np.array([32, 5, 4, 4, 4, 4])
    return _pack_bits(np.r_[head_v, vals.ravel()], np.r_[head_w, widths.ravel()])


def encode_png(labels: np.ndarray, dtype: str) -> bytes:
    """Class-index map -> single-channel PNG (8-bit, or 16-bit for `uint16`)."""
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(np.ascontiguousarray(labels.astype(dtype))).save(buf, format="PNG")
    return buf.getvalue()


def encode_labels(labels: np.ndarray, names: dict[int, str], png_dtype: str | None, labelstudio: bool) -> dict:
    """Label map in bank values -> the compact fields of a row (per-class RLE, optional PNG / brush RLE)."""
    present = [int(v) for v in np.unique(labels) if v > 0]
    row = dict(width=int(labels.shape[1]), height=int(labels.shape[0]), values=present,
               names=[names[v] for v in present], counts=[], area=[], bbox=[], ls_rle=[], png=b"")
    for v in present:
        mask = labels == v
        counts, area, bbox = coco_rle(mask)
        row["counts"].append(counts)
        row["area"].append(area)
        row["bbox"].append(bbox)
        if labelstudio:
            row["ls_rle"].append(ls_brush_rle(mask))
    if png_dtype:
        row["png"] = encode_png(labels, png_dtype)
    return row


def labels_of(row: dict) -> np.ndarray:
    """A stored row -> its label map `[H, W]` int32 (bank values)."""
    out = np.zeros((row["height"], row["width"]), np.int32)
    for v, counts in zip(row["values"], row["counts"]):
        out[coco_decode(counts, row["height"], row["width"])] = v
    return out


def error_row(path: str, size: int, status: str, error: str, worker: str = "driver") -> dict:
    return dict(path=path, size=size, status=status, error=error, width=0, height=0, values=[], names=[],
                counts=[], area=[], bbox=[], ls_rle=[], png=b"", seconds=0.0, worker=worker)


# ------------------------------------------------------------------------------------------------ the UDF

class Labeller:
    """Ray Data callable class: models and the requested classes' prototypes loaded once per actor; a batch of
    image paths -> a table of compact rows (ROW_SCHEMA). Decoding happens here, so a bad file is one error row."""

    def __init__(self, bank: str, version: int, classes: list[str] | None, images: str, storage: dict | None = None,
                 png_dtype: str | None = None, labelstudio: bool = False, pamr: bool = False,
                 max_pixels: int = MAX_PIXELS, max_bytes: int = MAX_BYTES, device: str = "cpu"):
        from .segment import Segmenter
        from .store.shared import load_shared

        self.images = Location(images, storage)
        # the node's one read-only copy of this version's arrays (memory-mapped), shared by its actors
        b = load_shared(bank, version=version, classes=classes, storage_options=storage)
        self.seg = Segmenter.from_bank(b, device)
        position = {c["name"]: i for i, c in enumerate(b.manifest["classes"])}
        self.lut = np.array([0] + [position[n] + 1 for n in b.names], np.int32)  # loaded index -> bank value
        self.names = {position[n] + 1: n for n in b.names}
        self.png_dtype, self.labelstudio, self.pamr = png_dtype, labelstudio, pamr
        self.max_pixels, self.max_bytes = max_pixels, max_bytes
        self.worker = f"{socket.gethostname()}:{os.getpid()}"

    def __call__(self, batch: dict[str, np.ndarray]) -> pa.Table:
        """Decode each image (a bad file is an error row), then segment the readable ones as one batch."""
        t0 = time.perf_counter()
        rows: list[dict | None] = []
        todo: list[tuple[int, str, int, np.ndarray]] = []
        for p, s in zip(batch["path"], batch["size"]):
            path, size = str(p), int(s)
            try:
                todo.append((len(rows), path, size, decode_image(self.images.read_bytes(path, self.max_bytes),
                                                                 self.max_pixels)))
                rows.append(None)
            except (StoreError, ImageError) as e:
                rows.append(error_row(path, size, UNREADABLE, str(e), self.worker))
        try:
            results = self.seg.segment_batch([rgb for *_, rgb in todo], pamr=self.pamr)
        except Exception:  # noqa: BLE001 - find the image that fails: one by one
            results = [None] * len(todo)
        secs = (time.perf_counter() - t0) / max(len(todo), 1)
        for (i, path, size, rgb), res in zip(todo, results):
            rows[i] = self.label_one(path, size, rgb, res, secs)
        return pa.Table.from_pylist(rows, schema=ROW_SCHEMA)

    def label_one(self, path: str, size: int, rgb: np.ndarray, res=None, secs: float = 0.0) -> dict:
        """One decoded image (already segmented when `res` is given) -> a row; a failure is an error row."""
        t0 = time.perf_counter()
        try:
            if res is None:
                res = self.seg.segment(rgb, pamr=self.pamr)
            row = encode_labels(self.lut[res.labels], self.names, self.png_dtype, self.labelstudio)
        except Exception as e:  # noqa: BLE001 - reported per image; the job goes on
            return error_row(path, size, FAILED, f"{type(e).__name__}: {e}\n{traceback.format_exc(limit=4)}",
                             self.worker)
        return dict(path=path, size=size, status=OK, error="", **row, seconds=secs + time.perf_counter() - t0,
                    worker=self.worker)


# ------------------------------------------------------------------------------------------------ the driver

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

    @property
    def png_dtype(self) -> str:
        return "uint16" if max(self.classes, default=0) > 255 else "uint8"


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(prog="label_dataset", description=__doc__.split("\n\n")[0],
                                 epilog=__doc__.split("\n\n", 1)[1], formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--images", required=True, help="folder or s3://bucket/prefix of images (searched recursively)")
    ap.add_argument("--bank", required=True, help="bank URI (folder or s3://bucket/prefix)")
    ap.add_argument("--out", required=True, help="output folder or s3://bucket/prefix")
    ap.add_argument("--format", required=True,
                    help=f"one or more of {', '.join(FORMATS)}, comma-separated (e.g. coco,png)")
    ap.add_argument("--classes", nargs="+", default=None,
                    help="subset of the bank's classes (names; commas also separate). Default: all, or the classes "
                         "the output was started with")
    ap.add_argument("--bank-version", type=int, default=None,
                    help="bank version (default: latest, or the version the output was started with)")
    ap.add_argument("--workers", type=int, default=None,
                    help="actors in the pool (default: GPUs / --gpus-per-worker, or CPUs / --cpus-per-worker)")
    ap.add_argument("--gpus-per-worker", type=float, default=0.0, help="GPUs per actor (0 on CPU machines)")
    ap.add_argument("--cpus-per-worker", type=float, default=1.0, help="CPUs per actor (default 1)")
    ap.add_argument("--batch-size", type=int, default=4, help="images per batch sent to an actor (default 4)")
    ap.add_argument("--pamr", action="store_true", help="refine the label maps with PAMR")
    ap.add_argument("--address", default=None, help="Ray address (default: RAY_ADDRESS, a running cluster, or local)")
    ap.add_argument("--overlays", type=int, default=0, metavar="N",
                    help="also write overlays/ pictures of the first N images (sorted by path)")
    ap.add_argument("--max-pixels", type=int, default=MAX_PIXELS, help=f"larger images are errors ({MAX_PIXELS})")
    ap.add_argument("--max-bytes", type=int, default=MAX_BYTES, help=f"larger files are errors ({MAX_BYTES})")
    ap.add_argument("--limit", type=int, default=None, help="label at most N pending images this run")
    ap.add_argument("--retry-errors", action="store_true",
                    help="try again images an earlier run found unreadable (default: skipped while unchanged)")
    ap.add_argument("--image-url", default=None,
                    help="labelstudio: prefix for data.image (default: the image's own URI)")
    ap.add_argument("--from-name", default="tag", help="labelstudio: BrushLabels tag name (default tag)")
    ap.add_argument("--to-name", default="image", help="labelstudio: Image tag name (default image)")
    return ap.parse_args(argv)


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
    position = {fold(c["name"]): i for i, c in enumerate(m["classes"])}
    names = requested if requested is not None else (old or {}).get("classes")
    if names is not None:
        unknown = [n for n in names if fold(n) not in position]
        if unknown:
            raise LabelError(f"--classes: unknown classes (not in bank {m['bank_id']} v{m['version']}): "
                             f"{', '.join(unknown)}")
        ids = sorted({position[fold(n)] for n in names})
    else:
        ids = list(range(len(m["classes"])))
    job = {"tool": "label_dataset", "bank": args.bank, "bank_id": m["bank_id"], "bank_version": m["version"],
           "bank_manifest": manifest_key(m["version"]),
           "classes": [m["classes"][i]["name"] for i in ids] if names is not None else None, "pamr": args.pamr}
    if old is not None:
        diff = [k for k in ("bank_id", "bank_version", "classes", "pamr") if old.get(k) != job[k]]
        if diff:
            said = ", ".join(f"{k}={old.get(k)!r} (now {job[k]!r})" for k in diff)
            raise LabelError(f"--out {args.out} already holds labels made with other settings: {said}; repeat "
                             "those settings to resume, or choose another --out")
    classes = {i + 1: m["classes"][i]["name"] for i in ids}
    kinds = {i + 1: m["classes"][i].get("kind", "thing") for i in ids}
    return job, classes, kinds, old is None


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
             new_job)
    p.masks = mirror_names([it.path for it in listing], "masks")
    return p


# ------------------------------------------------------------------------------------------------ parts

def read_parts(out: Location, columns: list[str] | None = None) -> tuple[pa.Table, list[str]]:
    """All parts -> (the latest row per image path, the part keys read). Parts are named in time order."""
    keys = [k for k in out.list("parts") if k.endswith(".parquet")]
    schema = pa.schema([PART_SCHEMA.field(c) for c in columns]) if columns else PART_SCHEMA
    tables = [pq.read_table(out.path(k), filesystem=out.fs, columns=columns) for k in keys]
    t = pa.concat_tables(tables) if tables else schema.empty_table()
    if t.num_rows == 0:
        return t, keys
    t = t.append_column("_i", pa.array(np.arange(t.num_rows)))
    last = t.group_by("path").aggregate([("_i", "max")]).column("_i_max").to_numpy()
    return t.take(np.sort(last)).drop_columns(["_i"]), keys


def part_key(run: str, seq: int | str) -> str:
    return f"parts/{run}-{seq}.parquet"


def write_part(out: Location, key: str, table: pa.Table) -> None:
    buf = io.BytesIO()
    pq.write_table(table.select(PART_SCHEMA.names).cast(PART_SCHEMA), buf)
    out.write_bytes(key, buf.getvalue())


def compact(out: Location, run: str, table: pa.Table, keys: list[str]) -> None:
    """Replace the parts `keys` by one holding `table`, read from them (the latest row per path); it sorts last."""
    if len(keys) <= 1:
        return
    write_part(out, part_key(run, "z-compact"), table)
    for k in keys:
        try:
            out.fs.delete_file(out.path(k))
        except OSError:  # a leftover part only repeats rows the compacted one supersedes
            pass


def new_run_id() -> str:
    return _dt.datetime.now(_dt.timezone.utc).strftime("%Y%m%dT%H%M%S%f") + "-" + uuid.uuid4().hex[:6]


# ------------------------------------------------------------------------------------------------ writers

def write_coco(p: Plan, rows: list[dict]) -> None:
    images, anns = [], []
    for image_id, r in enumerate(rows, 1):
        images.append({"id": image_id, "file_name": r["path"], "width": r["width"], "height": r["height"]})
        for v, counts, area, bbox in zip(r["values"], r["counts"], r["area"], r["bbox"]):
            anns.append({"id": len(anns) + 1, "image_id": image_id, "category_id": v, "iscrowd": 0, "area": area,
                         "bbox": bbox, "segmentation": {"size": [r["height"], r["width"]], "counts": counts}})
    doc = {"info": info(p), "licenses": [], "images": images, "annotations": anns,
           "categories": [{"id": v, "name": n, "supercategory": p.kinds[v]} for v, n in p.classes.items()]}
    p.out.write_bytes("annotations.json", json.dumps(doc).encode())


def write_png(p: Plan, rows: list[dict]) -> None:
    """classes.json, and masks that are missing (labelled by a run that did not ask for png) from the RLE."""
    doc = {**info(p), "dtype": p.png_dtype, "classes": {"0": "background", **{str(v): n for v, n in p.classes.items()}}}
    p.out.write_bytes("classes.json", json.dumps(doc, indent=1).encode())
    sel = pafs.FileSelector(p.out.path("masks"), recursive=True, allow_not_found=True)
    have = {i.path[len(p.out.root) + 1:] for i in p.out.fs.get_file_info(sel)}
    for r in rows:
        if p.masks[r["path"]] not in have:
            p.out.write_bytes(p.masks[r["path"]], encode_png(labels_of(r), p.png_dtype))


def write_labelstudio(p: Plan, rows: list[dict], url: str | None, from_name: str, to_name: str) -> None:
    tasks = []
    version = f"ovdiff {p.job['bank_id']} v{p.job['bank_version']}" + (" pamr" if p.job["pamr"] else "")
    for r in rows:
        rles = r["ls_rle"] if len(r["ls_rle"]) == len(r["values"]) else [
            ls_brush_rle(coco_decode(c, r["height"], r["width"])) for c in r["counts"]]
        result = [{"id": f"{i}-{v}", "from_name": from_name, "to_name": to_name, "type": "brushlabels",
                   "original_width": r["width"], "original_height": r["height"],
                   "image_rotation": 0, "value": {"format": "rle", "rle": list(rle), "brushlabels": [n]}}
                  for i, (v, n, rle) in enumerate(zip(r["values"], r["names"], rles))]
        image = f"{url.rstrip('/')}/{quote(r['path'])}" if url else p.images.display(r["path"])
        tasks.append({"data": {"image": image, "path": r["path"]},
                      "predictions": [{"model_version": version, "result": result}]})
    p.out.write_bytes("tasks.json", json.dumps(tasks).encode())


def write_parquet(p: Plan, rows: list[dict]) -> None:
    cols = ["path", "width", "height", "values", "names", "counts", "area", "bbox"]
    t = pa.Table.from_pylist([{k: r[k] for k in cols} for r in rows], schema=pa.schema([PART_SCHEMA.field(c) for c in cols]))
    t = t.rename_columns(["path", "width", "height", "values", "classes", "rle", "area", "bbox"])
    buf = io.BytesIO()
    pq.write_table(t.replace_schema_metadata({"ovdiff": json.dumps(info(p))}), buf)
    p.out.write_bytes("labels.parquet", buf.getvalue())


def write_overlays(p: Plan, rows: dict[str, dict], n: int, max_pixels: int) -> int:
    """Overlays of the first `n` listed images that are labelled and have none yet; returns how many written."""
    from .segment import SegmentationResult, overlay

    written = 0
    for it in p.listing[:n]:
        r = rows.get(it.path)
        key = mirror_names([it.path], "overlays")[it.path]
        if r is None or p.out.exists(key):
            continue
        try:
            rgb = decode_image(p.images.read_bytes(it.path), max_pixels)
        except (StoreError, ImageError):
            continue
        labels = labels_of(r)
        names = {0: "background", **dict(zip(r["values"], r["names"]))}
        buf = io.BytesIO()
        overlay(rgb, SegmentationResult(labels, names, None, [])).save(buf, format="PNG")
        p.out.write_bytes(key, buf.getvalue())
        written += 1
    return written


def info(p: Plan) -> dict:
    from . import __version__

    return {"description": f"ovdiff labels of {p.images.uri}", "bank": p.job["bank"], "bank_id": p.job["bank_id"],
            "bank_version": p.job["bank_version"], "pamr": p.job["pamr"], "version": __version__,
            "date_created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")}


def finalize(p: Plan, args: argparse.Namespace, run: str) -> tuple[int, int]:
    """Compact the parts, then write errors.jsonl and every requested format from them. Returns (ok, errors)."""
    table, keys = read_parts(p.out)
    compact(p.out, run, table, keys)
    listed = {it.path for it in p.listing}
    rows = sorted((r for r in table.to_pylist() if r["path"] in listed), key=lambda r: r["path"])
    ok = [r for r in rows if r["status"] == OK]
    bad = [{"path": r["path"], "status": r["status"], "error": r["error"]} for r in rows if r["status"] != OK]
    p.out.write_bytes("errors.jsonl", "".join(json.dumps(e) + "\n" for e in bad).encode())
    for fmt in p.formats:
        if fmt == "coco":
            write_coco(p, ok)
        elif fmt == "png":
            write_png(p, ok)
        elif fmt == "labelstudio":
            write_labelstudio(p, ok, args.image_url, args.from_name, args.to_name)
        else:
            write_parquet(p, ok)
    if args.overlays:
        write_overlays(p, {r["path"]: r for r in ok}, args.overlays, args.max_pixels)
    return len(ok), len(bad)


# ------------------------------------------------------------------------------------------------ running

@dataclass
class Progress:
    """Counts of this run; seconds from the start of the pipeline (actor start-up included)."""

    labelled: int = 0
    unreadable: int = 0
    failed: int = 0
    seconds: float = 0.0
    first_s: float = 0.0  # until the first block arrived (start-up: actors, models, first batch)
    first_rows: int = 0

    @property
    def rate(self) -> float:
        return self.labelled / self.seconds if self.seconds > 0 else 0.0

    @property
    def steady_rate(self) -> float:
        """Images per second after the first block (start-up excluded)."""
        done = self.labelled + self.unreadable + self.failed - self.first_rows
        return done / (self.seconds - self.first_s) if self.seconds > self.first_s and done > 0 else 0.0


def store_block(p: Plan, run: str, seq: int, table: pa.Table) -> None:
    """One arriving block: its PNG masks first, then its part (a part is the proof its images are done)."""
    if "png" in p.formats:
        for path, status, png in zip(*(table.column(c).to_pylist() for c in ("path", "status", "png"))):
            if status == OK and png:
                p.out.write_bytes(p.masks[path], png)
    write_part(p.out, part_key(run, f"{seq:06d}"), table)


def execute(args: argparse.Namespace, p: Plan, run: str, prog: Progress) -> None:
    """Stream the pending images through the actor pool, storing each block as it arrives."""
    import ray
    from tqdm import tqdm

    ctx = ray.data.DataContext.get_current()
    ctx.enable_progress_bars = False
    ctx.execution_options.preserve_order = False
    res = ray.cluster_resources()
    if args.gpus_per_worker:
        default = int(res.get("GPU", 0) // args.gpus_per_worker) or 1
    else:
        default = int(res.get("CPU", 1) // max(args.cpus_per_worker, 1e-3)) or 1
    blocks = math.ceil(len(p.pending) / args.batch_size)
    workers = max(1, min(args.workers or default, blocks))
    remote = any(u.startswith("s3://") for u in (args.images, args.bank, args.out))
    kwargs = dict(bank=args.bank, version=p.job["bank_version"], classes=p.job["classes"], images=args.images,
                  storage=StorageConfig.from_env().to_dict() if remote else None,
                  png_dtype=p.png_dtype if "png" in p.formats else None, labelstudio="labelstudio" in p.formats,
                  pamr=args.pamr, max_pixels=args.max_pixels, max_bytes=args.max_bytes,
                  device="cuda" if args.gpus_per_worker else "cpu")
    ds = ray.data.from_items([{"path": it.path, "size": it.size} for it in p.pending],
                             override_num_blocks=blocks).map_batches(
        Labeller, batch_size=args.batch_size, fn_constructor_kwargs=kwargs,
        compute=ray.data.ActorPoolStrategy(size=workers, max_tasks_in_flight_per_actor=2),
        num_gpus=args.gpus_per_worker, num_cpus=args.cpus_per_worker)
    bar = tqdm(total=len(p.pending), unit="img", desc="label_dataset", dynamic_ncols=True, file=sys.stderr,
               mininterval=1.0)
    t0 = time.perf_counter()
    try:
        for seq, table in enumerate(ds.iter_batches(batch_size=None, batch_format="pyarrow")):
            store_block(p, run, seq, table)
            if seq == 0:
                prog.first_s, prog.first_rows = time.perf_counter() - t0, table.num_rows
            status = table.column("status").to_pylist()
            prog.labelled += status.count(OK)
            prog.unreadable += status.count(UNREADABLE)
            prog.failed += status.count(FAILED)
            for path, s, err in zip(table.column("path").to_pylist(), status, table.column("error").to_pylist()):
                if s != OK:
                    tqdm.write(f"label_dataset: {s}: {path}: {err.splitlines()[0]}", file=sys.stderr)
            prog.seconds = time.perf_counter() - t0
            bar.update(table.num_rows)
            bar.set_postfix_str(f"{prog.rate:.2f} img/s, {prog.unreadable + prog.failed} errors")
    finally:
        prog.seconds = time.perf_counter() - t0
        bar.close()


def first_and_last_line(e: BaseException) -> str:
    """A Ray error's message is a whole traceback: its first line and the root cause's."""
    lines = [line.strip() for line in f"{type(e).__name__}: {e}".splitlines() if line.strip()]
    return lines[0] if len(lines) == 1 else f"{lines[0]} ... {lines[-1]}"


def run(args: argparse.Namespace, prog: Progress | None = None) -> int:
    """The whole job; `prog` (optional) receives this run's counts and timings."""
    t_start = time.perf_counter()
    try:
        p = plan(args)
    except (LabelError, StoreError, ManifestError, OSError) as e:
        print(f"label_dataset: error: {e}", file=sys.stderr)
        return 2
    bad = f" ({p.known_bad} of them unreadable, see errors.jsonl)" if p.known_bad else ""
    print(f"label_dataset: {len(p.listing)} images under {args.images} ({p.ignored} other files ignored): "
          f"{p.skipped} already done{bad}, {len(p.pending)} to label; "
          f"bank {p.job['bank_id']} v{p.job['bank_version']}, {len(p.classes)} classes; "
          f"formats {','.join(p.formats)} -> {args.out}", flush=True)
    run_id = new_run_id()
    if p.new_job:
        p.out.write_bytes("job.json", json.dumps({**p.job, "created": run_id}, indent=1).encode())
    if p.oversize:
        write_part(p.out, part_key(run_id, "oversize"), pa.Table.from_pylist(p.oversize, schema=ROW_SCHEMA))
    prog = Progress() if prog is None else prog
    prog.unreadable, code, error = len(p.oversize), 0, None
    if p.pending:
        import ray

        started = not ray.is_initialized()
        if started:
            ray.init(address=args.address, log_to_driver=True, logging_level="WARNING")
        old = signal.getsignal(signal.SIGINT)
        try:
            execute(args, p, run_id, prog)
        except KeyboardInterrupt:
            signal.signal(signal.SIGINT, signal.SIG_IGN)  # a second Ctrl-C must not interrupt writing what arrived
            code = 130
        except Exception as e:  # noqa: BLE001 - e.g. every actor failed to start: keep what arrived, then report
            error, code = first_and_last_line(e), 1
        finally:
            if started:
                ray.shutdown()
        try:
            n_ok, n_bad = finalize(p, args, run_id)
        finally:
            signal.signal(signal.SIGINT, old)
    else:
        n_ok, n_bad = finalize(p, args, run_id)
    if error:
        print(f"label_dataset: error: the job stopped: {error}", file=sys.stderr)
    wall = time.perf_counter() - t_start
    print(f"label_dataset: {n_ok} images labelled in {args.out}, {n_bad} in errors.jsonl; wall {wall:.1f}s")
    print(f"summary: labelled {prog.labelled}, skipped {p.skipped}, failed {prog.unreadable + prog.failed}, "
          f"{prog.rate:.2f} images/s, out {args.out}{' (interrupted)' if code == 130 else ''}")
    return code or (1 if prog.failed else 0)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    from .preflight import run_for_load  # issue 16: the bank, its models and the cluster, before anything starts

    return run_for_load("label_dataset", [(args.bank, args.bank_version)], address=args.address, workers=args.workers,
                        gpus=args.gpus_per_worker, cpus=args.cpus_per_worker) or run(args)


if __name__ == "__main__":
    sys.exit(main())
