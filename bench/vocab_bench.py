"""Quality as the vocabulary grows, on the toy world: toy banks of growing size drawn from its whole word list.

Every toy class (8 colours x 6 shapes = 48 things, 8 x 5 textures = 40 stuff) is built once with the toy recipe into
a bank folder in a temporary directory (prototypes depend only on the recipe seed and the class name); each
vocabulary is a subset of it (`Bank.load(classes=...)`). Per size (about 10, 20, 40 classes, 48 things + 12 stuff,
and the whole vocabulary, 48 + 40; each drawn with a fixed seed), scenes are drawn from that vocabulary
(`toy.make_scene`, fixed seeds; twice `--scenes` from 60 classes up) and segmented without PAMR. Printed per size and
configuration: nanmean mIoU, mIoU with absent classes as 0, background IoU, the tail (the 3 worst classes among
those the scenes hold or the method predicts, background included, and the share of them under 0.70 IoU), seconds
per image (noisy on a shared machine), the same with the pre-filter off, and the text prompts the pre-filter
encoded per image. Configurations: `today` (every switch beyond the paper off, as `paper.yaml`), `before` (as
`toy.yaml` with issue 27's thing proposals off: the tail before issue 27), `new` (all switches as `toy.yaml`) and
`recall` (`toy.yaml` with issue 27's thing proposals on, `thing_proposals: 3`: measured, not better, so off there).
By default `today,before,recall` (`new` is `before` while toy.yaml ships the proposals off). The
`lvis1203.segment.*` lines time segmentation at 1203 classes with the proposals off and on.

The vocabulary and scene seeds default to ones the method was not developed on (issue 10 developed with --seed 100,
issue 23 with --seed 5000 and 6000).

    python bench/vocab_bench.py [--sizes 10,20,40,60,88] [--scenes 48] [--seed 1000] [--configs today,before,recall]
                                [--regions none|superpixels] [--no-prefilter-off] [--confusions 5] [--bank DIR]
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
import warnings

import numpy as np

warnings.filterwarnings("ignore")
os.environ.setdefault("OVDIFF_CACHE", os.path.join(tempfile.gettempdir(), "ovdiff-bench-cache"))

from ovdiff_ray import evaluate  # noqa: E402
from ovdiff_ray.models import toy  # noqa: E402
from ovdiff_ray.recipe import load_recipe  # noqa: E402

# (things, stuff) per size
SIZES = {10: (6, 4), 20: (16, 4), 40: (32, 8), 60: (48, 12), 88: (48, 40)}
TAIL_FLOOR = 0.70  # the tail: share of classes under this IoU


def tail(iou: np.ndarray, names: list[str], k: int = 3) -> tuple[list[tuple[str, float]], float]:
    """(the `k` worst classes (name, IoU) among those the scenes hold or the method predicts (IoU not nan), worst
    first; the share of those classes under TAIL_FLOOR). Background (index 0) is a class like the others."""
    seen = [(names[i], float(v)) for i, v in enumerate(iou) if np.isfinite(v)]
    seen.sort(key=lambda nv: (nv[1], nv[0]))
    under = sum(v < TAIL_FLOOR for _, v in seen) / max(1, len(seen))
    return seen[:k], under


def out(name: str, value) -> None:
    print(f"{name}: {value:.4g}" if isinstance(value, float) else f"{name}: {value}", flush=True)


def all_classes() -> list[tuple[str, str]]:
    w = toy.known_words()
    return ([(f"{c} {s}", "thing") for c in w["colours"] for s in w["shapes"]]
            + [(f"{c} {t}", "stuff") for c in w["colours"] for t in w["textures"]])


def build_all(root: str, recipe) -> str:
    """Every toy class in one bank folder (recipe toy); returns its URI."""
    from ovdiff_ray.sample import SamplingModels, sample_class
    from ovdiff_ray.store.fs import Location
    from ovdiff_ray.store.shards import commit_manifest, new_manifest, write_shard

    models = SamplingModels.load(recipe, "cpu")
    loc = Location(root)
    entries = []
    t0 = time.perf_counter()
    for i, (n, k) in enumerate(all_classes()):
        entries.append(write_shard(loc, sample_class(n, recipe, models, kind=k), i).to_entry())
    commit_manifest(loc, new_manifest("vocab-bench", 1, recipe.to_dict(), entries))
    print(f"# built {len(entries)} toy classes in {time.perf_counter() - t0:.1f}s", file=sys.stderr, flush=True)
    return root


def draw_vocab(n_things: int, n_stuff: int, seed: int) -> list[tuple[str, str]]:
    rng = np.random.default_rng(seed)
    things = [c for c in all_classes() if c[1] == "thing"]
    stuff = [c for c in all_classes() if c[1] == "stuff"]
    return ([things[i] for i in sorted(rng.choice(len(things), n_things, replace=False))]
            + [stuff[i] for i in sorted(rng.choice(len(stuff), n_stuff, replace=False))])


def draw_scenes(vocab: list[tuple[str, str]], n: int, seed: int) -> list[tuple[np.ndarray, np.ndarray]]:
    rng = np.random.default_rng(seed)
    names, kinds = [v[0] for v in vocab], [v[1] for v in vocab]
    return [toy.make_scene(names, kinds, np.random.default_rng(rng.integers(2 ** 63)), 128) for _ in range(n)]


def switches_of(recipe_name: str) -> dict:
    """The segmentation/classifier values of a recipe that differ between paper.yaml and toy.yaml's new switches."""
    r = load_recipe(recipe_name)
    return {"segmentation": dict(vars(r.segmentation)), "classifier": dict(vars(r.classifier))}


SWITCH_KEYS = {
    "segmentation": ("subset_search", "subset_beam", "subset_exhaustive_upto",
                     "stuff_filter_rule", "stuff_min_area"),
    "classifier": (),
}
TAIL_KEYS = ("stuff_opening", "background_min_area")  # issue 23's switches (ovdiff_ray/precedence.py)
RECALL_KEYS = ("thing_proposals", "proposal_grid", "proposal_min_share", "proposal_min_area")  # issue 27's
MARGIN_KEYS = ("background_margin",)  # issue 27's second switch (precedence.py)
CONFIGS = ("today", "before", "new", "recall", "margin")
RECALL_ON = {"thing_proposals": 3}  # `recall`: issue 27's switch on as measured (off in toy.yaml: not better)
MARGIN_ON = {"background_margin": 0.05}  # `margin`: issue 27's background margin on as measured


def configure(bank, config: str) -> None:
    """Set the switches on a loaded bank's recipe: `today` = as paper.yaml (every switch beyond the paper off),
    `before` = as toy.yaml with issue 27's off (the tail before issue 27), `new` = all as toy.yaml, `recall` =
    toy.yaml with issue 27's thing proposals on (RECALL_ON), `margin` = `before` with issue 27's background margin
    on (MARGIN_ON)."""
    if config not in CONFIGS:
        raise SystemExit(f"unknown config {config!r} (known: {', '.join(CONFIGS)})")
    paper, toy_r = load_recipe("paper"), load_recipe("toy")
    src = paper if config == "today" else toy_r
    for section, keys in SWITCH_KEYS.items():
        for k in keys:
            if hasattr(getattr(src, section), k):
                setattr(getattr(bank.recipe, section), k, getattr(getattr(src, section), k))
    for k in TAIL_KEYS:
        setattr(bank.recipe.segmentation, k, getattr(src.segmentation, k))
    for k in RECALL_KEYS:
        setattr(bank.recipe.segmentation, k, getattr((toy_r if config in ("new", "recall") else paper).segmentation, k))
    for k in MARGIN_KEYS:
        setattr(bank.recipe.segmentation, k, getattr((toy_r if config == "new" else paper).segmentation, k))
    for k, v in {"recall": RECALL_ON, "margin": MARGIN_ON}.get(config, {}).items():
        setattr(bank.recipe.segmentation, k, v)


def evaluate_vocab(uri: str, vocab: list[tuple[str, str]], scenes, config: str, ablate=(),
                   overrides: dict | None = None, regions: str | None = None) -> dict:
    from ovdiff_ray.segment import Segmenter
    from ovdiff_ray.store.bank import Bank

    bank = Bank.load(uri, classes=[v[0] for v in vocab])
    configure(bank, config)
    for k, v in (overrides or {}).items():
        setattr(bank.recipe.segmentation, k, v)
    seg = Segmenter.from_bank(bank, "cpu")
    names = ["background"] + [v[0] for v in vocab]
    lut = np.zeros(len(bank.names) + 1, np.int64)
    for i, n in enumerate(names[1:], start=1):
        lut[bank.index(n) + 1] = i
    conf = np.zeros((len(names), len(names)), np.int64)
    prompts0 = seg.prompts_encoded
    t0 = time.perf_counter()
    for img, lab in scenes:
        res = seg.segment(img, names[1:], ablate=ablate, regions=regions)
        conf += evaluate.confusion(lab, lut[res.labels], len(names))
    dt = (time.perf_counter() - t0) / len(scenes)
    m, mn, iou = evaluate.miou(conf)
    worst, under = tail(iou, names, 5)
    return {"nanmean": mn, "miou": m, "bg": float(iou[0]), "s_per_image": dt, "conf": conf, "names": names,
            "prompts": (seg.prompts_encoded - prompts0) / len(scenes), "worst": worst, "under": under}


def lvis_prefilter(n_images: int, searches=("exhaustive", "greedy", "beam")) -> None:
    """The pre-filter over a synthetic 1203-class bank (the LVIS names, text embeddings from the tiny recipe's CLIP
    text tower, no prototypes needed): prompts encoded (text-encoder inputs, cache misses), prompts scored and
    seconds per image for each subset search, each with a fresh classifier and cache, on the same images; the
    paper's `max_candidates` (10)."""
    import torch

    from ovdiff_ray.models import build_classifier
    from ovdiff_ray.prefilter import PreFilter
    from ovdiff_ray.store.bank import Bank
    from ovdiff_ray.vocab import load_vocab

    recipe = load_recipe("tiny")
    recipe.segmentation.max_candidates = load_recipe("paper").segmentation.max_candidates  # 10, not tiny's 4
    vocab = load_vocab(os.path.join(os.path.dirname(__file__), "..", "bank", "vocab", "lvis1203.tsv"))
    clf = build_classifier(recipe, "cpu")
    text = np.asarray(clf.encode_text([recipe.classifier.text_template.format(name=c.text) for c in vocab.classes]),
                      np.float32)
    bank = Bank("lvis-synthetic", 0, recipe, vocab.names, [c.kind for c in vocab.classes], text, {})
    g = torch.Generator().manual_seed(0)
    images = [torch.rand(3, 96, 96, generator=g) for _ in range(n_images)]
    ids = list(range(len(vocab.names)))
    base = None
    for how in searches:
        bank.recipe.segmentation.subset_search = how
        pf = PreFilter(bank, build_classifier(recipe, "cpu"))
        t0 = time.perf_counter()
        kept = [sel.kept for img in images for sel in pf([img], ids)]
        dt = (time.perf_counter() - t0) / n_images
        out(f"lvis1203.{how}.prompts_encoded_per_image", pf.prompts_encoded / n_images)
        out(f"lvis1203.{how}.prompts_scored_per_image", pf.prompts_scored / n_images)
        out(f"lvis1203.{how}.s_per_image", dt)
        if base is None:
            base = (pf.prompts_encoded, dt, kept)
        else:
            out(f"lvis1203.{how}.fewer_prompts_than_exhaustive", base[0] / max(1, pf.prompts_encoded))
            out(f"lvis1203.{how}.speedup_vs_exhaustive", base[1] / max(dt, 1e-9))
            out(f"lvis1203.{how}.same_kept_as_exhaustive", sum(a == b for a, b in zip(kept, base[2])) / n_images)


def synthetic_bank(recipe, names: list[str], kinds: list[str], text: np.ndarray, parts: int = 8, instances: int = 8):
    """A bank over `names` with random unit prototypes at the recipe's extractor dims (the paper's row layout per
    class: 1 class + `instances` instance + `parts` part fg rows; things also 1 + `parts` bg rows): what the
    matching and the retrieval cost at that size, not what they find."""
    import torch

    from ovdiff_ray.models import build_extractors
    from ovdiff_ray.store.bank import Bank, BankArrays

    rng = np.random.default_rng(0)
    arrays = {}
    for e in build_extractors(recipe, "cpu"):
        dim = int(e(torch.rand(1, 3, 64, 64)).shape[1])
        levels, kind, cidx, source, offsets = [], [], [], [], [0]
        for c, k in enumerate(kinds):
            lv = [0] + [1] * instances + [2] * parts + ([0] + [2] * parts if k == "thing" else [])
            kd = [0] * (1 + instances + parts) + ([1] * (1 + parts) if k == "thing" else [])
            levels += lv
            kind += kd
            cidx += [c] * len(lv)
            source += [-1] + list(range(instances)) + [-1] * (len(lv) - 1 - instances)
            offsets.append(offsets[-1] + len(lv))
        v = rng.standard_normal((len(levels), dim)).astype(np.float32)
        v /= np.linalg.norm(v, axis=1, keepdims=True)
        arrays[e.name] = BankArrays(vectors=v.astype(np.float16), class_idx=np.array(cidx, np.int32),
                                    kind=np.array(kind, np.uint8), level=np.array(levels, np.uint8),
                                    offsets=np.array(offsets, np.int64), source=np.array(source, np.int16),
                                    members=None)
    return Bank("lvis-synthetic", 0, recipe, names, kinds, text, arrays)


def lvis_segment(n_images: int, proposals: int = 3) -> None:
    """Seconds per image to segment at 1203 classes (LVIS names, tiny recipe, random prototypes at its dims, toy.yaml's
    switches, 96 px images, no regions) with the thing proposals off and on (`thing_proposals`), the same images in
    the same run, and the classes the proposals added per image."""
    import torch

    from ovdiff_ray.models import build_classifier
    from ovdiff_ray.segment import Segmenter
    from ovdiff_ray.vocab import load_vocab

    recipe = load_recipe("tiny")
    toy_r = load_recipe("toy")
    for k in SWITCH_KEYS["segmentation"] + TAIL_KEYS + RECALL_KEYS:
        setattr(recipe.segmentation, k, getattr(toy_r.segmentation, k))
    recipe.segmentation.max_candidates = load_recipe("paper").segmentation.max_candidates
    recipe.segmentation.regions = "none"
    vocab = load_vocab(os.path.join(os.path.dirname(__file__), "..", "bank", "vocab", "lvis1203.tsv"))
    clf = build_classifier(recipe, "cpu")
    text = np.asarray(clf.encode_text([recipe.classifier.text_template.format(name=c.text) for c in vocab.classes]),
                      np.float32)
    bank = synthetic_bank(recipe, vocab.names, [c.kind for c in vocab.classes], text)
    g = torch.Generator().manual_seed(1)
    images = [(torch.rand(96, 96, 3, generator=g) * 255).to(torch.uint8).numpy() for _ in range(n_images)]
    seg = Segmenter.from_bank(bank, "cpu")
    for n in (0, proposals):  # warm-up: models, text cache, gather caches, the faiss class index (built once)
        bank.recipe.segmentation.thing_proposals = n
        seg.segment(images[0])
    times = {}
    for name, n in (("off", 0), ("proposals", proposals), ("off_again", 0)):
        bank.recipe.segmentation.thing_proposals = n
        t0 = time.perf_counter()
        kept = [len(seg.segment(im).kept) for im in images]
        times[name] = (time.perf_counter() - t0) / n_images
        out(f"lvis1203.segment.{name}.s_per_image", times[name])
        out(f"lvis1203.segment.{name}.kept_per_image", float(np.mean(kept)))
    base = (times["off"] + times["off_again"]) / 2
    out("lvis1203.segment.proposals_vs_off", times["proposals"] / base)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--sizes", default="10,20,40,60,88", help=f"comma-separated sizes among {sorted(SIZES)}")
    ap.add_argument("--scenes", type=int, default=48, help="scenes per size (96 for the whole vocabulary)")
    ap.add_argument("--seed", type=int, default=1000, help="vocabulary seed; scenes use seed + 1")
    ap.add_argument("--configs", default="today,before,recall", help=f"comma-separated among {', '.join(CONFIGS)}")
    ap.add_argument("--regions", choices=("none", "superpixels"), default=None,
                    help="override the toy recipe's segmentation.regions (superpixels) for every run")
    ap.add_argument("--no-prefilter-off", action="store_true", help="skip the runs with the pre-filter off")
    ap.add_argument("--confusions", type=int, default=5, help="top confusions printed per size and config")
    ap.add_argument("--bank", default=None, help="keep the all-classes toy bank in this folder and reuse it")
    ap.add_argument("--lvis-images", type=int, default=8, help="images for the 1203-class pre-filter measure (0: skip)")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                    help="override a segmentation value in every config (repeatable; e.g. proposal_min_area=0.03)")
    ap.add_argument("--lvis-only", action="store_true", help="only the 1203-class pre-filter measure")
    a = ap.parse_args(argv)
    import torch

    torch.set_num_threads(1)
    if a.lvis_images:
        lvis_prefilter(a.lvis_images)
        lvis_segment(a.lvis_images)
    if a.lvis_only:
        return 0
    recipe = load_recipe("toy")
    sizes = [int(s) for s in a.sizes.split(",")]
    for s in sizes:
        if s not in SIZES:
            ap.error(f"unknown size {s} (known: {sorted(SIZES)})")
    configs = a.configs.split(",")
    overrides = {}
    for kv in a.set:
        k, _, v = kv.partition("=")
        if not hasattr(recipe.segmentation, k) or not v:
            ap.error(f"--set {kv!r}: not KEY=VALUE with KEY a segmentation field")
        overrides[k] = type(getattr(recipe.segmentation, k))(v)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        if a.bank and os.path.isfile(os.path.join(a.bank, "manifests", "latest")):
            uri = a.bank
        else:
            uri = build_all(a.bank or os.path.join(tmp, "bank"), recipe)
        for size in sizes:
            nt, ns = SIZES[size]
            vocab = draw_vocab(nt, ns, a.seed + size)
            n_scenes = a.scenes * 2 if size >= 60 else a.scenes
            scenes = draw_scenes(vocab, n_scenes, a.seed + 1 + size)
            for config in configs:
                r = evaluate_vocab(uri, vocab, scenes, config, overrides=overrides, regions=a.regions)
                key = f"{config}.{size}"
                out(f"{key}.nanmean_miou", r["nanmean"])
                out(f"{key}.miou", r["miou"])
                out(f"{key}.background_iou", r["bg"])
                out(f"{key}.s_per_image", r["s_per_image"])
                out(f"{key}.prompts_per_image", r["prompts"])
                out(f"{key}.worst_iou", r["worst"][0][1])
                out(f"{key}.share_under_{TAIL_FLOOR:.2f}", r["under"])
                print(f"# {key} worst: " + ", ".join(f"{n} {v:.2f}" for n, v in r["worst"]), flush=True)
                worst3 = ", ".join(f"{n} {v:.2f}" for n, v in r["worst"][:3])
                row = [size, f"{nt}+{ns}", config, n_scenes, r["nanmean"], r["miou"], r["bg"], worst3, r["under"],
                       r["s_per_image"], r["prompts"]]
                if not a.no_prefilter_off:
                    q = evaluate_vocab(uri, vocab, scenes, config, ablate=("no_prefilter",), overrides=overrides,
                                       regions=a.regions)
                    out(f"{key}.no_prefilter.nanmean_miou", q["nanmean"])
                    out(f"{key}.no_prefilter.miou", q["miou"])
                    out(f"{key}.no_prefilter.background_iou", q["bg"])
                    out(f"{key}.no_prefilter.s_per_image", q["s_per_image"])
                    row += [q["nanmean"], q["miou"], q["bg"], q["s_per_image"]]
                rows.append(row)
                if a.confusions:
                    print("\n".join("#   " + line for line in
                                    evaluate.format_confusions(r["conf"], r["names"], a.confusions).splitlines()))
    print()
    head = (f"| size | things+stuff | config | scenes | nanmean | mIoU | bg IoU | worst 3 | under {TAIL_FLOOR:.2f} "
            "| s/image | prompts/image |")
    if not a.no_prefilter_off:
        head += " no pre-filter: nanmean | mIoU | bg IoU | s/image |"
    print(head)
    print("|" + "---|" * (head.count("|") - 1))
    for row in rows:
        cells = [str(c) if not isinstance(c, float) else (f"{c:.3f}" if c < 10 else f"{c:.0f}") for c in row]
        print("| " + " | ".join(cells) + " |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
