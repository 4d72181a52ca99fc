"""No paper recipe on a CPU by accident (issue 19, point 1): `build_bank`, `label_dataset` and `ovdiff serve` refuse
real (not `tiny:`/toy) models on workers with 0 GPUs in the preflight, with one line naming the GPU flag and the
`--device cpu` opt-out, reported together with every other problem, exit 2, before Ray is asked anything and with
nothing written; `--device cuda` with 0 GPUs (and `cpu` with GPUs) is refused too; `--device cpu` passes that check
and reaches the models; `--check` names the device."""
from __future__ import annotations

import contextlib
import io
import shutil
from pathlib import Path

import pytest

from ovdiff_ray import preflight
from ovdiff_ray.build_bank import ClassWorker, main as build_main
from ovdiff_ray.label import main as label_main
from ovdiff_ray.models.weights import RECORD, resolve_model
from ovdiff_ray.recipe import load_recipe
from ovdiff_ray.serve import app as serve_app
from ovdiff_ray.store import Location
from ovdiff_ray.store.shards import commit_manifest, new_manifest

ROOT = Path(__file__).resolve().parents[1]
TOY = str(ROOT / "bank" / "vocab" / "toy.tsv")
PAPER_REFS = ["stable-diffusion-v1-5/stable-diffusion-v1-5", "timm/vit_base_patch8_224.dino",
              "open_clip:ViT-B-16/openai"]


def call(main, args: list[str]) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(out):
        rc = main(args)
    return rc, out.getvalue(), err.getvalue()


def error_lines(prog: str, err: str) -> list[str]:
    return [line for line in err.splitlines() if line.startswith(f"{prog}: error:")]


def bank_with_recipe(path: Path, recipe: dict) -> str:
    """A committed (empty) bank whose manifest records `recipe`: all the preflight reads."""
    commit_manifest(Location(str(path)), new_manifest("test-bank", 1, recipe, []))
    return str(path)


@pytest.fixture
def no_weights(tmp_path, monkeypatch):
    """An empty Hugging Face cache, offline: the paper recipe's hub ids are missing."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "empty-hf-cache"))


def _snapshot(cache: Path, repo: str) -> Path:
    base = cache / ("models--" + repo.replace("/", "--"))
    (base / "refs").mkdir(parents=True)
    (base / "refs" / "main").write_text("0123abcd")
    return base / "snapshots" / "0123abcd"


@pytest.fixture
def paper_weights_offline(tmp_path, monkeypatch):
    """The paper recipe's three hub ids in a local Hugging Face cache, offline, holding the tiny models' files (the
    preflight checks files, not sizes): the paper recipe's models are all there."""
    cache = tmp_path / "hf"
    for repo, tiny in zip(PAPER_REFS[:2], ("sd", "dino")):
        snap = _snapshot(cache, repo)
        shutil.copytree(resolve_model(f"tiny:{tiny}"), snap)
        (snap / RECORD).unlink()
    snap = _snapshot(cache, "timm/vit_base_patch16_clip_224.openai")  # open_clip:ViT-B-16/openai's weights
    snap.mkdir(parents=True)
    shutil.copyfile(Path(resolve_model("tiny:clip")) / "open_clip_model.safetensors",
                    snap / "open_clip_model.safetensors")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))


@pytest.fixture
def ray_calls(monkeypatch) -> list[str]:
    """Every question to Ray (init, cluster resources, nodes) is recorded instead of made."""
    import ray

    calls: list[str] = []
    for name in ("init", "cluster_resources", "nodes"):
        monkeypatch.setattr(ray, name, lambda *a, _n=name, **k: calls.append(_n) or {})
    monkeypatch.setattr(preflight, "cluster_resources", lambda *a, **k: calls.append("cluster_resources") or None)
    monkeypatch.setattr(preflight, "local_resources", lambda *a, **k: calls.append("local_resources") or None)
    return calls


def assert_cpu_refusal(line: str, gpus_flag: str) -> None:
    """The one line: it names the GPU flag (at 0), a real model, what to pass on a GPU cluster and the opt-out."""
    assert f"error: {gpus_flag} 0: " in line, line
    assert PAPER_REFS[0] in line and "would get no GPU" in line and "on the CPU" in line, line
    assert f"pass {gpus_flag} 1 on a GPU cluster" in line and "--device cpu to run them on the CPU on purpose" in line


# ------------------------------------------------------------------------------------------------ the refusal

def test_build_bank_refuses_the_paper_recipe_on_cpu_with_the_missing_models(tmp_path, no_weights, ray_calls):
    out = tmp_path / "bank"
    rc, text, err = call(build_main, ["--vocab", TOY, "--recipe", "paper", "--out", str(out)])
    lines = error_lines("build_bank", err)
    assert rc == 2, err
    # one line per missing model, and the device line, in one report
    assert len(lines) == 4, err
    assert all("not in the local Hugging Face cache" in line for line in lines[:3]), lines
    assert_cpu_refusal(lines[3], "--gpus-per-worker")
    assert "summary: preflight found 4 problem(s); nothing was started or written" in err
    assert "Traceback" not in err and text == ""
    assert not out.exists() and ray_calls == []


def test_label_dataset_refuses_the_paper_recipe_on_cpu_with_the_missing_models(tmp_path, no_weights, ray_calls):
    bank = bank_with_recipe(tmp_path / "bank", load_recipe("paper").to_dict())
    images = tmp_path / "images"
    images.mkdir()
    out = tmp_path / "labels"
    rc, _, err = call(label_main, ["--images", str(images), "--bank", bank, "--out", str(out), "--format", "coco"])
    lines = error_lines("label_dataset", err)
    assert rc == 2 and len(lines) == 4, err
    assert all("not in the local Hugging Face cache" in line for line in lines[:3]), lines
    assert_cpu_refusal(lines[3], "--gpus-per-worker")
    assert "GPU's seconds per image" in lines[3]  # a labelling job's cost, not a class's
    assert "nothing was started or written" in err
    assert not out.exists() and ray_calls == []


def test_serve_refuses_the_paper_recipe_on_cpu_with_the_missing_models(tmp_path, no_weights, ray_calls, monkeypatch):
    monkeypatch.setattr(serve_app, "build_app", lambda *a, **k: pytest.fail("the app was built"))
    bank = bank_with_recipe(tmp_path / "bank", load_recipe("paper").to_dict())
    before = sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*"))
    rc, _, err = call(serve_app.main, ["--bank", bank])
    lines = error_lines("ovdiff serve", err)
    assert rc == 2 and len(lines) == 4, err
    assert all("not in the local Hugging Face cache" in line for line in lines[:3]), lines
    assert_cpu_refusal(lines[3], "--num-gpus")
    assert "each replica would get no GPU" in lines[3]
    assert ray_calls == [] and sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*")) == before
    # --follow builds classes too: their workers' GPUs are checked under their own flag
    rc, _, err = call(serve_app.main, ["--bank", bank, "--num-gpus", "1", "--follow"])
    lines = error_lines("ovdiff serve", err)
    assert rc == 2 and len(lines) == 4, err
    assert "--build-gpus-per-worker 0: " in lines[3] and "new classes would be built on the CPU" in lines[3]
    assert "pass --build-gpus-per-worker 1 on a GPU cluster, or --device cpu" in lines[3]
    assert ray_calls == []


@pytest.mark.parametrize("device,gpus,want", [
    ("cuda", "0", ["--device cuda: asks for CUDA but {g} is 0", "pass {g} 1 (or a fraction), or --device cpu"]),
    ("cpu", "1", ["--device cpu: with {g} 1: each {w} would hold GPUs it never uses", "pass {g} 0"]),
])
def test_contradicting_device_and_gpus_are_refused(tmp_path, ray_calls, device, gpus, want):
    """Whatever the recipe (toy here): one line, exit 2, nothing written, Ray not asked."""
    out = tmp_path / "bank"
    rc, _, err = call(build_main, ["--vocab", TOY, "--recipe", "toy", "--out", str(out), "--device", device,
                                   "--gpus-per-worker", gpus])
    lines = error_lines("build_bank", err)
    assert rc == 2 and len(lines) == 1, err
    assert all(w.format(g="--gpus-per-worker", w="worker") in lines[0] for w in want), lines[0]
    bank = bank_with_recipe(tmp_path / "toy-bank", load_recipe("toy").to_dict())
    rc, _, err = call(label_main, ["--images", str(tmp_path), "--bank", bank, "--out", str(tmp_path / "o"),
                                   "--format", "png", "--device", device, "--gpus-per-worker", gpus])
    lines = error_lines("label_dataset", err)
    assert rc == 2 and len(lines) == 1, err
    assert all(w.format(g="--gpus-per-worker", w="worker") in lines[0] for w in want), lines[0]
    rc, _, err = call(serve_app.main, ["--bank", bank, "--device", device, "--num-gpus", gpus])
    lines = error_lines("ovdiff serve", err)
    assert rc == 2 and len(lines) == 1, err
    assert all(w.format(g="--num-gpus", w="replica") in lines[0] for w in want), lines[0]
    assert not out.exists() and not (tmp_path / "o").exists() and ray_calls == []


def test_device_rules():
    paper, tiny, toy = (load_recipe(n) for n in ("paper", "tiny", "toy"))
    assert preflight.real_models(paper) == PAPER_REFS
    assert preflight.real_models(tiny) == [] and preflight.real_models(toy) == []
    assert [preflight.resolve_device("auto", g) for g in (0, 0.25, 1)] == ["cpu", "cuda", "cuda"]
    for recipe, device, gpus, want, problem in ((paper, "auto", 0.0, "cpu", "--gpus-per-worker 0"),
                                                (paper, "auto", 0.5, "cuda", None), (paper, "cpu", 0.0, "cpu", None),
                                                (tiny, "auto", 0.0, "cpu", None), (toy, "auto", 0.0, "cpu", None),
                                                (toy, "cuda", 0.0, "cuda", "--device cuda"),
                                                (toy, "cpu", 2.0, "cpu", "--device cpu"),
                                                (tiny, "cuda", 1.0, "cuda", None)):
        pf = preflight.Preflight()
        assert preflight.check_device(pf, [recipe], device, gpus) == want
        if problem is None:
            assert pf.ok and pf.notes == [f"device: each worker runs the models on {want} (--device {device}, "
                                          f"{gpus:g} GPU{'' if gpus == 1 else 's'} per worker; "
                                          f"{'real models' if recipe is paper else 'tiny/toy models only'})"], pf.notes
        else:
            assert len(pf.problems) == 1 and pf.problems[0].thing == problem and pf.notes == [], pf.problems


# ------------------------------------------------------------------------------------------------ the opt-out

def test_build_bank_check_with_the_paper_models_names_the_device(tmp_path, paper_weights_offline):
    """Every model of paper.yaml available: only the device decides. Refused by default; `--device cpu` passes and
    `--check` says the models run on the CPU."""
    out = tmp_path / "bank"
    args = ["--vocab", TOY, "--recipe", "paper", "--out", str(out), "--workers", "1", "--check"]
    rc, _, err = call(build_main, args)
    lines = error_lines("build_bank", err)
    assert rc == 2 and len(lines) == 1, err
    assert_cpu_refusal(lines[0], "--gpus-per-worker")
    rc, text, err = call(build_main, args + ["--device", "cpu"])
    assert rc == 0, err
    assert "build_bank --check: device: each worker runs the models on cpu (--device cpu, 0 GPUs per worker; " \
           "real models)" in text
    assert "1 worker(s) x (1 CPU, 0 GPU), models on cpu" in text
    assert "the models run on the CPU: many times the estimated GPU time 10 x ~17.7 s" in text
    assert "measured 17.7 s a class of these models on one H200" in text
    assert "in the local Hugging Face cache" in text  # the models were checked, and found
    assert not out.exists()
    rc, text, _ = call(build_main, ["--vocab", TOY, "--recipe", "tiny", "--out", str(out), "--workers", "1",
                                    "--check"])  # tiny models on the CPU need no opt-out
    assert rc == 0 and "runs the models on cpu (--device auto, 0 GPUs per worker; tiny/toy models only)" in text
    assert "models on cpu" in text and "the models run on the CPU" in text and not out.exists()


def test_load_jobs_with_the_paper_models_and_device_cpu(tmp_path, paper_weights_offline, monkeypatch):
    """label_dataset and ovdiff serve: with every model there, `--device cpu` passes the preflight, and the device
    reaches the job (label's start line; serve's ServiceConfig, which the replicas' Engine loads the models on)."""
    bank = bank_with_recipe(tmp_path / "bank", load_recipe("paper").to_dict())
    images = tmp_path / "images"
    images.mkdir()
    (images / "a.png").write_bytes(b"\x89PNG\r\n\x1a\n" + bytes(64))  # over --max-bytes: an error row, no model
    out = tmp_path / "labels"
    args = ["--images", str(images), "--bank", bank, "--out", str(out), "--format", "coco", "--max-bytes", "8"]
    rc, _, err = call(label_main, args)
    lines = error_lines("label_dataset", err)
    assert rc == 2 and len(lines) == 1 and not out.exists(), err
    assert_cpu_refusal(lines[0], "--gpus-per-worker")
    rc, text, err = call(label_main, args + ["--device", "cpu"])
    assert rc == 0, err
    assert "0 to label" in text and "-> " + str(out) + "; models on cpu" in text
    assert (out / "errors.jsonl").read_text().count("\n") == 1

    seen = {}

    def build_app(args):
        seen["config"] = serve_app.service_config(serve_app.AppArgs.model_validate(args))
        raise ValueError("stopped by the test before Ray starts")

    monkeypatch.setattr(serve_app, "build_app", build_app)
    rc, _, err = call(serve_app.main, ["--bank", bank])
    assert rc == 2 and "config" not in seen, err
    assert_cpu_refusal(error_lines("ovdiff serve", err)[0], "--num-gpus")
    rc, _, err = call(serve_app.main, ["--bank", bank, "--device", "cpu"])
    assert rc == 2 and "stopped by the test before Ray starts" in err, err  # the preflight passed
    assert seen["config"].device == "cpu"


def test_class_worker_loads_the_models_on_the_device_it_is_given(tmp_path, monkeypatch):
    """build_bank passes the preflight's device to each ClassWorker, which loads the models there instead of
    guessing (a guess that is `cuda` here would fail: the tiny models would not load)."""
    import ovdiff_ray.models as models

    monkeypatch.setattr(models, "default_device", lambda: "cuda")
    monkeypatch.setattr("ovdiff_ray.sample.default_device", lambda: "cuda")
    w = ClassWorker(load_recipe("tiny").to_dict(), str(tmp_path / "bank"), None, device="cpu")
    assert w.fatal == "" and w.models.device == "cpu"
    assert {str(e.device) for e in w.models.extractors} == {"cpu"} and str(w.models.classifier.device) == "cpu"


def test_deploy_configs_say_what_to_pass_on_a_gpu_cluster():
    """The cluster's examples pass a GPU per worker; the RayService gives its segmenter and class workers one."""
    import yaml

    deploy = ROOT / "deploy"
    cluster = (deploy / "cluster.yaml").read_text()
    assert "--gpus-per-worker 1" in cluster and "--num-gpus 1" in cluster and "--device cpu" in cluster
    rs = yaml.safe_load((deploy / "rayservice.yaml").read_text())
    (app,) = yaml.safe_load(rs["spec"]["serveConfigV2"])["applications"]
    seg = next(d for d in app["deployments"] if d["name"] == "OVDiffSegmenter")
    assert seg["ray_actor_options"]["num_gpus"] >= 1 and app["args"]["build"]["gpus_per_worker"] >= 1
    assert app["args"]["device"] in (None, "cuda")
