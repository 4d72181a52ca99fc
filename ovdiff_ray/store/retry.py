"""Retries with exponential backoff for storage calls, and what counts as a storage failure.

A storage failure is an I/O error of the bank's storage (S3 down, answering 5xx, a dropped connection), not a bad
bank or a lost commit race (`CommitConflict` is never retried here: the caller merges). After the last attempt the
error is a `StoreError` whose message names the location and says the storage is unavailable.

`OVDIFF_STORAGE_ATTEMPTS` (default 4) and `OVDIFF_STORAGE_BACKOFF_S` (first wait, default 0.5 s, doubling up to 8 s)
tune it.
"""
from __future__ import annotations

import logging
import os
import random
import time
from typing import Callable, TypeVar

from .fs import CommitConflict, StoreError

log = logging.getLogger("ovdiff.store")
T = TypeVar("T")


def is_storage_error(e: BaseException) -> bool:
    """An I/O failure of the storage (OSError, StoreError other than a conflict, botocore/pyarrow/urllib3 errors)."""
    if isinstance(e, CommitConflict):
        return False
    if getattr(e, "bad_data", False):
        return False  # a corrupt or mismatched shard (sha256, schema): bad data, not an outage
    if isinstance(e, StoreError):
        return "not found" not in str(e)
    return isinstance(e, OSError) or type(e).__module__.split(".")[0] in ("botocore", "boto3", "pyarrow", "urllib3")


def with_retries(fn: Callable[[], T], what: str, attempts: int | None = None, base_s: float | None = None,
                 max_s: float = 8.0, sleep: Callable[[float], None] = time.sleep) -> T:
    """`fn()`, retried on storage errors with exponential backoff (jittered); `what` names the object in errors."""
    attempts = attempts or int(os.environ.get("OVDIFF_STORAGE_ATTEMPTS", "4"))
    base_s = float(os.environ.get("OVDIFF_STORAGE_BACKOFF_S", "0.5")) if base_s is None else base_s
    for i in range(attempts):
        try:
            return fn()
        except Exception as e:  # noqa: BLE001 - classified just below
            if not is_storage_error(e):
                raise
            reason = f"{type(e).__name__}: {str(e).splitlines()[0][:300] if str(e) else ''}"
            if i == attempts - 1:
                raise StoreError(f"{what}: storage unavailable after {attempts} attempts ({reason})") from None
            wait = min(max_s, base_s * 2 ** i) * random.uniform(0.8, 1.2)
            log.warning("%s: storage error (%s); retry %d/%d in %.1fs", what, reason, i + 1, attempts - 1, wait)
            sleep(wait)
    raise AssertionError("unreachable")
