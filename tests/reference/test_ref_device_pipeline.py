"""The device class pipeline (`ovdiff_ray/pipeline/`, issue 19) against the same plain loops that judge the host
path: the fg/bg rule per pixel, MaskCut's first cut from the generalised eigenproblem, masks onto the grid with
class / instance means, and k-means against scikit-learn's inertia. Batched calls, one reference loop per image."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from ovdiff_ray.pipeline.fgbg import fg_bg_batch
from ovdiff_ray.pipeline.kmeans import kmeans as device_kmeans
from ovdiff_ray.pipeline.maskcut import maskcut_batch
from ovdiff_ray.pipeline.pooling import ExtractorPool

from .test_ref_masks import CFG, ref_fg_bg, ref_first_cut
from .test_ref_prototypes import ref_grid_mask


def test_fg_bg_batch_equals_the_per_pixel_rule():
    rng = np.random.default_rng(3)
    n, h, w = 6, 13, 11
    attrs = rng.random((n, h, w)).astype(np.float32)
    inst = np.zeros((n, 3, h, w), bool)
    for k in range(n):
        for j in range(rng.integers(0, 4)):  # 0..3 masks; image k may have none (the threshold fallback)
            inst[k, j, rng.integers(0, 6):rng.integers(7, 13), rng.integers(0, 5):rng.integers(6, 11)] = True
    inst[1, :, :, :] = False
    inst[1, 0] = True  # one mask covering everything: no background
    got = fg_bg_batch(torch.from_numpy(attrs), torch.from_numpy(inst), CFG)
    for k in range(n):
        rfg, rbg = ref_fg_bg(attrs[k], inst[k])
        np.testing.assert_array_equal(got.fg[k].numpy(), rfg, err_msg=f"fg of image {k}")
        np.testing.assert_array_equal(got.bg[k].numpy(), rbg, err_msg=f"bg of image {k}")


def _cut_case(seed: int, h: int = 12, w: int = 15, d: int = 24) -> np.ndarray:
    rng = np.random.default_rng(seed)
    obj = np.zeros((h, w), bool)
    obj[rng.integers(1, 4):rng.integers(7, 11), rng.integers(1, 5):rng.integers(8, 13)] = True
    other = np.zeros((h, w), bool)
    other[-3:, :3] = True
    protos = rng.normal(size=(3, d))
    feats = np.where(obj[None], protos[0][:, None, None], np.where(other[None], protos[1][:, None, None],
                                                                    protos[2][:, None, None]))
    return (feats + 0.6 * rng.normal(size=(d, h, w))).astype(np.float32)


def test_maskcut_batch_first_cut_equals_the_generalised_solve():
    feats = np.stack([_cut_case(s) for s in range(4)])
    got = maskcut_batch(torch.from_numpy(feats), n=1, tau=0.15)
    for k in range(len(feats)):
        assert int(got.counts[k]) == 1
        np.testing.assert_array_equal(got.masks[k, 0].numpy(), ref_first_cut(feats[k].astype(np.float64)))


@pytest.mark.parametrize("rule", ["any", "centre"])
def test_device_pooling_class_and_instance_means(rule):
    rng = np.random.default_rng(0)
    n, d, gh, gw, h, w = 3, 5, 4, 6, 64, 96
    feats = rng.normal(size=(n, d, gh, gw)).astype(np.float32)
    fg = np.zeros((n, h, w), bool)
    for k in range(n):
        fg[k, rng.integers(0, 20):rng.integers(30, 64), rng.integers(0, 30):rng.integers(40, 96)] = True
    fg[2] = False  # an image with no foreground: no instance prototype, the others keep their source index
    pool = ExtractorPool(d, rule)
    for k in range(n):  # batch by batch, as the pipeline feeds it
        pool.add(torch.from_numpy(feats[k:k + 1]), torch.from_numpy(fg[k:k + 1]), torch.from_numpy(~fg[k:k + 1]))
    ps = pool.to_protoset(parts=0, iters=1, seed=0, max_pixels=0)
    unit = lambda v: v / np.linalg.norm(v)  # noqa: E731
    for kind, masks in (("fg", fg), ("bg", ~fg)):
        pix = [[feats[k, :, i, j] for i in range(gh) for j in range(gw) if ref_grid_mask(masks[k], gh, gw, rule)[i, j]]
               for k in range(n)]
        allpix = [p for per in pix for p in per]
        np.testing.assert_allclose(ps.select(kind, "class")[0], unit(np.mean(allpix, 0)), atol=1e-5)
        inst = [unit(np.mean(p, 0)) for p in pix if p]
        np.testing.assert_allclose(ps.select(kind, "instance"), np.stack(inst), atol=1e-5)
        src = ps.source[(ps.kind == kind) & (ps.level == "instance")].tolist()
        assert src == [k for k in range(n) if pix[k]]


def test_device_kmeans_reaches_sklearn_inertia():
    """With scikit-learn's tolerance (the authors' KMeans default) and without (to the fixed point)."""
    from sklearn.cluster import KMeans

    rng = np.random.default_rng(1)
    centres = rng.normal(size=(8, 12)) * 3
    x = np.concatenate([c + rng.normal(size=(300, 12)) for c in centres]).astype(np.float32)

    def inertia(c):
        return float(((x[:, None] - c[None]) ** 2).sum(-1).min(1).sum())

    sk = KMeans(8, init="k-means++", n_init=1, max_iter=300, tol=1e-4, random_state=0).fit(x)
    for tol in (0.0, 1e-4):
        ours = device_kmeans(torch.from_numpy(x), 8, iters=300, seed=0, tol=tol).numpy()
        assert inertia(ours) == pytest.approx(sk.inertia_, rel=0.01), tol
    fixed = device_kmeans(torch.from_numpy(x), 8, iters=300, seed=0).numpy()
    assign = ((x[:, None, :] - fixed[None]) ** 2).sum(-1).argmin(1)
    for k in range(8):  # tol 0: a fixed point, every centroid the mean of its points
        np.testing.assert_allclose(fixed[k], x[assign == k].mean(0), atol=1e-4)
