"""Foreground / background rule (OVDIFF.md 3 + issue 12 points 7-8) and MaskCut's first cut, against per-pixel
loops written from the spec."""
from __future__ import annotations

from collections import deque

import numpy as np
import pytest

from ovdiff_ray.models.masks import fg_bg_masks, maskcut
from ovdiff_ray.recipe import MasksConfig

CFG = MasksConfig(fg_threshold=0.5, bg_threshold=0.2, erode=1)


def ref_erode_cross(m: np.ndarray) -> np.ndarray:
    """One erosion with a 3x3 cross; outside the image counts as inside (the border does not erode)."""
    h, w = m.shape
    out = np.zeros_like(m)
    for y in range(h):
        for x in range(w):
            ok = m[y, x]
            for dy, dx in ((-1, 0), (1, 0), (0, -1), (0, 1)):
                yy, xx = y + dy, x + dx
                if 0 <= yy < h and 0 <= xx < w:
                    ok = ok and m[yy, xx]
            out[y, x] = ok
    return out


def ref_fg_bg(attr: np.ndarray, inst: np.ndarray | None):
    h, w = attr.shape
    masks = [] if inst is None else [m for m in inst if m.any()]
    if not masks:  # no instance masks: thresholds, no erosion
        fg = attr > CFG.fg_threshold
        return fg, (attr < CFG.bg_threshold) & ~fg
    covered = np.zeros((h, w), bool)
    for m in masks:
        covered |= m
    if (~covered).any():
        masks.append(~covered)
    weights = [float(attr[m].mean()) for m in masks]
    winner = np.full((h, w), -1)
    for y in range(h):
        for x in range(w):
            best = None
            for i, m in enumerate(masks):
                if m[y, x] and (best is None or weights[i] > weights[best]):
                    best = i
            winner[y, x] = best
    top = max(range(len(masks)), key=lambda i: (weights[i], -i))
    won = sorted(set(winner.ravel().tolist()))
    low = min(won, key=lambda i: (weights[i], i))
    fg = winner == top
    if low == top:
        return fg, np.zeros_like(fg)
    bg = (winner == low) & (attr < CFG.bg_threshold)
    bg = ref_erode_cross(bg)
    return fg, bg & ~fg


def _check(attr, inst):
    fg, bg = fg_bg_masks(attr, inst, CFG)
    rfg, rbg = ref_fg_bg(attr, inst)
    np.testing.assert_array_equal(fg, rfg)
    np.testing.assert_array_equal(bg, rbg)
    return fg, bg


def test_overlapping_masks_random():
    rng = np.random.default_rng(0)
    for trial in range(6):
        h, w = 14, 17
        attr = rng.random((h, w)).astype(np.float32) * np.linspace(0.2, 1, w)[None]
        inst = np.zeros((3, h, w), bool)
        for m in inst:
            y, x = rng.integers(0, h - 4), rng.integers(0, w - 4)
            m[y:y + rng.integers(3, 9), x:x + rng.integers(3, 10)] = True
        _check(attr, inst)


def test_background_candidate_is_the_lowest_weight_one_that_wins_pixels():
    """The lowest-weight instance lies inside a better one and wins no pixel: the background comes from the
    complement, not from an empty candidate (point 7)."""
    h = w = 12
    attr = np.full((h, w), 0.1, np.float32)
    attr[2:8, 2:8] = 0.6
    attr[4:6, 4:6] = 0.0  # the inner mask's mean attribution is the lowest of all
    inst = np.zeros((2, h, w), bool)
    inst[0, 2:8, 2:8] = True
    inst[1, 4:6, 4:6] = True
    fg, bg = _check(attr, inst)
    assert fg.sum() == 36 and bg.sum() > 0 and not (bg & inst[0]).any()


def test_fully_covered_image_and_no_masks():
    rng = np.random.default_rng(1)
    attr = rng.random((10, 11)).astype(np.float32)
    full = np.ones((1, 10, 11), bool)
    fg, bg = _check(attr, full)  # one candidate: it is the foreground, no background
    assert fg.all() and not bg.any()
    half = np.zeros((2, 10, 11), bool)
    half[0, :, :6] = True
    half[1, :, 5:] = True  # overlapping, covering everything
    _check(attr, half)
    _, bg = _check(attr, None)  # no masks: thresholds, no erosion (point 8)
    np.testing.assert_array_equal(bg, attr < 0.2)
    _check(attr, np.zeros((0, 10, 11), bool))


# ---------------------------------------------------------------------------------------------------------------
# MaskCut: the first cut


def ref_first_cut(feats: np.ndarray, tau: float = 0.15) -> np.ndarray:
    """MaskCut's first cut (CutLER's maskcut_forward): the generalised eigenproblem (D - A) x = l D x on the
    thresholded cosine graph, bipartition at the mean of the second eigenvector, reverse when 3+ corners are in the
    foreground or the most salient patch is not, seed = the most foreground patch, its 4-connected component."""
    from scipy.linalg import eigh

    d, h, w = feats.shape
    f = feats.reshape(d, -1).T
    f = f / np.linalg.norm(f, axis=1, keepdims=True)
    a = f @ f.T
    a = np.where(a > tau, 1.0, 1e-5)
    deg = np.diag(a.sum(1))
    vec = eigh(deg - a, deg, subset_by_index=[1, 1])[1][:, 0]
    if vec[np.argmax(np.abs(vec))] < 0:  # the sign is arbitrary: the most salient patch positive
        vec = -vec
    part = vec > vec.mean()
    grid = part.reshape(h, w)
    corners = int(grid[0, 0]) + int(grid[0, -1]) + int(grid[-1, 0]) + int(grid[-1, -1])
    salient = int(np.argmax(np.abs(vec)))
    if corners >= 3 or not part[salient]:
        part, vec = ~part, -vec
    seed = int(np.argmax(vec))
    grid = part.reshape(h, w)
    out = np.zeros((h, w), bool)
    queue = deque([divmod(seed, w)])
    while queue:
        y, x = queue.popleft()
        if 0 <= y < h and 0 <= x < w and grid[y, x] and not out[y, x]:
            out[y, x] = True
            queue.extend([(y + 1, x), (y - 1, x), (y, x + 1), (y, x - 1)])
    return out


@pytest.mark.parametrize("seed", range(4))
def test_maskcut_first_cut(seed):
    rng = np.random.default_rng(seed)
    h, w, d = 12, 15, 24
    obj = np.zeros((h, w), bool)
    obj[rng.integers(1, 4):rng.integers(7, 11), rng.integers(1, 5):rng.integers(8, 13)] = True
    other = np.zeros((h, w), bool)
    other[-3:, :3] = True  # a second region in a corner
    protos = rng.normal(size=(3, d))
    feats = np.where(obj[None], protos[0][:, None, None], np.where(other[None], protos[1][:, None, None],
                                                                    protos[2][:, None, None]))
    feats = feats + 0.6 * rng.normal(size=(d, h, w))
    got = maskcut(feats, n=1, tau=0.15)
    ref = ref_first_cut(feats)
    assert got.shape == (1, h, w)
    np.testing.assert_array_equal(got[0], ref)


def test_maskcut_first_cut_at_maskcut_size_grid():
    """A larger grid (36 x 36; MaskCut's 480 px gives 60 x 60): the same cut as the generalised solve."""
    rng = np.random.default_rng(7)
    h = w = 36
    yy, xx = np.mgrid[:h, :w]
    obj = (yy - 15) ** 2 + (xx - 20) ** 2 < 9 ** 2
    p = rng.normal(size=(2, 16))
    feats = np.where(obj[None], p[0][:, None, None], p[1][:, None, None]) + 0.9 * rng.normal(size=(16, h, w))
    np.testing.assert_array_equal(maskcut(feats, n=1)[0], ref_first_cut(feats))
