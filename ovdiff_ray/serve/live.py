"""Live-bank routes: add classes over HTTP (`POST /v1/classes`, `GET /v1/jobs/ID`) and `missing=build` at segment
time, behind an admin Bearer token.

- `POST /v1/classes` JSON `{"classes": [{"name", "kind": "thing|stuff", "prompt"}], "bank": "optional id/name"}`
  -> 202 `{"job", "pending", "present", "state", ...}` (+ `Location: /v1/jobs/ID`); the classes are validated as
  vocabulary lines are, and built and committed by the job manager (`jobs.py`) as a new version of a bank the
  service follows (`follow_latest`).
- `POST /v1/classes` with `"rebuild": true`: the classes (all in the bank, or removed from it) are drawn again from
  the given kind and prompt and replace their entries in place (same label values, one new version). Without it a
  class whose prompt or kind differs from the bank's is `present`, listed in `prompt_changed` with a hint.
- `POST /v1/classes/remove` `{"classes": [names]}`, `POST /v1/classes/rename` `{"name", "to"}`, `POST
  /v1/classes/alias` `{"name", "alias"}` -> 200 `{"version", "summary"}`: one new version each (tombstone, new name,
  extra name; no label value moves, `store/edits.py`); an unknown or taken name is a 400 naming it.
- `GET /v1/jobs/ID` -> state (`queued | running | done | failed`), per class outcome (`present | pending | built |
  failed`, with reasons, attempts, lost workers), and the version that holds the classes.
- `POST /v1/segment` with `missing=build`: unknown class names are submitted as a job (things) -> 202 with the job,
  instead of the 400 that lists them.

The token is `OVDIFF_ADMIN_TOKEN` on the ingress, else the first line of the file named by `admin.token_file`;
with neither the routes are off (404, as any unknown route). 401 without `Authorization: Bearer ...`, 403 with a
wrong token (compared with `hmac.compare_digest`). The token is never logged, echoed or put in the config.
"""
from __future__ import annotations

import hmac
import json
import logging
import os
import re
import time
from typing import Any, Literal

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field, ValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException

from .errors import error_responses
from .limits import RequestError, check_classes, split_classes

log = logging.getLogger("ovdiff.serve")
TOKEN_ENV = "OVDIFF_ADMIN_TOKEN"
MAX_TOKEN_BYTES = 4096
MAX_BODY_BYTES = 256 * 1024
JOB_ID = re.compile(r"^[0-9a-f]{16}$")
MISSING = ("error", "build")


# ------------------------------------------------------------------------------------------------- the token

_file_cache: dict[str, tuple[float, bytes | None]] = {}


def admin_token(admin: dict) -> bytes | None:
    """The configured admin token (environment first, then the token file), or None: the routes are off."""
    env = os.environ.get(TOKEN_ENV, "").strip()
    if env:
        return env.encode()
    path = admin.get("token_file")
    if not path:
        return None
    try:
        mtime = os.stat(path).st_mtime
        cached = _file_cache.get(path)
        if cached and cached[0] == mtime:
            return cached[1]
        with open(path, "rb") as f:
            first = f.read(MAX_TOKEN_BYTES).split(b"\n", 1)[0].strip()
        _file_cache[path] = (mtime, first or None)
        return first or None
    except OSError as e:
        log.warning("admin token file %s unreadable (%s): admin routes are off", path, type(e).__name__)
        return None


def authorize(request: Request, admin: dict) -> None:
    """404 when no token is configured (the route is off), 401 without a Bearer token, 403 with a wrong one."""
    token = admin_token(admin)
    if token is None:
        raise StarletteHTTPException(404)
    header = request.headers.get("authorization", "")
    scheme, _, given = header.partition(" ")
    if scheme.lower() != "bearer" or not given.strip():
        raise RequestError(401, "this route needs an admin token: send `Authorization: Bearer TOKEN`", None,
                           "unauthorized", headers={"WWW-Authenticate": 'Bearer realm="ovdiff admin"'})
    if not hmac.compare_digest(given.strip().encode(), token):
        raise RequestError(403, "wrong admin token", None, "forbidden")


# --------------------------------------------------------------------------------------------------- bodies

class ClassIn(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: str
    kind: Literal["thing", "stuff"] = "thing"
    prompt: str = ""


class ClassesIn(BaseModel):
    model_config = ConfigDict(extra="forbid")

    classes: list[ClassIn] = Field(min_length=1)
    bank: str | None = None
    rebuild: bool = False  # draw classes of the bank again from these kinds/prompts, in place (same label values)


class RemoveIn(BaseModel):
    model_config = ConfigDict(extra="forbid")

    classes: list[str] = Field(min_length=1)
    bank: str | None = None


class RenameIn(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: str
    to: str
    bank: str | None = None


class AliasIn(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: str
    alias: str
    bank: str | None = None


class EditDone(BaseModel):
    """An edit of the bank's classes committed as one new version."""

    model_config = ConfigDict(extra="allow")

    version: int
    summary: str


class JobAccepted(BaseModel):
    """`POST /v1/classes` (and `missing=build`): the job that builds the pending classes."""

    model_config = ConfigDict(extra="allow")

    job: str = Field(description="job id, 16 hex digits")
    url: str = Field(description="where to poll the job: /v1/jobs/ID")
    pending: list[str] = Field(description="classes the job builds")
    present: list[str] = Field(description="classes the bank already has")


class JobBody(BaseModel):
    """`GET /v1/jobs/ID`: state queued | running | done | failed, per-class outcomes, the version holding them."""

    model_config = ConfigDict(extra="allow")

    job: str
    state: Literal["queued", "running", "done", "failed"]


async def read_json(request: Request) -> Any:
    ctype = request.headers.get("content-type", "")
    if not ctype.lower().startswith("application/json"):
        raise RequestError(415, f"expected a JSON body (Content-Type: application/json), got {ctype[:60] or 'none'!r}",
                           {"content_type": ctype[:200]}, "not_json")
    body = b""
    async for chunk in request.stream():
        body += chunk
        if len(body) > MAX_BODY_BYTES:
            raise RequestError(413, f"body too large: more than {MAX_BODY_BYTES:,} bytes",
                               {"max_bytes": MAX_BODY_BYTES}, "too_large")
    try:
        return json.loads(body)
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise RequestError(400, f"body is not valid JSON: {e}", None, "bad_json") from None


def parse_body(model, raw: Any):
    """A JSON body -> `model`; 400 naming every bad field."""
    try:
        return model.model_validate(raw)
    except ValidationError as e:
        errs = [{"field": ".".join(str(x) for x in err.get("loc", ())), "problem": err.get("msg")}
                for err in e.errors()]
        raise RequestError(400, "invalid body: " + "; ".join(f"{x['field']}: {x['problem']}" for x in errs),
                           errs, "bad_field") from None


def validate_classes(raw: list[ClassIn], max_classes: int) -> list[dict]:
    """Request classes -> dicts, each checked as a vocabulary line is; errors name the item (`classes[i]`)."""
    from ..vocab import VocabError, check_class, fold

    if len(raw) > max_classes:
        raise RequestError(400, f"too many classes: {len(raw)} in one request, at most {max_classes}",
                           {"count": len(raw), "max_classes_per_request": max_classes}, "too_many_classes")
    out, seen = [], {}
    for i, c in enumerate(raw):
        where = f"classes[{i}]"
        try:
            v = check_class(c.name, c.kind, c.prompt, where)
        except VocabError as e:
            raise RequestError(400, str(e), {"field": where}, "bad_class") from None
        k = fold(v.name)
        if k in seen:
            raise RequestError(400, f"{where}: duplicate class {v.name!r} (first as classes[{seen[k]}])",
                               {"field": where}, "bad_class")
        seen[k] = i
        out.append({"name": v.name, "kind": v.kind, "prompt": v.prompt})
    return out


def live_entry(cat, ref: str | None):
    e = cat.resolve(ref)
    if not e.live:
        raise RequestError(409, f"bank {e.key} is served at a fixed version: classes can be added only to a bank "
                                "the service follows (serve it without a version, with follow_latest on)",
                           {"bank": e.key, "live": cat.admin.get("live", [])}, "not_live")
    return e


async def submit(backend, cat, entry, classes: list[dict], rebuild: bool = False) -> JSONResponse:
    if not hasattr(backend, "submit_classes"):
        raise RequestError(503, "adding classes needs the Serve application (its job manager)", None, "no_jobs")
    r = await (backend.submit_classes(entry.uri, classes, rebuild) if rebuild else
               backend.submit_classes(entry.uri, classes))
    status = r.pop("status", 202)
    if status != 202:
        retry = (r.get("detail") or {}).get("retry_after_s") if isinstance(r.get("detail"), dict) else None
        raise RequestError(status, r.get("error", "job refused"), r.get("detail"), r.get("code", "bad_request"),
                           headers={"Retry-After": str(retry)} if retry else None)
    body = {**r, "bank": {"key": entry.key, "id": entry.bank_id, "version": entry.version},
            "url": f"/v1/jobs/{r['job']}"}
    log.info("job %s for bank %s: %d pending, %d present", r["job"], entry.key, len(r["pending"]), len(r["present"]))
    return JSONResponse(body, status_code=202, headers={"Location": body["url"]})


# --------------------------------------------------------------------------------------------------- routes

def add_live_routes(app: FastAPI, backend) -> None:
    """`POST /v1/classes` and `GET /v1/jobs/{job}` on the service's app."""

    @app.post("/v1/classes", status_code=202,
              responses={202: {"model": JobAccepted}, **error_responses(400, 401, 403, 404, 409, 413, 415, 429, 503)},
              openapi_extra={"requestBody": {"required": True, "content": {
        "application/json": {"schema": ClassesIn.model_json_schema()}}}})
    async def add_classes(request: Request) -> JSONResponse:
        cat = await backend.catalog()
        authorize(request, cat.admin)
        body = parse_body(ClassesIn, await read_json(request))
        classes = validate_classes(body.classes, int(cat.admin.get("max_classes_per_request", 16)))
        return await submit(backend, cat, live_entry(cat, body.bank), classes, body.rebuild)

    async def edit(request: Request, model, action: str, names) -> JSONResponse:
        cat = await backend.catalog()
        authorize(request, cat.admin)
        body = parse_body(model, await read_json(request))
        entry = live_entry(cat, body.bank)
        names = names(body)
        if len(names) > int(cat.admin.get("max_classes_per_request", 16)) or any(len(n) > 200 for n in names):
            raise RequestError(400, "too many or too long class names in one edit", {"count": len(names)},
                               "too_many_classes")
        if not hasattr(backend, "edit_classes"):
            raise RequestError(503, "editing classes needs the Serve application (its job manager)", None, "no_jobs")
        r = await backend.edit_classes(entry.uri, action, names)
        status = r.pop("status", 200)
        if status != 200:
            raise RequestError(status, r.get("error", "edit refused"), r.get("detail"), r.get("code", "bad_edit"))
        log.info("bank %s: %s", entry.key, r["summary"])
        return JSONResponse({**r, "bank": {"key": entry.key, "id": entry.bank_id}})

    edit_errors = {200: {"model": EditDone}, **error_responses(400, 401, 403, 404, 409, 413, 415, 503)}

    @app.post("/v1/classes/remove", responses=edit_errors, openapi_extra={"requestBody": {"required": True, "content": {
        "application/json": {"schema": RemoveIn.model_json_schema()}}}})
    async def remove_classes(request: Request) -> JSONResponse:
        """Tombstone classes: a new version where they are never predicted; every label value stays."""
        return await edit(request, RemoveIn, "remove", lambda b: list(b.classes))

    @app.post("/v1/classes/rename", responses=edit_errors, openapi_extra={"requestBody": {"required": True, "content": {
        "application/json": {"schema": RenameIn.model_json_schema()}}}})
    async def rename_class(request: Request) -> JSONResponse:
        """A class's new name, same label value and prototypes (a new version)."""
        return await edit(request, RenameIn, "rename", lambda b: [b.name, b.to])

    @app.post("/v1/classes/alias", responses=edit_errors, openapi_extra={"requestBody": {"required": True, "content": {
        "application/json": {"schema": AliasIn.model_json_schema()}}}})
    async def alias_class(request: Request) -> JSONResponse:
        """Another name for a class (a new version)."""
        return await edit(request, AliasIn, "alias", lambda b: [b.name, b.alias])

    @app.get("/v1/jobs/{job}", responses={200: {"model": JobBody}, **error_responses(401, 403, 404, 503)})
    async def get_job(job: str, request: Request) -> JSONResponse:
        cat = await backend.catalog()
        authorize(request, cat.admin)
        r = await backend.job(job) if JOB_ID.match(job) and hasattr(backend, "job") else None
        if r is None:
            raise RequestError(404, f"unknown job {job[:40]!r}", {"job": job[:40]}, "unknown_job")
        return JSONResponse(r)


_refreshed = {"at": 0.0}


async def segment_classes(backend, request: Request, cat, fields: dict) -> tuple[Any, list[str] | None, Any]:
    """`POST /v1/segment`'s bank and classes -> (entry, classes, None), or (entry, None, 202 response) when
    `missing=build` turned unknown classes into a job. Unknown names are checked again against a fresh catalog
    first (a replica may have switched to a version that has them since the ingress last asked)."""
    missing = (fields.get("missing") or "error").strip().lower()
    if missing not in MISSING:
        raise RequestError(400, f"field 'missing' must be one of {', '.join(MISSING)}, got {missing[:40]!r}",
                           {"field": "missing", "allowed": list(MISSING)}, "bad_field")
    names = split_classes(fields.get("classes"), cat.limits)

    def known(cat):  # (entry, checked classes or None when some are unknown, the unknown-classes error)
        entry = cat.resolve(fields.get("bank"))
        try:
            return entry, check_classes(names, entry.requestable, entry.key), None
        except RequestError as e:
            if e.code != "unknown_classes":
                raise
            return entry, None, e

    entry, classes, err = known(cat)
    if err is None:
        return entry, classes, None
    if hasattr(backend, "refresh") and time.monotonic() - _refreshed["at"] > 0.2:
        _refreshed["at"] = time.monotonic()
        cat = await backend.refresh()
        entry, classes, err = known(cat)
        if err is None:
            return entry, classes, None
    if missing != "build":
        raise err
    authorize(request, cat.admin)
    entry = live_entry(cat, fields.get("bank"))
    from ..vocab import fold

    have = {fold(n) for n in entry.requestable}
    unknown = [n for n in names if fold(n) not in have]
    classes = validate_classes([ClassIn(name=n) for n in unknown], int(cat.admin.get("max_classes_per_request", 16)))
    return entry, None, await submit(backend, cat, entry, classes)
