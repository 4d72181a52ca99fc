"""Label Studio ML backend routes (`/predict`, `/setup`, `/health`) on the service app, with TestClient over a real
Segmenter on the toy bank; task images served over real HTTP by two servers on 127.0.0.1 ("Label Studio" and
another host), so fetching, the key's destination and refusals are observed from the servers' side."""
from __future__ import annotations

import base64
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import numpy as np
import pytest

from ovdiff_ray.label.encode import ls_brush_rle
from tests.test_label import ls_decode

KEY = "ls-secret-key-123"
CLASSES = ["red circle", "green stripes", "yellow cross", "blue checks"]


def config(labels: str, from_name: str = "mask", to_name: str = "img", key: str = "picture") -> str:
    return (f'<View><Image name="{to_name}" value="${key}"/><BrushLabels name="{from_name}" toName="{to_name}">'
            f"{labels}</BrushLabels></View>")


LS_CONFIG = config('<Label value="Red Circle"/><Label value="cross" alias="yellow cross"/>'
                   '<Label value="checks" predicted_values="green stripes,blue checks"/>'
                   '<Label value="purple blob"/>')


class Server:
    """A real HTTP server on 127.0.0.1 that serves `files` and records every request's path and headers."""

    def __init__(self, files: dict[str, bytes]):
        self.files, self.seen = files, []
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self):  # noqa: N802
                outer.seen.append((self.path, dict(self.headers)))
                if self.path.startswith("/redirect"):
                    self.send_response(302)
                    self.send_header("Location", outer.redirect_to)
                    self.end_headers()
                    return
                body = outer.files.get(self.path)
                self.send_response(200 if body is not None else 404)
                self.send_header("Content-Length", str(len(body or b"")))
                self.end_headers()
                self.wfile.write(body or b"")

            def log_message(self, *a):
                pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        self.redirect_to = ""
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    def close(self):
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture(scope="module")
def servers(toy_scenes):
    imgs = {f"/data/upload/1/{p.name}": p.read_bytes() for p in sorted(Path(toy_scenes, "images").glob("*.png"))}
    ls, other = Server(imgs), Server({"/x.png": imgs["/data/upload/1/0000.png"]})
    ls.files["/big.png"] = b"\x89PNG" + b"0" * 300_000
    ls.redirect_to = f"{other.url}/x.png"
    yield ls, other
    ls.close()
    other.close()


@pytest.fixture(scope="module")
def backend(toy_bank):
    from ovdiff_ray.serve.app import LocalBackend

    return LocalBackend({"bank": toy_bank, "torch_threads": 1, "limits": {"max_upload_bytes": 200_000}})


def client_for(backend, **settings):
    from fastapi.testclient import TestClient

    from ovdiff_ray.serve.app import make_app
    from ovdiff_ray.serve.labelstudio import LabelStudioSettings

    return TestClient(make_app(backend, labelstudio=LabelStudioSettings(**settings)))


@pytest.fixture(scope="module")
def ls_client(backend, servers):
    ls, other = servers
    with client_for(backend, url=ls.url, api_key=KEY) as c:
        yield c


def test_brush_rle_matches_label_studio_sdk_vectors():
    """The vectors of label_studio_sdk.converter.brush.mask2rle quoted in issue 14."""
    diag = np.eye(2, dtype=bool)
    row = np.zeros((3, 4), bool)
    row[1, 1:3] = True
    cases = [(np.zeros((1, 1), bool), [0, 0, 0, 4, 57, 27, 252, 96, 0]),
             (np.ones((1, 1), bool), [0, 0, 0, 4, 57, 27, 252, 127, 224]),
             (diag, [0, 0, 0, 16, 57, 27, 252, 127, 243, 128, 71, 254]),
             (row, [0, 0, 0, 48, 57, 27, 254, 19, 0, 159, 255, 9, 128, 0]),
             (np.zeros((1, 5), bool), [0, 0, 0, 20, 57, 27, 254, 19, 0, 0])]
    for mask, expected in cases:
        assert list(ls_brush_rle(mask)) == expected, mask.tolist()
        np.testing.assert_array_equal(ls_decode(expected, *mask.shape), mask)


def test_health_and_setup(ls_client, toy_bank):
    from ovdiff_ray.store.bank import Bank

    b = Bank.load(toy_bank)
    r = ls_client.get("/health")
    assert r.status_code == 200 and r.json() == {"status": "UP", "model_class": "OVDiff",
                                                 "model_version": f"{b.bank_id}@v{b.version}"}
    r = ls_client.post("/setup", json={"project": "1.1700000000", "schema": LS_CONFIG, "hostname": "http://evil",
                                       "access_token": "x"})
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["model_version"] == f"{b.bank_id}@v{b.version}"
    assert body["labels"] == {"Red Circle": ["red circle"], "cross": ["yellow cross"],
                              "checks": ["green stripes", "blue checks"]}  # predicted_values: both shown as one
    assert body["unknown"] == ["purple blob"]  # reported, not guessed


def test_predict_batch_decodes_to_in_process_masks(ls_client, servers, toy_bank, toy_scenes):
    """Three tasks in one request (Label Studio /data/upload paths): results in task order, Label values of the
    config, brush RLE that decodes to in-process `Segmenter.segment(classes=mapped)`, scores; key sent to LS only."""
    from ovdiff_ray.segment import Segmenter, read_image
    from ovdiff_ray.store.bank import Bank

    ls, other = servers
    names = ["0003.png", "0000.png", "0004.png"]
    tasks = [{"id": 10 + i, "data": {"picture": f"/data/upload/1/{n}"}} for i, n in enumerate(names)]
    r = ls_client.post("/predict", json={"tasks": tasks, "label_config": LS_CONFIG, "project": "1.1700000000",
                                         "params": {"login": None, "password": None, "context": None}})
    assert r.status_code == 200, r.text
    body = r.json()
    assert len(body["results"]) == 3 and body["unknown"] == ["purple blob"]
    seg = Segmenter.from_bank(Bank.load(toy_bank))
    shown = {"red circle": "Red Circle", "yellow cross": "cross", "green stripes": "checks", "blue checks": "checks"}
    for n, pred in zip(names, body["results"]):
        assert "error" not in pred, pred
        ref = seg.segment(read_image(Path(toy_scenes, "images", n)), classes=CLASSES).labels
        got = {}
        for res in pred["result"]:
            assert (res["from_name"], res["to_name"], res["type"]) == ("mask", "img", "brushlabels")
            assert (res["original_height"], res["original_width"]) == ref.shape and 0 < res["score"] <= 1
            (label,) = res["value"]["brushlabels"]
            got[label] = ls_decode(res["value"]["rle"], *ref.shape)
        want = {}
        for v in set(np.unique(ref).tolist()) - {0}:
            lab = shown[seg.bank.names[v - 1]]
            want[lab] = want.get(lab, np.zeros(ref.shape, bool)) | (ref == v)
        assert sorted(got) == sorted(want), n
        for lab in want:
            np.testing.assert_array_equal(got[lab], want[lab], err_msg=f"{n} {lab}")
        assert 0 < pred["score"] <= 1 and pred["model_version"] == f"{seg.bank.bank_id}@v{seg.bank.version}"
    got = [(p, h.get("Authorization")) for p, h in ls.seen if p.startswith("/data/upload")]
    assert sorted(got) == sorted((f"/data/upload/1/{n}", f"Token {KEY}") for n in names)
    assert other.seen == []


def test_refused_sources_are_never_fetched(ls_client, servers):
    ls, other = servers
    before = len(ls.seen)
    urls = [f"{other.url}/x.png",  # a host the operator did not allow
            "http://169.254.169.254/latest/meta-data/",  # cloud metadata
            "file:///etc/passwd", "s3://private-bucket/a.png", f"{ls.url}/redirect",  # redirect to the other host
            f"{ls.url}/big.png"]  # over max_upload_bytes
    tasks = [{"id": i, "data": {"picture": u}} for i, u in enumerate(urls)] + [{"id": 99, "data": {}}]
    r = ls_client.post("/predict", json={"tasks": tasks, "label_config": LS_CONFIG})
    assert r.status_code == 200, r.text
    errors = [p.get("error", "") for p in r.json()["results"]]
    assert all(p["result"] == [] for p in r.json()["results"]) and len(errors) == 7
    assert "neither LABEL_STUDIO_URL's nor in OVDIFF_LS_ALLOWED_HOSTS" in errors[0]
    assert "neither LABEL_STUDIO_URL's" in errors[1]
    assert "only http(s), s3 and Label Studio /data/ URLs" in errors[2]
    assert "bucket 'private-bucket' is not an allowed source" in errors[3]
    assert "HTTP 302" in errors[4] and "redirects are not followed" in errors[4]
    assert "more than 200,000 bytes" in errors[5]
    assert "task has no data.picture" in errors[6]
    assert other.seen == []  # neither directly nor through the redirect
    assert sorted(p for p, _ in ls.seen[before:]) == ["/big.png", "/redirect"]  # fetched concurrently


def test_allowed_host_gets_no_key(backend, servers):
    ls, other = servers
    with client_for(backend, url=ls.url, api_key=KEY, allowed_hosts=(other.url.split("//")[1],)) as c:
        r = c.post("/predict", json={"tasks": [{"data": {"picture": f"{other.url}/x.png"}}], "label_config": LS_CONFIG})
    assert r.status_code == 200 and "error" not in r.json()["results"][0] and r.json()["results"][0]["result"]
    assert len(other.seen) == 1 and "Authorization" not in other.seen[0][1]
    other.seen.clear()


def test_bad_requests_and_basic_auth(backend, servers):
    ls, _ = servers
    token = "Basic " + base64.b64encode(b"label:studio").decode()
    with client_for(backend, url=ls.url, basic_auth="label:studio", max_tasks=2) as c:
        assert c.get("/health").status_code == 401
        r = c.post("/predict", json={"tasks": [{"data": {}}], "label_config": LS_CONFIG},
                   headers={"Authorization": "Basic " + base64.b64encode(b"label:wrong").decode()})
        assert r.status_code == 401 and r.headers["WWW-Authenticate"] == "Basic"
        assert c.get("/health", headers={"Authorization": token}).json()["status"] == "UP"
        r = c.post("/predict", json={"tasks": [{"data": {}}] * 3, "label_config": LS_CONFIG},
                   headers={"Authorization": token})
        assert r.status_code == 413 and "3 tasks in one request, at most 2" in r.json()["error"]
        r = c.post("/predict", json={"tasks": [{"data": {}}], "label_config": config('<Label value="purple blob"/>')},
                   headers={"Authorization": token})
        assert r.status_code == 400 and "none of the config's labels" in r.json()["error"]
        r = c.post("/predict", json={"tasks": [{"data": {}}], "label_config": "<View><Image name='i' value='$i'/>"
                                     "<Choices name='c' toName='i'/></View>"}, headers={"Authorization": token})
        assert r.status_code == 400 and "no <BrushLabels>" in r.json()["error"]
        r = c.post("/predict", content=b"not json", headers={"Authorization": token,
                                                             "Content-Type": "application/json"})
        assert r.status_code == 400 and "expected a JSON body" in r.json()["error"]
    assert not [p for p, _ in ls.seen if p == "/"]  # nothing fetched for refused requests
