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

`top*cal^8` is the shipped confidence on banks with the fit calibration record (issue 28: the fit over the bank's
typical own fit, `confidence.fit_scale`); `top*(fit/own_px95)^8` and `top*(fit/own_img50)^8` measure each label
against its own class's record instead (the 95% quantile of its support pixels' cosine, the median of its per-image
fits).

**The noisy-feature world** (`--noisy`, issue 28): the same toy classes built twice, with the toy extractors as they
are (`clean`) and with an independent random component appended to their outputs (`noisy`,
`ovdiff_ray/models/noisy.py`, for support images and scenes alike), so a class's pixels match its prototypes at
cosines of 0.3-0.6 instead of ~0.95. Both banks are segmented on the same unseen scenes; per world it prints the
accuracy of the most confident 90% / 95% of pixels, AURC and the share of pixels under `min_confidence` 0.5, for the
shipped confidence (calibrated by the bank's record), the raw formula (`top * fit ** 8`, `raw_formula.*`), the
per-class anchors (`per_class_*`) and the top score, and the median cosine of a pixel to its true class
(`same_class_cosine_median`):

    python bench/confidence_quality.py --noisy [--classes 52] [--scenes 40] [--seed 7000] [--keep DIR]
"""
from __future__ import annotations

import argparse
import sys

import numpy as np
import torch

from ovdiff_ray import confidence
from ovdiff_ray.riskcoverage import RiskCoverage


PER_CLASS = {"own_px95": ("fg", "bg", 0.95), "own_img50": ("fg_image", "bg_image", 0.5)}


def per_class_anchors(bank, kept: list[int], extractors: list[str]) -> dict[str, torch.Tensor]:
    """Per label row (background, then `kept`), each class's own anchor from its record (the variants that ranked
    worse than the bank's scale): `own_px95` the 95% quantile of its support fg pixels' cosine, `own_img50` the median
    of its per-image fits; background: the kept things' bg counterparts (mean). Empty without a record."""
    cals = [bank.extractors[ex].calibration for ex in extractors]
    if any(c is None for c in cals):
        return {}
    cal = np.mean(cals, 0)
    if np.isnan(cal[list(kept)]).any():
        return {}
    things = [c for c in kept if bank.kinds[c] != "stuff"] or list(kept)
    f, q = confidence.CAL_FIELDS.index, confidence.CAL_QUANTILES.index
    out = {}
    for name, (fg, bg, qq) in PER_CLASS.items():
        row0 = np.nanmean(cal[things, f(bg), q(qq)]) if things else 1.0
        out[name] = torch.tensor(np.r_[row0, cal[list(kept), f(fg), q(qq)]], dtype=torch.float32)
    return out


SCALES = (("fg", 0.5), ("fg_image", 0.5), ("fg", 0.95))  # bank-level anchors compared (the first is shipped)


def bank_scales(bank) -> dict[str, float]:
    """The bank-level scale from each anchor of SCALES (as `confidence.fit_scale`); {} without a record."""
    out = {}
    for field, q in SCALES:
        cals = [a.calibration for a in bank.extractors.values()]
        if any(c is None for c in cals):
            return {}
        v = [np.nanmean(c[:, confidence.CAL_FIELDS.index(field), confidence.CAL_QUANTILES.index(q)]) for c in cals]
        out[f"{field}_q{q:g}"] = float(np.mean(v))
    return out


def candidates(raw, final, per_ex, regions, scale=None, anchors=None) -> dict[str, torch.Tensor]:
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
    if scale is not None:
        c["top*cal^8"] = confidence.pixel_confidence(raw, final, scale)  # shipped on banks with the record
    if anchors:
        _, _, rfit = confidence.label_fit(raw, final)
        for name, own in anchors.items():
            c[f"top*(fit/{name})^8"] = s[0] * (rfit / own.clamp_min(1e-3)).clamp(0, 1)[arg] ** 8
    return {k: v.clamp(0, 1) if k != "label_margin" else (v + 1) / 2 for k, v in c.items()}


class Capture:
    """Wraps a Segmenter class: keeps the per-extractor and pre-snap score maps, the regions and the fit
    scale of the last image."""

    @staticmethod
    def of(base):
        class Captured(base):
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

            def _finish(self, it, *args, **kw):
                self.fit_scale = it.fit_scale
                self.kept = list(it.kept)
                return super()._finish(it, *args, **kw)

        return Captured


# -- the noisy-feature world -------------------------------------------------------------------------------------
def draw_vocab(n: int, seed: int) -> list[tuple[str, str]]:
    """`n` toy classes (about 60% things, the rest stuff), drawn with `seed` from the whole toy word list."""
    from ovdiff_ray.models import toy

    w = toy.known_words()
    things = [f"{c} {s}" for c in w["colours"] for s in w["shapes"]]
    stuff = [f"{c} {t}" for c in w["colours"] for t in w["textures"]]
    nt = min(len(things), round(0.6 * n))
    ns = min(len(stuff), n - nt)
    rng = np.random.default_rng(seed)
    return ([(things[i], "thing") for i in sorted(rng.choice(len(things), nt, replace=False))]
            + [(stuff[i], "stuff") for i in sorted(rng.choice(len(stuff), ns, replace=False))])


def draw_scenes(vocab, n: int, seed: int, size: int = 128):
    from ovdiff_ray.models import toy

    rng = np.random.default_rng(seed)
    names, kinds = [v[0] for v in vocab], [v[1] for v in vocab]
    return [toy.make_scene(names, kinds, np.random.default_rng(rng.integers(2 ** 63)), size) for _ in range(n)]


def world_models(recipe, noisy: bool):
    """The toy recipe's models, with the extractors wrapped in `NoisyExtractor` for the noisy world."""
    from ovdiff_ray.models.noisy import noisy_extractors
    from ovdiff_ray.sample import SamplingModels

    models = SamplingModels.load(recipe, "cpu")
    if noisy:
        models.extractors = noisy_extractors(models.extractors)
    return models


def build_world(root: str, recipe, vocab, noisy: bool, keep_record: bool = True):
    """A committed bank of `vocab` in folder `root` built with the world's models (in process, no Ray); with
    `keep_record=False` the shards carry no fit calibration (a bank from before it). -> (Bank, models)."""
    from ovdiff_ray.sample import sample_class
    from ovdiff_ray.store.bank import Bank
    from ovdiff_ray.store.fs import Location
    from ovdiff_ray.store.shards import commit_manifest, new_manifest, write_shard

    models = world_models(recipe, noisy)
    loc = Location(root)
    entries = []
    for i, (name, kind) in enumerate(vocab):
        p = sample_class(name, recipe, models, kind=kind)
        if not keep_record:
            for ps in p.sets.values():
                ps.calibration = None
        entries.append(write_shard(loc, p, i).to_entry())
    commit_manifest(loc, new_manifest("confidence-" + ("noisy" if noisy else "clean"), 1, recipe.to_dict(), entries))
    return Bank.load(root), models


def measure_world(bank, models, vocab, scenes, thresholds=(0.5,)) -> dict:
    """Segment `scenes` with `bank`; -> risk-coverage of the shipped confidence, the raw formula and the top score,
    unsure shares, the median same-class cosine and the support record's median fg cosine."""
    from ovdiff_ray.segment import Segmenter

    seg = Capture.of(Segmenter)(bank, models.extractors, models.classifier, "cpu")
    names = [v[0] for v in vocab]
    lut = np.zeros(len(bank.names) + 1, np.int64)
    for i, n in enumerate(names, start=1):
        lut[bank.index(n) + 1] = i
    scales = bank_scales(bank)
    kinds = (("confidence", "raw_formula", "top") + tuple(f"per_class_{k}" for k in PER_CLASS)
             + tuple(f"scale_{k}" for k in scales))
    curves = {k: RiskCoverage() for k in kinds}
    unsure = {(k, t): 0 for k in kinds if k != "top" for t in thresholds}
    valid_n, cos = 0, []
    for img, gt in scenes:
        res = seg.segment(img, names)
        right, valid = lut[res.labels] == gt, gt != 255
        maps = {"confidence": res.confidence,
                "raw_formula": confidence.pixel_confidence(seg.raw, seg.final).numpy(),
                "top": seg.final.clamp(0, 1).amax(0).numpy()}
        _, top, fit = confidence.label_fit(seg.raw, seg.final)
        arg = seg.final.clamp_min(0).argmax(0)
        for name, own in per_class_anchors(bank, seg.kept, list(bank.extractors)).items():
            maps[f"per_class_{name}"] = (top * (fit / own.clamp_min(1e-3)).clamp(0, 1)[arg] ** 8).numpy()
        for name, sc in scales.items():
            maps[f"scale_{name}"] = confidence.pixel_confidence(seg.raw, seg.final, sc).numpy()
        for k, v in maps.items():
            curves[k].add(v, right, valid)
        for (k, t) in unsure:
            unsure[(k, t)] += int(((maps[k] < t) & valid).sum())
        valid_n += int(valid.sum())
        row_of = {c: j + 1 for j, c in enumerate(seg.kept)}  # bank id -> score row
        for g in np.unique(gt):
            if g in (0, 255):
                continue
            r = row_of.get(bank.index(names[g - 1]))
            if r is not None:
                cos.append(seg.raw[r].numpy()[gt == g])
    support = np.nanmean([a.calibration[:, confidence.CAL_FIELDS.index("fg"), confidence.CAL_QUANTILES.index(0.5)]
                          for a in bank.extractors.values() if a.calibration is not None]) \
        if any(a.calibration is not None for a in bank.extractors.values()) else float("nan")
    return {"curves": curves, "unsure": {k: v / max(1, valid_n) for k, v in unsure.items()},
            "same_class_cosine_median": float(np.median(np.concatenate(cos))) if cos else float("nan"),
            "support_fg_cosine_median": float(support), "pixels": valid_n}


def noisy_main(a) -> int:
    import os
    import tempfile
    import time

    from ovdiff_ray.recipe import load_recipe

    torch.set_num_threads(1)
    recipe = load_recipe("toy")
    vocab = draw_vocab(a.classes, a.seed)
    scenes = draw_scenes(vocab, a.scenes, a.seed + 1)
    print(f"# {len(vocab)} toy classes ({sum(k == 'thing' for _, k in vocab)} things), {len(scenes)} scenes, "
          f"vocabulary seed {a.seed}, scene seed {a.seed + 1}", flush=True)
    with tempfile.TemporaryDirectory() as tmp:
        for world in ("clean", "noisy"):
            t0 = time.perf_counter()
            root = f"{a.keep or tmp}/{world}-{a.classes}-{a.seed}"
            if a.keep and os.path.isfile(f"{root}/manifests/latest"):
                from ovdiff_ray.store.bank import Bank

                bank, models = Bank.load(root), world_models(recipe, world == "noisy")
            else:
                bank, models = build_world(root, recipe, vocab, world == "noisy")
            t1 = time.perf_counter()
            r = measure_world(bank, models, vocab, scenes)
            print(f"# {world}: built in {t1 - t0:.0f}s, segmented in {time.perf_counter() - t1:.0f}s", flush=True)
            for k in r["curves"]:
                pre = world if k == "confidence" else f"{world}.{k}"
                rc = r["curves"][k]
                print(f"{pre}.acc_at_90: {rc.accuracy_at(0.9):.5f}")
                print(f"{pre}.acc_at_95: {rc.accuracy_at(0.95):.5f}")
                print(f"{pre}.aurc: {rc.aurc():.6f}")
                if k != "top":
                    print(f"{pre}.unsure_share_at_0.5: {r['unsure'][(k, 0.5)]:.4f}")
            print(f"{world}.acc_at_100: {r['curves']['top'].accuracy_at(1.0):.5f}")
            print(f"{world}.fit_scale: {confidence.fit_scale(bank, list(bank.extractors)):.4f}")
            print(f"{world}.same_class_cosine_median: {r['same_class_cosine_median']:.4f}")
            print(f"{world}.support_fg_cosine_median: {r['support_fg_cosine_median']:.4f}", flush=True)
    return 0


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--bank", help="bank to compare the candidates on (with --root)")
    ap.add_argument("--root", help="toy scenes folder (`ovdiff toy-scenes`)")
    ap.add_argument("--limit", type=int, default=None)
    ap.add_argument("--noisy", action="store_true", help="the clean and the noisy-feature world (builds both banks)")
    ap.add_argument("--classes", type=int, default=52, help="--noisy: toy classes drawn (default 52)")
    ap.add_argument("--scenes", type=int, default=40, help="--noisy: scenes (default 40)")
    ap.add_argument("--seed", type=int, default=7000, help="--noisy: vocabulary seed; scenes use seed + 1")
    ap.add_argument("--keep", default=None, help="--noisy: build the banks into this folder and reuse them")
    a = ap.parse_args(argv)
    if a.noisy:
        return noisy_main(a)
    if not a.bank or not a.root:
        ap.error("--bank and --root are required (or --noisy)")
    from ovdiff_ray.evaluate import label_lut, load_dataset, read_label
    from ovdiff_ray.segment import Segmenter, read_image
    from ovdiff_ray.store.bank import Bank

    bank = Bank.load(a.bank)
    seg = Capture.of(Segmenter).from_bank(bank, "cpu")
    ds = load_dataset("toy", a.root)
    lut = label_lut(bank, ds)
    curves: dict[str, RiskCoverage] = {}
    for _, ip, lp in ds.items[: a.limit]:
        img, gt = read_image(ip), read_label(lp)
        res = seg.segment(img, ds.classes[1:])
        if seg.raw.shape[-2:] != gt.shape:
            raise SystemExit("scenes must be at the recipe's short side (toy scenes are)")
        right, valid = lut[res.labels] == gt, gt != 255
        anchors = per_class_anchors(bank, seg.kept, list(bank.extractors))
        for k, v in candidates(seg.raw, seg.final, seg.per_ex, seg.regions, seg.fit_scale, anchors).items():
            curves.setdefault(k, RiskCoverage()).add(v.numpy(), right, valid)
    for k, rc in curves.items():
        print(f"{k}: aurc {rc.aurc():.5f} acc90 {rc.accuracy_at(0.9):.5f} acc95 {rc.accuracy_at(0.95):.5f}")
    print(f"random: aurc {next(iter(curves.values())).aurc_random():.5f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
