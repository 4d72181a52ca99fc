"""`ovdiff weights mirror`: the tiny models round-trip through moto's S3 (and a folder) and load from there."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import boto3
import torch

from ovdiff_ray import preflight
from ovdiff_ray.cli import main as cli_main
from ovdiff_ray.models.weights import resolve_model, sha256_file
from ovdiff_ray.recipe import load_recipe

ROOT = Path(__file__).resolve().parents[1]


def same_weights(a: torch.nn.Module, b: torch.nn.Module) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


def load_all(recipe):
    """Each model of `recipe` through the loaders the workers use (models/diffusion.py, models/extractors.py)."""
    from ovdiff_ray.models.diffusion import load_pipeline
    from ovdiff_ray.models.extractors import load_open_clip, load_timm

    dino = next(e for e in recipe.extractors if e.type == "dino")
    return (load_pipeline(recipe.generation.model, "cpu", torch.float32).unet, load_timm(dino.model),
            load_open_clip(recipe.classifier.model)[0])


def test_mirror_to_s3_round_trip(s3, tmp_path, monkeypatch, capsys):
    originals = load_all(load_recipe("tiny"))
    out_recipe = tmp_path / "tiny-s3.yaml"
    assert cli_main(["weights", "mirror", "--recipe", "tiny", "--to", f"{s3}/weights/",
                     "--recipe-out", str(out_recipe)]) == 0
    text = capsys.readouterr().out
    assert f"  generation.model: {s3}/weights/tiny--sd" in text
    assert f"  extractors[dino].model: {s3}/weights/tiny--dino" in text
    assert f"  classifier.model: {s3}/weights/tiny--clip" in text
    assert "summary: 3 models mirrored" in text
    client = boto3.client("s3")
    bucket = s3[len("s3://"):]
    keys = {o["Key"] for o in client.list_objects_v2(Bucket=bucket)["Contents"]}
    manifest = json.loads(client.get_object(Bucket=bucket, Key="weights/tiny--dino/weights.sha256.json")["Body"].read())
    tiny_dino = Path(resolve_model("tiny:dino"))
    assert manifest == {"config.json": sha256_file(tiny_dino / "config.json"),
                        "model.safetensors": sha256_file(tiny_dino / "model.safetensors")}
    assert "weights/tiny--sd/unet/diffusion_pytorch_model.safetensors" in keys
    assert not any(k.endswith(".ovdiff-sha256.json") for k in keys)

    mirrored = load_recipe(out_recipe)
    assert {u.ref for u in preflight.model_uses(mirrored)} == {f"{s3}/weights/tiny--{m}" for m in ("sd", "dino", "clip")}
    pf = preflight.Preflight()
    preflight.check_models(pf, mirrored)
    assert pf.ok, pf.problems
    monkeypatch.setenv("OVDIFF_CACHE", str(tmp_path / "node-cache"))  # a fresh node: copies from S3, checks sha256
    from ovdiff_ray.models import extractors

    monkeypatch.setattr(extractors, "_MODELS", {})
    copies = load_all(mirrored)
    assert all(same_weights(a, b) for a, b in zip(originals, copies))
    assert (tmp_path / "node-cache" / "models" / "s3" / bucket).is_dir()
    # a second mirror is a no-op
    assert cli_main(["weights", "mirror", "--recipe", "tiny", "--to", f"{s3}/weights"]) == 0
    assert capsys.readouterr().out.count("(already there, unchanged)") == 3


def test_mirror_to_a_folder_and_from_the_hf_cache(tmp_path, monkeypatch, capsys):
    """A hub id found in the local HF cache is copied with only the files its loader reads."""
    cache = tmp_path / "hf"
    base = cache / "models--org--sd-tiny"
    (base / "refs").mkdir(parents=True)
    (base / "refs" / "main").write_text("abc123")
    snap = base / "snapshots" / "abc123"
    shutil.copytree(resolve_model("tiny:sd"), snap)
    (snap / ".ovdiff-sha256.json").unlink()
    (snap / "v1-5-pruned.ckpt").write_bytes(b"a root checkpoint the pipeline does not read")
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    recipe = tmp_path / "r.yaml"
    recipe.write_text((ROOT / "bank" / "recipes" / "tiny.yaml").read_text().replace("model: tiny:sd", "model: org/sd-tiny"))
    to = tmp_path / "weights"
    assert cli_main(["weights", "mirror", "--recipe", str(recipe), "--to", str(to),
                     "--recipe-out", str(tmp_path / "out.yaml")]) == 0
    assert f"generation.model: {to}/org--sd-tiny" in capsys.readouterr().out
    folder = to / "org--sd-tiny"
    assert not (folder / "v1-5-pruned.ckpt").exists() and (folder / "unet" / "config.json").is_file()
    manifest = json.loads((folder / "weights.sha256.json").read_text())
    assert set(manifest) == {p.relative_to(folder).as_posix() for p in folder.rglob("*")
                             if p.is_file() and p.name != "weights.sha256.json"}
    mirrored = load_recipe(tmp_path / "out.yaml")
    original = load_all(load_recipe("tiny"))[0]
    assert same_weights(original, load_all(mirrored)[0])
    assert not list(to.glob("*.partial-*"))


def test_mirror_refuses_what_is_not_here(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "empty-cache"))
    to = tmp_path / "weights"
    assert cli_main(["weights", "mirror", "--recipe", "paper", "--to", str(to)]) == 2
    err = capsys.readouterr().err
    lines = [l for l in err.splitlines() if l.startswith("ovdiff weights mirror: error:")]
    assert len(lines) == 3 and "generation.model 'stable-diffusion-v1-5/stable-diffusion-v1-5': not in the local" in lines[0]
    assert "hf download timm/vit_base_patch16_clip_224.openai" in lines[2]
    assert "summary: nothing mirrored" in err and not to.exists()


def test_mirror_open_clip_pretrained_tag(tmp_path, monkeypatch, capsys):
    """`open_clip:ARCH/TAG` (the paper's CLIP reference form): the tag's weights from the HF cache plus a generated
    `open_clip_config.json` make a `local-dir:` folder. A tiny architecture registered as ARCH stands in for
    ViT-B-16 (same open_clip code path, 7 MB instead of 600)."""
    import open_clip
    import open_clip.factory
    import open_clip.pretrained

    from ovdiff_ray.models import extractors
    from ovdiff_ray.models.tiny import TINY_CLIP_CFG

    monkeypatch.setitem(open_clip.factory._MODEL_CONFIGS, "TinyTest-16", dict(TINY_CLIP_CFG))
    monkeypatch.setitem(open_clip.pretrained._PRETRAINED, "TinyTest-16",
                        {"openai": open_clip.pretrained._pcfg(hf_hub="org/tiny-clip-openai/", quick_gelu=True)})
    cache = tmp_path / "hf"
    base = cache / "models--org--tiny-clip-openai"
    (base / "refs").mkdir(parents=True)
    (base / "refs" / "main").write_text("r1")
    (base / "snapshots" / "r1").mkdir(parents=True)
    tiny_clip = Path(resolve_model("tiny:clip"))
    shutil.copyfile(tiny_clip / "open_clip_model.safetensors", base / "snapshots" / "r1" / "open_clip_model.safetensors")
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    recipe = tmp_path / "r.yaml"
    recipe.write_text((ROOT / "bank" / "recipes" / "tiny.yaml").read_text()
                      .replace("model: tiny:clip", "model: open_clip:TinyTest-16/openai"))
    pf = preflight.Preflight()
    preflight.check_models(pf, load_recipe(recipe))
    assert pf.ok and any("open_clip:TinyTest-16/openai': in the local Hugging Face cache" in n for n in pf.notes)
    to = tmp_path / "weights"
    assert cli_main(["weights", "mirror", "--recipe", str(recipe), "--to", str(to),
                     "--recipe-out", str(tmp_path / "out.yaml")]) == 0
    folder = to / "open_clip--TinyTest-16--openai"
    assert sorted(p.name for p in folder.iterdir()) == ["open_clip_config.json", "open_clip_model.safetensors",
                                                        "weights.sha256.json"]
    cfg = json.loads((folder / "open_clip_config.json").read_text())
    assert cfg["model_cfg"]["quick_gelu"] is True and cfg["model_cfg"]["vision_cfg"] == TINY_CLIP_CFG["vision_cfg"]
    assert cfg["preprocess_cfg"]["mean"] == list(open_clip.pretrained.OPENAI_DATASET_MEAN)
    monkeypatch.setattr(extractors, "_MODELS", {})
    mirrored = load_recipe(tmp_path / "out.yaml")
    assert mirrored.classifier.model == str(folder)
    copy = extractors.load_open_clip(mirrored.classifier.model)[0]
    original = extractors.load_open_clip("tiny:clip")[0]
    assert same_weights(original, copy)
    assert copy.transformer.resblocks[0].mlp.gelu.__class__.__name__ == "QuickGELU"  # openai weights need it
