"""Toy mIoU of the parity switches (issue 12), each against the toy recipe in the same process.

Held-out vocabularies (random toy words, seeds not used in development) and scene seeds; prints `name: value`
lines, nanmean and absent-as-zero mIoU, and the ratio to the baseline of the same vocabulary.

    python bench/parity_bench.py [--vocabs 3] [--scenes 24]
"""
from __future__ import annotations

import argparse
import copy
import sys
import time

import numpy as np


def held_out_vocab(seed: int, n_things: int = 8, n_stuff: int = 2) -> tuple[list[str], list[str]]:
    from ovdiff_ray.models import toy

    w = toy.known_words()
    rng = np.random.default_rng(seed)
    things = [f"{c} {s}" for c in w["colours"] for s in w["shapes"]]
    stuff = [f"{c} {t}" for c in w["colours"] for t in w["textures"]]
    t = list(rng.choice(things, n_things, replace=False))
    s = list(rng.choice(stuff, n_stuff, replace=False))
    return t + s, ["thing"] * n_things + ["stuff"] * n_stuff


def set_key(recipe, dotted: str, value) -> None:
    if dotted.startswith("extractors.*."):
        for e in recipe.extractors:
            setattr(e, dotted.split(".")[-1], value)
        return
    obj = recipe
    *path, last = dotted.split(".")
    for p in path:
        obj = getattr(obj, p)
    setattr(obj, last, value)


def score(recipe, names, kinds, scenes) -> tuple[float, float]:
    from ovdiff_ray.evaluate import confusion, miou
    from ovdiff_ray.sample import SamplingModels, sample_class
    from ovdiff_ray.segment import Segmenter
    from ovdiff_ray.store.bank import Bank

    models = SamplingModels.load(recipe, "cpu")
    protos = [sample_class(n, recipe, models, kind=k) for n, k in zip(names, kinds)]
    seg = Segmenter.from_bank(Bank.from_prototypes(protos, recipe), "cpu")
    n = len(names) + 1
    conf = np.zeros((n, n), np.int64)
    for img, lab in scenes:
        conf += confusion(lab, seg.segment(img).labels, n)
    m, mn, _ = miou(conf)
    return m, mn


VARIANTS = {
    "mask_grid_centre": {"prototypes.mask_grid": "centre"},
    "kmeans_converged_all_pixels": {"prototypes.kmeans_iters": 300, "prototypes.max_pixels": 0},
    # the toy extractor's stride is 2 px, where both rules agree; on 4 px cells (support features at half size) they
    # differ, as on CLIP's 16 px cells
    "coarse_cells_any": {"extractors.*.input_size": 64},
    "coarse_cells_centre": {"extractors.*.input_size": 64, "prototypes.mask_grid": "centre"},
}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--vocabs", type=int, default=3)
    ap.add_argument("--scenes", type=int, default=24)
    ap.add_argument("--variants", nargs="*", default=list(VARIANTS))
    a = ap.parse_args(argv)
    import torch

    from ovdiff_ray.models import toy
    from ovdiff_ray.recipe import load_recipe

    torch.set_num_threads(1)
    base = load_recipe("toy")
    totals: dict[str, list] = {"baseline": []}
    for v in range(a.vocabs):
        names, kinds = held_out_vocab(9100 + v)
        scenes = [toy.make_scene(names, kinds, np.random.default_rng(7700 + 100 * v + s), 128)
                  for s in range(a.scenes)]
        t0 = time.perf_counter()
        b = score(base, names, kinds, scenes)
        totals["baseline"].append(b)
        print(f"vocab{v}_baseline_miou: {100 * b[0]:.1f} (nanmean {100 * b[1]:.1f}) [{time.perf_counter() - t0:.0f}s]",
              flush=True)
        for name in a.variants:
            r = copy.deepcopy(base)
            for k, val in VARIANTS[name].items():
                set_key(r, k, val)
            s = score(r, names, kinds, scenes)
            totals.setdefault(name, []).append(s)
            print(f"vocab{v}_{name}_miou: {100 * s[0]:.1f} (nanmean {100 * s[1]:.1f}), ratio {s[0] / b[0]:.3f}",
                  flush=True)
    for name, vals in totals.items():
        m = np.mean([x[0] for x in vals])
        mn = np.mean([x[1] for x in vals])
        print(f"mean_{name}_miou: {100 * m:.1f} (nanmean {100 * mn:.1f})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
