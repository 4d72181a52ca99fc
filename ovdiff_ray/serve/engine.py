"""The work behind the HTTP routes, without Ray: a catalog of banks, segmenters that share models, and the encoders.

`Engine` is what a Serve replica (and the in-process `LocalBackend`) runs: it reads the configured banks' manifests
(cheap: names and kinds, no prototypes), loads a bank's prototypes and its recipe's models on demand (models are
shared by banks whose recipes name the same models) and segments a batch of decoded images. `encode` turns a result
into the JSON body (PNG mask, COCO RLE or overlay); the ingress runs it, so a replica's CPU goes to the model.
"""
from __future__ import annotations

import base64
import io
import json
import logging
import re
import threading
import time
import traceback
from dataclasses import dataclass, field
from typing import Any, Sequence

import numpy as np

from .limits import Limits, RequestError

log = logging.getLogger("ovdiff.serve")
BANK_REF = re.compile(r"^(?P<id>.+?)(?:@v?(?P<version>\d+))?$")


# ------------------------------------------------------------------------------------------------- config

@dataclass(frozen=True)
class BankSpec:
    """One served bank: where it is, which version (None = latest when loaded) and an optional short name."""

    uri: str
    version: int | None = None
    name: str | None = None

    @classmethod
    def of(cls, x: "str | dict | BankSpec") -> "BankSpec":
        if isinstance(x, BankSpec):
            return x
        if isinstance(x, str):
            return cls(x)
        unknown = sorted(set(x) - {"uri", "version", "name"})
        if unknown or "uri" not in x:
            raise ValueError(f"bank entry {x!r}: expected keys uri (required), version, name")
        return cls(str(x["uri"]), None if x.get("version") is None else int(x["version"]), x.get("name"))


@dataclass
class ServiceConfig:
    """What a segmenter replica serves (the Serve `user_config`); the first bank is the default."""

    banks: list[BankSpec]
    limits: Limits = field(default_factory=Limits)
    max_batch_size: int = 4
    batch_wait_timeout_s: float = 0.005
    device: str | None = None  # None: cuda when the replica has a GPU, else cpu
    torch_threads: int | None = None  # None: the replica's CPUs (at least 1)
    request_timeout_s: float = 120.0  # ingress -> segmenter call
    storage: dict | None = None  # S3 settings (StorageConfig fields); None: from the environment

    @classmethod
    def from_dict(cls, d: dict) -> "ServiceConfig":
        d = dict(d)
        banks = d.pop("banks", None) or ([d.pop("bank")] if d.get("bank") else [])
        d.pop("bank", None)
        if not banks:
            raise ValueError("config names no bank: set `bank: URI` or `banks: [URI | {uri, version, name}, ...]`")
        limits = Limits.from_dict(d.pop("limits", None))
        known = {"max_batch_size", "batch_wait_timeout_s", "device", "torch_threads", "request_timeout_s", "storage"}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(f"unknown config key(s) {', '.join(unknown)} (known: banks, limits, {', '.join(sorted(known))})")
        cfg = cls([BankSpec.of(b) for b in banks], limits, **d)
        if cfg.max_batch_size < 1 or cfg.batch_wait_timeout_s < 0:
            raise ValueError("max_batch_size must be >= 1 and batch_wait_timeout_s >= 0")
        return cfg

    def to_dict(self) -> dict:
        return {"banks": [{"uri": b.uri, "version": b.version, "name": b.name} for b in self.banks],
                "limits": self.limits.to_dict(), "max_batch_size": self.max_batch_size,
                "batch_wait_timeout_s": self.batch_wait_timeout_s, "device": self.device,
                "torch_threads": self.torch_threads, "request_timeout_s": self.request_timeout_s,
                "storage": self.storage}


@dataclass
class BankEntry:
    """A configured bank as the catalog knows it (from its manifest; no prototypes loaded)."""

    key: str  # "<bank_id>@v<version>": the multiplexed model id
    bank_id: str
    version: int
    uri: str
    name: str | None
    names: list[str]
    kinds: list[str]
    summary: dict

    def public(self, with_classes: bool = True) -> dict:
        d = {"key": self.key, "id": self.bank_id, "version": self.version, "name": self.name,
             "num_classes": len(self.names), "mask_dtype": mask_dtype(len(self.names))}
        if with_classes:
            d["classes"] = [{"id": i + 1, "name": n, "kind": k} for i, (n, k) in enumerate(zip(self.names, self.kinds))]
            d["recipe"] = self.summary.get("recipe")
            d["extractors"] = self.summary.get("extractors")
            d["created"] = self.summary.get("created")
        return d


def bank_entry(spec: BankSpec, storage: dict | None = None) -> BankEntry:
    """Read a bank's committed manifest (latest or `spec.version`) into a catalog entry."""
    from ..store.fs import Location
    from ..store.inspect import summarize
    from ..store.shards import read_manifest

    m = read_manifest(Location(spec.uri, storage), spec.version)
    if m is None:
        raise ValueError(f"{spec.uri}: no committed bank here (no manifests/)")
    return BankEntry(f"{m['bank_id']}@v{m['version']}", m["bank_id"], int(m["version"]), spec.uri, spec.name,
                     [c["name"] for c in m["classes"]], [c["kind"] for c in m["classes"]], summarize(m))


@dataclass
class Job:
    """One validated request, as the segmenter sees it: the decoded image (the ingress decodes once)."""

    image: np.ndarray  # [H, W, 3] uint8
    classes: tuple[str, ...] | None = None
    pamr: bool = False
    regions: str | None = None  # None = the bank recipe's segmentation.regions; on | off | a method name


# ----------------------------------------------------------------------------------------------- encoders

def mask_dtype(num_classes: int) -> str:
    """uint8 while every label value (0..num_classes) fits, else uint16; fixed per bank so clients can rely on it."""
    return "uint8" if num_classes <= 255 else "uint16"


def b64png(img) -> str:
    buf = io.BytesIO()
    img.save(buf, format="PNG", optimize=False, compress_level=1)
    return base64.b64encode(buf.getvalue()).decode("ascii")


def encode_png(labels: np.ndarray, num_classes: int) -> str:
    """Label map -> base64 PNG (mode L for uint8, I;16 for uint16)."""
    from PIL import Image

    if mask_dtype(num_classes) == "uint8":
        return b64png(Image.fromarray(labels.astype(np.uint8), mode="L"))
    return b64png(Image.fromarray(labels.astype(np.uint16)))


def decode_png(b64: str) -> np.ndarray:
    """base64 PNG mask -> `[H, W]` int64 label values (the inverse of `encode_png`)."""
    from PIL import Image

    with Image.open(io.BytesIO(base64.b64decode(b64))) as im:
        return np.asarray(im).astype(np.int64)


def encode_rle(labels: np.ndarray) -> dict[str, dict]:
    """COCO RLE (pycocotools, counts as ASCII) per label value present, background excluded."""
    from pycocotools import mask as mask_utils

    values = [int(v) for v in np.unique(labels) if v]
    if not values:
        return {}
    masks = np.asfortranarray(np.stack([labels == v for v in values], axis=2).astype(np.uint8))
    out = {}
    for v, r in zip(values, mask_utils.encode(masks)):
        out[str(v)] = {"size": [int(s) for s in r["size"]], "counts": r["counts"].decode("ascii")}
    return out


def legend(classes: dict[int, str]) -> list[dict]:
    from ..segment import class_colour

    return [{"id": v, "name": n, "color": "#%02x%02x%02x" % class_colour(v)} for v, n in sorted(classes.items()) if v]


# ------------------------------------------------------------------------------------------------- engine

class Engine:
    """Banks by key, segmenters on demand (models shared per recipe), batches in, response dicts out."""

    def __init__(self, config: ServiceConfig):
        self.config = config
        banks: dict[str, BankEntry] = {}
        self._models: dict[str, tuple[list, Any, str]] = {}  # model signature -> (extractors, classifier, device)
        self._lock = threading.Lock()
        for spec in config.banks:
            e = bank_entry(spec, config.storage)
            if e.key in banks:
                raise ValueError(f"bank {e.key} is configured twice ({banks[e.key].uri} and {spec.uri})")
            banks[e.key] = e
        self.catalog = Catalog(banks, next(iter(banks)), config.limits, config.request_timeout_s)

    # -- models ----------------------------------------------------------------------------------------------
    def load(self, key: str):
        """The Segmenter of a catalogued bank: prototypes read (sha256-verified), models shared per recipe."""
        from ..models import build_classifier, build_extractors, default_device
        from ..segment import Segmenter
        from ..store.bank import Bank

        e = self.catalog.banks.get(key)
        if e is None:
            raise RequestError(404, f"unknown bank {key!r}", {"banks": list(self.catalog.banks)}, "unknown_bank")
        t0 = time.perf_counter()
        bank = Bank.load(e.uri, e.version, storage_options=self.config.storage)
        device = self.config.device or default_device()
        r = bank.recipe
        sig = json.dumps({"extractors": [x.__dict__ for x in r.extractors], "classifier": r.classifier.__dict__,
                          "device": device}, sort_keys=True, default=str)
        with self._lock:
            if sig not in self._models:
                self._models[sig] = (build_extractors(r, device), build_classifier(r, device), device)
            extractors, classifier, device = self._models[sig]
        seg = Segmenter(bank, extractors, classifier, device)
        log.info("loaded bank %s (%d classes) in %.1fs", key, len(bank.names), time.perf_counter() - t0)
        return seg

    # -- work ------------------------------------------------------------------------------------------------
    def run(self, seg, jobs: Sequence[Job]) -> list[dict]:
        """Segment a batch (grouped by classes and PAMR for `segment_batch`); model work only, no encoding.

        Each result: `status` 200, `labels` (uint8 or uint16 per bank), `classes` {value: name}, `kept`, `bank`,
        `timing`. A job that fails gets an error dict (`status`, `error`, `detail`, `code`) and never fails the
        others.
        """
        out: list[dict | None] = [None] * len(jobs)
        groups: dict[tuple, list[int]] = {}
        for i, j in enumerate(jobs):
            groups.setdefault((j.classes, j.pamr, j.regions), []).append(i)
        for (classes, pamr, regions), idx in groups.items():
            t0 = time.perf_counter()
            try:
                results = seg.segment_batch([jobs[i].image for i in idx], list(classes) if classes else None, pamr,
                                            regions=regions)
            except Exception:  # noqa: BLE001 - isolate the failing image: run the group one by one
                results = None
            dt = (time.perf_counter() - t0) / len(idx)
            for k, i in enumerate(idx):
                out[i] = (self._result(seg, results[k], dt, len(jobs)) if results is not None
                          else self._one(seg, jobs[i], len(jobs)))
        return out  # type: ignore[return-value]

    def _one(self, seg, job: Job, batch: int) -> dict:
        from ..segment import SegmentError

        t0 = time.perf_counter()
        try:
            res = seg.segment(job.image, list(job.classes) if job.classes else None, job.pamr, regions=job.regions)
        except SegmentError as e:
            return {"status": 400, "error": str(e), "detail": None, "code": "bad_request"}
        except Exception as e:  # noqa: BLE001 - one bad image never takes the replica down
            log.error("segmentation failed: %s", traceback.format_exc())
            return {"status": 500, "error": f"segmentation failed: {e.__class__.__name__}: {e}", "detail": None,
                    "code": "internal"}
        return self._result(seg, res, time.perf_counter() - t0, batch)

    @staticmethod
    def _result(seg, res, seconds: float, batch: int) -> dict:
        n = len(seg.bank.names)
        return {"status": 200, "labels": res.labels.astype(np.uint8 if mask_dtype(n) == "uint8" else np.uint16),
                "classes": {int(v): name for v, name in res.classes.items()}, "kept": list(res.kept),
                "bank": {"id": seg.bank.bank_id, "version": seg.bank.version, "num_classes": n},
                "timing": {"segment_ms": round(1000 * seconds, 1), "batch_size": batch,
                           "stages_ms": {k: round(1000 * v, 1) for k, v in res.timings.items()}}}


def encode(image: np.ndarray, result: dict, fmt: str) -> dict:
    """A segmenter result -> the JSON body: mask as base64 PNG, COCO RLE per class, or overlay + legend."""
    t0 = time.perf_counter()
    labels, n = result["labels"], result["bank"]["num_classes"]
    h, w = labels.shape
    body: dict[str, Any] = {
        "bank": {"id": result["bank"]["id"], "version": result["bank"]["version"]},
        "width": int(w), "height": int(h), "format": fmt,
        "classes": {str(v): name for v, name in sorted(result["classes"].items())}, "kept": result["kept"]}
    if fmt == "png":
        body["mask"] = encode_png(labels, n)
        body["mask_dtype"] = mask_dtype(n)
    elif fmt == "rle":
        body["rle"] = encode_rle(labels)
    else:
        from ..segment import SegmentationResult, overlay

        body["overlay"] = b64png(overlay(image, SegmentationResult(labels, result["classes"], None, result["kept"])))
        body["legend"] = legend(result["classes"])
    body["timing"] = {**result["timing"], "encode_ms": round(1000 * (time.perf_counter() - t0), 1)}
    return body


# ------------------------------------------------------------------------------------------------ catalog

@dataclass
class Catalog:
    """The served banks (by key; the first configured is the default) and the request limits: all the ingress needs
    to validate a request. Crosses process boundaries as a plain dict (`to_dict` / `from_dict`)."""

    banks: dict[str, BankEntry]
    default: str
    limits: Limits = field(default_factory=Limits)
    request_timeout_s: float = 120.0

    def resolve(self, ref: str | None) -> BankEntry:
        """`None` (default), a configured name, a bank id (its newest configured version) or `id@vN` -> entry."""
        if ref is None or not ref.strip():
            return self.banks[self.default]
        ref = ref.strip()
        if ref in self.banks:
            return self.banks[ref]
        found = [e for e in self.banks.values() if e.name == ref]
        m = BANK_REF.match(ref)
        if not found and m:
            found = [e for e in self.banks.values() if e.bank_id == m["id"]
                     and (m["version"] is None or e.version == int(m["version"]))]
        if not found:
            raise RequestError(404, f"unknown bank {ref[:80]!r}: this service serves "
                                    f"{', '.join(repr(k) for k in self.banks)}",
                               {"field": "bank", "value": ref[:200], "banks": list(self.banks)}, "unknown_bank")
        return max(found, key=lambda e: e.version)

    def to_dict(self) -> dict:
        return {"default": self.default, "limits": self.limits.to_dict(), "request_timeout_s": self.request_timeout_s,
                "banks": {k: {"id": e.bank_id, "version": e.version, "name": e.name, "uri": e.uri, "names": e.names,
                              "kinds": e.kinds, "summary": e.summary} for k, e in self.banks.items()}}

    @classmethod
    def from_dict(cls, d: dict) -> "Catalog":
        banks = {k: BankEntry(k, b["id"], int(b["version"]), b["uri"], b.get("name"), list(b["names"]),
                              list(b["kinds"]), b["summary"]) for k, b in d["banks"].items()}
        return cls(banks, d["default"], Limits.from_dict(d["limits"]), float(d["request_timeout_s"]))
