"""k-means on the device, deterministic on every device, with scikit-learn's tolerance stop.

As `prototypes.kmeans` (the host path's, kept as it is): greedy k-means++ (the best of `2 + log k` candidates per
centre, drawn from a CPU generator so every device picks the same), then Lloyd iterations. Here:

- the update is a one-hot matrix product (`onehot.T @ x`), not `index_add_`, whose float atomics make CUDA results
  vary from run to run;
- the k-means++ draws are searched on the device (only the candidate choice, one integer, crosses to the host);
- Lloyd stops at a fixed point (no assignment changes), or when the squared centre shift is at most
  `tol * mean(var(x, axis=0))` (scikit-learn's `KMeans(tol=1e-4)`, the authors' default; `tol=0`: fixed point only),
  or after `iters` iterations.
"""
from __future__ import annotations

import math

import torch


def kmeans_pp(x: torch.Tensor, k: int, seed: int) -> torch.Tensor:
    """`x [n, D]` float -> `[k, D]` initial centres (greedy k-means++), on `x`'s device."""
    n = x.shape[0]
    g = torch.Generator().manual_seed(seed)
    xx = (x * x).sum(1)
    trials = 2 + int(math.log(k))

    def dist2(c: torch.Tensor) -> torch.Tensor:  # [m, D] -> [m, n]
        return (xx[None] - 2 * c @ x.T + (c * c).sum(1)[:, None]).clamp_min(0)

    first = torch.randint(n, (1,), generator=g)
    centers = [x[first.to(x.device)][0]]
    d2 = dist2(centers[0][None])[0]
    for _ in range(1, k):
        cum = torch.cumsum(d2.double(), 0)
        if bool(cum[-1] <= 0):
            idx = torch.randint(n, (trials,), generator=g).to(x.device)
        else:
            r = torch.rand(trials, generator=g, dtype=torch.float64).to(x.device) * cum[-1]
            idx = torch.searchsorted(cum, r).clamp_max(n - 1)
        cand = torch.minimum(d2[None], dist2(x[idx]))  # [trials, n]
        best = cand.sum(1).argmin()
        centers.append(x[idx[best]])
        d2 = cand[best]
    return torch.stack(centers)


def kmeans(x: torch.Tensor, k: int, iters: int = 50, seed: int = 0, tol: float = 0.0) -> torch.Tensor:
    """`x [n, D]` -> centroids `[min(k, n), D]` float32 on `x`'s device. Deterministic for a seed on any device."""
    n = x.shape[0]
    k = min(k, n)
    if k == 0:
        return x[:0].float()
    x = x.float()
    c = kmeans_pp(x, k, seed)
    limit = float(tol) * x.var(0, unbiased=False).mean() if tol > 0 else None
    assign = None
    for _ in range(iters):
        new_assign = (x @ c.T * -2 + (c * c).sum(1)[None]).argmin(1)
        if assign is not None and torch.equal(new_assign, assign):
            break  # a fixed point
        assign = new_assign
        onehot = torch.nn.functional.one_hot(assign, k).to(x.dtype)  # [n, k]
        sums = onehot.T @ x
        counts = onehot.sum(0)
        new_c = torch.where((counts == 0)[:, None], c, sums / counts.clamp_min(1)[:, None])
        shift = ((new_c - c) ** 2).sum()
        c = new_c
        if limit is not None and bool(shift <= limit):
            break  # scikit-learn's tolerance
    return c
