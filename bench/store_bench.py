"""Bank write/load throughput with the paper's shape, on local disk and on a moto S3 server started here.

Per class and extractor: 1 + 64 + 32 foreground and as many background prototypes; dims SD 7680, DINO 768,
CLIP 768; fp16. Load throughput is reported against reading the same bytes raw (plain file reads; boto3 get_object).

    python bench/store_bench.py [--classes N] [--keep URI]
"""
from __future__ import annotations

import argparse
import logging
import os
import shutil
import socket
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np

from ovdiff_ray.prototypes import ClassPrototypes, ProtoSet
from ovdiff_ray.recipe import load_recipe
from ovdiff_ray.store import Location, commit_manifest, load_bank, new_manifest, write_shard

DIMS = {"sd": 7680, "dino": 768, "clip": 768}
PER_REGION = [("class", 1), ("instance", 64), ("part", 32)]


def synthetic(name: str, rng: np.random.Generator) -> ClassPrototypes:
    sets = {}
    for ex, d in DIMS.items():
        kinds, levels, sources = [], [], []
        for kind in ("fg", "bg"):
            for level, n in PER_REGION:
                kinds += [kind] * n
                levels += [level] * n
                sources += list(range(n)) if level == "instance" else [-1] * n
        v = rng.standard_normal((len(kinds), d), dtype=np.float32)
        v /= np.linalg.norm(v, axis=1, keepdims=True)
        sets[ex] = ProtoSet(v, np.array(kinds, object), np.array(levels, object), np.array(sources, np.int16))
    t = rng.standard_normal(512).astype(np.float32)
    return ClassPrototypes(name, "thing", sets, t / np.linalg.norm(t))


def run(uri: str, protos: list[ClassPrototypes], recipe, raw_read) -> dict:
    loc = Location(uri)
    t0 = time.perf_counter()
    with ThreadPoolExecutor(4) as ex:
        infos = list(ex.map(lambda ip: write_shard(loc, ip[1], ip[0]), enumerate(protos)))
    commit_manifest(loc, new_manifest("bench", 1, recipe.to_dict(), [i.to_entry() for i in infos]))
    t_write = time.perf_counter() - t0
    nbytes = sum(i.bytes for i in infos)
    t0 = time.perf_counter()
    bank = load_bank(uri)
    t_cold = time.perf_counter() - t0  # first load in this process: fresh allocations, lazy library init
    assert len(bank.names) == len(protos)
    del bank
    t0 = time.perf_counter()
    load_bank(uri)
    t_load = time.perf_counter() - t0
    t0 = time.perf_counter()
    with ThreadPoolExecutor(8) as ex:
        raw = sum(ex.map(raw_read, [i.shard for i in infos]))
    t_raw = time.perf_counter() - t0
    assert raw == nbytes
    return {"bytes": nbytes, "write_mb_s": nbytes / t_write / 1e6, "load_mb_s": nbytes / t_load / 1e6, "cold_load_mb_s": nbytes / t_cold / 1e6,
            "raw_mb_s": nbytes / t_raw / 1e6, "load_s": t_load}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--classes", type=int, default=40, help="classes in the synthetic bank (default 40)")
    ap.add_argument("--keep", default=None, help="also write the bank here and leave it (path or s3:// with AWS_ENDPOINT_URL)")
    a = ap.parse_args()
    recipe = load_recipe("paper")
    rng = np.random.default_rng(0)
    protos = [synthetic(f"class {i:04d}", rng) for i in range(a.classes)]
    per_class = sum(len(s) * s.dim * 2 for s in protos[0].sets.values())
    print(f"sizes: classes={a.classes} rows_per_class={protos[0].rows} dims={DIMS} fp16")

    tmp = tempfile.mkdtemp(prefix="store-bench-")
    try:
        local = os.path.join(tmp, "bank")
        r = run(local, protos, recipe, lambda k: len(open(os.path.join(local, k), "rb").read()))
        print(f"bank_bytes: {r['bytes']}")
        print(f"local_write_mb_s: {r['write_mb_s']:.1f}")
        print(f"local_first_load_mb_s: {r['cold_load_mb_s']:.1f}")
        print(f"local_load_mb_s: {r['load_mb_s']:.1f}")
        print(f"local_raw_read_mb_s: {r['raw_mb_s']:.1f}")
        print(f"local_load_vs_raw: {r['load_mb_s'] / r['raw_mb_s']:.2f}")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)

    from moto.server import ThreadedMotoServer

    import boto3

    logging.getLogger("werkzeug").setLevel(logging.ERROR)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    endpoint = f"http://127.0.0.1:{port}"
    saved = {k: os.environ.get(k) for k in ("AWS_ENDPOINT_URL", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY")}
    os.environ.update(AWS_ENDPOINT_URL=endpoint, AWS_ACCESS_KEY_ID="bench", AWS_SECRET_ACCESS_KEY="bench")
    try:
        client = boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1")
        client.create_bucket(Bucket="bench")
        r = run("s3://bench/bank", protos, recipe,
                lambda k: len(client.get_object(Bucket="bench", Key=f"bank/{k}")["Body"].read()))
        print(f"s3_write_mb_s: {r['write_mb_s']:.1f}")
        print(f"s3_first_load_mb_s: {r['cold_load_mb_s']:.1f}")
        print(f"s3_load_mb_s: {r['load_mb_s']:.1f}")
        print(f"s3_raw_get_mb_s: {r['raw_mb_s']:.1f}")
        print(f"s3_load_vs_raw: {r['load_mb_s'] / r['raw_mb_s']:.2f}")
    finally:
        server.stop()
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
    if a.keep:
        loc = Location(a.keep)
        infos = [write_shard(loc, p, i) for i, p in enumerate(protos)]
        commit_manifest(loc, new_manifest("bench", 1, recipe.to_dict(), [i.to_entry() for i in infos]))
        print(f"kept: {a.keep}")
    print(f"lvis_1203_bank_bytes: {per_class * 1203} ({per_class * 1203 / 1e9:.2f} GB)")


if __name__ == "__main__":
    main()
