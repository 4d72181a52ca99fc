"""MaskCut on the device, for a batch of images at once (CutLER's normalised cuts on DINO keys).

The same cuts as `models.masks.maskcut` (the numpy reference, one image at a time): per image and cut, the second
eigenvector of the normalised affinity `N = D^-1/2 A D^-1/2` of the patches not yet taken, thresholded at its mean,
flipped by the corner / salient-patch rule, cut to the connected component of its most foreground patch.

Here every image of a batch is cut together, in fp64 on the keys' device:

- the thresholded cosine affinity `A [B, n, n]` is built once per batch; a cut restricts it to the remaining
  patches by zeroing rows and columns (the subgraph's matrix, embedded);
- the top eigenvector of `N` is known in closed form (`sqrt(d)`, eigenvalue 1), so the second is the top one of
  `N` deflated by it: batched Lanczos with full reorthogonalisation and explicit restarts from the Ritz vector,
  until the residual `|N y - theta y|` is under `tol` (ARPACK's `eigsh(which="LA")` on the host, as a batch);
- the connected component is a flood fill (4-connected, as `scipy.ndimage.label`) by repeated cross dilation.

Shapes: keys `[B, D, h, w]` -> masks `[B, n_cuts, h, w]` bool and counts `[B]` (cuts after an image stopped are
empty; the first `count` masks are its masks).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F


@dataclass
class CutResult:
    """Grid masks of a batch: `masks [B, n, h, w]` bool (padded with empty masks), `counts [B]` int64."""

    masks: torch.Tensor
    counts: torch.Tensor


def affinity(keys: torch.Tensor, tau: float, eps: float = 1e-5) -> torch.Tensor:
    """keys `[B, D, h, w]` -> `[B, n, n]` fp64 affinity: 1 where the cosine similarity of two patches is > tau,
    else eps (MaskCut's graph). The cosines only meet a threshold, so they are fp32 (the eigen-solve is fp64)."""
    b, d = keys.shape[:2]
    f = keys.reshape(b, d, -1).transpose(1, 2).float()  # [B, n, D]
    f = f / f.norm(dim=-1, keepdim=True).clamp_min(1e-8)
    a = (f @ f.transpose(1, 2)) > tau
    return torch.where(a, 1.0, eps).double()


def _start_vector(n: int, device, dtype=torch.float64) -> torch.Tensor:
    g = torch.Generator("cpu").manual_seed(0)  # a fixed start: results do not depend on it, only convergence does
    return (torch.rand(n, generator=g, dtype=torch.float64) + 0.5).to(device, dtype)


def _matvec(m: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """`[B, n, n] @ [B, n]` -> `[B, n]`: one batched product on an accelerator; per image on a CPU, where
    matrix-vector products are much faster than a batched matrix product with one column."""
    if m.device.type != "cpu":
        return torch.bmm(m, v[:, :, None])[..., 0]
    return torch.stack([mi @ vi for mi, vi in zip(m, v)])


def second_eigenvector(a: torch.Tensor, active: torch.Tensor, steps: int = 48, restarts: int = 12,
                       tol: float = 1e-9) -> torch.Tensor:
    """Affinity `a [B, n, n]` (fp64) and the patches still in play `active [B, n]` bool -> `x [B, n]` fp64: the
    second largest eigenvector of the active subgraph's normalised affinity, as `D^-1/2 y` (zero outside
    `active`), its sign fixed so that the entry of largest magnitude is positive (as the numpy reference)."""
    m = active.double()
    sub = a * m[:, :, None] * m[:, None, :]
    d = sub.sum(-1)  # [B, n]
    r = torch.where(active, d.clamp_min(1e-300).rsqrt(), torch.zeros_like(d))
    nmat = sub * r[:, :, None] * r[:, None, :]
    del sub
    u = d.clamp_min(0).sqrt() * m  # top eigenvector (eigenvalue 1)
    u = u / u.norm(dim=1, keepdim=True).clamp_min(1e-300)
    b, n = m.shape

    def project(v: torch.Tensor) -> torch.Tensor:
        v = v * m
        return v - u * (u * v).sum(1, keepdim=True)

    v = project(_start_vector(n, a.device)[None].expand(b, n))
    y = v / v.norm(dim=1, keepdim=True).clamp_min(1e-300)
    k = max(1, min(steps, n))
    last = None
    for _ in range(restarts):
        q = torch.zeros(b, k + 1, n, dtype=torch.float64, device=a.device)
        alpha = torch.zeros(b, k, dtype=torch.float64, device=a.device)
        beta = torch.zeros(b, k, dtype=torch.float64, device=a.device)
        alive = torch.ones(b, k, dtype=torch.bool, device=a.device)
        q[:, 0] = y
        for j in range(k):
            w = project(_matvec(nmat, q[:, j]))
            alpha[:, j] = (q[:, j] * w).sum(1)
            for _ in range(2):  # full reorthogonalisation, twice (Kahan's "twice is enough")
                w = w - torch.bmm(q[:, :j + 1].transpose(1, 2), torch.bmm(q[:, :j + 1], w[:, :, None]))[..., 0]
            beta[:, j] = w.norm(dim=1)
            ok = beta[:, j] > 1e-12
            if j + 1 < k:
                alive[:, j + 1] = alive[:, j] & ok
            q[:, j + 1] = torch.where(ok[:, None], w / beta[:, j, None].clamp_min(1e-300), torch.zeros_like(w))
        # tridiagonal T per image; rows past a breakdown get a very low diagonal so they never win
        t = torch.diag_embed(torch.where(alive, alpha, torch.full_like(alpha, -1e3)))
        off = torch.where(alive[:, 1:], beta[:, :-1], torch.zeros_like(beta[:, :-1]))
        t = t + torch.diag_embed(off, 1) + torch.diag_embed(off, -1)
        theta, s = torch.linalg.eigh(t)  # ascending
        top = s[:, :, -1]  # [B, k]
        y = torch.bmm(q[:, :k].transpose(1, 2), top[:, :, None])[..., 0]
        y = project(y)
        y = y / y.norm(dim=1, keepdim=True).clamp_min(1e-300)
        res = (project(_matvec(nmat, y)) - theta[:, -1, None] * y).norm(dim=1)
        if bool((res <= tol).all()):
            break
        if last is not None and bool(((theta[:, -1] - last).abs() <= 1e-12).all()):
            break  # the Ritz value no longer moves: a (near-)degenerate eigenspace, where any vector of it is as good
        last = theta[:, -1]
    x = y * r
    big = x.abs().argmax(1)
    sign = torch.where(x.gather(1, big[:, None])[:, 0] >= 0, 1.0, -1.0).to(x.dtype)
    return x * sign[:, None]


def _dilate_cross(x: torch.Tensor) -> torch.Tensor:
    """`[B, h, w]` bool -> dilated by the 3x3 cross."""
    p = F.pad(x.float()[:, None], (1, 1, 1, 1))[:, 0]
    out = p[:, 1:-1, 1:-1] + p[:, :-2, 1:-1] + p[:, 2:, 1:-1] + p[:, 1:-1, :-2] + p[:, 1:-1, 2:]
    return out > 0


def component_of(part: torch.Tensor, seed: torch.Tensor, check_every: int = 8) -> torch.Tensor:
    """`part [B, h, w]` bool, `seed [B]` flat index -> the 4-connected component of `part` holding `seed`
    (empty where the seed is not in `part`)."""
    b, h, w = part.shape
    comp = torch.zeros(b, h * w, dtype=torch.bool, device=part.device)
    comp[torch.arange(b, device=part.device), seed] = True
    comp = comp.reshape(b, h, w) & part
    while True:
        prev = comp
        for _ in range(check_every):
            comp = _dilate_cross(comp) & part
        if torch.equal(comp, prev):
            return comp


def maskcut_batch(keys: torch.Tensor, n: int, tau: float = 0.15, min_frac: float = 0.01,
                  steps: int = 48, tol: float = 1e-9) -> CutResult:
    """keys `[B, D, h, w]` -> up to `n` masks per image (`CutResult`), each cut on the patches earlier cuts left.
    The rules of `models.masks.maskcut`, for the whole batch on the keys' device."""
    b, _, h, w = keys.shape
    dev = keys.device
    masks = torch.zeros(b, max(n, 0), h, w, dtype=torch.bool, device=dev)
    counts = torch.zeros(b, dtype=torch.int64, device=dev)
    if n <= 0 or b == 0:
        return CutResult(masks, counts)
    a = affinity(keys, tau)
    remaining = torch.ones(b, h * w, dtype=torch.bool, device=dev)
    going = torch.ones(b, dtype=torch.bool, device=dev)
    corners = torch.tensor([0, w - 1, (h - 1) * w, h * w - 1], device=dev)
    rows = torch.arange(b, device=dev)
    for cut in range(n):
        going = going & (remaining.sum(1) >= 3)
        if not bool(going.any()):
            break
        active = remaining & going[:, None]
        x = second_eigenvector(a, active, steps=steps, tol=tol)
        cnt = active.sum(1).clamp_min(1)
        mean = (x * active).sum(1) / cnt
        part = (x > mean[:, None]) & active
        salient = torch.where(active, x.abs(), torch.full_like(x, -1.0)).argmax(1)
        n_corners = part[:, corners].sum(1)
        flip = (n_corners >= 3) | ~part[rows, salient]
        part = torch.where(flip[:, None], active & ~part, part)
        x = torch.where(flip[:, None], -x, x)
        seed = torch.where(active, x, torch.full_like(x, -torch.inf)).argmax(1)
        mask = component_of(part.reshape(b, h, w), seed)
        big = mask.reshape(b, -1).sum(1) > min_frac * h * w
        keep = going & big
        masks[:, cut] = mask & keep[:, None, None]
        counts += keep.long()
        remaining = remaining & ~(mask.reshape(b, -1) & keep[:, None])
        going = keep
    return CutResult(masks, counts)
