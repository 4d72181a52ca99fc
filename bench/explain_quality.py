"""Provenance on the toy world: do the support images `explain` names show the class that is really there?

For every scene of a toy-scenes folder (`ovdiff toy-scenes`) and every class the segmenter labels in it (background
left out), `explain` names the support images of the prototypes that won most of its pixels (instance and part rows;
class rows are pooled). Each named image is redrawn from its seed (`ToyGenerator.draw(class, seed)`) and its object
is checked against the ground truth of the labelled pixels: the redrawn image's foreground colour (the generator's
attribution > 0.5) must be the ground-truth class's toy colour, and the image's class its shape/texture. Prints

    named_images: N
    provenance_right: share of named images showing the ground-truth class (shape and colour)

    python bench/explain_quality.py --bank BANK --root SCENES [--limit N]
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--bank", required=True)
    ap.add_argument("--root", required=True, help="toy-scenes folder (images/, labels/, classes.tsv)")
    ap.add_argument("--limit", type=int, default=None)
    ap.add_argument("--top", type=int, default=3)
    a = ap.parse_args(argv)
    from ovdiff_ray.evaluate import label_lut, load_dataset, read_label
    from ovdiff_ray.explain import explain
    from ovdiff_ray.models import toy
    from ovdiff_ray.segment import Segmenter, read_image
    from ovdiff_ray.store.bank import Bank

    bank = Bank.load(a.bank)
    seg = Segmenter.from_bank(bank, "cpu")
    ds = load_dataset("toy", a.root)
    lut = label_lut(bank, ds)
    gen = toy.ToyGenerator(bank.recipe)
    named = right = 0
    for iid, ip, lp in ds.items[: a.limit]:
        img, gt = read_image(ip), read_label(lp)
        names = ds.classes[1:]
        res = seg.segment(img, names)
        for v, ce in explain(seg, img, res, top=a.top).items():
            if v == 0:
                continue
            g = np.bincount(gt[(res.labels == v) & (gt != 255)], minlength=len(ds.classes))
            truth = ds.classes[int(g.argmax())]
            for w in ce.prototypes:
                for s in w.seeds or []:
                    im, attr = gen.draw(w.owner, s)
                    shown = toy.parse_name(w.owner)
                    want = toy.parse_name(truth) if truth != "background" else None
                    colour_ok = want is not None and _colour_of(im, attr) == want.colour
                    named += 1
                    right += bool(colour_ok and shown.form == want.form)
        print(f"{iid}: named {named} right {right}", file=sys.stderr, flush=True)
    print(f"named_images: {named}")
    print(f"provenance_right: {right / max(named, 1):.4f}")
    return 0


def _colour_of(im: np.ndarray, attr: np.ndarray) -> str:
    """The toy colour closest in direction (textures scale the luminance) to the mean RGB of the image's foreground
    (attribution > 0.5)."""
    from ovdiff_ray.models import toy

    fg = im[attr > 0.5].astype(np.float64).mean(0)
    fg /= max(np.linalg.norm(fg), 1e-9)
    return max(toy.COLOURS, key=lambda c: float(np.dot(np.asarray(toy.COLOURS[c], np.float64) /
                                                        np.linalg.norm(toy.COLOURS[c]), fg)))


if __name__ == "__main__":
    sys.exit(main())
