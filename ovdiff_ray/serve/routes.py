"""The service's routes (one APIRouter): `POST /v1/segment`, `GET /v1/bank`, `GET /healthz`, `GET /` (try-it page)
and the operators' `GET /v1/status` (behind `OVDIFF_ADMIN_TOKEN`, not in the OpenAPI).

A segment request: form read and checked -> image header checked (cost known) -> pixel budget admitted -> decoded
upright and downscaled to `max_work_side` -> segmenter -> mask upscaled to the upload's size and encoded.
"""
from __future__ import annotations

import asyncio
import hmac
import logging
import os
import time
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any, Literal

from fastapi import APIRouter, Request
from fastapi.responses import HTMLResponse, JSONResponse, Response
from pydantic import BaseModel, ConfigDict, Field
from starlette.datastructures import UploadFile
from starlette.exceptions import HTTPException as StarletteHTTPException

from .admission import PixelBudget
from .backends import HEALTH_TIMEOUT_S, Backend
from .engine import Catalog, Job, encode
from .. import logs, metrics
from .errors import Overloaded, error_response, error_responses
from . import live
from .limits import (FORMATS, Limits, RequestError, check_header, decode_image, parse_bool, parse_format,
                     parse_regions)

log = logging.getLogger("ovdiff.serve")
STATIC = Path(__file__).resolve().parent / "static"
FIELDS = ("image", "classes", "format", "pamr", "bank", "missing", "regions", "scores", "min_confidence",
          "explain")
ADMIN_TOKEN_ENV = "OVDIFF_ADMIN_TOKEN"


# ------------------------------------------------------------------------------------------ response schemas

class _Open(BaseModel):
    model_config = ConfigDict(extra="allow")


class BankRef(_Open):
    id: str
    version: int


class LegendItem(_Open):
    id: int
    name: str
    color: str


class SegmentBody(_Open):
    """`classes`: label value -> name for the values present (0 = background, c + 1 = bank class c)."""

    bank: BankRef
    width: int = Field(description="upload width (upright), the mask's width")
    height: int
    format: Literal["png", "rle", "overlay"]
    classes: dict[str, str]
    kept: list[str]
    mask: str | None = Field(None, description="format=png: base64 PNG, uint8 or uint16 per bank")
    mask_dtype: Literal["uint8", "uint16"] | None = None
    rle: dict[str, dict[str, Any]] | None = Field(None, description="format=rle: COCO RLE per label value")
    overlay: str | None = Field(None, description="format=overlay: base64 PNG (at most max_work_side wide)")
    legend: list[LegendItem] | None = None
    confidence: str | None = Field(None, description="scores=true: base64 16-bit grey PNG at the mask's size; "
                                                      "confidence = value / confidence_scale")
    confidence_scale: int | None = None
    class_confidence: dict[str, float] | None = Field(None, description="label value -> mean confidence")
    topk: dict[str, list[dict[str, Any]]] | None = Field(None, description="label value -> best classes by mean "
                                                                           "score over its pixels {id, name, score}")
    min_confidence: float | None = None
    unsure_value: int | None = Field(None, description="mask value of unsure pixels (absent from RLE)")
    unsure_pixels: int | None = None
    explain: dict[str, dict[str, Any]] | None = Field(None, description="explain=true: label value -> {name, pixels, "
                                                                        "prototypes [{extractor, level, kind, class, "
                                                                        "share, support, seeds}], note}")
    timing: dict[str, Any]


class BankSummary(_Open):
    key: str
    id: str
    version: int
    name: str | None
    num_classes: int
    mask_dtype: Literal["uint8", "uint16"]


class BankBody(BankSummary):
    classes: list[dict[str, Any]]
    default: str
    limits: dict[str, Any]
    banks: list[BankSummary]


class HealthBody(BaseModel):
    status: Literal["ok", "degraded"]
    checks: dict[str, Literal["ok", "degraded", "unavailable"]]


SEGMENT_FORM = {"requestBody": {"required": True, "content": {"multipart/form-data": {"schema": {
    "type": "object", "required": ["image"], "additionalProperties": False, "properties": {
        "image": {"type": "string", "format": "binary"},
        "classes": {"type": "string", "description": "comma-separated subset of the bank's classes"},
        "format": {"type": "string", "enum": list(FORMATS), "default": "png"},
        "pamr": {"type": "boolean", "default": False},
        "bank": {"type": "string", "description": "bank id, id@vN or configured name (default: the first)"},
        "missing": {"type": "string", "enum": ["error", "build"], "default": "error",
                    "description": "build: unknown classes become a job (admin token) -> 202"},
        "regions": {"type": "string", "description": "snap labels to regions: on/off or none | superpixels | sam "
                                                     "(default: the bank recipe's segmentation.regions)"},
        "scores": {"type": "boolean", "default": False,
                   "description": "also return the confidence map, per-class mean confidence and top-k classes"},
        "min_confidence": {"type": "number", "minimum": 0, "maximum": 1,
                           "description": "pixels under this confidence are unsure (255 / 65535 in the mask, "
                                          "absent from RLE); default the bank recipe's, 0 = off"},
        "explain": {"type": "boolean", "default": False,
                    "description": "also return, per class, the prototypes that won most of its pixels (level, "
                                   "extractor, support image indices and seeds)"}}}}}}}


# ---------------------------------------------------------------------------------------------------- router

def router(backend: Backend, admin_token: str | None = None) -> APIRouter:
    """The routes over `backend`. `admin_token` (default `$OVDIFF_ADMIN_TOKEN`) opens `GET /v1/status`."""
    admin_token = admin_token if admin_token is not None else os.environ.get(ADMIN_TOKEN_ENV) or None
    r = APIRouter()
    page = (STATIC / "index.html").read_text()
    budget = PixelBudget()
    depth = _Depth()

    @r.get("/", response_class=HTMLResponse, include_in_schema=False)
    async def index() -> HTMLResponse:
        return HTMLResponse(page)

    @r.get("/favicon.ico", include_in_schema=False)
    async def favicon() -> Response:
        return Response(status_code=204)

    @r.get("/v1/examples", include_in_schema=False)
    async def examples_list(bank: str | None = None) -> JSONResponse:
        """Example images for the page (toy scenes with ground truth, or bundled photos)."""
        from . import examples

        e = (await _catalog(backend)).resolve(bank)
        return JSONResponse({"bank": e.key, "examples": examples.listing(tuple(e.names))})

    @r.get("/v1/examples/{i}.png", include_in_schema=False)
    async def example_image(i: int, bank: str | None = None) -> Response:
        from . import examples

        e = (await _catalog(backend)).resolve(bank)
        data = await asyncio.to_thread(examples.image, tuple(e.names), tuple(e.kinds), i)
        if data is None:
            raise RequestError(404, f"no example {i}", None, "not_found")
        return Response(data, media_type="image/png")

    @r.get("/v1/examples/{i}/truth.png", include_in_schema=False)
    async def example_truth(i: int, bank: str | None = None) -> Response:
        from . import examples

        e = (await _catalog(backend)).resolve(bank)
        data = await asyncio.to_thread(examples.truth, tuple(e.names), tuple(e.kinds), i)
        if data is None:
            raise RequestError(404, f"example {i} has no ground truth", None, "not_found")
        return Response(data, media_type="image/png")

    @r.get("/healthz", responses={200: {"model": HealthBody}, **error_responses(503)})
    async def healthz() -> JSONResponse:
        """Public status only (`ok`, `degraded` with the failing check, or 503); answers within about 1 s."""
        info = await _health(backend)
        if info.get("status") not in ("ok", "degraded"):
            return JSONResponse({"error": "unavailable: the segmenter is not answering (restarting or "
                                          "overloaded)", "detail": {"checks": info.get("checks", {})},
                                 "code": "unavailable"}, status_code=503, headers={"Retry-After": "5"})
        return JSONResponse({"status": info["status"], "checks": info.get("checks", {})})

    @r.get("/v1/status", include_in_schema=False)
    async def status(request: Request) -> JSONResponse:
        """Operators: the segmenter's full report (banks, replica, memory, last storage error)."""
        if not admin_token:
            raise RequestError(404, f"operator status is off (set {ADMIN_TOKEN_ENV} on the ingress to enable "
                                    "it)", None, "http")
        given = request.headers.get("authorization", "").removeprefix("Bearer ").strip()
        if not hmac.compare_digest(given.encode(), admin_token.encode()):
            raise RequestError(401, "operator status needs `Authorization: Bearer <admin token>`", None,
                               "unauthorized")
        info = await _health(backend)
        return JSONResponse({**info, "admission": {"pixels_in_flight": budget.used, "peak": budget.peak,
                                                   "refused": budget.refused}})

    @r.get("/v1/bank", responses={200: {"model": BankBody}, **error_responses(400, 404, 503)})
    async def bank_info(bank: str | None = None) -> JSONResponse:
        """A served bank (default: the first): id, version, classes, recipe summary, limits, all banks."""
        cat = await _catalog(backend)
        e = cat.resolve(bank)
        return JSONResponse({**e.public(), "default": cat.default, "limits": cat.limits.to_dict(),
                             "banks": [b.public(with_classes=False) for b in cat.banks.values()]})

    @r.post("/v1/segment", openapi_extra=SEGMENT_FORM,
            responses={200: {"model": SegmentBody},
                       202: {"model": live.JobAccepted, "description": "missing=build: the unknown classes' job"},
                       **error_responses(400, 401, 403, 404, 408, 409, 413, 415, 429, 500, 503, 504)})
    async def segment(request: Request) -> JSONResponse:
        """Segment one image (multipart `image`; optional `classes`, `format`, `pamr`, `bank`, `missing`,
        `regions`, `scores`, `min_confidence`, `explain`)."""
        t0 = time.perf_counter()
        cat = await _catalog(backend)
        lim = cat.limits
        fields, data = await read_form(request, lim)
        fmt = parse_format(fields.get("format"))
        pamr = parse_bool("pamr", fields.get("pamr"))
        regions = parse_regions(fields.get("regions"))
        want_conf = parse_bool("scores", fields.get("scores"))
        minc = parse_min_confidence(fields.get("min_confidence"))
        want_explain = parse_bool("explain", fields.get("explain"))
        entry, classes, accepted = await live.segment_classes(backend, request, cat, fields)  # missing=build
        if accepted is not None:
            return accepted
        _, w, h = check_header(data, lim)  # cheap: the cost is known before any pixel is decoded
        t1 = time.perf_counter()
        async with depth.counted(), budget.admit(w * h, lim.max_inflight_pixels, lim.admission_wait_s):
            t2 = time.perf_counter()
            dec = await asyncio.to_thread(decode_image, data, lim, True)  # upright, at most max_work_side
            del data
            t3 = time.perf_counter()
            try:
                result = await backend.segment(entry.key, Job(dec.image, tuple(classes) if classes else None, pamr,
                                                                regions=regions, confidence=want_conf,
                                                                min_confidence=minc, explain=want_explain))
            except (RequestError, Overloaded):
                raise
            except Exception:  # noqa: BLE001 - the details go to the log, never to the client
                log.exception("segment request failed")
                raise RequestError(500, "segmentation failed (details in the service log)", None,
                                   "internal") from None
            if result.get("status", 200) != 200:
                return error_response(RequestError(result["status"], result.get("error", "segmentation failed"),
                                                   result.get("detail"), result.get("code", "internal")))
            body = await asyncio.to_thread(encode, dec.image, result, fmt, (dec.width, dec.height))
        body["timing"] = {"total_ms": round(1000 * (time.perf_counter() - t0), 1),
                          "validate_ms": round(1000 * (t1 - t0), 1), "admission_ms": round(1000 * (t2 - t1), 1),
                          "decode_ms": round(1000 * (t3 - t2), 1), **body["timing"]}
        record_stages(body["timing"])
        logs.set_context(bank_id=body["bank"]["id"], bank_version=body["bank"]["version"])
        if dec.scaled:
            body["work_size"] = [int(dec.image.shape[1]), int(dec.image.shape[0])]
        return JSONResponse(body, headers={"X-OVDiff-Bank": f"{body['bank']['id']}@v{body['bank']['version']}"})

    return r


class _Depth:
    """`ovdiff_queue_depth` of this ingress replica: segment requests between validation and answer (waiting for
    pixels, decoding, at the segmenter, encoding)."""

    def __init__(self):
        self.n = 0
        metrics.set_gauge("ovdiff_queue_depth", 0)  # on /metrics from the replica's start, not the first request

    @asynccontextmanager
    async def counted(self):
        self.n += 1
        metrics.set_gauge("ovdiff_queue_depth", self.n)
        try:
            yield
        finally:
            self.n -= 1
            metrics.set_gauge("ovdiff_queue_depth", self.n)


def record_stages(timing: dict) -> None:
    """A segment answer's `timing` (validate/admission/decode/segment/encode `_ms`, the segmenter's `stages_ms`) ->
    `ovdiff_segment_stage_seconds` observations, one per stage (any stage name the segmenter reports)."""
    if not metrics.enabled():
        return
    for k, v in timing.items():
        if k.endswith("_ms") and k != "total_ms" and isinstance(v, (int, float)):
            metrics.observe("ovdiff_segment_stage_seconds", v / 1000, {"stage": k[:-3]})
    for k, v in (timing.get("stages_ms") or {}).items():
        metrics.observe("ovdiff_segment_stage_seconds", v / 1000, {"stage": k})


def parse_min_confidence(value: str | None) -> float | None:
    """The `min_confidence` form field -> a number in [0, 1] (None when absent); else a 400 naming it."""
    if value is None or not value.strip():
        return None
    from ..confidence import check_min_confidence

    try:
        return check_min_confidence(value.strip())
    except ValueError as e:
        raise RequestError(400, f"field 'min_confidence': {str(e).split(': ', 1)[1]}",
                           {"field": "min_confidence", "value": value[:200]}, "bad_field") from None


async def _health(backend: Backend) -> dict:
    try:
        return await asyncio.wait_for(backend.health(), HEALTH_TIMEOUT_S + 0.1)
    except asyncio.TimeoutError:
        return {"status": "unavailable", "checks": {"segmenter": "unavailable"},
                "reason": f"no answer within {HEALTH_TIMEOUT_S:g}s"}
    except Exception as e:  # noqa: BLE001 - unhealthy is an answer, not a crash
        log.warning("health check failed: %s: %s", e.__class__.__name__, e)
        return {"status": "unavailable", "checks": {"segmenter": "unavailable"},
                "reason": f"{e.__class__.__name__}: {str(e)[:300]}"}


async def _catalog(backend: Backend) -> Catalog:
    try:
        return await backend.catalog()
    except Overloaded:
        raise
    except Exception as e:  # noqa: BLE001 - a timeout or a lost replica included: the segmenter is not there
        log.warning("catalog unavailable: %s: %s", e.__class__.__name__, e)
        raise Overloaded("segmenter unavailable: no replica is ready; retry shortly", 503, 5.0,
                         "unavailable") from None


async def read_form(request: Request, limits: Limits) -> tuple[dict[str, str], bytes]:
    """The multipart form -> (text fields, image bytes); every shape problem is a RequestError."""
    ctype = request.headers.get("content-type", "")
    if not ctype.lower().startswith("multipart/form-data"):
        raise RequestError(415, f"expected a multipart/form-data upload with an `image` file, got content type "
                                f"{ctype[:60] or 'none'!r}", {"content_type": ctype[:200]}, "not_multipart")
    try:
        form = await request.form(max_files=2, max_fields=len(FIELDS) + 4, max_part_size=limits.max_field_bytes)
    except StarletteHTTPException as e:
        raise RequestError(400, f"malformed multipart form: {e.detail}", None, "bad_form") from None
    try:
        names = list(form.keys())
        unknown = sorted(set(names) - set(FIELDS))
        if unknown:
            raise RequestError(400, f"unknown form field(s) {', '.join(repr(u[:60]) for u in unknown[:10])} (known: "
                                    f"{', '.join(FIELDS)})", {"unknown": [u[:200] for u in unknown[:10]],
                                                              "known": list(FIELDS)}, "bad_field")
        twice = sorted({n for n in names if len(form.getlist(n)) > 1})
        if twice:
            raise RequestError(400, f"form field(s) given more than once: {', '.join(twice)}", {"fields": twice},
                               "bad_field")
        upload = form.get("image")
        if upload is None:
            raise RequestError(400, "missing form field 'image' (the image file to segment)", {"field": "image"},
                               "missing_image")
        if not isinstance(upload, UploadFile):
            raise RequestError(400, "form field 'image' must be a file upload, got a text value",
                               {"field": "image"}, "bad_field")
        fields = {}
        for n in FIELDS[1:]:
            v = form.get(n)
            if v is not None and not isinstance(v, str):
                raise RequestError(400, f"form field {n!r} must be text, got a file", {"field": n}, "bad_field")
            if v is not None:
                fields[n] = v
        data = await upload.read(limits.max_upload_bytes + 1)
    finally:
        await form.close()
    if not data:
        raise RequestError(400, "empty upload: the `image` file has no bytes", {"field": "image"}, "empty_upload")
    return fields, data
