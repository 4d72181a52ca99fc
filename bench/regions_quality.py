"""Toy-world mIoU of label snapping to regions (`segmentation.regions`), every variant on the same bank and scenes.

A toy vocabulary is drawn at random from the toy words (`--vocab-seed`; `--classes N` things and stuff in the toy.tsv
proportion, or `--classes all` = the 48 things + `--stuff` stuff), its bank built in memory with the toy recipe, and
`--scenes` scenes written as `ovdiff toy-scenes --seed S` writes them. Each variant is the toy recipe with
`segmentation.*` keys changed (`--variant name:key=value,key=value`; defaults below), and is reported as one line:

    variant: mIoU <absent-as-zero> nanmean <nanmean> delta <vs the first variant> s/img <seconds per image>

    python bench/regions_quality.py --classes 10 --vocab-seed 7 --scenes 40 --scene-seed 1234
    python bench/regions_quality.py --classes all --vocab-seed 7 --scenes 40 --scene-seed 1234 --pamr both
"""
from __future__ import annotations

import argparse
import copy
import os
import sys
import tempfile
import time
import warnings

import numpy as np

warnings.filterwarnings("ignore")
os.environ.setdefault("OVDIFF_CACHE", os.path.join(tempfile.gettempdir(), "ovdiff-bench-cache"))

from ovdiff_ray.evaluate import confusion, miou  # noqa: E402
from ovdiff_ray.models import toy  # noqa: E402
from ovdiff_ray.recipe import load_recipe  # noqa: E402
from ovdiff_ray.segment import Segmenter  # noqa: E402
from ovdiff_ray.store.bank import Bank  # noqa: E402

DEFAULT_VARIANTS = [
    "none:regions=none",
    "superpixels-vote:regions=superpixels,regions_mode=vote",
    "superpixels-mean:regions=superpixels,regions_mode=mean",
]


def draw_vocab(n: str, seed: int, n_stuff_all: int) -> list[tuple[str, str]]:
    """(name, kind) pairs: `n` classes (a fifth of them stuff, as in toy.tsv) or `all` things + `n_stuff_all` stuff."""
    rng = np.random.default_rng(seed)
    things = [f"{c} {s}" for c in toy.COLOURS for s in toy.SHAPES]
    stuff = [f"{c} {t}" for c in toy.COLOURS for t in toy.TEXTURES]
    if n == "all":
        picked_t, picked_s = things, list(rng.choice(stuff, n_stuff_all, replace=False))
    else:
        k = int(n)
        n_s = max(1, round(k / 5))
        picked_t = list(rng.choice(things, k - n_s, replace=False))
        picked_s = list(rng.choice(stuff, n_s, replace=False))
    return [(str(x), "thing") for x in picked_t] + [(str(x), "stuff") for x in picked_s]


def scenes(vocab: list[tuple[str, str]], n: int, seed: int, size: int = 128):
    """The scenes `ovdiff toy-scenes --seed seed --n n` writes for this vocabulary: (image, labels) pairs."""
    rng = np.random.default_rng(seed)
    names, kinds = [v[0] for v in vocab], [v[1] for v in vocab]
    return [toy.make_scene(names, kinds, np.random.default_rng(rng.integers(2**63)), size) for _ in range(n)]


def parse_variant(text: str) -> tuple[str, dict]:
    name, _, body = text.partition(":")
    kv = {}
    for part in filter(None, body.split(",")):
        k, _, v = part.partition("=")
        kv[k.strip()] = yaml_value(v.strip())
    return name, kv


def yaml_value(v: str):
    import yaml

    return yaml.safe_load(v)


def apply(recipe, kv: dict):
    r = copy.deepcopy(recipe)
    for key, value in kv.items():
        obj = r.segmentation
        *path, last = key.split(".")
        for p in path:
            obj = getattr(obj, p)
        if not hasattr(obj, last):
            raise SystemExit(f"unknown segmentation key {key!r}")
        setattr(obj, last, value)
    return r


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--classes", default="10", help="number of classes, or `all` (48 things + --stuff stuff)")
    ap.add_argument("--stuff", type=int, default=12)
    ap.add_argument("--vocab-seed", type=int, default=7)
    ap.add_argument("--scenes", type=int, default=40)
    ap.add_argument("--scene-seed", type=int, default=1234)
    ap.add_argument("--pamr", choices=("off", "on", "both"), default="off")
    ap.add_argument("--variant", action="append", default=None, help="name:key=value,... (repeatable)")
    a = ap.parse_args(argv)
    from ovdiff_ray.sample import SamplingModels, sample_class

    recipe = load_recipe("toy")
    recipe.segmentation.regions = "none"
    vocab = draw_vocab(a.classes, a.vocab_seed, a.stuff)
    t0 = time.perf_counter()
    models = SamplingModels.load(recipe, "cpu")
    protos = [sample_class(n, recipe, models, kind=k) for n, k in vocab]
    print(f"vocab: {len(vocab)} classes (seed {a.vocab_seed}): {', '.join(n for n, _ in vocab[:12])}"
          f"{', ...' if len(vocab) > 12 else ''}", flush=True)
    print(f"bank_build_s: {time.perf_counter() - t0:.1f}", flush=True)
    data = scenes(vocab, a.scenes, a.scene_seed)
    names = [n for n, _ in vocab]
    variants = [parse_variant(v) for v in (a.variant or DEFAULT_VARIANTS)]
    pamrs = {"off": [False], "on": [True], "both": [False, True]}[a.pamr]
    base = None
    for pamr in pamrs:
        for name, kv in variants:
            seg = Segmenter.from_bank(Bank.from_prototypes(protos, apply(recipe, kv)), "cpu")
            conf = np.zeros((len(names) + 1,) * 2, np.int64)
            t1 = time.perf_counter()
            for img, lab in data:
                res = seg.segment(img, names, pamr=pamr)
                conf += confusion(lab, res.labels, len(names) + 1)  # bank order = vocab order: label c+1 = class c
            dt = (time.perf_counter() - t1) / len(data)
            m, mn, _ = miou(conf)
            base = m if base is None else base
            print(f"{name}{'+pamr' if pamr else ''}: mIoU {100 * m:.2f} nanmean {100 * mn:.2f} "
                  f"delta {100 * (m - base):+.2f} s/img {dt:.3f}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
