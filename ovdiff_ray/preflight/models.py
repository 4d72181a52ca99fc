"""Model references of a recipe: a folder has the files its loader needs, a hub id is in the local Hugging Face
cache or the hub answers (never asked with `HF_HUB_OFFLINE=1`), an `s3://` prefix lists and holds
`weights.sha256.json` naming those files, a `tiny:` name exists. Nothing is downloaded or loaded."""
from __future__ import annotations

import json
import os
import re
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path

from ..models.weights import MANIFEST, RECORD, is_local_ref
from ..recipe import Recipe
from ..store.fs import StorageConfig
from .result import Preflight, Problem

HUB_TIMEOUT = float(os.environ.get("OVDIFF_HUB_TIMEOUT", "5"))
S3_TIMEOUT = 5.0
MAX_LISTED = 10_000  # objects listed under one weights prefix
MAX_MANIFEST_BYTES = 1 << 20
MIRROR_HINT = "or mirror it with `ovdiff weights mirror` to a folder or s3:// prefix the workers can read"


@dataclass(frozen=True)
class ModelUse:
    """A model reference and the loader that will read it (`diffusers` | `timm` | `open_clip` | `cutler`)."""

    where: str  # recipe key, e.g. `generation.model`, `extractors[dino].model`
    ref: str
    loader: str


def model_uses(recipe: Recipe) -> list[ModelUse]:
    """Every model reference the recipe's models will load, with the loader that reads it."""
    uses = []
    if recipe.generation.generator == "diffusers":
        uses.append(ModelUse("generation.model", recipe.generation.model, "diffusers"))
    loaders = {"sd": "diffusers", "dino": "timm", "clip": "open_clip"}
    for e in recipe.extractors:
        if e.type in loaders:
            uses.append(ModelUse(f"extractors[{e.name}].model", e.model, loaders[e.type]))
    if recipe.classifier.type == "clip":
        uses.append(ModelUse("classifier.model", recipe.classifier.model, "open_clip"))
    if recipe.masks.method == "cutler":
        uses.append(ModelUse("masks.cutler_weights", recipe.masks.cutler_weights, "cutler"))
    return uses


_WEIGHTS = re.compile(r"(diffusion_pytorch_model|model|pytorch_model)\.(safetensors|bin)(\.index\.json)?$")
OPEN_CLIP_WEIGHTS = ("open_clip_model.safetensors", "open_clip_pytorch_model.safetensors",
                     "open_clip_pytorch_model.bin", "open_clip_pytorch_model.pth")
SKIPPED_COMPONENTS = {"safety_checker", "feature_extractor", "image_encoder"}  # loaded as None


def loader_files(loader: str, files: set[str], read=None) -> list[str]:
    """The files `loader` needs that `files` (relative paths) lacks; [] = complete. `read(rel) -> bytes` reads
    `model_index.json` for a diffusers pipeline (its components decide the rest); without it only that is checked."""
    if loader == "timm":
        need = ["config.json"] if "config.json" not in files else []
        if not {"model.safetensors", "pytorch_model.bin"} & files:
            need.append("model.safetensors (or pytorch_model.bin)")
        return need
    if loader == "open_clip":
        need = ["open_clip_config.json"] if "open_clip_config.json" not in files else []
        if not set(OPEN_CLIP_WEIGHTS) & files:
            need.append("open_clip_model.safetensors (or open_clip_pytorch_model.bin)")
        return need
    if loader == "cutler":
        found = [f for f in files if "/" not in f and f.endswith((".pth", ".pkl"))]
        return [] if len(found) == 1 else [f"exactly one .pth/.pkl checkpoint (found {len(found)})"]
    if loader == "open_clip_weights":  # open_clip:ARCH/TAG from the hub: the config comes with open_clip
        return [] if set(OPEN_CLIP_WEIGHTS) & files else ["open_clip_model.safetensors (or open_clip_pytorch_model.bin)"]
    # diffusers pipeline
    if "model_index.json" not in files:
        return ["model_index.json"]
    if read is None:
        return []
    try:
        index = json.loads(read("model_index.json"))
    except (ValueError, OSError) as e:
        return [f"a readable model_index.json ({e})"]
    need = []
    for comp, spec in sorted(index.items()):
        if comp.startswith("_") or comp in SKIPPED_COMPONENTS or not isinstance(spec, list) or None in spec:
            continue
        inside = {f[len(comp) + 1:] for f in files if f.startswith(comp + "/")}
        cls = str(spec[-1])
        if cls.endswith("Scheduler") or comp == "scheduler":
            if "scheduler_config.json" not in inside:
                need.append(f"{comp}/scheduler_config.json")
        elif "Tokenizer" in cls:
            if not inside:
                need.append(f"{comp}/ (tokenizer files)")
        else:
            if "config.json" not in inside:
                need.append(f"{comp}/config.json")
            if not any(_WEIGHTS.fullmatch(f) for f in inside):
                need.append(f"{comp}/ weights (*.safetensors or *.bin)")
    return need


def _folder_files(folder: Path) -> set[str]:
    out = set()
    for p in folder.rglob("*"):
        if p.is_file() and p.name != RECORD:
            out.add(p.relative_to(folder).as_posix())
            if len(out) > MAX_LISTED:
                break
    return out


def _missing(use: ModelUse, need: list[str], where: str) -> Problem:
    return Problem(f"{use.where} {use.ref!r}", f"{where} lacks what the {use.loader} loader needs: "
                                               f"{', '.join(need)}; point it at a complete copy")


def hf_cache_dir() -> Path:
    env = os.environ
    if env.get("HF_HUB_CACHE"):
        return Path(env["HF_HUB_CACHE"]).expanduser()
    home = env.get("HF_HOME") or Path(env.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "huggingface"
    return Path(home).expanduser() / "hub"


def hf_offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on")


def cached_snapshot(repo: str, first_file: str) -> Path | None:
    """The local HF cache snapshot of `repo` (main) holding `first_file`, or None."""
    from huggingface_hub import try_to_load_from_cache

    try:
        hit = try_to_load_from_cache(repo, first_file, cache_dir=hf_cache_dir())
    except Exception:  # noqa: BLE001 - a malformed repo id is "not cached"; the hub check names it
        return None
    return Path(hit).parent if isinstance(hit, str) else None


def hub_answers(repo: str, timeout: float) -> str | None:
    """None when the hub has `repo`; else why not (one phrase). Never called with HF_HUB_OFFLINE=1."""
    endpoint = os.environ.get("HF_ENDPOINT", "https://huggingface.co").rstrip("/")
    req = urllib.request.Request(f"{endpoint}/api/models/{repo}", method="GET")
    token = os.environ.get("HF_TOKEN") or os.environ.get("HUGGING_FACE_HUB_TOKEN")
    if token:
        req.add_header("Authorization", f"Bearer {token}")
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            r.read(1)
        return None
    except urllib.error.HTTPError as e:
        if e.code in (401, 403):
            return f"the hub at {endpoint} refuses it (HTTP {e.code}: gated or private; set HF_TOKEN)"
        if e.code == 404:
            return f"the hub at {endpoint} has no model {repo!r} (HTTP 404; check the id)"
        return f"the hub at {endpoint} answered HTTP {e.code}"
    except (urllib.error.URLError, OSError, ValueError) as e:
        reason = getattr(e, "reason", e)
        return f"the hub at {endpoint} cannot be reached ({reason}; waited at most {timeout:g}s)"


def hub_repo(use: ModelUse) -> tuple[str | None, str, str | None]:
    """(hub repo, loader for its files, problem) for a hub-style reference."""
    ref = use.ref
    if ref.startswith("open_clip:"):
        import open_clip

        arch, _, tag = ref[len("open_clip:"):].partition("/")
        if arch not in open_clip.list_models():
            return None, "", f"unknown open_clip architecture {arch!r} (see open_clip.list_models())"
        if not tag:
            return None, "", None  # random weights: nothing to load
        cfg = open_clip.get_pretrained_cfg(arch, tag)
        if not cfg:
            tags = ", ".join(t for a, t in open_clip.list_pretrained() if a == arch)
            return None, "", f"open_clip has no pretrained tag {tag!r} for {arch} (known: {tags})"
        hub = (cfg.get("hf_hub") or "").strip("/")
        return ("/".join(hub.split("/")[:2]) or None), "open_clip_weights", None
    if ref.startswith("timm:"):
        import timm

        pc = timm.models.get_pretrained_cfg(ref[len("timm:"):])
        if pc is None:
            return None, "", f"timm has no pretrained model {ref[len('timm:'):]!r}"
        return pc.hf_hub_id or None, "timm", None
    repo = ref.removeprefix("hf-hub:")
    if not re.fullmatch(r"[\w.-]+(/[\w.-]+)?", repo):
        return None, "", ("not a folder, s3:// prefix, tiny: model or hub id (a hub id is `org/name`); "
                          "a folder must exist (absolute, ./relative or file://)")
    return repo, use.loader, None


FIRST_FILE = {"diffusers": "model_index.json", "timm": "config.json", "open_clip": "open_clip_config.json",
              "open_clip_weights": "open_clip_model.safetensors", "cutler": "config.json"}


def check_hub(use: ModelUse, hub_timeout: float) -> tuple[Problem | None, str]:
    repo, loader, bad = hub_repo(use)
    thing = f"{use.where} {use.ref!r}"
    if bad:
        return Problem(thing, bad), ""
    if repo is None:
        return None, f"{thing}: nothing to download"
    snap = cached_snapshot(repo, FIRST_FILE.get(loader, "config.json"))
    if snap is None and loader == "open_clip_weights":
        snap = cached_snapshot(repo, "open_clip_pytorch_model.bin")
    if snap is not None:
        need = loader_files(loader, _folder_files(snap), read=lambda rel: (snap / rel).read_bytes())
        if not need:
            return None, f"{thing}: in the local Hugging Face cache ({snap})"
        partial = f"partly in the local Hugging Face cache ({snap}, lacking {', '.join(need)})"
    else:
        partial = f"not in the local Hugging Face cache ({hf_cache_dir()})"
    if "/" in use.ref and Path(use.ref.split("/")[0]).is_dir():  # `weights/sd` meant as a folder, probably
        partial += f" (read as a hub id; a folder must be written ./{use.ref} or absolute, and must exist)"
    if hf_offline():
        return Problem(thing, f"{partial} and HF_HUB_OFFLINE=1 forbids downloading it: run `hf download {repo}` "
                              f"where the hub is reachable and point HF_HOME at that cache, {MIRROR_HINT}"), ""
    why = hub_answers(repo, hub_timeout)
    if why is None:
        return None, f"{thing}: {partial}; the hub answers, so each node downloads it on first use"
    return Problem(thing, f"{partial}, and {why}: download it where the hub is reachable (`hf download {repo}`) "
                          f"and set HF_HOME, {MIRROR_HINT}"), ""


def s3_client():
    import boto3
    from botocore.config import Config

    cfg = StorageConfig.from_env()
    return boto3.client("s3", endpoint_url=cfg.endpoint_url, region_name=cfg.region or "us-east-1",
                        aws_access_key_id=cfg.access_key, aws_secret_access_key=cfg.secret_key,
                        aws_session_token=cfg.session_token,
                        config=Config(connect_timeout=S3_TIMEOUT, read_timeout=S3_TIMEOUT,
                                      retries={"max_attempts": 2}))


def s3_error(e: Exception) -> str:
    code = getattr(e, "response", {}).get("Error", {}).get("Code") if hasattr(e, "response") else None
    if code in ("NoSuchBucket",):
        return "the bucket does not exist"
    if code in ("AccessDenied", "403", "InvalidAccessKeyId", "SignatureDoesNotMatch", "ExpiredToken"):
        return f"access denied ({code}; check the AWS_* credentials or the instance role's policy)"
    if code:
        return f"S3 error {code}"
    return f"{type(e).__name__}: {e}"


def check_s3_weights(use: ModelUse) -> tuple[Problem | None, str]:
    from ..models.weights import split_s3

    thing = f"{use.where} {use.ref!r}"
    try:
        bucket, prefix = split_s3(use.ref)
        client = s3_client()
        keys: set[str] = set()
        for page in client.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix):
            keys.update(o["Key"][len(prefix):] for o in page.get("Contents", []))
            if len(keys) > MAX_LISTED:
                break
    except Exception as e:  # noqa: BLE001 - any S3/credential/endpoint error is this reference's problem
        return Problem(thing, f"cannot list the prefix: {s3_error(e)}"), ""
    if not keys:
        return Problem(thing, f"no objects under the prefix: upload the model there, {MIRROR_HINT}"), ""
    if MANIFEST not in keys:
        return Problem(thing, f"the prefix holds no {MANIFEST} (each file's sha256, checked on every node): "
                              f"write it with `ovdiff weights mirror` or models.weights.upload_folder"), ""
    try:
        body = client.get_object(Bucket=bucket, Key=prefix + MANIFEST, Range=f"bytes=0-{MAX_MANIFEST_BYTES}")
        listed = json.loads(body["Body"].read())
        if not isinstance(listed, dict):
            raise ValueError("not a JSON object")
    except Exception as e:  # noqa: BLE001
        return Problem(thing, f"{MANIFEST} is unreadable ({e}): mirror the model again"), ""
    absent = sorted(set(listed) - keys)
    if absent:
        return Problem(thing, f"{MANIFEST} lists {len(absent)} file(s) missing from the prefix ({absent[0]}, ...): "
                              "the upload is incomplete; mirror it again"), ""
    def read(rel: str) -> bytes:
        return client.get_object(Bucket=bucket, Key=prefix + rel)["Body"].read(MAX_MANIFEST_BYTES)
    need = loader_files(use.loader, set(listed), read=read)
    if need:
        return _missing(use, need, "the prefix"), ""
    return None, f"{thing}: {len(listed)} files with sha256 in {MANIFEST}"


def check_model(use: ModelUse, hub_timeout: float = HUB_TIMEOUT) -> tuple[Problem | None, str]:
    """One model reference: (problem or None, what was found)."""
    ref, thing = use.ref, f"{use.where} {use.ref!r}"
    if not ref:
        return Problem(use.where, "empty model reference: set it in the recipe"), ""
    if ref.startswith("tiny:"):
        from ..models import tiny

        name = ref[len("tiny:"):]
        kinds = {"sd": "diffusers", "dino": "timm", "clip": "open_clip"}
        if name not in tiny.BUILDERS:
            return Problem(thing, f"unknown tiny model (known: {', '.join('tiny:' + k for k in tiny.BUILDERS)})"), ""
        if kinds.get(name) != use.loader:
            return Problem(thing, f"a {kinds.get(name)} model, but this key needs a {use.loader} one"), ""
        return None, f"{thing}: tiny random model (built on first use)"
    if ref.startswith("s3://"):
        return check_s3_weights(use)
    if use.loader == "cutler" and Path(ref).expanduser().is_file():
        return None, f"{thing}: checkpoint file"
    if is_local_ref(ref):
        path = Path(ref.removeprefix("file://")).expanduser()
        if not path.is_dir():
            return Problem(thing, f"the folder {path} does not exist: fix the path in the recipe, or copy the "
                                  "model there on every node"), ""
        need = loader_files(use.loader, _folder_files(path), read=lambda rel: (path / rel).read_bytes())
        if need:
            return _missing(use, need, f"the folder {path}"), ""
        return None, f"{thing}: folder {path}"
    return check_hub(use, hub_timeout)


def check_models(pf: Preflight, recipe: Recipe, hub_timeout: float = HUB_TIMEOUT) -> None:
    """Every model reference of `recipe`; a reference used twice is checked once."""
    seen: dict[tuple[str, str], Problem | None] = {}
    for use in model_uses(recipe):
        key = (use.ref, use.loader)
        if key in seen:  # the same reference for the same loader (SD's generator and extractor): checked once
            continue
        problem, note = check_model(use, hub_timeout)
        seen[key] = problem
        if problem:
            pf.problems.append(problem)
        elif note:
            pf.notes.append(note)
