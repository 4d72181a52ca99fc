"""Helpers and tolerances of the GPU tier (see conftest.py)."""
from __future__ import annotations

import numpy as np

LABEL_AGREEMENT = 0.99
SCORE_MAD = {"fp32": 0.01, "fp16": 0.02}
PROTO_COS = {"fp32": 0.99, "fp16": 0.98}
VOCAB = str(__import__("pathlib").Path(__file__).resolve().parents[2] / "bank" / "vocab" / "toy.tsv")


def agreement(a: np.ndarray, b: np.ndarray) -> float:
    assert a.shape == b.shape, (a.shape, b.shape)
    return float((a == b).mean())


def toy_scenes(n: int = 3, size: int = 128, seed: int = 0) -> list[np.ndarray]:
    from ovdiff_ray.models import toy
    from ovdiff_ray.vocab import load_vocab

    v = load_vocab(VOCAB)
    return [toy.make_scene(v.names, [c.kind for c in v.classes], np.random.default_rng(seed + s), size)[0]
            for s in range(n)]


def write_bank(root, protos, recipe, bank_id: str) -> str:
    """A committed bank in a local folder (shards + manifest), without Ray."""
    from ovdiff_ray.store.fs import Location
    from ovdiff_ray.store.shards import commit_manifest, new_manifest, write_shard

    loc = Location(str(root))
    entries = [write_shard(loc, p, i).to_entry() for i, p in enumerate(protos)]
    commit_manifest(loc, new_manifest(bank_id, 1, recipe.to_dict(), entries))
    return str(root)
