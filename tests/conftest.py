"""Shared fixtures: a real moto S3 server on 127.0.0.1 (reset per test), a local Ray, temp caches."""
from __future__ import annotations

import logging
import os
import socket
import uuid

import pytest

# Keep every test offline and its caches inside the test session.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("RAY_DATA_DISABLE_PROGRESS_BARS", "1")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")


def _one_thread_per_process() -> None:
    """Tests run next to Ray workers on 2 cores: intra-op thread pools only spin against each other."""
    import torch

    torch.set_num_threads(1)


_one_thread_per_process()


def pytest_addoption(parser):
    parser.addoption("--device", default=None,
                     help="device of the GPU tier (tests/gpu, `make test-gpu`): cuda | cpu | cuda:N; default "
                          "$OVDIFF_TEST_DEVICE, else cuda when available, else cpu")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="session", autouse=True)
def _model_cache(tmp_path_factory):
    """Tiny models are built once per session into this cache (OVDIFF_CACHE)."""
    if "OVDIFF_CACHE" not in os.environ:
        os.environ["OVDIFF_CACHE"] = str(tmp_path_factory.mktemp("ovdiff-cache"))
    if "OVDIFF_BANK_CACHE" not in os.environ:  # node-local shared bank copies (store/shared.py)
        os.environ["OVDIFF_BANK_CACHE"] = str(tmp_path_factory.mktemp("ovdiff-bank-cache"))
    yield os.environ["OVDIFF_CACHE"]


@pytest.fixture(scope="session")
def moto_server():
    """moto's ThreadedMotoServer on 127.0.0.1 and a free port; yields the endpoint URL."""
    from moto.server import ThreadedMotoServer

    logging.getLogger("werkzeug").setLevel(logging.ERROR)
    port = free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    yield f"http://127.0.0.1:{port}"
    server.stop()


@pytest.fixture()
def s3(moto_server, monkeypatch):
    """A fresh bucket on the moto server with the standard AWS variables set; yields `s3://bucket`.

    The server is reset before each test, so no state leaks between tests.
    """
    import boto3
    import requests

    requests.post(f"{moto_server}/moto-api/reset", timeout=10)
    monkeypatch.setenv("AWS_ENDPOINT_URL", moto_server)
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "testing")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "testing")
    monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")
    monkeypatch.delenv("AWS_PROFILE", raising=False)
    bucket = f"test-{uuid.uuid4().hex[:8]}"
    boto3.client("s3", endpoint_url=moto_server, region_name="us-east-1").create_bucket(Bucket=bucket)
    yield f"s3://{bucket}"


@pytest.fixture(scope="session")
def ray_local():
    """One local Ray for the session (2 CPUs, no dashboard)."""
    import ray

    if not ray.is_initialized():
        # The header read timeout of Serve's proxy (ovdiff_ray/serve/http_guard.py), short for the slow-client tests.
        ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False,
                 runtime_env={"env_vars": {"OVDIFF_CACHE": os.environ["OVDIFF_CACHE"], "HF_HUB_OFFLINE": "1",
                                           "OVDIFF_BANK_CACHE": os.environ["OVDIFF_BANK_CACHE"],
                                           "OVDIFF_HEADER_TIMEOUT_S": "3"},
                              "worker_process_setup_hook": "ovdiff_ray.serve.http_guard.install"})
    yield ray
    ray.shutdown()


@pytest.fixture(scope="session")
def toy_bank(ray_local, tmp_path_factory) -> str:
    """The toy bank (bank/vocab/toy.tsv, recipe toy), built once per session by `build_bank` on the local Ray."""
    from pathlib import Path

    from ovdiff_ray.build_bank import main as build_main

    out = str(tmp_path_factory.mktemp("toy-bank") / "bank")
    vocab = str(Path(__file__).resolve().parents[1] / "bank" / "vocab" / "toy.tsv")
    assert build_main(["--vocab", vocab, "--recipe", "toy", "--out", out, "--workers", "2"]) == 0
    return out


@pytest.fixture(scope="session")
def toy_scenes(tmp_path_factory) -> str:
    """12 toy scenes with ground truth (`ovdiff toy-scenes`), seed 0."""
    from pathlib import Path

    from ovdiff_ray.models.toy import scenes_main

    out = str(tmp_path_factory.mktemp("toy-scenes"))
    vocab = str(Path(__file__).resolve().parents[1] / "bank" / "vocab" / "toy.tsv")
    assert scenes_main(["--vocab", vocab, "--n", "12", "--out", out, "--seed", "0"]) == 0
    return out
