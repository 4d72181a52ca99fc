"""Hot reload on a segmenter replica: follow a bank's `latest` pointer, load the new version beside the served one,
switch in one step.

Every `reload_poll_s` seconds (and at once when a job of this service commits: the replica waits on the job
manager's `wait_commit`), each followed bank's `latest` is read; a newer version is loaded in a thread of its own
(the model thread keeps serving), then the bank's Segmenter reference is replaced: one assignment. A batch takes
the reference once when it starts, so requests in flight finish on the version they started with, and each result
names its version. A version that fails to load (a corrupt or missing shard) is logged, reported by `health()`,
and not tried again until `latest` moves on; the old version keeps serving.
"""
from __future__ import annotations

import asyncio
import logging
import time
from typing import Any, Awaitable, Callable

from .. import metrics

log = logging.getLogger("ovdiff.serve")


class LiveBanks:
    """The followed banks of one replica and the Segmenter serving each."""

    def __init__(self, engine, poll_s: float, wait_commit: Callable[[int, float], Awaitable[dict]] | None = None):
        self.engine, self.poll_s, self.wait_commit = engine, poll_s, wait_commit
        self.serving: dict[str, Any] = {}  # key -> Segmenter
        self.status: dict[str, dict] = {}
        self._task: asyncio.Task | None = None
        self._seen = 0

    @property
    def keys(self) -> list[str]:
        return [k for k, e in self.engine.catalog.banks.items() if e.live]

    def get(self, key: str):
        return self.serving.get(key)

    def start(self, initial: dict[str, Any]) -> None:
        for k, seg in initial.items():
            self.serving[k] = seg
            self.status[k] = {"version": seg.bank.version, "reloads": 0, "reload_error": None, "checked": None}
        if self.keys and self._task is None:
            self._task = asyncio.get_running_loop().create_task(self._loop())

    def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            self._task = None

    async def _loop(self) -> None:
        while True:
            try:
                if self.wait_commit is not None:
                    r = await asyncio.wait_for(self.wait_commit(self._seen, self.poll_s), self.poll_s + 10)
                    self._seen = int(r.get("seq", self._seen))
                else:
                    await asyncio.sleep(self.poll_s)
            except asyncio.CancelledError:
                raise
            except Exception as e:  # noqa: BLE001 - no job manager (or it restarts): plain polling
                log.debug("wait_commit unavailable (%s): polling every %ss", type(e).__name__, self.poll_s)
                await asyncio.sleep(self.poll_s)
            await self.check()

    async def check(self) -> list[str]:
        """One look at `latest` of every followed bank; returns the keys that switched."""
        switched = []
        for key in self.keys:
            try:
                if await self._check(key):
                    switched.append(key)
            except asyncio.CancelledError:
                raise
            except Exception as e:  # noqa: BLE001 - a storage hiccup: the next poll tries again
                log.warning("bank %s: could not read its latest pointer: %s", key, e)
        return switched

    async def _check(self, key: str) -> bool:
        from ..store.fs import Location
        from ..store.shards import latest_version

        e = self.engine.catalog.banks[key]
        st = self.status[key]
        v = await asyncio.to_thread(latest_version, Location(e.uri, self.engine.config.storage))
        st["checked"] = round(time.time(), 3)
        cur = self.serving[key].bank.version
        if v is None or v <= cur:
            return False
        failed = st.get("reload_error")
        if failed and failed["version"] == v:
            return False  # wait for a newer version before trying again
        t0 = time.perf_counter()
        try:
            seg = await asyncio.to_thread(self.engine.load, key, v)  # beside the served one
        except Exception as ex:  # noqa: BLE001 - keep serving the old version
            msg = f"{type(ex).__name__}: {ex}"[:500]
            st["reload_error"] = {"version": v, "error": msg, "at": round(time.time(), 3)}
            log.error("bank %s: reload to v%d failed, still serving v%d: %s", key, v, cur, msg)
            metrics.inc("ovdiff_bank_reload_failures", 1, {"bank": self.serving[key].bank.bank_id})
            return False
        self.serving[key] = seg  # the switch: batches that already hold the old Segmenter finish on it
        self.engine.switched(key, seg.bank)
        st.update(version=v, reloads=st["reloads"] + 1, reload_error=None, reload_s=round(time.perf_counter() - t0, 3))
        log.info("bank %s: now serving v%d (was v%d), loaded in %.2fs", key, v, cur, time.perf_counter() - t0)
        return True

    def health(self) -> dict:
        return {k: dict(v) for k, v in self.status.items()}
