"""The class pipeline on the device (issue 19): the same masks and prototypes as the host path (numpy between the
models, kept as `sample_host`), deterministic k-means with scikit-learn's tolerance stop, and the CRF pool beside
the device changing nothing in a shard. The class bench runs end to end in a small size (not timed)."""
from __future__ import annotations

import dataclasses
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from ovdiff_ray.models.masks import MaskCut, maskcut
from ovdiff_ray.pipeline.kmeans import kmeans
from ovdiff_ray.pipeline.maskcut import maskcut_batch
from ovdiff_ray.recipe import load_recipe
from ovdiff_ray.sample import SamplingModels, sample_class

ROOT = Path(__file__).resolve().parents[1]


def structured_keys(h: int, d: int, seed: int, blobs: int = 3) -> np.ndarray:
    """Keys with object structure: a background cut by two lines, `blobs` discs, a random vector per region, and
    noise strong enough that the thresholded affinity varies inside regions (as real DINO keys do)."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:h, :h] / h
    cuts = []
    for lo in (0.2, 0.3):
        a = rng.uniform(0, np.pi)
        cuts.append((np.cos(a) * (yy - 0.5) + np.sin(a) * (xx - 0.5)) > rng.uniform(-lo, lo))
    lab = cuts[0].astype(int) + 2 * (cuts[1] & ~cuts[0])
    for k in range(blobs):
        cy, cx = rng.uniform(0.25, 0.75, 2)
        r = rng.uniform(0.08, 0.18)
        lab[(yy - cy) ** 2 + (xx - cx) ** 2 < r * r] = 3 + k
    vec = rng.normal(size=(3 + blobs, d))
    return (vec[lab].transpose(2, 0, 1) + (2.2 if d > 100 else 1.2) * rng.normal(size=(d, h, h))).astype(np.float32)


@pytest.mark.parametrize("side,dim,n", [(16, 32, 12), (60, 768, 3)])  # toy-sized keys; DINO ViT-B/8 at 480 px
def test_device_maskcut_gives_the_numpy_masks(side, dim, n):
    keys = np.stack([structured_keys(side, dim, 500 + i) for i in range(n)])
    ref = [maskcut(k, 3, 0.15) for k in keys]
    got = maskcut_batch(torch.from_numpy(keys), 3, 0.15)
    ious = []
    for i, r in enumerate(ref):
        assert int(got.counts[i]) == len(r), f"image {i}: {int(got.counts[i])} masks, numpy {len(r)}"
        assert not got.masks[i, int(got.counts[i]):].any()  # padding stays empty
        for j, m in enumerate(r):
            g = got.masks[i, j].numpy()
            ious.append((g & m).sum() / max((g | m).sum(), 1))
    assert sum(len(r) for r in ref) >= n  # the keys have objects to cut
    assert np.mean(np.array(ious) >= 0.99) >= 0.95, ious


def test_kmeans_is_deterministic_and_tol_stops_earlier():
    rng = np.random.default_rng(2)
    x = torch.from_numpy(np.concatenate([c + rng.normal(size=(400, 16)) for c in rng.normal(size=(6, 16)) * 2])
                         .astype(np.float32))
    a, b = kmeans(x, 6, 300, seed=3), kmeans(x, 6, 300, seed=3)
    assert torch.equal(a, b)
    calls = {"n": 0}
    orig = torch.nn.functional.one_hot

    def counting(*args, **kw):
        calls["n"] += 1
        return orig(*args, **kw)

    torch.nn.functional.one_hot = counting
    try:
        kmeans(x, 6, 300, seed=3, tol=0.0)
        fixed_iters, calls["n"] = calls["n"], 0
        loose = kmeans(x, 6, 300, seed=3, tol=0.5)
        loose_iters = calls["n"]
    finally:
        torch.nn.functional.one_hot = orig
    assert loose_iters < fixed_iters  # a loose tolerance stops before the fixed point

    def inertia(c):
        return float(torch.cdist(x, c).min(1).values.pow(2).sum())

    assert inertia(loose) <= inertia(a) * 1.05


@pytest.fixture(scope="module")
def toy_models():
    r = load_recipe("toy")
    return r, SamplingModels.load(r, "cpu")


@pytest.mark.parametrize("name,kind", [("red circle", "thing"), ("blue checks", "stuff")])
def test_device_path_builds_the_host_paths_prototypes(toy_models, name, kind):
    r, m = toy_models
    host = sample_class(name, r, m, kind=kind, path="host")
    dev = sample_class(name, r, m, kind=kind, path="device")
    assert host.info["kept"] == dev.info["kept"] > 0
    for k in host.sets:
        a, b = host.sets[k], dev.sets[k]
        assert list(a.kind) == list(b.kind) and list(a.level) == list(b.level)
        np.testing.assert_array_equal(a.source, b.source)
        pooled = a.level != "part"
        np.testing.assert_allclose(a.vectors[pooled], b.vectors[pooled], atol=1e-5)
        np.testing.assert_allclose(a.vectors[~pooled], b.vectors[~pooled], atol=1e-3)
    np.testing.assert_array_equal(host.text, dev.text)
    assert set(dev.info["seconds"]) >= {"generate", "masks", "features", "prototypes"}
    with pytest.raises(ValueError, match="unknown path 'gpu'"):
        sample_class(name, r, m, kind=kind, path="gpu")


def test_crf_pool_beside_the_device_changes_no_shard(tmp_path):
    """MaskCut with its dense CRF, the CRF inline vs in 2 pool processes: shards equal byte for byte. MaskCut cuts
    the toy extractor's features (random tiny DINO keys give no objects, so the CRF would have nothing to do)."""
    from ovdiff_ray.models.toy import ToyExtractor
    from ovdiff_ray.store.fs import Location
    from ovdiff_ray.store.shards import write_shard

    r = load_recipe("tiny")
    r.masks = dataclasses.replace(r.masks, maskcut_crf=True, maskcut_n=2)
    toy_cfg = load_recipe("toy").extractors[0]
    shards = []
    waited = []
    for workers in (0, 2):
        m = SamplingModels.load(r, "cpu", crf_workers=workers)
        m.masker = MaskCut(ToyExtractor(toy_cfg), r.masks)
        arts = []
        protos = sample_class("dog", r, m, artifacts=arts)
        waited.append(m.crf.waited)
        m.crf.close()
        out = tmp_path / f"w{workers}"
        info = write_shard(Location(str(out)), protos, 0)
        shards.append((out / info.shard).read_bytes())
        assert arts[0].fg.any()
    assert shards[0] == shards[1]
    assert waited[0] > 0  # the CRF ran (inline: every second of it was waited on)


def test_class_bench_runs_small():
    out = subprocess.run([sys.executable, str(ROOT / "bench" / "class_bench.py"), "--recipe", "tiny",
                          "--size", "recipe", "--n", "2", "--steps", "1", "--maskcut-images", "1"],
                         capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert out.returncode == 0, out.stderr[-2000:]
    vals = dict(re.findall(r"^([a-z0-9_.]+): ([-0-9.e+infa]+)$", out.stdout, re.M))
    for key in ("old.host_s_per_image", "new.host_s_per_image", "old.d2h_mb_per_image", "new.d2h_mb_per_image",
                "new_vs_old.max_abs_mean_prototype_diff", "maskcut.old_s_per_image", "maskcut.new_s_per_image"):
        assert key in vals, (key, out.stdout)
    assert float(vals["new.d2h_mb_per_image"]) < float(vals["old.d2h_mb_per_image"])
    assert float(vals["new_vs_old.max_abs_mean_prototype_diff"]) < 0.02
    assert "| new |" in out.stdout and out.stdout.strip().splitlines()[-1].startswith("summary:")
