"""Parts: Parquet files of rows written as blocks arrive (`<out>/parts/`), read back as the latest row per image."""
from __future__ import annotations

import datetime as _dt
import io
import uuid

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from ..store.fs import Location
from .encode import PART_SCHEMA


def read_parts(out: Location, columns: list[str] | None = None) -> tuple[pa.Table, list[str]]:
    """All parts -> (the latest row per image path, the part keys read). Parts are named in time order."""
    keys = [k for k in out.list("parts") if k.endswith(".parquet")]
    schema = pa.schema([PART_SCHEMA.field(c) for c in columns]) if columns else PART_SCHEMA
    tables = [_conform(pq.read_table(out.path(k), filesystem=out.fs), schema) for k in keys]
    t = pa.concat_tables(tables) if tables else schema.empty_table()
    if t.num_rows == 0:
        return t, keys
    t = t.append_column("_i", pa.array(np.arange(t.num_rows)))
    last = t.group_by("path").aggregate([("_i", "max")]).column("_i_max").to_numpy()
    return t.take(np.sort(last)).drop_columns(["_i"]), keys


def _conform(t: pa.Table, schema: pa.Schema) -> pa.Table:
    """A part -> `schema`'s columns; columns a part written by an older version lacks (scores, image ids) are null,
    and the writers fall back for them (an image id is recomputed from the path, a score left out)."""
    cols = [t.column(f.name) if f.name in t.column_names else pa.nulls(t.num_rows, f.type) for f in schema]
    return pa.Table.from_arrays(cols, schema=schema)


def part_key(run: str, seq: int | str) -> str:
    return f"parts/{run}-{seq}.parquet"


def write_part(out: Location, key: str, table: pa.Table) -> None:
    buf = io.BytesIO()
    pq.write_table(table.select(PART_SCHEMA.names).cast(PART_SCHEMA), buf)
    out.write_bytes(key, buf.getvalue())


def compact(out: Location, run: str, table: pa.Table, keys: list[str]) -> None:
    """Replace the parts `keys` by one holding `table`, read from them (the latest row per path); it sorts last."""
    if len(keys) <= 1:
        return
    write_part(out, part_key(run, "z-compact"), table)
    for k in keys:
        try:
            out.fs.delete_file(out.path(k))
        except OSError:  # a leftover part only repeats rows the compacted one supersedes
            pass


def new_run_id() -> str:
    return _dt.datetime.now(_dt.timezone.utc).strftime("%Y%m%dT%H%M%S%f") + "-" + uuid.uuid4().hex[:6]

