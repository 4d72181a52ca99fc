"""Preflight: every cheap check a job can make on the driver before Ray starts, as one typed result.

`build_bank`, `label_dataset` and `ovdiff serve` run it first. Each problem is one line that names the thing and
says what to do; a job with problems exits 2 having started and written nothing.

- vocabulary and recipe parse (`vocab_import.read_vocabulary`, `recipe.load_recipe`);
- every model reference of the recipe (`model_uses`): a folder has the files its loader needs (`loader_files`),
  a hub id is in the local Hugging Face cache or the hub answers (`hub_timeout` seconds, never with
  `HF_HUB_OFFLINE=1`), an `s3://` prefix lists and holds `weights.sha256.json` naming those files, a `tiny:` name
  exists;
- the bank location is writable (a temp file created and removed; on S3 one PUT and DELETE of a probe key);
- the device each worker will run the models on (`device.check_device`): a recipe with real (not `tiny:`) models
  on workers with 0 GPUs is refused unless `--device cpu` says so;
- the cluster has the GPUs and CPUs asked for (`Resources`): asked of Ray (and its autoscaler's limits) only when a
  cluster is there to ask, otherwise this machine's, which a local Ray would get, detected without starting Ray.
"""
from __future__ import annotations

import os
import tempfile
import uuid
from dataclasses import dataclass
from pathlib import Path

from ..recipe import Recipe, RecipeError, load_recipe, recipe_from_dict
from ..store.fs import Location, StoreError
from ..vocab import VocabError
from .cluster import (check_resources, cluster_resources, default_workers, local_ray_would_start, local_resources,
                      ray_resources)
from .device import DEVICES, check_cpu_builds, check_device, device_help, real_models, resolve_device
from .models import (FIRST_FILE, HUB_TIMEOUT, OPEN_CLIP_WEIGHTS, SKIPPED_COMPONENTS, ModelUse, cached_snapshot,
                     check_model, check_models, hf_cache_dir, hub_repo, loader_files, model_uses, s3_client, s3_error)
from .result import Preflight, Problem, Resources

__all__ = ["Preflight", "Problem", "Resources", "ModelUse", "check_vocab", "check_recipe", "check_models",
           "check_model", "check_writable", "check_bank", "check_resources", "cluster_resources", "default_workers",
           "local_ray_would_start", "local_resources", "ray_resources", "model_uses", "loader_files",
           "gpu_seconds_per_class", "preflight_load", "run_for_load", "FIRST_FILE", "OPEN_CLIP_WEIGHTS",
           "SKIPPED_COMPONENTS", "cached_snapshot", "hf_cache_dir", "hub_repo", "DEVICES", "device_help",
           "check_device", "check_cpu_builds", "real_models", "resolve_device"]


def check_vocab(pf: Preflight, path: str) -> None:
    from ..vocab_import import read_vocabulary

    try:
        pf.vocab = read_vocabulary(path)
    except VocabError as e:
        pf.add("--vocab", f"{e} (fix the file, or see bank/vocab/README.md for the formats)")
        return
    stuff = sum(c.kind == "stuff" for c in pf.vocab.classes)
    pf.notes.append(f"vocab {path}: {len(pf.vocab)} classes ({len(pf.vocab) - stuff} thing, {stuff} stuff)")


def check_recipe(pf: Preflight, name_or_path: str | None = None, data: dict | None = None,
                 source: str = "recipe") -> None:
    try:
        pf.recipe = load_recipe(name_or_path) if data is None else recipe_from_dict(data, source)
    except RecipeError as e:
        pf.add("--recipe" if data is None else source, str(e))
        return
    pf.notes.append(f"recipe {pf.recipe.summary()}")


def check_writable(pf: Preflight, uri: str, flag: str = "--out") -> None:
    """The location accepts writes; the probe leaves nothing behind (a local folder that does not exist yet is
    not created: its nearest existing parent is probed)."""
    thing = f"{flag} {uri}"
    try:
        loc = Location(uri)
    except StoreError as e:
        pf.add(flag, str(e))
        return
    if loc.is_s3:
        key = loc.s3_key(f".ovdiff-preflight-{uuid.uuid4().hex}")
        try:
            client = s3_client()
            client.put_object(Bucket=loc.bucket, Key=key, Body=b"")
            client.delete_object(Bucket=loc.bucket, Key=key)
        except Exception as e:  # noqa: BLE001
            pf.add(thing, f"cannot write there: {s3_error(e)}; fix the bucket name or the credentials "
                          "(s3:PutObject and s3:DeleteObject are needed), or choose another location")
            return
        pf.notes.append(f"{thing}: writable (S3)")
        return
    path = Path(loc.root)
    if path.exists() and not path.is_dir():
        pf.add(thing, f"{path} is a file, not a folder: choose another location")
        return
    probe_dir = path
    while not probe_dir.exists():
        probe_dir = probe_dir.parent
    if not probe_dir.is_dir():
        pf.add(thing, f"{probe_dir} is a file, so {path} cannot be created: choose another location")
        return
    try:
        fd, tmp = tempfile.mkstemp(dir=probe_dir, prefix=".ovdiff-preflight-")
        os.close(fd)
        os.unlink(tmp)
    except OSError as e:
        pf.add(thing, f"cannot write in {probe_dir} ({e.strerror}): choose a writable location or fix its "
                      "permissions")
        return
    pf.notes.append(f"{thing}: writable" + ("" if probe_dir == path else f" ({path} will be created)"))


def check_bank(pf: Preflight, uri: str, version: int | None = None, flag: str = "--bank") -> dict | None:
    """A committed bank is there and readable; its recipe becomes `pf.recipe`. Returns the manifest."""
    from ..store.schema import ManifestError
    from ..store.shards import read_manifest

    thing = f"{flag} {uri}"
    try:
        m = read_manifest(Location(uri), version)
    except (StoreError, ManifestError, OSError) as e:
        pf.add(thing, f"cannot read the bank: {e}")
        return None
    except Exception as e:  # noqa: BLE001 - e.g. S3 credentials or endpoint
        pf.add(thing, f"cannot read the bank: {s3_error(e)}")
        return None
    if m is None:
        pf.add(thing, "no committed bank there (no manifests/latest): build one with build_bank, or fix the URI")
        return None
    pf.notes.append(f"{thing}: bank {m['bank_id']} v{m['version']}, {len(m['classes'])} classes")
    check_recipe(pf, data=m["recipe"], source=f"{thing} (its recipe)")
    return m


PAPER_CLASS_SECONDS = 210.0  # OVDIFF.md: sampling one class on one GPU at N=64, 30 steps, 512 px


@dataclass(frozen=True)
class MeasuredCost:
    """Seconds per class measured for a recipe's models (generator and extractors, exact references) at N images,
    `steps` steps and `px` pixels, on `device`, by `source`."""

    generator: str
    extractors: tuple[str, ...]
    seconds: float
    n: int
    steps: int
    px: int
    device: str
    source: str


# paper.yaml's / paper-plus.yaml's models: issue 19's class pipeline, full-size architectures (same FLOPs), MaskCut
# with its CRF; README "Performance", the class_bench row.
MEASURED = (
    MeasuredCost("stable-diffusion-v1-5/stable-diffusion-v1-5",
                 ("stable-diffusion-v1-5/stable-diffusion-v1-5", "timm/vit_base_patch8_224.dino",
                  "open_clip:ViT-B-16/openai"), 17.7, 64, 30, 512, "one H200", "make bench-gpu"),
)


@dataclass(frozen=True)
class ClassCost:
    """An estimate of GPU seconds per class and what it is scaled from."""

    seconds: float
    basis: str  # e.g. "measured 17.7 s a class of these models on one H200 (make bench-gpu) at N=64, 30 steps, 512 px"


def class_cost(recipe: Recipe) -> ClassCost | None:
    """GPU seconds to build one class of `recipe`: a measurement of the recipe's models (`MEASURED`) when one
    exists, else the paper's 210 s; scaled by N x steps x pixels. None for generators without a GPU (toy)."""
    g = recipe.generation
    if g.generator != "diffusers":
        return None
    models = tuple(e.model for e in recipe.extractors)
    for m in MEASURED:
        if m.generator == g.model and m.extractors == models:
            base, n, steps, px = m.seconds, m.n, m.steps, m.px
            basis = (f"measured {m.seconds:g} s a class of these models on {m.device} ({m.source}) at N={m.n}, "
                     f"{m.steps} steps, {m.px} px")
            break
    else:
        base, n, steps, px = PAPER_CLASS_SECONDS, 64, 30, 512
        basis = (f"no measurement of these models: the paper's {PAPER_CLASS_SECONDS:.0f} s per class on one GPU at "
                 "N=64, 30 steps, 512 px")
    if (g.n_images, g.steps, g.resolution) != (n, steps, px):
        basis += f", scaled to N={g.n_images}, {g.steps} steps, {g.resolution} px"
    return ClassCost(base * (g.n_images / n) * (g.steps / steps) * (g.resolution / px) ** 2, basis)


def gpu_seconds_per_class(recipe: Recipe) -> float | None:
    """Estimated GPU seconds to build one class (`class_cost`); None for toy."""
    c = class_cost(recipe)
    return None if c is None else c.seconds


def human_seconds(s: float) -> str:
    if s < 120:
        return f"{s:.0f} s"
    if s < 7200:
        return f"{s / 60:.0f} min"
    return f"{s / 3600:.1f} h"


def preflight_load(banks: list[tuple[str, int | None]], hub_timeout: float = HUB_TIMEOUT,
                   recipes: list[Recipe] | None = None) -> Preflight:
    """For jobs that load banks (`label_dataset`, `ovdiff serve`): each bank readable, its recipe's models.
    `recipes` (optional) receives each distinct recipe of the banks."""
    pf = Preflight()
    checked: set[str] = set()
    for uri, version in banks:
        sub = Preflight()
        check_bank(sub, uri, version)
        if sub.recipe is not None and sub.recipe.sha256() not in checked:
            checked.add(sub.recipe.sha256())
            check_models(sub, sub.recipe, hub_timeout)
            if recipes is not None:
                recipes.append(sub.recipe)
        pf.problems += sub.problems
        pf.notes += sub.notes
        pf.recipe = pf.recipe or sub.recipe
    return pf


def run_for_load(prog: str, banks: list[tuple[str, int | None]], *, address: str | None = None,
                 workers: int | None = None, gpus: float = 0.0, cpus: float = 1.0, what: str = "worker",
                 flags: tuple[str, str, str] = ("--workers", "--gpus-per-worker", "--cpus-per-worker"),
                 device: str = "auto", builds: tuple[str, float] | None = None, file=None) -> int:
    """The preflight of a loading job, as one call at the start of its `main`: the banks and their models, the
    device (`device` against `gpus` per `what`; `builds` = (flag, GPUs per class-building worker) when the job
    also builds classes), then (only when those pass) the cluster for `workers` x (`cpus`, `gpus`); `workers`
    None = one per `gpus` GPUs, or 1. Prints one line per problem; returns 2 on problems, else 0."""
    import sys

    out = file or sys.stderr
    recipes: list[Recipe] = []
    pf = preflight_load(banks, recipes=recipes)
    check_device(pf, recipes, device, gpus, gpus_flag=flags[1], what=what,
                 cost="many times a GPU's seconds per image")
    if builds is not None:
        check_cpu_builds(pf, recipes, device, builds[1], gpus_flag=builds[0])
    if pf.ok and (gpus > 0 or workers):
        res = cluster_resources(pf, address)
        if res is not None:
            n = workers or (max(1, int(res.gpus // gpus)) if gpus > 0 else 1)
            check_resources(pf, res, n, gpus, cpus, what, flags)
    if not pf.ok:
        pf.report(prog, out)
        print(f"summary: preflight found {len(pf.problems)} problem(s); nothing was started or written", file=out)
        return 2
    return 0
