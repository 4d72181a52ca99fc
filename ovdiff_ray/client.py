"""A small typed Python client for the ovdiff HTTP API (`ovdiff serve`, `serve run deploy/serve.yaml`).

    from ovdiff_ray.client import Client

    with Client("http://127.0.0.1:8000") as c:
        print(c.bank().classes[:5])
        r = c.segment("scene.png", classes=["red circle", "blue checks"], scores=True, min_confidence=0.6)
        r.labels          # [H, W] int64 label values (0 background, c + 1 bank class c, r.unsure_value unsure)
        r.confidence      # [H, W] float32 in [0, 1] (scores=True)
        r.names           # {value: class name}
        r.topk, r.explain # per label value (scores=True / explain=True)

Errors of the service come back as `ClientError` with the HTTP status, its `error` text, `code` and `detail`.
"""
from __future__ import annotations

import base64
import io
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np


class ClientError(Exception):
    """A 4xx/5xx answer of the service: `status`, `error` (its message), `code`, `detail`."""

    def __init__(self, status: int, error: str, code: str | None = None, detail: Any = None):
        super().__init__(f"HTTP {status}: {error}")
        self.status, self.error, self.code, self.detail = status, error, code, detail


@dataclass
class BankInfo:
    id: str
    version: int
    classes: list[str]
    mask_dtype: str
    raw: dict = field(repr=False, default_factory=dict)


@dataclass
class Segmentation:
    """One `POST /v1/segment` answer, decoded."""

    width: int
    height: int
    names: dict[int, str]  # label value -> class name, for the values present
    labels: np.ndarray | None  # [H, W] int64 (format png; rle decoded too, where unsure pixels read as background)
    confidence: np.ndarray | None = None  # [H, W] float32 in [0, 1]
    class_confidence: dict[int, float] = field(default_factory=dict)
    topk: dict[int, list[dict]] = field(default_factory=dict)
    explain: dict[int, dict] = field(default_factory=dict)
    unsure_value: int | None = None
    raw: dict = field(repr=False, default_factory=dict)

    @property
    def unsure(self) -> np.ndarray | None:
        """Boolean `[H, W]` of the unsure pixels (None when no threshold was applied)."""
        if self.unsure_value is None or self.labels is None:
            return None
        return self.labels == self.unsure_value


def _png(b64: str) -> np.ndarray:
    from PIL import Image

    with Image.open(io.BytesIO(base64.b64decode(b64))) as im:
        return np.asarray(im)


def _image_bytes(image) -> tuple[str, bytes]:
    """A path, bytes, PIL image or `[H, W, 3]` uint8 array -> (file name, PNG/JPEG bytes)."""
    if isinstance(image, (bytes, bytearray)):
        return "image", bytes(image)
    if isinstance(image, (str, Path)):
        p = Path(image)
        return p.name, p.read_bytes()
    from PIL import Image

    im = image if hasattr(image, "save") else Image.fromarray(np.asarray(image, np.uint8))
    buf = io.BytesIO()
    im.save(buf, format="PNG")
    return "image.png", buf.getvalue()


class Client:
    """Typed calls over one `httpx.Client` (keep-alive); use as a context manager or call `close()`."""

    def __init__(self, base_url: str, timeout: float = 120.0, headers: dict[str, str] | None = None):
        import httpx

        self._http = httpx.Client(base_url=base_url.rstrip("/"), timeout=timeout, headers=headers or {},
                                  trust_env=False)

    def __enter__(self) -> "Client":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        self._http.close()

    def _check(self, r) -> dict:
        try:
            body = r.json()
        except ValueError:
            body = {"error": r.text[:500]}
        if r.status_code >= 400:
            raise ClientError(r.status_code, str(body.get("error", r.reason_phrase)), body.get("code"),
                              body.get("detail"))
        return body

    def health(self) -> dict:
        """`GET /healthz`: `{"status": "ok" | "degraded", "checks": {...}}` (ClientError 503 when down)."""
        return self._check(self._http.get("/healthz"))

    def bank(self, bank: str | None = None) -> BankInfo:
        """`GET /v1/bank`: the served bank (default the first)."""
        b = self._check(self._http.get("/v1/bank", params={"bank": bank} if bank else None))
        return BankInfo(b["id"], int(b["version"]), [c["name"] for c in b["classes"]], b["mask_dtype"], b)

    def segment(self, image, classes: list[str] | None = None, *, format: str = "png", pamr: bool = False,
                regions: str | None = None, scores: bool = False, min_confidence: float | None = None,
                explain: bool = False, bank: str | None = None) -> Segmentation:
        """`POST /v1/segment` with an image (path, bytes, PIL image or `[H, W, 3]` uint8 array)."""
        name, data = _image_bytes(image)
        form: dict[str, str] = {"format": format}
        if classes is not None:
            form["classes"] = ",".join(classes)
        for k, v in (("pamr", pamr), ("scores", scores), ("explain", explain)):
            if v:
                form[k] = "true"
        if regions is not None:
            form["regions"] = regions
        if min_confidence is not None:
            form["min_confidence"] = repr(float(min_confidence))
        if bank is not None:
            form["bank"] = bank
        b = self._check(self._http.post("/v1/segment", files={"image": (name, data)}, data=form))
        labels = None
        if b.get("mask") is not None:
            labels = _png(b["mask"]).astype(np.int64)
        elif b.get("rle") is not None:
            from pycocotools import mask as mu

            labels = np.zeros((b["height"], b["width"]), np.int64)
            for v, r in b["rle"].items():
                labels[mu.decode({"size": r["size"], "counts": r["counts"].encode()}).astype(bool)] = int(v)
        conf = None
        if b.get("confidence") is not None:
            conf = _png(b["confidence"]).astype(np.float32) / float(b.get("confidence_scale") or 65535)
        return Segmentation(
            int(b["width"]), int(b["height"]), {int(k): v for k, v in b["classes"].items()}, labels, conf,
            {int(k): float(v) for k, v in (b.get("class_confidence") or {}).items()},
            {int(k): v for k, v in (b.get("topk") or {}).items()},
            {int(k): v for k, v in (b.get("explain") or {}).items()},
            b.get("unsure_value") if b.get("mask") is not None else None, b)
