"""A real Label Studio (from PyPI, in its own venv) against label_dataset's files and the Serve app's ML backend.

Not part of `make test` (it installs Label Studio, ~1 GB, and its first start migrates a database for a minute or
two): `make test-labelstudio` creates `.venv-labelstudio` from tests/labelstudio/requirements.txt and runs this.

1. label_dataset writes labelstudio.xml + tasks.json for the toy scenes; a project is created from that config, the
   tasks are imported, and the predictions Label Studio stores decode to in-process `Segmenter.segment` masks.
2. A second project from the same config gets the scene images uploaded, the Serve app (on local Ray, LABEL_STUDIO_URL
   and LABEL_STUDIO_API_KEY in its environment) connected as its ML backend; "retrieve predictions" runs, and what
   Label Studio stores decodes to the same in-process masks.
"""
from __future__ import annotations

import contextlib
import io
import json
import os
import secrets
import signal
import subprocess
import time
from pathlib import Path

import numpy as np
import pytest
import requests

from ovdiff_ray.demo import free_port

ROOT = Path(__file__).resolve().parents[2]
LS_BIN = Path(os.environ.get("LABEL_STUDIO_BIN", ROOT / ".venv-labelstudio" / "bin" / "label-studio"))
TOKEN = secrets.token_hex(20)
LS_PORT = free_port()
LS_URL = f"http://127.0.0.1:{LS_PORT}"
# The Serve replicas are started by the local Ray this session starts, so they inherit these (set before ray.init).
os.environ["LABEL_STUDIO_URL"] = LS_URL
os.environ["LABEL_STUDIO_API_KEY"] = TOKEN


def ls_decode(rle, h, w):
    from tests.test_label import ls_decode as decode

    return decode(rle, h, w)


@pytest.fixture(scope="module")
def label_studio(tmp_path_factory):
    assert LS_BIN.exists(), "run `make test-labelstudio` (creates .venv-labelstudio)"
    data = tmp_path_factory.mktemp("ls-data")
    env = {**os.environ, "LABEL_STUDIO_ENABLE_LEGACY_API_TOKEN": "true", "ML_BLOCK_LOCAL_IP": "false",
           "SSRF_PROTECTION_ENABLED": "false", "LABEL_STUDIO_DISABLE_SIGNUP_WITHOUT_LINK": "true",
           "DJANGO_DB": "sqlite", "LOG_LEVEL": "WARNING",
           "LATEST_VERSION_CHECK": "false", "COLLECT_ANALYTICS": "false"}  # no traffic off 127.0.0.1
    log = open(data / "label-studio.log", "w")
    proc = subprocess.Popen([str(LS_BIN), "start", "--no-browser", "--host", "127.0.0.1", "--port", str(LS_PORT),
                             "--data-dir", str(data), "--username", "admin@example.com", "--password",
                             secrets.token_hex(8), "--user-token", TOKEN, "--internal-host", "127.0.0.1"],
                            stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True)
    try:
        deadline = time.time() + 600
        while time.time() < deadline:
            assert proc.poll() is None, (data / "label-studio.log").read_text()[-3000:]
            with contextlib.suppress(requests.RequestException):
                if requests.get(f"{LS_URL}/health", timeout=2).status_code == 200:
                    break
            time.sleep(2)
        else:
            pytest.fail("Label Studio did not answer /health in 600 s")
        s = requests.Session()
        s.headers["Authorization"] = f"Token {TOKEN}"
        yield s
    finally:
        os.killpg(proc.pid, signal.SIGTERM)  # the process group this fixture started
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(30)
        log.close()


@pytest.fixture(scope="module")
def served(ray_local, toy_bank):
    from ray import serve

    from ovdiff_ray.serve.app import build_app

    port = free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    try:
        serve.run(build_app({"bank": toy_bank, "num_replicas": 1, "num_cpus": 1}), name="ovdiff-ls", route_prefix="/")
        yield f"http://127.0.0.1:{port}"
    finally:
        serve.shutdown()


@pytest.fixture(scope="module")
def files(ray_local, toy_bank, toy_scenes, tmp_path_factory):
    from ovdiff_ray.label import main

    out = tmp_path_factory.mktemp("ls-files")
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
        rc = main(["--images", str(Path(toy_scenes, "images")), "--bank", toy_bank, "--out", str(out), "--format",
                   "labelstudio", "--image-url", "/data/local-files/?d=images", "--workers", "1"])
    assert rc == 0
    return out


@pytest.fixture(scope="module")
def reference(toy_bank, toy_scenes):
    from ovdiff_ray.segment import Segmenter, read_image
    from ovdiff_ray.store.bank import Bank

    seg = Segmenter.from_bank(Bank.load(toy_bank))
    return seg, {p.name: seg.segment(read_image(p)).labels for p in sorted(Path(toy_scenes, "images").glob("*.png"))}


def listing(s: requests.Session, url: str) -> list[dict]:
    r = s.get(url, timeout=60)
    r.raise_for_status()
    body = r.json()
    return body if isinstance(body, list) else body.get("tasks") or body.get("results") or []


def stored_labels(pred: dict, names: list[str]) -> tuple[np.ndarray, tuple[int, int]]:
    first = pred["result"][0]
    h, w = first["original_height"], first["original_width"]
    labels = np.zeros((h, w), np.int32)
    for r in pred["result"]:
        (name,) = r["value"]["brushlabels"]
        labels[ls_decode(r["value"]["rle"], h, w)] = names.index(name) + 1
    return labels


def test_tasks_json_import_round_trip(label_studio, files, reference):
    seg, ref = reference
    s = label_studio
    project = s.post(f"{LS_URL}/api/projects", json={"title": "ovdiff files",
                                                     "label_config": (files / "labelstudio.xml").read_text()})
    assert project.status_code == 201, project.text
    pid = project.json()["id"]
    tasks = json.loads((files / "tasks.json").read_text())
    r = s.post(f"{LS_URL}/api/projects/{pid}/import", json=tasks, timeout=120)
    assert r.status_code == 201, r.text
    stored = listing(s, f"{LS_URL}/api/tasks?project={pid}&fields=all&page_size=100")
    assert len(stored) == len(ref)
    for t in stored:
        (pred,) = t["predictions"]
        assert pred["model_version"] == f"{seg.bank.bank_id}@v{seg.bank.version}" and 0 < pred["score"] <= 1
        np.testing.assert_array_equal(stored_labels(pred, seg.bank.names), ref[t["data"]["path"]])
    print(f"label studio files round trip: {len(stored)} tasks imported, every stored prediction decodes to the "
          "in-process masks")


def test_ml_backend_round_trip(label_studio, served, files, reference, toy_scenes):
    seg, ref = reference
    s = label_studio
    project = s.post(f"{LS_URL}/api/projects", json={"title": "ovdiff ml backend",
                                                     "label_config": (files / "labelstudio.xml").read_text()})
    pid = project.json()["id"]
    names = sorted(ref)
    up = s.post(f"{LS_URL}/api/projects/{pid}/import",
                files=[(n, (n, Path(toy_scenes, "images", n).read_bytes(), "image/png")) for n in names],
                timeout=120)
    assert up.status_code == 201, up.text
    ml = s.post(f"{LS_URL}/api/ml", json={"url": served, "project": pid, "title": "ovdiff"}, timeout=60)
    assert ml.status_code == 201, ml.text
    t0 = time.perf_counter()
    r = s.post(f"{LS_URL}/api/dm/actions?id=retrieve_tasks_predictions&project={pid}",
               json={"selectedItems": {"all": True, "excluded": []}}, timeout=300)
    assert r.status_code == 200, r.text
    seconds = time.perf_counter() - t0
    stored = listing(s, f"{LS_URL}/api/tasks?project={pid}&fields=all&page_size=100")
    assert len(stored) == len(names)
    for t in stored:
        name = t["data"]["image"].rsplit("/", 1)[-1].split("-", 1)[-1]  # /data/upload/<p>/<hash>-0003.png
        (pred,) = t["predictions"]
        assert pred["model_version"] == f"{seg.bank.bank_id}@v{seg.bank.version}" and 0 < pred["score"] <= 1
        np.testing.assert_array_equal(stored_labels(pred, seg.bank.names), ref[name], err_msg=name)
    print(f"label studio ML backend round trip: {len(stored)} tasks predicted in {seconds:.1f}s (retrieve action "
          "round trip), every stored prediction decodes to the in-process masks")
