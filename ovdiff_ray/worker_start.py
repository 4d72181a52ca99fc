"""Starting a class worker through transient faults: the models are loaded again, with backoff, while the failure
is a storage one (S3 answering 503 while weights are copied, a dropped connection); a failure no retry can fix (a
model that names nothing, weights failing their sha256, a recipe this code cannot read) is raised at once.

`OVDIFF_WORKER_START_ATTEMPTS` (default 5) and `OVDIFF_WORKER_START_BACKOFF_S` (first wait, default 2 s, doubling
up to 60 s, jittered) tune it: with the storage layer's own retries inside each attempt, a worker rides out about
two minutes of storage outage before its start fails.
"""
from __future__ import annotations

import logging
import os
import random
import time
from dataclasses import dataclass, field
from typing import Callable, Generic, TypeVar

from .store.retry import is_storage_error

log = logging.getLogger("ovdiff.build")
T = TypeVar("T")


@dataclass
class Started(Generic[T]):
    """What `start_with_retries` loaded, after how many attempts, and the errors of the failed ones."""

    value: T
    attempts: int
    errors: list[str] = field(default_factory=list)


def transient(e: BaseException) -> bool:
    """Worth another start: a storage or connection failure (never a permanent one, see `build_bank.permanent`)."""
    return is_storage_error(e) or isinstance(e, (ConnectionError, TimeoutError))


def start_with_retries(load: Callable[[], T], what: str, permanent: Callable[[BaseException], bool],
                       attempts: int | None = None, base_s: float | None = None, max_s: float = 60.0,
                       sleep: Callable[[float], None] = time.sleep) -> Started[T]:
    """`load()` until it succeeds: a transient error waits (exponential backoff) and tries again, up to `attempts`;
    a permanent error, any other error, or the last transient one is raised as it is."""
    attempts = attempts or int(os.environ.get("OVDIFF_WORKER_START_ATTEMPTS", "5"))
    base_s = float(os.environ.get("OVDIFF_WORKER_START_BACKOFF_S", "2.0")) if base_s is None else base_s
    errors: list[str] = []
    for i in range(attempts):
        try:
            return Started(load(), i + 1, errors)
        except Exception as e:  # noqa: BLE001 - classified just below
            if permanent(e) or not transient(e) or i == attempts - 1:
                raise
            errors.append(f"{type(e).__name__}: {' '.join(str(e).split())[:300]}")
            wait = min(max_s, base_s * 2 ** i) * random.uniform(0.8, 1.2)
            log.warning("%s: start failed (%s); starting again in %.1fs (%d/%d)", what, errors[-1], wait, i + 1,
                        attempts - 1)
            sleep(wait)
    raise AssertionError("unreachable")
