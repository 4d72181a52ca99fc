"""Request validation for the segmentation service: limits, form fields and image decoding.

Everything here runs before a request reaches a model. Each check raises `RequestError` (an HTTP status, a
message that says what is wrong, and a JSON-able detail); the ingress turns it into `{"error": ..., "detail": ...}`.

Images are checked in two steps: the header (format, width, height, aspect) before any pixel is decoded, which
stops decompression bombs, then a full decode, which catches truncated or corrupt files.
"""
from __future__ import annotations

import io
import re
import warnings
from dataclasses import asdict, dataclass, fields
from typing import Any, Sequence

import numpy as np

FORMATS = ("png", "rle", "overlay")
IMAGE_FORMATS = ("PNG", "JPEG", "WEBP", "BMP", "GIF", "TIFF")  # what PIL may open: a small attack surface
TRUE = {"1", "true", "yes", "on"}
FALSE = {"0", "false", "no", "off", ""}


class RequestError(ValueError):
    """A bad request: HTTP `status`, a message saying what is wrong, and a JSON-able `detail`."""

    def __init__(self, status: int, error: str, detail: Any = None, code: str = "bad_request",
                 headers: dict | None = None):
        super().__init__(error)
        self.status, self.error, self.detail, self.code = status, error, detail, code
        self.headers = headers  # e.g. WWW-Authenticate on a 401, Retry-After on a 429

    def to_dict(self) -> dict:
        return {"error": self.error, "detail": self.detail, "code": self.code}


@dataclass(frozen=True)
class Limits:
    """Configurable request limits (all checked before a model runs)."""

    max_upload_bytes: int = 20 * 2**20  # whole request body
    max_pixels: int = 4096 * 4096  # width * height, from the header
    max_side: int = 8192  # longest side, from the header
    max_aspect: float = 10.0  # long side / short side (the segmenter resizes the short side up)
    max_classes: int = 512  # names in one request's `classes`
    max_class_chars: int = 200  # characters per class name
    max_field_bytes: int = 64 * 1024  # any non-file form field
    body_timeout_s: float = 20.0  # the whole body must arrive within this, else 408 + close
    max_work_side: int = 1024  # larger images are downscaled on decode to this long side (the mask is upscaled back)
    max_inflight_pixels: int = 40_000_000  # admission: decoded pixels in flight per ingress replica (2 x 4096^2 + room)
    admission_wait_s: float = 5.0  # a request waits at most this for pixel budget, then 503 + Retry-After

    @classmethod
    def from_dict(cls, d: dict | None) -> "Limits":
        d = dict(d or {})
        if "max_upload_mb" in d:
            d["max_upload_bytes"] = int(float(d.pop("max_upload_mb")) * 2**20)
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(f"unknown limit(s) {', '.join(unknown)} (known: {', '.join(sorted(known))}, "
                             "max_upload_mb)")
        out = cls(**d)
        for f in fields(out):
            if getattr(out, f.name) <= 0:
                raise ValueError(f"limit {f.name} must be positive, got {getattr(out, f.name)}")
        return out

    def to_dict(self) -> dict:
        return asdict(self)


# ------------------------------------------------------------------------------------------------- fields

def parse_bool(name: str, value: str | None, default: bool = False) -> bool:
    if value is None:
        return default
    v = value.strip().lower()
    if v in TRUE:
        return True
    if v in FALSE:
        return default if v == "" else False
    raise RequestError(400, f"field {name!r} must be a boolean (true/false, 1/0, yes/no, on/off), got {value[:40]!r}",
                       {"field": name, "value": value[:200]}, "bad_field")


REGION_METHODS = ("none", "superpixels", "sam")


def parse_regions(value: str | None) -> str | None:
    """Form field `regions`: unset -> None (the bank recipe's setting); a boolean word -> `on` / `off`; or a method
    name (none | superpixels | sam)."""
    if value is None or not value.strip():
        return None
    v = value.strip().lower()
    if v in REGION_METHODS:
        return v
    if v in TRUE or v in FALSE:
        return "on" if v in TRUE else "off"
    raise RequestError(400, f"field 'regions' must be on/off (a boolean) or one of {', '.join(REGION_METHODS)}, got "
                            f"{value[:40]!r}", {"field": "regions", "value": value[:200]}, "bad_field")


def parse_format(value: str | None) -> str:
    """The documented enum, enforced: absent -> png; anything else (empty, other case) must be one of FORMATS."""
    if value is None:
        return "png"
    v = value.strip()
    if v not in FORMATS:
        raise RequestError(400, f"unknown format {value[:40]!r}: use one of {', '.join(FORMATS)}",
                           {"field": "format", "value": value[:200], "allowed": list(FORMATS)}, "bad_format")
    return v


def split_classes(value: str | None, limits: Limits) -> list[str] | None:
    """`classes` field -> names (stripped, de-duplicated, order kept); None when the field is absent."""
    if value is None:
        return None
    names = list(dict.fromkeys(c.strip() for c in value.split(",") if c.strip()))
    if not names:
        raise RequestError(400, "empty class list: `classes` names no class (leave the field out to use all the "
                                "bank's classes)", {"field": "classes", "value": value[:200]}, "empty_classes")
    if len(names) > limits.max_classes:
        raise RequestError(400, f"too many classes: {len(names)} named, at most {limits.max_classes} per request",
                           {"field": "classes", "count": len(names), "max_classes": limits.max_classes},
                           "too_many_classes")
    long = [n for n in names if len(n) > limits.max_class_chars]
    if long:
        raise RequestError(400, f"class name longer than {limits.max_class_chars} characters: {long[0][:60]!r}...",
                           {"field": "classes", "max_class_chars": limits.max_class_chars}, "bad_field")
    return names


def check_classes(names: list[str] | None, vocabulary: Sequence[str], bank: str) -> list[str] | None:
    """Map requested names onto the bank's names (case/space folded); unknown names are listed in the error."""
    if names is None:
        return None
    from ..vocab import fold

    by = {fold(n): n for n in vocabulary}
    unknown = [n for n in names if fold(n) not in by]
    if unknown:
        shown = ", ".join(repr(n) for n in unknown[:20]) + (" ..." if len(unknown) > 20 else "")
        raise RequestError(400, f"unknown classes (not in bank {bank}): {shown}",
                           {"unknown": unknown, "bank": bank,
                            "known": list(vocabulary) if len(vocabulary) <= 100 else f"{len(vocabulary)} classes: "
                                     "see GET /v1/bank"}, "unknown_classes")
    return list(dict.fromkeys(by[fold(n)] for n in names))


# -------------------------------------------------------------------------------------------------- images

def check_header(data: bytes, limits: Limits) -> tuple[str, int, int]:
    """(format, width, height) of an image from its header only; nothing is decoded."""
    from PIL import Image, UnidentifiedImageError

    if not data:
        raise RequestError(400, "empty upload: the `image` file has no bytes", {"field": "image"}, "empty_upload")
    if len(data) > limits.max_upload_bytes:
        raise RequestError(413, f"upload too large: {len(data):,} bytes, at most {limits.max_upload_bytes:,}",
                           {"bytes": len(data), "max_upload_bytes": limits.max_upload_bytes}, "too_large")
    Image.MAX_IMAGE_PIXELS = limits.max_pixels  # PIL's own guard: it refuses more than twice this while opening
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)  # we refuse those just below
            with Image.open(io.BytesIO(data), formats=IMAGE_FORMATS) as im:  # reads the header only
                fmt, (w, h) = im.format, im.size
    except UnidentifiedImageError:
        raise RequestError(415, f"not an image: the upload is not a {'/'.join(IMAGE_FORMATS)} file",
                           {"field": "image", "bytes": len(data), "accepted": list(IMAGE_FORMATS),
                            "starts_with": data[:8].hex()}, "not_an_image") from None
    except Image.DecompressionBombError as e:  # the header claims more than twice the limit
        raise too_many_pixels(e, limits) from None
    except (OSError, SyntaxError, ValueError) as e:
        raise RequestError(400, f"unreadable image header: {e}", {"field": "image"}, "bad_image") from None
    if w < 1 or h < 1:
        raise RequestError(400, f"image has no pixels ({w}x{h})", {"width": w, "height": h}, "bad_image")
    if w * h > limits.max_pixels or max(w, h) > limits.max_side:
        raise RequestError(413, f"image too large: {w}x{h} = {w * h:,} pixels, at most {limits.max_pixels:,} pixels "
                                f"and {limits.max_side} per side", {"width": w, "height": h,
                                                                    "max_pixels": limits.max_pixels,
                                                                    "max_side": limits.max_side}, "too_many_pixels")
    if max(w, h) / min(w, h) > limits.max_aspect:
        raise RequestError(400, f"image aspect ratio too extreme: {w}x{h}, at most {limits.max_aspect:g}:1",
                           {"width": w, "height": h, "max_aspect": limits.max_aspect}, "bad_aspect")
    return fmt, w, h


def too_many_pixels(e: Exception, limits: Limits) -> RequestError:
    """PIL's DecompressionBombError (the header claims more than twice `max_pixels`) as a 413."""
    m = re.search(r"\((\d+) pixels\)", str(e))
    n = f"{int(m[1]):,} pixels" if m else f"more than {2 * limits.max_pixels:,} pixels"
    return RequestError(413, f"image too large: {n}, at most {limits.max_pixels:,} pixels (decompression bomb "
                             "guard: nothing was decoded)", {"max_pixels": limits.max_pixels}, "too_many_pixels")


@dataclass
class Decoded:
    """An upload decoded for the model: `image` `[h, w, 3]` uint8 with its long side at most `max_work_side`, and
    the upright size of the upload (`width` x `height`, EXIF orientation applied), which the mask is returned at."""

    image: np.ndarray
    width: int
    height: int

    @property
    def scaled(self) -> bool:
        return self.image.shape[:2] != (self.height, self.width)


def upright(im):
    """Apply the EXIF orientation tag (if any) to a loaded PIL image; a broken EXIF block leaves it as stored."""
    from PIL import ImageOps

    try:
        return ImageOps.exif_transpose(im) if _orientation(im) != 1 else im
    except Exception:  # noqa: BLE001 - orientation is a hint; never refuse an image over it
        return im


def _orientation(im) -> int:
    try:
        return int(im.getexif().get(0x0112, 1))
    except Exception:  # noqa: BLE001
        return 1


def work_size(w: int, h: int, max_side: int) -> tuple[int, int]:
    s = min(1.0, max_side / max(w, h))
    return max(1, round(w * s)), max(1, round(h * s))


def decode_image(data: bytes, limits: Limits, work: bool = False) -> "np.ndarray | Decoded":
    """Validated upload -> `[H, W, 3]` uint8 (first frame; alpha dropped; EXIF orientation applied).

    `work=True` returns a `Decoded` whose image is downscaled to `limits.max_work_side` (JPEGs are decoded at a
    reduced DCT scale, so a 4096^2 JPEG never exists at full size here)."""
    from PIL import Image

    fmt, w, h = check_header(data, limits)
    try:
        with Image.open(io.BytesIO(data), formats=IMAGE_FORMATS) as im:
            im.seek(0)
            target = work_size(w, h, limits.max_work_side)
            if work and fmt == "JPEG" and target != (w, h):
                im.draft("RGB", target)  # decode at 1/2, 1/4 or 1/8 scale, at least the target size
            expect = im.size
            im.load()  # raises on truncated or corrupt data (LOAD_TRUNCATED_IMAGES stays False)
            if im.size != expect:
                raise OSError(f"frame size {im.size} differs from the header's {w}x{h}")
            swapped = _orientation(im) in (5, 6, 7, 8)  # a quarter turn: the upright size is h x w
            im = upright(im)
            ow, oh = (h, w) if swapped and im.size == expect[::-1] else (w, h)
            if work:
                tw, th = work_size(ow, oh, limits.max_work_side)
                if im.size != (tw, th):
                    im = im.convert("RGB").resize((tw, th), Image.BILINEAR, reducing_gap=2.0)
            rgb = np.array(im.convert("RGB"))  # a writable copy
    except Image.DecompressionBombError as e:
        raise too_many_pixels(e, limits) from None
    except (OSError, SyntaxError, ValueError, EOFError) as e:
        msg = str(e) or e.__class__.__name__
        truncated = "truncated" in msg.lower() or isinstance(e, EOFError)
        raise RequestError(400, f"{'truncated' if truncated else 'corrupt'} {fmt} image: {msg}",
                           {"field": "image", "format": fmt, "width": w, "height": h},
                           "truncated_image" if truncated else "bad_image") from None
    return Decoded(rgb, ow, oh) if work else rgb
