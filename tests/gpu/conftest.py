"""The GPU tier (`make test-gpu`, marker `gpu`): every path that only a GPU reaches, run on the device under test and
compared with the same call on the CPU. No Ray here: the device machine has none (tests/gpu/test_no_ray.py checks
that these modules import without it).

The device under test: `pytest --device cuda|cpu`, else `$OVDIFF_TEST_DEVICE`, else cuda when available, else cpu.
On a CPU-only machine the tier runs cpu against cpu: every path is exercised, the comparisons are exact, and what
only CUDA can show (fp16 kernels, device/host mix-ups) is shown only on a lent GPU (bench/gpu_check.sh).

Tolerances (stated once, used by every test):
- labels: the device's and the CPU's label maps agree on >= 99% of pixels (`LABEL_AGREEMENT`);
- scores / confidence: mean absolute difference <= 0.01, <= 0.02 with fp16 models (`SCORE_MAD`);
- prototypes: every class-level (fg and bg) prototype at cosine >= 0.99 (fp32) / 0.98 (fp16) to the CPU's, and the
  same number of rows of each kind and level (`PROTO_COS`).
"""
from __future__ import annotations

import os

import pytest
import torch

from .compare import VOCAB, write_bank


def device_under_test(config) -> str:
    d = config.getoption("--device", default=None) or os.environ.get("OVDIFF_TEST_DEVICE")
    return d or ("cuda" if torch.cuda.is_available() else "cpu")


@pytest.fixture(scope="session", autouse=True)
def _threads():
    """tests/conftest.py keeps CI at one thread; the CPU reference of a lent GPU machine may take more
    (`OVDIFF_TEST_THREADS`, bench/gpu_check.sh sets 8)."""
    n = int(os.environ.get("OVDIFF_TEST_THREADS", "0"))
    if n > 0:
        torch.set_num_threads(n)


@pytest.fixture(scope="session")
def device(request) -> str:
    d = device_under_test(request.config)
    if d.startswith("cuda") and not torch.cuda.is_available():
        pytest.fail(f"--device {d}: torch sees no CUDA device here (torch {torch.__version__})")
    return d


@pytest.fixture(scope="session")
def precision(device) -> str:
    """What the models run at on the device: fp16 on CUDA (the recipes' `auto`, autocast for DINO and CLIP), fp32
    on a CPU."""
    return "fp16" if device.startswith("cuda") else "fp32"


@pytest.fixture(scope="session")
def toy_protos():
    """The toy vocabulary's prototypes (toy recipe, built on the CPU)."""
    from ovdiff_ray.recipe import load_recipe
    from ovdiff_ray.sample import SamplingModels, sample_class
    from ovdiff_ray.vocab import load_vocab

    recipe = load_recipe("toy")
    models = SamplingModels.load(recipe, "cpu")
    return recipe, [sample_class(c.name, recipe, models, kind=c.kind) for c in load_vocab(VOCAB).classes]


@pytest.fixture(scope="session")
def tiny_protos():
    """8 toy classes with the tiny recipe's real architectures (SD UNet, DINO ViT, CLIP ViT; random weights):
    support images from the toy generator (fast), features from the tiny models, built on the CPU."""
    from ovdiff_ray.models import toy
    from ovdiff_ray.recipe import load_recipe
    from ovdiff_ray.sample import SamplingModels, sample_class

    recipe = load_recipe("tiny")
    recipe.generation.generator = "toy"
    recipe.generation.n_images = 4
    recipe.masks.method = "none"
    names = [f"{c} {s}" for c in toy.COLOURS for s in toy.SHAPES][:8]
    models = SamplingModels.load(recipe, "cpu")
    return recipe, [sample_class(n, recipe, models) for n in names]


@pytest.fixture(scope="session")
def toy_bank_dir(toy_protos, tmp_path_factory) -> str:
    recipe, protos = toy_protos
    return write_bank(tmp_path_factory.mktemp("gpu-toy-bank"), protos, recipe, "gpu-toy")


@pytest.fixture(scope="session")
def tiny_bank_dir(tiny_protos, tmp_path_factory) -> str:
    recipe, protos = tiny_protos
    return write_bank(tmp_path_factory.mktemp("gpu-tiny-bank"), protos, recipe, "gpu-tiny")
