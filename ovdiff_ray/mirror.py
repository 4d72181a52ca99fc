"""`ovdiff weights mirror`: copy every model a recipe names to a folder or `s3://` prefix a cluster can read.

    ovdiff weights mirror --recipe paper --to s3://bucket/weights/ --recipe-out paper-s3.yaml

Sources: the local Hugging Face cache (hub ids, `timm:`, `open_clip:ARCH/TAG`; nothing is downloaded), folders,
`s3://` prefixes and `tiny:` models. Each model lands in `<to>/<slug>/` with only the files its loader reads (a
diffusers repo's root checkpoints are left out) and `weights.sha256.json` (sha256 per file), written last, so a
prefix with a manifest is complete; a folder target is filled under a temp name and renamed. `models/weights.py`
checks every file against that manifest when a node copies the prefix. The command prints the recipe lines that
point at the copies (and with `--recipe-out` writes the recipe with them).
"""
from __future__ import annotations

import json
import os
import re
import shutil
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

import yaml

from .models.weights import MANIFEST, RECORD, is_local_ref, resolve_model, s3_client, sha256_file, split_s3
from .preflight import (FIRST_FILE, OPEN_CLIP_WEIGHTS, SKIPPED_COMPONENTS, ModelUse, cached_snapshot, hub_repo,
                        hf_cache_dir, loader_files, model_uses)
from .recipe import Recipe, RecipeError, load_recipe
from .cli_help import Parser


class MirrorError(RuntimeError):
    """A model that cannot be mirrored; the message names the recipe key and what to do."""


@dataclass
class Source:
    """One model to copy: files (relative path -> local file) and generated files (relative path -> bytes)."""

    use: ModelUse
    files: dict[str, Path]
    generated: dict[str, bytes]


def slug(ref: str) -> str:
    """`stable-diffusion-v1-5/stable-diffusion-v1-5` -> `stable-diffusion-v1-5--stable-diffusion-v1-5`."""
    return re.sub(r"[^A-Za-z0-9._-]+", "--", ref.removeprefix("s3://").removeprefix("file://")).strip("-.") or "model"


def _tree(folder: Path) -> dict[str, Path]:
    return {p.relative_to(folder).as_posix(): p for p in sorted(folder.rglob("*"))
            if p.is_file() and p.name not in (RECORD, MANIFEST) and not p.name.endswith(".lock")}


def _loader_subset(loader: str, files: dict[str, Path]) -> dict[str, Path]:
    """Only what the loader reads: for a diffusers pipeline, model_index.json and its components' folders."""
    if loader != "diffusers" or "model_index.json" not in files:
        return files
    index = json.loads(files["model_index.json"].read_bytes())
    comps = {k for k, v in index.items() if not k.startswith("_") and k not in SKIPPED_COMPONENTS
             and isinstance(v, list) and None not in v}
    return {rel: p for rel, p in files.items() if rel == "model_index.json" or rel.split("/")[0] in comps}


def _open_clip_config(arch: str, tag: str) -> bytes:
    """`open_clip_config.json` for `local-dir:` loading of ARCH's TAG weights (quick_gelu kept, as for openai)."""
    import open_clip

    model_cfg = dict(open_clip.get_model_config(arch))
    pre = open_clip.get_pretrained_cfg(arch, tag)
    if pre.get("quick_gelu"):
        model_cfg["quick_gelu"] = True
    keys = ("mean", "std", "interpolation", "resize_mode")
    return json.dumps({"model_cfg": model_cfg, "preprocess_cfg": {k: pre[k] for k in keys if k in pre}},
                      indent=2).encode()


def source_of(use: ModelUse) -> Source:
    """Where `use`'s files are on this machine (nothing is downloaded from the hub)."""
    ref = use.ref
    if ref.startswith(("tiny:", "s3://")) or is_local_ref(ref):
        try:
            folder = Path(resolve_model(ref))
        except Exception as e:  # noqa: BLE001
            raise MirrorError(f"{use.where} {ref!r}: cannot read it here: {e}") from None
        if use.loader == "cutler" and folder.is_file():
            return Source(use, {folder.name: folder}, {})
        files = _loader_subset(use.loader, _tree(folder))
        return Source(use, files, {})
    if use.loader == "cutler" and Path(ref).expanduser().is_file():
        p = Path(ref).expanduser()
        return Source(use, {p.name: p}, {})
    repo, loader, bad = hub_repo(use)
    if bad:
        raise MirrorError(f"{use.where} {ref!r}: {bad}")
    if repo is None:
        raise MirrorError(f"{use.where} {ref!r}: names no weights to copy (random initialisation)")
    snap = cached_snapshot(repo, FIRST_FILE.get(loader, "config.json"))
    if snap is None and loader == "open_clip_weights":
        snap = cached_snapshot(repo, "open_clip_pytorch_model.bin")
    if snap is None:
        raise MirrorError(f"{use.where} {ref!r}: not in the local Hugging Face cache ({hf_cache_dir()}): run "
                          f"`hf download {repo}` on a machine with hub access first (or set HF_HOME to its cache)")
    files = _loader_subset(loader, _tree(snap))
    generated: dict[str, bytes] = {}
    if loader == "open_clip_weights":  # open_clip:ARCH/TAG -> a local-dir folder: one weights file + its config
        arch, _, tag = ref[len("open_clip:"):].partition("/")
        weights = next(n for n in OPEN_CLIP_WEIGHTS if n in files) if set(OPEN_CLIP_WEIGHTS) & set(files) else None
        if weights is None:
            raise MirrorError(f"{use.where} {ref!r}: the cached {repo} has no open_clip weights file")
        files = {weights: files[weights]}
        generated["open_clip_config.json"] = _open_clip_config(arch, tag)
    need = loader_files(use.loader if loader != "open_clip_weights" else "open_clip",
                        set(files) | set(generated), read=lambda rel: files[rel].read_bytes())
    if need:
        raise MirrorError(f"{use.where} {ref!r}: the cached copy ({snap}) lacks {', '.join(need)}: download it "
                          f"whole (`hf download {repo}`)")
    return Source(use, files, generated)


def _manifest(src: Source) -> dict[str, str]:
    import hashlib

    out = {rel: sha256_file(p) for rel, p in src.files.items()}
    out.update({rel: hashlib.sha256(b).hexdigest() for rel, b in src.generated.items()})
    return dict(sorted(out.items()))


def mirror_one(src: Source, target: str, force: bool = False) -> tuple[str, int, bool]:
    """Copy `src` to `target` (folder or s3 URI). Returns (target, bytes, copied: False if already there)."""
    hashes = _manifest(src)
    body = json.dumps(hashes, indent=1, sort_keys=True).encode()
    size = sum(p.stat().st_size for p in src.files.values()) + sum(map(len, src.generated.values()))
    if target.startswith("s3://"):
        bucket, prefix = split_s3(target)
        client = s3_client()
        try:
            have = client.get_object(Bucket=bucket, Key=prefix + MANIFEST)["Body"].read()
        except Exception:  # noqa: BLE001 - absent (or unreadable: the upload below says why)
            have = None
        if have is not None and json.loads(have) == hashes:
            return target, size, False
        if have is not None and not force:
            raise MirrorError(f"{target}: holds a different model (its {MANIFEST} differs): pass --force to "
                              "replace it, or choose another --to")
        for rel, p in src.files.items():
            client.upload_file(str(p), bucket, prefix + rel)
        for rel, b in src.generated.items():
            client.put_object(Bucket=bucket, Key=prefix + rel, Body=b)
        client.put_object(Bucket=bucket, Key=prefix + MANIFEST, Body=body)  # last: the prefix is now complete
        return target, size, True
    final = Path(target).expanduser()
    if (final / MANIFEST).is_file():
        if json.loads((final / MANIFEST).read_bytes()) == hashes:
            return str(final), size, False
        if not force:
            raise MirrorError(f"{final}: holds a different model (its {MANIFEST} differs): pass --force to "
                              "replace it, or choose another --to")
    elif final.exists() and any(final.iterdir()):
        raise MirrorError(f"{final}: exists and is not a mirrored model (no {MANIFEST}): choose another --to")
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=final.name + ".partial-", dir=final.parent))
    try:
        for rel, p in src.files.items():
            (tmp / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(p, tmp / rel)
        for rel, b in src.generated.items():
            (tmp / rel).write_bytes(b)
        (tmp / MANIFEST).write_bytes(body)
        tmp.chmod(0o755)
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return str(final), size, True


def mirror_recipe(recipe: Recipe, to: str, force: bool = False, log=print) -> dict[str, str]:
    """Mirror every model of `recipe` under `to`; returns recipe key -> new reference. Checks every source
    first, so a model that is missing here stops the command before anything is written."""
    to = to.rstrip("/")
    uses = model_uses(recipe)
    sources: dict[tuple[str, str], Source] = {}
    problems, tried = [], set()
    for use in uses:
        key = (use.ref, use.loader)
        if key not in tried:
            tried.add(key)
            try:
                sources[key] = source_of(use)
            except MirrorError as e:
                problems.append(str(e))
    if problems:
        raise MirrorError("\n".join(problems))
    new: dict[tuple[str, str], str] = {}
    for key, src in sources.items():
        dest = f"{to}/{slug(src.use.ref)}"
        where, size, copied = mirror_one(src, dest, force)
        new[key] = where
        log(f"ovdiff weights mirror: {src.use.ref} -> {where}: {len(src.files) + len(src.generated)} files, "
            f"{size / 1e6:.1f} MB{'' if copied else ' (already there, unchanged)'}")
    return {u.where: new[(u.ref, u.loader)] for u in uses}


def point_recipe(recipe: Recipe, refs: dict[str, str]) -> dict:
    """The recipe as a dict with its model references replaced (`refs`: recipe key -> reference)."""
    d = recipe.to_dict()
    for where, ref in refs.items():
        if where == "generation.model":
            d["generation"]["model"] = ref
        elif where == "classifier.model":
            d["classifier"]["model"] = ref
        elif where == "masks.cutler_weights":
            d["masks"]["cutler_weights"] = ref
        else:
            name = where[len("extractors["):-len("].model")]
            next(e for e in d["extractors"] if e["name"] == name)["model"] = ref
    return d


def main(argv: list[str] | None = None) -> int:
    """`ovdiff weights mirror --recipe R --to DIR|s3://bucket/prefix [--recipe-out FILE] [--force]`."""
    ap = Parser(prog="ovdiff weights", description="Model weights for clusters without hub access.",
                                 epilog=__doc__.split("\n\n", 1)[1])
    sub = ap.add_subparsers(dest="cmd", required=True)
    m = sub.add_parser("mirror", help="copy every model a recipe names to a folder or s3:// prefix")
    m.add_argument("--recipe", required=True, help="recipe name in bank/recipes or a YAML file")
    m.add_argument("--to", required=True, help="target folder or s3://bucket/prefix (one sub-folder per model)")
    m.add_argument("--recipe-out", default=None, help="write the recipe pointing at the copies to this YAML file (default: none written)")
    m.add_argument("--force", action="store_true", help="replace a different model already at a target")
    a = ap.parse_args(argv)
    try:
        recipe = load_recipe(a.recipe)
        if a.recipe_out and Path(a.recipe_out).exists() and not a.force:
            raise MirrorError(f"--recipe-out {a.recipe_out} exists (pass --force to overwrite)")
        refs = mirror_recipe(recipe, a.to, a.force)
    except (RecipeError, MirrorError) as e:
        for line in str(e).splitlines():
            print(f"ovdiff weights mirror: error: {line}", file=sys.stderr)
        print("summary: nothing mirrored", file=sys.stderr)
        return 2
    print("recipe lines pointing at the copies:")
    for where, ref in refs.items():
        print(f"  {where}: {ref}")
    if a.recipe_out:
        Path(a.recipe_out).write_text(f"# {recipe.name} with its models mirrored to {a.to}\n"
                                      + yaml.safe_dump(point_recipe(recipe, refs), sort_keys=False))
    print(f"summary: {len(set(refs.values()))} models mirrored to {a.to}"
          + (f", recipe written to {a.recipe_out}" if a.recipe_out else ""))
    return 0
