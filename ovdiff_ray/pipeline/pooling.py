"""Features + fg/bg masks -> class / instance / part prototypes of one extractor, on the device.

The rules of `prototypes.protoset_from_pixels` (the host path): masks go onto the feature grid (`any` or the
authors' `centre`), non-finite pixels are dropped; per region (fg, bg) a class prototype (mean of all its pixels,
fp64 sums), one instance prototype per support image with pixels (its mean; `source` = its index among the kept
images), and `parts` k-means centroids over all its pixels (or a seeded sample of `max_pixels`). Rows are
L2-normalised; rows that are not finite or have no direction are dropped.

`RegionPool` accumulates batch by batch, so a class's full feature maps are never all in memory; only the
prototypes (a few hundred rows) cross to the host, in `to_protoset`.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch

from ..confidence import fit_calibration
from ..prototypes import ProtoSet, _objects, downsample_mask, l2n
from .kmeans import kmeans


@dataclass
class RegionPool:
    """Running sums of one region (fg or bg) of one extractor: `sums [N, D]` fp64 and `counts [N]` per image,
    and the region's pixels `[P, D]` for k-means (in image order, row-major, as the host path)."""

    sums: list[torch.Tensor] = field(default_factory=list)
    counts: list[torch.Tensor] = field(default_factory=list)
    pixels: list[torch.Tensor] = field(default_factory=list)
    images: list[torch.Tensor] = field(default_factory=list)  # [P] index of each pixel's image (among the kept)

    def add(self, feats: torch.Tensor, grid_mask: torch.Tensor, first: int = 0) -> None:
        """feats `[b, D, h, w]`, grid_mask `[b, h, w]` bool (already on the grid); `first`: the index of the batch's
        first image."""
        finite = torch.isfinite(feats).all(1)
        m = grid_mask & finite
        f = torch.where(finite[:, None], feats, torch.zeros_like(feats))
        self.sums.append(torch.einsum("bdhw,bhw->bd", f.double(), m.double()))
        self.counts.append(m.flatten(1).sum(1))
        self.pixels.append(f.permute(0, 2, 3, 1)[m])
        ids = torch.arange(first, first + len(m), device=m.device)[:, None, None].expand_as(m)
        self.images.append(ids[m])

    def rows(self, parts: int, iters: int, seed: int, max_pixels: int, tol: float, members: list | None = None
             ) -> tuple[list[torch.Tensor], list[str], list[int]]:
        """-> (rows `[D]` each, levels, sources) in the host path's order: class, instances, parts. When `members`
        is a list, one entry per row is appended: for a part row the images whose k-means pixels are nearest its
        centre, most pixels first (as `prototypes.region_prototypes`); None for the pooled rows."""
        if not self.sums:
            return [], [], []
        sums, counts = torch.cat(self.sums), torch.cat(self.counts)
        has = counts > 0
        total = counts.sum()
        if not bool(total > 0):
            return [], [], []
        rows = [(sums.sum(0) / total).float()]
        levels, sources = ["class"], [-1]
        idx = has.nonzero()[:, 0]
        inst = (sums[idx] / counts[idx, None]).float()
        rows += list(inst)
        levels += ["instance"] * len(idx)
        sources += idx.tolist()  # a few integers
        if members is not None:
            members += [None] * len(rows)
        if parts > 0:
            sel, img = torch.cat(self.pixels).float(), torch.cat(self.images)
            if 0 < max_pixels < sel.shape[0]:
                g = torch.Generator().manual_seed(seed + 1)
                pick = torch.randperm(sel.shape[0], generator=g)[:max_pixels].to(sel.device)
                sel, img = sel[pick], img[pick]
            cents = kmeans(sel, parts, iters, seed, tol)
            rows += list(cents)
            levels += ["part"] * len(cents)
            sources += [-1] * len(cents)
            if members is not None:
                near = torch.cdist(sel, cents).argmin(1)
                n_img = len(counts)
                per = torch.zeros(len(cents), n_img, dtype=torch.int64, device=sel.device)
                per.index_put_((near, img), torch.ones_like(near), accumulate=True)  # integer counts: exact
                order = torch.argsort(-per, dim=1, stable=True)
                per, order = per.cpu(), order.cpu()  # [parts, N] integers
                for k in range(len(cents)):
                    members.append(tuple(int(i) for i in order[k] if per[k, i] > 0))
        return rows, levels, sources


@dataclass
class ExtractorPool:
    """fg and bg `RegionPool`s of one extractor."""

    dim: int
    mask_grid: str = "any"
    fg: RegionPool = field(default_factory=RegionPool)
    bg: RegionPool = field(default_factory=RegionPool)

    def add(self, feats: torch.Tensor, fg: torch.Tensor, bg: torch.Tensor, first: int = 0) -> None:
        """feats `[b, D, h, w]`; fg, bg `[b, H, W]` bool at image size; `first`: the batch's first image index."""
        h, w = feats.shape[-2:]
        feats = feats.float()
        self.fg.add(feats, downsample_mask(fg.bool(), h, w, self.mask_grid), first)
        self.bg.add(feats, downsample_mask(bg.bool(), h, w, self.mask_grid), first)

    def to_protoset(self, parts: int, iters: int, seed: int, max_pixels: int, tol: float = 0.0) -> ProtoSet:
        """-> ProtoSet on the host (the only transfer: the prototypes)."""
        vecs, kinds, levels, sources, members = [], [], [], [], []
        for kind, pool in (("fg", self.fg), ("bg", self.bg)):
            r, lv, src = pool.rows(parts, iters, seed, max_pixels, tol, members)
            vecs += r
            levels += lv
            sources += src
            kinds += [kind] * len(r)
        if not vecs:
            v = torch.zeros(0, self.dim)
            keep_idx: list[int] = []
        else:
            v = l2n(torch.stack(vecs))
            keep = torch.isfinite(v).all(1) & (v.norm(dim=1) > 0.5)
            v = v[keep].cpu()
            keep_idx = keep.nonzero()[:, 0].cpu().tolist()
        kind = np.array([kinds[i] for i in keep_idx], dtype=object)
        return ProtoSet(
            vectors=v.numpy().astype(np.float32),
            kind=kind,
            level=np.array([levels[i] for i in keep_idx], dtype=object),
            source=np.array([sources[i] for i in keep_idx], dtype=np.int16),
            members=_objects([members[i] for i in keep_idx]),
            calibration=self.calibration(v, kind == "fg", seed),
        )

    def calibration(self, vectors: torch.Tensor, is_fg: np.ndarray, seed: int = 0) -> dict | None:
        """How this class's support pixels match its own prototype rows `vectors [R, D]` (confidence.py's record,
        computed on the pixels' device; None without fg or bg pixels)."""
        if not self.fg.pixels or not self.bg.pixels:
            return None
        return fit_calibration(torch.cat(self.fg.pixels).float(), torch.cat(self.fg.images),
                               torch.cat(self.bg.pixels).float(), torch.cat(self.bg.images), vectors,
                               torch.from_numpy(np.asarray(is_fg, bool)), seed)
