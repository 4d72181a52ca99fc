"""PAMR (OVDIFF.md 6.6) against a direct per-pixel loop: for each pixel, its 8 neighbours at every dilation
(coordinates clamped at the border), affinity = softmax over neighbours of the channel mean of -|I_n - I_p| /
(1e-8 + 0.1 * std), std over the pixel and its neighbours (the pixel once per dilation, unbiased); each iteration
replaces every score by the affinity-weighted sum of its neighbours' scores."""
from __future__ import annotations

import math

import numpy as np
import torch

from ovdiff_ray.segment import pamr_refine

OFFSETS = [(-1, -1), (-1, 0), (-1, 1), (0, -1), (0, 1), (1, -1), (1, 0), (1, 1)]


def ref_pamr(image: np.ndarray, scores: np.ndarray, iters: int, dilations) -> np.ndarray:
    c, h, w = image.shape
    clamp = lambda v, n: min(max(v, 0), n - 1)  # noqa: E731
    neigh = {}
    aff = {}
    for y in range(h):
        for x in range(w):
            pts = [(clamp(y + dy * d, h), clamp(x + dx * d, w)) for d in dilations for dy, dx in OFFSETS]
            neigh[y, x] = pts
            with_centre = []
            for d in dilations:
                with_centre.append((y, x))
                with_centre += [(clamp(y + dy * d, h), clamp(x + dx * d, w)) for dy, dx in OFFSETS]
            logits = []
            std = []
            for ch in range(c):
                vals = [image[ch, yy, xx] for yy, xx in with_centre]
                mean = sum(vals) / len(vals)
                std.append(math.sqrt(sum((v - mean) ** 2 for v in vals) / (len(vals) - 1)))
            for yy, xx in pts:
                logits.append(sum(-abs(image[ch, yy, xx] - image[ch, y, x]) / (1e-8 + 0.1 * std[ch])
                                  for ch in range(c)) / c)
            m = max(logits)
            e = [math.exp(v - m) for v in logits]
            aff[y, x] = [v / sum(e) for v in e]
    m = scores.astype(np.float64)
    for _ in range(iters):
        new = np.zeros_like(m)
        for y in range(h):
            for x in range(w):
                for a, (yy, xx) in zip(aff[y, x], neigh[y, x]):
                    new[:, y, x] += a * m[:, yy, xx]
        m = new
    return m


def test_pamr_matches_per_pixel_loop():
    rng = np.random.default_rng(0)
    h, w = 9, 11
    img = rng.random((3, h, w)).astype(np.float32)
    img[:, :4, :5] = np.array([0.9, 0.1, 0.1], np.float32)[:, None, None]  # a flat region (std 0 nearby)
    scores = rng.random((3, h, w)).astype(np.float32)
    dil = [1, 2, 4]
    got = pamr_refine(torch.from_numpy(img), torch.from_numpy(scores), iters=3, dilations=dil).numpy()
    ref = ref_pamr(img, scores, 3, dil)
    np.testing.assert_allclose(got, ref, atol=1e-5, rtol=1e-4)
    assert np.abs(got - scores).max() > 1e-2  # it did refine
