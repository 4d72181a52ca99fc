"""Prototypes (OVDIFF.md 5, issue 12 points 2 and 12) against plain loops: masks onto the feature grid (any
coverage, or the authors' bilinear resize kept > 0: the pixels around each cell centre), class / instance means,
and k-means to convergence equal to scikit-learn's KMeans (k-means++, max_iter 300) in inertia."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from ovdiff_ray.prototypes import build_protoset, kmeans


def ref_grid_mask(mask: np.ndarray, gh: int, gw: int, rule: str) -> np.ndarray:
    h, w = mask.shape
    out = np.zeros((gh, gw), bool)
    for i in range(gh):
        for j in range(gw):
            if rule == "any":  # any pixel of the cell (cells as adaptive pooling bins)
                y0, y1 = (i * h) // gh, -((-(i + 1) * h) // gh)
                x0, x1 = (j * w) // gw, -((-(j + 1) * w) // gw)
                out[i, j] = mask[y0:y1, x0:x1].any()
            else:  # bilinear sample at the cell centre (align_corners=False), kept > 0
                sy = max((i + 0.5) * h / gh - 0.5, 0.0)
                sx = max((j + 0.5) * w / gw - 0.5, 0.0)
                y0, x0 = int(sy), int(sx)
                y1, x1 = min(y0 + 1, h - 1), min(x0 + 1, w - 1)
                fy, fx = sy - y0, sx - x0
                v = ((1 - fy) * (1 - fx) * mask[y0, x0] + (1 - fy) * fx * mask[y0, x1]
                     + fy * (1 - fx) * mask[y1, x0] + fy * fx * mask[y1, x1])
                out[i, j] = v > 0
    return out


@pytest.mark.parametrize("rule", ["any", "centre"])
def test_masks_onto_grid_and_class_instance_means(rule):
    rng = np.random.default_rng(0)
    n, d, gh, gw, h, w = 3, 5, 4, 6, 64, 96  # 16 px cells, as CLIP's
    feats = torch.from_numpy(rng.normal(size=(n, d, gh, gw)).astype(np.float32))
    fg = np.zeros((n, h, w), bool)
    for k in range(n):
        fg[k, rng.integers(0, 20):rng.integers(30, 64), rng.integers(0, 30):rng.integers(40, 96)] = True
    bg = ~fg
    ps = build_protoset(feats, torch.from_numpy(fg), torch.from_numpy(bg), parts=0, mask_grid=rule)
    f = feats.numpy()
    for kind, masks in (("fg", fg), ("bg", bg)):
        pix = [[f[k, :, i, j] for i in range(gh) for j in range(gw) if ref_grid_mask(masks[k], gh, gw, rule)[i, j]]
               for k in range(n)]
        allpix = [p for per in pix for p in per]
        cls = np.mean(allpix, 0)
        inst = [np.mean(p, 0) for p in pix if p]
        unit = lambda v: v / np.linalg.norm(v)  # noqa: E731
        np.testing.assert_allclose(ps.select(kind, "class")[0], unit(cls), atol=1e-5)
        np.testing.assert_allclose(ps.select(kind, "instance"), np.stack([unit(v) for v in inst]), atol=1e-5)
    if rule == "centre":  # a border cell the mask only touches is outside (any coverage would take it)
        touch = np.zeros((1, h, w), bool)
        touch[0, :, :17] = True  # one pixel column into the second 16 px cell
        ps2 = build_protoset(feats[:1], torch.from_numpy(touch), torch.from_numpy(~touch), 0, mask_grid="centre")
        np.testing.assert_allclose(ps2.select("fg", "class")[0],
                                   unit(f[0, :, :, 0].mean(1)), atol=1e-5)


def test_kmeans_to_convergence_equals_sklearn():
    from sklearn.cluster import KMeans

    rng = np.random.default_rng(1)
    centres = rng.normal(size=(8, 12)) * 3
    x = np.concatenate([c + rng.normal(size=(300, 12)) for c in centres]).astype(np.float32)
    ours = kmeans(torch.from_numpy(x), 8, iters=300, seed=0).numpy()
    sk = KMeans(n_clusters=8, random_state=0, n_init="auto", max_iter=300).fit(x)

    def inertia(c):
        d = ((x[:, None, :] - c[None]) ** 2).sum(-1)
        return d.min(1).sum()

    assert inertia(ours) == pytest.approx(sk.inertia_, rel=0.01)
    # converged: every centroid is the mean of the points nearest to it
    assign = ((x[:, None, :] - ours[None]) ** 2).sum(-1).argmin(1)
    for k in range(8):
        np.testing.assert_allclose(ours[k], x[assign == k].mean(0), atol=1e-4)
