"""`ovdiff serve --request-timeout S` (issue 28): the flag reaches the service config and the catalog the ingress
times the segmenter call by; a call over it is a 504 naming the configured value; a warm-up segmentation over it is
said in one warning line."""
from __future__ import annotations

import asyncio
import logging

import numpy as np
import pytest

from ovdiff_ray.serve import app as app_mod
from ovdiff_ray.serve.backends import ServeBackend
from ovdiff_ray.serve.engine import Catalog, Engine, Job, ServiceConfig
from ovdiff_ray.serve.limits import RequestError


def test_the_flag_reaches_the_config_and_the_catalog(toy_bank, monkeypatch, capsys):
    import ovdiff_ray.preflight as preflight

    seen = {}

    def fake_build(args):
        seen.update(args)
        raise ValueError("stopped before Ray")

    monkeypatch.setattr(preflight, "run_for_load", lambda *a, **k: False)
    monkeypatch.setattr(app_mod, "build_app", fake_build)
    assert app_mod.main(["--bank", toy_bank, "--request-timeout", "7.5"]) == 2
    assert seen["request_timeout_s"] == 7.5
    cfg = app_mod.service_config(app_mod.AppArgs.model_validate(seen))
    assert cfg.request_timeout_s == 7.5
    assert Engine(cfg).catalog.request_timeout_s == 7.5
    assert Catalog.from_dict(Engine(cfg).catalog.to_dict()).request_timeout_s == 7.5  # as it reaches the ingress
    with pytest.raises(SystemExit):
        app_mod.main(["--bank", toy_bank, "--request-timeout", "0"])
    assert "--request-timeout 0: must be > 0" in capsys.readouterr().err


class SlowHandle:
    """A segmenter deployment handle whose call outlasts any tiny timeout."""

    cancelled = False

    def options(self, **_):
        return self

    @property
    def segment(self):
        return self

    def remote(self, job):
        return _Slow()


class _Slow:
    def __await__(self):
        return asyncio.sleep(30).__await__()

    def cancel(self):
        SlowHandle.cancelled = True


def test_a_call_over_the_timeout_is_a_504_naming_the_configured_value(toy_bank):
    cfg = ServiceConfig.from_dict({"banks": [toy_bank], "request_timeout_s": 0.25})
    backend = ServeBackend()
    backend._handle = SlowHandle()
    backend._catalog = Engine(cfg).catalog
    with pytest.raises(RequestError) as e:
        asyncio.run(backend.segment(backend._catalog.default, Job(np.zeros((8, 8, 3), np.uint8))))
    assert e.value.status == 504 and "0.25s" in str(e.value) and SlowHandle.cancelled


def test_a_warm_up_over_the_timeout_is_said_in_one_line(toy_bank, caplog):
    slow = Engine(ServiceConfig.from_dict({"banks": [toy_bank], "request_timeout_s": 1e-6}))
    seg = slow.load(slow.catalog.default)
    with caplog.at_level(logging.WARNING, logger="ovdiff.serve"):
        took = slow.warm_up(seg)
    lines = [r.getMessage() for r in caplog.records if "warm-up" in r.getMessage()]
    assert took > 1e-6 and len(lines) == 1 and "\n" not in lines[0]
    assert "1e-06s" in lines[0] and "--request-timeout" in lines[0]
    caplog.clear()
    fine = Engine(ServiceConfig.from_dict({"banks": [toy_bank], "request_timeout_s": 3600}))
    with caplog.at_level(logging.WARNING, logger="ovdiff.serve"):
        fine.warm_up(seg)
    assert not [r for r in caplog.records if "warm-up" in r.getMessage()]
