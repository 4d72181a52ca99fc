"""One class of a recipe through the host path (`old`: numpy between the models, one image at a time) and the
device pipeline (`new`: `ovdiff_ray/pipeline/`), in the same process, with the recipe's full-size architectures
(SD 1.5, DINO ViT-B/8, CLIP ViT-B/16) built offline with random weights from their configs (nothing downloaded).

Measures, per path, with one definition for both (`bench/devicetime.py`): seconds per stage (device-synchronised);
host seconds per support image = wall time in which the device does no tensor work (on CUDA: the class's wall minus
the union of kernel / memcpy intervals the profiler records on the GPU; on a CPU run: minus the union of torch
operator intervals, i.e. numpy, scipy, the CRF library, Python and waits); the device-busy share = kernel time /
class wall, measured on the device (CUDA only: `n/a` on a CPU, never inferred); MB per support image crossing from
the models' device to the host (every `.cpu()`, `.numpy()`, `.tolist()`, `.item()`; on a CPU run, what would
cross); peak device memory; then how close the two banks are (class / instance prototypes, part k-means inertia),
and MaskCut alone on keys with object structure at paper size (60 x 60 x 768, a few blobs plus noise, 3 cuts).

`--keys structured` (default): MaskCut's DINO keys are replaced by keys with object structure (`structured_keys`:
a background split by lines, three discs, noise; one seed per support image, the same in both paths), so MaskCut
makes its cuts and the CRF refines each of them as it would with real weights (random DINO keys give one small
first cut and leave the CRF little to do). `--keys model`: the random model's own keys.

    python bench/class_bench.py --recipe paper --n 2 --steps 1       # this machine's CPU, ~10 minutes
    python bench/class_bench.py --recipe paper --n 64 --steps 30     # a GPU (bench/class_bench_gpu.sh)
"""
from __future__ import annotations

import argparse
import contextlib
import os
import sys
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

sys.path.insert(0, str(ROOT / "bench"))
from devicetime import DeviceTime, fmt  # noqa: E402

from ovdiff_ray import prototypes as host_protos  # noqa: E402
from ovdiff_ray.models import default_device  # noqa: E402
from ovdiff_ray.pipeline import kmeans as device_kmeans  # noqa: E402
from ovdiff_ray.recipe import load_recipe  # noqa: E402


# -- counters ---------------------------------------------------------------------------------------------------
class D2H:
    """Bytes crossing to the host, counted at every Tensor.cpu / .numpy / .tolist / .item / .to(cpu)."""

    def __init__(self):
        self.bytes = 0
        self.on = False
        self._orig = {}
        self._ptrs: set[int] = set()
        self.trace = int(os.environ.get("CLASS_BENCH_TRACE_D2H", "0"))  # print transfers of at least this many bytes

    def _count(self, t: torch.Tensor) -> None:
        if self.on:
            n = t.numel() * t.element_size()
            self.bytes += n
            if self.trace and n >= self.trace:
                import traceback

                print(f"d2h {n} bytes {tuple(t.shape)} at " + " <- ".join(
                    f"{f.filename.split('/')[-1]}:{f.lineno}" for f in traceback.extract_stack()[-6:-2][::-1]))

    def _seen(self, t: torch.Tensor) -> bool:
        try:
            return t.untyped_storage().data_ptr() in self._ptrs
        except Exception:  # noqa: BLE001
            return False

    def _mark(self, t: torch.Tensor) -> None:
        try:
            self._ptrs.add(t.untyped_storage().data_ptr())
        except Exception:  # noqa: BLE001
            pass

    def install(self) -> None:
        """`.cpu()` counts (and marks the host storage, so a later `.numpy()` of it or of a view does not count
        again); `.numpy()`, `.tolist()`, `.item()` count unless their storage was marked. `.to(...)` does not count:
        our code moves to the host with `.cpu()` (on a CPU run `.to(self.device)` would read as a crossing)."""
        T = torch.Tensor
        self._orig = {k: getattr(T, k) for k in ("cpu", "numpy", "tolist", "item")}
        o, me = self._orig, self

        def cpu(t, *a, **k):
            if not me._seen(t):
                me._count(t)
            out = o["cpu"](t, *a, **k)
            if me.on:
                me._mark(out)
            return out

        def wrap(name):
            def fn(t, *a, **k):
                if not me._seen(t):
                    me._count(t)
                return o[name](t, *a, **k)
            return fn

        T.cpu, T.numpy, T.tolist, T.item = cpu, wrap("numpy"), wrap("tolist"), wrap("item")

    @contextlib.contextmanager
    def counting(self):
        self.bytes, self.on, self._ptrs = 0, True, set()
        try:
            yield self
        finally:
            self.on = False


def sync(device: str) -> None:
    if str(device).startswith("cuda"):
        torch.cuda.synchronize()


class DeviceTimer:
    """Seconds spent inside wrapped model calls (device work), synchronised around each call."""

    def __init__(self, device: str):
        self.device, self.seconds, self.on = device, 0.0, False

    def wrap(self, fn):
        me = self

        def inner(*a, **k):
            if not me.on:
                return fn(*a, **k)
            sync(me.device)
            t0 = time.perf_counter()
            try:
                return fn(*a, **k)
            finally:
                sync(me.device)
                me.seconds += time.perf_counter() - t0
        return inner


class Inertia:
    """k-means inertia (sum of squared distances to the nearest centroid) of every k-means run, per path."""

    def __init__(self):
        self.total = {"old": 0.0, "new": 0.0, "warm-up": 0.0}
        self.path = "warm-up"

    def wrap(self, fn):
        me = self

        def inner(x, k, *a, **kw):
            c = fn(x, k, *a, **kw)
            if len(c):
                xf = x.float()
                d = ((xf * xf).sum(1)[:, None] - 2 * xf @ c.T + (c * c).sum(1)[None]).clamp_min(0).amin(1)
                me.total[me.path] += float(d.double().sum())
            return c
        return inner


# -- MaskCut alone on structured keys ---------------------------------------------------------------------------
def structured_keys(h: int, d: int, seed: int, blobs: int = 3) -> np.ndarray:
    """`[d, h, h]` float32: a background split by two random lines, `blobs` discs, each region its own random
    vector, plus noise strong enough that the thresholded affinity is not constant inside a region."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:h, :h] / h
    lines = []
    for lo in (0.2, 0.3):
        a = rng.uniform(0, np.pi)
        lines.append((np.cos(a) * (yy - 0.5) + np.sin(a) * (xx - 0.5)) > rng.uniform(-lo, lo))
    lab = lines[0].astype(int) + 2 * (lines[1] & ~lines[0])
    for k in range(blobs):
        cy, cx = rng.uniform(0.25, 0.75, 2)
        r = rng.uniform(0.08, 0.18)
        lab[(yy - cy) ** 2 + (xx - cx) ** 2 < r * r] = 3 + k
    vec = rng.normal(size=(3 + blobs, d))
    noise = 2.2 if d > 100 else 1.2
    return (vec[lab].transpose(2, 0, 1) + noise * rng.normal(size=(d, h, h))).astype(np.float32)


class StructuredKeyExtractor:
    """MaskCut's DINO with `structured_keys` in place of its keys (same shape, dtype and device): support image i of
    a path (counted from `reset()`) gets seed 9000 + i, so both paths cut the same keys."""

    def __init__(self, inner):
        self.inner, self.count = inner, 0
        self.name, self.dim, self.stride = getattr(inner, "name", "dino"), inner.dim, inner.stride

    def reset(self) -> None:
        self.count = 0

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        g = images.shape[-1] // self.stride
        keys = torch.stack([structured_keys_on(g, self.dim, 9000 + self.count + i, images.device)
                            for i in range(len(images))])
        self.count += len(images)
        return keys


def structured_keys_on(h: int, d: int, seed: int, device, blobs: int = 3) -> torch.Tensor:
    """`structured_keys` drawn on `device` (the keys never cross the bus, as DINO's would not): `[d, h, h]`."""
    rng = np.random.default_rng(seed)
    gen = torch.Generator(device=device).manual_seed(seed)
    yy, xx = torch.meshgrid(torch.arange(h, device=device) / h, torch.arange(h, device=device) / h, indexing="ij")
    lines = []
    for lo in (0.2, 0.3):
        a = rng.uniform(0, np.pi)
        lines.append((np.cos(a) * (yy - 0.5) + np.sin(a) * (xx - 0.5)) > rng.uniform(-lo, lo))
    lab = lines[0].long() + 2 * (lines[1] & ~lines[0]).long()
    for k in range(blobs):
        cy, cx = rng.uniform(0.25, 0.75, 2)
        r = rng.uniform(0.08, 0.18)
        lab[(yy - cy) ** 2 + (xx - cx) ** 2 < r * r] = 3 + k
    vec = torch.randn(3 + blobs, d, generator=gen, device=device)
    noise = torch.randn(d, h, h, generator=gen, device=device)
    return vec[lab].permute(2, 0, 1) + (2.2 if d > 100 else 1.2) * noise


class CrfCount:
    """MaskCut masks sent to the dense CRF and kept by it: the host path's inline calls (`masks.crf_refine`) and the
    device path's pool jobs (`CrfPool.submit` / `wait`, whose children this process cannot patch)."""

    def __init__(self):
        self.sent = self.kept = 0
        self._in_pool = False

    def install(self) -> None:
        import ovdiff_ray.models.masks as masks
        from ovdiff_ray.pipeline.instances import CrfPool

        me = self
        refine = masks.crf_refine

        def counted(image, mask):
            out = refine(image, mask)
            if not me._in_pool:
                me.sent += 1
                me.kept += out is not None
            return out
        masks.crf_refine = counted
        submit, wait = CrfPool.submit, CrfPool.wait

        def submit_counted(pool, image, grid_masks):
            me.sent += len(grid_masks)
            me._in_pool = True
            try:
                return submit(pool, image, grid_masks)
            finally:
                me._in_pool = False

        def wait_counted(pool, futures):
            out = wait(pool, futures)
            me.kept += sum(len(m) for m in out)
            return out
        CrfPool.submit, CrfPool.wait = submit_counted, wait_counted


def maskcut_alone(device: str, n_images: int, side: int = 60, dim: int = 768) -> dict:
    from ovdiff_ray.models.masks import maskcut
    from ovdiff_ray.pipeline.maskcut import maskcut_batch

    keys = np.stack([structured_keys(side, dim, 7000 + i) for i in range(n_images)])
    t0 = time.perf_counter()
    old = [maskcut(k, 3, 0.15) for k in keys]
    t1 = time.perf_counter()
    kt = torch.from_numpy(keys).to(device)
    sync(device)
    t2 = time.perf_counter()
    new = maskcut_batch(kt, 3, 0.15)
    sync(device)
    t3 = time.perf_counter()
    ious, same = [], 0
    for i, o in enumerate(old):
        c = int(new.counts[i])
        same += c == len(o)
        for j in range(min(c, len(o))):
            a, b = o[j], new.masks[i, j].cpu().numpy()
            ious.append((a & b).sum() / max((a | b).sum(), 1))
    return {"old": (t1 - t0) / n_images, "new": (t3 - t2) / n_images, "same_count": same / n_images,
            "iou99": float(np.mean(np.array(ious) >= 0.99)) if ious else 1.0}


# -- the class ----------------------------------------------------------------------------------------------------
def bench_recipe(name: str, n: int, steps: int, models_dir: Path, device: str, size: str = "full"):
    from ovdiff_ray.models.fullsize import fullsize_refs

    recipe = load_recipe(name)
    g = recipe.generation
    g.n_images, g.steps, g.batch_size = n, steps, min(g.batch_size, n)
    if size == "recipe":  # the recipe's own models (the tiny recipe in the tests)
        return recipe
    refs = fullsize_refs(models_dir, device if device.startswith("cuda") else "cpu")
    g.model = refs["sd"]
    for e in recipe.extractors:
        e.model = {"sd": refs["sd"], "dino": refs["dino"], "clip": refs["clip"]}.get(e.type, e.model)
    recipe.classifier.model = refs["clip"]
    return recipe


def run_path(path: str, recipe, models, d2h: D2H, timer: DeviceTimer, inertia: Inertia, name: str,
             keys: "StructuredKeyExtractor | None" = None, profile: bool = True):
    """One class through `path`; host time and device busy by `devicetime.DeviceTime` (the same for both paths)."""
    from ovdiff_ray.sample import sample_class

    device = models.device
    inertia.path = "old" if path == "host" else "new"
    if keys is not None:
        keys.reset()
    if str(device).startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()
    timer.seconds, timer.on = 0.0, True
    with DeviceTime(device, enabled=profile) as dt, d2h.counting():
        protos = sample_class(name, recipe, models, path=path)
    timer.on = False
    if dt.error:
        print(f"{inertia.path}.profiler_error: {dt.error}", flush=True)
    peak = torch.cuda.max_memory_allocated() / 2**30 if str(device).startswith("cuda") else float("nan")
    return protos, {"wall": dt.wall_s, "host": dt.host_s, "busy": dt.busy_share, "d2h": d2h.bytes,
                    "peak_gib": peak, "stages": dict(protos.info.get("seconds", {})), "model_s": timer.seconds}


def compare(a, b) -> float:
    worst = 0.0
    for k in a.sets:
        A, B = a.sets[k], b.sets[k]
        for level in ("class", "instance"):
            for kind in ("fg", "bg"):
                ma = (A.level == level) & (A.kind == kind)
                mb = (B.level == level) & (B.kind == kind)
                if ma.sum() != mb.sum():
                    return float("inf")
                if ma.any():
                    worst = max(worst, float(np.abs(A.vectors[ma] - B.vectors[mb]).max()))
    return worst


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--recipe", default="paper", help="recipe name or YAML (its architectures are built at full size)")
    ap.add_argument("--n", type=int, default=2, help="support images (default 2; the paper: 64)")
    ap.add_argument("--steps", type=int, default=1, help="diffusion steps (default 1; the paper: 30)")
    ap.add_argument("--device", default="auto", help="auto | cpu | cuda")
    ap.add_argument("--class-name", default="dog", help="class to build (default: dog)")
    ap.add_argument("--models", default=str(ROOT / ".cache" / "fullsize"),
                    help="folder for the random full-size models (built once)")
    ap.add_argument("--crf-workers", type=int, default=None,
                    help="CRF processes beside the device in `new` (default: min(8, CPUs - 1))")
    ap.add_argument("--maskcut-images", type=int, default=None,
                    help="images for MaskCut alone (default: 8 on a GPU, 2 on a CPU)")
    ap.add_argument("--size", choices=["full", "recipe"], default="full",
                    help="full: the recipe's architectures at full size, random weights (default); recipe: its own models")
    ap.add_argument("--no-crf", action="store_true", help="MaskCut without its dense CRF (no pydensecrf2 here)")
    ap.add_argument("--no-old", action="store_true", help="skip the host path (a GPU at paper size: it takes long)")
    ap.add_argument("--keys", choices=["structured", "model"], default="structured",
                    help="MaskCut's keys: structured (objects to cut, so the CRF works as with real weights; default) "
                         "or the random model's own")
    ap.add_argument("--no-profile", action="store_true",
                    help="no profiler: host time and device busy print n/a (the profiler's own cost is small)")
    a = ap.parse_args(argv)
    device = default_device() if a.device == "auto" else a.device
    crf_workers = a.crf_workers if a.crf_workers is not None else max(1, min(8, (os.cpu_count() or 2) - 1))
    t_start = time.perf_counter()
    print(f"class_bench: recipe {a.recipe}, n {a.n}, steps {a.steps}, device {device}, crf workers {crf_workers}",
          flush=True)
    from ovdiff_ray.sample import SamplingModels

    recipe = bench_recipe(a.recipe, a.n, a.steps, Path(a.models), device, a.size)
    if a.no_crf:
        recipe.masks.maskcut_crf = False
    t0 = time.perf_counter()
    models = SamplingModels.load(recipe, device, crf_workers=crf_workers)
    print(f"models loaded in {time.perf_counter() - t0:.1f}s", flush=True)
    d2h, timer, inertia = D2H(), DeviceTimer(device), Inertia()
    for obj in list(models.extractors) + ([models.masker.extractor] if hasattr(models.masker, "extractor") else []):
        cls = type(obj)
        if not getattr(cls, "_bench_wrapped", False):
            cls.__call__ = timer.wrap(cls.__call__)
            cls._bench_wrapped = True
    gen_cls = type(models.generator)
    gen_cls.generate = timer.wrap(gen_cls.generate)
    models.classifier.encode_text = timer.wrap(models.classifier.encode_text)
    host_protos.kmeans = timer.wrap(inertia.wrap(host_protos.kmeans))
    import ovdiff_ray.pipeline.pooling as pooling

    pooling.kmeans = inertia.wrap(device_kmeans.kmeans)
    keys = None
    if a.keys == "structured" and hasattr(models.masker, "extractor"):
        keys = models.masker.extractor = StructuredKeyExtractor(models.masker.extractor)
    crf_count = CrfCount()
    crf_count.install()
    d2h.install()
    results = {}
    paths = ["new"] if a.no_old else ["old", "new"]
    # warm-up: one pass of the new path (CUDA kernels, lazy imports, the CRF pool's processes)
    sample_warm = recipe.generation.n_images
    from ovdiff_ray.sample import sample_class

    recipe.generation.n_images = min(2, sample_warm)
    sample_class("warm up", recipe, models, path="device")
    recipe.generation.n_images = sample_warm
    for path in paths:
        sent0, kept0 = crf_count.sent, crf_count.kept
        protos, r = run_path("host" if path == "old" else "device", recipe, models, d2h, timer, inertia,
                             a.class_name, keys, not a.no_profile)
        r["crf_sent"], r["crf_kept"] = crf_count.sent - sent0, crf_count.kept - kept0
        results[path] = (protos, r)
        print(f"{path}: {r['wall']:.2f}s for the class; stages " +
              ", ".join(f"{k} {v:.2f}s" for k, v in r["stages"].items()), flush=True)
    n = a.n
    host = lambda r: None if r["host"] is None else r["host"] / n  # noqa: E731
    print(f"keys: {a.keys}; host = wall time in which the device does no tensor work; device busy = kernel time "
          "(profiler, CUDA only)")
    print("| path | class s | host s/image | D->H MB/image | device busy | CRF masks sent / kept | peak device GiB |")
    print("|---|---|---|---|---|---|---|")
    for path, (_, r) in results.items():
        print(f"| {path} | {r['wall']:.2f} | {fmt(host(r), '.4f')} | {r['d2h'] / n / 2**20:.3f} | "
              f"{fmt(r['busy'], '.1%')} | {r['crf_sent']} / {r['crf_kept']} | {r['peak_gib']:.2f} |")
    for path, (_, r) in results.items():
        print(f"{path}.class_s: {r['wall']:.3f}")
        print(f"{path}.host_s_per_image: {fmt(host(r), '.4f')}")
        print(f"{path}.d2h_mb_per_image: {r['d2h'] / n / 2**20:.3f}")
        print(f"{path}.device_busy_share: {fmt(r['busy'])}")
        print(f"{path}.crf_masks_sent: {r['crf_sent']}")
        print(f"{path}.crf_masks_kept: {r['crf_kept']}")
        print(f"{path}.peak_device_gib: {r['peak_gib']:.2f}")
    import tempfile

    from ovdiff_ray.store.fs import Location
    from ovdiff_ray.store.shards import write_shard

    pn_, rn_ = results["new"]
    with tempfile.TemporaryDirectory() as tmp:  # shard encoding + a local write: host work after the class
        t0 = time.perf_counter()
        info = write_shard(Location(tmp), pn_, 0)
        write_s = time.perf_counter() - t0
        size = sum(f.stat().st_size for f in Path(tmp).rglob("*") if f.is_file())
    print(f"new.shard_mb: {size / 2**20:.2f}")
    print(f"new.write_s: {write_s:.3f}")
    print(f"new.write_share_of_class: {write_s / max(rn_['wall'], 1e-9):.4f}")
    del info
    if "old" in results:
        po, ro = results["old"]
        pn, rn = results["new"]
        if rn["host"] is not None and ro["host"] is not None:
            print(f"new_vs_old.host_ratio: {rn['host'] / max(ro['host'], 1e-9):.4f}")
        print(f"new_vs_old.d2h_ratio: {rn['d2h'] / max(ro['d2h'], 1):.4f}")
        print(f"new_vs_old.max_abs_mean_prototype_diff: {compare(po, pn):.6f}")
        if inertia.total["old"] > 0:
            print(f"new_vs_old.part_inertia_ratio: {inertia.total['new'] / inertia.total['old']:.4f}")
    mc = maskcut_alone(device, a.maskcut_images or (8 if device.startswith("cuda") else 2))
    print(f"maskcut.old_s_per_image: {mc['old']:.3f}")
    print(f"maskcut.new_s_per_image: {mc['new']:.3f}")
    print(f"maskcut.new_vs_old: {mc['new'] / max(mc['old'], 1e-9):.3f}")
    print(f"maskcut.same_count_share: {mc['same_count']:.3f}")
    print(f"maskcut.iou99_share: {mc['iou99']:.3f}")
    models.crf.close()
    print(f"summary: class bench {a.recipe} n={n} steps={a.steps} on {device} in "
          f"{time.perf_counter() - t_start:.0f}s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
