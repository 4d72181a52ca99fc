"""Provenance of a segmentation (issue 21, the paper's "explainable predictions"): for each class in a result, the
prototypes that won most of its pixels, and the support images they came from.

For every extractor, the image's whole-view features are matched against the rows of each labelled class (its
foreground rows; for background, the background rows of the kept thing classes); each pixel of the class goes to
its most similar row, and rows are ranked by the share of the class's pixels they won (shares of one extractor sum
to 1 over its rows; each extractor is reported on its own). A row names its level (class / instance / part), its
extractor and its support images:

- instance rows: the one support image (`source`) they are the mean of;
- part rows: the support images whose pixels are nearest their k-means centre (recorded at build time, loaded with
  the bank; a bank built before that says so in `note`);
- class rows: every kept support image (`pooled`).

Support images are named by index and by the seed they were drawn from (`models.base.image_seed(recipe seed, class
name, index)`), which redraws them exactly; in JSON seeds are decimal strings (63-bit: a JavaScript number would
round them). Banks do not keep their support images (thumbnails) yet.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F

from .labelmaps import upscale_labels
from .models.base import image_seed
from .store.bank import LEVEL_CODES

LEVEL_NAMES = {v: k for k, v in LEVEL_CODES.items()}
MAX_NAMED = 8  # support images named per prototype in JSON (most pixels first); `support_count` says how many
NO_MEMBERS = "this bank was built before part prototypes recorded their support images: parts name none"


@dataclass
class Winner:
    """One prototype row and the share of a class's pixels it won (for its extractor)."""

    extractor: str
    level: str  # class | instance | part
    kind: str  # fg | bg
    owner: str  # the class whose prototype it is (for background rows: whose background)
    row: int  # row in the bank's arrays of this extractor
    share: float
    support: list[int] | None  # support image indices; None = pooled over all (class rows) or unknown
    seeds: list[int] | None = None

    def to_dict(self) -> dict:
        n = None if self.support is None else len(self.support)
        d = {"extractor": self.extractor, "level": self.level, "kind": self.kind, "class": self.owner,
             "share": round(self.share, 4), "support": None if n is None else self.support[:MAX_NAMED],
             "seeds": None if n is None else [str(x) for x in self.seeds[:MAX_NAMED]], "support_count": n}
        if self.level == "class":
            d["pooled"] = True
        return d


@dataclass
class ClassExplanation:
    name: str
    pixels: int
    prototypes: list[Winner] = field(default_factory=list)
    note: str | None = None

    def to_dict(self) -> dict:
        d = {"name": self.name, "pixels": self.pixels, "prototypes": [w.to_dict() for w in self.prototypes]}
        if self.note:
            d["note"] = self.note
        return d


class MembersReader:
    """Part rows' support images, from the bank's `members` (loaded once with the bank: never read from storage
    per request). None for a class whose shard was written before part members were recorded."""

    def __init__(self, bank):
        self.bank = bank

    def __call__(self, ex: str, c: int) -> list | None:
        """Members per row of class `c` in extractor `ex` (bank row order of the class), or None."""
        a = self.bank.extractors[ex]
        return None if a.members is None else a.members.rows(a.rows_of(c))


def whole_features(seg, image):
    """The whole-image view's features of every extractor, as `Segmenter.segment_batch(keep_features=True)` keeps
    them (one pass per extractor: for results segmented without `keep_features`)."""
    from .segment import WholeFeatures

    x = seg._prepare(image).x
    h, w = x.shape[-2:]
    feats = {}
    for ex, e in seg.extractors.items():
        size = seg._view_size(ex, h, w)
        crop = x[None] if size == (h, w) else F.interpolate(x[None], size=size, mode="bilinear", align_corners=False,
                                                            antialias=size[0] < h)
        feats[ex] = e(crop).float()[0]
    return WholeFeatures((h, w), feats)


@torch.no_grad()
def explain(seg, image, result, top: int = 3, members: MembersReader | None = None) -> dict[int, ClassExplanation]:
    """`seg` a Segmenter, `image` what was segmented, `result` its SegmentationResult -> per label value present, the
    `top` rows that won most of its pixels for each extractor (ranked by share).

    Uses the whole-image features the segmentation kept (`segment_batch(..., keep_features=True)`; otherwise one
    extractor pass here) and works on their device: only the per-row pixel counts come back to the host."""
    bank = seg.bank
    members = members or MembersReader(bank)
    whole = result.features if result.features is not None else whole_features(seg, image)
    h, w = whole.size
    lab_np = upscale_labels(np.asarray(result.labels), w, h).astype(np.int64)  # [h, w] at the short side
    kept = [bank.index(n) for n in result.kept]
    values = [int(v) for v in np.unique(lab_np)]
    out = {v: ClassExplanation(result.classes.get(v, "background" if v == 0 else bank.names[v - 1]),
                               int((lab_np == v).sum())) for v in values}
    for ex in [e for e in seg.extractors if e in whole.feats]:
        a = bank.extractors[ex]
        f = whole.feats[ex].float()  # [D, fh, fw] on the segmenter's device
        dev = f.device
        d, fh, fw = f.shape
        flat = f.reshape(d, -1)
        lab = torch.from_numpy(lab_np).to(dev)
        for v in values:
            if v == 0:
                rows = np.concatenate([np.arange(*a.rows_of(c).indices(len(a.vectors)))[
                    a.kind[a.rows_of(c)] == 1] for c in kept if bank.kinds[c] == "thing"] or [np.zeros(0, np.int64)])
            else:
                r = np.arange(*a.rows_of(v - 1).indices(len(a.vectors)))
                rows = r[a.kind[r] == 0]
            if not len(rows):
                continue
            vec = torch.from_numpy(np.asarray(a.vectors[rows], np.float32)).to(dev)
            best = (vec @ flat).argmax(0).reshape(1, 1, fh, fw).float()
            best = F.interpolate(best, size=(h, w), mode="nearest")[0, 0].long()
            counts = torch.bincount(best[lab == v], minlength=len(rows)).cpu().numpy()
            total = max(int(counts.sum()), 1)
            for j in np.argsort(-counts, kind="stable")[:top]:
                if counts[j] == 0:
                    break
                out[v].prototypes.append(_winner(bank, ex, int(rows[j]), counts[j] / total, members, out[v]))
    for v, ce in out.items():
        ce.prototypes.sort(key=lambda w: -w.share)
    return out


def _winner(bank, ex: str, row: int, share: float, members: MembersReader, ce: ClassExplanation) -> Winner:
    a = bank.extractors[ex]
    c = int(a.class_idx[row])
    level = LEVEL_NAMES[int(a.level[row])]
    name = bank.names[c]
    support: list[int] | None = None
    if level == "instance":
        if a.source is not None and int(a.source[row]) >= 0:
            support = [int(a.source[row])]
    elif level == "part":
        per_row = members(ex, c)
        if per_row is None:
            ce.note = NO_MEMBERS
        else:
            m = per_row[row - a.rows_of(c).start]
            support = None if m is None else [int(i) for i in m]
    seeds = [image_seed(bank.recipe.seed, name, i) for i in support] if support is not None else None
    return Winner(ex, level, "fg" if int(a.kind[row]) == 0 else "bg", name, row, float(share), support, seeds)
