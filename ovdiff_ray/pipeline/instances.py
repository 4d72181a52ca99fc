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

import multiprocessing
import time
from concurrent.futures import Future, ProcessPoolExecutor
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F

from ..recipe import MasksConfig
from .maskcut import maskcut_batch


def crf_image(image: np.ndarray, grid_masks: np.ndarray) -> np.ndarray:
    """One image's CRF job (runs in a pool process): `image [s, s, 3]` uint8 and `grid_masks [M, g, g]` bool ->
    the refined masks `[M', s, s]` bool that overlap their input by IoU >= 0.5 (MaskCut's rule)."""
    from ..models.masks import crf_refine

    s = image.shape[0]
    if len(grid_masks) == 0:
        return np.zeros((0, s, s), bool)
    up = F.interpolate(torch.from_numpy(grid_masks).float()[None], size=(s, s), mode="nearest")[0].numpy() > 0.5
    kept = [r for r in (crf_refine(image, m) for m in up) if r is not None]
    return np.stack(kept) if kept else np.zeros((0, s, s), bool)


class _Done:
    """A finished future (inline CRF)."""

    def __init__(self, value):
        self.value = value

    def result(self):
        return self.value


class CrfPool:
    """`workers` processes (spawned: never forked from a process holding a CUDA context) running `crf_image`;
    `workers=0` runs each job inline when submitted. `waited` accumulates the seconds a caller blocked on results."""

    def __init__(self, workers: int = 0):
        self.workers = max(0, int(workers))
        self._pool: ProcessPoolExecutor | None = None
        self.waited = 0.0

    def submit(self, image: np.ndarray, grid_masks: np.ndarray):
        if self.workers == 0:
            t0 = time.perf_counter()
            out = _Done(crf_image(image, grid_masks))
            self.waited += time.perf_counter() - t0
            return out
        if self._pool is None:
            self._pool = ProcessPoolExecutor(self.workers, mp_context=multiprocessing.get_context("spawn"))
        return self._pool.submit(crf_image, image, grid_masks)

    def wait(self, futures: list) -> list[np.ndarray]:
        t0 = time.perf_counter()
        out = [f.result() for f in futures]
        self.waited += time.perf_counter() - t0
        return out

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(cancel_futures=True)
            self._pool = None

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
