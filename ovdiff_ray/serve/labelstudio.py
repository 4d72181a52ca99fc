"""Label Studio ML backend routes on the Serve app: `POST /predict`, `POST /setup`, `GET /health` (and `/versions`).

Connect it in Label Studio (Project -> Settings -> Model -> Connect model, URL = the service's root). Protocol as
Label Studio's ML backend client speaks it:

- `POST /predict` `{"tasks": [...], "label_config": "<View>...", "project": "...", "params": {...}}` ->
  `{"results": [{"result": [brushlabels...], "score": s, "model_version": v}, ...]}`, one entry per task, in task
  order (Label Studio matches them by position). A task whose image cannot be fetched gets an empty result and an
  `error`; the others are still answered.
- `POST /setup` `{"project", "schema": label config, ...}` -> `{"model_version": v, "labels": {...}, "unknown": [...]}`.
- `GET /health` -> `{"status": "UP", "model_class": "OVDiff", "model_version": v}`.

Labels map to bank classes by the `Label`'s `value`, its `alias` and its `predicted_values` (comma-separated; all
that the bank has: they are shown as that one label), case and spacing folded, each bank class to the first Label
naming it. Labels the bank lacks are reported (`unknown`, and logged), never guessed; only mapped classes are
segmented. Results carry the `Label` value Label Studio shows, one brush region per Label.

Task images are fetched by URL, within the service's upload limit, with redirects refused:
- `/data/...` (uploads, local files): joined to `LABEL_STUDIO_URL`; `LABEL_STUDIO_API_KEY` goes in `Authorization:
  Token ...` to that host only, never to any other;
- `http(s)://...`: only from `LABEL_STUDIO_URL`'s host or a host in `OVDIFF_LS_ALLOWED_HOSTS` (comma-separated
  `host[:port]`);
- `s3://bucket/key`: only buckets listed there as `s3://bucket` (read with the service's S3 settings).
Any other URL is refused: the service never fetches an address a client names unless the operator allowed it.
`OVDIFF_LS_BASIC_AUTH=user:password` makes these routes require that HTTP Basic auth (set the same in Label Studio's
model connection). The tasks of one request are sent to the segmenter together, so Serve batches them.
"""
from __future__ import annotations

import asyncio
import base64
import hmac
import logging
import os
import time
import xml.etree.ElementTree as ET
from dataclasses import dataclass, field
from urllib.parse import urljoin, urlparse

import numpy as np
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse

from .engine import Job
from .limits import RequestError, decode_image

log = logging.getLogger("ovdiff.serve.labelstudio")
MAX_CONFIG_CHARS = 1_000_000


@dataclass(frozen=True)
class LabelStudioSettings:
    """Where task images may come from and how the routes are protected (from the environment by default)."""

    url: str | None = None  # LABEL_STUDIO_URL: resolves /data/... paths; its host may be fetched from
    api_key: str | None = field(default=None, repr=False)  # LABEL_STUDIO_API_KEY: sent to `url`'s host only
    allowed_hosts: tuple[str, ...] = ()  # other host[:port] (http/https) and s3://bucket sources allowed
    basic_auth: str | None = field(default=None, repr=False)  # "user:password" required on the routes
    max_tasks: int = 100  # Label Studio sends up to 100 tasks per /predict (its ML batch size)
    fetch_timeout_s: float = 20.0
    pamr: bool = False

    @classmethod
    def from_env(cls, **overrides) -> "LabelStudioSettings":
        env = os.environ
        hosts = tuple(h.strip() for h in env.get("OVDIFF_LS_ALLOWED_HOSTS", "").split(",") if h.strip())
        kw = dict(url=env.get("LABEL_STUDIO_URL") or None, api_key=env.get("LABEL_STUDIO_API_KEY") or None,
                  allowed_hosts=hosts, basic_auth=env.get("OVDIFF_LS_BASIC_AUTH") or None,
                  max_tasks=int(env.get("OVDIFF_LS_MAX_TASKS", "100")))
        kw.update(overrides)
        return cls(**kw)


# --------------------------------------------------------------------------------------------- label config

@dataclass
class LabelMap:
    """A project's labeling config read for brush predictions."""

    from_name: str
    to_name: str
    value_key: str  # task data key of the image (`$image` -> "image")
    labels: dict[str, list[str]]  # Label value -> the bank classes shown as it
    unknown: list[str]  # Label values that match no bank class


def live_names(entry) -> list[str]:
    """A catalog entry's classes that are not removed (a removed class's label is unknown to the bank)."""
    removed = getattr(entry, "removed", frozenset())
    return [n for i, n in enumerate(entry.names) if i not in removed]


def parse_label_config(xml: str, bank_names: list[str]) -> LabelMap:
    """The first `BrushLabels` (and the `Image` it points at) of a config, its labels mapped onto the bank."""
    from ..vocab import fold

    if not isinstance(xml, str) or not xml.strip():
        raise RequestError(400, "no label_config: the request must carry the project's labeling config",
                           None, "bad_label_config")
    if len(xml) > MAX_CONFIG_CHARS:
        raise RequestError(413, f"label_config over {MAX_CONFIG_CHARS} characters", None, "too_large")
    if "<!DOCTYPE" in xml or "<!ENTITY" in xml:
        raise RequestError(400, "label_config: DTDs and entities are not accepted", None, "bad_label_config")
    try:
        root = ET.fromstring(xml)
    except ET.ParseError as e:
        raise RequestError(400, f"label_config is not valid XML: {e}", None, "bad_label_config") from None
    brush = next(root.iter("BrushLabels"), None)
    if brush is None:
        raise RequestError(400, "label_config has no <BrushLabels>: this backend predicts brush masks",
                           {"tags": sorted({el.tag for el in root.iter()})}, "bad_label_config")
    to_name = brush.get("toName", "")
    image = next((el for el in root.iter("Image") if el.get("name") == to_name), None)
    if image is None or not (image.get("value") or "").startswith("$"):
        raise RequestError(400, f"label_config: <BrushLabels toName={to_name!r}> names no <Image> with a $value",
                           None, "bad_label_config")
    by = {fold(n): n for n in bank_names}
    labels, unknown, taken = {}, [], set()
    for lab in brush.iter("Label"):
        value = lab.get("value")
        if not value:
            continue
        cands = [value, lab.get("alias") or ""] + (lab.get("predicted_values") or "").split(",")
        hits = list(dict.fromkeys(by[fold(c)] for c in cands if c.strip() and fold(c) in by and by[fold(c)]
                                  not in taken))
        if hits:
            labels[value] = hits
            taken.update(hits)
        else:
            unknown.append(value)
    return LabelMap(brush.get("name", ""), to_name, image.get("value")[1:], labels, unknown)


# --------------------------------------------------------------------------------------------- image fetching

def _origin(u) -> str:
    port = u.port or {"http": 80, "https": 443}.get(u.scheme)
    return f"{(u.hostname or '').lower()}:{port}"


class Fetcher:
    """Task image URL -> bytes, only from allowed sources, within `max_bytes`, no redirects followed."""

    def __init__(self, settings: LabelStudioSettings, max_bytes: int, storage: dict | None = None):
        self.s, self.max_bytes, self.storage = settings, max_bytes, storage
        self.ls = urlparse(settings.url) if settings.url else None
        hosts = [h for h in settings.allowed_hosts if not h.startswith("s3://")]
        self.hosts = {_origin(urlparse(h if "://" in h else f"http://{h}")) for h in hosts}
        self.hosts |= {_origin(urlparse(h if "://" in h else f"https://{h}")) for h in hosts if ":" not in h}
        self.buckets = {h[5:].strip("/") for h in settings.allowed_hosts if h.startswith("s3://")}

    def resolve(self, url: str) -> tuple[str, dict]:
        """(absolute URL, headers) or RequestError when the source is not allowed."""
        if not isinstance(url, str) or not url:
            raise RequestError(400, "task has no image URL", None, "bad_task")
        if url.startswith("/") and not url.startswith("//"):
            if self.ls is None:
                raise RequestError(400, f"image {url[:100]!r} is a Label Studio path but LABEL_STUDIO_URL is not set "
                                        "on the service", None, "refused_url")
            url = urljoin(self.s.url.rstrip("/") + "/", url.lstrip("/"))
        u = urlparse(url)
        if u.scheme == "s3":
            if u.netloc not in self.buckets:
                raise RequestError(403, f"image {url[:100]!r}: bucket {u.netloc!r} is not an allowed source (add "
                                        f"s3://{u.netloc} to OVDIFF_LS_ALLOWED_HOSTS)", None, "refused_url")
            return url, {}
        if u.scheme not in ("http", "https") or not u.hostname:
            raise RequestError(403, f"image {url[:100]!r}: only http(s), s3 and Label Studio /data/ URLs are fetched",
                               None, "refused_url")
        if self.ls is not None and _origin(u) == _origin(self.ls) and u.scheme == self.ls.scheme:
            return url, ({"Authorization": f"Token {self.s.api_key}"} if self.s.api_key else {})
        if _origin(u) in self.hosts:
            return url, {}
        raise RequestError(403, f"image {url[:100]!r}: host {u.hostname!r} is neither LABEL_STUDIO_URL's nor in "
                                "OVDIFF_LS_ALLOWED_HOSTS", None, "refused_url")

    async def fetch(self, client, url: str) -> bytes:
        url, headers = self.resolve(url)
        if url.startswith("s3://"):
            return await asyncio.to_thread(self._s3, url)
        try:
            async with client.stream("GET", url, headers=headers, timeout=self.s.fetch_timeout_s) as r:
                if r.status_code != 200:
                    raise RequestError(502, f"image {url[:100]!r}: HTTP {r.status_code} from its host"
                                       + (" (redirects are not followed)" if 300 <= r.status_code < 400 else ""),
                                       None, "fetch_failed")
                length = r.headers.get("content-length")
                if length and length.isdigit() and int(length) > self.max_bytes:
                    raise self._too_large(url)
                data = bytearray()
                async for chunk in r.aiter_bytes():
                    data += chunk
                    if len(data) > self.max_bytes:
                        raise self._too_large(url)
                return bytes(data)
        except RequestError:
            raise
        except Exception as e:  # noqa: BLE001 - connection refused, timeout, bad TLS: the task's error
            raise RequestError(502, f"image {url[:100]!r}: cannot fetch it: {type(e).__name__}", None,
                               "fetch_failed") from None

    def _too_large(self, url: str) -> RequestError:
        return RequestError(413, f"image {url[:100]!r}: more than {self.max_bytes:,} bytes", None, "too_large")

    def _s3(self, url: str) -> bytes:
        from ..store.fs import Location, StoreError

        parent, _, key = url.rpartition("/")
        try:
            return Location(parent, self.storage).read_bytes(key, self.max_bytes)
        except StoreError as e:
            raise RequestError(502, f"image {url[:100]!r}: {e}", None, "fetch_failed") from None


# --------------------------------------------------------------------------------------------------- routes

def _authorized(request: Request, expected: str | None) -> bool:
    if not expected:
        return True
    header = request.headers.get("authorization", "")
    if not header.lower().startswith("basic "):
        return False
    try:
        given = base64.b64decode(header[6:].strip(), validate=True).decode("utf-8")
    except (ValueError, UnicodeDecodeError):
        return False
    return hmac.compare_digest(given.encode(), expected.encode())


def mount_labelstudio(app: FastAPI, backend, settings: LabelStudioSettings | None = None) -> None:
    """Add the ML backend routes to the service's app (`make_app` calls this)."""
    from ..label.encode import ls_brush_rle
    from ..label.labelstudio import brush_results, model_version, prediction_score

    s = settings or LabelStudioSettings.from_env()

    def unauthorized() -> JSONResponse:
        return JSONResponse({"error": "HTTP Basic auth required (OVDIFF_LS_BASIC_AUTH)", "detail": None,
                             "code": "unauthorized"}, status_code=401, headers={"WWW-Authenticate": "Basic"})

    async def entry_of(body: dict):
        cat = await backend.catalog()
        return cat, cat.resolve((body.get("params") or {}).get("bank") if isinstance(body.get("params"), dict)
                                else None)

    async def json_body(request: Request) -> dict:
        try:
            body = await request.json()
        except ValueError:
            raise RequestError(400, "expected a JSON body", None, "bad_json") from None
        if not isinstance(body, dict):
            raise RequestError(400, "expected a JSON object", None, "bad_json")
        return body

    @app.get("/health", tags=["label studio"])
    async def ls_health(request: Request) -> JSONResponse:
        if not _authorized(request, s.basic_auth):
            return unauthorized()
        try:
            cat = await backend.catalog()
            await backend.health()
        except Exception as e:  # noqa: BLE001
            return JSONResponse({"status": "DOWN", "error": f"{type(e).__name__}: {e}"}, status_code=503)
        e = cat.banks[cat.default]
        return JSONResponse({"status": "UP", "model_class": "OVDiff", "model_version": model_version(e.bank_id,
                                                                                                        e.version)})

    @app.post("/setup", tags=["label studio"])
    async def ls_setup(request: Request) -> JSONResponse:
        if not _authorized(request, s.basic_auth):
            return unauthorized()
        body = await json_body(request)
        cat, e = await entry_of(body)
        lm = parse_label_config(body.get("schema") or body.get("label_config"), live_names(e))
        if lm.unknown:
            log.warning("label studio project %s: labels not in bank %s: %s", str(body.get("project"))[:40], e.key,
                        ", ".join(lm.unknown[:50]))
        return JSONResponse({"model_version": model_version(e.bank_id, e.version, s.pamr), "labels": lm.labels,
                             "unknown": lm.unknown})

    @app.get("/versions", tags=["label studio"])
    async def ls_versions(request: Request) -> JSONResponse:
        if not _authorized(request, s.basic_auth):
            return unauthorized()
        cat = await backend.catalog()
        return JSONResponse({"versions": [model_version(b.bank_id, b.version, s.pamr) for b in cat.banks.values()]})

    @app.post("/predict", tags=["label studio"])
    async def ls_predict(request: Request) -> JSONResponse:
        import httpx

        t0 = time.perf_counter()
        if not _authorized(request, s.basic_auth):
            return unauthorized()
        body = await json_body(request)
        tasks = body.get("tasks")
        if not isinstance(tasks, list) or not tasks:
            raise RequestError(400, "`tasks` must be a non-empty list", None, "bad_tasks")
        if len(tasks) > s.max_tasks:
            raise RequestError(413, f"{len(tasks)} tasks in one request, at most {s.max_tasks} (OVDIFF_LS_MAX_TASKS)",
                               {"max_tasks": s.max_tasks}, "too_many_tasks")
        cat, e = await entry_of(body)
        lm = parse_label_config(body.get("label_config"), live_names(e))
        if not lm.labels:
            raise RequestError(400, f"none of the config's labels is a class of bank {e.key}: "
                                    f"{', '.join(lm.unknown[:20]) or '(no Label)'}",
                               {"unknown": lm.unknown, "bank": e.key}, "unknown_classes")
        if len(lm.labels) > cat.limits.max_classes:
            raise RequestError(400, f"{len(lm.labels)} labels, at most {cat.limits.max_classes} per request",
                               None, "too_many_classes")
        version = model_version(e.bank_id, e.version, s.pamr)
        label_of = {n: v for v, ns in lm.labels.items() for n in ns}
        classes = tuple(sorted(label_of, key=e.names.index))
        fetcher = Fetcher(s, cat.limits.max_upload_bytes, getattr(getattr(backend, "config", None), "storage", None))

        async def one(client, task) -> dict:
            try:
                data = task.get("data") if isinstance(task, dict) else None
                if not isinstance(data, dict) or lm.value_key not in data:
                    raise RequestError(400, f"task has no data.{lm.value_key}", None, "bad_task")
                raw = await fetcher.fetch(client, data[lm.value_key])
                image = await asyncio.to_thread(decode_image, raw, cat.limits)
                res = await backend.segment(e.key, Job(image, classes, s.pamr, scores=True, confidence=True))
                if res.get("status", 200) != 200:
                    raise RequestError(res["status"], res.get("error", "segmentation failed"), None,
                                       res.get("code", "internal"))
                labels = res["labels"]
                h, w = labels.shape
                region = res.get("region_scores") or {}
                groups: dict[str, list[int]] = {}  # Label value -> bank label values shown as it
                for v in sorted(int(x) for x in res["classes"] if x):
                    groups.setdefault(label_of[e.names[v - 1]], []).append(v)
                names = list(groups)
                masks = [np.isin(labels, vs) for vs in groups.values()]
                conf = res.get("confidence")  # issue 21: scores are confidences; the task's sorts by doubt
                if conf is not None and res.get("min_confidence"):
                    masks = [m & (conf >= res["min_confidence"]) for m in masks]  # unsure pixels: no brush
                if conf is not None:
                    scores = [float(conf[m].mean()) if m.any() else 0.0 for m in masks]
                else:
                    areas = {v: int((labels == v).sum()) for vs in groups.values() for v in vs}
                    scores = [sum(region.get(v, 0.0) * areas[v] for v in vs) / max(1, sum(areas[v] for v in vs))
                              for vs in groups.values()]
                rles = await asyncio.to_thread(lambda: [ls_brush_rle(m) for m in masks])
                result = brush_results(names, rles, int(w), int(h), lm.from_name, lm.to_name, scores)
                score = round(float(conf.mean()), 6) if conf is not None else \
                    prediction_score(scores, [int(m.sum()) for m in masks])
                return {"result": result, "score": score if score is not None else 0.0, "model_version": version}
            except RequestError as err:
                log.warning("predict: task %s: %s", task.get("id") if isinstance(task, dict) else "?", err.error)
                return {"result": [], "score": 0.0, "model_version": version, "error": err.error}

        async with httpx.AsyncClient(follow_redirects=False, trust_env=False) as client:
            results = await asyncio.gather(*(one(client, t) for t in tasks))
        failed = sum(1 for r in results if "error" in r)
        log.info("predict: %d tasks (%d failed) in %.1fs", len(tasks), failed, time.perf_counter() - t0)
        return JSONResponse({"results": results, "model_version": version, "unknown": lm.unknown})
