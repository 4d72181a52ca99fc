"""Segmenter: an image + a bank -> a label map, by nearest-prototype matching (OVDIFF.md section 6).

Steps: resize to the short side; views (sliding windows + whole image, resized per extractor); the classifier
pre-filter with the subset search; gather the kept classes' prototypes (background from the kept things, stuff
filtering); one matmul per extractor and view batch (fp16 storage, fp32 accumulation) and a segment max per class;
upsample, clamp and average over views and extractors (one shared count map); optional PAMR; optional snapping to
class-agnostic regions (regions.py, recipe `segmentation.regions`); upsample to the input size, scores <= 0 -> 0,
argmax with ties to background.

The pre-filter lives in prefilter.py, prototype gathering and matching in matching.py, PAMR in pamr.py, the switches
and ablation names in switches.py, image reading and resizing in images.py.

Ablations (recipe `segmentation.*` or the `ablate` argument): `no_background`, `no_prefilter`, `no_stuff_filter`,
`class_mean_only`, `no_regions`, `only:<extractor>`; and for the switches beyond the paper (issue 10, off in paper.yaml):
`no_stuff_filter_self` (`stuff_filter_rule: self`), `no_stuff_presence` (`stuff_min_area`: a stuff class is kept
only where it wins part of the whole-image view) and `no_bounded_search` (`subset_search: greedy | beam`); issue 23's
`no_stuff_opening` and `no_background_presence` (precedence.py); issue 27's `no_thing_proposals` (proposals.py:
the prototypes propose regions in the whole view, the classifier names their crops) and `no_background_margin`
(precedence.py: background presence counts only pixels it leads clearly). With the pre-filter off over
more than `segmentation.retrieval_classes` classes, a faiss class-level retrieval (pooled
image features vs class prototypes) bounds the classes matched.
"""
from __future__ import annotations

import sys
import time
from collections import OrderedDict
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from . import confidence
from .confidence import fit_scale as _fit_scale
from .images import exif_upright, read_image, resize_short, to_rgb_array  # noqa: F401 (re-exported)
from .matching import Gathered, gather, match, segment_max  # noqa: F401 (segment_max: re-exported)
from .models.base import Classifier, Extractor
from .pamr import pamr_affinity, pamr_refine  # noqa: F401 (re-exported)
from .precedence import background_present, opened_shares
from .prefilter import PreFilter, Selection
from .proposals import cell_queries, cell_similarities, grid_size, propose, region_box
from .regions import RegionsError, RegionSnapper
from .store.bank import Bank
from .switches import ABLATIONS, SegmentError, Switches  # noqa: F401 (re-exported)
from .cli_help import Parser

TIMING_KEYS = ("features", "prefilter", "matching", "upsample", "pamr", "regions")


@dataclass
class SegmentationResult:
    labels: np.ndarray  # [H, W] int32 at the input size; 0 = background, c + 1 = bank class c
    classes: dict[int, str]  # label value -> name for the values present (0 -> "background")
    scores: np.ndarray | None  # [K + 1, H, W] float32: background at 0, then `kept` in order (vote shares when
    #                            regions snap by vote)
    kept: list[str]  # classes kept by the pre-filter (bank order)
    timings: dict[str, float] = field(default_factory=dict)  # seconds per stage
    confidence: np.ndarray | None = None  # [H, W] float32 in [0, 1] of each pixel's label (confidence.py)
    topk: dict[int, list[tuple[int, float]]] | None = None  # label value -> best (label value, mean score) over
    #                                                        its pixels, best first (confidence.class_topk)
    features: "WholeFeatures | None" = None  # `keep_features`: the whole-image view's features (explain.py)


@dataclass
class WholeFeatures:
    """The features the segmentation computed for the whole-image view, kept for `explain` (no second pass)."""

    size: tuple[int, int]  # (h, w) of the image at the short side
    feats: dict[str, torch.Tensor]  # extractor -> `[D, fh, fw]` float, on the segmenter's device


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
    whole: dict[str, torch.Tensor] = field(default_factory=dict)  # extractor -> whole-image features [1, D, h, w]
    background: bool = True  # background matched (False: `segmentation.background_min_area` not reached)
    want_confidence: bool = True  # compute the confidence map and top-k (upsampled and copied to the host)
    kept_feats: dict[str, torch.Tensor] | None = None  # keep_features: extractor -> whole-view features [D, fh, fw]
    fit_scale: float | None = None  # the bank's typical own fit (confidence.fit_scale; None: no record)


# --------------------------------------------------------------------------------------------------- helpers

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


def upsample_argmax(scores: torch.Tensor, h0: int, w0: int, rows: int = 256) -> np.ndarray:
    """`scores [C, h, w]` -> argmax over C of the bilinear upsampling to `[h0, w0]` with scores <= 0 set to 0 (ties
    to the first row, background), in chunks of output rows so that `[C, h0, w0]` is never held at once.

    Same result as `F.interpolate(..., mode="bilinear", align_corners=False)`: horizontal pass first, then the
    vertical blend of the two source rows of each output row.
    """
    c, h, w = scores.shape
    if (h, w) == (h0, w0):
        return to_host_index(scores.clamp_min(0).argmax(0), c)
    tmp = F.interpolate(scores[None], size=(h, w0), mode="bilinear", align_corners=False)[0]  # [C, h, w0]
    src = ((torch.arange(h0, dtype=torch.float64) + 0.5) * (h / h0) - 0.5).clamp_min(0)
    i0 = src.floor().long().clamp_max(h - 1)
    i1 = (i0 + 1).clamp_max(h - 1)
    wt = (src - i0).float().to(tmp.device)[None, :, None]
    out = np.empty((h0, w0), index_dtype(c))
    for y in range(0, h0, rows):
        sl = slice(y, y + rows)
        blend = tmp[:, i0[sl]] * (1 - wt[:, sl]) + tmp[:, i1[sl]] * wt[:, sl]
        out[sl] = to_host_index(blend.clamp_min_(0).argmax(0), c)
    return out


def index_dtype(c: int) -> np.dtype:
    """The narrowest dtype for row indices `< c` (what crosses to the host: uint8 for up to 256 rows)."""
    return np.dtype(np.uint8 if c <= 256 else np.int16 if c <= 32767 else np.int32)


def to_host_index(arg: torch.Tensor, c: int) -> np.ndarray:
    """An argmax over `c` rows -> numpy, narrowed on the device first (1 byte a pixel instead of 8 for int64)."""
    return arg.to({np.dtype(np.uint8): torch.uint8, np.dtype(np.int16): torch.int16}.get(index_dtype(c),
                                                                                          torch.int32)).cpu().numpy()


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
        self._prefilter = PreFilter(bank, classifier)
        self._thresholds: dict = {}  # (extractor, stuff class) -> `self` stuff-filter threshold
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
    @property
    def prompts_encoded(self) -> int:
        """Text-encoder inputs so far (pre-filter cache misses)."""
        return self._prefilter.prompts_encoded

    def text_embeddings(self, prompts: list[str]) -> np.ndarray:
        """`[P, E]` text embeddings, cached per prompt (LRU, 100k prompts)."""
        return self._prefilter.text_embeddings(prompts)

    def prefilter(self, image: torch.Tensor, ids: list[int]) -> list[int]:
        """OVDIFF.md 6.2: `image [3, H, W]` -> kept class ids (stuff always kept)."""
        return self.prefilter_batch([image], ids)[0]

    def prefilter_batch(self, images: list[torch.Tensor], ids: list[int]) -> list[list[int]]:
        """`images [3, H, W]` each -> kept class ids per image; one image-encoder pass for all of them."""
        return [s.kept for s in self._prefilter(images, ids)]

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
        """Kept classes' fg rows (segment layout) and background rows (the kept things', stuff-filtered), cached
        (LRU, 64)."""
        key = (ex, tuple(kept), sw.background, sw.stuff_filter, sw.class_mean_only, sw.stuff_filter_self)
        if key in self._gather_cache:
            self._gather_cache.move_to_end(key)
            return self._gather_cache[key]
        g = gather(self.bank, ex, kept, background=sw.background, stuff_filter=sw.stuff_filter,
                   class_mean_only=sw.class_mean_only, stuff_threshold=self.seg.stuff_threshold,
                   stuff_filter_rule="self" if sw.stuff_filter_self else "fixed", device=self.device,
                   thresholds=self._thresholds)
        self._gather_cache[key] = g
        while len(self._gather_cache) > 64:
            self._gather_cache.popitem(last=False)
        return g

    # -- matching ------------------------------------------------------------------------------------------
    def match(self, feats: torch.Tensor, g: Gathered, chunk: int = 16384) -> torch.Tensor:
        """`feats [B, D, h, w]` -> scores `[B, K + 1, h, w]` (ovdiff_ray.matching.match)."""
        return match(feats, g, chunk)

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
        when it is off over a large vocabulary; then the stuff presence check."""
        t0 = time.perf_counter()
        if sw.prefilter:
            sel = self._prefilter([it.x for it in items], ids, search=None if sw.bounded_search else "exhaustive")
        else:
            sel = [Selection(list(ids), []) for _ in items]
        dt = (time.perf_counter() - t0) / len(items)
        for it, k in zip(items, sel):
            it.kept = k.kept
            it.t["prefilter"] += dt
        if not sw.prefilter and len(ids) > self.seg.retrieval_classes:
            whole: list[dict[str, torch.Tensor]] = [{} for _ in items]
            for ex in exs:
                for batch, f in self._features(ex, items, lambda it: [(0, 0, *it.x.shape[-2:])]):
                    for (i, _), fi in zip(batch, f):
                        whole[i][ex] = fi
            for it, wf in zip(items, whole):
                t0 = time.perf_counter()
                it.kept = self.retrieve(wf, ids, self.seg.retrieval_classes)
                it.t["prefilter"] += time.perf_counter() - t0
        if sw.prefilter and (sw.background_presence or sw.thing_proposals or sw.stuff_presence and any(
                self.bank.kinds[c] == "stuff" for it in items for c in it.kept)):
            self._stuff_presence(items, sw, exs, ids)

    def _propose(self, it: _Item, ids: list[int], exs: list[str]) -> list[int]:
        """Thing classes the pre-filter dropped that the prototypes propose for one item (proposals.py), from the
        whole-image features in `it.whole`."""
        n = len(self.bank.names)
        total = np.zeros((0, n), np.float32)
        for ex in exs:
            index, rows = self._class_index(ex)
            q = cell_queries(it.whole[ex][0], grid_size(*it.x.shape[-2:], self.seg.proposal_grid))
            sims = cell_similarities(index, rows, q, n, max(16, self.seg.thing_proposals * 4))
            total = sims if not len(total) else total + sims
        things = [c for c in ids if self.bank.kinds[c] != "stuff"]
        return propose(total, ids, it.kept, things, self.seg.proposal_min_share, self.seg.thing_proposals,
                       floor=-float(len(exs)))

    def _whole_scores(self, it: _Item, kept: list[int], exs: list[str], sw: Switches) -> torch.Tensor:
        """`[K + 1, h, w]` scores of the whole-image view (features in `it.whole`) for `kept`, summed over
        extractors (each clamped to [-1, 1])."""
        t0 = time.perf_counter()
        acc = torch.zeros(len(kept) + 1, *it.x.shape[-2:], device=self.device)
        for ex in exs:
            sv = self.match(it.whole[ex], self.gather(ex, kept, sw))[0]
            acc += F.interpolate(sv[None], size=acc.shape[-2:], mode="bilinear", align_corners=False)[0].clamp_(-1, 1)
        it.t["prefilter"] += time.perf_counter() - t0
        return acc

    def _recall(self, it: _Item, ids: list[int], exs: list[str], sw: Switches) -> list[int]:
        """Issue 27's recall past the pre-filter (proposals.py): the prototypes propose thing classes the pre-filter
        dropped; each proposal that wins `proposal_min_area` of the whole view (matched with the kept classes) marks
        a region, and the classifier names the region's crop (its best thing class among `ids`); a name the
        pre-filter had not kept is added. Returns the added classes."""
        props = self._propose(it, ids, exs)
        if not props:
            return []
        allk = sorted(set(it.kept) | set(props))
        win = self._whole_scores(it, allk, exs, sw).clamp_min(0).argmax(0)  # [h, w]
        things = [c for c in ids if self.bank.kinds[c] != "stuff"]
        crops = []
        for p in props:
            m = win == allk.index(p) + 1
            if float(m.float().mean()) < self.seg.proposal_min_area:
                continue
            crops.append(it.x[(slice(None),) + region_box(m, self.seg.proposal_context)])
        if not crops:
            return []
        t0 = time.perf_counter()
        named = [things[int(np.argmax(self.bank.text[things] @ e))] for e in self._prefilter.image_embeddings(crops)]
        it.t["prefilter"] += time.perf_counter() - t0
        return sorted(set(named) - set(it.kept))

    def _stuff_presence(self, items: list[_Item], sw: Switches, exs: list[str], ids: list[int]) -> None:
        """The stuff half of the pre-filter (off with it): drop the kept stuff classes that win less than
        `segmentation.stuff_min_area` of the whole-image view (matched with every kept class, scores averaged over
        extractors); the paper keeps every stuff class. The whole-image features are reused by `_accumulate`. The
        same view decides whether background is matched (`segmentation.background_min_area`), and with
        `segmentation.stuff_opening` a stuff class's won area is opened first (precedence.py). With
        `segmentation.thing_proposals` the same view first recalls thing classes the pre-filter dropped
        (`_recall`, proposals.py)."""
        for ex in exs:
            for batch, f in self._features(ex, items, lambda it: [(0, 0, *it.x.shape[-2:])]):
                for (i, _), fi in zip(batch, f):
                    items[i].whole[ex] = fi[None]  # reused by `_accumulate`
        for it in items:
            if sw.thing_proposals:
                it.kept = sorted(set(it.kept) | set(self._recall(it, ids, exs, sw)))
            it.acc = self._whole_scores(it, it.kept, exs, sw)
        for it in items:
            if sw.background_presence:
                margin = self.seg.background_margin if sw.background_margin else 0.0
                it.background = background_present(it.acc, self.seg.background_min_area, margin)
            radius = round(self.seg.stuff_opening * min(it.x.shape[-2:])) if sw.stuff_opening else 0
            share = opened_shares(it.acc.clamp_min(0).argmax(0), len(it.kept) + 1, radius)
            it.kept = [c for j, c in enumerate(it.kept) if not sw.stuff_presence
                       or self.bank.kinds[c] != "stuff" or share[j + 1] >= self.seg.stuff_min_area]
            it.acc = None

    def _view_features(self, ex: str, items: list[_Item]):
        """`_features` over every view of every item, reusing the whole-image features the stuff presence check
        already computed (`item.whole[ex]`)."""
        whole = lambda it: (0, 0, *it.x.shape[-2:])  # noqa: E731
        reuse = lambda it: ex in it.whole and whole(it) in it.views  # noqa: E731
        yield from self._features(ex, items, lambda it: [v for v in it.views if not (reuse(it) and v == whole(it))])
        for i, it in enumerate(items):
            if reuse(it):
                yield [(i, whole(it))], it.whole.pop(ex)

    def _accumulate(self, items: list[_Item], sw: Switches, exs: list[str]) -> None:
        """Scores of every view of every item, upsampled, clamped and summed into `item.acc` / `item.count`."""
        for it in items:
            it.acc = torch.zeros(len(it.kept) + 1, *it.x.shape[-2:], device=self.device)  # [K + 1, h, w]
            it.count = torch.zeros(it.x.shape[-2:], device=self.device)  # [h, w]
        for ex in exs:
            gs = []
            for it in items:
                t0 = time.perf_counter()
                gs.append(self.gather(ex, it.kept, sw if it.background else replace(sw, background=False)))
                it.t["matching"] += time.perf_counter() - t0
            for batch, f in self._view_features(ex, items):
                j = 0
                while j < len(batch):  # runs of views of one item share its gathered prototypes
                    i = batch[j][0]
                    n = next((m for m in range(j, len(batch)) if batch[m][0] != i), len(batch)) - j
                    it = items[i]
                    t0 = time.perf_counter()
                    s = self.match(f[j:j + n], gs[i])
                    t1 = time.perf_counter()
                    it.t["matching"] += t1 - t0
                    for k, ((_, (y0, x0, vh, vw)), sv) in enumerate(zip(batch[j:j + n], s)):
                        if it.kept_feats is not None and (y0, x0, vh, vw) == (0, 0, *it.x.shape[-2:]):
                            it.kept_feats[ex] = f[j + k].clone()
                        up = F.interpolate(sv[None], size=(vh, vw), mode="bilinear", align_corners=False)[0]
                        it.acc[:, y0:y0 + vh, x0:x0 + vw] += up.clamp_(-1, 1)
                        it.count[y0:y0 + vh, x0:x0 + vw] += 1
                    it.t["upsample"] += time.perf_counter() - t1
                    j += n
            need = [it for it in items if it.kept_feats is not None and ex not in it.kept_feats]
            for batch, f in self._features(ex, need, lambda it: [(0, 0, *it.x.shape[-2:])]):  # no whole view
                for (i, _), fi in zip(batch, f):
                    need[i].kept_feats[ex] = fi.clone()

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
        raw = scores  # before snapping (with PAMR after_pamr: after PAMR): for confidence and top-k
        if not before:
            scores = self._snap(it, scores, regions)
        t0 = time.perf_counter()
        h0, w0 = it.h0, it.w0
        conf = topk = None
        if it.want_confidence:  # upsampled and copied to the host only when asked for
            stuff = torch.tensor([False] + [self.bank.kinds[c] == "stuff" for c in it.kept])
            conf = confidence.upsample_confidence(confidence.pixel_confidence(raw, scores, it.fit_scale, stuff), h0, w0)
            values = [0] + [c + 1 for c in it.kept]
            topk = {values[r]: [(values[j], s) for j, s in best]
                    for r, best in confidence.class_topk(raw, scores).items()}
        if return_scores:
            if scores.shape[-2:] != (h0, w0):
                scores = F.interpolate(scores[None], size=(h0, w0), mode="bilinear", align_corners=False)[0]
            scores = scores.clamp_min(0)
            arg = to_host_index(scores.argmax(0), len(scores))  # first maximum: ties go to background (row 0)
        else:
            arg = upsample_argmax(scores, h0, w0)
        labels = np.array([0] + [c + 1 for c in it.kept], np.int32)[arg]
        t["upsample"] += time.perf_counter() - t0
        present = np.unique(labels)
        names = {int(v): ("background" if v == 0 else self.bank.names[v - 1]) for v in present}
        feats = None if it.kept_feats is None else WholeFeatures(tuple(it.x.shape[-2:]), it.kept_feats)
        return SegmentationResult(labels, names, scores.cpu().numpy().astype(np.float32) if return_scores else None,
                                  [self.bank.names[c] for c in it.kept], t, conf, topk, feats)

    # -- the whole thing -----------------------------------------------------------------------------------
    def segment(self, image, classes: list[str] | None = None, pamr: bool = False, ablate: Sequence[str] = (),
                return_scores: bool = False, regions: str | None = None, confidence: bool = True,
                keep_features: bool = False) -> SegmentationResult:
        """One image (`[H, W, 3]` uint8 array or PIL image) -> SegmentationResult at the input size."""
        return self.segment_batch([image], classes, pamr, ablate, return_scores, regions, confidence,
                                  keep_features)[0]

    @torch.no_grad()
    def segment_batch(self, images, classes: list[str] | None = None, pamr: bool = False,
                      ablate: Sequence[str] = (), return_scores: bool = False,
                      regions: str | None = None, confidence: bool | Sequence[bool] = True,
                      keep_features: bool | Sequence[bool] = False) -> list[SegmentationResult]:
        """Several images (any sizes) -> one SegmentationResult each. The pre-filter's image encoder runs once for
        the batch, and views of all images go through each extractor together (`view_batch` per forward pass).
        `regions` overrides the recipe's `segmentation.regions` (none | superpixels | sam | on | off).
        `confidence` (one flag, or one per image): compute `confidence` and `topk` (else None: nothing upsampled or
        copied to the host for them). `keep_features` (likewise): keep the whole-image view's features in
        `result.features` for `explain.explain` (computed in the same passes; no second extractor pass)."""
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
        want = _flags(confidence, len(items), "confidence")
        keep = _flags(keep_features, len(items), "keep_features")
        for it, c, k in zip(items, want, keep):
            it.want_confidence, it.kept_feats = c, ({} if k else None)
        self._keep(items, ids, sw, exs)
        self._accumulate(items, sw, exs)
        scale = _fit_scale(self.bank, exs)  # None for banks built before the record (confidence.py)
        for it in items:
            it.fit_scale = scale
        return [self._finish(it, pamr, return_scores, method) for it in items]


def _flags(x: bool | Sequence[bool], n: int, what: str) -> list[bool]:
    """One flag for every image, or one per image."""
    if isinstance(x, (bool, np.bool_)):
        return [bool(x)] * n
    x = [bool(v) for v in x]
    if len(x) != n:
        raise ValueError(f"{what}: {len(x)} flags for {n} images")
    return x


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
    ap = Parser(prog="ovdiff segment",
                                 description="Segment one image with a bank and write it with the labels overlaid.")
    ap.add_argument("image", help="image file (PNG, JPEG, ...)")
    ap.add_argument("--bank", required=True, help="bank URI (folder or s3://bucket/prefix)")
    ap.add_argument("--classes", default=None, help="comma-separated subset of the bank's classes (default: all)")
    ap.add_argument("--out", required=True, help="output PNG (image + overlay + legend)")
    ap.add_argument("--pamr", action="store_true", help="refine with PAMR")
    ap.add_argument("--regions", choices=("none", "superpixels", "sam"), default=None,
                    help="snap labels to class-agnostic regions (default: the bank recipe's segmentation.regions)")
    ap.add_argument("--ablate", action="append", default=[], help="ablation name (repeatable; default: none)")
    ap.add_argument("--device", default=None, help="torch device for the models, e.g. cpu, cuda, cuda:1 (default: cuda when available, else cpu)")
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
