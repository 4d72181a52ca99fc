"""The bank view's JSON routes and page (issue 26) over a small toy bank with support records, through TestClient."""
from __future__ import annotations

import io
import json

import numpy as np
import pytest


@pytest.fixture(scope="module")
def small_bank(tmp_path_factory) -> str:
    """3 toy classes x 4 support images built by the class worker in this process, one with a wrong prompt."""
    from ovdiff_ray.build_bank import ClassWorker
    from ovdiff_ray.recipe import load_recipe
    from ovdiff_ray.store.fs import Location
    from ovdiff_ray.store.shards import commit_manifest, new_manifest

    root = str(tmp_path_factory.mktemp("view") / "bank")
    recipe = load_recipe("toy")
    recipe.generation.n_images = 4
    w = ClassWorker(recipe.to_dict(), root, None, device="cpu")
    entries = []
    for cid, (name, kind, prompt) in enumerate([("red circle", "thing", ""), ("green star", "thing", ""),
                                                ("blue square", "thing", "yellow ring")]):
        r = w.build_one(cid, name, kind, prompt)
        assert r["status"] == "ok", r["error"]
        entries.append(json.loads(r["entry"]))
    commit_manifest(Location(root), new_manifest("view", 1, recipe.to_dict(), entries))
    return root


@pytest.fixture(scope="module")
def client(small_bank):
    from fastapi.testclient import TestClient

    from ovdiff_ray.serve.app import LocalBackend, make_app

    with TestClient(make_app(LocalBackend({"banks": [small_bank]}))) as c:
        yield c


def test_class_list_pages_searches_and_scores(client):
    r = client.get("/v1/bank/classes", params={"limit": 2})
    b = r.json()
    assert r.status_code == 200 and b["total"] == 3 and b["audit"] == "ready"
    assert [c["name"] for c in b["classes"]] == ["red circle", "green star"] and b["classes"][0]["id"] == 1
    assert all(c["record"] and c["n_images"] == 4 and 0 < c["score"] <= 1 for c in b["classes"])
    assert [c["name"] for c in client.get("/v1/bank/classes", params={"offset": 2}).json()["classes"]] == \
        ["blue square"]
    found = client.get("/v1/bank/classes", params={"q": "YELLOW"}).json()
    assert found["total"] == 1 and found["classes"][0]["name"] == "blue square"  # its prompt matches
    worst = client.get("/v1/bank/classes", params={"order": "worst"}).json()["classes"]
    assert [c["rank"] for c in worst] == [1, 2, 3] and worst[0]["score"] <= worst[-1]["score"]


def test_support_images_and_tiles(client):
    from PIL import Image

    b = client.get("/v1/bank/classes/1/support").json()
    assert b["name"] == "red circle" and len(b["images"]) == 4 and b["mode"] == "thumbnails"
    im = b["images"][0]
    assert set(im["signals"]) >= {"name_agreement", "prompt_agreement", "fg_coverage"} and im["kept"]
    r = client.get("/" + im["url"])
    assert r.status_code == 200 and r.headers["content-type"] == "image/png"
    tile = np.asarray(Image.open(io.BytesIO(r.content)).convert("RGB"))
    assert tile.shape == (96, 96, 3) and (tile == (0, 255, 0)).all(-1).any()  # the fg outline


def test_bad_requests_name_the_input(client):
    r = client.get("/v1/bank/classes", params={"offset": "-1"})
    assert r.status_code == 400 and "offset" in r.json()["error"]
    r = client.get("/v1/bank/classes", params={"order": "best"})
    assert r.status_code == 400 and "order" in r.json()["error"]
    r = client.get("/v1/bank/classes/9/support")
    assert r.status_code == 404 and "no class id 9" in r.json()["error"]
    r = client.get("/v1/bank/classes/1/support/4.png")
    assert r.status_code == 404 and "0..3" in r.json()["error"]


def test_page_is_served_and_linked(client):
    page = client.get("/bank")
    assert page.status_code == 200 and "v1/bank/classes" in page.text and "IntersectionObserver" in page.text
    assert 'href="bank"' in client.get("/").text
