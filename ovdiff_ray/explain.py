"""Provenance of a segmentation (issue 21, the paper's "explainable predictions"): for each class in a result, the
prototypes that won most of its pixels, and the support images they came from.

For every extractor, the image's whole-view features are matched against the rows of each labelled class (its
foreground rows; for background, the background rows of the kept thing classes); each pixel of the class goes to
its most similar row, and rows are ranked by the share of the class's pixels they won (shares of one extractor sum
to 1 over its rows; each extractor is reported on its own). A row names its level (class / instance / part), its
extractor and its support images:

- instance rows: the one support image (`source`) they are the mean of;
- part rows: the support images whose pixels are nearest their k-means centre (recorded at build time; a bank built
  before that says so in `note`);
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
    """Part rows' support images: from an in-memory bank's arrays, or read once per class from a stored bank's
    shard (`members` column; None when the shard predates it)."""

    def __init__(self, bank):
        self.bank = bank
        self._cache: dict[tuple[str, int], list | None] = {}

    def __call__(self, ex: str, c: int) -> list | None:
        """Members per row of class `c` in extractor `ex` (bank row order of the class), or None."""
        a = self.bank.extractors[ex]
        if a.members is not None:
            return list(a.members[a.rows_of(c)])
        key = (ex, c)
        if key not in self._cache:
            self._cache[key] = self._read(ex, c)
        return self._cache[key]

    def _read(self, ex: str, c: int) -> list | None:
        import pyarrow as pa
        import pyarrow.parquet as pq

        from .store.fs import Location
        from .store.shards import read_shard_bytes

        if not self.bank.uri:
            return None
        entry = next((e for e in self.bank.manifest.get("classes", []) if e["name"] == self.bank.names[c]), None)
        if entry is None:
            return None
        t = pq.read_table(pa.BufferReader(read_shard_bytes(Location(self.bank.uri), entry)))
        if "members" not in t.column_names:
            return None
        exs = t.column("extractor").to_numpy(zero_copy_only=False)
        return [None if m is None else tuple(m) for m, e in zip(t.column("members").to_pylist(), exs) if e == ex]


@torch.no_grad()
def explain(seg, image, result, top: int = 3, members: MembersReader | None = None) -> dict[int, ClassExplanation]:
    """`seg` a Segmenter, `image` what was segmented, `result` its SegmentationResult -> per label value present, the
    `top` rows that won most of its pixels for each extractor (ranked by share)."""
    from .serve.engine import upscale_labels

    bank = seg.bank
    members = members or MembersReader(bank)
    it = seg._prepare(image)
    x = it.x
    h, w = x.shape[-2:]
    lab = torch.from_numpy(upscale_labels(np.asarray(result.labels), w, h).astype(np.int64))
    kept = [bank.index(n) for n in result.kept]
    values = [int(v) for v in np.unique(lab.numpy())]
    out = {v: ClassExplanation(result.classes.get(v, "background" if v == 0 else bank.names[v - 1]),
                               int((lab == v).sum())) for v in values}
    for ex, e in seg.extractors.items():
        a = bank.extractors[ex]
        size = seg._view_size(ex, h, w)
        crop = x[None] if size == (h, w) else F.interpolate(x[None], size=size, mode="bilinear", align_corners=False)
        f = e(crop).float()[0]  # [D, fh, fw]
        d, fh, fw = f.shape
        flat = f.reshape(d, -1)
        for v in values:
            if v == 0:
                rows = np.concatenate([np.arange(*a.rows_of(c).indices(len(a.vectors)))[
                    a.kind[a.rows_of(c)] == 1] for c in kept if bank.kinds[c] == "thing"] or [np.zeros(0, np.int64)])
            else:
                r = np.arange(*a.rows_of(v - 1).indices(len(a.vectors)))
                rows = r[a.kind[r] == 0]
            if not len(rows):
                continue
            vec = torch.from_numpy(np.asarray(a.vectors[rows], np.float32))
            best = (vec @ flat).argmax(0).reshape(1, 1, fh, fw).float()
            best = F.interpolate(best, size=(h, w), mode="nearest")[0, 0].long()
            m = lab == v
            counts = torch.bincount(best[m], minlength=len(rows)).numpy()
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
