"""Provenance on the toy world: do the support images `explain` names show the class, and are they the right ones?

For every scene of a toy-scenes folder (`ovdiff toy-scenes`) and every class the segmenter labels in it (background
left out), `explain` names the support images of the prototypes that won most of its pixels (instance and part rows;
class rows are pooled). Two measures:

- `provenance_right` (label accuracy, the figure before issue 27): each named image is redrawn from its seed
  (`ToyGenerator.draw(class, seed)`) and counted right when it shows the ground-truth class of the labelled pixels
  (the foreground's toy colour and the class's shape/texture). Any support image of a correctly labelled class
  passes, so this measures whether the *label* is right, not whether the *image* was the right one to name.
- `provenance_rank_auc` (issue 27: what separates a right support image from another of the same class): the pixels
  a named row won (the labelled class's pixels whose most similar row of that class it is, as `explain` assigns
  them, per extractor) are compared with every support image of the class through that image's own prototype (its
  instance row: the mean of its foreground features); the score of a named image is the share of the class's other
  support images whose prototype is less similar (mean cosine over those pixels; ties count half) than its own.
  0.5 = no better than any other image of the class; 1 = the most similar of them all. Printed for part rows (the
  images whose pixels are nearest the part's centre at build time; the real question) and instance rows (their
  named image *is* the winning row, so near 1 by construction: a check of the bookkeeping), beside a random support
  image of the same class scored the same way in the same run (`..._random`, 0.5 in expectation).

Prints `name: value` lines:

    named_images, provenance_right, provenance_rank_auc.part, provenance_rank_auc.part_random,
    provenance_rank_auc.instance, provenance_top1.part (named part image = the most similar of the class), ...

    python bench/explain_quality.py --bank BANK --root SCENES [--limit N] [--top 3]
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
    rng = np.random.default_rng(0)
    named = right = 0
    auc: dict[str, list[float]] = {"part": [], "instance": [], "part_random": [], "instance_random": []}
    top1: dict[str, list[bool]] = {"part": [], "instance": []}
    for iid, ip, lp in ds.items[: a.limit]:
        img, gt = read_image(ip), read_label(lp)
        names = ds.classes[1:]
        res = seg.segment(img, names)
        won = RowPixels(seg, img, res)
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
                if w.level not in top1 or not w.support:
                    continue
                sims = won.image_similarities(w.extractor, v, w.row)  # support index -> mean cosine
                if not sims:
                    continue
                idx = sorted(sims)
                for i in w.support:
                    if i in sims:
                        auc[w.level].append(rank_share(sims, i))
                        top1[w.level].append(sims[i] >= max(sims.values()))
                        auc[w.level + "_random"].append(rank_share(sims, int(rng.choice(idx))))
        print(f"{iid}: named {named} right {right}", file=sys.stderr, flush=True)
    print(f"named_images: {named}")
    print(f"provenance_right: {right / max(named, 1):.4f}")
    for k, vals in auc.items():
        print(f"provenance_rank_auc.{k}: {np.mean(vals) if vals else float('nan'):.4f}")
        if not k.endswith("random"):
            print(f"provenance_rank_auc.{k}.named: {len(vals)}")
    for k, vals in top1.items():
        print(f"provenance_top1.{k}: {np.mean(vals) if vals else float('nan'):.4f}")
    return 0


def rank_share(sims: dict[int, float], i: int) -> float:
    """Share of the other support images whose similarity is below image `i`'s (ties count half)."""
    others = np.array([s for j, s in sims.items() if j != i])
    if not len(others):
        return float("nan")
    return float(((others < sims[i]).sum() + 0.5 * (others == sims[i]).sum()) / len(others))


class RowPixels:
    """Per extractor, the whole-view features of one segmented image and which row of a labelled class each pixel
    of that class is nearest, as `explain` assigns them (the bench recomputes it; explain.py reports shares only)."""

    def __init__(self, seg, image, result):
        import torch
        import torch.nn.functional as F

        from ovdiff_ray.serve.engine import upscale_labels

        self.seg, self.bank = seg, seg.bank
        x = seg._prepare(image).x
        h, w = x.shape[-2:]
        self.labels = upscale_labels(np.asarray(result.labels), w, h).astype(np.int64)
        self.feats = {}
        with torch.no_grad():
            for ex, e in seg.extractors.items():
                size = seg._view_size(ex, h, w)
                crop = x[None] if size == (h, w) else F.interpolate(x[None], size=size, mode="bilinear",
                                                                    align_corners=False)
                f = e(crop).float()
                f = F.interpolate(f, size=(h, w), mode="nearest")[0]  # [D, h, w], as explain upsamples rows
                self.feats[ex] = f.reshape(f.shape[0], -1).numpy()

    def image_similarities(self, ex: str, v: int, row: int) -> dict[int, float]:
        """Support index -> mean cosine of its instance prototype to the pixels of label `v` that fg row `row` of
        class `v - 1` won."""
        a = self.bank.extractors[ex]
        r = np.arange(*a.rows_of(v - 1).indices(len(a.vectors)))
        fg = r[a.kind[r] == 0]
        f = self.feats[ex][:, self.labels.ravel() == v]  # [D, n]
        if not f.shape[1] or row not in fg:
            return {}
        vec = np.asarray(a.vectors[fg], np.float32)
        mine = f[:, (vec @ f).argmax(0) == list(fg).index(row)]
        if not mine.shape[1]:
            return {}
        mine = mine / np.maximum(np.linalg.norm(mine, axis=0, keepdims=True), 1e-12)
        inst = fg[(a.level[fg] == 1) & (a.source[fg] >= 0)] if a.source is not None else fg[:0]
        iv = np.asarray(a.vectors[inst], np.float32)
        iv /= np.maximum(np.linalg.norm(iv, axis=1, keepdims=True), 1e-12)
        return {int(a.source[j]): float(s) for j, s in zip(inst, (iv @ mine).mean(1))}


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
