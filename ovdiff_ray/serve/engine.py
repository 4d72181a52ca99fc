"""The work behind the HTTP routes, without Ray: a catalog of banks, segmenters that share models, and the encoders.

`Engine` is what a Serve replica (and the in-process `LocalBackend`) runs: it reads the configured banks' manifests
(cheap: names and kinds, no prototypes), loads a bank's prototypes and its recipe's models on demand (models are
shared by banks whose recipes name the same models) and segments a batch of decoded images. `encode` turns a result
into the JSON body (PNG mask, COCO RLE or overlay); the ingress runs it, so a replica's CPU goes to the model.
"""
from __future__ import annotations

import json
import logging
import re
import threading
import time
import traceback
from dataclasses import dataclass, field
from typing import Any, Sequence

import numpy as np

from ..labelmaps import b64png, decode_png, encode_png, mask_dtype, upscale_labels  # noqa: F401 (re-exported)
from .limits import Limits, RequestError

log = logging.getLogger("ovdiff.serve")
BANK_REF = re.compile(r"^(?P<id>.+?)(?:@v?(?P<version>\d{1,18}))?$")  # longer digit runs: an id, never an int()
STORAGE_DEGRADED_S = 60.0  # /healthz says storage "degraded" this long after a failed read (unless one succeeds)


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
    request_timeout_s: float = 120.0  # ingress -> segmenter call (`ovdiff serve --request-timeout`)
    storage: dict | None = None  # S3 settings (StorageConfig fields); None: from the environment
    follow_latest: bool = False  # banks without a version follow their `latest` pointer (hot reload)
    reload_poll_s: float = 10.0  # how often a replica reads `latest` of the banks it follows
    share_bank: bool = True  # one copy of a bank's arrays per node (memory-mapped node-local cache)
    admin: dict = field(default_factory=dict)  # POST /v1/classes: token_file, max_classes_per_request, jobs

    @classmethod
    def from_dict(cls, d: dict) -> "ServiceConfig":
        d = dict(d)
        banks = d.pop("banks", None) or ([d.pop("bank")] if d.get("bank") else [])
        d.pop("bank", None)
        if not banks:
            raise ValueError("config names no bank: set `bank: URI` or `banks: [URI | {uri, version, name}, ...]`")
        limits = Limits.from_dict(d.pop("limits", None))
        known = {"max_batch_size", "batch_wait_timeout_s", "device", "torch_threads", "request_timeout_s", "storage",
                 "follow_latest", "reload_poll_s", "share_bank", "admin"}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(f"unknown config key(s) {', '.join(unknown)} (known: banks, limits, {', '.join(sorted(known))})")
        cfg = cls([BankSpec.of(b) for b in banks], limits, **d)
        if cfg.max_batch_size < 1 or cfg.batch_wait_timeout_s < 0:
            raise ValueError("max_batch_size must be >= 1 and batch_wait_timeout_s >= 0")
        if cfg.reload_poll_s <= 0:
            raise ValueError(f"reload_poll_s must be > 0, got {cfg.reload_poll_s}")
        cfg.admin = dict(cfg.admin or {})
        return cfg

    def to_dict(self) -> dict:
        return {"banks": [{"uri": b.uri, "version": b.version, "name": b.name} for b in self.banks],
                "limits": self.limits.to_dict(), "max_batch_size": self.max_batch_size,
                "batch_wait_timeout_s": self.batch_wait_timeout_s, "device": self.device,
                "torch_threads": self.torch_threads, "request_timeout_s": self.request_timeout_s,
                "storage": self.storage, "follow_latest": self.follow_latest, "reload_poll_s": self.reload_poll_s,
                "share_bank": self.share_bank, "admin": dict(self.admin)}

    def follows(self, spec: BankSpec) -> bool:
        """A bank configured without a version is followed (hot reload) when `follow_latest` is on."""
        return self.follow_latest and spec.version is None


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
    live: bool = False  # follows `latest`: `version` is the one being served now
    removed: frozenset = frozenset()  # positions of removed classes (tombstones): never listed, never predicted
    aliases: dict = field(default_factory=dict)  # alias -> class name

    @property
    def requestable(self) -> list[str]:
        """Names a request may use: live classes' names and aliases."""
        return [n for i, n in enumerate(self.names) if i not in self.removed] + list(self.aliases)

    def public(self, with_classes: bool = True) -> dict:
        d = {"key": self.key, "id": self.bank_id, "version": self.version, "name": self.name,
             "num_classes": len(self.names) - len(self.removed), "mask_dtype": mask_dtype(len(self.names)),
             "live": self.live}
        if with_classes:
            d["classes"] = [{"id": i + 1, "name": n, "kind": k} for i, (n, k) in enumerate(zip(self.names, self.kinds))
                            if i not in self.removed]
            d["recipe"] = self.summary.get("recipe")
            d["extractors"] = self.summary.get("extractors")
            d["created"] = self.summary.get("created")
        return d


def bank_entry(spec: BankSpec, storage: dict | None = None, live: bool = False) -> BankEntry:
    """Read a bank's committed manifest (latest or `spec.version`) into a catalog entry. A followed (`live`) bank
    has the key `<bank_id>@latest`, which stays the same while the version served moves on."""
    from ..store.fs import Location
    from ..store.shards import read_manifest

    m = read_manifest(Location(spec.uri, storage), spec.version)
    if m is None:
        raise ValueError(f"{spec.uri}: no committed bank here (no manifests/)")
    return entry_of(m, spec.uri, spec.name, live)


def entry_of(m: dict, uri: str, name: str | None, live: bool = False) -> BankEntry:
    from ..store.inspect import summarize

    key = f"{m['bank_id']}@latest" if live else f"{m['bank_id']}@v{m['version']}"
    return BankEntry(key, m["bank_id"], int(m["version"]), uri, name, [c["name"] for c in m["classes"]],
                     [c["kind"] for c in m["classes"]], summarize(m), live,
                     frozenset(i for i, c in enumerate(m["classes"]) if c.get("removed") is not None),
                     {a: c["name"] for c in m["classes"] if c.get("removed") is None for a in c.get("aliases", [])})


@dataclass
class Job:
    """One validated request, as the segmenter sees it: the decoded image (the ingress decodes once)."""

    image: np.ndarray  # [H, W, 3] uint8
    classes: tuple[str, ...] | None = None
    pamr: bool = False
    scores: bool = False  # also return each class's mean score over its pixels (`region_scores`)
    regions: str | None = None  # None = the bank recipe's segmentation.regions; on | off | a method name
    confidence: bool = False  # also return the confidence map, per-class mean confidence and top-k
    min_confidence: float | None = None  # pixels under it are unsure; None = the recipe's segmentation.min_confidence
    explain: bool = False  # also return, per class, the prototypes that won its pixels and their support images


# ----------------------------------------------------------------------------------------------- encoders

def encode_rle(labels: np.ndarray, skip: int | None = None) -> dict[str, dict]:
    """COCO RLE (pycocotools, counts as ASCII) per label value present, background (and `skip`: the unsure
    value) excluded."""
    from pycocotools import mask as mask_utils

    values = [int(v) for v in np.unique(labels) if v and v != skip]
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
            e = bank_entry(spec, config.storage, config.follows(spec))
            if e.key in banks:
                raise ValueError(f"bank {e.key} is configured twice ({banks[e.key].uri} and {spec.uri})")
            banks[e.key] = e
        admin = {**config.admin, "live": [k for k, e in banks.items() if e.live]}
        self.catalog = Catalog(banks, next(iter(banks)), config.limits, config.request_timeout_s, admin)
        self.storage_error: tuple[float, str] | None = None  # (when, what) of the last failed bank read

    def health(self) -> dict:
        """Public part: `status` ok|degraded and `checks`; the rest (banks, last storage error) is for operators."""
        err = self.storage_error
        degraded = err is not None and time.monotonic() - err[0] < STORAGE_DEGRADED_S
        return {"status": "degraded" if degraded else "ok",
                "checks": {"segmenter": "ok", "storage": "degraded" if degraded else "ok"},
                "default": self.catalog.default, "banks": list(self.catalog.banks),
                "storage_error": err[1] if degraded else None}

    # -- models ----------------------------------------------------------------------------------------------
    def load(self, key: str, version: int | None = None):
        """The Segmenter of a catalogued bank (at `version`, default the catalogued one): prototypes read
        (sha256-verified; memory-mapped from the node's shared copy when `share_bank`), models shared per recipe."""
        from ..models import build_classifier, build_extractors, default_device
        from ..segment import Segmenter
        from ..store.bank import Bank

        e = self.catalog.banks.get(key)
        if e is None:
            raise RequestError(404, f"unknown bank {key[:80]!r}", {"banks": list(self.catalog.banks)},
                               "unknown_bank")
        t0 = time.perf_counter()
        from ..store.retry import is_storage_error

        version = e.version if version is None else version
        try:
            if self.config.share_bank:
                from ..store.shared import load_shared

                bank = load_shared(e.uri, version, storage_options=self.config.storage)
                for a in bank.extractors.values():  # fault the shared pages in now, not in the first requests
                    flat = np.asarray(a.vectors).reshape(-1).view(np.uint8)
                    int(flat[::4096].sum()) if flat.size else 0
            else:
                bank = Bank.load(e.uri, version, storage_options=self.config.storage)
        except Exception as err:  # noqa: BLE001 - storage down or failing: keep serving what is loaded
            if not is_storage_error(err):
                raise
            self.storage_error = (time.monotonic(), f"{e.uri} v{version}: {err.__class__.__name__}: "
                                                    f"{str(err)[:300]}")
            log.warning("bank %s: storage read failed: %s", key, self.storage_error[1])
            raise RequestError(503, f"bank {key[:80]!r} cannot be loaded now: its storage is unavailable; "
                                    "retry shortly", {"retry_after_s": 5.0, "bank": key[:200]},
                               "storage_unavailable") from None
        self.storage_error = None
        device = self.config.device or default_device()
        r = bank.recipe
        sig = json.dumps({"extractors": [x.__dict__ for x in r.extractors], "classifier": r.classifier.__dict__,
                          "device": device}, sort_keys=True, default=str)
        with self._lock:
            if sig not in self._models:
                self._models[sig] = (build_extractors(r, device), build_classifier(r, device), device)
            extractors, classifier, device = self._models[sig]
        seg = Segmenter(bank, extractors, classifier, device)
        from .. import metrics  # the version loaded last is the one served (a reload switches right after)

        metrics.set_gauge("ovdiff_bank_version", bank.version, {"bank": bank.bank_id})
        metrics.set_gauge("ovdiff_bank_classes", len(bank.names), {"bank": bank.bank_id})
        log.info("loaded bank %s v%d (%d classes) in %.1fs", key, bank.version, len(bank.names),
                 time.perf_counter() - t0)
        return seg

    def switched(self, key: str, bank) -> None:
        """A followed bank now serves `bank` (a newer version): its catalog entry says so (one assignment)."""
        e = self.catalog.banks[key]
        self.catalog.banks[key] = entry_of(bank.manifest, e.uri, e.name, e.live)

    def warm_up(self, seg) -> float:
        """Segment one image at the recipe's short side (fixed noise) and return the seconds it took; when that is
        already over the request timeout, say so in one warning line (every request would get 504)."""
        side = seg.seg.short_side
        img = np.random.default_rng(0).integers(0, 256, (side, side * 4 // 3, 3), dtype=np.uint8)
        t0 = time.perf_counter()
        try:
            seg.segment(img, confidence=False)
        except Exception as e:  # noqa: BLE001 - the requests will say what is wrong; the start goes on
            log.warning("warm-up segmentation failed: %s: %s", type(e).__name__, str(e)[:300])
        dt = time.perf_counter() - t0
        limit = self.config.request_timeout_s
        if dt > limit:
            log.warning("warm-up segmentation took %.1fs, longer than the request timeout of %gs: requests will "
                        "get 504; raise the timeout (ovdiff serve --request-timeout S, config request_timeout_s) or "
                        "give the replica a GPU", dt, limit)
        return dt

    # -- work ------------------------------------------------------------------------------------------------
    def run(self, seg, jobs: Sequence[Job]) -> list[dict]:
        """Segment a batch (grouped by classes and PAMR for `segment_batch`); model work only, no encoding.

        Each result: `status` 200, `labels` (uint8 or uint16 per bank), `classes` {value: name}, `kept`, `bank`,
        `timing`. A job that fails gets an error dict (`status`, `error`, `detail`, `code`) and never fails the
        others: a batch whose model call raises is run again one image at a time, and everything after the model
        call (confidence fields, explain, the result dict) runs per job, its failure that job's alone.
        """
        out: list[dict | None] = [None] * len(jobs)
        groups: dict[tuple, list[int]] = {}
        for i, j in enumerate(jobs):
            groups.setdefault((j.classes, j.pamr, j.scores, j.regions), []).append(i)
        for (classes, pamr, scores, regions), idx in groups.items():
            t0 = time.perf_counter()
            try:
                results = seg.segment_batch([jobs[i].image for i in idx], list(classes) if classes else None, pamr,
                                            return_scores=scores, regions=regions,
                                            confidence=[self.wants_confidence(seg, jobs[i]) for i in idx],
                                            keep_features=[jobs[i].explain for i in idx])
            except Exception:  # noqa: BLE001 - isolate the failing image: run the group one by one
                results = None
            dt = (time.perf_counter() - t0) / len(idx)
            for k, i in enumerate(idx):
                out[i] = (self._isolated(seg, results[k], dt, len(jobs), jobs[i]) if results is not None
                          else self._one(seg, jobs[i], len(jobs)))
                if results is not None:
                    results[k] = None  # its features (explain) and maps go as soon as its response is made
        return out  # type: ignore[return-value]

    @staticmethod
    def wants_confidence(seg, job: Job) -> bool:
        """Whether a job's response needs the confidence map (scores, or a min_confidence of its own or the
        recipe's): only then is it upsampled and copied to the host."""
        return bool(job.confidence or job.min_confidence or seg.seg.min_confidence)

    def _isolated(self, seg, res, seconds: float, batch: int, job: Job) -> dict:
        """`_result` for one job; what it raises becomes that job's error (the batch's other jobs are untouched)."""
        from ..segment import SegmentError

        try:
            return self._result(seg, res, seconds, batch, job)
        except SegmentError as e:
            return {"status": 400, "error": str(e), "detail": None, "code": "bad_request"}
        except Exception:  # noqa: BLE001 - one request's post-processing never fails the others
            log.error("post-processing a segmentation failed: %s", traceback.format_exc())
            return {"status": 500, "error": "post-processing the segmentation failed (details in the service log)",
                    "detail": None, "code": "internal"}

    def _one(self, seg, job: Job, batch: int) -> dict:
        from ..segment import SegmentError

        t0 = time.perf_counter()
        try:
            res = seg.segment(job.image, list(job.classes) if job.classes else None, job.pamr,
                              return_scores=job.scores, regions=job.regions,
                              confidence=self.wants_confidence(seg, job), keep_features=job.explain)
        except SegmentError as e:
            return {"status": 400, "error": str(e), "detail": None, "code": "bad_request"}
        except Exception:  # noqa: BLE001 - one bad image never takes the replica down
            log.error("segmentation failed: %s", traceback.format_exc())
            return {"status": 500, "error": "segmentation failed (details in the service log)", "detail": None,
                    "code": "internal"}
        return self._isolated(seg, res, time.perf_counter() - t0, batch, job)

    @staticmethod
    def _result(seg, res, seconds: float, batch: int, job: "Job | None" = None) -> dict:
        n = len(seg.bank.names)
        extra = {}
        if res.scores is not None:  # Job.scores: per label value, the mean of its class's score over its pixels
            from ..label.encode import own_scores

            own = own_scores(res)
            extra["region_scores"] = {int(v): float(own[res.labels == v].mean()) for v in res.classes if v}
        if job is not None and Engine.wants_confidence(seg, job):
            from .outputs import confidence_fields

            extra.update(confidence_fields(seg, res, job))
        if job is not None and job.explain:
            from ..explain import explain

            extra["explain"] = {int(v): e.to_dict() for v, e in explain(seg, job.image, res).items()}
        return {"status": 200, **extra, "labels": res.labels.astype(np.uint8 if mask_dtype(n) == "uint8" else np.uint16),
                "classes": {int(v): name for v, name in res.classes.items()}, "kept": list(res.kept),
                "bank": {"id": seg.bank.bank_id, "version": seg.bank.version, "num_classes": n},
                "timing": {"segment_ms": round(1000 * seconds, 1), "batch_size": batch,
                           "stages_ms": {k: round(1000 * v, 1) for k, v in res.timings.items()}}}


def encode(image: np.ndarray, result: dict, fmt: str, size: tuple[int, int] | None = None) -> dict:
    """A segmenter result -> the JSON body: mask as base64 PNG, COCO RLE per class, or overlay + legend.

    `image` is what the model saw; `size` (width, height) the upload's size when it was downscaled: the mask and
    RLE are upscaled to it (nearest), the overlay stays at the model's size (its cost is bounded)."""
    t0 = time.perf_counter()
    small, n = result["labels"], result["bank"]["num_classes"]
    w, h = size or (small.shape[1], small.shape[0])
    labels = upscale_labels(small, w, h) if fmt != "overlay" else small
    from .outputs import apply_confidence

    labels, conf_body = apply_confidence(labels, result, n)
    body: dict[str, Any] = {
        "bank": {"id": result["bank"]["id"], "version": result["bank"]["version"]},
        "width": int(w), "height": int(h), "format": fmt,
        "classes": {str(v): name for v, name in sorted(result["classes"].items())}, "kept": result["kept"]}
    if fmt == "png":
        body["mask"] = encode_png(labels, n)
        body["mask_dtype"] = mask_dtype(n)
    elif fmt == "rle":
        from .outputs import rle_skip

        body["rle"] = encode_rle(labels, rle_skip(n))
    else:
        from ..segment import SegmentationResult, overlay

        body["overlay"] = b64png(overlay(image, SegmentationResult(small, result["classes"], None, result["kept"])))
        body["legend"] = legend(result["classes"])
    body.update(conf_body)
    if "explain" in result:
        body["explain"] = {str(v): e for v, e in sorted(result["explain"].items())}
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
    admin: dict = field(default_factory=dict)  # token_file, max_classes_per_request, live keys (no secret here)

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
                "admin": self.admin,
                "banks": {k: {"id": e.bank_id, "version": e.version, "name": e.name, "uri": e.uri, "names": e.names,
                              "kinds": e.kinds, "summary": e.summary, "live": e.live, "removed": sorted(e.removed),
                              "aliases": e.aliases}
                          for k, e in self.banks.items()}}

    @classmethod
    def from_dict(cls, d: dict) -> "Catalog":
        banks = {k: BankEntry(k, b["id"], int(b["version"]), b["uri"], b.get("name"), list(b["names"]),
                              list(b["kinds"]), b["summary"], bool(b.get("live", False)),
                              frozenset(b.get("removed") or ()), dict(b.get("aliases") or {}))
                 for k, b in d["banks"].items()}
        return cls(banks, d["default"], Limits.from_dict(d["limits"]), float(d["request_timeout_s"]),
                   dict(d.get("admin") or {}))
