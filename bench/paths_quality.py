"""Toy mIoU of banks built by the host path (`old`, numpy between the models) and the device pipeline (`new`): the
same vocabulary and scenes, drawn with seeds the method was not developed on. The device pipeline must not change
segmentation (issue 19: within 0.005 mIoU).

    python bench/paths_quality.py [--things 16] [--stuff 4] [--scenes 24] [--seed 2024]
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import vocab_bench as vb  # noqa: E402

from ovdiff_ray.recipe import load_recipe  # noqa: E402


def build(root: str, recipe, vocab, path: str) -> str:
    from ovdiff_ray.sample import SamplingModels, sample_class
    from ovdiff_ray.store.fs import Location
    from ovdiff_ray.store.shards import commit_manifest, new_manifest, write_shard

    models = SamplingModels.load(recipe, "cpu")
    loc = Location(root)
    entries = [write_shard(loc, sample_class(n, recipe, models, kind=k, path=path), i).to_entry()
               for i, (n, k) in enumerate(vocab)]
    commit_manifest(loc, new_manifest(f"paths-{path}", 1, recipe.to_dict(), entries))
    return root


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--things", type=int, default=16)
    ap.add_argument("--stuff", type=int, default=4)
    ap.add_argument("--scenes", type=int, default=24)
    ap.add_argument("--seed", type=int, default=2024, help="vocabulary and scene seed (development used 100)")
    a = ap.parse_args(argv)
    recipe = load_recipe("toy")
    vocab = vb.draw_vocab(a.things, a.stuff, a.seed)
    scenes = vb.draw_scenes(vocab, a.scenes, a.seed + 1)
    res = {}
    with tempfile.TemporaryDirectory() as tmp:
        for path, tag in (("host", "old"), ("device", "new")):
            t0 = time.perf_counter()
            uri = build(os.path.join(tmp, path), recipe, vocab, path)
            built = time.perf_counter() - t0
            r = vb.evaluate_vocab(uri, vocab, scenes, "new")
            res[tag] = r
            print(f"{tag}.build_s: {built:.1f}")
            print(f"{tag}.miou: {r['miou']:.4f}")
            print(f"{tag}.nanmean: {r['nanmean']:.4f}")
    print(f"new_vs_old.miou_diff: {res['new']['miou'] - res['old']['miou']:+.4f}")
    print(f"new_vs_old.nanmean_diff: {res['new']['nanmean'] - res['old']['nanmean']:+.4f}")
    print(f"summary: {len(vocab)} toy classes, {a.scenes} scenes, seed {a.seed}: mIoU old {res['old']['miou']:.4f} "
          f"new {res['new']['miou']:.4f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
