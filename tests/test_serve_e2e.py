"""End to end: the Serve application under `serve.run` on the session's local Ray, real HTTP on 127.0.0.1."""
from __future__ import annotations

import asyncio
import base64
import io
import shutil
import time
from pathlib import Path

import httpx
import numpy as np
import pytest
from PIL import Image

from ovdiff_ray.serve.engine import decode_png

from tests.conftest import free_port


# Small queues so that a storm of requests hits backpressure quickly; 8 concurrent clients still fit (4 + 8).
# capacity (ongoing + queued) 20: well above the load test's 8 clients (Serve's counts lag a little), far below the
# storm's 48
CONFIG = dict(max_batch_size=2, max_ongoing_requests=4, max_queued_requests=16, retry_after_s=1, num_cpus=1,
              num_replicas=1, request_timeout_s=60)


@pytest.fixture(scope="module")
def served(ray_local, toy_bank, tmp_path_factory):
    """The app on Serve with two versions of the toy bank (multiplexed); yields (base URL, v1 manifest, bank root).

    Serve is shut down at the end of the module, so other modules sharing the session's Ray are unaffected."""
    from ray import serve

    from ovdiff_ray.serve.app import build_app
    from ovdiff_ray.store.fs import Location
    from ovdiff_ray.store.shards import commit_manifest, read_manifest

    root = tmp_path_factory.mktemp("serve-e2e") / "bank"
    shutil.copytree(toy_bank, root)
    m = read_manifest(Location(str(root)))
    commit_manifest(Location(str(root)), {**m, "version": m["version"] + 1, "classes": m["classes"][:4]})
    port = free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    try:
        serve.run(build_app({"banks": [{"uri": str(root), "version": m["version"]},
                                       {"uri": str(root), "version": m["version"] + 1, "name": "small"}], **CONFIG}),
                  name="ovdiff-e2e", route_prefix="/")
        yield f"http://127.0.0.1:{port}", m, str(root)
    finally:
        serve.shutdown()


@pytest.fixture(scope="module")
def client(served):
    with httpx.Client(base_url=served[0], timeout=60) as c:
        yield c


def scene(toy_scenes, i: int) -> bytes:
    return (Path(toy_scenes) / "images" / f"{i:04d}.png").read_bytes()


def files_of(data: bytes, **fields) -> list:
    return [("image", ("scene.png", data, "image/png"))] + [(k, (None, str(v))) for k, v in fields.items()]


def post(client, data: bytes, **fields):
    return client.post("/v1/segment", files=files_of(data, **fields))


def test_scene_matches_in_process_segmenter(client, served, toy_scenes):
    import torch

    from ovdiff_ray.segment import Segmenter
    from ovdiff_ray.store.bank import Bank

    _, m, root = served
    seg = Segmenter.from_bank(Bank.load(root, m["version"]))
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # the replica runs one torch thread per CPU it holds (1 here): the same arithmetic
    try:
        for i in (0, 4):
            data = scene(toy_scenes, i)
            r = post(client, data)
            assert r.status_code == 200, r.text
            body = r.json()
            ref = seg.segment(np.array(Image.open(io.BytesIO(data)).convert("RGB")))
            labels = decode_png(body["mask"])
            assert labels.shape == ref.labels.shape == (body["height"], body["width"])
            assert (labels == ref.labels).mean() > 0.999, f"scene {i}: {(labels != ref.labels).mean():.4%} differ"
            assert body["classes"] == {str(v): n for v, n in ref.classes.items()}
            assert body["bank"] == {"id": m["bank_id"], "version": m["version"]}
    finally:
        torch.set_num_threads(threads)


def test_rle_decodes_to_the_same_masks(client, toy_scenes):
    from pycocotools import mask as mask_utils

    data = scene(toy_scenes, 5)
    labels = decode_png(post(client, data).json()["mask"])
    rle = post(client, data, format="rle").json()
    assert set(rle["rle"]) == {str(v) for v in np.unique(labels) if v}
    for v, r in rle["rle"].items():
        assert isinstance(r["counts"], str) and r["size"] == list(labels.shape)
        m = mask_utils.decode({"size": r["size"], "counts": r["counts"].encode("ascii")})
        assert np.array_equal(m.astype(bool), labels == int(v)), v


def test_banks_side_by_side(client, served, toy_scenes):
    _, m, _ = served
    small = post(client, scene(toy_scenes, 6), bank="small").json()
    assert small["bank"]["version"] == m["version"] + 1
    assert set(small["classes"].values()) <= {"background", *[c["name"] for c in m["classes"][:4]]}
    full = post(client, scene(toy_scenes, 6), bank=f"{m['bank_id']}@v{m['version']}").json()
    assert full["bank"]["version"] == m["version"]
    assert client.get("/v1/bank", params={"bank": "small"}).json()["num_classes"] == 4
    r = post(client, scene(toy_scenes, 6), bank="nope")
    assert r.status_code == 404 and "unknown bank 'nope'" in r.json()["error"]


def test_bad_input_over_http_leaves_the_service_up(client, toy_scenes):
    r = client.post("/v1/segment", files=[("image", ("x.png", b"GIF89a-not-really", "image/gif"))])
    assert r.status_code in (400, 415) and r.json()["error"]
    r = post(client, scene(toy_scenes, 0)[:500])
    assert r.status_code == 400 and "truncated" in r.json()["error"]
    r = post(client, scene(toy_scenes, 0), classes="red circle, unicorn")
    assert r.status_code == 400 and "'unicorn'" in r.json()["error"]
    h = client.get("/healthz")
    assert h.status_code == 200 and h.json()["status"] == "ok"
    assert post(client, scene(toy_scenes, 0)).status_code == 200


async def _fire(base: str, n: int, concurrency: int, payloads: list[bytes], timeout: float = 60.0):
    sem = asyncio.Semaphore(concurrency)
    out: list[tuple[int, float, httpx.Response | Exception]] = []

    async def one(c, i):
        async with sem:
            t0 = time.perf_counter()
            try:
                r = await c.post("/v1/segment", files=files_of(payloads[i % len(payloads)]))
            except Exception as e:  # noqa: BLE001 - a timeout or reset is a failure the test reports
                r = e
            out.append((i, time.perf_counter() - t0, r))

    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    async with httpx.AsyncClient(base_url=base, timeout=timeout, limits=limits) as c:
        await asyncio.gather(*(one(c, i) for i in range(n)))
    return sorted(out, key=lambda x: x[0])


def test_200_requests_at_concurrency_8(served, toy_scenes):
    payloads = [scene(toy_scenes, i) for i in range(4)]
    t0 = time.perf_counter()
    results = asyncio.run(_fire(served[0], 200, 8, payloads))
    wall = time.perf_counter() - t0
    errors = [(i, r if isinstance(r, Exception) else f"{r.status_code} {r.text[:200]}")
              for i, _, r in results if isinstance(r, Exception) or r.status_code != 200]
    assert not errors, errors[:5]
    masks: dict[int, np.ndarray] = {}
    for i, _, r in results:  # the same image always gets the same answer, whatever it was batched with
        labels = decode_png(r.json()["mask"])
        k = i % len(payloads)
        assert np.array_equal(masks.setdefault(k, labels), labels), i
    lat = np.array([t for _, t, _ in results])
    batches = [r.json()["timing"]["batch_size"] for _, _, r in results]
    print(f"200 requests at concurrency 8: {200 / wall:.1f} req/s, p50 {1000 * np.percentile(lat, 50):.0f} ms, "
          f"p95 {1000 * np.percentile(lat, 95):.0f} ms, mean batch {np.mean(batches):.2f}")
    assert max(batches) <= CONFIG["max_batch_size"]


def test_storm_past_the_queue_gets_503_not_timeouts(served, toy_scenes):
    t0 = time.perf_counter()
    results = asyncio.run(_fire(served[0], 48, 48, [scene(toy_scenes, 7)], timeout=45))
    wall = time.perf_counter() - t0
    failures = [r for _, _, r in results if isinstance(r, Exception)]
    assert not failures, failures[:3]
    codes = [r.status_code for _, _, r in results]
    assert set(codes) <= {200, 503}, codes
    rejected = [r for _, _, r in results if r.status_code == 503]
    # At most max_ongoing + max_queued (20) wait at any moment; the rest, while those are still waiting, are refused.
    assert len(rejected) >= 12, codes
    assert codes.count(200) >= CONFIG["max_ongoing_requests"], codes
    for r in rejected:
        assert r.headers["retry-after"] == "1"
        assert "busy" in r.json()["error"] and r.json()["code"] == "overloaded"
    fast = [t for _, t, r in results if r.status_code == 503]
    assert max(fast) < 10, "rejections must come back at once, not after queueing"
    assert wall < 45
    h = httpx.get(served[0] + "/healthz", timeout=30)
    assert h.status_code == 200 and h.json()["status"] == "ok"


def test_page_loads_and_what_it_posts_answers(client, toy_scenes):
    """What the page's script does over HTTP: the bank, an example with its ground truth, a segment request with
    scores, explain and a threshold (the headless-browser test drives the page itself: `make test-browser`)."""
    page = client.get("/")
    assert page.status_code == 200 and "text/html" in page.headers["content-type"]
    assert 'fetch("v1/segment"' in page.text and "v1/examples" in page.text
    bank = client.get("/v1/bank").json()
    ex = client.get("/v1/examples").json()["examples"]
    assert len(ex) == 6 and all(e["truth"] for e in ex)  # the toy bank: toy scenes with ground truth
    img = client.get("/v1/examples/2.png")
    truth = client.get("/v1/examples/2/truth.png")
    assert img.status_code == truth.status_code == 200 and img.headers["content-type"] == "image/png"
    im, tr = Image.open(io.BytesIO(img.content)), np.asarray(Image.open(io.BytesIO(truth.content)))
    assert im.size == tr.shape[::-1] and set(np.unique(tr).tolist()) <= set(range(len(bank["classes"]) + 1))
    assert len(np.unique(tr)) >= 2
    assert client.get("/v1/examples/99.png").status_code == 404
    fields = {"classes": ", ".join(c["name"] for c in bank["classes"][:5]), "bank": bank["key"], "format": "png",
              "scores": "true", "explain": "true", "min_confidence": "0.4"}
    r = client.post("/v1/segment", files=files_of(img.content, **fields))
    assert r.status_code == 200, r.text
    body = r.json()
    assert decode_png(body["mask"]).shape == (body["height"], body["width"]) == tr.shape
    assert {"confidence", "class_confidence", "topk", "explain", "unsure_value"} <= set(body)
    assert set(body["classes"].values()) - {"background"} <= {c["name"] for c in bank["classes"][:5]}


def test_python_client_end_to_end(served, toy_scenes):
    """`ovdiff_ray.client.Client` against the real service: labels, confidence, unsure, explain, errors."""
    from ovdiff_ray.client import Client, ClientError

    path = Path(toy_scenes) / "images" / "0001.png"
    with Client(served[0], timeout=60) as c:
        assert c.health()["status"] in ("ok", "degraded")
        info = c.bank()
        assert info.version == served[1]["version"] and "red circle" in info.classes
        plain = c.segment(path)
        conf = c.segment(path, scores=True).confidence
        # a threshold between two confidence values the scene holds, so some pixels fall under it on any machine
        # (calibrated confidence puts well-fitting pixels at exactly 1)
        vals = np.unique(conf)
        assert len(vals) > 1, vals
        t = float((vals[len(vals) // 2 - 1] + vals[len(vals) // 2]) / 2) if len(vals) > 2 else float(vals.mean())
        r = c.segment(path, scores=True, min_confidence=t, explain=True)
        assert r.labels.shape == (r.height, r.width) == r.confidence.shape
        assert r.unsure_value == 255 and r.unsure.any()  # confidence comes back quantized to 1/65535
        assert (r.confidence[r.unsure] <= t + 1e-4).all() and (r.confidence[~r.unsure] >= t - 1e-4).all()
        assert np.array_equal(r.labels[~r.unsure], plain.labels[~r.unsure])
        assert set(r.explain) == set(r.names) and set(r.topk) == set(r.names)
        rle = c.segment(path, format="rle")
        assert np.array_equal(rle.labels, plain.labels)
        with pytest.raises(ClientError) as e:
            c.segment(path, classes=["purple unicorn"])
        assert e.value.status == 400 and "purple unicorn" in e.value.error
