"""label_dataset and `ovdiff serve` run the preflight for what they load: the bank, its recipe's models, the GPUs."""
from __future__ import annotations

import contextlib
import io
from pathlib import Path

from ovdiff_ray.label import main as label_main
from ovdiff_ray.recipe import load_recipe
from ovdiff_ray.serve.app import main as serve_main
from ovdiff_ray.store import Location
from ovdiff_ray.store.shards import commit_manifest, new_manifest

ROOT = Path(__file__).resolve().parents[1]


def bank_with_recipe(path: Path, recipe: dict) -> str:
    """A committed (empty) bank whose manifest records `recipe`: all the preflight reads."""
    loc = Location(str(path))
    commit_manifest(loc, new_manifest("test-bank", 1, recipe, []))
    return str(path)


def call(main, args: list[str]) -> tuple[int, str]:
    err = io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
        rc = main(args)
    return rc, err.getvalue()


def test_label_dataset_checks_the_banks_models(tmp_path):
    recipe = load_recipe("tiny").to_dict()
    recipe["extractors"][1]["model"] = str(tmp_path / "moved-dino")
    bank = bank_with_recipe(tmp_path / "bank", recipe)
    images = tmp_path / "images"
    images.mkdir()
    out = tmp_path / "labels"
    rc, err = call(label_main, ["--images", str(images), "--bank", bank, "--out", str(out), "--format", "coco",
                                "--device", "cpu"])  # a folder is real weights for all the preflight knows
    lines = [l for l in err.splitlines() if l.startswith("label_dataset: error:")]
    assert rc == 2 and len(lines) == 1, err
    assert "extractors[dino].model" in lines[0] and "moved-dino" in lines[0] and "does not exist" in lines[0]
    assert "Traceback" not in err and not out.exists()
    rc, err = call(label_main, ["--images", str(images), "--bank", str(tmp_path / "none"), "--out", str(out),
                                "--format", "coco"])
    assert rc == 2 and "no committed bank there" in err and not out.exists()


def test_label_dataset_checks_the_gpus(tmp_path):
    import torch

    bank = bank_with_recipe(tmp_path / "bank", load_recipe("toy").to_dict())
    n = torch.cuda.device_count()
    rc, err = call(label_main, ["--images", str(tmp_path), "--bank", bank, "--out", str(tmp_path / "o"),
                                "--format", "png", "--gpus-per-worker", "1", "--workers", str(n + 1)])
    lines = [l for l in err.splitlines() if l.startswith("label_dataset: error:")]
    assert rc == 2 and len(lines) == 1 and f"{n} GPUs" in lines[0], err
    assert not (tmp_path / "o").exists()


def test_serve_checks_banks_and_gpus_before_starting(tmp_path):
    import torch

    rc, err = call(serve_main, ["--bank", str(tmp_path / "nothing")])
    assert rc == 2 and "ovdiff serve: error: --bank " in err and "no committed bank there" in err
    bank = bank_with_recipe(tmp_path / "bank", load_recipe("toy").to_dict())
    n = torch.cuda.device_count()
    rc, err = call(serve_main, ["--bank", bank, "--replicas", str(n + 1), "--num-gpus", "1"])
    lines = [l for l in err.splitlines() if l.startswith("ovdiff serve: error:")]
    assert rc == 2 and len(lines) == 1 and "replica" in lines[0] and f"{n} GPUs" in lines[0], err
    rc, err = call(serve_main, ["--bank", f"{bank}@7"])  # a version the bank does not have
    assert rc == 2 and "cannot read the bank" in err and "bank version 7 does not exist" in err
