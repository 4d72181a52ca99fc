"""Support-set records (issue 26): one Parquet file per class beside its shard, content-addressed and sha256-checked
like shards, referenced from the class's manifest entry as `"support": {"key", "sha256", "bytes", "mode", "rows"}`.

`support/<class-slug>-<sha256[:16]>.parquet`, one row per support image, in image order:

    index int16, seed int64, kept bool, dropped string ("" | "empty foreground" | "low agreement"),
    image binary (JPEG thumbnail, or PNG at full size), image_format string (jpeg | png),
    masks binary (PNG uint8 at the image's size: 0 neither, 1 background, 2 foreground),
    instances binary (PNG, uint8 or uint16: bit i = instance mask i; null without a masker),
    name_agreement, prompt_agreement, fg_coverage, bg_coverage, n_instances float32,
    embedding binary (the classifier's image embedding, float16 little-endian)

The schema metadata holds `ovdiff.support` (JSON): schema, class, kind, prompt, mode, image_size (as generated),
stored_size, and the classifier's text embeddings of the name and the prompt (float16 LE, base64). Any Parquet reader
opens it; images and masks are plain JPEG/PNG bytes. No pickles.
"""
from __future__ import annotations

import base64
import hashlib
import io
import json
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from ..support import SupportData
from .fs import Location, StoreError
from .schema import slug

SUPPORT_SCHEMA_VERSION = "ovdiff-support/1"
MAX_RECORD_BYTES = 512 << 20
MAX_IMAGES = 4096
SIGNALS = ("name_agreement", "prompt_agreement", "fg_coverage", "bg_coverage", "n_instances")
RECORD_SCHEMA = pa.schema([
    ("index", pa.int16()), ("seed", pa.int64()), ("kept", pa.bool_()), ("dropped", pa.string()),
    ("image", pa.binary()), ("image_format", pa.string()), ("masks", pa.binary()), ("instances", pa.binary()),
    *[(s, pa.float32()) for s in SIGNALS],
    pa.field("embedding", pa.binary(), metadata={b"encoding": b"float16-le"}),
])


class RecordError(StoreError):
    """A support record that is missing, corrupt or does not match its manifest entry."""


def _png(a: np.ndarray) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(a).save(buf, format="PNG", optimize=False, compress_level=6)
    return buf.getvalue()


def _jpeg(a: np.ndarray, quality: int = 85) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(a).save(buf, format="JPEG", quality=quality)
    return buf.getvalue()


def _f16(v: np.ndarray | None) -> str:
    return "" if v is None else base64.b64encode(np.asarray(v, "<f2").tobytes()).decode()


def _unf16(s: str) -> np.ndarray | None:
    return np.frombuffer(base64.b64decode(s), "<f2").astype(np.float32) if s else None


def instance_bits(inst: np.ndarray) -> np.ndarray:
    """`[M, h, w]` bool (M <= 16) -> `[h, w]` uint8 (M <= 8) or uint16: bit i set where instance i is."""
    m = inst.shape[0]
    if m > 16:
        raise ValueError(f"{m} instance masks: at most 16 fit a PNG's bits")
    out = np.zeros(inst.shape[1:], np.uint16)
    for i in range(m):
        out |= inst[i].astype(np.uint16) << i
    return out.astype(np.uint8) if m <= 8 else out


def encode_record(name: str, kind: str, prompt: str, s: SupportData) -> bytes:
    """SupportData -> Parquet bytes (the format in the module docstring). Deterministic for the same content."""
    n = len(s)
    if n > MAX_IMAGES:
        raise ValueError(f"class {name!r}: {n} support images, more than a record holds ({MAX_IMAGES})")
    fmt = "png" if s.mode == "full" else "jpeg"
    enc = _png if fmt == "png" else _jpeg
    masks = []
    for fg, bg in zip(s.fg, s.bg):
        m = np.zeros(fg.shape, np.uint8)
        m[bg] = 1
        m[fg] = 2
        masks.append(_png(m))
    inst = [None] * n
    if s.instances is not None and s.instances.shape[1]:
        inst = [_png(instance_bits(x[:16])) for x in s.instances]
    emb = [None] * n if s.embeddings is None else [np.asarray(e, "<f2").tobytes() for e in s.embeddings]
    cols = {
        "index": pa.array(np.arange(n, dtype=np.int16)), "seed": pa.array(np.asarray(s.seeds, np.int64)),
        "kept": pa.array(np.asarray(s.kept, bool)), "dropped": pa.array(list(s.dropped), pa.string()),
        "image": pa.array([enc(im) for im in s.images], pa.binary()), "image_format": pa.array([fmt] * n, pa.string()),
        "masks": pa.array(masks, pa.binary()), "instances": pa.array(inst, pa.binary()),
        **{k: pa.array(np.asarray(s.signals.get(k, np.full(n, np.nan)), np.float32)) for k in SIGNALS},
        "embedding": pa.array(emb, pa.binary()),
    }
    meta = {"schema": SUPPORT_SCHEMA_VERSION, "class": name, "kind": kind, "prompt": prompt, "mode": s.mode,
            "image_size": list(s.image_size), "stored_size": list(s.images.shape[1:3]),
            "name_text": _f16(s.name_text), "prompt_text": _f16(s.prompt_text)}
    schema = RECORD_SCHEMA.with_metadata({b"ovdiff.support": json.dumps(meta).encode()})
    buf = io.BytesIO()
    pq.write_table(pa.table(cols, schema=schema), buf, compression="none", row_group_size=max(n, 1))
    return buf.getvalue()


@dataclass
class RecordInfo:
    """What the manifest entry keeps of a record: `{"key", "sha256", "bytes", "mode", "rows"}`."""

    key: str
    sha256: str
    bytes: int
    mode: str
    rows: int

    def to_entry(self) -> dict:
        return {"key": self.key, "sha256": self.sha256, "bytes": self.bytes, "mode": self.mode, "rows": self.rows}


def write_record(loc: Location, name: str, kind: str, prompt: str, s: SupportData) -> RecordInfo:
    """Write one class's record under a content-addressed key (a retry rewrites the same key)."""
    data = encode_record(name, kind, prompt, s)
    digest = hashlib.sha256(data).hexdigest()
    key = f"support/{slug(name)}-{digest[:16]}.parquet"
    if not loc.exists(key):
        loc.write_bytes(key, data)
    return RecordInfo(key, digest, len(data), s.mode, len(s))


def read_record_bytes(loc: Location, entry: dict) -> bytes:
    """A class's record bytes, checked against the sha256 in its manifest entry (RecordError when there is no
    record, it is unreadable, or it does not match)."""
    ref = entry.get("support")
    if not ref:
        raise RecordError(f"class {entry['name']!r} has no support record (built before issue 26 or with "
                          "bank.support_record: none)")
    try:
        data = loc.read_bytes(ref["key"], max_bytes=MAX_RECORD_BYTES)
    except StoreError as e:
        raise RecordError(f"support record of class {entry['name']!r} is missing or unreadable: {e}") from None
    digest = hashlib.sha256(data).hexdigest()
    if digest != ref["sha256"]:
        raise RecordError(f"{loc.display(ref['key'])}: sha256 mismatch for the support record of class "
                          f"{entry['name']!r} (manifest {ref['sha256'][:12]}..., file {digest[:12]}...): the record "
                          "is corrupt")
    return data


@dataclass
class SupportRecord:
    """A record read back: `meta` (the schema metadata) and `table` (one row per support image)."""

    meta: dict
    table: pa.Table

    @property
    def n(self) -> int:
        return self.table.num_rows

    def column(self, name: str) -> np.ndarray:
        return self.table.column(name).to_numpy(zero_copy_only=False)

    @property
    def kept(self) -> np.ndarray:
        return self.column("kept").astype(bool)

    @property
    def seeds(self) -> list[int]:
        return [int(x) for x in self.column("seed")]

    def signal(self, name: str) -> np.ndarray:
        return self.column(name).astype(np.float32)

    def embeddings(self) -> np.ndarray | None:
        col = self.table.column("embedding").to_pylist()
        if not col or col[0] is None:
            return None
        return np.stack([np.frombuffer(b, "<f2") for b in col]).astype(np.float32)

    def text(self, which: str) -> np.ndarray | None:
        """`name` or `prompt`: the classifier's text embedding `[E]` stored with the record."""
        return _unf16(self.meta.get(f"{which}_text", ""))

    def image_bytes(self, i: int) -> bytes:
        return self.table.column("image")[i].as_py()

    def image(self, i: int) -> np.ndarray:
        """Support image `i` as stored: `[h, w, 3]` uint8."""
        from PIL import Image

        return np.asarray(Image.open(io.BytesIO(self.image_bytes(i))).convert("RGB"))

    def masks(self, i: int) -> tuple[np.ndarray, np.ndarray]:
        """(fg, bg) `[h, w]` bool of image `i` at the stored size."""
        from PIL import Image

        m = np.asarray(Image.open(io.BytesIO(self.table.column("masks")[i].as_py())))
        return m == 2, m == 1

    def instances(self, i: int) -> np.ndarray | None:
        """Instance masks `[M, h, w]` bool of image `i` (M = highest set bit + 1), None without a masker."""
        from PIL import Image

        b = self.table.column("instances")[i].as_py()
        if b is None:
            return None
        bits = np.asarray(Image.open(io.BytesIO(b))).astype(np.uint32)
        m = int(bits.max()).bit_length()
        return np.stack([(bits >> k) & 1 for k in range(m)]).astype(bool) if m else np.zeros((0, *bits.shape), bool)


def decode_record(data: bytes, where: str) -> SupportRecord:
    try:
        t = pq.read_table(pa.BufferReader(data))
        meta = json.loads((t.schema.metadata or {})[b"ovdiff.support"])
    except Exception as e:  # noqa: BLE001 - any decode failure is a corrupt record
        raise RecordError(f"{where}: not a readable support record: {e}") from None
    if meta.get("schema") != SUPPORT_SCHEMA_VERSION:
        raise RecordError(f"{where}: unknown support record schema {meta.get('schema')!r}")
    return SupportRecord(meta, t)


def read_record(loc: Location, entry: dict) -> SupportRecord:
    """Read, verify (sha256) and decode a class's record."""
    return decode_record(read_record_bytes(loc, entry), loc.display(entry["support"]["key"]))


def verify_record(loc: Location, entry: dict) -> int:
    """sha256 check, then every image and mask decodes: the number of images. RecordError naming what is wrong."""
    rec = read_record(loc, entry)
    for i in range(rec.n):
        try:
            rec.image(i)
            rec.masks(i)
        except Exception as e:  # noqa: BLE001 - a PNG/JPEG that does not decode
            raise RecordError(f"{loc.display(entry['support']['key'])}: image {i} of class {entry['name']!r} does "
                              f"not decode: {e}") from None
    return rec.n
