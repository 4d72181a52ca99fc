"""Model references -> something the libraries' own loaders take (a local folder or a hub id).

A reference is one of:
- a hub id (`stable-diffusion-v1-5/stable-diffusion-v1-5`, `timm/vit_base_patch8_224.dino`) or a library scheme
  (`open_clip:ViT-B-16/openai`, `hf-hub:...`): passed through; `HF_HOME` / `HF_HUB_OFFLINE` apply as usual;
- a local folder (absolute, `./relative`, `~/...` or `file://...`, or any existing directory);
- `s3://bucket/prefix`: copied once to a node-local cache under `$OVDIFF_CACHE` (default `~/.cache/ovdiff_ray`),
  under a file lock, into a temp folder renamed into place only when complete; each file's sha256 is checked
  against `weights.sha256.json` in the prefix when present (`{"relative/path": "<hex>"}`), and recorded;
- `tiny:<name>`: a tiny random model built by `tiny.py` into the cache (once, under a file lock).
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path

from filelock import FileLock

MANIFEST = "weights.sha256.json"  # optional, in an s3 prefix: expected sha256 per relative path
RECORD = ".ovdiff-sha256.json"  # written by us next to every cached copy: verified sha256 per relative path
PATH_PREFIXES = ("/", "./", "../", "~")


class ModelNotFoundError(FileNotFoundError):
    """A model reference that names nothing that exists (folder, s3 prefix, tiny model)."""


class ModelLoadError(RuntimeError):
    """A reference that resolved but that its library could not load; the message names the reference."""


class WeightsIntegrityError(RuntimeError):
    """A copied weights file whose sha256 differs from the prefix's manifest."""


@contextlib.contextmanager
def quiet_loading():
    """Silence diffusers/transformers progress bars and info/warning logs while loading or saving models."""
    from diffusers.utils import logging as dlog
    from transformers.utils import logging as tlog

    saved = [(lib, lib.get_verbosity(), lib.is_progress_bar_enabled()) for lib in (dlog, tlog)]
    for lib, _, _ in saved:
        lib.set_verbosity_error()
        lib.disable_progress_bar()
    try:
        yield
    finally:
        for lib, level, bar in saved:
            lib.set_verbosity(level)
            if bar:
                lib.enable_progress_bar()


def cache_root() -> Path:
    return Path(os.environ.get("OVDIFF_CACHE") or Path.home() / ".cache" / "ovdiff_ray").expanduser()


def is_local_ref(ref: str) -> bool:
    return ref.startswith(PATH_PREFIXES) or ref.startswith("file://") or os.path.isdir(ref)


def resolve_model(ref: str) -> str:
    """Model reference -> local folder (str) or hub id / library scheme passed through unchanged."""
    if not ref:
        raise ModelNotFoundError("empty model reference")
    if ref.startswith("tiny:"):
        return str(_tiny_folder(ref[len("tiny:"):]))
    if ref.startswith("s3://"):
        return str(_s3_folder(ref))
    if is_local_ref(ref):
        path = Path(ref.removeprefix("file://")).expanduser().resolve()
        if not path.is_dir():
            raise ModelNotFoundError(f"model folder {ref!r} does not exist ({path})")
        return str(path)
    return ref


def model_hash(ref: str) -> str:
    """Content hash of the weights a reference names (`sha256:<hex>`), or the reference itself for hub ids."""
    path = resolve_model(ref)
    if not os.path.isdir(path):
        return ref
    record = Path(path) / RECORD
    hashes = json.loads(record.read_text()) if record.is_file() else _hash_tree(Path(path))
    hashes.pop(MANIFEST, None)  # an s3 copy carries its manifest; the content is the rest
    blob = json.dumps(hashes, sort_keys=True).encode()
    return "sha256:" + hashlib.sha256(blob).hexdigest()


def sha256_file(path: Path, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def _hash_tree(folder: Path) -> dict[str, str]:
    files = sorted(p for p in folder.rglob("*") if p.is_file() and p.name != RECORD)
    return {p.relative_to(folder).as_posix(): sha256_file(p) for p in files}


def _commit(tmp: Path, final: Path) -> None:
    """Record sha256 of every file in `tmp`, then rename it to `final` (atomic on one filesystem)."""
    (tmp / RECORD).write_text(json.dumps(_hash_tree(tmp), indent=1, sort_keys=True))
    os.replace(tmp, final)


def _build_once(final: Path, fill) -> Path:
    """Create `final` with `fill(tmp_dir)` once per node: file lock, temp folder, rename; never a partial copy."""
    if final.is_dir():
        return final
    final.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(final) + ".lock"):
        if final.is_dir():
            return final
        tmp = Path(tempfile.mkdtemp(prefix=final.name + ".partial-", dir=final.parent))
        try:
            fill(tmp)
            tmp.chmod(0o755)
            _commit(tmp, final)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    return final


def _tiny_folder(name: str) -> Path:
    from . import tiny

    if name not in tiny.BUILDERS:
        known = ", ".join("tiny:" + k for k in tiny.BUILDERS)
        raise ModelNotFoundError(f"unknown tiny model 'tiny:{name}' (known: {known})")
    final = cache_root() / "models" / "tiny" / f"{name}-v{tiny.VERSION}"
    return _build_once(final, lambda tmp: tiny.build(name, tmp))


def s3_client():
    """boto3 S3 client from the standard environment, through the project's one storage factory."""
    from ..store.fs import StorageConfig, boto3_client

    return boto3_client(StorageConfig.from_env())


def split_s3(uri: str) -> tuple[str, str]:
    bucket, _, prefix = uri[len("s3://"):].partition("/")
    if not bucket:
        raise ModelNotFoundError(f"model reference {uri!r}: no bucket")
    prefix = prefix.strip("/")
    return bucket, prefix + "/" if prefix else ""


def _safe_rel(rel: str, uri: str) -> str:
    parts = rel.split("/")
    if not rel or rel.startswith("/") or any(p in ("", ".", "..") for p in parts):
        raise WeightsIntegrityError(f"{uri}: refusing object with unsafe relative path {rel!r}")
    return rel


def _s3_folder(uri: str) -> Path:
    bucket, prefix = split_s3(uri)
    key = hashlib.sha256(uri.rstrip("/").encode()).hexdigest()[:12]
    name = (prefix.strip("/").replace("/", "--") or "root") + "-" + key
    final = cache_root() / "models" / "s3" / bucket / name
    return _build_once(final, lambda tmp: _download_prefix(uri, bucket, prefix, tmp))


def _download_prefix(uri: str, bucket: str, prefix: str, dest: Path) -> None:
    """Copy every object under `prefix` into `dest`, checking sha256 against the prefix's manifest if any."""
    client = s3_client()
    keys = [o["Key"] for page in client.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix)
            for o in page.get("Contents", []) if not o["Key"].endswith("/")]
    if not keys:
        raise ModelNotFoundError(f"model reference {uri!r}: no objects under s3://{bucket}/{prefix}")
    for k in keys:
        target = dest / _safe_rel(k[len(prefix):], uri)
        target.parent.mkdir(parents=True, exist_ok=True)
        client.download_file(bucket, k, str(target))
    manifest = dest / MANIFEST
    if manifest.is_file():
        _verify(json.loads(manifest.read_text()), dest, uri)


def _verify(expected: dict[str, str], folder: Path, uri: str) -> None:
    for rel, want in sorted(expected.items()):
        path = folder / _safe_rel(rel, uri)
        if not path.is_file():
            raise WeightsIntegrityError(f"{uri}: {rel} is listed in {MANIFEST} but missing from the prefix")
        got = sha256_file(path)
        if got != want.lower():
            raise WeightsIntegrityError(
                f"{uri}: sha256 mismatch for {rel}: expected {want}, got {got} (corrupted or partial upload)")


def upload_folder(folder: str | Path, uri: str, manifest: bool = True) -> dict[str, str]:
    """Upload a model folder to `s3://bucket/prefix`, plus a `weights.sha256.json` manifest by default.

    Returns the sha256 of every file sent (relative path -> hex); the folder itself is not modified.
    """
    folder = Path(folder)
    hashes = {k: v for k, v in _hash_tree(folder).items() if k != MANIFEST}
    bucket, prefix = split_s3(uri)
    client = s3_client()
    for rel in hashes:
        client.upload_file(str(folder / rel), bucket, prefix + rel)
    if manifest:
        body = json.dumps(hashes, indent=1, sort_keys=True).encode()
        client.put_object(Bucket=bucket, Key=prefix + MANIFEST, Body=body)
    return hashes
