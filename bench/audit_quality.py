"""Does `ovdiff bank audit` find classes built from the wrong words? (issue 26 goal; not in `make bench`: minutes)

Per draw (a seed): a toy vocabulary of `--classes` classes (things and stuff drawn from the toy world's words), the
toy recipe with `seed` = the draw's seed, and two classes built from wrong words in the vocabulary's `prompt` column:

- `prompt_thing`: a thing whose prompt names another thing of the bank;
- `prompt_stuff`: a thing whose prompt names a stuff texture (`<colour> <texture>`).

The bank is built in this process (the class pipeline, shards and support records as `build_bank` writes them,
one manifest), then audited. Prints the two classes' ranks (1 = worst) per draw and how many draws have both in the
top 3. The toy world is not changed.

    python bench/audit_quality.py --out /tmp/aq --jobs 2   # 5 draws, seeds 100..104 (not used while developing)
    python bench/audit_quality.py --out /tmp/aq --draws 2 --first-seed 0   # the draws development used
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from ovdiff_ray.audit import audit_bank  # noqa: E402
from ovdiff_ray.models.toy import COLOURS, SHAPES, TEXTURES  # noqa: E402
from ovdiff_ray.recipe import load_recipe  # noqa: E402
from ovdiff_ray.sample import SamplingModels, sample_class  # noqa: E402
from ovdiff_ray.store.fs import Location  # noqa: E402
from ovdiff_ray.store.schema import slug  # noqa: E402
from ovdiff_ray.store.shards import commit_manifest, new_manifest, write_shard  # noqa: E402
from ovdiff_ray.store.support import write_record  # noqa: E402


def draw_vocab(seed: int, n: int, stuff: int) -> tuple[list[tuple[str, str, str]], str, str]:
    """-> ([(name, kind, prompt)], the class with a thing's prompt, the class with a stuff prompt)."""
    rng = np.random.default_rng(seed)
    things = [f"{c} {s}" for c in COLOURS for s in SHAPES]
    stuffs = [f"{c} {t}" for c in COLOURS for t in TEXTURES]
    th = [things[i] for i in rng.permutation(len(things))[: n - stuff]]
    st = [stuffs[i] for i in rng.permutation(len(stuffs))[:stuff]]
    a, other, c = (th[i] for i in rng.permutation(len(th))[:3])
    texture = stuffs[rng.integers(len(stuffs))]
    rows = [(t, "thing", other if t == a else texture if t == c else "") for t in th] + [(s, "stuff", "") for s in st]
    order = rng.permutation(len(rows))
    return [rows[i] for i in order], a, c


_MODELS: dict = {}


def _init(recipe_name: str, seed: int) -> None:
    recipe = load_recipe(recipe_name)
    recipe.seed = seed
    _MODELS["recipe"] = recipe
    _MODELS["models"] = SamplingModels.load(recipe, "cpu")


def entry_key(name: str, kind: str, prompt: str) -> str:
    return f"entries/{slug(name)}-{slug(prompt or '-')}-{kind}.json"


def build_one(pool: str, key: tuple[str, str, str]) -> float:
    """Build one class (name, kind, prompt) into the pool folder (shard + record + entry JSON) -> seconds."""
    name, kind, prompt = key
    loc = Location(pool)
    if loc.exists(entry_key(*key)):
        return 0.0
    if not _MODELS:
        _init("toy", 0)
    t0 = time.perf_counter()
    p = sample_class(name, _MODELS["recipe"], _MODELS["models"], kind=kind, prompt=prompt)
    e = {**write_shard(loc, p, 0).to_entry(), "n_images": p.info["kept"], "seconds": time.perf_counter() - t0}
    if p.support is not None:
        e["support"] = write_record(loc, p.name, p.kind, p.prompt, p.support).to_entry()
    loc.write_bytes(entry_key(*key), json.dumps(e).encode())
    print(f"built {name!r} (prompt {prompt!r}) in {e['seconds']:.1f}s", file=sys.stderr, flush=True)
    return e["seconds"]


def assemble(pool: str, root: str, rows, seed: int, recipe) -> None:
    """One draw's bank from the pool: its shards and records copied, one manifest."""
    src, dst = Location(pool), Location(root)
    entries = []
    for cid, (name, kind, prompt) in enumerate(rows):
        e = json.loads(src.read_bytes(entry_key(name, kind, prompt)))
        for key in (e["shard"], (e.get("support") or {}).get("key")):
            if key and not dst.exists(key):
                dst.write_bytes(key, src.read_bytes(key))
        entries.append({**e, "id": cid})
    commit_manifest(dst, new_manifest(f"audit-{seed}", 1, recipe.to_dict(), entries))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--draws", type=int, default=5)
    ap.add_argument("--first-seed", type=int, default=100)
    ap.add_argument("--classes", type=int, default=40)
    ap.add_argument("--stuff", type=int, default=8, help="stuff classes per draw (default 8)")
    ap.add_argument("--recipe", default="toy")
    ap.add_argument("--bank-seed", type=int, default=0, help="the recipe's seed for every draw (default 0, the toy "
                    "recipe's own)")
    ap.add_argument("--out", default=None, help="keep the banks here (default: a temporary folder)")
    ap.add_argument("--pool", default=None, help="built classes kept here and reused by later runs (default: "
                    "OUT/pool)")
    ap.add_argument("--jobs", type=int, default=1, help="processes building classes (default 1)")
    a = ap.parse_args()
    tmp = tempfile.TemporaryDirectory() if a.out is None else None
    out = Path(a.out or tmp.name)
    recipe = load_recipe(a.recipe)
    recipe.seed = a.bank_seed
    draws = {seed: draw_vocab(seed, a.classes, a.stuff) for seed in range(a.first_seed, a.first_seed + a.draws)}
    pool = str(Path(a.pool) if a.pool else out / "pool")
    import multiprocessing as mp
    from concurrent.futures import ProcessPoolExecutor

    ex = ProcessPoolExecutor(a.jobs, mp_context=mp.get_context("spawn"), initializer=_init,
                             initargs=(a.recipe, a.bank_seed))
    both = 0
    for seed, (rows, bad_thing, bad_stuff) in draws.items():  # one draw at a time: its classes, then its audit
        t_build = time.perf_counter()
        todo = [r for r in rows if not Location(pool).exists(entry_key(*r))]
        list(ex.map(build_one, [pool] * len(todo), todo))
        print(f"draw.{seed}.classes_built: {len(todo)} in {time.perf_counter() - t_build:.0f}s", flush=True)
        root = str(out / f"draw-{seed}")
        assemble(pool, root, rows, seed, recipe)
        t0 = time.perf_counter()
        _, audits = audit_bank(root)
        t_audit = time.perf_counter() - t0
        names = [x.name for x in audits]
        r1, r2 = names.index(bad_thing) + 1, names.index(bad_stuff) + 1
        prompts = {n: p for n, _, p in rows}
        both += r1 <= 3 and r2 <= 3
        print(f"draw.{seed}.prompt_thing: rank {r1} ({bad_thing!r} built from {prompts[bad_thing]!r})")
        print(f"draw.{seed}.prompt_stuff: rank {r2} ({bad_stuff!r} built from {prompts[bad_stuff]!r})")
        print(f"draw.{seed}.top3: {', '.join(repr(x.name) + (' [' + x.reasons[0] + ']' if x.reasons else '') for x in audits[:3])}")
        print(f"draw.{seed}.audit_s: {t_audit:.2f}", flush=True)
    ex.shutdown()
    print(f"audit.both_in_top3: {both}/{a.draws}")
    return 0 if both == a.draws else 1


if __name__ == "__main__":
    sys.exit(main())
