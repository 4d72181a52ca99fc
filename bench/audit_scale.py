"""`ovdiff bank audit` at LVIS size on the CPU (issue 26; not in `make bench`: it writes ~5 GB).

A synthetic 1203-class bank at the paper's geometry: per class a shard with the paper's rows (fg and bg: 1 class +
64 instance + 32 part prototypes) for SD (7680), DINO (768) and CLIP (768), and a support record of 64 thumbnails
(192 px JPEG, fg/bg and instance PNGs, 512-d classifier embeddings). Vectors are random; what is timed is the
audit's work at that size (read and sha256-check every shard and record, decode, the class-by-class similarity, the
support images against every class name). Prints the time of `audit_bank` and of the `ovdiff bank audit --json` run.

    python bench/audit_scale.py --out /tmp/lvis-audit [--classes 1203]
"""
from __future__ import annotations

import argparse
import io
import json
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from ovdiff_ray.prototypes import ClassPrototypes, ProtoSet  # noqa: E402
from ovdiff_ray.recipe import load_recipe  # noqa: E402
from ovdiff_ray.store.fs import Location  # noqa: E402
from ovdiff_ray.store.shards import commit_manifest, new_manifest, write_shard  # noqa: E402
from ovdiff_ray.store.support import RECORD_SCHEMA, SIGNALS  # noqa: E402

DIMS = {"sd": 7680, "dino": 768, "clip": 768}
N_IMAGES, PARTS, EMB = 64, 32, 512


def protoset(rng, d: int) -> ProtoSet:
    kinds, levels, source = [], [], []
    for k in ("fg", "bg"):
        kinds += [k] * (1 + N_IMAGES + PARTS)
        levels += ["class"] + ["instance"] * N_IMAGES + ["part"] * PARTS
        source += [-1] + list(range(N_IMAGES)) + [-1] * PARTS
    v = rng.standard_normal((len(kinds), d)).astype(np.float32)
    v /= np.linalg.norm(v, axis=1, keepdims=True)
    return ProtoSet(v, np.array(kinds), np.array(levels), np.array(source, np.int16))


def record_bytes(rng, name: str, thumbs: list[bytes], masks: list[bytes], inst: list[bytes]) -> bytes:
    import base64

    import pyarrow as pa
    import pyarrow.parquet as pq

    emb = rng.standard_normal((N_IMAGES, EMB)).astype("<f2")
    text = rng.standard_normal(EMB).astype("<f2")
    cols = {"index": pa.array(np.arange(N_IMAGES, dtype=np.int16)),
            "seed": pa.array(rng.integers(0, 2**62, N_IMAGES)), "kept": pa.array(np.ones(N_IMAGES, bool)),
            "dropped": pa.array([""] * N_IMAGES), "image": pa.array(thumbs, pa.binary()),
            "image_format": pa.array(["jpeg"] * N_IMAGES), "masks": pa.array(masks, pa.binary()),
            "instances": pa.array(inst, pa.binary()),
            **{s: pa.array(rng.random(N_IMAGES).astype(np.float32)) for s in SIGNALS},
            "embedding": pa.array([e.tobytes() for e in emb], pa.binary())}
    meta = {"schema": "ovdiff-support/1", "class": name, "kind": "thing", "prompt": "", "mode": "thumbnails",
            "image_size": [512, 512], "stored_size": [192, 192], "name_text": base64.b64encode(text.tobytes()).decode(),
            "prompt_text": base64.b64encode(text.tobytes()).decode()}
    buf = io.BytesIO()
    pq.write_table(pa.table(cols, schema=RECORD_SCHEMA.with_metadata({b"ovdiff.support": json.dumps(meta).encode()})),
                   buf, compression="none")
    return buf.getvalue()


def make_bank(root: str, n: int) -> None:
    import hashlib

    from PIL import Image
    from skimage import data

    from ovdiff_ray.store.support import instance_bits

    loc = Location(root)
    photos = [data.astronaut(), data.coffee(), data.chelsea(), data.rocket()]
    thumbs, masks, inst = [], [], []
    yy, xx = np.mgrid[:192, :192]
    for i in range(N_IMAGES):
        b = io.BytesIO()
        Image.fromarray(photos[i % 4]).resize((192, 192)).save(b, "JPEG", quality=85)
        thumbs.append(b.getvalue())
        m = np.where((yy - 96) ** 2 + (xx - 90 - i % 9) ** 2 < 50 ** 2, 2, np.where(yy > 170, 1, 0)).astype(np.uint8)
        b = io.BytesIO()
        Image.fromarray(m).save(b, "PNG")
        masks.append(b.getvalue())
        b = io.BytesIO()
        Image.fromarray(instance_bits(np.stack([m == 2, yy < 30, xx < 20]))).save(b, "PNG")
        inst.append(b.getvalue())
    rng = np.random.default_rng(0)
    entries = []
    t0 = time.perf_counter()
    for c in range(n):
        name = f"class {c:04d}"
        p = ClassPrototypes(name, "thing", {e: protoset(rng, d) for e, d in DIMS.items()},
                            rng.standard_normal(EMB).astype(np.float32), {})
        e = {**write_shard(loc, p, c).to_entry(), "id": c}
        rb = record_bytes(rng, name, thumbs, masks, inst)
        digest = hashlib.sha256(rb).hexdigest()
        key = f"support/class-{c:04d}-{digest[:16]}.parquet"
        loc.write_bytes(key, rb)
        e["support"] = {"key": key, "sha256": digest, "bytes": len(rb), "mode": "thumbnails", "rows": N_IMAGES}
        entries.append(e)
        if c % 100 == 0:
            print(f"  wrote {c + 1}/{n} classes ({time.perf_counter() - t0:.0f}s)", file=sys.stderr, flush=True)
    commit_manifest(loc, new_manifest("lvis-synthetic", 1, load_recipe("paper").to_dict(), entries))
    shard_b = sum(e["bytes"] for e in entries)
    rec_b = sum(e["support"]["bytes"] for e in entries)
    print(f"audit_scale.bank: {n} classes, shards {shard_b / 1e9:.2f} GB, records {rec_b / 1e9:.2f} GB")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", required=True)
    ap.add_argument("--classes", type=int, default=1203)
    a = ap.parse_args()
    if not (Path(a.out) / "manifests").is_dir():
        make_bank(a.out, a.classes)
    from ovdiff_ray.audit import audit_bank

    t0 = time.perf_counter()
    _, audits = audit_bank(a.out)
    t_fn = time.perf_counter() - t0
    t0 = time.perf_counter()
    run = subprocess.run([sys.executable, "-m", "ovdiff_ray.cli", "bank", "audit", a.out, "--json"],
                         capture_output=True, text=True)
    t_cli = time.perf_counter() - t0
    assert run.returncode == 0, run.stderr[-2000:]
    assert len(json.loads(run.stdout)) == a.classes
    print(f"audit_scale.audit_bank_s: {t_fn:.1f}  classes: {len(audits)}")
    print(f"audit_scale.cli_json_s: {t_cli:.1f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
