"""Arrow schema of a class shard and the manifest format.

A shard holds one class: rows = prototypes of every extractor (sorted by extractor, kind, level; one row group per
extractor) plus one `kind = "text"` row with the class text embedding.

`vector` is the row's L2-normalised vector as little-endian IEEE float16 bytes (`2 * dim` bytes; `dim` has its own
column). Why not `fixed_size_list<float16>[D]`: one file mixes extractors of different D, and Parquet decodes a
float16 list element by element (~250 MB/s here, arrow#34510) where a binary value is one memcpy (~2.4 GB/s). Any
reader gets `[R, D]` with `np.frombuffer(b"".join(rows), "<f2").reshape(-1, D)`.
"""
from __future__ import annotations

import json
import re
from typing import Any

import pyarrow as pa

SCHEMA_VERSION = "ovdiff-bank/1"
SCHEMA_TOMBSTONES = "ovdiff-bank/2"  # a manifest with a removed class (store/edits.py): older readers refuse it
KNOWN_SCHEMAS = (SCHEMA_VERSION, SCHEMA_TOMBSTONES)
SHARD_SCHEMA = pa.schema([
    ("class_id", pa.int32()),
    ("class_name", pa.string()),
    ("extractor", pa.string()),  # extractor name, or "text"
    ("kind", pa.string()),  # fg | bg | text
    ("level", pa.string()),  # class | instance | part
    ("source", pa.int16()),  # support image index, -1 when pooled
    ("dim", pa.int32()),
    pa.field("vector", pa.binary(), metadata={b"encoding": b"float16-le", b"shape": b"[dim]"}),
    # a part row's support images (most pixels first); null for other rows and in shards from before issue 21
    ("members", pa.list_(pa.int16())),
], metadata={b"schema": SCHEMA_VERSION.encode()})
MAX_MANIFEST_BYTES = 64 << 20
MANIFEST_KEYS = ("schema", "bank_id", "version", "created", "recipe", "classes")


class ManifestError(ValueError):
    """A manifest that does not parse or validate; names the object."""


def slug(name: str) -> str:
    s = re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")
    return (s or "class")[:60]


def manifest_key(version: int) -> str:
    return f"manifests/v{version:06d}.json"


LATEST_KEY = "manifests/latest"


def parse_manifest(data: bytes, where: str) -> dict[str, Any]:
    try:
        m = json.loads(data.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ManifestError(f"{where}: manifest does not parse: {e}") from None
    if not isinstance(m, dict):
        raise ManifestError(f"{where}: manifest is not a JSON object")
    if m.get("schema") not in KNOWN_SCHEMAS:
        raise ManifestError(f"{where}: unknown manifest schema {m.get('schema')!r} (this reader knows "
                            f"{', '.join(KNOWN_SCHEMAS)})")
    missing = [k for k in MANIFEST_KEYS if k not in m]
    if missing:
        raise ManifestError(f"{where}: manifest lacks {', '.join(missing)}")
    for i, c in enumerate(m["classes"]):
        if not all(k in c for k in ("name", "kind", "shard", "sha256", "rows")):
            raise ManifestError(f"{where}: classes[{i}] lacks name/kind/shard/sha256/rows")
    return m


def dump_manifest(m: dict[str, Any]) -> bytes:
    return (json.dumps(m, indent=1, sort_keys=False) + "\n").encode()
