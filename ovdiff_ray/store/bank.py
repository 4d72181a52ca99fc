"""In-memory bank for matching: class-sorted prototype arrays per extractor with per-class offsets.

`Bank.load(uri)` reads a committed manifest and its shards (sha256 verified); `Bank.from_prototypes` builds the same
structure from `ClassPrototypes` in memory (tests, previews).
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from ..confidence import calibration_array
from ..prototypes import ClassPrototypes
from ..recipe import Recipe, recipe_from_dict

KIND_CODES = {"fg": 0, "bg": 1}
LEVEL_CODES = {"class": 0, "instance": 1, "part": 2}


@dataclass
class BankArrays:
    """Prototypes of one extractor, all classes, sorted by class then (kind, level)."""

    vectors: np.ndarray  # [R, D] float16, unit norm
    class_idx: np.ndarray  # [R] int32: index into Bank.names
    kind: np.ndarray  # [R] uint8: 0 fg, 1 bg
    level: np.ndarray  # [R] uint8: 0 class, 1 instance, 2 part
    offsets: np.ndarray  # [C + 1] int64: rows of class c are offsets[c]:offsets[c+1]
    source: np.ndarray | None = None  # [R] int16: support image of an instance row, -1 pooled (None: not kept)
    members: "Members | None" = None  # a part row's support images (explain.py); None: not recorded
    calibration: np.ndarray | None = None  # [C, 6, Q] float32: each class's fit calibration (confidence.py; nan
    #                                         where a class has none: banks built before it)

    @property
    def dim(self) -> int:
        return int(self.vectors.shape[1])

    def rows_of(self, c: int) -> slice:
        return slice(int(self.offsets[c]), int(self.offsets[c + 1]))


@dataclass
class Members:
    """Part rows' support images, ragged (CSR, so a node's processes can map one copy): row r's are
    `flat[offsets[r]:offsets[r + 1]]` when `state[r] == 1`; 0: none (not a part row); -1: unknown (the row's shard
    was written before part members were recorded)."""

    flat: np.ndarray  # [M] int16 support image indices, most pixels first per row
    offsets: np.ndarray  # [R + 1] int64
    state: np.ndarray  # [R] int8

    @classmethod
    def of(cls, rows: list, unknown: bool | list[bool] = False) -> "Members":
        """`rows`: per row a sequence of support image indices or None; `unknown`: all rows (or per row)."""
        unk = [unknown] * len(rows) if isinstance(unknown, bool) else list(unknown)
        sizes = [0 if m is None or u else len(m) for m, u in zip(rows, unk)]
        flat = [int(i) for m, u in zip(rows, unk) if m is not None and not u for i in m]
        return cls(np.asarray(flat, np.int16), np.concatenate([[0], np.cumsum(sizes)]).astype(np.int64),
                   np.array([-1 if u else (0 if m is None else 1) for m, u in zip(rows, unk)], np.int8))

    @classmethod
    def concat(cls, parts: list["Members"]) -> "Members":
        flat = np.concatenate([p.flat for p in parts]) if parts else np.zeros(0, np.int16)
        offs, base = [np.zeros(1, np.int64)], 0
        for p in parts:
            offs.append(p.offsets[1:] + base)
            base += int(p.offsets[-1])
        state = np.concatenate([p.state for p in parts]) if parts else np.zeros(0, np.int8)
        return cls(flat.astype(np.int16, copy=False), np.concatenate(offs), state)

    def __len__(self) -> int:
        return len(self.state)

    def rows(self, sl: slice) -> list | None:
        """Members of the rows in `sl` (tuple or None per row); None when any of them is unknown."""
        st = self.state[sl]
        if (st < 0).any():
            return None
        idx = range(*sl.indices(len(self.state)))
        return [tuple(int(i) for i in self.flat[self.offsets[r]:self.offsets[r + 1]]) if self.state[r] == 1 else None
                for r in idx]


@dataclass
class Bank:
    bank_id: str
    version: int
    recipe: Recipe
    names: list[str]  # class names in id order (id = index)
    kinds: list[str]  # thing | stuff per class
    text: np.ndarray  # [C, E] float32 unit-norm class text embeddings
    extractors: dict[str, BankArrays]
    manifest: dict = field(default_factory=dict)
    uri: str = ""
    prompts: list[str] = field(default_factory=list)  # per class, the words for prompts (pre-filter text)

    def __post_init__(self):
        """Missing prompts ("" or none) resolve as at build time: the recipe's `prompt_names`, else the name.
        Removed classes (tombstones) and aliases come from the manifest's entries (`store/edits.py`)."""
        given = list(self.prompts) + [""] * (len(self.names) - len(self.prompts))
        self.prompts = [self.recipe.generation.prompt_name(n, p) for n, p in zip(self.names, given)]
        entries = {c["name"]: c for c in (self.manifest or {}).get("classes", [])}
        self.removed = frozenset(i for i, n in enumerate(self.names)
                                 if entries.get(n, {}).get("removed") is not None)
        self.aliases = {a: n for n in self.names for a in entries.get(n, {}).get("aliases", [])}

    @property
    def live(self) -> list[int]:
        """Ids of the classes that are not removed (segmentation only ever considers these)."""
        return [i for i in range(len(self.names)) if i not in self.removed]

    def _folded(self) -> dict[str, int]:
        """Case/space-folded name or alias -> class id (removed classes left out), built once."""
        from ..vocab import fold

        if "_index" not in self.__dict__:
            self._index = {fold(n): i for i, n in enumerate(self.names) if i not in self.removed}
            self._index.update({fold(a): self._index[fold(n)] for a, n in self.aliases.items()
                                if fold(n) in self._index})
        return self._index

    def index(self, name: str) -> int:
        from ..vocab import fold

        return self._folded()[fold(name)]

    def resolve(self, classes: list[str] | None) -> list[int]:
        """Class names -> ids; unknown names raise a KeyError that lists them all."""
        if classes is None:
            return self.live
        from ..vocab import fold

        index = self._folded()
        unknown = [c for c in classes if fold(c) not in index]
        if unknown:
            raise KeyError(f"unknown classes (not in bank {self.bank_id} v{self.version}): {', '.join(unknown)}")
        return sorted({index[fold(c)] for c in classes})

    @classmethod
    def from_prototypes(cls, protos: list[ClassPrototypes], recipe: Recipe, bank_id: str = "memory",
                        version: int = 0) -> "Bank":
        names = [p.name for p in protos]
        kinds = [p.kind for p in protos]
        text = np.stack([p.text for p in protos]).astype(np.float32) if protos else np.zeros((0, 0), np.float32)
        ex_names = [e.name for e in recipe.extractors]
        arrays = {}
        for ex in ex_names:
            vecs, cidx, kind, level, offsets, source, members = [], [], [], [], [0], [], []
            for c, p in enumerate(protos):
                s = p.sets.get(ex)
                n = 0 if s is None else len(s)
                if n:
                    vecs.append(s.vectors.astype(np.float16))
                    cidx.append(np.full(n, c, np.int32))
                    kind.append(np.array([KIND_CODES[k] for k in s.kind], np.uint8))
                    level.append(np.array([LEVEL_CODES[v] for v in s.level], np.uint8))
                    source.append(np.asarray(s.source, np.int16))
                    members += list(s.members) if s.members is not None else [None] * n
                offsets.append(offsets[-1] + n)
            dim = next((p.sets[ex].dim for p in protos if ex in p.sets), 0)
            arrays[ex] = BankArrays(
                vectors=np.concatenate(vecs) if vecs else np.zeros((0, dim), np.float16),
                class_idx=np.concatenate(cidx) if cidx else np.zeros(0, np.int32),
                kind=np.concatenate(kind) if kind else np.zeros(0, np.uint8),
                level=np.concatenate(level) if level else np.zeros(0, np.uint8),
                offsets=np.array(offsets, np.int64),
                source=np.concatenate(source) if source else np.zeros(0, np.int16),
                members=Members.of(members),
                calibration=np.stack([calibration_array(p.sets[ex].calibration if ex in p.sets else None)
                                      for p in protos]) if protos else None,
            )
        return cls(bank_id, version, recipe, names, kinds, text, arrays, prompts=[p.prompt for p in protos])

    @classmethod
    def load(cls, uri: str, version: int | None = None, classes: list[str] | None = None,
             storage_options: dict | None = None) -> "Bank":
        """Load a committed bank (latest or `version`), all classes or only `classes`; shards sha256-verified."""
        from .shards import load_bank

        return load_bank(uri, version=version, classes=classes, storage_options=storage_options)

    @staticmethod
    def recipe_of(manifest: dict) -> Recipe:
        return recipe_from_dict(manifest["recipe"], f"manifest v{manifest.get('version')}")
