"""Pre-filter (OVDIFF.md 6.2, issue 12 points 4-5) with a stub encoder of fixed vectors, against a plain
re-implementation: softmax over raw cosines to each thing's text embedding, candidates p >= 1/K (class order; more
than max_candidates: the most probable, in descending order, as the authors' torch.topk), every subset as the prompt
"a X and a Y ..." with the classes' prompt words, the best subset kept, stuff always kept."""
from __future__ import annotations

import hashlib
import itertools

import numpy as np
import pytest
import torch

from ovdiff_ray.prototypes import ClassPrototypes, ProtoSet
import dataclasses

from ovdiff_ray.recipe import load_recipe
from ovdiff_ray.segment import Segmenter
from ovdiff_ray.store.bank import Bank

DIM = 32


class StubEncoder:
    """Fixed image vector; class prompts get fixed vectors, any other prompt a vector from its sha256. Records
    every prompt it is asked for."""

    dim = DIM

    def __init__(self, image_vec: np.ndarray, class_vecs: dict[str, np.ndarray]):
        self.image_vec, self.class_vecs, self.asked = image_vec, class_vecs, []

    def vec(self, prompt: str) -> np.ndarray:
        if prompt in self.class_vecs:
            return self.class_vecs[prompt]
        seed = int.from_bytes(hashlib.sha256(prompt.encode()).digest()[:8], "little")
        v = np.random.default_rng(seed).normal(size=DIM)
        return (v / np.linalg.norm(v)).astype(np.float32)

    def encode_text(self, prompts):
        self.asked += list(prompts)
        return np.stack([self.vec(p) for p in prompts]).astype(np.float32) if prompts else np.zeros((0, DIM))

    def encode_image(self, images):
        return np.repeat(self.image_vec[None], len(images), 0)


def make_bank(recipe, names, kinds, prompts, texts):
    rng = np.random.default_rng(0)
    protos = []
    for n, k, p, t in zip(names, kinds, prompts, texts):
        sets = {}
        for e in recipe.extractors:
            v = rng.normal(size=(2, 28)).astype(np.float32)
            v /= np.linalg.norm(v, axis=1, keepdims=True)
            sets[e.name] = ProtoSet(v, np.array(["fg", "bg"], object), np.array(["class", "class"], object),
                                    np.array([-1, -1], np.int16))
        protos.append(ClassPrototypes(n, k, sets, t, prompt=p))
    return Bank.from_prototypes(protos, recipe)


def ref_prefilter(bank, enc, image_vec, max_candidates, template="a {name}"):
    things = [c for c in range(len(bank.names)) if bank.kinds[c] == "thing"]
    stuff = [c for c in range(len(bank.names)) if bank.kinds[c] == "stuff"]
    cos = [float(np.dot(bank.text[c], image_vec)) for c in things]
    ex = [np.exp(x - max(cos)) for x in cos]
    p = [x / sum(ex) for x in ex]
    passed = [i for i in range(len(things)) if p[i] >= 1 / len(things) - 1e-12]
    if len(passed) > max_candidates:
        passed = sorted(passed, key=lambda i: (-p[i], i))[:max_candidates]
    cands = [things[i] for i in passed]
    words = {c: bank.prompts[c] for c in cands}
    subsets, prompts = [], []
    for r in range(1, len(cands) + 1):
        for s in itertools.combinations(cands, r):
            subsets.append(s)
            prompts.append(" and ".join(template.format(name=words[c]) for c in s))
    scores = [float(np.dot(enc.vec(q), image_vec)) for q in prompts]
    best = subsets[int(np.argmax(scores))]
    return cands, prompts, sorted(list(best) + stuff)


@pytest.mark.parametrize("case", ["few", "many"])
def test_prefilter_matches_reference(case):
    rng = np.random.default_rng(11 if case == "few" else 12)
    recipe = load_recipe("toy")
    # the paper's pre-filter (exhaustive subset search); toy.yaml's bounded search has its own tests
    recipe = dataclasses.replace(recipe, segmentation=dataclasses.replace(recipe.segmentation,
                                                                          subset_search="exhaustive"))
    k_things = 14
    names = [f"class {i}" for i in range(k_things)] + ["stuff a", "stuff b"]
    kinds = ["thing"] * k_things + ["stuff"] * 2
    prompts = [f"thing number {i}" if i % 3 == 0 else "" for i in range(k_things)] + ["", ""]
    e = rng.normal(size=DIM)
    e /= np.linalg.norm(e)
    # cosines: "few" spread (about half pass 1/K), "many": 12 close together above 2 low ones (> 10 pass)
    if case == "few":
        a = rng.uniform(-0.5, 0.9, k_things)
    else:
        a = np.concatenate([rng.uniform(0.55, 0.6, 12), [-0.9, -0.95]])
        rng.shuffle(a)
    texts = []
    for ai in list(a) + [0.1, 0.2]:
        u = rng.normal(size=DIM)
        u -= u.dot(e) * e
        u /= np.linalg.norm(u)
        texts.append((ai * e + np.sqrt(1 - ai ** 2) * u).astype(np.float32))
    words = [p or n for n, p in zip(names, prompts)]
    enc = StubEncoder(e.astype(np.float32), {f"a {w}": t for w, t in zip(words, texts)})
    bank = make_bank(recipe, names, kinds, prompts, texts)
    assert bank.prompts == words
    from ovdiff_ray.models import build_extractors

    seg = Segmenter(bank, build_extractors(recipe, "cpu"), enc, "cpu")
    image = torch.rand(3, 64, 64)
    enc.asked.clear()
    kept = seg.prefilter(image, list(range(len(names))))
    cands, ref_prompts, ref_kept = ref_prefilter(bank, enc, e, recipe.segmentation.max_candidates)
    assert kept == ref_kept
    assert len(enc.asked) == 2 ** len(cands) - 1
    assert set(enc.asked) == set(ref_prompts)  # the same candidates, in the same order, with prompt words
    parts = {part for q in enc.asked for part in q.split(" and ")}
    assert not any(f"a class {i}" in parts for i in range(0, k_things, 3))  # bank names of classes with prompts
    if case == "few":
        assert 2 <= len(cands) < 10 and cands == sorted(cands)  # class order
    else:  # 12 pass 1/K: the 10 most probable, in descending probability
        cos = [float(bank.text[c] @ e) for c in cands]
        assert len(cands) == 10 and cos == sorted(cos, reverse=True) and cands != sorted(cands)
