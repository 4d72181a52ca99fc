"""MaskCut's dense CRF, and the child process that runs it beside a class worker (pipeline/instances.py `CrfPool`).

This module imports only numpy, scipy.ndimage and pydensecrf2, never torch or Ray: a pool child runs it as a script
(`python -P densecrf.py`, a clean main module), so a child costs a few MB and starts in well under a second. The
parent and the child speak a small binary protocol over the child's stdin/stdout (arrays as raw bytes with their
dtype and shape; no pickles); the child prints nothing else and exits at end of input.
"""
from __future__ import annotations

import struct
import sys

import numpy as np

# MaskCut's CRF (CutLER maskcut/crf.py values): 10 mean-field iterations, a Gaussian and a bilateral kernel
CRF_ITERS, CRF_POS_W, CRF_POS_XY, CRF_BI_W, CRF_BI_XY, CRF_BI_RGB = 10, 7, 3, 10, 50, 5
_DTYPES = {0: np.uint8, 1: np.bool_}
_CODES = {np.dtype(v): k for k, v in _DTYPES.items()}


def require_crf():
    """pydensecrf2's module, or a RuntimeError that says how to get it."""
    try:
        import pydensecrf.densecrf as dcrf
    except ImportError as e:
        raise RuntimeError("masks.maskcut_crf needs a dense CRF: pip install pydensecrf2 (or `pip install -e .[crf]`; "
                           f"it builds with a C++ compiler), or set masks.maskcut_crf: false ({e})") from None
    return dcrf


def crf_refine(image: np.ndarray, mask: np.ndarray) -> np.ndarray | None:
    """MaskCut's post-processing of one mask: `image [H, W, 3]` uint8 and `mask [H, W]` bool at the same size ->
    the dense-CRF mask with holes filled, or None when it overlaps the input by IoU < 0.5 (the mask is dropped)."""
    from scipy import ndimage

    dcrf = require_crf()
    h, w = mask.shape
    fg = mask.astype(np.float32)
    logits = np.stack([1 - fg, fg])  # bg, fg
    e = np.exp(logits - logits.max(0))
    probs = e / e.sum(0)
    unary = np.ascontiguousarray(-np.log(probs.reshape(2, -1)).astype(np.float32))
    d = dcrf.DenseCRF2D(w, h, 2)
    d.setUnaryEnergy(unary)
    d.addPairwiseGaussian(sxy=CRF_POS_XY, compat=CRF_POS_W)
    d.addPairwiseBilateral(sxy=CRF_BI_XY, srgb=CRF_BI_RGB, rgbim=np.ascontiguousarray(image, np.uint8), compat=CRF_BI_W)
    q = np.array(d.inference(CRF_ITERS)).reshape(2, h, w)
    out = ndimage.binary_fill_holes(q.argmax(0) == 1)
    union = (out | mask).sum()
    if union == 0 or (out & mask).sum() / union < 0.5:
        return None
    return out


def crf_image(image: np.ndarray, grid_masks: np.ndarray) -> np.ndarray:
    """One image's CRF job: `image [s, s, 3]` uint8 and `grid_masks [M, g, g]` bool -> the refined masks
    `[M', s, s]` bool that overlap their (nearest-upsampled) input by IoU >= 0.5 (MaskCut's rule)."""
    s = image.shape[0]
    if len(grid_masks) == 0:
        return np.zeros((0, s, s), bool)
    g = grid_masks.shape[-1]
    idx = np.minimum(np.floor(np.arange(s, dtype=np.float32) * np.float32(g / s)).astype(np.int64), g - 1)
    up = grid_masks[:, idx][:, :, idx]
    kept = [r for r in (crf_refine(image, m) for m in up) if r is not None]
    return np.stack(kept) if kept else np.zeros((0, s, s), bool)


# -- the protocol: a message is a count of arrays, then per array (dtype code, ndim, shape..., raw bytes) ---------

def write_arrays(f, arrays: list[np.ndarray]) -> None:
    f.write(struct.pack("<I", len(arrays)))
    for a in arrays:
        a = np.ascontiguousarray(a)
        f.write(struct.pack("<BB", _CODES[a.dtype], a.ndim) + struct.pack(f"<{a.ndim}I", *a.shape))
        f.write(a.tobytes())
    f.flush()


def _read_exact(f, n: int) -> bytes:
    b = f.read(n)
    if len(b) != n:
        raise EOFError(f"stream ended ({len(b)} of {n} bytes)")
    return b


def read_arrays(f) -> list[np.ndarray]:
    (n,) = struct.unpack("<I", _read_exact(f, 4))
    out = []
    for _ in range(n):
        code, ndim = struct.unpack("<BB", _read_exact(f, 2))
        shape = struct.unpack(f"<{ndim}I", _read_exact(f, 4 * ndim))
        dt = np.dtype(_DTYPES[code])
        size = int(np.prod(shape)) * dt.itemsize
        out.append(np.frombuffer(bytearray(_read_exact(f, size)), dt).reshape(shape))  # writable
    return out


def child_main() -> int:
    """Serve CRF jobs on stdin/stdout until stdin ends. A failing job answers a status byte 1 and its error."""
    inp, out = sys.stdin.buffer, sys.stdout.buffer
    while True:
        try:
            image, grids = read_arrays(inp)
        except EOFError:
            return 0
        try:
            res = crf_image(image, grids)
        except Exception as e:  # noqa: BLE001 - reported to the parent, which raises it in the class
            msg = f"{type(e).__name__}: {e}".encode()[:4000]
            out.write(b"\x01" + struct.pack("<I", len(msg)) + msg)
            out.flush()
            continue
        out.write(b"\x00")
        write_arrays(out, [res])


if __name__ == "__main__":
    raise SystemExit(child_main())
