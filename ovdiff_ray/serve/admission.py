"""Admission by cost: a budget of decoded pixels in flight per ingress replica (`limits.max_inflight_pixels`).

A request's cost is its width x height from the image header, known before any pixel is decoded. A request that
does not fit waits (at most `limits.admission_wait_s`) for earlier ones to finish, then is refused with 503 +
Retry-After; small images fit beside large ones, so a few 4096x4096 uploads cannot hold the service. One request
larger than the whole budget runs alone.
"""
from __future__ import annotations

import asyncio
from contextlib import asynccontextmanager

from .. import metrics
from .errors import Overloaded


class PixelBudget:
    """In-flight pixel accounting for one event loop (one ingress replica)."""

    def __init__(self):
        self.used = 0
        self.peak = 0
        self.refused = 0
        self._cond: asyncio.Condition | None = None

    @asynccontextmanager
    async def admit(self, cost: int, budget: int, wait_s: float, retry_after_s: float = 2.0):
        if self._cond is None:
            self._cond = asyncio.Condition()
        cost = max(1, min(int(cost), budget))
        async with self._cond:
            try:
                await asyncio.wait_for(self._cond.wait_for(lambda: self.used + cost <= budget), wait_s)
            except asyncio.TimeoutError:
                self.refused += 1
                metrics.inc("ovdiff_admission_refusals", 1, {"reason": "pixels"})
                raise Overloaded(f"busy: {self.used:,} pixels are being processed (budget {budget:,}); this "
                                 f"{cost:,}-pixel image did not fit within {wait_s:g}s, retry in "
                                 f"{retry_after_s:g}s", 503, retry_after_s) from None
            self.used += cost
            self.peak = max(self.peak, self.used)
        try:
            yield
        finally:
            async with self._cond:
                self.used -= cost
                self._cond.notify_all()
