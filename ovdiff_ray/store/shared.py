"""One copy of a bank per node: a node-local cache of a version's arrays, memory-mapped read-only by every process.

`load_shared(uri, version)` gives the same `Bank` as `load_bank` (every shard sha256-verified on the way in), but
its arrays are `np.memmap`s of `.npy` files in a node-local cache folder, so Serve replicas and labelling actors on
one node share one copy in the page cache instead of holding one each. The first process on a node builds the cache
entry under a file lock (written to a temporary folder, renamed into place whole: readers never see half an entry);
the others map it (banks over `IN_PROCESS_MAX_BYTES` are decoded in a child process, so the decode buffers, about
three times the bank, never stay in a replica's heap). The cache folder is `OVDIFF_BANK_CACHE`, else `<tmp>/ovdiff-bank-cache-<uid>`; the newest
`KEEP_VERSIONS` entries per bank are kept (a process that still maps an older one keeps its pages).

    <cache>/<sha256(uri)[:16]>/<bank_id>-v<N>[-<subset>]/meta.json        names, kinds, manifest, array index
                                                       /<extractor>.<field>.npy, text.npy
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np

from .bank import Bank, BankArrays, Members
from .fs import Location, StorageConfig, StoreError
from .schema import ManifestError
from .shards import ShardError, load_bank, read_manifest

KEEP_VERSIONS = 3
IN_PROCESS_MAX_BYTES = 64 << 20  # larger banks are decoded in a child process (its transient copies die with it)
FIELDS = ("vectors", "class_idx", "kind", "level", "offsets")
MEMBER_FIELDS = ("flat", "offsets", "state")
CACHE_FORMAT = "ovdiff-bank-cache/3"  # /2: part members (explain.py) kept beside the arrays; /3: fit calibration


def cache_root() -> Path:
    env = os.environ.get("OVDIFF_BANK_CACHE")
    root = Path(env) if env else Path(tempfile.gettempdir()) / f"ovdiff-bank-cache-{os.getuid()}"
    root.mkdir(parents=True, exist_ok=True)
    return root


def _entry_dir(uri: str, manifest: dict, classes: list[str] | None) -> Path:
    bank = cache_root() / hashlib.sha256(uri.encode()).hexdigest()[:16]
    name = f"{manifest['bank_id']}-v{int(manifest['version'])}"
    if classes is not None:
        from ..vocab import fold

        name += "-" + hashlib.sha256("\n".join(sorted(fold(c) for c in classes)).encode()).hexdigest()[:12]
    # the manifest's content is part of the key: a bank re-created at the same URI never maps stale arrays
    digest = hashlib.sha256((CACHE_FORMAT + json.dumps(manifest["classes"], sort_keys=True)).encode()).hexdigest()[:8]
    return bank / f"{name}-{digest}"


def _write_entry(bank: Bank, target: Path) -> None:
    tmp = Path(tempfile.mkdtemp(dir=target.parent, prefix=f".{target.name}.", suffix=".tmp"))
    try:
        index = {}
        for ex, a in bank.extractors.items():
            index[ex] = {"dim": a.dim}
            for f in FIELDS:
                np.save(tmp / f"{ex}.{f}.npy", np.ascontiguousarray(getattr(a, f)))
            if a.source is not None:  # provenance (issue 21); entries from before it map without
                np.save(tmp / f"{ex}.source.npy", np.ascontiguousarray(a.source))
            if a.members is not None:
                for f in MEMBER_FIELDS:
                    np.save(tmp / f"{ex}.members_{f}.npy", np.ascontiguousarray(getattr(a.members, f)))
            if a.calibration is not None:  # fit calibration (issue 28; confidence.py)
                np.save(tmp / f"{ex}.calibration.npy", np.ascontiguousarray(a.calibration))
        np.save(tmp / "text.npy", np.ascontiguousarray(bank.text))
        meta = {"format": CACHE_FORMAT, "bank_id": bank.bank_id, "version": bank.version, "uri": bank.uri,
                "names": bank.names, "kinds": bank.kinds, "extractors": index, "manifest": bank.manifest}
        (tmp / "meta.json").write_text(json.dumps(meta))  # written last: an entry with meta.json is complete
        for f in tmp.iterdir():
            f.chmod(0o444)
        os.rename(tmp, target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _map_entry(d: Path) -> Bank:
    meta = json.loads((d / "meta.json").read_text())
    if meta.get("format") != CACHE_FORMAT:
        raise ManifestError(f"{d}: unknown bank cache format {meta.get('format')!r}")
    arrays = {ex: BankArrays(**{f: np.load(d / f"{ex}.{f}.npy", mmap_mode="r") for f in FIELDS},
                             source=np.load(d / f"{ex}.source.npy", mmap_mode="r")
                             if (d / f"{ex}.source.npy").is_file() else None,
                             members=Members(**{f: np.load(d / f"{ex}.members_{f}.npy", mmap_mode="r")
                                                for f in MEMBER_FIELDS})
                             if (d / f"{ex}.members_state.npy").is_file() else None,
                             calibration=np.load(d / f"{ex}.calibration.npy")
                             if (d / f"{ex}.calibration.npy").is_file() else None)
              for ex in meta["extractors"]}
    m = meta["manifest"]
    return Bank(meta["bank_id"], int(meta["version"]), Bank.recipe_of(m), list(meta["names"]), list(meta["kinds"]),
                np.load(d / "text.npy", mmap_mode="r"), arrays, manifest=m, uri=meta["uri"])


def _evict(bank_dir: Path, keep: Path) -> None:
    """Drop all but the newest KEEP_VERSIONS entries of one bank (never `keep`)."""
    entries = sorted((p for p in bank_dir.iterdir() if p.is_dir() and not p.name.startswith(".")),
                     key=lambda p: p.stat().st_mtime, reverse=True)
    for p in entries[KEEP_VERSIONS:]:
        if p != keep:
            shutil.rmtree(p, ignore_errors=True)


def load_shared(uri: str, version: int | None = None, classes: list[str] | None = None,
                storage_options: StorageConfig | dict | None = None) -> Bank:
    """A committed bank (latest or `version`; all classes or `classes`) as read-only memory-mapped arrays shared by
    every process of this node. Raises what `load_bank` raises (ShardError for a corrupt shard; nothing is cached
    then)."""
    from filelock import FileLock

    loc = Location(uri, storage_options)
    m = read_manifest(loc, version)
    if m is None:
        raise ManifestError(f"{uri}: no committed bank here (no manifests/)")
    d = _entry_dir(loc.uri, m, classes)
    if not (d / "meta.json").exists():
        d.parent.mkdir(parents=True, exist_ok=True)
        with FileLock(str(d.parent / f".{d.name}.lock"), timeout=3600):
            if not (d / "meta.json").exists():
                t0 = time.perf_counter()
                size = sum(int(c.get("bytes", 0)) for c in m["classes"])
                job = {"uri": uri, "version": int(m["version"]), "classes": classes, "dir": str(d),
                       "storage": storage_options.to_dict() if isinstance(storage_options, StorageConfig)
                       else storage_options}
                if size > IN_PROCESS_MAX_BYTES:
                    _build_in_child(job)  # the decode buffers (about 3x the bank) die with the child
                else:
                    _build(job)
                _evict(d.parent, d)
                import logging

                logging.getLogger("ovdiff.store").info("cached bank %s v%s for this node in %.1fs: %s",
                                                       m["bank_id"], m["version"], time.perf_counter() - t0, d)
    return _map_entry(d)


def _build(job: dict) -> None:
    bank = load_bank(job["uri"], job["version"], job["classes"], job["storage"])
    _write_entry(bank, Path(job["dir"]))
    os.utime(job["dir"])


CHILD_ERROR = "ovdiff-bank-cache-error: "
ERRORS = {"ShardError": ShardError, "ManifestError": ManifestError, "StoreError": StoreError}


def _build_in_child(job: dict) -> None:
    """`_build` in a fresh Python process; the job (storage settings included) goes over stdin, never argv."""
    import subprocess
    import sys

    r = subprocess.run([sys.executable, "-m", "ovdiff_ray.store.shared"], input=json.dumps(job).encode(),
                       capture_output=True, timeout=6 * 3600)
    if r.returncode != 0:
        lines = r.stderr.decode(errors="replace").strip().splitlines()
        err = next((json.loads(x[len(CHILD_ERROR):]) for x in reversed(lines) if x.startswith(CHILD_ERROR)), None)
        if err is not None and err["type"] in ERRORS:
            raise ERRORS[err["type"]](err["message"])
        tail = " | ".join(lines[-3:])[-600:]
        raise StoreError(f"building the node's bank copy failed (exit {r.returncode}): "
                         f"{err['type'] + ': ' + err['message'] if err else tail}")


def _child_main() -> int:
    import sys

    try:
        _build(json.loads(sys.stdin.buffer.read()))
    except Exception as e:  # noqa: BLE001 - reported to the parent on the last stderr line
        print(CHILD_ERROR + json.dumps({"type": type(e).__name__, "message": str(e)}), file=sys.stderr, flush=True)
        return 1
    return 0


def is_shared(bank: Bank) -> bool:
    """True when the bank's arrays are memory-mapped (shared with the other processes of the node)."""
    return all(isinstance(a.vectors, np.memmap) for a in bank.extractors.values())


if __name__ == "__main__":
    raise SystemExit(_child_main())
