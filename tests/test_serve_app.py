"""The FastAPI app over an in-process backend (a real Segmenter on the toy bank; no Ray, no HTTP server).

Every endpoint, every kind of bad input (each answered with a 4xx JSON error that says what is wrong, without reaching
the model), and the service still answering afterwards.
"""
from __future__ import annotations

import base64
import io
import shutil
import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from ovdiff_ray.serve.app import LocalBackend, Overloaded, make_app
from ovdiff_ray.serve.engine import decode_png, encode_png, mask_dtype

LIMITS = {"max_upload_bytes": 1_000_000, "max_pixels": 300_000, "max_side": 2000, "max_classes": 6}


class CountingBackend:
    """Counts what reaches the model side."""

    def __init__(self, inner):
        self.inner, self.calls = inner, 0

    async def catalog(self):
        return await self.inner.catalog()

    async def segment(self, key, job):
        self.calls += 1
        return await self.inner.segment(key, job)

    async def health(self):
        return await self.inner.health()


@pytest.fixture(scope="module")
def banks(toy_bank, tmp_path_factory):
    """A copy of the toy bank with a second committed version (its first 4 classes): two banks side by side."""
    from ovdiff_ray.store.fs import Location
    from ovdiff_ray.store.shards import commit_manifest, read_manifest

    root = tmp_path_factory.mktemp("serve-app") / "bank"
    shutil.copytree(toy_bank, root)
    loc = Location(str(root))
    m = read_manifest(loc)
    commit_manifest(loc, {**m, "version": m["version"] + 1, "classes": m["classes"][:4]})
    return str(root), m


@pytest.fixture(scope="module")
def service(banks):
    from fastapi.testclient import TestClient

    root, m = banks
    pixels = Image.MAX_IMAGE_PIXELS
    backend = CountingBackend(LocalBackend({"banks": [{"uri": root, "version": m["version"]},
                                                      {"uri": root, "version": m["version"] + 1, "name": "small"}],
                                            "limits": LIMITS, "torch_threads": 1}))
    with TestClient(make_app(backend)) as client:
        yield client, backend, m
    Image.MAX_IMAGE_PIXELS = pixels


@pytest.fixture(scope="module")
def segmenter(banks):
    from ovdiff_ray.segment import Segmenter
    from ovdiff_ray.store.bank import Bank

    return Segmenter.from_bank(Bank.load(banks[0], banks[1]["version"]))


def scene(toy_scenes, i=0) -> bytes:
    return (Path(toy_scenes) / "images" / f"{i:04d}.png").read_bytes()


def png_bytes(img: Image.Image, **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="PNG", **kw)
    return buf.getvalue()


def png_header_only(width: int, height: int) -> bytes:
    """A PNG whose header claims `width x height` RGB pixels, followed by a tiny IDAT: a decompression bomb shape."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b"")


def post(client, image: bytes | None = None, name="scene.png", ctype="image/png", **fields):
    """A multipart POST like the page's form (text fields as parts without a filename)."""
    files = [(k, (None, v)) for k, v in fields.items() if v is not None]
    if image is not None:
        files.insert(0, ("image", (name, image, ctype)))
    return client.post("/v1/segment", files=files)


def assert_alive(client):
    r = client.get("/healthz")
    assert r.status_code == 200 and r.json()["status"] == "ok", r.text


def error_of(r, status: int, *needles: str, code: str | None = None) -> dict:
    assert r.status_code == status, r.text
    body = r.json()
    assert set(body) >= {"error", "detail"}, body
    for n in needles:
        assert n.lower() in body["error"].lower(), (n, body["error"])
    if code:
        assert body["code"] == code, body
    return body


# ------------------------------------------------------------------------------------------------ endpoints

def test_page_and_health(service):
    client, backend, m = service
    r = client.get("/")
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/html")
    # the page's script posts these fields (the headless-browser test drives it: tests/browser)
    for needle in ('fetch("v1/segment"', 'data.append("image"', 'data.append("classes"', 'data.append("scores", "true")',
                   'data.append("explain", "true")', 'data.append("min_confidence"', 'v1/examples'):
        assert needle in r.text, needle
    h = client.get("/healthz").json()
    assert h == {"status": "ok", "checks": {"segmenter": "ok", "storage": "ok"}}  # public: status only


def test_bank_info(service):
    client, _, m = service
    key = f"{m['bank_id']}@v{m['version']}"
    b = client.get("/v1/bank").json()
    assert (b["id"], b["version"], b["key"], b["default"]) == (m["bank_id"], m["version"], key, key)
    assert [c["name"] for c in b["classes"]] == [c["name"] for c in m["classes"]]
    assert [c["id"] for c in b["classes"]] == list(range(1, len(m["classes"]) + 1))
    assert b["recipe"]["name"] == "toy" and set(b["extractors"]) == {"toy", "toyctx"}
    assert b["mask_dtype"] == "uint8" and b["limits"]["max_pixels"] == LIMITS["max_pixels"]
    assert [x["key"] for x in b["banks"]] == [key, f"{m['bank_id']}@v{m['version'] + 1}"]
    for ref in ("small", f"{m['bank_id']}@v{m['version'] + 1}", f"{m['bank_id']}@{m['version'] + 1}", m["bank_id"]):
        v2 = client.get("/v1/bank", params={"bank": ref}).json()
        assert v2["version"] == m["version"] + 1 and v2["num_classes"] == 4, ref  # bare id: newest configured
    error_of(client.get("/v1/bank", params={"bank": "nope"}), 404, "unknown bank 'nope'", key, code="unknown_bank")


def test_segment_png_matches_in_process(service, segmenter, toy_scenes):
    client, _, m = service
    data = scene(toy_scenes, 1)
    r = post(client, data)
    assert r.status_code == 200, r.text
    body = r.json()
    ref = segmenter.segment(np.array(Image.open(io.BytesIO(data)).convert("RGB")))
    labels = decode_png(body["mask"])
    assert (body["width"], body["height"]) == (ref.labels.shape[1], ref.labels.shape[0]) == labels.shape[::-1]
    assert body["mask_dtype"] == "uint8" and body["format"] == "png"
    assert (labels == ref.labels).mean() > 0.999
    assert body["classes"] == {str(v): n for v, n in ref.classes.items()}
    assert body["bank"] == {"id": m["bank_id"], "version": m["version"]}
    assert {"total_ms", "segment_ms", "decode_ms", "encode_ms", "batch_size", "stages_ms"} <= set(body["timing"])


def test_segment_rle_and_overlay(service, toy_scenes):
    from pycocotools import mask as mask_utils

    client, _, _ = service
    data = scene(toy_scenes, 2)
    png = post(client, data).json()
    labels = decode_png(png["mask"])
    rle = post(client, data, format="rle").json()
    assert set(rle["rle"]) == {k for k in png["classes"] if k != "0"}
    for v, r in rle["rle"].items():
        m = mask_utils.decode({"size": r["size"], "counts": r["counts"].encode("ascii")})
        assert np.array_equal(m.astype(bool), labels == int(v)), v
    ov = post(client, data, format="overlay").json()
    img = Image.open(io.BytesIO(base64.b64decode(ov["overlay"])))
    assert img.width == ov["width"] and img.height > ov["height"]  # the legend sits under the image
    assert [x["name"] for x in ov["legend"]] == [n for k, n in sorted(ov["classes"].items(), key=lambda x: int(x[0]))
                                                 if k != "0"]
    assert all(x["color"].startswith("#") and len(x["color"]) == 7 for x in ov["legend"])


def test_segment_classes_pamr_and_second_bank(service, toy_scenes):
    client, _, m = service
    names = [c["name"] for c in m["classes"]]
    r = post(client, scene(toy_scenes, 3), classes=f"  {names[0].upper()} ,{names[5]}, {names[0]}", pamr="true")
    assert r.status_code == 200, r.text
    allowed = {0, 1, 6}
    assert set(int(k) for k in r.json()["classes"]) <= allowed
    assert set(np.unique(decode_png(r.json()["mask"]))) <= allowed
    r = post(client, scene(toy_scenes, 3), bank="small")
    assert r.status_code == 200 and r.json()["bank"]["version"] == m["version"] + 1
    assert set(r.json()["classes"].values()) <= {"background", *names[:4]}
    error_of(post(client, scene(toy_scenes), bank="small", classes=names[5]), 400, "unknown classes", repr(names[5]))


def test_uint16_masks_for_large_banks():
    labels = np.array([[0, 1, 255], [256, 300, 1203]], np.int32)
    # 255 is the "unsure" value of uint8 masks (issue 21): a bank of 255 classes gets uint16 masks
    assert mask_dtype(254) == "uint8" and mask_dtype(255) == "uint16"
    with pytest.raises(AssertionError):
        np.testing.assert_array_equal(decode_png(encode_png(labels, 254)), labels)  # uint8 would wrap
    out = decode_png(encode_png(labels, 1203))
    np.testing.assert_array_equal(out, labels)
    with Image.open(io.BytesIO(base64.b64decode(encode_png(labels, 1203)))) as im:
        assert im.mode.startswith("I;16") or im.mode == "I"


# ---------------------------------------------------------------------------------------------- bad input

def bad_cases(toy_scenes):
    good = scene(toy_scenes)
    big = png_bytes(Image.new("RGB", (600, 600), (10, 20, 30)))  # 360k pixels > 300k
    wide = png_bytes(Image.new("RGB", (1200, 40)))
    jpeg = io.BytesIO()
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (200, 200, 3), np.uint8)).save(jpeg, format="JPEG")
    return [
        ("not an image", dict(image=b"hello, I am text", name="x.png"), 415, ["not an image"], "not_an_image"),
        ("not an image (gz)", dict(image=zlib.compress(b"x" * 1000)), 415, ["not an image"], "not_an_image"),
        ("truncated png", dict(image=good[: len(good) // 2]), 400, ["truncated"], "truncated_image"),
        ("truncated jpeg", dict(image=jpeg.getvalue()[: len(jpeg.getvalue()) // 2], ctype="image/jpeg"), 400, ["truncated", "JPEG"],
         "truncated_image"),
        ("bomb header", dict(image=png_header_only(100_000, 100_000)), 413, ["too large", "10,000,000,000 pixels",
                                                                             "nothing was decoded"],
         "too_many_pixels"),
        ("over pixel limit", dict(image=big), 413, ["too large", "600x600", "300,000"], "too_many_pixels"),
        ("extreme aspect", dict(image=wide), 400, ["aspect ratio", "1200x40"], "bad_aspect"),
        ("empty upload", dict(image=b""), 400, ["empty upload"], "empty_upload"),
        ("oversized upload", dict(image=good + b"\0" * 1_100_000), 413, ["upload too large", "1,000,000"],
         "too_large"),
        ("missing image", dict(image=None, classes="red circle"), 400, ["missing form field 'image'"],
         "missing_image"),
        ("unknown classes", dict(image=good, classes="red circle, purple hexagon, unicorn"), 400,
         ["unknown classes", "'purple hexagon'", "'unicorn'"], "unknown_classes"),
        ("too many classes", dict(image=good, classes="a,b,c,d,e,f,g"), 400, ["too many classes", "7", "at most 6"],
         "too_many_classes"),
        ("empty class list", dict(image=good, classes=" , ,"), 400, ["empty class list"], "empty_classes"),
        ("wrong format", dict(image=good, format="jpeg"), 400, ["unknown format 'jpeg'", "png, rle, overlay"],
         "bad_format"),
        ("pamr not a bool", dict(image=good, pamr="maybe"), 400, ["'pamr' must be a boolean", "'maybe'"],
         "bad_field"),
        ("unknown bank", dict(image=good, bank="lvis@v9"), 404, ["unknown bank 'lvis@v9'"], "unknown_bank"),
        ("unknown field", dict(image=good, clases="red circle"), 400, ["unknown form field", "'clases'"],
         "bad_field"),
    ]


def test_bad_inputs(service, toy_scenes):
    client, backend, _ = service
    before = backend.calls
    for name, kw, status, needles, code in bad_cases(toy_scenes):
        kw = dict(kw)
        image = kw.pop("image")
        r = post(client, image, **kw)
        body = error_of(r, status, *needles, code=code)
        assert body["error"], name
        assert_alive(client)
    assert backend.calls == before, "a bad request reached the model"
    assert post(client, scene(toy_scenes)).status_code == 200  # and segmentation still works


def test_bad_form_shapes(service, toy_scenes):
    client, backend, _ = service
    before, good = backend.calls, scene(toy_scenes)
    error_of(client.post("/v1/segment", json={"image": "aGVsbG8="}), 415, "multipart/form-data", code="not_multipart")
    error_of(client.post("/v1/segment", content=b"\0" * 100, headers={"content-type": "application/octet-stream"}),
             415, "multipart/form-data")
    error_of(client.post("/v1/segment", files={"image": (None, "not a file")}), 400, "must be a file upload")
    error_of(client.post("/v1/segment", files=[("image", ("a.png", good)), ("image", ("b.png", good))]), 400,
             "more than once", "image")
    error_of(client.post("/v1/segment", files={"image": ("a.png", good), "classes": ("c.txt", b"red circle")}), 400,
             "'classes' must be text")
    error_of(client.post("/v1/segment", content=b"--x\r\nbroken", headers={"content-type": "multipart/form-data; "
                                                                                            "boundary=x"}), 400)
    error_of(client.post("/v1/segment", files={"image": ("a.png", good)},
                         headers={"content-length": "999999999"}), 413, "upload too large")
    error_of(client.get("/v1/segment"), 405, "not allowed")
    error_of(client.get("/v2/nothing"), 404, "no route")
    assert backend.calls == before
    assert_alive(client)


def test_decoding_checks_header_first(service):
    """A bomb is refused from its header: PIL never allocates its pixels (10^10 here would need 30 GB)."""
    import time

    from ovdiff_ray.serve.limits import Limits, RequestError, check_header

    t0 = time.perf_counter()
    with pytest.raises(RequestError) as e:
        check_header(png_header_only(100_000, 100_000), Limits())
    assert e.value.status == 413 and time.perf_counter() - t0 < 1.0
    client, _, _ = service
    error_of(post(client, png_header_only(100_000, 100_000)), 413, "too large")
    assert_alive(client)


# ---------------------------------------------------------------------------------------- failures inside

def test_model_failure_is_a_500_and_the_service_survives(service, toy_scenes, monkeypatch):
    from ovdiff_ray.segment import Segmenter

    client, _, _ = service

    def boom(self, *a, **k):
        raise RuntimeError("simulated CUDA error")

    monkeypatch.setattr(Segmenter, "segment_batch", boom)
    monkeypatch.setattr(Segmenter, "segment", boom)
    body = error_of(post(client, scene(toy_scenes)), 500, "segmentation failed", "service log", code="internal")
    assert "CUDA" not in str(body) and "RuntimeError" not in str(body)  # details go to the log only
    assert_alive(client)
    monkeypatch.undo()
    assert post(client, scene(toy_scenes)).status_code == 200


def test_overload_and_unhealthy_backends():
    from fastapi.testclient import TestClient

    from ovdiff_ray.serve.engine import Catalog

    class Busy:
        async def catalog(self):
            return Catalog({}, "none")

        async def segment(self, key, job):
            raise Overloaded("segmenter busy: queue full", 429, 3.0)

        async def health(self):
            raise RuntimeError("bank not loaded")

    client = TestClient(make_app(Busy()))
    r = error_of(client.get("/healthz"), 503, "unavailable", code="unavailable")
    assert "bank not loaded" not in str(r) and client.get("/healthz").headers["retry-after"] == "5"
    assert client.get("/").status_code == 200

    class Down(Busy):
        async def catalog(self):
            raise ConnectionError("no replica")

    client = TestClient(make_app(Down()))
    r = client.post("/v1/segment", files={"image": ("a.png", png_bytes(Image.new("RGB", (8, 8))))})
    error_of(r, 503, "segmenter unavailable", "no replica", code="unavailable")
    assert "ConnectionError" not in r.text
    assert r.headers["retry-after"] == "5"


def test_overloaded_maps_to_retry_after(service, toy_scenes):
    from fastapi.testclient import TestClient

    class Busy(CountingBackend):
        async def segment(self, key, job):
            raise Overloaded("segmenter busy: queue full", 429, 3.0)

    client = TestClient(make_app(Busy(service[1].inner)))
    r = post(client, scene(toy_scenes))
    error_of(r, 429, "segmenter busy", code="overloaded")
    assert r.headers["retry-after"] == "3"


def test_segmenter_deployment_health_without_ray(banks):
    """`check_health` fails until a bank and its models are loaded, then passes; `describe` serves the catalog."""
    import asyncio

    from ovdiff_ray.serve.app import SegmenterDeployment

    async def run():
        d = SegmenterDeployment.func_or_class()
        with pytest.raises(RuntimeError, match="not loaded"):
            await d.check_health()
        with pytest.raises(ValueError, match="no bank"):
            await d.reconfigure({"banks": []})
        with pytest.raises(RuntimeError, match="not loaded"):
            await d.check_health()
        await d.reconfigure({"bank": banks[0], "torch_threads": 1, "max_batch_size": 3})
        await d.check_health()
        cat = await d.describe()
        assert cat["default"] == f"{banks[1]['bank_id']}@v{banks[1]['version'] + 1}"  # latest: the test's v2
        assert d.default.bank.version == banks[1]["version"] + 1

    asyncio.run(run())


def test_deploy_configs_are_valid_and_agree():
    """deploy/serve.yaml and the RayService's serveConfigV2 parse as Serve configs, their args as `build_app` args,
    and they name the same application and deployments."""
    import yaml
    from ray.serve.schema import ServeDeploySchema

    from ovdiff_ray.serve.app import INGRESS, SEGMENTER, AppArgs, queue_size

    root = Path(__file__).resolve().parents[1] / "deploy"
    local = yaml.safe_load((root / "serve.yaml").read_text())
    rs = yaml.safe_load((root / "rayservice.yaml").read_text())
    assert rs["apiVersion"] == "ray.io/v1" and rs["kind"] == "RayService"
    cluster = yaml.safe_load(rs["spec"]["serveConfigV2"])
    for cfg in (local, cluster):
        ServeDeploySchema.model_validate(cfg)
        (app,) = cfg["applications"]
        assert app["import_path"] == "ovdiff_ray.serve.app:build_app"
        a = AppArgs.model_validate(app["args"])
        deps = {d["name"]: d for d in app["deployments"]}
        assert set(deps) == {SEGMENTER, INGRESS}
        seg = deps[SEGMENTER]
        assert seg["max_ongoing_requests"] > a.max_batch_size and "max_queued_requests" not in seg
        # the queue comes from the latency budget: what one replica drains in latency_budget_s beyond what it holds
        q = queue_size(a, seg["max_ongoing_requests"])
        assert 0 < q and (q + seg["max_ongoing_requests"]) * a.request_cost_s <= a.latency_budget_s + 1e-9
        assert seg["ray_actor_options"]["num_gpus"] == (0 if cfg is local else 1)
    assert set(local["applications"][0]["args"]) == set(cluster["applications"][0]["args"])
    gpu = rs["spec"]["rayClusterConfig"]["workerGroupSpecs"][0]["template"]["spec"]["containers"][0]
    assert gpu["resources"]["limits"]["nvidia.com/gpu"] == "1"


def test_build_app_and_cli_check_their_args(banks, tmp_path, capsys):
    from pydantic import ValidationError

    from ovdiff_ray.serve.app import build_app, main

    with pytest.raises(ValueError, match="above max_batch_size"):
        build_app({"bank": banks[0], "max_batch_size": 8, "max_ongoing_requests": 8})
    with pytest.raises(ValueError, match="no committed bank"):
        build_app({"bank": str(tmp_path)})
    with pytest.raises(ValidationError, match="replicas"):
        build_app({"bank": banks[0], "replicas": 2})  # a typo is an error, not ignored
    with pytest.raises(ValueError, match="unknown limit"):
        build_app({"bank": banks[0], "limits": {"max_pixel": 10}})
    app = build_app({"bank": banks[0], "num_gpus": 0, "max_batch_size": 2})
    assert type(app).__name__ == "Application"
    assert main(["--bank", str(tmp_path / "missing")]) == 2
    assert "no committed bank" in capsys.readouterr().err


def test_backend_crash_is_a_json_500(service, toy_scenes):
    from fastapi.testclient import TestClient

    class Crashing(CountingBackend):
        async def segment(self, key, job):
            raise ConnectionResetError("replica died")

    client = TestClient(make_app(Crashing(service[1].inner)))
    r = post(client, scene(toy_scenes))
    error_of(r, 500, "segmentation failed", "service log", code="internal")
    assert "replica died" not in r.text and "ConnectionResetError" not in r.text
    assert_alive(client)
