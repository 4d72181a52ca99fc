"""Device time measured on the device, for the benches (`class_bench.py`, `segment_full.py`); not a bench itself.

One definition for every path a bench compares:

- **device busy** (CUDA only): the union of the intervals in which a kernel, memcpy or memset runs on the GPU, as
  the profiler (CUPTI) records them. Never inferred from host timers. On a CPU run there is no separate device:
  `busy_s` is None and the benches print `n/a`.
- **host time**: wall time in which the device does no tensor work: on CUDA `wall - busy` (the device idle, whatever
  the host is doing: Python, numpy, the CRF library, waiting on a pool, launch gaps); on a CPU run `wall - union of
  torch operator intervals` (the thread outside torch operators: numpy, scipy, the CRF library, Python, waits).

    with DeviceTime("cuda") as dt:
        work()
    dt.wall_s, dt.busy_s, dt.host_s, dt.busy_share
"""
from __future__ import annotations

import contextlib
import os
import time

import numpy as np
import torch


def union_s(starts_us: np.ndarray, ends_us: np.ndarray, lo_us: float | None = None,
            hi_us: float | None = None) -> float:
    """Total length in seconds of the union of intervals `[start, end)` (microseconds), clipped to `[lo, hi]`."""
    if len(starts_us) == 0:
        return 0.0
    order = np.argsort(starts_us, kind="stable")
    s, e = np.asarray(starts_us, np.float64)[order], np.asarray(ends_us, np.float64)[order]
    if lo_us is not None:
        s, e = np.maximum(s, lo_us), np.maximum(e, lo_us)
    if hi_us is not None:
        s, e = np.minimum(s, hi_us), np.minimum(e, hi_us)
    reach = np.maximum.accumulate(e)
    # an interval starts a new run when it begins after everything before it ended
    new = np.empty(len(s), bool)
    new[0] = True
    new[1:] = s[1:] > reach[:-1]
    run_id = np.cumsum(new) - 1
    run_start = s[new]
    run_end = np.zeros(run_id[-1] + 1)
    np.maximum.at(run_end, run_id, e)
    return float((run_end - run_start).clip(min=0).sum() / 1e6)


class DeviceTime:
    """Profiles a block: `wall_s`, `busy_s` (CUDA kernel/memcpy time, None on CPU), `host_s`, `busy_share`."""

    def __init__(self, device: str | torch.device, enabled: bool = True):
        self.cuda = str(device).startswith("cuda") and torch.cuda.is_available()
        self.enabled = enabled
        self.wall_s = 0.0
        self.busy_s: float | None = None
        self.torch_s: float | None = None  # CPU: union of torch operator intervals
        self.error: str | None = None
        self._prof = None

    def __enter__(self) -> "DeviceTime":
        from torch.profiler import ProfilerActivity, profile

        if self.cuda:
            torch.cuda.synchronize()
        if self.enabled:
            acts = [ProfilerActivity.CUDA] if self.cuda else [ProfilerActivity.CPU]
            try:
                with _quiet_stderr():
                    self._prof = profile(activities=acts, record_shapes=False, with_stack=False)
                    self._prof.__enter__()
            except Exception as e:  # noqa: BLE001 - no CUPTI: say so, never infer
                self._prof, self.error = None, f"{type(e).__name__}: {e}"
        self._t0 = time.perf_counter()
        return self

    def __exit__(self, *exc) -> None:
        if self.cuda:
            torch.cuda.synchronize()
        self.wall_s = time.perf_counter() - self._t0
        if self._prof is None:
            return
        with _quiet_stderr():
            self._prof.__exit__(None, None, None)
        try:
            a = self._intervals()
        except Exception as e:  # noqa: BLE001
            self.error = f"{type(e).__name__}: {e}"
            self._prof = None
            return
        if self.cuda:
            self.busy_s = min(self.wall_s, union_s(a[:, 0], a[:, 1]))
        else:
            self.torch_s = min(self.wall_s, union_s(a[:, 0], a[:, 1]))
        self._prof = None

    def _intervals(self) -> np.ndarray:
        """`[n, 2]` (start, end) in microseconds: GPU activity (kernels, memcpy, memset) on CUDA, torch operators on
        a CPU. Read from the profiler's raw events (building its FunctionEvents for the ~10^5-10^6 kernels of a
        class takes minutes)."""
        from torch.autograd import DeviceType

        want = DeviceType.CUDA if self.cuda else DeviceType.CPU
        try:
            raw = self._prof.profiler.kineto_results.events()
            iv = [(e.start_ns() / 1e3, e.end_ns() / 1e3) for e in raw if e.device_type() == want
                  and (self.cuda or e.name().startswith("aten::"))]
        except AttributeError:  # another torch: the slow, public way
            iv = [(e.time_range.start, e.time_range.end) for e in self._prof.events() if e.device_type == want
                  and (self.cuda or e.name.startswith("aten::"))]
        return np.array(iv, np.float64).reshape(-1, 2)

    @property
    def host_s(self) -> float | None:
        """Wall time in which the device does no tensor work (see the module docstring)."""
        inside = self.busy_s if self.cuda else self.torch_s
        return None if inside is None else max(0.0, self.wall_s - inside)

    @property
    def busy_share(self) -> float | None:
        return None if self.busy_s is None else self.busy_s / max(self.wall_s, 1e-9)


def fmt(x: float | None, spec: str = ".3f") -> str:
    """`x` formatted, or `n/a` (a CPU run has no device-side measurement)."""
    return "n/a" if x is None else format(x, spec)


@contextlib.contextmanager
def _quiet_stderr():
    """Kineto prints start/stop lines (and, without a GPU, a device-count error) on fd 2: hide them."""
    try:
        fd = os.dup(2)
    except OSError:
        yield
        return
    with open(os.devnull, "w") as null:
        os.dup2(null.fileno(), 2)
        try:
            yield
        finally:
            os.dup2(fd, 2)
            os.close(fd)
