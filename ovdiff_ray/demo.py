"""`ovdiff demo` (`make demo`): the main job on the embedded default, end to end on this machine in a few minutes.

Builds the toy bank with `build_bank` on a local Ray, writes toy scenes with ground truth, starts the segmentation
service (Ray Serve, 127.0.0.1), sends the scenes and one real photo over HTTP, writes the overlays and the results
page `demo-out/index.html` (results_page.py: per scene image | prediction | ground truth | confidence, the per-class
IoU chart worst first, the headline figures and how they were measured), prints toy mIoU and request latencies, and
shuts everything down.
"""
from __future__ import annotations

import argparse
import asyncio
import base64
import html
import logging
import os
import shutil
import socket
import sys
import time
from pathlib import Path

import numpy as np

from .recipe import REPO_ROOT
from .cli_help import Parser

T0 = time.perf_counter()


def say(msg: str) -> None:
    print(f"[demo {time.perf_counter() - T0:5.1f}s] {msg}", flush=True)


def free_port() -> int:
    """A free TCP port on 127.0.0.1."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def png_bytes(rgb: np.ndarray) -> bytes:
    """`rgb [H, W, 3]` uint8 -> PNG bytes."""
    import io

    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(rgb).save(buf, format="PNG")
    return buf.getvalue()


async def _send(base: str, jobs: list[tuple[str, bytes, dict]], concurrency: int) -> list[tuple[str, float, dict, int]]:
    """POST each (name, image bytes, fields) to /v1/segment; returns (name, seconds, body, status) in order."""
    import httpx

    sem = asyncio.Semaphore(concurrency)

    async def one(c, name, data, fields):
        async with sem:
            files = [("image", (f"{name}.png", data, "image/png"))] + [(k, (None, v)) for k, v in fields.items()]
            t = time.perf_counter()
            r = await c.post("/v1/segment", files=files)
            return name, time.perf_counter() - t, r.json(), r.status_code

    async with httpx.AsyncClient(base_url=base, timeout=120) as c:
        return list(await asyncio.gather(*(one(c, *j) for j in jobs)))


def _overlays_html(rows: list[dict], photo: dict | None) -> str:
    """The service's own overlays and the real photo, below the results (results_page.py)."""
    cells = []
    for r in rows:
        cells.append(f"<figure><img src='{html.escape(r['overlay'])}' alt='{r['name']}'><figcaption>{r['name']}: "
                     f"{html.escape(', '.join(r['found']) or 'background only')} &middot; {r['ms']:.0f} ms"
                     "</figcaption></figure>")
    photo_html = ""
    if photo:
        photo_html = (f"<h2>A real photo</h2><p>{html.escape(photo['note'])}</p><figure><img src='"
                      f"{html.escape(photo['overlay'])}' alt='photo'><figcaption>{html.escape(photo['caption'])}"
                      "</figcaption></figure>")
    return (f"<h2>Overlays as the service draws them</h2><div class='row'>{''.join(cells)}</div>{photo_html}")


def run(a: argparse.Namespace) -> int:
    import ray
    from ray import serve

    from .build_bank import main as build_bank
    from .evaluate import confusion, load_dataset, miou, read_label
    from .images import read_image
    from .results_page import SceneView, write_results_page
    from .models.toy import scenes_main
    from .serve.app import APP_NAME, build_app
    from .serve.engine import decode_png
    from .vocab import fold

    out = Path(a.out).resolve()
    for sub in ("bank", "scenes", "overlays", "results"):
        shutil.rmtree(out / sub, ignore_errors=True)
    out.mkdir(parents=True, exist_ok=True)
    vocab = REPO_ROOT / "bank" / "vocab" / "toy.tsv"
    for name in ("ray.serve", "ray.data"):
        logging.getLogger(name).setLevel(logging.WARNING)
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    os.environ.setdefault("RAY_DATA_DISABLE_PROGRESS_BARS", "1")

    say("starting a local Ray")
    from . import logs

    logs.quiet_ray()  # Ray Data's INFO lines and one-off notes stay in Ray's log folder
    ray.init(include_dashboard=False, log_to_driver=False, logging_level="ERROR")
    try:
        say(f"[1/5] building the toy bank ({vocab.relative_to(REPO_ROOT)}, recipe toy) with build_bank -> "
            f"{out / 'bank'}")
        if build_bank(["--vocab", str(vocab), "--recipe", "toy", "--out", str(out / "bank"), "--workers", "2"]) != 0:
            say("build_bank failed")
            return 1
        say(f"[2/5] writing {a.scenes} toy scenes with ground truth -> {out / 'scenes'}")
        if scenes_main(["--vocab", str(vocab), "--n", str(a.scenes), "--out", str(out / "scenes"),
                        "--seed", "0"]) != 0:
            return 1
        port = a.port or free_port()
        base = f"http://127.0.0.1:{port}"
        say(f"[3/5] starting the segmentation service (Ray Serve) at {base}/")
        quiet = {"log_level": "WARNING", "enable_access_log": False}
        serve.start(http_options={"host": "127.0.0.1", "port": port}, logging_config=quiet)
        serve.run(build_app({"bank": str(out / "bank"), "max_batch_size": 4}), name=APP_NAME, route_prefix="/",
                  logging_config=quiet)
        import httpx

        info = httpx.get(f"{base}/v1/bank", timeout=30).json()
        say(f"      serving bank {info['id']} v{info['version']}: {info['num_classes']} classes "
            f"({', '.join(c['name'] for c in info['classes'])})")

        say(f"[4/5] segmenting the {a.scenes} scenes over HTTP (mask PNGs for mIoU, overlays for the page; "
            f"{a.concurrency} at a time)")
        ds = load_dataset("toy", out / "scenes")
        raw = {iid: img.read_bytes() for iid, img, _ in ds.items}
        asyncio.run(_send(base, [("warm-up", raw[ds.items[0][0]], {})], 1))  # the first request is not timed
        masks = asyncio.run(_send(base, [(iid, raw[iid], {"scores": "true"}) for iid, _, _ in ds.items],
                                  a.concurrency))
        overlays = asyncio.run(_send(base, [(iid, raw[iid], {"format": "overlay"}) for iid, _, _ in ds.items],
                                     a.concurrency))
        bad = [(n, s, b) for n, _, b, s in masks + overlays if s != 200]
        if bad:
            say(f"      {len(bad)} requests failed, e.g. {bad[0][0]}: {bad[0][1]} {bad[0][2].get('error')}")
            return 1
        lut = np.zeros(info["num_classes"] + 1, np.int64)
        index = {fold(n): i for i, n in enumerate(ds.classes)}
        for c in info["classes"]:
            lut[c["id"]] = index.get(fold(c["name"]), 0)
        conf = np.zeros((len(ds.classes), len(ds.classes)), np.int64)
        views = []
        for (iid, img, lab), (_, secs, body, _) in zip(ds.items, masks):
            truth, pred = read_label(lab), lut[decode_png(body["mask"])]
            conf += confusion(truth, pred, len(ds.classes))
            c = decode_png(body["confidence"]) / body["confidence_scale"] if "confidence" in body else None
            views.append(SceneView(iid, read_image(img), pred, truth, c, 1000 * secs))
        m, m_nan, iou = miou(conf)
        (out / "overlays").mkdir(exist_ok=True)
        rows = []
        for (iid, secs, body, _) in overlays:
            p = out / "overlays" / f"{iid}.png"
            p.write_bytes(base64.b64decode(body["overlay"]))
            rows.append({"name": iid, "overlay": f"overlays/{p.name}", "ms": 1000 * secs,
                         "found": [x["name"] for x in body["legend"]]})

        say("[5/5] one real photo (scikit-image's astronaut) and one bad request")
        import skimage.data

        photo_bytes = png_bytes(skimage.data.astronaut())
        (name, secs, body, status), = asyncio.run(_send(base, [("astronaut", photo_bytes, {"format": "overlay"})], 1))
        photo = None
        if status == 200:
            p = out / "overlays" / "astronaut.png"
            p.write_bytes(base64.b64decode(body["overlay"]))
            found = [x["name"] for x in body["legend"]]
            photo = {"overlay": f"overlays/{p.name}", "caption": f"{body['width']}x{body['height']}, {1000 * secs:.0f}"
                     f" ms, found: {', '.join(found) or 'nothing'}",
                     "note": "The toy bank knows only toy shapes and textures, so this shows the path a real "
                             "photo takes (upload, validation, segmentation, overlay), not segmentation quality: "
                             "build a bank with the paper recipe for that."}
        (_, _, bad_body, bad_status), = asyncio.run(_send(base, [("not-an-image", b"hello", {})], 1))
        health = httpx.get(f"{base}/healthz", timeout=30)

        lat1 = np.array([s for _, s, _, _ in masks]) * 1000  # first sight of each scene: text-embedding caches fill
        lat2 = np.array([s for _, s, _, _ in overlays]) * 1000
        lat = np.concatenate([lat1, lat2])
        seg_ms = np.array([b["timing"]["segment_ms"] for _, _, b, _ in masks + overlays])
        per_class = ", ".join(f"{c} {100 * v:.0f}" for c, v in zip(ds.classes, iou) if np.isfinite(v))
        summary = [
            f"toy mIoU over {len(ds)} scenes (via HTTP): {100 * m:.1f} (nanmean {100 * m_nan:.1f})",
            f"  per class IoU: {per_class}",
            f"latency at concurrency {a.concurrency} on one replica (so mostly queueing), client side: masks (first look at each scene) p50 "
            f"{np.percentile(lat1, 50):.0f} ms / p95 {np.percentile(lat1, 95):.0f} ms; overlays (second look) p50 "
            f"{np.percentile(lat2, 50):.0f} ms / p95 {np.percentile(lat2, 95):.0f} ms; model time per image p50 "
            f"{np.percentile(seg_ms, 50):.0f} ms",
            f"real photo: {photo['caption'] if photo else f'failed with {status}'}",
            f"bad request (not an image): HTTP {bad_status} {bad_body.get('error')!r}; service afterwards: "
            f"{health.json().get('status', health.status_code)}",
        ]
        headline = [f"toy mIoU {m:.3f} with absent classes as 0, nanmean {m_nan:.3f}: {len(ds)} toy scenes "
                    f"(ovdiff toy-scenes --vocab bank/vocab/toy.tsv --n {a.scenes} --seed 0), the bank built by "
                    "build_bank with recipe toy, each scene sent to the service (POST /v1/segment, scores=true), "
                    "the returned mask scored against the scene's ground truth (ovdiff_ray.evaluate.confusion); "
                    "regions as the recipe ships them, no PAMR"] + summary[2:]
        page = write_results_page(out, views, list(ds.classes), iou, headline,
                                  title="ovdiff demo: the toy bank served over HTTP",
                                  extra_html=_overlays_html(rows, photo))
        for line in summary:
            print(line)
        print(f"files: {out / 'overlays'} ({len(rows) + (1 if photo else 0)} overlays), results page {page}, "
              f"bank {out / 'bank'}, scenes {out / 'scenes'}")
        if a.keep_serving:
            say(f"serving at {base}/ (try-it page); Ctrl-C to stop")
            try:
                while True:
                    time.sleep(3600)
            except KeyboardInterrupt:
                pass
        say("shutting down Serve and Ray")
    finally:
        serve.shutdown()
        ray.shutdown()
    print(f"summary: toy mIoU {100 * m:.1f} over {len(ds)} scenes, {len(lat)} requests over HTTP (p50 "
          f"{np.percentile(lat, 50):.0f} ms, p95 {np.percentile(lat, 95):.0f} ms), {len(rows) + (1 if photo else 0)} overlays and "
          f"{page.relative_to(Path.cwd()) if page.is_relative_to(Path.cwd()) else page}, "
          f"{time.perf_counter() - T0:.0f}s")
    return 0


def main(argv: list[str] | None = None) -> int:
    ap = Parser(prog="ovdiff demo", description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default="demo-out", help="output folder (default: demo-out)")
    ap.add_argument("--scenes", type=int, default=12, help="toy scenes to segment (default 12)")
    ap.add_argument("--concurrency", type=int, default=4, help="requests in flight (default 4)")
    ap.add_argument("--port", type=int, default=0, help="HTTP port (default: a free one)")
    ap.add_argument("--keep-serving", action="store_true", help="keep the service up after the demo (Ctrl-C)")
    a = ap.parse_args(argv)
    if a.scenes < 1 or a.concurrency < 1:
        ap.error("--scenes and --concurrency must be >= 1")
    try:
        return run(a)
    except KeyboardInterrupt:
        print("ovdiff demo: interrupted", file=sys.stderr)
        return 130
