"""Write, verify and read class shards; commit and read manifests; load a bank.

Commit protocol: shards first (content-addressed keys, so a retry rewrites the same key), then
`manifests/v<N>.json` created only if absent (S3 `If-None-Match: *`, local `link()`), then the `latest` pointer
moved with `If-Match`. Readers trust committed manifests only and check every shard's sha256.
"""
from __future__ import annotations

import datetime as _dt
import hashlib
import io
import json
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from ..confidence import CAL_KEY, calibration_array
from ..prototypes import ClassPrototypes
from .bank import KIND_CODES, LEVEL_CODES, Bank, BankArrays, Members
from .fs import Location, StorageConfig, StoreError
from .schema import (LATEST_KEY, MAX_MANIFEST_BYTES, SCHEMA_TOMBSTONES, SCHEMA_VERSION, SHARD_SCHEMA, ManifestError,
                     dump_manifest, manifest_key, parse_manifest, slug)

MAX_SHARD_BYTES = 2 << 30
ROW_GROUP_ROWS = 4096


class ShardError(StoreError):
    """A shard that is missing, corrupt or does not match its manifest entry.

    ``bad_data`` is true for a shard that was read but is wrong (sha256, schema, values): retrying or calling it a
    storage outage would not help. A shard that could not be read at all has ``bad_data = False``.
    """

    bad_data = True


@dataclass
class ShardInfo:
    """What a worker returns for one class: metadata only."""

    name: str
    kind: str
    shard: str  # key relative to the bank root
    rows: int
    sha256: str
    bytes: int
    prototypes: dict[str, int]  # extractor -> rows
    dims: dict[str, int]
    prompt: str = ""  # the words used for the class in prompts, when they differ from the name

    def to_entry(self) -> dict[str, Any]:
        e = dict(name=self.name, kind=self.kind, shard=self.shard, rows=self.rows, sha256=self.sha256,
                 bytes=self.bytes, prototypes=self.prototypes, dims=self.dims)
        if self.prompt and self.prompt != self.name:
            e["prompt"] = self.prompt
        return e


def _table(p: ClassPrototypes, class_id: int, extractor: str, vectors: np.ndarray, kind, level, source,
           members=None) -> pa.Table:
    n, d = vectors.shape
    data = pa.py_buffer(np.ascontiguousarray(vectors, "<f2").tobytes())
    offsets = pa.py_buffer(np.arange(0, (n + 1) * 2 * d, 2 * d, dtype=np.int32).tobytes())
    return pa.table({
        "class_id": pa.array(np.full(n, class_id, np.int32)),
        "class_name": pa.array([p.name] * n, pa.string()),
        "extractor": pa.array([extractor] * n, pa.string()),
        "kind": pa.array(list(kind), pa.string()),
        "level": pa.array(list(level), pa.string()),
        "source": pa.array(np.asarray(source, np.int16)),
        "dim": pa.array(np.full(n, d, np.int32)),
        "vector": pa.Array.from_buffers(pa.binary(), n, [None, offsets, data]),
        "members": pa.array([None if m is None else list(m) for m in (members if members is not None else [None] * n)],
                            pa.list_(pa.int16())),
    }, schema=SHARD_SCHEMA)


def encode_shard(p: ClassPrototypes, class_id: int) -> bytes:
    """ClassPrototypes -> Parquet bytes: rows sorted by extractor/kind/level, one row group per extractor."""
    buf = io.BytesIO()
    schema = SHARD_SCHEMA
    cal = {ex: s.calibration for ex, s in sorted(p.sets.items()) if s.calibration is not None}
    if cal:  # confidence.py's fit calibration, per extractor (shards from before issue 28 have none)
        schema = schema.with_metadata({**schema.metadata, CAL_KEY: json.dumps(cal, sort_keys=True).encode()})
    with pq.ParquetWriter(buf, schema, compression="none", write_statistics=True,
                          use_dictionary=["class_name", "extractor", "kind", "level"]) as w:
        for ex in sorted(p.sets):
            s = p.sets[ex]
            order = sorted(range(len(s)), key=lambda i: (KIND_CODES[s.kind[i]], LEVEL_CODES[s.level[i]], i))
            w.write_table(_table(p, class_id, ex, s.vectors[order], s.kind[order], s.level[order], s.source[order],
                                 None if s.members is None else s.members[order]), row_group_size=ROW_GROUP_ROWS)
        t = np.asarray(p.text, np.float32)[None]
        w.write_table(_table(p, class_id, "text", t, ["text"], ["class"], [-1]))
    return buf.getvalue()


def write_shard(loc: Location, p: ClassPrototypes, class_id: int) -> ShardInfo:
    """Write one class shard under a content-addressed key; a retry of the same content rewrites the same key."""
    data = encode_shard(p, class_id)
    digest = hashlib.sha256(data).hexdigest()
    key = f"shards/{slug(p.name)}-{digest[:16]}.parquet"
    if not loc.exists(key):
        loc.write_bytes(key, data)
    return ShardInfo(p.name, p.kind, key, p.rows, digest, len(data), {e: len(s) for e, s in p.sets.items()},
                     {e: s.dim for e, s in p.sets.items()}, p.prompt)


def read_shard_bytes(loc: Location, entry: dict) -> bytes:
    """Read a shard and check its sha256 against the manifest entry."""
    key = entry["shard"]
    try:
        data = loc.read_bytes(key, max_bytes=MAX_SHARD_BYTES)
    except StoreError as e:
        err = ShardError(f"shard of class {entry['name']!r} is missing or unreadable: {e}")
        err.bad_data = False
        raise err from None
    digest = hashlib.sha256(data).hexdigest()
    if digest != entry["sha256"]:
        raise ShardError(f"{loc.display(key)}: sha256 mismatch for class {entry['name']!r} "
                         f"(manifest {entry['sha256'][:12]}..., file {digest[:12]}...): the shard is corrupt")
    return data


# -- manifests --------------------------------------------------------------------------------------------------
def read_pointer(loc: Location) -> dict[str, Any]:
    """The `latest` pointer: `{"version": N, "manifest": "manifests/v<N>.json"}`. Pointers written before the
    `manifest` key existed (`{"version": N}`) are read too; the key is then derived from the number."""
    try:
        d = json.loads(loc.read_bytes(LATEST_KEY, 4096))
        v = int(d["version"])
    except (ValueError, KeyError, TypeError, json.JSONDecodeError):
        raise ManifestError(f"{loc.display(LATEST_KEY)}: pointer does not parse") from None
    key = d.get("manifest") or manifest_key(v)
    if key != manifest_key(v):
        raise ManifestError(f"{loc.display(LATEST_KEY)}: names {key!r} for version {v} (expected {manifest_key(v)!r})")
    return {"version": v, "manifest": key}


def pointer_bytes(version: int) -> bytes:
    """What `latest` holds: the version and the manifest's key, so readers need not know the file naming."""
    return json.dumps({"version": int(version), "manifest": manifest_key(version)}).encode()


def latest_version(loc: Location) -> int | None:
    """Newest committed version: the `latest` pointer, then any newer manifests a crashed writer left unpointed."""
    v = None
    if loc.exists(LATEST_KEY):
        v = read_pointer(loc)["version"]
    else:
        found = [int(k.split("/v")[1].split(".")[0]) for k in loc.list("manifests")
                 if k.startswith("manifests/v") and k.endswith(".json")]
        v = max(found) if found else None
    while v is not None and loc.exists(manifest_key(v + 1)):
        v += 1
    return v


def read_manifest(loc: Location, version: int | None = None) -> dict[str, Any] | None:
    """The committed manifest (latest when `version` is None); None when the bank has no version yet."""
    if version is None:
        version = latest_version(loc)
        if version is None:
            return None
    key = manifest_key(version)
    if not loc.exists(key):
        raise ManifestError(f"{loc.display(key)}: bank version {version} does not exist")
    m = parse_manifest(loc.read_bytes(key, MAX_MANIFEST_BYTES), loc.display(key))
    if m["version"] != version:
        raise ManifestError(f"{loc.display(key)}: says version {m['version']}, expected {version}")
    return m


def new_manifest(bank_id: str, version: int, recipe: dict, classes: list[dict], **extra) -> dict[str, Any]:
    from .. import __version__

    removed = any(c.get("removed") is not None for c in classes)
    return {"schema": SCHEMA_TOMBSTONES if removed else SCHEMA_VERSION, "bank_id": bank_id, "version": version,
            "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
            "package_version": __version__, "recipe": recipe, **extra, "classes": classes}


def commit_manifest(loc: Location, manifest: dict[str, Any]) -> int:
    """Create manifests/v<N>.json if absent (CommitConflict otherwise), then move `latest` forward."""
    from .edits import check_classes

    check_classes(manifest["classes"])
    v = int(manifest["version"])
    loc.put_if_absent(manifest_key(v), dump_manifest(manifest))
    for _ in range(20):  # move the pointer forward unless a newer version already did
        cur = loc.read_bytes(LATEST_KEY, 4096) if loc.exists(LATEST_KEY) else None
        if cur is not None and int(json.loads(cur)["version"]) >= v:
            break
        if loc.swap_pointer(LATEST_KEY, pointer_bytes(v), cur):
            break
    return v


# -- loading ----------------------------------------------------------------------------------------------------
def _decode(data: bytes, where: str) -> pa.Table:
    try:
        return pq.read_table(pa.BufferReader(data))
    except Exception as e:  # noqa: BLE001 - any decode failure is a corrupt shard
        raise ShardError(f"{where}: not a readable Parquet shard: {e}") from None


def load_bank(uri: str, version: int | None = None, classes: list[str] | None = None,
              storage_options: StorageConfig | dict | None = None, threads: int = 8) -> Bank:
    """Read a committed bank: all classes or a subset, every shard sha256-verified, into class-sorted arrays."""
    loc = Location(uri, storage_options)
    m = read_manifest(loc, version)
    if m is None:
        raise ManifestError(f"{uri}: no committed bank here (no manifests/)")
    entries = m["classes"]
    if classes is not None:
        from ..vocab import fold

        by = {fold(n): i for i, c in enumerate(entries) if c.get("removed") is None
              for n in [c["name"], *c.get("aliases", [])]}
        unknown = [c for c in classes if fold(c) not in by]
        if unknown:
            raise KeyError(f"unknown classes (not in bank {m['bank_id']} v{m['version']}): {', '.join(unknown)}")
        wanted = {by[fold(c)] for c in classes}
        entries = [c for i, c in enumerate(entries) if i in wanted]

    def read(e: dict) -> pa.Table | None:  # a removed class (tombstone) has no shard
        return None if e.get("removed") is not None else _decode(read_shard_bytes(loc, e), loc.display(e["shard"]))

    with ThreadPoolExecutor(max(1, min(threads, len(entries)))) as ex:  # pyarrow decodes without the GIL
        tables = list(ex.map(read, entries))
    return assemble(m, entries, tables, uri)


def _vectors(col: pa.ChunkedArray, n: int, d: int) -> np.ndarray:
    """`vector` column (one extractor, all rows of dim d) -> [n, d] float16, zero-copy per chunk."""
    parts = []
    for c in col.chunks:
        if len(c) == 0:
            continue
        off = np.frombuffer(c.buffers()[1], np.int32)[c.offset: c.offset + len(c) + 1]
        if not (np.diff(off) == 2 * d).all():
            raise ShardError(f"vector bytes do not match dim {d}")
        parts.append(np.frombuffer(c.buffers()[2], "<f2", count=len(c) * d, offset=int(off[0])).reshape(len(c), d))
    return parts[0] if len(parts) == 1 else np.concatenate(parts)


def _codes(values: np.ndarray, table: dict[str, int]) -> np.ndarray:
    out = np.full(len(values), 255, np.uint8)
    for name, code in table.items():
        out[values == name] = code
    if (out == 255).any():
        raise ShardError(f"unknown value {values[out == 255][0]!r} in a shard (expected one of {sorted(table)})")
    return out


def _members(sub: pa.Table, n: int) -> Members:
    """The `members` column of one extractor's rows of a shard (all unknown when the shard predates it)."""
    if "members" not in sub.column_names:
        return Members.of([None] * n, unknown=True)
    col = sub.column("members").combine_chunks() if n else pa.array([], pa.list_(pa.int16()))
    valid = ~np.asarray(col.is_null().to_numpy(zero_copy_only=False), bool) if n else np.zeros(0, bool)
    sizes = np.where(valid, np.diff(col.offsets.to_numpy()), 0) if n else np.zeros(0, np.int64)
    flat = col.flatten().to_numpy(zero_copy_only=False).astype(np.int16) if n else np.zeros(0, np.int16)
    return Members(flat, np.concatenate([[0], np.cumsum(sizes)]).astype(np.int64), valid.astype(np.int8))


def _calibration_of(t: pa.Table, entry: dict) -> dict:
    """A shard's fit calibration record (`confidence.CAL_KEY` metadata): {extractor: record}; {} when absent."""
    raw = (t.schema.metadata or {}).get(CAL_KEY)
    if raw is None:
        return {}
    try:
        rec = json.loads(raw)
        for r in rec.values():
            calibration_array(r)
    except (ValueError, TypeError, AttributeError) as e:
        raise ShardError(f"{entry['shard']}: fit calibration of class {entry['name']!r} does not parse: {e}") from None
    return rec


def assemble(m: dict, entries: list[dict], tables: list[pa.Table | None], uri: str) -> Bank:
    """Shards (None for a removed class: no rows, a zero text row) -> a Bank whose class c is `entries[c]`."""
    recipe = Bank.recipe_of(m)
    ex_names = [e.name for e in recipe.extractors]
    per_ex: dict[str, list] = {e: [] for e in ex_names}
    texts: list[np.ndarray | None] = []
    cals = {e: [] for e in ex_names}  # per extractor, per class: [6, Q] fit calibration (nan: none recorded)
    for c, t in enumerate(tables):
        rec = _calibration_of(t, entries[c]) if t is not None else {}
        for ex in ex_names:
            cals[ex].append(calibration_array(rec.get(ex)))
        if t is None:
            texts.append(None)
            continue
        exs = t.column("extractor").to_numpy(zero_copy_only=False)
        for ex in ex_names + ["text"]:
            idx = np.nonzero(exs == ex)[0]
            n = len(idx)
            if n and idx[-1] - idx[0] + 1 != n:
                raise ShardError(f"{entries[c]['shard']}: rows of extractor {ex!r} are not contiguous")
            sub = t.slice(int(idx[0]), n) if n else t.slice(0, 0)  # rows are sorted by extractor: zero-copy
            d = int(sub.column("dim")[0].as_py()) if n else 0
            vec = _vectors(sub.column("vector"), n, d) if n else None
            if ex == "text":
                if n != 1:
                    raise ShardError(f"{entries[c]['shard']}: expected one text row, found {n}")
                texts.append(vec[0].astype(np.float32))
                continue
            kinds = sub.column("kind").to_numpy(zero_copy_only=False)
            levels = sub.column("level").to_numpy(zero_copy_only=False)
            source = sub.column("source").to_numpy(zero_copy_only=False).astype(np.int16)
            per_ex[ex].append((c, vec, kinds, levels, d, source, _members(sub, n)))
    arrays = {}
    for ex, parts in per_ex.items():
        dim = next((p[4] for p in parts if p[4]), int(m.get("extractors", {}).get(ex, {}).get("dim", 0)))
        counts = np.zeros(len(tables), np.int64)
        for c, vec, *_ in parts:
            counts[c] = len(vec)
        arrays[ex] = BankArrays(
            vectors=np.concatenate([p[1] for p in parts]).astype(np.float16, copy=False) if parts else np.zeros((0, dim), np.float16),
            class_idx=np.concatenate([np.full(len(p[1]), p[0], np.int32) for p in parts]) if parts else np.zeros(0, np.int32),
            kind=np.concatenate([_codes(p[2], KIND_CODES) for p in parts]) if parts else np.zeros(0, np.uint8),
            level=np.concatenate([_codes(p[3], LEVEL_CODES) for p in parts]) if parts else np.zeros(0, np.uint8),
            offsets=np.concatenate([[0], np.cumsum(counts)]).astype(np.int64),
            source=np.concatenate([p[5] for p in parts]) if parts else np.zeros(0, np.int16),
            members=Members.concat([p[6] for p in parts]),  # loaded once with the bank (explain.py)
            calibration=np.stack(cals[ex]) if cals[ex] else None,
        )
    e_dim = next((len(t) for t in texts if t is not None), 0)
    text = np.stack([np.zeros(e_dim, np.float32) if t is None else t for t in texts]) if texts else \
        np.zeros((0, 0), np.float32)
    return Bank(m["bank_id"], int(m["version"]), recipe, [e["name"] for e in entries], [e["kind"] for e in entries],
                text, arrays, manifest=m, uri=uri, prompts=[e.get("prompt", "") for e in entries])
