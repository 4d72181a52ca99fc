"""Segmenter: an image + a bank -> a label map, by nearest-prototype matching (OVDIFF.md section 6).

Steps: resize to the short side; views (sliding windows + whole image, resized per extractor); the classifier
pre-filter with the subset search; gather the kept classes' prototypes (background from the kept things, stuff
filtering); one matmul per extractor and view batch (fp16 storage, fp32 accumulation) and a segment max per class;
upsample, clamp and average over views and extractors (one shared count map); optional PAMR; optional snapping to
class-agnostic regions (regions.py, recipe `segmentation.regions`); upsample to the input size, scores <= 0 -> 0,
argmax with ties to background.

Ablations (recipe `segmentation.*` or the `ablate` argument): `no_background`, `no_prefilter`, `no_stuff_filter`,
`class_mean_only`, `no_regions`, `only:<extractor>`. With the pre-filter off over more than `segmentation.retrieval_classes`
classes, a faiss class-level retrieval (pooled image features vs class prototypes) bounds the classes matched.
"""
from __future__ import annotations

import argparse
import itertools
import sys
import time
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from .models.base import Classifier, Extractor
from .regions import RegionsError, RegionSnapper
from .store.bank import Bank

ABLATIONS = ("no_background", "no_prefilter", "no_stuff_filter", "class_mean_only", "no_regions")
TIMING_KEYS = ("features", "prefilter", "matching", "upsample", "pamr", "regions")


class SegmentError(ValueError):
    """Bad input to the segmenter (unknown or empty classes, unreadable image, unknown ablation)."""


@dataclass
class SegmentationResult:
    labels: np.ndarray  # [H, W] int32 at the input size; 0 = background, c + 1 = bank class c
    classes: dict[int, str]  # label value -> name for the values present (0 -> "background")
    scores: np.ndarray | None  # [K + 1, H, W] float32: background at 0, then `kept` in order (vote shares when
    #                            regions snap by vote)
    kept: list[str]  # classes kept by the pre-filter (bank order)
    timings: dict[str, float] = field(default_factory=dict)  # seconds per stage


@dataclass(frozen=True)
class Switches:
    """Which parts of the method run."""

    background: bool = True
    prefilter: bool = True
    stuff_filter: bool = True
    class_mean_only: bool = False
    only: str | None = None
    regions: bool = True  # snap to the recipe's (or the request's) regions; `no_regions` turns it off

    @classmethod
    def of(cls, seg, ablate: Sequence[str], extractors: Sequence[str]) -> "Switches":
        """From the recipe's `segmentation` section plus ablation names."""
        s = dict(background=seg.background, prefilter=seg.prefilter, stuff_filter=seg.stuff_filter,
                 class_mean_only=seg.class_mean_only, only=None)
        for a in ablate:
            if a.startswith("only:"):
                name = a[5:]
                if name not in extractors:
                    raise SegmentError(f"ablation {a!r}: unknown extractor {name!r} (bank has: {', '.join(extractors)})")
                s["only"] = name
            elif a in ABLATIONS:
                key = a[3:] if a.startswith("no_") else a
                s[key] = not a.startswith("no_")
            else:
                raise SegmentError(f"unknown ablation {a!r} (known: {', '.join(ABLATIONS)}, only:<extractor>)")
        return cls(**s)


@dataclass
class Gathered:
    """Kept classes' prototypes of one extractor, ready for one matmul."""

    protos: torch.Tensor  # [R, D] float32 (fg rows of all kept classes, then bg rows)
    fg_index: torch.Tensor  # [K, L] int64 column per (class, slot); padding points at column R (-inf)
    n_fg: int
    n_bg: int
    run: int = 0  # every kept class has exactly `run` fg rows (a plain reshape replaces the index gather)


View = tuple[int, int, int, int]  # (y0, x0, vh, vw) on the image at the short side


@dataclass
class _Item:
    """One image on its way through `segment_batch`."""

    x: torch.Tensor  # [3, h, w] float in [0, 1], short side `segmentation.short_side`
    h0: int  # input height
    w0: int  # input width
    views: list[View]
    t: dict[str, float]  # seconds per stage
    kept: list[int] = field(default_factory=list)  # bank ids after the pre-filter
    acc: torch.Tensor | None = None  # [K + 1, h, w] summed view scores
    count: torch.Tensor | None = None  # [h, w] views covering each pixel


# --------------------------------------------------------------------------------------------------- helpers

def to_rgb_array(image) -> np.ndarray:
    """PIL image or array ([H, W], [H, W, 3|4], uint8 or float in [0, 1]) -> `[H, W, 3]` uint8."""
    if hasattr(image, "convert"):
        image = np.asarray(image.convert("RGB"))
    a = np.asarray(image)
    if a.ndim == 2:
        a = np.repeat(a[..., None], 3, 2)
    if a.ndim != 3 or a.shape[2] not in (3, 4) or min(a.shape[:2]) < 1:
        raise SegmentError(f"expected an image [H, W, 3], got an array of shape {a.shape}")
    a = a[..., :3]
    if not a.flags.writeable:
        a = a.copy()
    if a.dtype != np.uint8:
        a = np.clip(a.astype(np.float32) * (255 if a.max() <= 1.0 else 1), 0, 255).round().astype(np.uint8)
    return np.ascontiguousarray(a)


def read_image(path: str | Path) -> np.ndarray:
    """An image file -> `[H, W, 3]` uint8; anything else is a SegmentError naming the file."""
    from PIL import Image, UnidentifiedImageError

    p = Path(path)
    if not p.is_file():
        raise SegmentError(f"{p}: no such image file")
    try:
        with Image.open(p) as im:
            im.load()
            return to_rgb_array(im)
    except (UnidentifiedImageError, OSError, Image.DecompressionBombError) as e:
        raise SegmentError(f"{p}: not a readable image file ({e.__class__.__name__}: {e})") from None


def resize_short(x: torch.Tensor, short: int) -> torch.Tensor:
    """`x [C, H, W]` -> short side `short` (aspect kept)."""
    h, w = x.shape[-2:]
    s = short / min(h, w)
    size = (max(1, round(h * s)), max(1, round(w * s)))
    if size == (h, w):
        return x
    return F.interpolate(x[None], size=size, mode="bilinear", align_corners=False, antialias=s < 1)[0]


def window_starts(length: int, size: int, stride: int) -> list[int]:
    """Window starts along one side; the last window is snapped to the border."""
    if size >= length:
        return [0]
    starts = list(range(0, length - size + 1, max(1, stride)))
    if starts[-1] != length - size:
        starts.append(length - size)
    return starts


def make_views(h: int, w: int, windows: Sequence[Sequence[int]], whole: bool) -> list[tuple[int, int, int, int]]:
    """Views `(y0, x0, vh, vw)` on an `h x w` image: sliding windows `[size, stride]` plus the whole image."""
    views: list[tuple[int, int, int, int]] = []
    for size, stride in windows:
        vh, vw = min(size, h), min(size, w)
        for y in window_starts(h, size, stride):
            for x in window_starts(w, size, stride):
                views.append((y, x, vh, vw))
    if whole or not views:
        views.append((0, 0, h, w))
    return list(dict.fromkeys(views))


def segment_max(sims: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """`sims [R, N]`, `index [K, L]` (row R = padding) -> per-class max `[K, N]`."""
    k, length = index.shape
    if k == 0:
        return sims.new_zeros(0, sims.shape[1])
    full = torch.cat([sims, sims.new_full((1, sims.shape[1]), -torch.inf)], 0)
    return full[index.reshape(-1)].view(k, length, -1).amax(1)


def upsample_argmax(scores: torch.Tensor, h0: int, w0: int, rows: int = 256) -> np.ndarray:
    """`scores [C, h, w]` -> argmax over C of the bilinear upsampling to `[h0, w0]` with scores <= 0 set to 0 (ties
    to the first row, background), in chunks of output rows so that `[C, h0, w0]` is never held at once.

    Same result as `F.interpolate(..., mode="bilinear", align_corners=False)`: horizontal pass first, then the
    vertical blend of the two source rows of each output row.
    """
    c, h, w = scores.shape
    if (h, w) == (h0, w0):
        return scores.clamp_min(0).argmax(0).cpu().numpy()
    tmp = F.interpolate(scores[None], size=(h, w0), mode="bilinear", align_corners=False)[0]  # [C, h, w0]
    src = ((torch.arange(h0, dtype=torch.float64) + 0.5) * (h / h0) - 0.5).clamp_min(0)
    i0 = src.floor().long().clamp_max(h - 1)
    i1 = (i0 + 1).clamp_max(h - 1)
    wt = (src - i0).float().to(tmp.device)[None, :, None]
    out = np.empty((h0, w0), np.int64)
    for y in range(0, h0, rows):
        sl = slice(y, y + rows)
        blend = tmp[:, i0[sl]] * (1 - wt[:, sl]) + tmp[:, i1[sl]] * wt[:, sl]
        out[sl] = blend.clamp_min_(0).argmax(0).cpu().numpy()
    return out


# ------------------------------------------------------------------------------------------------------ PAMR

_NEIGHBOURS = [(-1, -1), (-1, 0), (-1, 1), (0, -1), (0, 1), (1, -1), (1, 0), (1, 1)]


def _shifts(x: torch.Tensor, dilations: Sequence[int], centre: bool) -> list[torch.Tensor]:
    """`x [C, H, W]` -> neighbours at each dilation (replicate padding), optionally with the centre per dilation."""
    d_max = max(dilations)
    h, w = x.shape[-2:]
    p = F.pad(x[None], (d_max,) * 4, mode="replicate")[0]
    out = []
    for d in dilations:
        for dy, dx in ([(0, 0)] if centre else []) + _NEIGHBOURS:
            y0, x0 = d_max + dy * d, d_max + dx * d
            out.append(p[:, y0:y0 + h, x0:x0 + w])
    return out


def pamr_affinity(image: torch.Tensor, dilations: Sequence[int]) -> torch.Tensor:
    """PAMR affinities `[P, H, W]` (softmax over the 8 * len(dilations) neighbours) of `image [3, H, W]`."""
    with_centre = torch.stack(_shifts(image, dilations, True))  # [9 * nd, 3, H, W]
    std = with_centre.std(0)  # [3, H, W]
    del with_centre
    diffs = torch.stack([(n - image).abs() for n in _shifts(image, dilations, False)])  # [P, 3, H, W]
    aff = (-diffs / (1e-8 + 0.1 * std)).mean(1)  # [P, H, W]
    return torch.softmax(aff, 0)


@torch.no_grad()
def pamr_refine(image: torch.Tensor, scores: torch.Tensor, iters: int = 10,
         dilations: Sequence[int] = (1, 2, 4, 8, 12, 24)) -> torch.Tensor:
    """Pixel-adaptive mask refinement (Araslanov & Roth 2020): `image [3, H, W]`, `scores [K, H, W]` -> `[K, H, W]`.

    Each iteration replaces a pixel's scores by the affinity-weighted mean of its neighbours' at several
    dilations; affinities come from local colour differences scaled by the local standard deviation.
    """
    if iters <= 0 or not dilations:
        return scores
    aff = pamr_affinity(image.float(), dilations)
    m = scores.float()
    for _ in range(iters):
        m = sum(a[None] * n for a, n in zip(aff, _shifts(m, dilations, False)))
    return m


# ------------------------------------------------------------------------------------------------- segmenter

class Segmenter:
    """Nearest-prototype segmentation over a bank, with the models of the bank's recipe."""

    def __init__(self, bank: Bank, extractors: list[Extractor], classifier: Classifier, device: str = "cpu"):
        self.bank = bank
        self.recipe = bank.recipe
        self.seg = bank.recipe.segmentation
        self.device = torch.device(device)
        self.extractors = {e.name: e for e in extractors}
        missing = [n for n in self.extractors if n not in bank.extractors]
        if missing:
            raise SegmentError(f"bank {bank.bank_id} has no prototypes for extractor(s) {', '.join(missing)}")
        self.ex_cfg = {c.name: c for c in self.recipe.extractors}
        self.classifier = classifier
        # views per extractor forward pass; 8 on a GPU, the batch the bank build already runs these extractors at
        self.view_batch = 8 if self.device.type == "cuda" else 4
        self._text_cache: OrderedDict[str, np.ndarray] = OrderedDict()
        self._gather_cache: OrderedDict[tuple, Gathered] = OrderedDict()
        self._retrieval_index: dict[str, tuple] = {}
        self.snapper = RegionSnapper(self.seg, device)

    @classmethod
    def from_bank(cls, bank: Bank, device: str | None = None) -> "Segmenter":
        from .models import build_classifier, build_extractors, default_device

        device = device or default_device()
        return cls(bank, build_extractors(bank.recipe, device), build_classifier(bank.recipe, device), device)

    # -- classes -------------------------------------------------------------------------------------------
    def resolve(self, classes: Sequence[str] | None) -> list[int]:
        """Class names -> bank ids (sorted); unknown names or an empty list raise SegmentError."""
        if classes is not None:
            classes = [c for c in classes if c.strip()]
            if not classes:
                raise SegmentError("empty class list: name at least one class of the bank")
        try:
            return self.bank.resolve(None if classes is None else list(classes))
        except KeyError as e:
            raise SegmentError(e.args[0]) from None

    # -- pre-filter ----------------------------------------------------------------------------------------
    def text_embeddings(self, prompts: list[str]) -> np.ndarray:
        """`[P, E]` text embeddings, cached per prompt (LRU, 100k prompts)."""
        todo = [p for p in dict.fromkeys(prompts) if p not in self._text_cache]
        for i in range(0, len(todo), 256):
            chunk = todo[i:i + 256]
            for p, v in zip(chunk, np.asarray(self.classifier.encode_text(chunk), np.float32)):
                self._text_cache[p] = v
        for p in prompts:
            self._text_cache.move_to_end(p)
        while len(self._text_cache) > 100_000:
            self._text_cache.popitem(last=False)
        return np.stack([self._text_cache[p] for p in prompts])

    def prefilter(self, image: torch.Tensor, ids: list[int]) -> list[int]:
        """OVDIFF.md 6.2: `image [3, H, W]` -> kept class ids (stuff always kept)."""
        return self.prefilter_batch([image], ids)[0]

    def prefilter_batch(self, images: list[torch.Tensor], ids: list[int]) -> list[list[int]]:
        """`images [3, H, W]` each -> kept class ids per image; one image-encoder pass for all of them."""
        things = [c for c in ids if self.bank.kinds[c] != "stuff"]
        stuff = [c for c in ids if self.bank.kinds[c] == "stuff"]
        if not things:
            return [ids for _ in images]
        size = self.recipe.classifier.image_size
        x = torch.cat([F.interpolate(im[None], size=(size, size), mode="bilinear", align_corners=False,
                                     antialias=True) for im in images])  # [B, 3, S, S]
        emb = np.asarray(self.classifier.encode_image(x), np.float32)  # [B, E]
        return [self._subset_search(e, things, stuff) for e in emb]

    def _subset_search(self, e: np.ndarray, things: list[int], stuff: list[int]) -> list[int]:
        cos = self.bank.text[things] @ e
        p = np.exp(cos - cos.max())
        p /= p.sum()
        order = [i for i in np.argsort(-p, kind="stable") if p[i] >= 1.0 / len(things) - 1e-12]
        cands = sorted(things[i] for i in order[: self.seg.max_candidates])
        if not cands:
            return stuff
        tmpl = self.recipe.classifier.text_template
        subsets = [s for r in range(1, len(cands) + 1) for s in itertools.combinations(cands, r)]
        prompts = [" and ".join(tmpl.format(name=self.bank.names[c]) for c in s) for s in subsets]
        best = subsets[int(np.argmax(self.text_embeddings(prompts) @ e))]
        return sorted(list(best) + stuff)

    def retrieve(self, feats: dict[str, torch.Tensor], ids: list[int], n: int, grid: int = 4) -> list[int]:
        """Class-level faiss retrieval: pooled features of the whole image (`feats[ex] [D, h, w]`, a grid of cells
        plus the global mean) vs each class's class-level fg prototype; keep the `n` best classes (sum over
        extractors of the best cosine)."""
        total = np.zeros(len(self.bank.names), np.float32)
        for ex, f in feats.items():
            index, rows = self._class_index(ex)
            q = torch.cat([F.adaptive_avg_pool2d(f[None].float(), min(grid, *f.shape[-2:]))[0].flatten(1).T,
                           f.float().mean((1, 2))[None]])
            q = F.normalize(q, dim=1).cpu().numpy().astype(np.float32)
            sims, found = index.search(q, min(index.ntotal, max(4 * n, 64)))
            best = np.full(len(self.bank.names), -1.0, np.float32)
            cls = rows[np.maximum(found, 0)]
            np.maximum.at(best, cls[found >= 0], sims[found >= 0])
            total += best
        allowed = np.full(len(self.bank.names), -np.inf, np.float32)
        allowed[ids] = total[ids]
        keep = np.argsort(-allowed, kind="stable")[:n]
        return sorted(int(c) for c in keep if np.isfinite(allowed[c]))

    def _class_index(self, ex: str):
        """faiss IndexFlatIP over the class-level fg prototype of every class (built once per extractor)."""
        if ex not in self._retrieval_index:
            import faiss

            a = self.bank.extractors[ex]
            sel = np.nonzero((a.kind == 0) & (a.level == 0))[0]
            vecs = np.ascontiguousarray(a.vectors[sel], np.float32)
            index = faiss.IndexFlatIP(a.dim)
            index.add(vecs)
            self._retrieval_index[ex] = (index, a.class_idx[sel])
        return self._retrieval_index[ex]

    # -- prototypes ----------------------------------------------------------------------------------------
    def gather(self, ex: str, kept: list[int], sw: Switches) -> Gathered:
        """Kept classes' fg rows (segment layout) and background rows (kept things, stuff-filtered)."""
        key = (ex, tuple(kept), sw.background, sw.stuff_filter, sw.class_mean_only)
        if key in self._gather_cache:
            self._gather_cache.move_to_end(key)
            return self._gather_cache[key]
        a = self.bank.extractors[ex]
        fg_rows, bg_rows, stuff_rows = [], [], []
        for c in kept:
            r = np.arange(*a.rows_of(c).indices(len(a.vectors)))
            ok = a.level[r] == 0 if sw.class_mean_only else np.ones(len(r), bool)
            fg = r[(a.kind[r] == 0) & ok]
            fg_rows.append(fg)
            if self.bank.kinds[c] == "stuff":
                stuff_rows.append(fg)
            elif sw.background:
                bg_rows.append(r[(a.kind[r] == 1) & ok])
        bg = np.concatenate(bg_rows) if bg_rows else np.zeros(0, np.int64)
        vec = lambda idx: torch.from_numpy(a.vectors[idx]).to(self.device).float()  # noqa: E731
        if sw.stuff_filter and len(bg) and stuff_rows:
            sf = vec(np.concatenate(stuff_rows))
            if len(sf):
                bg = bg[((vec(bg) @ sf.T).amax(1) <= self.seg.stuff_threshold).cpu().numpy()]
        lengths = [len(f) for f in fg_rows]
        n_fg = sum(lengths)
        width = max(lengths + [1])
        index = torch.full((len(kept), width), n_fg + len(bg), dtype=torch.long)
        start = 0
        for i, n in enumerate(lengths):
            index[i, :n] = torch.arange(start, start + n)
            start += n
        rows = np.concatenate(fg_rows + [bg]).astype(np.int64)
        run = lengths[0] if lengths and all(n == lengths[0] for n in lengths) else 0
        g = Gathered(vec(rows), index.to(self.device), n_fg, len(bg), run)
        self._gather_cache[key] = g
        while len(self._gather_cache) > 64:
            self._gather_cache.popitem(last=False)
        return g

    # -- matching ------------------------------------------------------------------------------------------
    def match(self, feats: torch.Tensor, g: Gathered, chunk: int = 16384) -> torch.Tensor:
        """`feats [B, D, h, w]` -> scores `[B, K + 1, h, w]` (background at 0; 0 when there are no bg rows).

        Per image one `protos [R, D] @ feats [D, N]` (fp32), a per-class max over rows, and the division by the
        pixel norms after the max (cosine = max(p . f) / |f|), so features are never copied or normalised.
        """
        b, d, h, w = feats.shape
        k = g.fg_index.shape[0]
        out = feats.new_zeros(b, k + 1, h * w, dtype=torch.float32)
        for j in range(b):
            f = feats[j].reshape(d, h * w).float()
            for i in range(0, h * w, chunk):
                fi = f[:, i:i + chunk]
                sims = g.protos @ fi  # [R, n]
                o = out[j, :, i:i + chunk]
                if g.run:
                    o[1:] = sims[:g.n_fg].view(k, g.run, -1).amax(1)
                else:
                    o[1:] = segment_max(sims[:g.n_fg], g.fg_index)
                if g.n_bg:
                    o[0] = sims[g.n_fg:].amax(0)
                o /= fi.norm(dim=0).clamp_min(1e-12)
        return out.view(b, k + 1, h, w)

    def _view_size(self, ex: str, h: int, w: int) -> tuple[int, int]:
        """Per-extractor view size: square `view_size`, or kept with the long side capped at `max_side`."""
        cfg = self.ex_cfg.get(ex)
        e = self.extractors[ex]
        if e.view_size:
            return e.view_size, e.view_size
        cap = cfg.max_side if cfg is not None and cfg.max_side else 10 ** 9
        s = min(1.0, cap / max(h, w))
        return max(1, round(h * s)), max(1, round(w * s))

    def _features(self, ex: str, items: list[_Item], which: Callable[[_Item], list[View]]):
        """Yield `(views, feats [B, D, h, w])`, `views` = `(item index, view)`: the views of all items, batched by
        extractor input size, so views of several images share one forward pass."""
        by_size: dict[tuple[int, int], list[tuple[int, View]]] = {}
        for i, it in enumerate(items):
            for v in which(it):
                by_size.setdefault(self._view_size(ex, v[2], v[3]), []).append((i, v))
        for size, group in by_size.items():
            for b in range(0, len(group), self.view_batch):
                batch = group[b:b + self.view_batch]
                t0 = time.perf_counter()
                crops = []
                for i, (y, x, h, w) in batch:
                    crop = items[i].x[None, :, y:y + h, x:x + w]
                    if (h, w) != size:
                        crop = F.interpolate(crop, size=size, mode="bilinear", align_corners=False,
                                             antialias=size[0] < h)
                    crops.append(crop)
                f = self.extractors[ex](torch.cat(crops)).float()
                dt = (time.perf_counter() - t0) / len(batch)
                for i, _ in batch:
                    items[i].t["features"] += dt
                yield batch, f

    def _prepare(self, image) -> _Item:
        rgb = to_rgb_array(image)
        x = torch.from_numpy(rgb).permute(2, 0, 1).float().div(255)
        x = resize_short(x, self.seg.short_side).to(self.device)  # [3, h, w]
        h, w = x.shape[-2:]
        return _Item(x, rgb.shape[0], rgb.shape[1], make_views(h, w, self.seg.windows, self.seg.whole_image),
                     dict.fromkeys(TIMING_KEYS, 0.0))

    def _keep(self, items: list[_Item], ids: list[int], sw: Switches, exs: list[str]) -> None:
        """Each item's kept classes: the pre-filter (one image-encoder pass for the batch), or faiss retrieval
        when it is off over a large vocabulary."""
        t0 = time.perf_counter()
        kept = self.prefilter_batch([it.x for it in items], ids) if sw.prefilter else [ids] * len(items)
        dt = (time.perf_counter() - t0) / len(items)
        for it, k in zip(items, kept):
            it.kept = k
            it.t["prefilter"] += dt
        if sw.prefilter or len(ids) <= self.seg.retrieval_classes:
            return
        whole: list[dict[str, torch.Tensor]] = [{} for _ in items]
        for ex in exs:
            for batch, f in self._features(ex, items, lambda it: [(0, 0, *it.x.shape[-2:])]):
                for (i, _), fi in zip(batch, f):
                    whole[i][ex] = fi
        for it, wf in zip(items, whole):
            t0 = time.perf_counter()
            it.kept = self.retrieve(wf, ids, self.seg.retrieval_classes)
            it.t["prefilter"] += time.perf_counter() - t0

    def _accumulate(self, items: list[_Item], sw: Switches, exs: list[str]) -> None:
        """Scores of every view of every item, upsampled, clamped and summed into `item.acc` / `item.count`."""
        for it in items:
            it.acc = torch.zeros(len(it.kept) + 1, *it.x.shape[-2:], device=self.device)  # [K + 1, h, w]
            it.count = torch.zeros(it.x.shape[-2:], device=self.device)  # [h, w]
        for ex in exs:
            gs = []
            for it in items:
                t0 = time.perf_counter()
                gs.append(self.gather(ex, it.kept, sw))
                it.t["matching"] += time.perf_counter() - t0
            for batch, f in self._features(ex, items, lambda it: it.views):
                j = 0
                while j < len(batch):  # runs of views of one item share its gathered prototypes
                    i = batch[j][0]
                    n = next((m for m in range(j, len(batch)) if batch[m][0] != i), len(batch)) - j
                    it = items[i]
                    t0 = time.perf_counter()
                    s = self.match(f[j:j + n], gs[i])
                    t1 = time.perf_counter()
                    it.t["matching"] += t1 - t0
                    for (_, (y0, x0, vh, vw)), sv in zip(batch[j:j + n], s):
                        up = F.interpolate(sv[None], size=(vh, vw), mode="bilinear", align_corners=False)[0]
                        it.acc[:, y0:y0 + vh, x0:x0 + vw] += up.clamp_(-1, 1)
                        it.count[y0:y0 + vh, x0:x0 + vw] += 1
                    it.t["upsample"] += time.perf_counter() - t1
                    j += n

    def _snap(self, it: _Item, scores: torch.Tensor, regions: str) -> torch.Tensor:
        if regions == "none":
            return scores
        t0 = time.perf_counter()
        try:
            out = self.snapper.snap(it.x, scores, regions)
        except (RegionsError, OSError, RuntimeError) as e:  # e.g. SAM weights that cannot be resolved or loaded
            raise SegmentError(f"regions {regions!r}: {e}") from None
        it.t["regions"] += time.perf_counter() - t0
        return out

    def _finish(self, it: _Item, pamr: bool, return_scores: bool, regions: str = "none") -> SegmentationResult:
        t = it.t
        scores = it.acc / it.count.clamp_min(1)  # [K + 1, h, w]
        it.acc = it.count = None
        before = pamr and self.seg.regions_stage == "before_pamr"
        if before:
            scores = self._snap(it, scores, regions)
        if pamr:
            t0 = time.perf_counter()
            scores = pamr_refine(it.x, scores, self.seg.pamr_iters, self.seg.pamr_dilations)
            t["pamr"] += time.perf_counter() - t0
        if not before:
            scores = self._snap(it, scores, regions)
        t0 = time.perf_counter()
        h0, w0 = it.h0, it.w0
        if return_scores:
            if scores.shape[-2:] != (h0, w0):
                scores = F.interpolate(scores[None], size=(h0, w0), mode="bilinear", align_corners=False)[0]
            scores = scores.clamp_min(0)
            arg = scores.argmax(0).cpu().numpy()  # first maximum: ties go to background (row 0)
        else:
            arg = upsample_argmax(scores, h0, w0)
        labels = np.array([0] + [c + 1 for c in it.kept], np.int32)[arg]
        t["upsample"] += time.perf_counter() - t0
        present = np.unique(labels)
        names = {int(v): ("background" if v == 0 else self.bank.names[v - 1]) for v in present}
        return SegmentationResult(labels, names, scores.cpu().numpy().astype(np.float32) if return_scores else None,
                                  [self.bank.names[c] for c in it.kept], t)

    # -- the whole thing -----------------------------------------------------------------------------------
    def segment(self, image, classes: list[str] | None = None, pamr: bool = False, ablate: Sequence[str] = (),
                return_scores: bool = False, regions: str | None = None) -> SegmentationResult:
        """One image (`[H, W, 3]` uint8 array or PIL image) -> SegmentationResult at the input size."""
        return self.segment_batch([image], classes, pamr, ablate, return_scores, regions)[0]

    @torch.no_grad()
    def segment_batch(self, images, classes: list[str] | None = None, pamr: bool = False,
                      ablate: Sequence[str] = (), return_scores: bool = False,
                      regions: str | None = None) -> list[SegmentationResult]:
        """Several images (any sizes) -> one SegmentationResult each. The pre-filter's image encoder runs once for
        the batch, and views of all images go through each extractor together (`view_batch` per forward pass).
        `regions` overrides the recipe's `segmentation.regions` (none | superpixels | sam | on | off)."""
        ids = self.resolve(classes)
        sw = Switches.of(self.seg, ablate, list(self.extractors))
        try:
            method = self.snapper.method(regions) if sw.regions else "none"
        except RegionsError as e:
            raise SegmentError(str(e)) from None
        exs = [sw.only] if sw.only else list(self.extractors)
        items = [self._prepare(im) for im in images]
        if not items:
            return []
        self._keep(items, ids, sw, exs)
        self._accumulate(items, sw, exs)
        return [self._finish(it, pamr, return_scores, method) for it in items]


# ------------------------------------------------------------------------------------------------- pictures

def class_colour(value: int) -> tuple[int, int, int]:
    """A stable, distinct colour per label value (golden-ratio hues)."""
    import colorsys

    r, g, b = colorsys.hsv_to_rgb((value * 0.618034) % 1.0, 0.75, 0.95)
    return int(r * 255), int(g * 255), int(b * 255)


def overlay(image, result: SegmentationResult, alpha: float = 0.5):
    """The image with non-background labels tinted, region outlines, and a legend of the classes found."""
    from PIL import Image, ImageDraw

    rgb = to_rgb_array(image).astype(np.float32)
    labels = result.labels
    tint = np.zeros_like(rgb)
    for v in result.classes:
        if v:
            tint[labels == v] = class_colour(v)
    fgm = (labels > 0)[..., None]
    out = np.where(fgm, rgb * (1 - alpha) + tint * alpha, rgb)
    edge = np.zeros(labels.shape, bool)
    edge[1:] |= labels[1:] != labels[:-1]
    edge[:, 1:] |= labels[:, 1:] != labels[:, :-1]
    out[edge] = 255
    img = Image.fromarray(out.clip(0, 255).astype(np.uint8))
    found = [(v, n) for v, n in sorted(result.classes.items()) if v]
    row = 18
    legend = Image.new("RGB", (img.width, row * max(1, len(found)) + 6), (255, 255, 255))
    d = ImageDraw.Draw(legend)
    for i, (v, n) in enumerate(found):
        d.rectangle([4, 3 + i * row, 18, 3 + i * row + 13], fill=class_colour(v), outline=(0, 0, 0))
        d.text((24, 3 + i * row), n, fill=(0, 0, 0))
    if not found:
        d.text((4, 3), "no classes found (all background)", fill=(0, 0, 0))
    sheet = Image.new("RGB", (img.width, img.height + legend.height), (255, 255, 255))
    sheet.paste(img, (0, 0))
    sheet.paste(legend, (0, img.height))
    return sheet


# ------------------------------------------------------------------------------------------------------ CLI

def main(argv: list[str] | None = None) -> int:
    """`ovdiff segment IMAGE --bank URI [--classes a,b] --out FILE.png [--pamr]`."""
    ap = argparse.ArgumentParser(prog="ovdiff segment",
                                 description="Segment one image with a bank and write it with the labels overlaid.")
    ap.add_argument("image")
    ap.add_argument("--bank", required=True, help="bank URI (folder or s3://bucket/prefix)")
    ap.add_argument("--classes", default=None, help="comma-separated subset of the bank's classes")
    ap.add_argument("--out", required=True, help="output PNG (image + overlay + legend)")
    ap.add_argument("--pamr", action="store_true", help="refine with PAMR")
    ap.add_argument("--regions", choices=("none", "superpixels", "sam"), default=None,
                    help="snap labels to class-agnostic regions (default: the bank recipe's segmentation.regions)")
    ap.add_argument("--ablate", action="append", default=[], help="ablation name (repeatable)")
    ap.add_argument("--device", default=None)
    a = ap.parse_args(argv)
    t0 = time.perf_counter()
    try:
        rgb = read_image(a.image)
        classes = [c.strip() for c in a.classes.split(",")] if a.classes is not None else None
        bank = Bank.load(a.bank)
        seg = Segmenter.from_bank(bank, a.device)
        res = seg.segment(rgb, classes, pamr=a.pamr, ablate=a.ablate, regions=a.regions)
    except (SegmentError, ValueError, KeyError, OSError) as e:
        msg = e.args[0] if isinstance(e, KeyError) and e.args else e
        print(f"ovdiff segment: error: {msg}", file=sys.stderr)
        return 2
    out = Path(a.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    overlay(rgb, res).save(out)
    found = [n for v, n in sorted(res.classes.items()) if v]
    print(f"segmented {a.image} ({rgb.shape[1]}x{rgb.shape[0]}) in {time.perf_counter() - t0:.1f}s: "
          f"{len(found)} classes found ({', '.join(found) or 'none'}); wrote {out}")
    return 0
