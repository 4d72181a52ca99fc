"""Instance masks for a batch of support images, on the device, with MaskCut's dense CRF off the critical path.

`DeviceMaskCut` runs DINO and the batched cuts (`maskcut.maskcut_batch`) on the device. MaskCut's dense CRF is a
host library (pydensecrf2): its jobs (one per image: the image at MaskCut's size as uint8 and the grid masks, about
0.7 MB at 480 px) go to a `CrfPool` of worker processes and come back as futures, so the device goes on with the next
batch of images while the CRF runs; `InstanceBatch.result()` waits only when the masks are needed. With
`workers=0` the CRF runs inline (the same masks: a test checks shards byte for byte).

`HostMasker` wraps an instance masker that only exists on the host (the toy world's, CutLER through detectron2).
Every result is `[b, M, H, W]` bool on the device, padded with empty masks.
"""
from __future__ import annotations

import atexit
import queue
import struct
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F

from ..densecrf import crf_image, read_arrays, write_arrays  # noqa: F401 (crf_image re-exported)
from ..recipe import MasksConfig
from .maskcut import maskcut_batch


CHILD_ARGS = ("-P",)  # python flags of a CRF child: -P, no script folder on sys.path


class CrfChildDied(RuntimeError):
    """A CRF child died on the same job twice (each time replaced by a fresh one): transient for the class."""


class _Child:
    """One CRF child: `python -P densecrf.py` (a clean main module: numpy, scipy.ndimage and pydensecrf2 only, never
    torch or Ray), jobs over its stdin/stdout; it exits when its stdin closes."""

    def __init__(self):
        import ovdiff_ray.densecrf as crf

        self.proc = subprocess.Popen([sys.executable, *CHILD_ARGS, crf.__file__], stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, bufsize=0)

    @property
    def pid(self) -> int:
        return self.proc.pid

    def run(self, image: np.ndarray, grid_masks: np.ndarray) -> np.ndarray:
        """One job; EOFError / BrokenPipeError when the child is gone (killed, crashed)."""
        w = _Writer(self.proc.stdin)
        write_arrays(w, [image, grid_masks])
        r = _Reader(self.proc.stdout)
        status = r.read(1)
        if not status:
            raise EOFError("CRF child gone")
        if status == b"\x01":
            (n,) = struct.unpack("<I", r.read(4))
            raise RuntimeError(f"dense CRF failed: {r.read(n).decode(errors='replace')}")
        return read_arrays(r)[0]

    def close(self, timeout: float = 5.0) -> None:
        try:
            self.proc.stdin.close()  # end of input: the child returns
            self.proc.wait(timeout)
        except (OSError, subprocess.TimeoutExpired):
            self.proc.kill()
            self.proc.wait()
        finally:
            self.proc.stdout.close()


class _Writer:
    def __init__(self, f):
        self.f = f

    def write(self, b: bytes) -> None:
        view = memoryview(b)
        while view:
            n = self.f.write(view)
            view = view[n:]

    def flush(self) -> None:
        pass


class _Reader:
    def __init__(self, f):
        self.f = f

    def read(self, n: int) -> bytes:
        parts, got = [], 0
        while got < n:
            b = self.f.read(n - got)
            if not b:
                break
            parts.append(b)
            got += len(b)
        return b"".join(parts)


class _Done:
    """A finished future (inline CRF)."""

    def __init__(self, value):
        self.value = value

    def result(self):
        return self.value


class CrfPool:
    """`workers` CRF child processes (pipeline-fed, never forked from a process holding a CUDA context) running
    `crf_image`; `workers=0` runs each job inline when submitted. A child that dies (OOM killer, segfault) is
    replaced and its job run again once on the new child; a second death on the same job raises `CrfChildDied`
    (the class fails as transient and is retried, the pool stays usable). `waited` accumulates the seconds a caller
    blocked on results, `restarts` counts replaced children. `close()` (also at exit) ends the children."""

    def __init__(self, workers: int = 0):
        self.workers = max(0, int(workers))
        self.waited = 0.0
        self.restarts = 0
        self._threads: ThreadPoolExecutor | None = None
        self._idle: queue.SimpleQueue | None = None
        self._children: list[_Child] = []
        self._lock = threading.Lock()

    def submit(self, image: np.ndarray, grid_masks: np.ndarray):
        if self.workers == 0:
            t0 = time.perf_counter()
            out = _Done(crf_image(image, grid_masks))
            self.waited += time.perf_counter() - t0
            return out
        with self._lock:
            if self._threads is None:
                self._idle = queue.SimpleQueue()
                for _ in range(self.workers):
                    self._idle.put(self._spawn())
                self._threads = ThreadPoolExecutor(self.workers, thread_name_prefix="ovdiff-crf")
                atexit.register(self.close)
        return self._threads.submit(self._job, np.ascontiguousarray(image, np.uint8),
                                    np.ascontiguousarray(grid_masks, bool))

    def _spawn(self) -> _Child:
        c = _Child()
        self._children.append(c)
        return c

    def _job(self, image: np.ndarray, grid_masks: np.ndarray) -> np.ndarray:
        child = self._idle.get()
        try:
            for attempt in (1, 2):
                try:
                    return self._call(child, image, grid_masks)
                except (EOFError, BrokenPipeError, OSError, struct.error, ValueError) as e:
                    if child.proc.poll() is None and not isinstance(e, (EOFError, BrokenPipeError)):
                        raise
                    with self._lock:  # the child is gone: a fresh one takes its place (and this job, once)
                        self._children.remove(child)
                        child.close(0.1)
                        child = self._spawn()
                        self.restarts += 1
                    if attempt == 2:
                        raise CrfChildDied(f"a dense-CRF child died twice on one job ({e.__class__.__name__})") from None
        finally:
            self._idle.put(child)
        raise AssertionError("unreachable")

    def _call(self, child: _Child, image: np.ndarray, grid_masks: np.ndarray) -> np.ndarray:
        """One job on one child (a test hook: tests/test_crf_pool.py kills the child here)."""
        return child.run(image, grid_masks)

    def pids(self) -> list[int]:
        return [c.pid for c in self._children]

    def wait(self, futures: list) -> list[np.ndarray]:
        t0 = time.perf_counter()
        out = [f.result() for f in futures]
        self.waited += time.perf_counter() - t0
        return out

    def close(self) -> None:
        with self._lock:
            if self._threads is not None:
                self._threads.shutdown(wait=True, cancel_futures=True)
                self._threads = None
            for c in self._children:
                c.close()
            self._children = []

    def __del__(self):  # pragma: no cover - interpreter shutdown
        try:
            self.close()
        except Exception:  # noqa: BLE001
            pass


def pad_stack(masks: list[torch.Tensor], h: int, w: int, device) -> torch.Tensor:
    """Per image `[M_i, H, W]` -> `[b, max M_i, H, W]` bool, padded with empty masks."""
    m = max((len(x) for x in masks), default=0)
    out = torch.zeros(len(masks), m, h, w, dtype=torch.bool, device=device)
    for i, x in enumerate(masks):
        if len(x):
            out[i, :len(x)] = x.to(device)
    return out


@dataclass
class InstanceBatch:
    """Instance masks of a batch: ready (`masks`) or pending CRF jobs (`futures`) to upsample to `size`."""

    size: tuple[int, int]
    device: torch.device | str
    masks: torch.Tensor | None = None
    futures: list = field(default_factory=list)
    pool: CrfPool | None = None

    def result(self) -> torch.Tensor:
        """`[b, M, H, W]` bool on the device (waits for the CRF jobs)."""
        if self.masks is None:
            h, w = self.size
            refined = self.pool.wait(self.futures)
            ups = []
            for r in refined:
                t = torch.from_numpy(r).to(self.device)
                ups.append(F.interpolate(t.float()[None], size=(h, w), mode="nearest")[0] > 0.5 if len(t)
                           else torch.zeros(0, h, w, dtype=torch.bool, device=self.device))
            self.masks = pad_stack(ups, h, w, self.device)
        return self.masks


class DeviceMaskCut:
    """MaskCut on DINO keys at `maskcut_size`, cut on the device; CRF jobs to `pool` when `maskcut_crf`."""

    def __init__(self, extractor, cfg: MasksConfig, pool: CrfPool | None = None):
        self.extractor, self.cfg = extractor, cfg
        self.pool = pool or CrfPool(0)

    @torch.no_grad()
    def __call__(self, images: torch.Tensor) -> InstanceBatch:
        """images `[b, 3, H, W]` float in [0, 1] on the device -> InstanceBatch."""
        b, _, h, w = images.shape
        s = self.cfg.maskcut_size
        x = F.interpolate(images.float(), size=(s, s), mode="bilinear", align_corners=False, antialias=True)
        keys = self.extractor(x).float()  # [b, D, g, g]
        cut = maskcut_batch(keys, self.cfg.maskcut_n, self.cfg.maskcut_tau)
        if not self.cfg.maskcut_crf:
            if cut.masks.shape[1] == 0:
                up = torch.zeros(b, 0, h, w, dtype=torch.bool, device=images.device)
            else:  # nearest upsampling of the grid masks, as the host path
                up = F.interpolate(cut.masks.flatten(0, 1).float()[:, None], size=(h, w), mode="nearest")
                up = up[:, 0].reshape(b, -1, h, w) > 0.5
            return InstanceBatch((h, w), images.device, masks=up)
        small = (x * 255).round().clamp(0, 255).byte().permute(0, 2, 3, 1).cpu().numpy()  # [b, s, s, 3] uint8
        counts = cut.counts.cpu().tolist()
        grids = cut.masks.cpu().numpy()  # [b, n, g, g] bool: a few KB
        futures = [self.pool.submit(small[j], grids[j, :counts[j]]) for j in range(b)]
        return InstanceBatch((h, w), images.device, futures=futures, pool=self.pool)


class HostMasker:
    """An instance masker that runs on the host (`image [H, W, 3] uint8 -> [M, H, W] bool`), batched when it can."""

    def __init__(self, masker):
        self.masker = masker
        self.seconds = 0.0  # host seconds spent here

    def __call__(self, images: torch.Tensor, host_images: np.ndarray | None = None) -> InstanceBatch:
        b, _, h, w = images.shape
        t0 = time.perf_counter()
        if host_images is None:
            host_images = (images * 255).round().clamp(0, 255).byte().permute(0, 2, 3, 1).cpu().numpy()
        if hasattr(self.masker, "batch"):
            masks = list(self.masker.batch(host_images))
        else:
            masks = [self.masker(img) for img in host_images]
        out = pad_stack([torch.from_numpy(np.asarray(m, bool)) for m in masks], h, w, images.device)
        self.seconds += time.perf_counter() - t0
        return InstanceBatch((h, w), images.device, masks=out)
