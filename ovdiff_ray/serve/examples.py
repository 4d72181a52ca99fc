"""Example images for the try-it page, so a first look needs no upload: toy scenes with their ground truth when every
class of the bank is a toy class (`ovdiff toy-scenes` draws the same kind), else photos bundled with scikit-image.

`GET /v1/examples` lists them; `GET /v1/examples/{i}.png` is the image; `GET /v1/examples/{i}/truth.png` its ground
truth (toy banks: label values are the bank's, 0 background; uint8 grey PNG)."""
from __future__ import annotations

import io
from functools import lru_cache

import numpy as np

N_TOY = 6
PHOTOS = ("astronaut", "coffee", "chelsea")


def is_toy(names: tuple[str, ...]) -> bool:
    from ..models.toy import parse_name

    try:
        for n in names:
            parse_name(n)
    except Exception:  # noqa: BLE001 - any name the toy world does not know
        return False
    return bool(names) and len(names) < 255


def listing(names: tuple[str, ...]) -> list[dict]:
    if is_toy(names):
        return [{"id": i, "name": f"toy scene {i}", "truth": True} for i in range(N_TOY)]
    return [{"id": i, "name": p, "truth": False} for i, p in enumerate(PHOTOS)]


def _png(a: np.ndarray) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(a).save(buf, format="PNG")
    return buf.getvalue()


@lru_cache(maxsize=64)
def _toy(names: tuple[str, ...], kinds: tuple[str, ...], i: int) -> tuple[bytes, bytes]:
    from ..models.toy import make_scene

    img, lab = make_scene(list(names), list(kinds), np.random.default_rng(1000 + i), 160)
    lab = np.where(lab == 255, 0, lab).astype(np.uint8)
    return _png(img), _png(lab)


def image(names: tuple[str, ...], kinds: tuple[str, ...], i: int) -> bytes | None:
    """Example `i` as PNG bytes (None when there is no such example)."""
    if not 0 <= i < len(listing(names)):
        return None
    if is_toy(names):
        return _toy(names, kinds, i)[0]
    from skimage import data

    a = getattr(data, PHOTOS[i])()
    return _png(np.ascontiguousarray(a[..., :3]))


def truth(names: tuple[str, ...], kinds: tuple[str, ...], i: int) -> bytes | None:
    if not is_toy(names) or not 0 <= i < N_TOY:
        return None
    return _toy(names, kinds, i)[1]
