"""Evaluation: mIoU on the standard benchmarks (mmseg layouts) and the toy world (OVDIFF.md section 7).

Dataset layouts under `--root` (the folder named, or the usual parent it sits in):

- `voc21`: VOC2012: `JPEGImages/<id>.jpg`, `SegmentationClass/<id>.png` (palette PNG, 0 = background, 255 =
  ignore), ids in `ImageSets/Segmentation/val.txt`. `--root` may be `VOC2012` or a folder with `VOCdevkit/VOC2012`.
- `context60`: Pascal Context as mmseg's `tools/dataset_converters/pascal_context.py` writes it into VOC2010:
  `JPEGImages/<id>.jpg`, `SegmentationClassContext/<id>.png` (0 = background, 1..59, 255 ignore), ids in
  `ImageSets/SegmentationContext/val.txt`. `--root` may be `VOC2010` or a folder with `VOCdevkit/VOC2010`.
- `coco_object81`: COCO-Object as the GroupViT/TCL converter (`convert_dataset/convert_coco_object.py`) writes it:
  `images/val2017/<id>.jpg`, `annotations/val2017/<id>_instanceTrainIds.png` (0 = background, 1..80 in COCO
  category order, 255 ignore). `--root` may be that folder or one with `coco_stuff164k/`.
- `toy`: as `ovdiff toy-scenes` writes it: `images/NNNN.png`, `labels/NNNN.png`, `classes.tsv` (label id = line
  index after the header, from 1; 0 = background).

Class 0 ("background") of every dataset is the segmenter's background; the other classes map by case-folded name to
bank classes, and segmentation is restricted to them. mIoU is reported with absent classes counted as 0 (`miou`,
the reference code's nan_to_num) and excluded (`miou_nanmean`). `--json` adds `confusion` (`confusion_summary`: the
most frequent `(true, predicted, pixels)` pairs and per class the share of its pixels lost to background and to
each other class); the printed table ends with the top confusions.
"""
from __future__ import annotations

import json
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import numpy as np

from .recipe import REPO_ROOT
from .riskcoverage import RiskReport
from .cli_help import Parser

DATASETS = ("toy", "voc21", "context60", "coco_object81")
IGNORE = 255


class DatasetError(ValueError):
    """A dataset folder that is missing or malformed, or a bank that does not cover its classes."""


@dataclass
class Dataset:
    name: str
    classes: list[str]  # label id -> name; 0 = background
    items: list[tuple[str, Path, Path]]  # (id, image, label)
    root: Path

    def __len__(self) -> int:
        return len(self.items)


@dataclass
class Scores:
    """Metrics of one run (one ablation row)."""

    name: str
    miou: float
    miou_nanmean: float
    per_class: dict[str, float | None]
    images: int
    seconds: float
    confusion: np.ndarray = field(repr=False, default=None)
    risk: "RiskReport | None" = field(repr=False, default=None)  # confidence vs baselines (riskcoverage.py)

    def to_dict(self) -> dict:
        d = {"miou": self.miou, "miou_nanmean": self.miou_nanmean, "per_class": self.per_class,
             "images": self.images, "seconds": round(self.seconds, 3)}
        if self.risk is not None:
            d.update(self.risk.to_dict())
        if self.confusion is not None:
            d["confusion"] = confusion_summary(self.confusion, list(self.per_class))
        return d


# ------------------------------------------------------------------------------------------------- metrics

def confusion(gt: np.ndarray, pred: np.ndarray, n: int, ignore: int = IGNORE) -> np.ndarray:
    """`[n, n]` int64 confusion matrix (rows = ground truth) over pixels whose gt is not `ignore`."""
    gt = np.asarray(gt).reshape(-1).astype(np.int64)
    pred = np.asarray(pred).reshape(-1).astype(np.int64)
    if gt.shape != pred.shape:
        raise ValueError(f"ground truth and prediction differ in size: {gt.shape} vs {pred.shape}")
    ok = gt != ignore
    bad = ok & ((gt < 0) | (gt >= n))
    if bad.any():
        raise DatasetError(f"label value {int(gt[bad][0])} outside 0..{n - 1} (and not {ignore})")
    pred = np.clip(pred[ok], 0, n - 1)
    return np.bincount(gt[ok] * n + pred, minlength=n * n).reshape(n, n)


def iou_from_confusion(conf: np.ndarray) -> np.ndarray:
    """Per-class IoU `[n]`; nan where a class is absent from both ground truth and prediction."""
    tp = np.diag(conf).astype(np.float64)
    denom = conf.sum(0) + conf.sum(1) - tp
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(denom > 0, tp / np.maximum(denom, 1), np.nan)


def miou(conf: np.ndarray) -> tuple[float, float, np.ndarray]:
    """(mIoU with absent classes as 0, mIoU over present classes, per-class IoU)."""
    iou = iou_from_confusion(conf)
    nanmean = float(np.nanmean(iou)) if np.isfinite(iou).any() else 0.0
    return float(np.nan_to_num(iou, nan=0.0).mean()), nanmean, iou


def confusion_summary(conf: np.ndarray, classes: list[str], top: int = 10) -> dict:
    """Where pixels go: the `top` most frequent off-diagonal `(true, predicted, pixels)` pairs of `conf [n, n]`
    (rows = ground truth, class 0 = background), and per class with ground-truth pixels: its pixel count, the share
    lost to background (`to_background`; for background itself 0) and the share lost to each other class
    (`to_classes`, largest first, shares >= 0.001)."""
    conf = np.asarray(conf, np.int64)
    off = conf.copy()
    np.fill_diagonal(off, 0)
    flat = np.argsort(-off, axis=None, kind="stable")[:top]
    pairs = [{"true": classes[i], "predicted": classes[j], "pixels": int(off[i, j])}
             for i, j in zip(*np.unravel_index(flat, off.shape)) if off[i, j] > 0]
    per = {}
    for i, name in enumerate(classes):
        total = int(conf[i].sum())
        if total == 0:
            continue
        share = off[i] / total
        others = {classes[j]: round(float(share[j]), 4) for j in np.argsort(-share, kind="stable")
                  if j != 0 and share[j] >= 0.001}
        per[name] = {"pixels": total, "to_background": round(float(share[0]), 4) if i else 0.0,
                     "to_classes": others}
    return {"top": pairs, "per_class": per}


def format_confusions(conf: np.ndarray, classes: list[str], top: int = 10) -> str:
    """The `top` most frequent confusions as a table: true class, predicted class, pixels, share of the true class."""
    totals = np.asarray(conf).sum(1)
    lines = [f"{'top confusions: true':<28} {'predicted':<28} {'pixels':>9} {'share':>6}"]
    for p in confusion_summary(conf, classes, top)["top"]:
        share = p["pixels"] / max(1, int(totals[classes.index(p["true"])]))
        lines.append(f"{p['true'][:28]:<28} {p['predicted'][:28]:<28} {p['pixels']:>9} {100 * share:>5.1f}%")
    if len(lines) == 1:
        lines.append("(none: every pixel right)")
    return "\n".join(lines)


# ------------------------------------------------------------------------------------------------ datasets

def _vocab_names(dataset: str) -> list[str]:
    from .vocab import load_vocab

    return load_vocab(REPO_ROOT / "bank" / "vocab" / f"{dataset}.tsv").names


def _find(root: Path, *candidates: str) -> Path:
    for c in candidates:
        if (root / c).is_dir():
            return root / c
    return root


def _read_ids(path: Path, dataset: str) -> list[str]:
    if not path.is_file():
        raise DatasetError(f"{dataset}: split file {path} is missing")
    ids = [line.strip() for line in path.read_text().splitlines() if line.strip()]
    if not ids:
        raise DatasetError(f"{dataset}: split file {path} lists no images")
    return ids


def _paired(dataset: str, root: Path, ids: list[str], img_dir: str, lab_dir: str, img_ext: str,
            lab_suffix: str) -> list[tuple[str, Path, Path]]:
    for d in (img_dir, lab_dir):
        if not (root / d).is_dir():
            raise DatasetError(f"{dataset}: folder {root / d} is missing (expected the layout described in "
                               f"ovdiff_ray/evaluate.py)")
    items = [(i, root / img_dir / f"{i}{img_ext}", root / lab_dir / f"{i}{lab_suffix}") for i in ids]
    missing = [str(p) for _, a, b in items for p in (a, b) if not p.is_file()]
    if missing:
        raise DatasetError(f"{dataset}: {len(missing)} listed files are missing, e.g. {missing[0]}")
    return items


def load_dataset(name: str, root: str | Path) -> Dataset:
    """Index a dataset folder (see the module docstring for layouts); errors name the missing piece."""
    root = Path(root)
    if name not in DATASETS:
        raise DatasetError(f"unknown dataset {name!r} (known: {', '.join(DATASETS)})")
    if not root.is_dir():
        raise DatasetError(f"{name}: dataset folder {root} does not exist")
    if name == "toy":
        from .vocab import VocabError, load_vocab

        try:
            vocab = load_vocab(root / "classes.tsv")
        except VocabError as e:
            raise DatasetError(f"toy: {e}") from None
        ids = sorted(p.stem for p in (root / "images").glob("*.png")) if (root / "images").is_dir() else []
        if not ids:
            raise DatasetError(f"toy: no images in {root / 'images'} (write scenes with `ovdiff toy-scenes`)")
        return Dataset(name, ["background"] + vocab.names, _paired(name, root, ids, "images", "labels", ".png", ".png"),
                       root)
    if name == "voc21":
        r = _find(root, "VOCdevkit/VOC2012", "VOC2012")
        ids = _read_ids(r / "ImageSets" / "Segmentation" / "val.txt", name)
        items = _paired(name, r, ids, "JPEGImages", "SegmentationClass", ".jpg", ".png")
    elif name == "context60":
        r = _find(root, "VOCdevkit/VOC2010", "VOC2010")
        ids = _read_ids(r / "ImageSets" / "SegmentationContext" / "val.txt", name)
        items = _paired(name, r, ids, "JPEGImages", "SegmentationClassContext", ".jpg", ".png")
    else:
        r = _find(root, "coco_stuff164k")
        lab = r / "annotations" / "val2017"
        ids = sorted(p.name[: -len("_instanceTrainIds.png")] for p in lab.glob("*_instanceTrainIds.png")) \
            if lab.is_dir() else []
        if not ids:
            raise DatasetError(f"{name}: no *_instanceTrainIds.png labels in {lab}")
        items = _paired(name, r, ids, "images/val2017", "annotations/val2017", ".jpg", "_instanceTrainIds.png")
    return Dataset(name, _vocab_names(name), items, r)


def read_label(path: Path) -> np.ndarray:
    """Label PNG (palette or grey) -> `[H, W]` int64 class ids."""
    from PIL import Image

    with Image.open(path) as im:
        if im.mode not in ("P", "L", "I", "I;16"):
            raise DatasetError(f"{path}: label PNG has mode {im.mode} (expected palette or grey class ids)")
        return np.asarray(im).astype(np.int64)


# ----------------------------------------------------------------------------------------------- evaluation

def bank_classes(bank, ds: Dataset) -> list[str]:
    """Dataset classes other than background, checked against the bank; missing ones raise DatasetError."""
    from .vocab import fold

    names = ds.classes[1:]
    have = {fold(n) for i, n in enumerate(bank.names) if i not in getattr(bank, "removed", ())}  # removed: not covered
    have |= {fold(a) for a in getattr(bank, "aliases", {})}
    missing = [n for n in names if fold(n) not in have]
    if missing:
        raise DatasetError(f"bank {bank.bank_id} v{bank.version} does not cover {len(missing)} of the {len(names)} "
                           f"{ds.name} classes: {', '.join(missing)}")
    return names


def label_lut(bank, ds: Dataset) -> np.ndarray:
    """Segmenter label value (0 = background, c + 1 = bank class c) -> dataset id."""
    lut = np.zeros(len(bank.names) + 1, np.int64)
    for i, n in enumerate(ds.classes[1:], start=1):
        lut[bank.index(n) + 1] = i
    return lut


def run(segmenter, ds: Dataset, limit: int | None = None, ablate: Sequence[str] = (), pamr: bool = False,
        progress: bool = True, overlays: int = 0, out: Path | None = None, name: str = "full",
        regions: str | None = None, min_confidence: float = 0.0) -> Scores:
    """Segment the dataset's images and accumulate one confusion matrix (`regions` overrides the recipe's) and the
    risk-coverage of the confidence against the raw top score and random order. Pixels under `min_confidence`
    (unsure) are left out of the confusion matrix, as ignored pixels are; `risk.coverage` is the share kept."""
    from PIL import Image
    from tqdm import tqdm

    from .segment import overlay, read_image

    classes = bank_classes(segmenter.bank, ds)
    lut = label_lut(segmenter.bank, ds)
    n = len(ds.classes)
    conf = np.zeros((n, n), np.int64)
    risk = RiskReport(min_confidence)
    items = ds.items[:limit] if limit else ds.items
    t0 = time.perf_counter()
    for j, (iid, img_path, lab_path) in enumerate(tqdm(items, desc=f"eval {ds.name} [{name}]", disable=not progress,
                                                       file=sys.stderr)):
        img = read_image(img_path)
        gt = read_label(lab_path)
        if gt.shape != img.shape[:2]:
            raise DatasetError(f"{lab_path}: label size {gt.shape[::-1]} differs from image size "
                               f"{img.shape[1::-1]}")
        res = segmenter.segment(img, classes, pamr=pamr, ablate=ablate, regions=regions, return_scores=True)
        pred = lut[res.labels]
        conf += confusion(risk.add(gt, pred, res, IGNORE), pred, n)
        if j < overlays and out is not None:
            out.mkdir(parents=True, exist_ok=True)
            overlay(img, res).save(out / f"{iid}.png")
            Image.fromarray(np.array(lut[res.labels], np.uint8)).save(out / f"{iid}_pred.png")
    m, mn, iou = miou(conf)
    per = {c: (None if np.isnan(v) else round(float(v), 6)) for c, v in zip(ds.classes, iou)}
    return Scores(name, m, mn, per, len(items), time.perf_counter() - t0, conf, risk)


def worst_first(per_class: dict[str, float | None]) -> list[tuple[str, float | None]]:
    """`(class, IoU)` pairs, lowest IoU first (ties in dataset order), classes with no IoU (absent from both ground
    truth and prediction) last in dataset order."""
    seen = sorted(((c, v) for c, v in per_class.items() if v is not None), key=lambda cv: cv[1])
    return seen + [(c, v) for c, v in per_class.items() if v is None]


def format_table(rows: list[Scores], ds: Dataset) -> str:
    """Per-class IoU of the first row, worst first (classes absent from both ground truth and prediction last, as
    `-`), then one line per run with both mIoU conventions and the change."""
    lines = [f"{'class (worst first)':<28} {'IoU':>7}"]
    for c, v in worst_first(rows[0].per_class):
        lines.append(f"{c[:28]:<28} {'-' if v is None else f'{100 * v:.2f}':>7}")
    lines.append("")
    lines.append(f"{'run':<28} {'mIoU':>7} {'nanmean':>8} {'delta':>7} {'images':>7}")
    for r in rows:
        delta = "" if r is rows[0] else f"{100 * (r.miou - rows[0].miou):+.2f}"
        lines.append(f"{r.name:<28} {100 * r.miou:>7.2f} {100 * r.miou_nanmean:>8.2f} {delta:>7} {r.images:>7}")
    if rows[0].risk is not None:
        lines += ["", rows[0].risk.format()]
    if rows[0].confusion is not None:
        lines += ["", format_confusions(rows[0].confusion, list(rows[0].per_class))]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    """`ovdiff eval --dataset toy|voc21|context60|coco_object81 --bank URI [--root DIR] [--limit N] [--ablate NAME ...]
    [--pamr] [--regions none|superpixels|sam] [--json] [--overlays N --out DIR]`."""
    ap = Parser(prog="ovdiff eval", description="mIoU of a bank on a benchmark or the toy world.")
    ap.add_argument("--dataset", required=True, choices=DATASETS, help="benchmark, or toy: the toy world's scenes")
    ap.add_argument("--bank", required=True, help="bank URI (folder or s3://bucket/prefix)")
    ap.add_argument("--root", default=None, help="dataset folder (default: data/<dataset>)")
    ap.add_argument("--limit", type=int, default=None, help="first N images only (default: all)")
    ap.add_argument("--ablate", nargs="+", default=[], metavar="NAME",
                    help="also run each ablation: no_background no_prefilter no_stuff_filter class_mean_only "
                         "no_regions only:<extractor>, the issue-10 switches: no_stuff_filter_self "
                         "no_stuff_presence no_bounded_search, issue 23's: no_stuff_opening "
                         "no_stuff_presence no_bounded_search, issue 23's: no_stuff_opening "
                         "no_background_presence, and issue 27's: no_thing_proposals no_background_margin (default: "
                         "none)")
    ap.add_argument("--pamr", action="store_true", help="refine the label maps with PAMR")
    ap.add_argument("--regions", choices=("none", "superpixels", "sam"), default=None,
                    help="snap labels to class-agnostic regions (default: the bank recipe's segmentation.regions)")
    ap.add_argument("--min-confidence", type=float, default=None, metavar="C",
                    help="pixels under confidence C (0..1) are unsure: left out of mIoU like ignored pixels, and "
                         "the coverage printed beside it (default: the recipe's segmentation.min_confidence)")
    ap.add_argument("--json", action="store_true", help="print one JSON object (risk_coverage, aurc, aurc_random, "
                                                         "aurc_top_score, coverage included)")
    ap.add_argument("--overlays", type=int, default=0, help="save overlays of the first N images to --out (needs --out)")
    ap.add_argument("--out", default=None, metavar="DIR", help="folder for --overlays (default: none)")
    ap.add_argument("--device", default=None, help="torch device for the models, e.g. cpu, cuda, cuda:1 (default: cuda when available, else cpu)")
    ap.add_argument("--no-progress", action="store_true", help="no progress bar")
    a = ap.parse_args(argv)
    if a.overlays and not a.out:
        ap.error("--overlays needs --out DIR")
    if a.min_confidence is not None and not 0.0 <= a.min_confidence <= 1.0:
        ap.error(f"--min-confidence {a.min_confidence}: expected a number in [0, 1]")
    from .segment import ABLATIONS, SegmentError, Segmenter
    from .store.bank import Bank

    for ab in a.ablate:
        if ab not in ABLATIONS and not ab.startswith("only:"):
            ap.error(f"unknown ablation {ab!r} (known: {', '.join(ABLATIONS)}, only:<extractor>)")
    try:
        ds = load_dataset(a.dataset, a.root or Path("data") / a.dataset)
        bank = Bank.load(a.bank)
        bank_classes(bank, ds)
        seg = Segmenter.from_bank(bank, a.device)
        regions = seg.snapper.method(a.regions)
        minc = bank.recipe.segmentation.min_confidence if a.min_confidence is None else a.min_confidence
        rows = [run(seg, ds, a.limit, (), a.pamr, not a.no_progress, a.overlays, Path(a.out) if a.out else None,
                    regions=regions, min_confidence=minc)]
        for ab in a.ablate:
            rows.append(run(seg, ds, a.limit, (ab,), a.pamr, not a.no_progress, name=ab, regions=regions,
                            min_confidence=minc))
    except (DatasetError, SegmentError, ValueError, KeyError, OSError) as e:
        print(f"ovdiff eval: error: {e.args[0] if isinstance(e, KeyError) and e.args else e}", file=sys.stderr)
        return 2
    full = rows[0]
    if a.json:
        obj = {"dataset": ds.name, "bank": a.bank, "bank_version": bank.version, "pamr": a.pamr, "regions": regions,
               **full.to_dict()}
        if a.ablate:
            obj["ablations"] = {r.name: {**r.to_dict(), "delta": r.miou - full.miou} for r in rows[1:]}
        print(json.dumps(obj))
    else:
        print(format_table(rows, ds))
    cov = f", coverage {100 * full.risk.coverage:.2f}% at min confidence {minc:g}" if minc else ""
    print(f"eval {ds.name}: mIoU {100 * full.miou:.2f} (nanmean {100 * full.miou_nanmean:.2f}, regions {regions}{cov}) "
          f"over {full.images} images in {sum(r.seconds for r in rows):.1f}s; AURC {full.risk.aurc:.5f} (top score "
          f"{full.risk.aurc_top_score:.5f}, random {full.risk.aurc_random:.5f})",
          file=sys.stderr if a.json else sys.stdout)
    return 0
