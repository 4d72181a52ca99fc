"""Row encoders of the labelling job: image decoding, COCO RLE, Label Studio brush RLE, PNG, region scores; the
part row schema. The Label Studio ML backend (serve/labelstudio.py) and the CVAT function (label/cvat.py) use the
same encoders, so every tool gets the same masks and scores."""
from __future__ import annotations

import hashlib
import io

import numpy as np
import pyarrow as pa

OK, UNREADABLE, FAILED = "ok", "unreadable", "failed"
MAX_PIXELS = 100_000_000
MAX_BYTES = 256 * 2 ** 20
LS_RLE_SIZES = (3, 4, 8, 16)  # Label Studio's run-length size classes (bits)

ROW_SCHEMA = pa.schema([
    ("path", pa.string()),  # key under --images, '/'-separated
    ("size", pa.int64()),  # bytes when listed: a file whose size changed is labelled again
    ("status", pa.string()),  # ok | unreadable (bad input) | failed (labelling raised)
    ("error", pa.string()),
    ("width", pa.int32()),
    ("height", pa.int32()),
    ("values", pa.list_(pa.int32())),  # label values present, background excluded, ascending
    ("names", pa.list_(pa.string())),
    ("counts", pa.list_(pa.string())),  # COCO compressed RLE counts (ASCII), column-major
    ("area", pa.list_(pa.int64())),
    ("bbox", pa.list_(pa.list_(pa.float64()))),  # [x, y, w, h]
    ("ls_rle", pa.list_(pa.binary())),  # Label Studio brush RLE per class (when labelstudio is asked)
    ("score", pa.list_(pa.float32())),  # per class: mean score of the class over its pixels
    ("inst_score", pa.list_(pa.list_(pa.float32()))),  # per class, per connected component (`components` order)
    ("image_id", pa.int64()),  # stable COCO image id: `image_id(path)`
    ("png", pa.binary()),  # class-index PNG (when png is asked); written as a file, not kept in parts
    ("seconds", pa.float64()),
    ("worker", pa.string()),
    # issue 21 (ovdiff_ray/confidence.py): null in rows from before it
    ("confidence", pa.float32()),  # mean pixel confidence of the image
    ("class_confidence", pa.list_(pa.float32())),  # per class (`values` order): mean confidence over its pixels
    ("unsure", pa.string()),  # COCO RLE counts of the unsure pixels (confidence < min_confidence); "" = none
    ("unsure_area", pa.int64()),
    ("topk", pa.list_(pa.list_(pa.int32()))),  # per class: best label values by mean score over its pixels
    ("topk_score", pa.list_(pa.list_(pa.float32()))),
    ("conf_png", pa.binary()),  # 16-bit confidence PNG (--scores); written as a file, not kept in parts
])
PART_SCHEMA = pa.schema([f for f in ROW_SCHEMA if f.name not in ("png", "conf_png")])


class ImageError(Exception):
    """A file that is not a readable image (not a ValueError, so decoder ValueErrors can be wrapped)."""


def decode_image(data: bytes, max_pixels: int = MAX_PIXELS) -> np.ndarray:
    """Image file bytes -> `[H, W, 3]` uint8 (as `segment.read_image` decodes); ImageError with the reason."""
    from PIL import Image, UnidentifiedImageError

    from ..segment import to_rgb_array

    try:
        with Image.open(io.BytesIO(data)) as im:
            w, h = im.size
            if w * h > max_pixels:
                raise ImageError(f"{w}x{h} image: {w * h} pixels, over the limit of {max_pixels} (--max-pixels)")
            im.load()
            return np.array(to_rgb_array(im))  # writable, as torch.from_numpy wants
    except UnidentifiedImageError:
        raise ImageError(f"not an image ({len(data)} bytes that no image decoder recognises)") from None
    except Image.DecompressionBombError as e:
        raise ImageError(f"too many pixels (decompression bomb): {e}") from None
    except (OSError, SyntaxError, ValueError, EOFError, IndexError) as e:
        raise ImageError(f"corrupt or truncated image ({type(e).__name__}: {e})") from None


def coco_rle(mask: np.ndarray) -> tuple[str, int, list[float]]:
    """Boolean mask `[H, W]` -> (COCO compressed RLE counts as ASCII, area, bbox [x, y, w, h])."""
    from pycocotools import mask as mu

    rle = mu.encode(np.asfortranarray(mask, dtype=np.uint8))
    return rle["counts"].decode("ascii"), int(mu.area(rle)), [float(v) for v in mu.toBbox(rle)]


def coco_decode(counts: str, height: int, width: int) -> np.ndarray:
    """COCO compressed RLE counts -> boolean mask `[H, W]`."""
    from pycocotools import mask as mu

    return mu.decode({"size": [height, width], "counts": counts.encode("ascii")}).astype(bool)


def _pack_bits(values: np.ndarray, widths: np.ndarray) -> bytes:
    """Fields (value, width in bits), most significant bit first, then 1-8 zero bits as Label Studio pads."""
    shifts = np.arange(31, -1, -1, dtype=np.uint64)
    bits = (values.astype(np.uint64)[:, None] >> shifts) & np.uint64(1)
    stream = bits[shifts[None, :] < widths.astype(np.uint64)[:, None]].astype(np.uint8)
    return np.packbits(np.concatenate([stream, np.zeros(8 - stream.size % 8, np.uint8)])).tobytes()


def ls_brush_rle(mask: np.ndarray) -> bytes:
    """Label Studio brush RLE of a boolean mask `[H, W]`: the bytes `label_studio_sdk.converter.brush.mask2rle`
    gives for the mask as 0/255 (pixels row-major, each repeated over RGBA), in thi.ng rle-pack's format: a 32-bit
    count, 5-bit word size - 1, four 4-bit run-size classes - 1, then per run: 1 (a repeat), the size class (2 bits),
    the run length - 1 in that class's bits, the 8-bit value; runs over 2**16 are split as the SDK splits them."""
    flat = np.ascontiguousarray(mask, dtype=bool).ravel()
    starts = np.flatnonzero(np.r_[True, flat[1:] != flat[:-1]]) if flat.size else np.zeros(0, np.int64)
    runs = np.diff(np.r_[starts, flat.size]).astype(np.int64) * 4
    cls = (runs > 8).astype(np.int64) + (runs > 16) + (runs > 256)
    pieces = np.where(runs > 2 ** 16, (runs - 1) // 2 ** 16 + 1, 1)
    which = np.repeat(np.arange(len(runs)), pieces)
    nth = np.arange(len(which)) - np.repeat(np.cumsum(pieces) - pieces, pieces)
    length = np.where(nth < pieces[which] - 1, 2 ** 16, runs[which] - (pieces[which] - 1) * 2 ** 16)
    tok_cls = cls[which]
    vals = np.stack([np.ones_like(length), tok_cls, length - 1, np.where(flat[starts][which], 255, 0)], 1)
    widths = np.stack([np.ones_like(length), np.full_like(length, 2), np.array(LS_RLE_SIZES)[tok_cls],
                       np.full_like(length, 8)], 1)
    head_v = np.array([flat.size * 4, 8 - 1] + [s - 1 for s in LS_RLE_SIZES])
    head_w = np.array([32, 5, 4, 4, 4, 4])
    return _pack_bits(np.r_[head_v, vals.ravel()], np.r_[head_w, widths.ravel()])


def encode_png(labels: np.ndarray, dtype: str) -> bytes:
    """Class-index map -> single-channel PNG (8-bit, or 16-bit for `uint16`)."""
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(np.ascontiguousarray(labels.astype(dtype))).save(buf, format="PNG")
    return buf.getvalue()


def encode_labels(labels: np.ndarray, names: dict[int, str], png_dtype: str | None, labelstudio: bool,
                  scores: np.ndarray | None = None, confidence: np.ndarray | None = None,
                  min_confidence: float = 0.0, topk: dict | None = None, conf_png: bool = False) -> dict:
    """Label map in bank values -> the compact fields of a row (per-class RLE, scores, optional PNG / brush RLE).
    `scores` `[H, W]` is each pixel's score for its own class (`own_scores`): the class score is its mean over the
    class's pixels, and each connected component gets the mean over its own. `confidence` `[H, W]` in [0, 1]: the
    image and per-class mean confidence; pixels under `min_confidence` (> 0) are unsure: in no class's RLE or brush,
    the unsure value (255 / 65535) in the PNG, their own RLE in `unsure`. `topk`: label value -> [(value, score)].
    `conf_png`: also the 16-bit confidence PNG."""
    from scipy import ndimage

    from ..confidence import unsure_mask, unsure_value

    unsure = unsure_mask(confidence, min_confidence)
    present = [int(v) for v in np.unique(labels if unsure is None else labels[~unsure]) if v > 0]
    row = dict(width=int(labels.shape[1]), height=int(labels.shape[0]), values=present,
               names=[names[v] for v in present], counts=[], area=[], bbox=[], ls_rle=[], png=b"",
               score=[] if scores is not None else None, inst_score=[] if scores is not None else None,
               confidence=None, class_confidence=None, unsure=None, unsure_area=None, topk=None, topk_score=None,
               conf_png=b"")
    if confidence is not None:
        row["confidence"] = float(np.mean(confidence))
        row["class_confidence"] = []
    if unsure is not None:
        row["unsure"], row["unsure_area"], _ = coco_rle(unsure) if unsure.any() else ("", 0, None)
    if topk is not None:
        row["topk"] = [[int(c) for c, _ in topk.get(v, [])] for v in present]
        row["topk_score"] = [[float(s) for _, s in topk.get(v, [])] for v in present]
    for v in present:
        mask = labels == v
        if unsure is not None:
            mask &= ~unsure
        if confidence is not None:
            row["class_confidence"].append(float(confidence[mask].mean()))
        counts, area, bbox = coco_rle(mask)
        row["counts"].append(counts)
        row["area"].append(area)
        row["bbox"].append(bbox)
        if labelstudio:
            row["ls_rle"].append(ls_brush_rle(mask))
        if scores is not None:
            row["score"].append(float(scores[mask].mean()))
            lab, n = components(mask)
            row["inst_score"].append([float(x) for x in ndimage.mean(scores, lab, np.arange(1, n + 1))])
    if png_dtype:
        row["png"] = encode_png(labels if unsure is None else np.where(unsure, unsure_value(png_dtype), labels),
                                png_dtype)
    if conf_png and confidence is not None:
        from ..riskcoverage import quantize

        row["conf_png"] = encode_png(quantize(confidence), "uint16")
    return row


def image_id(path: str) -> int:
    """A COCO image id from the image's path under the images root: the first 53 bits of its sha256 (an integer
    every JSON reader keeps exactly), so ids never change when images are added or a job is re-run."""
    return max(1, int.from_bytes(hashlib.sha256(path.encode("utf-8")).digest()[:8], "big") >> 11)


def own_scores(res) -> np.ndarray | None:
    """`SegmentationResult` with scores -> `[H, W]` float32: each pixel's score for the class it is labelled with
    (background's score on background pixels); None when the result has no scores."""
    if res.scores is None:
        return None
    row_of = np.zeros(int(res.labels.max(initial=0)) + 1, np.int64)
    for v, name in res.classes.items():
        if v > 0:
            row_of[v] = res.kept.index(name) + 1
    return np.take_along_axis(res.scores, row_of[res.labels][None], 0)[0]


def components(mask: np.ndarray) -> tuple[np.ndarray, int]:
    """Connected components of a boolean mask `[H, W]` (8-connected) -> (int32 map, 1..n; count n), numbered in
    raster order of their first pixel: the order `inst_score` lists them in."""
    from scipy import ndimage

    lab, n = ndimage.label(mask, structure=np.ones((3, 3), bool))
    return lab.astype(np.int32), int(n)


def labels_of(row: dict, unsure_value: int | None = None) -> np.ndarray:
    """A stored row -> its label map `[H, W]` int32 (bank values; unsure pixels `unsure_value`, or background
    when None)."""
    out = np.zeros((row["height"], row["width"]), np.int32)
    for v, counts in zip(row["values"], row["counts"]):
        out[coco_decode(counts, row["height"], row["width"])] = v
    if unsure_value is not None and row.get("unsure"):
        out[coco_decode(row["unsure"], row["height"], row["width"])] = unsure_value
    return out


def error_row(path: str, size: int, status: str, error: str, worker: str = "driver") -> dict:
    return dict(path=path, size=size, status=status, error=error, width=0, height=0, values=[], names=[],
                counts=[], area=[], bbox=[], ls_rle=[], score=None, inst_score=None, image_id=image_id(path),
                png=b"", seconds=0.0, worker=worker, confidence=None, class_confidence=None, unsure=None,
                unsure_area=None, topk=None, topk_score=None, conf_png=b"")
