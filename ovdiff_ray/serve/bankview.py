"""The bank view (issue 26): a served bank's classes with their support sets, audit scores and flags.

- `GET /bank`: the page (`static/bank.html`): searchable, paged class list; each class's thumbnail strip loads
  when its row scrolls into view.
- `GET /v1/bank/classes?bank=&q=&offset=&limit=&order=id|worst`: one page of classes `{total, offset, limit,
  audit: ready|running|failed|off, classes: [{id, name, kind, prompt, n_images, kept, record, score, suspect,
  reasons, nearest}]}`; `q` filters by substring of the name or prompt (case folded).
- `GET /v1/bank/classes/{id}/support?bank=`: a class's support images `{id, name, mode, images: [{index, seed (a string: 64 bits),
  kept, dropped, signals, url}]}` (404 when the class has no record).
- `GET /v1/bank/classes/{id}/support/{index}.png?bank=`: one tile: the stored image with its fg (green) and bg
  (red) outlines, dimmed when the prototypes were not made from it.

The ingress reads the bank's storage itself (records are sha256-checked on every read, a few kept in memory). The
audit (`ovdiff_ray/audit.py`) runs once per bank version in a thread; the list answers at once, with scores once it
is done (`audit: running` until then).
"""
from __future__ import annotations

import asyncio
import io
import logging
import threading
from collections import OrderedDict
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

from fastapi import APIRouter
from fastapi.responses import HTMLResponse, JSONResponse, Response

from .errors import error_responses

from .limits import RequestError

log = logging.getLogger("ovdiff.serve")
STATIC = Path(__file__).resolve().parent / "static"
MAX_LIMIT = 200
MAX_QUERY = 200
TILE_SIDE = 96
AUDIT_WAIT_S = 2.0  # the list waits this long for a first audit (a small bank's is done by then)


class _Records:
    """A few decoded support records in memory (LRU), and one audit per bank version."""

    def __init__(self, size: int = 16):
        self.size = size
        self.lock = threading.Lock()
        self.records: OrderedDict = OrderedDict()
        self.audits: dict[tuple[str, int], Future] = {}
        self.pool = ThreadPoolExecutor(1, thread_name_prefix="ovdiff-audit")

    def record(self, uri: str, entry: dict):
        from ..store.fs import Location
        from ..store.support import read_record

        key = (uri, entry["support"]["sha256"])
        with self.lock:
            if key in self.records:
                self.records.move_to_end(key)
                return self.records[key]
        rec = read_record(Location(uri), entry)
        with self.lock:
            self.records[key] = rec
            while len(self.records) > self.size:
                self.records.popitem(last=False)
        return rec

    def audit(self, uri: str, version: int) -> Future:
        from ..audit import audit_bank

        with self.lock:
            fut = self.audits.get((uri, version))
            if fut is None:
                fut = self.audits[(uri, version)] = self.pool.submit(audit_bank, uri, version)
            return fut


def _manifest(uri: str, version: int) -> dict:
    from ..store.fs import Location
    from ..store.shards import read_manifest

    return read_manifest(Location(uri), version)


def _int(name: str, value: str | None, default: int, low: int, high: int) -> int:
    if value is None or value == "":
        return default
    try:
        v = int(value)
    except ValueError:
        raise RequestError(400, f"query parameter {name!r}: expected an integer, got {value[:40]!r}",
                           {"field": name}, "bad_field") from None
    if not low <= v <= high:
        raise RequestError(400, f"query parameter {name!r}: {v} is not in {low}..{high}", {"field": name},
                           "bad_field")
    return v


def router(backend) -> APIRouter:
    from .routes import _catalog

    r = APIRouter()
    page = (STATIC / "bank.html").read_text()
    store = _Records()

    async def _entry(bank: str | None):
        e = (await _catalog(backend)).resolve(bank)
        m = await asyncio.to_thread(_manifest, e.uri, e.version)
        return e, m

    def _class(m: dict, class_id: int) -> dict:
        if not 1 <= class_id <= len(m["classes"]):
            raise RequestError(404, f"no class id {class_id} in bank {m['bank_id']} v{m['version']} (ids 1.."
                                    f"{len(m['classes'])})", None, "not_found")
        c = m["classes"][class_id - 1]
        if c.get("removed") is not None:
            raise RequestError(404, f"class id {class_id} ({c['name']!r}) was removed from bank {m['bank_id']} in "
                                    f"v{c['removed']}", None, "not_found")
        return c

    async def _record(uri: str, c: dict):
        from ..store.fs import StoreError

        try:
            return await asyncio.to_thread(store.record, uri, c)
        except StoreError as ex:  # corrupt or missing: say so, never a traceback
            raise RequestError(500, f"support record of class {c['name']!r} is unreadable: {ex}", None,
                               "bad_record") from None

    @r.get("/bank", response_class=HTMLResponse, include_in_schema=False)
    async def bank_page() -> HTMLResponse:
        return HTMLResponse(page)

    @r.get("/v1/bank/classes", responses=error_responses(400, 404, 503))
    async def classes(bank: str | None = None, q: str | None = None, offset: str | None = None,
                      limit: str | None = None, order: str | None = None) -> JSONResponse:
        """One page of the bank's classes with their support-record summary and audit score (worst first with
        `order=worst`)."""
        e, m = await _entry(bank)
        off = _int("offset", offset, 0, 0, 10**7)
        lim = _int("limit", limit, 50, 1, MAX_LIMIT)
        if order not in (None, "", "id", "worst"):
            raise RequestError(400, f"query parameter 'order': {order[:40]!r} is not one of id, worst",
                               {"field": "order"}, "bad_field")
        if q is not None and len(q) > MAX_QUERY:
            raise RequestError(400, f"query parameter 'q': longer than {MAX_QUERY} characters", {"field": "q"},
                               "bad_field")
        fut = store.audit(e.uri, e.version)
        try:
            await asyncio.wait_for(asyncio.shield(asyncio.wrap_future(fut)), AUDIT_WAIT_S)
        except asyncio.TimeoutError:
            pass
        except Exception:  # noqa: BLE001 - reported below as audit: failed
            pass
        audits, state = {}, "running"
        if fut.done():
            if fut.exception() is None:
                state = "ready"
                audits = {a.name: (rank, a) for rank, a in enumerate(fut.result()[1], 1)}
            else:
                state = "failed"
                log.warning("bank audit of %s v%s failed: %s", e.uri, e.version, fut.exception())
        rows = []
        for i, c in enumerate(m["classes"], 1):
            if c.get("removed") is not None:  # a tombstone keeps its position (label value), not its class
                continue
            sup = c.get("support") or {}
            row = {"id": i, "name": c["name"], "kind": c["kind"], "prompt": c.get("prompt", ""),
                   "n_images": sup.get("rows"), "kept": c.get("n_images"), "record": bool(sup)}
            if c["name"] in audits:
                rank, a = audits[c["name"]]
                row.update(rank=rank, score=round(a.score, 4), suspect=bool(a.reasons), reasons=a.reasons,
                           nearest=[{"name": n, "similarity": round(s, 3)} for n, s in a.nearest[:2]])
            rows.append(row)
        if q:
            from ..vocab import fold

            f = fold(q)
            rows = [x for x in rows if f in fold(x["name"]) or f in fold(x["prompt"] or "")]
        if order == "worst" and state == "ready":
            rows.sort(key=lambda x: x.get("rank", 10**9))
        return JSONResponse({"bank": {"id": m["bank_id"], "version": m["version"], "key": e.key},
                             "total": len(rows), "offset": off, "limit": lim, "audit": state,
                             "classes": rows[off:off + lim]})

    @r.get("/v1/bank/classes/{class_id}/support", responses=error_responses(400, 404, 503))
    async def support(class_id: int, bank: str | None = None) -> JSONResponse:
        """A class's support images: seed, kept, why dropped, per-image signals, the tile's URL."""
        e, m = await _entry(bank)
        c = _class(m, class_id)
        if not c.get("support"):
            raise RequestError(404, f"class {c['name']!r} has no support record (built before records were kept, "
                                    "or with bank.support_record: none)", None, "not_found")
        rec = await _record(e.uri, c)
        from ..store.support import SIGNALS

        sig = {s: rec.signal(s) for s in SIGNALS}
        dropped = rec.column("dropped")
        q = f"?bank={e.key}"
        images = [{"index": i, "seed": str(rec.seeds[i]), "kept": bool(rec.kept[i]), "dropped": str(dropped[i]),
                   "signals": {s: round(float(v[i]), 4) for s, v in sig.items()},
                   "url": f"v1/bank/classes/{class_id}/support/{i}.png{q}"} for i in range(rec.n)]
        return JSONResponse({"id": class_id, "name": c["name"], "prompt": c.get("prompt", ""),
                             "mode": rec.meta.get("mode"), "images": images})

    @r.get("/v1/bank/classes/{class_id}/support/{index}.png",
           responses={200: {"content": {"image/png": {}}}, **error_responses(400, 404, 503)})
    async def support_tile(class_id: int, index: int, bank: str | None = None) -> Response:
        """One support image as a tile with its fg/bg outlines (dimmed when dropped)."""
        e, m = await _entry(bank)
        c = _class(m, class_id)
        if not c.get("support"):
            raise RequestError(404, f"class {c['name']!r} has no support record", None, "not_found")
        rec = await _record(e.uri, c)
        if not 0 <= index < rec.n:
            raise RequestError(404, f"class {c['name']!r} has support images 0..{rec.n - 1}, not {index}", None,
                               "not_found")

        def draw() -> bytes:
            from PIL import Image

            from ..show import tile

            fg, bg = rec.masks(index)
            buf = io.BytesIO()
            Image.fromarray(tile(rec.image(index), fg, bg, bool(rec.kept[index]), TILE_SIDE)).save(buf, "PNG")
            return buf.getvalue()

        return Response(await asyncio.to_thread(draw), media_type="image/png",
                        headers={"Cache-Control": "max-age=3600"})

    return r
