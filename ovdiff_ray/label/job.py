"""`label_dataset`: label a folder or bucket of images with a prototype bank, on Ray Data; resumable.

The driver lists the images (local folder, file:// or s3://bucket/prefix; nested folders; jpg, jpeg, png, webp),
skips those the output already holds and sends the rest through Ray Data (`from_items` -> `map_batches(Labeller)`
under an actor pool). Each Labeller loads the models and only the requested classes' prototypes once, reads and
decodes its images itself (an unreadable file becomes an error row, never a stopped job) and returns compact rows:
per-class COCO RLE and scores (mean class score over its pixels, per class and per connected component), plus
Label Studio brush RLE or a class-index PNG when those formats are asked; no dense maps.
The driver writes each block as it arrives as a Parquet part under `<out>/parts/` (a crash loses only the images in
flight), then assembles the requested formats from all parts, so any format can be added later without relabelling:

    coco         annotations.json (pycocotools dataset; one RLE annotation with a score per class per image, or per
                 thing instance with --instances) + results.json (the list COCO.loadRes takes); stable image ids
    png          masks/<input path>.png: class index (uint8; uint16 past 255) + classes.json
    labelstudio  tasks.json (pre-annotated tasks: brushlabels, scores, model_version) + labelstudio.xml (the
                 project's labeling config, Label values = the bank's names)
    parquet      labels.parquet: one row per image (path, image_id, size, per-class RLE, area, bbox, score), with
                 field and schema metadata (RLE encoding, images root, class table, bank id and version)

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
import json
import math
import signal
import sys
import time
from dataclasses import dataclass

import pyarrow as pa

from .. import logs, metrics, terminal
from ..preflight.device import DEVICES, device_help, resolve_device
from ..store.fs import StorageConfig, StoreError
from ..store.schema import ManifestError
from .coco import write_coco
from .encode import FAILED, MAX_BYTES, MAX_PIXELS, OK, ROW_SCHEMA, UNREADABLE
from .labeller import Labeller
from .labelstudio import write_labelstudio
from .parquet import write_parquet
from .parts import compact, new_run_id, part_key, read_parts, write_part
from .plan import FORMATS, LabelError, Plan, plan
from .png import write_overlays, write_png
from ..cli_help import Parser


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    ap = Parser(prog="label_dataset", description=__doc__.split("\n\n")[0],
                                 epilog=__doc__.split("\n\n", 1)[1])
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
    ap.add_argument("--gpus-per-worker", type=float, default=0.0,
                    help="GPUs per actor (default 0; 1 on a GPU cluster: real models with 0 need --device cpu)")
    ap.add_argument("--cpus-per-worker", type=float, default=1.0, help="CPUs per actor (default 1)")
    ap.add_argument("--device", choices=DEVICES, default="auto", help=device_help())
    ap.add_argument("--batch-size", type=int, default=4, help="images per batch sent to an actor (default 4)")
    ap.add_argument("--pamr", action="store_true", help="refine the label maps with PAMR")
    ap.add_argument("--scores", action="store_true",
                    help="also write confidence/<input path>.png (16-bit: confidence = value / 65535) beside masks/")
    ap.add_argument("--min-confidence", type=float, default=None, metavar="C",
                    help="pixels under confidence C (0..1) are unsure: 255 (65535 for uint16) in PNG masks, absent "
                         "from COCO RLE and Label Studio brushes, their own RLE in Parquet's `unsure` (default: the "
                         "bank recipe's segmentation.min_confidence; fixed per --out)")
    ap.add_argument("--address", default=None, help="Ray address (default: RAY_ADDRESS, a running cluster, or local)")
    ap.add_argument("--overlays", type=int, default=0, metavar="N",
                    help="also write overlays/ pictures of the first N images (sorted by path)")
    ap.add_argument("--max-pixels", type=int, default=MAX_PIXELS, help="larger images are errors")
    ap.add_argument("--max-bytes", type=int, default=MAX_BYTES, help="larger files (bytes) are errors")
    ap.add_argument("--limit", type=int, default=None, help="label at most N pending images this run (default: all)")
    ap.add_argument("--verbose", action="store_true",
                    help="Ray's own lines on the terminal too (its native error lines, Ray Data's notes and issue "
                         "detector); without it they are only in Ray's log folder")
    ap.add_argument("--retry-errors", action="store_true",
                    help="try again images an earlier run found unreadable (default: skipped while unchanged)")
    ap.add_argument("--coco-images", default=None, metavar="FILE",
                    help="coco: take image ids from this ground-truth COCO file by file_name (path or s3:// URI; "
                         "default: ids from a hash of the path, stable across runs)")
    ap.add_argument("--instances", action="store_true",
                    help="coco: split thing classes into connected components, one annotation each (default: "
                         "semantic, one region per class per image)")
    ap.add_argument("--image-url", default=None,
                    help="labelstudio: prefix for data.image: /data/local-files/?d=<folder> (Label Studio's local "
                         "files), http(s)://host/prefix or s3://bucket/prefix (default: the image's own URI; local "
                         "paths get a warning)")
    ap.add_argument("--from-name", default="tag", help="labelstudio: BrushLabels tag name (default tag)")
    ap.add_argument("--to-name", default="image", help="labelstudio: Image tag name (default image)")
    return ap.parse_args(argv)


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
            note = write_coco(p, ok, args.coco_images, args.instances)
        elif fmt == "png":
            note = write_png(p, ok)
        elif fmt == "labelstudio":
            note = write_labelstudio(p, ok, args.image_url, args.from_name, args.to_name)
        else:
            note = write_parquet(p, ok)
        print(f"label_dataset: {note}", flush=True)
    if args.overlays:
        write_overlays(p, {r["path"]: r for r in ok}, args.overlays, args.max_pixels)
    return len(ok), len(bad)


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
    for path, status, png in zip(*(table.column(c).to_pylist() for c in ("path", "status", "conf_png"))):
        if status == OK and png:
            p.out.write_bytes(p.confs[path], png)
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
                  device=resolve_device(args.device, args.gpus_per_worker), conf_png=bool(getattr(args, "scores", False)),
                  min_confidence=p.job.get("min_confidence", 0.0))
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
            for s_name, n in (("labelled", status.count(OK)), ("unreadable", status.count(UNREADABLE)),
                              ("failed", status.count(FAILED))):
                metrics.inc("ovdiff_label_images", n, {"status": s_name})
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


def _finalize(p: Plan, args: argparse.Namespace, run: str) -> tuple[int, int, str | None]:
    """`finalize`, with a storage failure reported (third item) instead of raised."""
    from ..store.retry import is_storage_error

    try:
        return (*finalize(p, args, run), None)
    except Exception as e:  # noqa: BLE001
        if not is_storage_error(e):
            raise
        return 0, 0, f"{args.out}: storage unavailable while writing the outputs ({first_and_last_line(e)}); " \
                     "rerun to resume"


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
          f"formats {','.join(p.formats)} -> {args.out}; models on "
          f"{resolve_device(args.device, args.gpus_per_worker)}", flush=True)
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
            own = terminal.install(verbose=args.verbose)  # Ray's native lines stay in its log folder
            logs.quiet_ray(args.verbose)  # Ray's start-up notes and Ray Data's INFO lines stay in Ray's log folder
            ray.init(address=args.address, log_to_driver=True, logging_level="WARNING")
            if own:
                terminal.forward_worker_lines(args.verbose)
        old = signal.getsignal(signal.SIGINT)
        try:
            execute(args, p, run_id, prog)
        except KeyboardInterrupt:
            signal.signal(signal.SIGINT, signal.SIG_IGN)  # a second Ctrl-C must not interrupt writing what arrived
            code = 130
        except Exception as e:  # noqa: BLE001 - e.g. every actor failed to start: keep what arrived, then report
            from ..store.retry import is_storage_error

            error, code = first_and_last_line(e), 1
            if is_storage_error(e):
                error = f"{args.out}: storage unavailable ({error}); what was stored is kept, rerun to resume"
        finally:
            if started:
                ray.shutdown()
        try:
            n_ok, n_bad, late = _finalize(p, args, run_id)
        finally:
            signal.signal(signal.SIGINT, old)
    else:
        n_ok, n_bad, late = _finalize(p, args, run_id)
    if late:  # the storage failed while writing the outputs: the parts written so far let a rerun resume
        error, code = error or late, code or 1
    if error:
        print(f"label_dataset: error: the job stopped: {error}", file=sys.stderr)
    wall = time.perf_counter() - t_start
    print(f"label_dataset: {n_ok} images labelled in {args.out}, {n_bad} in errors.jsonl; wall {wall:.1f}s")
    print(f"summary: labelled {prog.labelled}, skipped {p.skipped}, failed {prog.unreadable + prog.failed}, "
          f"{prog.rate:.2f} images/s, out {args.out}{' (interrupted)' if code == 130 else ''}")
    return code or (1 if prog.failed else 0)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    from ..preflight import run_for_load  # the bank, its models and the cluster, before anything starts

    return run_for_load("label_dataset", [(args.bank, args.bank_version)], address=args.address, workers=args.workers,
                        gpus=args.gpus_per_worker, cpus=args.cpus_per_worker, device=args.device) or run(args)


if __name__ == "__main__":
    sys.exit(main())
