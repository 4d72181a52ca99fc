"""The classifier pre-filter (OVDIFF.md 6.2): an image -> the bank classes worth matching.

Paper: softmax over the raw cosines of the image embedding to each thing class's text embedding; candidates =
classes with `p >= 1/K`, at most `max_candidates` of the most probable; every non-empty subset of the candidates is
scored as the prompt "a X and a Y and ..." and the best-scoring subset is kept; stuff classes are always kept.

Switches beyond the paper (recipe `segmentation.*`, off in paper.yaml):

- `subset_search`: `exhaustive` (the paper: 2^n - 1 prompts), `greedy` (grow the subset one candidate at a time
  while the score improves: at most n(n+1)/2 prompts) or `beam` (the same with `subset_beam` subsets per size);
  with at most `subset_exhaustive_upto` candidates the bounded searches are the exhaustive one.

Counters: `prompts_scored` (subset prompts compared with the image) and `prompts_encoded` (text-encoder inputs:
the cache misses).
"""
from __future__ import annotations

import itertools
from collections import OrderedDict
from dataclasses import dataclass
from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F

from .models.base import Classifier
from .recipe import Recipe
from .store.bank import Bank

SUBSET_SEARCHES = ("exhaustive", "greedy", "beam")


def candidates(p: np.ndarray, max_candidates: int) -> list[int]:
    """Positions of `p [K]` (a softmax) that pass `p >= 1/K`, most probable first, at most `max_candidates`."""
    floor = 1.0 / len(p) - 1e-12
    order = [int(i) for i in np.argsort(-p, kind="stable") if p[i] >= floor]
    return order[:max_candidates]


def exhaustive_subsets(cands: Sequence[int]) -> list[tuple[int, ...]]:
    """Every non-empty subset of `cands`, by size then lexicographically."""
    return [s for r in range(1, len(cands) + 1) for s in itertools.combinations(cands, r)]


@dataclass
class Selection:
    """The pre-filter's answer for one image."""

    kept: list[int]  # bank ids kept (sorted)
    ranked: list[int]  # every thing class asked for, most probable first


class PreFilter:
    """Kept classes per image from a classifier's image and text embeddings (text embeddings cached, LRU)."""

    def __init__(self, bank: Bank, classifier: Classifier, recipe: Recipe | None = None, cache_size: int = 100_000):
        self.bank = bank
        self.recipe = recipe or bank.recipe
        self.classifier = classifier
        self.cache_size = cache_size
        self._text_cache: OrderedDict[str, np.ndarray] = OrderedDict()
        self.prompts_encoded = 0
        self.prompts_scored = 0

    @property
    def seg(self):
        return self.recipe.segmentation

    # -- text ----------------------------------------------------------------------------------------------
    def text_embeddings(self, prompts: list[str]) -> np.ndarray:
        """`[P, E]` text embeddings, cached per prompt (LRU, `cache_size` prompts)."""
        todo = [p for p in dict.fromkeys(prompts) if p not in self._text_cache]
        for i in range(0, len(todo), 256):
            chunk = todo[i:i + 256]
            for p, v in zip(chunk, np.asarray(self.classifier.encode_text(chunk), np.float32)):
                self._text_cache[p] = v
        self.prompts_encoded += len(todo)
        for p in prompts:
            self._text_cache.move_to_end(p)
        while len(self._text_cache) > self.cache_size:
            self._text_cache.popitem(last=False)
        if not prompts:
            return np.zeros((0, getattr(self.classifier, "dim", 0)), np.float32)
        return np.stack([self._text_cache[p] for p in prompts])

    def prompt(self, subset: Sequence[int]) -> str:
        tmpl = self.recipe.classifier.text_template
        return " and ".join(tmpl.format(name=self.bank.prompts[c]) for c in subset)

    def _scores(self, subsets: list[tuple[int, ...]], e: np.ndarray) -> np.ndarray:
        self.prompts_scored += len(subsets)
        return self.text_embeddings([self.prompt(s) for s in subsets]) @ e

    # -- images --------------------------------------------------------------------------------------------
    def image_embeddings(self, images: list[torch.Tensor]) -> np.ndarray:
        """`images [3, H, W]` each -> `[B, E]`, one encoder pass at the classifier's image size."""
        size = self.recipe.classifier.image_size
        x = torch.cat([F.interpolate(im[None], size=(size, size), mode="bilinear", align_corners=False,
                                     antialias=True) for im in images])  # [B, 3, S, S]
        return np.asarray(self.classifier.encode_image(x), np.float32)

    def __call__(self, images: list[torch.Tensor], ids: list[int], search: str | None = None) -> list[Selection]:
        """One Selection per image: kept bank ids (sorted; stuff always kept here, see `segment.stuff_presence`)
        and every thing class of `ids`, most probable first. `search` overrides `segmentation.subset_search`."""
        things = [c for c in ids if self.bank.kinds[c] != "stuff"]
        stuff = [c for c in ids if self.bank.kinds[c] == "stuff"]
        if not things:
            return [Selection(list(ids), []) for _ in images]
        out = []
        for e in self.image_embeddings(images):
            kept, ranked = self.select(e, things, search)
            out.append(Selection(sorted(kept + stuff), ranked))
        return out

    def select(self, e: np.ndarray, things: list[int], search: str | None = None) -> tuple[list[int], list[int]]:
        """(thing classes kept for one image embedding `e [E]`: candidates, then the subset search; `things` most
        probable first)."""
        cos = self.bank.text[things] @ e
        p = np.exp(cos - cos.max())
        p /= p.sum()
        ranked = [things[i] for i in np.argsort(-p, kind="stable")]
        # as the authors' CLIPClassifierThresh: candidates in class order; when more than max_candidates pass, the
        # most probable, in descending probability order (torch.topk). Subset prompts keep this order.
        passed = candidates(p, len(p))
        if len(passed) > self.seg.max_candidates:
            cands = [things[i] for i in passed[: self.seg.max_candidates]]
        else:
            cands = [things[i] for i in sorted(passed)]
        if not cands:
            return [], ranked
        return sorted(self.search(cands, e, search)), ranked

    def search(self, cands: list[int], e: np.ndarray, how: str | None = None) -> tuple[int, ...]:
        """The best-scoring subset of `cands` under `how` (default `segmentation.subset_search`); a bounded
        search over at most `segmentation.subset_exhaustive_upto` candidates is the exhaustive one."""
        how = how or self.seg.subset_search
        if how not in SUBSET_SEARCHES:
            raise ValueError(f"subset_search: {how!r} is not one of {', '.join(SUBSET_SEARCHES)}")
        if how == "exhaustive" or len(cands) <= max(1, self.seg.subset_exhaustive_upto):
            subsets = exhaustive_subsets(cands)
            return subsets[int(np.argmax(self._scores(subsets, e)))]
        return self.beam_search(cands, e, 1 if how == "greedy" else max(1, self.seg.subset_beam))

    def beam_search(self, cands: list[int], e: np.ndarray, beam: int) -> tuple[int, ...]:
        """Grow subsets one candidate at a time, keeping the `beam` best per size; stop when no subset of the next
        size beats the best so far. Ties keep the earlier (smaller, lexicographically first) subset, as the
        exhaustive search does. With `beam >= C(n, n/2)` this is the exhaustive search."""
        frontier: list[tuple[int, ...]] = [()]
        best, best_score = None, -np.inf
        for _ in range(len(cands)):
            grown = sorted({tuple(sorted(s + (c,))) for s in frontier for c in cands if c not in s})
            if not grown:
                break
            scores = self._scores(grown, e)
            order = np.argsort(-scores, kind="stable")[:beam]
            if scores[order[0]] <= best_score:
                break
            best, best_score = grown[int(order[0])], float(scores[order[0]])
            frontier = [grown[int(i)] for i in order]
        return best
