"""Reference tests: plain re-implementations written from ../shared/OVDIFF.md and issue 12's facts (loops over
layers, heads and pixels), sharing no helper with the package, compared with the package's public interfaces."""
from __future__ import annotations

import pytest


@pytest.fixture(scope="session")
def tiny_sd_folder(_model_cache):
    from ovdiff_ray.models.weights import resolve_model

    return resolve_model("tiny:sd")
