"""Features + masks -> prototypes of one class (OVDIFF.md section 5).

Per extractor, for foreground and background: a class prototype (mean of all pixels), instance prototypes (mean
per support image) and part prototypes (k-means, K from the recipe, seeded). Non-finite rows are dropped, rows are
L2-normalised. `ClassPrototypes` is what the store writes as one shard.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F

KINDS = ("fg", "bg")
LEVELS = ("class", "instance", "part")


@dataclass
class ProtoSet:
    """Prototypes of one class for one extractor. Rows sorted by (kind, level)."""

    vectors: np.ndarray  # [n, D] float32, unit norm
    kind: np.ndarray  # [n] str: fg | bg
    level: np.ndarray  # [n] str: class | instance | part
    source: np.ndarray  # [n] int16: support image index, -1 when pooled
    members: np.ndarray | None = None  # [n] object: a part row's support images (tuple, most pixels first), else None
    calibration: dict | None = None  # how the class's own support images match these rows (confidence.fit_calibration)

    @property
    def dim(self) -> int:
        return int(self.vectors.shape[1])

    def __len__(self) -> int:
        return int(self.vectors.shape[0])

    def select(self, kind: str, level: str | None = None) -> np.ndarray:
        m = self.kind == kind
        if level is not None:
            m &= self.level == level
        return self.vectors[m]


@dataclass
class ClassPrototypes:
    """Everything the bank holds for one class."""

    name: str
    kind: str  # thing | stuff
    sets: dict[str, ProtoSet]  # extractor name -> prototypes
    text: np.ndarray  # [E] float32 unit-norm class text embedding (pre-filter)
    info: dict = field(default_factory=dict)  # n_images, skipped, seconds per stage, ...
    prompt: str = ""  # the words used for the class in prompts ("" = the name)
    support: object | None = None  # support.SupportData: the support set's record (issue 26), None when not kept

    @property
    def rows(self) -> int:
        return sum(len(s) for s in self.sets.values()) + 1


def l2n(x: torch.Tensor) -> torch.Tensor:
    return x / x.norm(dim=-1, keepdim=True).clamp_min(1e-12)


def kmeans(x: torch.Tensor, k: int, iters: int = 50, seed: int = 0) -> torch.Tensor:
    """Greedy k-means++ init + Lloyd iterations on `x [n, D]` -> centroids `[min(k, n), D]`, as scikit-learn's
    `KMeans(init="k-means++", n_init=1)` (the authors' k-means). Deterministic for a seed; runs on `x`'s device.

    Each new centre is the best of `2 + log(k)` candidates drawn with probability proportional to the squared
    distance to the nearest chosen centre (the one that lowers the total most). Lloyd stops at a fixed point (no
    assignment changes: converged exactly) or after `iters` iterations.
    """
    n = x.shape[0]
    k = min(k, n)
    if k == 0:
        return x[:0]
    g = torch.Generator().manual_seed(seed)  # CPU generator: the same picks on every device
    x = x.float()
    xx = (x * x).sum(1)
    trials = 2 + int(math.log(k))

    def dist2(c: torch.Tensor) -> torch.Tensor:  # [m, D] -> [m, n] squared distances
        return (xx[None] - 2 * c @ x.T + (c * c).sum(1)[:, None]).clamp_min(0)

    centers = [x[torch.randint(n, (1,), generator=g).item()]]
    d2 = dist2(centers[0][None])[0]
    for _ in range(1, k):
        total = d2.sum()
        if total <= 0:
            idx = torch.randint(n, (trials,), generator=g)
        else:
            cum = torch.cumsum(d2.double(), 0).cpu()
            r = torch.rand(trials, generator=g, dtype=torch.float64) * cum[-1]
            idx = torch.searchsorted(cum, r).clamp_max(n - 1)
        cand = torch.minimum(d2[None], dist2(x[idx.to(x.device)]))  # [trials, n]
        best = int(cand.sum(1).argmin())
        centers.append(x[int(idx[best])])
        d2 = cand[best]
    c = torch.stack(centers)
    assign = None
    for _ in range(iters):
        new_assign = (x @ c.T * -2 + (c * c).sum(1)[None]).argmin(1)  # [n]; |x|^2 is constant per row
        if assign is not None and torch.equal(new_assign, assign):
            break  # a fixed point: centroids are already the means of their points
        assign = new_assign
        sums = torch.zeros_like(c).index_add_(0, assign, x)
        counts = torch.bincount(assign, minlength=k).to(x.dtype)
        c = torch.where((counts == 0)[:, None], c, sums / counts.clamp_min(1)[:, None])
    return c


MASK_GRID_RULES = ("any", "centre")


def downsample_mask(mask: torch.Tensor, h: int, w: int, rule: str = "any") -> torch.Tensor:
    """`mask [N, H, W] bool` -> `[N, h, w] bool` on a feature grid.

    `any`: a cell is inside when any of its pixels is (max pooling; borders grow by up to a cell). `centre`: the
    authors' rule, a bilinear resize to the grid kept where > 0, i.e. the pixels around each cell centre decide.
    """
    m = mask[:, None].float()
    if rule == "any":
        return F.adaptive_max_pool2d(m, (h, w))[:, 0] > 0
    if rule == "centre":
        return F.interpolate(m, size=(h, w), mode="bilinear", align_corners=False)[:, 0] > 0
    raise ValueError(f"prototypes.mask_grid: unknown rule {rule!r} (one of {', '.join(MASK_GRID_RULES)})")


def masked_pixels(feats: torch.Tensor, mask: torch.Tensor, rule: str = "any") -> list[torch.Tensor]:
    """feats: [N, D, h, w]; mask: [N, H, W] bool at image size -> per image `[P_i, D]` finite pixel features."""
    m = downsample_mask(mask.bool(), *feats.shape[-2:], rule=rule)
    out = []
    for f, mi in zip(feats, m):
        p = f.permute(1, 2, 0)[mi]
        out.append(p[torch.isfinite(p).all(1)])
    return out


def region_prototypes(pixels: list[torch.Tensor], parts: int, iters: int, seed: int, max_pixels: int,
                      device: str = "cpu", members: list | None = None) -> tuple[list[torch.Tensor], list[str], list[int]]:
    """One region (fg or bg) of one extractor: per-image pixels `[P_i, D]` -> rows, levels, sources.

    k-means runs on `device` over all the region's pixels, or a seeded sample of `max_pixels` (0 = all). When
    `members` is a list, one entry per row is appended to it: for a part row the support images whose pixels (of
    those k-means saw) are nearest its centre, most pixels first; None for the other rows."""
    rows, levels, sources = [], [], []
    nonempty = [(i, p.float()) for i, p in enumerate(pixels) if p.shape[0]]
    if not nonempty:
        return rows, levels, sources
    n_pooled = 1 + len(nonempty)
    total = sum(p.shape[0] for _, p in nonempty)
    rows.append(sum(p.double().sum(0) for _, p in nonempty).div(total).float())
    levels.append("class")
    sources.append(-1)
    for i, p in nonempty:
        rows.append(p.double().mean(0).float())
        levels.append("instance")
        sources.append(i)
    if members is not None:
        members += [None] * n_pooled
    if parts > 0:
        sel = torch.cat([p for _, p in nonempty])
        img = torch.cat([torch.full((p.shape[0],), i) for i, p in nonempty])  # support image of each pixel
        if 0 < max_pixels < sel.shape[0]:
            g = torch.Generator().manual_seed(seed + 1)
            pick = torch.randperm(sel.shape[0], generator=g)[:max_pixels]
            sel, img = sel[pick], img[pick]
        centres = kmeans(sel.to(device), parts, iters, seed).cpu()
        for c in centres:
            rows.append(c)
            levels.append("part")
            sources.append(-1)
        if members is not None:
            near = torch.cdist(sel, centres).argmin(1)
            for k in range(len(centres)):
                counts = torch.bincount(img[near == k], minlength=len(pixels))
                order = torch.argsort(-counts, stable=True)
                members.append(tuple(int(i) for i in order if counts[i] > 0))
    return rows, levels, sources


def protoset_from_pixels(fg: list[torch.Tensor], bg: list[torch.Tensor], dim: int, parts: int, iters: int = 50,
                         seed: int = 0, max_pixels: int = 200_000, device: str = "cpu") -> ProtoSet:
    """Per-image fg and bg pixel features (`[P_i, D]` each) -> ProtoSet with unit-norm rows."""
    vecs, kinds, levels, sources, members = [], [], [], [], []
    for kind, pixels in (("fg", fg), ("bg", bg)):
        r, lv, src = region_prototypes(pixels, parts, iters, seed, max_pixels, device, members)
        vecs += r
        levels += lv
        sources += src
        kinds += [kind] * len(r)
    v = l2n(torch.stack(vecs)) if vecs else torch.zeros(0, dim)
    keep = torch.isfinite(v).all(1) & (v.norm(dim=1) > 0.5)
    idx = keep.nonzero()[:, 0].tolist()
    kind = np.array([kinds[i] for i in idx], dtype=object)
    return ProtoSet(
        vectors=v[keep].numpy().astype(np.float32),
        kind=kind,
        level=np.array([levels[i] for i in idx], dtype=object),
        source=np.array([sources[i] for i in idx], dtype=np.int16),
        members=_objects([members[i] for i in idx]),
        calibration=_calibration(fg, bg, v[keep], kind == "fg", seed),
    )


def _calibration(fg: list[torch.Tensor], bg: list[torch.Tensor], vectors: torch.Tensor, is_fg: np.ndarray,
                 seed: int) -> dict | None:
    """confidence.fit_calibration over per-image pixel lists (the host path's record)."""
    from .confidence import fit_calibration

    if not any(len(p) for p in fg) or not any(len(p) for p in bg):
        return None
    ids = lambda px: torch.cat([torch.full((len(p),), i) for i, p in enumerate(px)])  # noqa: E731
    return fit_calibration(torch.cat(fg).float(), ids(fg), torch.cat(bg).float(), ids(bg), vectors,
                           torch.from_numpy(np.asarray(is_fg, bool)), seed)


def to_support_indices(ps: ProtoSet, kept_index: np.ndarray) -> None:
    """Sources and part members count the kept images; make them support image indices (issue 21: provenance
    names the support images and their seeds, `models.base.image_seed(recipe.seed, name, index)`)."""
    ps.source = np.where(ps.source >= 0, kept_index[np.maximum(ps.source, 0)], -1).astype(np.int16)
    if ps.members is not None:
        for i, m in enumerate(ps.members):
            if m is not None:
                ps.members[i] = tuple(int(kept_index[j]) for j in m)


def _objects(items: list) -> np.ndarray:
    """A 1-D object array holding `items` as they are (tuples stay tuples)."""
    out = np.empty(len(items), object)
    for i, x in enumerate(items):
        out[i] = x
    return out


def build_protoset(feats: torch.Tensor, fg: torch.Tensor, bg: torch.Tensor, parts: int, iters: int = 50,
                   seed: int = 0, max_pixels: int = 200_000, mask_grid: str = "any") -> ProtoSet:
    """feats: [N, D, h, w]; fg, bg: [N, H, W] bool masks at image size -> ProtoSet (unit-norm rows)."""
    return protoset_from_pixels(masked_pixels(feats, fg, mask_grid), masked_pixels(feats, bg, mask_grid),
                                feats.shape[1], parts, iters, seed, max_pixels)
