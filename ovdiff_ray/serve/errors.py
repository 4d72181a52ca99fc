"""Error handling of the service: one JSON error body for every status, and the handlers that produce it.

Every error a client sees is `{"error": message, "detail": ..., "code": ...}` (`ErrorBody`, documented in the
OpenAPI for each status a route can answer). 503 and 429 carry `Retry-After`. An unexpected exception is logged with
its traceback and answered with a plain JSON 500 that names no internals (no class names, pids or addresses).
"""
from __future__ import annotations

import logging
import math
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import BaseModel, Field
from starlette.exceptions import HTTPException as StarletteHTTPException

from .limits import RequestError

log = logging.getLogger("ovdiff.serve")

STATUS_TEXT = {400: "bad request: a field, the form or the image is invalid", 401: "admin token missing",
               403: "wrong admin token", 409: "the bank is served at a fixed version (not live)",
               404: "unknown bank or route", 405: "method not allowed", 408: "request not received in time",
               413: "upload or image too large", 415: "not multipart or not an image",
               429: "busy: retry after Retry-After seconds", 500: "internal error (details in the service log)",
               503: "busy, restarting or storage unavailable: retry after Retry-After seconds",
               504: "segmentation took longer than the request timeout"}


class ErrorBody(BaseModel):
    """The body of every error response."""

    error: str = Field(description="what is wrong, in one sentence")
    detail: Any = Field(None, description="JSON details (field, limits, allowed values) or null")
    code: str = Field(description="stable machine-readable reason, e.g. bad_format, too_many_pixels, overloaded")


class Overloaded(Exception):
    """The segmenter refused or lost the request (queue full, no replica, replica died): 503/429 + Retry-After."""

    def __init__(self, message: str, status: int = 503, retry_after_s: float | None = 2.0, code: str = "overloaded"):
        super().__init__(message)
        self.status, self.retry_after_s, self.code = status, retry_after_s, code


def error_responses(*statuses: int) -> dict[int | str, dict]:
    """OpenAPI `responses` for these statuses, all with the `ErrorBody` schema."""
    return {s: {"model": ErrorBody, "description": STATUS_TEXT.get(s, "error")} for s in statuses}


def retry_header(seconds: float | None) -> dict[str, str]:
    return {"Retry-After": str(max(1, math.ceil(seconds)))} if seconds is not None else {}


def error_response(e: RequestError | Overloaded, headers: dict | None = None) -> JSONResponse:
    if isinstance(e, Overloaded):
        return JSONResponse({"error": str(e), "detail": {"retry_after_s": e.retry_after_s}, "code": e.code},
                            status_code=e.status, headers={**retry_header(e.retry_after_s), **(headers or {})})
    hdr = {**(getattr(e, "headers", None) or {}), **(headers or {})}
    if e.status == 408:
        hdr["Connection"] = "close"
    if e.status in (429, 503) and "Retry-After" not in hdr:
        hdr.update(retry_header((e.detail or {}).get("retry_after_s", 5.0) if isinstance(e.detail, dict) else 5.0))
    return JSONResponse(e.to_dict(), status_code=e.status, headers=hdr or None)


def install_error_handlers(app: FastAPI) -> None:
    """RequestError / Overloaded / HTTP errors / validation errors -> `ErrorBody` JSON (validation: 400, not 422)."""

    @app.exception_handler(RequestError)
    async def _request_error(request: Request, e: RequestError):
        return error_response(e)

    @app.exception_handler(Overloaded)
    async def _overloaded(request: Request, e: Overloaded):
        return error_response(e)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, e: StarletteHTTPException):
        msg = {404: f"no route {request.method} {request.url.path[:200]}",
               405: f"method {request.method} not allowed on {request.url.path[:200]}"}.get(e.status_code,
                                                                                            str(e.detail))
        return JSONResponse({"error": msg, "detail": None, "code": "http"}, status_code=e.status_code,
                            headers=getattr(e, "headers", None))

    @app.exception_handler(RequestValidationError)
    async def _validation_error(request: Request, e: RequestValidationError):
        errs = [{"field": ".".join(str(x) for x in err.get("loc", ())[1:]), "problem": err.get("msg")}
                for err in e.errors()]
        return JSONResponse({"error": "invalid request: " + "; ".join(f"{x['field']}: {x['problem']}" for x in errs),
                             "detail": errs, "code": "bad_field"}, status_code=400)


def document_errors(schema: dict) -> dict:
    """Post-process an OpenAPI document: FastAPI's automatic 422 (never answered: validation errors are 400) is
    dropped, and every operation lists 500 with the error schema."""
    for path in schema.get("paths", {}).values():
        for op in path.values():
            responses = op.get("responses", {})
            responses.pop("422", None)
            responses.setdefault("500", {"description": STATUS_TEXT[500],
                                         "content": {"application/json": {"schema": {
                                             "$ref": "#/components/schemas/ErrorBody"}}}})
    comps = schema.get("components", {}).get("schemas", {})
    for k in ("HTTPValidationError", "ValidationError"):
        comps.pop(k, None)
    if "ErrorBody" not in comps:
        comps["ErrorBody"] = ErrorBody.model_json_schema()
        schema.setdefault("components", {})["schemas"] = comps
    return schema
