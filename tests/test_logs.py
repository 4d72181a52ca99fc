"""Structured logs: `OVDIFF_LOG_FORMAT=json` lines parse, and carry the request id, the bank version that answered
and a job's id."""
from __future__ import annotations

import io
import json
import logging
from pathlib import Path

import pytest

from ovdiff_ray import logs


@pytest.fixture
def json_logs(monkeypatch):
    monkeypatch.setenv(logs.ENV, "json")
    buf = io.StringIO()
    assert logs.configure(stream=buf)
    try:
        yield buf
    finally:
        logs.reset()


def lines(buf: io.StringIO) -> list[dict]:
    return [json.loads(x) for x in buf.getvalue().splitlines() if x.strip()]  # every line must parse


def test_access_lines_carry_request_id_and_bank_version(json_logs, toy_bank, toy_scenes):
    from fastapi.testclient import TestClient

    from ovdiff_ray.serve.app import LocalBackend, make_app
    from ovdiff_ray.store.fs import Location
    from ovdiff_ray.store.shards import read_manifest

    m = read_manifest(Location(toy_bank))
    data = (Path(toy_scenes) / "images" / "0000.png").read_bytes()
    with TestClient(make_app(LocalBackend({"banks": [{"uri": toy_bank}], "torch_threads": 1}))) as client:
        r = client.post("/v1/segment", files={"image": ("s.png", data, "image/png")},
                        headers={"X-Request-ID": "req-42"})
        assert r.status_code == 200, r.text
        assert client.post("/v1/segment", files={"image": ("s.png", b"nope", "image/png")}).status_code == 415
    got = [x for x in lines(json_logs) if x["logger"] == "ovdiff.serve.access"]
    ok = [x for x in got if x.get("request_id") == "req-42"]
    assert len(ok) == 1, got
    assert ok[0]["route"] == "/v1/segment" and ok[0]["status"] == 200 and ok[0]["method"] == "POST"
    assert ok[0]["bank_id"] == m["bank_id"] and ok[0]["bank_version"] == m["version"] and ok[0]["ms"] > 0
    bad = [x for x in got if x["status"] == 415]
    assert len(bad) == 1 and bad[0]["request_id"] not in ("", "req-42") and "bank_version" not in bad[0]
    assert all(x["level"] == "INFO" and x["ts"].endswith("Z") for x in got)


def test_job_and_error_lines(json_logs):
    log = logging.getLogger("ovdiff.serve")
    with logs.context(job_id="0123456789abcdef", bank_id="toy-x", bank_version=3):
        log.info("job %s done", "0123456789abcdef")
    try:
        raise ValueError("boom")
    except ValueError:
        log.exception("failed")
    a, b = lines(json_logs)
    assert (a["msg"], a["job_id"], a["bank_id"], a["bank_version"]) == ("job 0123456789abcdef done",
                                                                        "0123456789abcdef", "toy-x", 3)
    assert "job_id" not in b and b["level"] == "ERROR" and "ValueError: boom" in b["exc"]


def test_plain_text_is_the_default(monkeypatch):
    monkeypatch.delenv(logs.ENV, raising=False)
    assert not logs.configure() and not logs.json_enabled()
    assert logging.getLogger("ovdiff").propagate
