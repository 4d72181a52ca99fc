"""Which per-pixel confidence ranks errors last? Candidates compared by risk-coverage on toy scenes.

Segments every scene of a toy-scenes folder (`ovdiff toy-scenes`) with a bank, keeps the score maps before and after
region snapping and per extractor, and prints one line per candidate confidence:

    <candidate>: aurc <AURC> acc90 <accuracy of the most confident 90%> acc95 <... 95%>

Candidates: `top` (the final score: a vote share with regions; the raw top-score baseline), `margin` (final best
minus second), `cos_top` / `cos_margin` (the averaged cosine before snapping: best, best minus second),
`label_margin` (cosine of the label minus the best other class), `extractor_min_margin` (the smaller of the
extractors' label margins), `extractor_agree` (extractors whose argmax is the label), `sp_*` (pooled per
superpixel), `top*fit^p` (the chosen one at p = 8: `ovdiff_ray/confidence.py`), and `random` (the error rate).

    python bench/confidence_quality.py --bank BANK --root SCENES [--limit N]
"""
from __future__ import annotations

import argparse
import sys

import numpy as np
import torch

from ovdiff_ray.riskcoverage import RiskCoverage


def candidates(raw, final, per_ex, regions) -> dict[str, torch.Tensor]:
    """Score maps `[C, h, w]` (before / after snapping, per extractor) and the region map -> candidate maps."""
    final = final.clamp_min(0)
    arg = final.argmax(0)
    s = final.sort(0, descending=True).values
    rc = raw.clamp(0, 1)
    cs = rc.sort(0, descending=True).values
    own = rc.gather(0, arg[None])[0]
    other = rc.scatter(0, arg[None], -1.0).amax(0)
    ex_margin, ex_agree = [], []
    for p in per_ex:
        pc = p.clamp(0, 1)
        ex_margin.append(pc.gather(0, arg[None])[0] - pc.scatter(0, arg[None], -1.0).amax(0))
        ex_agree.append((pc.argmax(0) == arg).float())
    c = {"top": s[0], "margin": s[0] - s[1], "cos_top": cs[0], "cos_margin": cs[0] - cs[1],
         "label_margin": own - other, "extractor_min_margin": torch.stack(ex_margin).amin(0),
         "extractor_agree": torch.stack(ex_agree).mean(0)}
    if regions is not None:
        r = regions.reshape(-1)
        for k in ("label_margin", "extractor_min_margin", "extractor_agree"):
            v = c[k].reshape(-1)
            sums = torch.zeros(int(r.max()) + 1).index_add_(0, r, v)
            c["sp_" + k] = (sums / torch.bincount(r).clamp_min(1))[r].view_as(c[k])
    fit = (torch.zeros(final.shape[0]).index_add_(0, arg.reshape(-1), own.reshape(-1)) /
           torch.bincount(arg.reshape(-1), minlength=final.shape[0]).clamp_min(1))[arg]
    for p in (1, 4, 8, 16):
        c[f"top*fit^{p}"] = s[0] * fit ** p
    return {k: v.clamp(0, 1) if k != "label_margin" else (v + 1) / 2 for k, v in c.items()}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--bank", required=True)
    ap.add_argument("--root", required=True)
    ap.add_argument("--limit", type=int, default=None)
    a = ap.parse_args(argv)
    from ovdiff_ray.evaluate import label_lut, load_dataset, read_label
    from ovdiff_ray.segment import Segmenter, read_image
    from ovdiff_ray.store.bank import Bank

    class Capture(Segmenter):
        """The segmenter, keeping the per-extractor and pre-snap score maps of the last image."""

        def _accumulate(self, items, sw, exs):
            per = []
            for ex in exs:
                super()._accumulate(items, sw, [ex])
                per.append([(it.acc.clone(), it.count.clone()) for it in items])
            for k, it in enumerate(items):
                it.acc, it.count = sum(p[k][0] for p in per), sum(p[k][1] for p in per)
                self.per_ex = [p[k][0] / p[k][1].clamp_min(1) for p in per]

        def _snap(self, it, scores, regions):
            self.raw = scores.clone()
            self.regions = self.snapper.regions(it.x, regions) if regions != "none" else None
            self.final = super()._snap(it, scores, regions)
            return self.final

    bank = Bank.load(a.bank)
    seg = Capture.from_bank(bank, "cpu")
    ds = load_dataset("toy", a.root)
    lut = label_lut(bank, ds)
    curves: dict[str, RiskCoverage] = {}
    for _, ip, lp in ds.items[: a.limit]:
        img, gt = read_image(ip), read_label(lp)
        res = seg.segment(img, ds.classes[1:])
        if seg.raw.shape[-2:] != gt.shape:
            raise SystemExit("scenes must be at the recipe's short side (toy scenes are)")
        right, valid = lut[res.labels] == gt, gt != 255
        for k, v in candidates(seg.raw, seg.final, seg.per_ex, seg.regions).items():
            curves.setdefault(k, RiskCoverage()).add(v.numpy(), right, valid)
    for k, rc in curves.items():
        print(f"{k}: aurc {rc.aurc():.5f} acc90 {rc.accuracy_at(0.9):.5f} acc95 {rc.accuracy_at(0.95):.5f}")
    print(f"random: aurc {next(iter(curves.values())).aurc_random():.5f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
