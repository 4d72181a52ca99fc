"""Preflight: every cheap check a job can make on the driver before Ray starts, as one typed result.

`build_bank`, `label_dataset` and `ovdiff serve` run it first. Each problem is one line that names the thing and
says what to do; a job with problems exits 2 having started and written nothing.

- vocabulary and recipe parse (`vocab_import.read_vocabulary`, `recipe.load_recipe`);
- every model reference of the recipe (`model_uses`): a folder has the files its loader needs (`loader_files`),
  a hub id is in the local Hugging Face cache or the hub answers (`hub_timeout` seconds, never with
  `HF_HUB_OFFLINE=1`), an `s3://` prefix lists and holds `weights.sha256.json` naming those files, a `tiny:` name
  exists;
- the bank location is writable (a temp file created and removed; on S3 one PUT and DELETE of a probe key);
- the cluster has the GPUs and CPUs asked for (`Resources`): asked of Ray (and its autoscaler's limits) only when a
  cluster is there to ask, otherwise this machine's, which a local Ray would get, detected without starting Ray.
"""
from __future__ import annotations

import json
import os
import re
import tempfile
import urllib.error
import urllib.request
import uuid
from dataclasses import dataclass, field
from pathlib import Path

from .models.weights import MANIFEST, RECORD, is_local_ref
from .recipe import Recipe, RecipeError, load_recipe, recipe_from_dict
from .store.fs import Location, StorageConfig, StoreError
from .vocab import VocabError, Vocabulary

HUB_TIMEOUT = float(os.environ.get("OVDIFF_HUB_TIMEOUT", "5"))
S3_TIMEOUT = 5.0
MAX_LISTED = 10_000  # objects listed under one weights prefix
MAX_MANIFEST_BYTES = 1 << 20
MIRROR_HINT = "or mirror it with `ovdiff weights mirror` to a folder or s3:// prefix the workers can read"


@dataclass(frozen=True)
class Problem:
    """One thing that stops the job: `thing` names it, `message` says what is wrong and what to do."""

    thing: str
    message: str

    def line(self) -> str:
        return f"{self.thing}: {self.message}"


@dataclass(frozen=True)
class ModelUse:
    """A model reference and the loader that will read it (`diffusers` | `timm` | `open_clip` | `cutler`)."""

    where: str  # recipe key, e.g. `generation.model`, `extractors[dino].model`
    ref: str
    loader: str


@dataclass(frozen=True)
class Resources:
    """What the Ray a job would use has (or, with an autoscaler, can grow to)."""

    cpus: float
    gpus: float
    node_cpus: float  # the largest node's
    node_gpus: float
    source: str  # e.g. "this machine (a local Ray would start here)"


@dataclass
class Preflight:
    """The result: problems (empty = go), what was found (`notes`, for `--check`), and what was loaded."""

    problems: list[Problem] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    vocab: Vocabulary | None = None
    recipe: Recipe | None = None
    resources: Resources | None = None

    @property
    def ok(self) -> bool:
        return not self.problems

    def add(self, thing: str, message: str) -> None:
        self.problems.append(Problem(thing, message))

    def report(self, prog: str, file) -> None:
        """Print one `PROG: error: ...` line per problem."""
        for p in self.problems:
            print(f"{prog}: error: {p.line()}", file=file)


# ---------------------------------------------------------------------------------------------- inputs

def check_vocab(pf: Preflight, path: str) -> None:
    from .vocab_import import read_vocabulary

    try:
        pf.vocab = read_vocabulary(path)
    except VocabError as e:
        pf.add("--vocab", f"{e} (fix the file, or see bank/vocab/README.md for the formats)")
        return
    stuff = sum(c.kind == "stuff" for c in pf.vocab.classes)
    pf.notes.append(f"vocab {path}: {len(pf.vocab)} classes ({len(pf.vocab) - stuff} thing, {stuff} stuff)")


def check_recipe(pf: Preflight, name_or_path: str | None = None, data: dict | None = None,
                 source: str = "recipe") -> None:
    try:
        pf.recipe = load_recipe(name_or_path) if data is None else recipe_from_dict(data, source)
    except RecipeError as e:
        pf.add("--recipe" if data is None else source, str(e))
        return
    pf.notes.append(f"recipe {pf.recipe.summary()}")


# ---------------------------------------------------------------------------------------------- models

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


def _hub_repo(use: ModelUse) -> tuple[str | None, str, str | None]:
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
    repo, loader, bad = _hub_repo(use)
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


def _s3_client():
    import boto3
    from botocore.config import Config

    cfg = StorageConfig.from_env()
    return boto3.client("s3", endpoint_url=cfg.endpoint_url, region_name=cfg.region or "us-east-1",
                        aws_access_key_id=cfg.access_key, aws_secret_access_key=cfg.secret_key,
                        aws_session_token=cfg.session_token,
                        config=Config(connect_timeout=S3_TIMEOUT, read_timeout=S3_TIMEOUT,
                                      retries={"max_attempts": 2}))


def _s3_error(e: Exception) -> str:
    code = getattr(e, "response", {}).get("Error", {}).get("Code") if hasattr(e, "response") else None
    if code in ("NoSuchBucket",):
        return "the bucket does not exist"
    if code in ("AccessDenied", "403", "InvalidAccessKeyId", "SignatureDoesNotMatch", "ExpiredToken"):
        return f"access denied ({code}; check the AWS_* credentials or the instance role's policy)"
    if code:
        return f"S3 error {code}"
    return f"{type(e).__name__}: {e}"


def check_s3_weights(use: ModelUse) -> tuple[Problem | None, str]:
    from .models.weights import split_s3

    thing = f"{use.where} {use.ref!r}"
    try:
        bucket, prefix = split_s3(use.ref)
        client = _s3_client()
        keys: set[str] = set()
        for page in client.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix):
            keys.update(o["Key"][len(prefix):] for o in page.get("Contents", []))
            if len(keys) > MAX_LISTED:
                break
    except Exception as e:  # noqa: BLE001 - any S3/credential/endpoint error is this reference's problem
        return Problem(thing, f"cannot list the prefix: {_s3_error(e)}"), ""
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
        from .models import tiny

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


# ---------------------------------------------------------------------------------------------- storage

def check_writable(pf: Preflight, uri: str, flag: str = "--out") -> None:
    """The location accepts writes; the probe leaves nothing behind (a local folder that does not exist yet is
    not created: its nearest existing parent is probed)."""
    thing = f"{flag} {uri}"
    try:
        loc = Location(uri)
    except StoreError as e:
        pf.add(flag, str(e))
        return
    if loc.is_s3:
        key = loc.s3_key(f".ovdiff-preflight-{uuid.uuid4().hex}")
        try:
            client = _s3_client()
            client.put_object(Bucket=loc.bucket, Key=key, Body=b"")
            client.delete_object(Bucket=loc.bucket, Key=key)
        except Exception as e:  # noqa: BLE001
            pf.add(thing, f"cannot write there: {_s3_error(e)}; fix the bucket name or the credentials "
                          "(s3:PutObject and s3:DeleteObject are needed), or choose another location")
            return
        pf.notes.append(f"{thing}: writable (S3)")
        return
    path = Path(loc.root)
    if path.exists() and not path.is_dir():
        pf.add(thing, f"{path} is a file, not a folder: choose another location")
        return
    probe_dir = path
    while not probe_dir.exists():
        probe_dir = probe_dir.parent
    if not probe_dir.is_dir():
        pf.add(thing, f"{probe_dir} is a file, so {path} cannot be created: choose another location")
        return
    try:
        fd, tmp = tempfile.mkstemp(dir=probe_dir, prefix=".ovdiff-preflight-")
        os.close(fd)
        os.unlink(tmp)
    except OSError as e:
        pf.add(thing, f"cannot write in {probe_dir} ({e.strerror}): choose a writable location or fix its "
                      "permissions")
        return
    pf.notes.append(f"{thing}: writable" + ("" if probe_dir == path else f" ({path} will be created)"))


def check_bank(pf: Preflight, uri: str, version: int | None = None, flag: str = "--bank") -> dict | None:
    """A committed bank is there and readable; its recipe becomes `pf.recipe`. Returns the manifest."""
    from .store.schema import ManifestError
    from .store.shards import read_manifest

    thing = f"{flag} {uri}"
    try:
        m = read_manifest(Location(uri), version)
    except (StoreError, ManifestError, OSError) as e:
        pf.add(thing, f"cannot read the bank: {e}")
        return None
    except Exception as e:  # noqa: BLE001 - e.g. S3 credentials or endpoint
        pf.add(thing, f"cannot read the bank: {_s3_error(e)}")
        return None
    if m is None:
        pf.add(thing, "no committed bank there (no manifests/latest): build one with build_bank, or fix the URI")
        return None
    pf.notes.append(f"{thing}: bank {m['bank_id']} v{m['version']}, {len(m['classes'])} classes")
    check_recipe(pf, data=m["recipe"], source=f"{thing} (its recipe)")
    return m


# ---------------------------------------------------------------------------------------------- cluster

def local_ray_would_start(address: str | None) -> bool:
    """True when `ray.init(address)` would start a new Ray on this machine (no cluster to connect to)."""
    import ray

    if ray.is_initialized():
        return False
    try:
        from ray._private.services import canonicalize_bootstrap_address

        return canonicalize_bootstrap_address(address) is None
    except Exception:  # noqa: BLE001 - private API moved: fall back to the documented inputs
        return not (address or os.environ.get("RAY_ADDRESS"))


def local_resources() -> Resources:
    """This machine's CPUs and GPUs as a local Ray would count them, without starting Ray."""
    try:
        from ray._private.utils import get_num_cpus

        cpus = float(get_num_cpus())
    except Exception:  # noqa: BLE001
        cpus = float(os.cpu_count() or 1)
    try:
        from ray._private.accelerators import get_accelerator_manager_for_resource

        gpus = float(get_accelerator_manager_for_resource("GPU").get_current_node_num_accelerators())
    except Exception:  # noqa: BLE001
        import torch

        gpus = float(torch.cuda.device_count())
    return Resources(cpus, gpus, cpus, gpus, "this machine (no cluster to connect to: a local Ray would start here)")


def ray_resources() -> Resources:
    """The connected cluster's resources, raised to what its autoscaler may add (`get_max_resources_...`)."""
    import ray

    total = ray.cluster_resources()
    nodes = [n.get("Resources", {}) for n in ray.nodes() if n.get("Alive")]
    cpus, gpus = total.get("CPU", 0.0), total.get("GPU", 0.0)
    ncpu = max((n.get("CPU", 0.0) for n in nodes), default=0.0)
    ngpu = max((n.get("GPU", 0.0) for n in nodes), default=0.0)
    source = "the Ray cluster"
    try:
        from ray._private.state import state

        cfg = state.get_cluster_config()
        most = state.get_max_resources_from_cluster_config()
    except Exception:  # noqa: BLE001 - no autoscaler config reported
        cfg, most = None, None
    if most:
        cpus, gpus = max(cpus, most.get("CPU", 0)), max(gpus, most.get("GPU", 0))
        for g in cfg.node_group_configs:
            ncpu, ngpu = max(ncpu, g.resources.get("CPU", 0)), max(ngpu, g.resources.get("GPU", 0))
        source = "the Ray cluster with its autoscaler's limits"
    return Resources(float(cpus), float(gpus), float(ncpu), float(ngpu), source)


def default_workers(res: Resources, gpus_per_worker: float, cpus_per_worker: float) -> int:
    """Workers when `--workers` is not given: one per `gpus_per_worker` GPUs, else 2 (as many CPUs allow)."""
    if gpus_per_worker > 0:
        return max(1, int(res.gpus // gpus_per_worker))
    return max(1, min(2, int(res.cpus // max(cpus_per_worker, 1e-9))))


def check_resources(pf: Preflight, res: Resources, workers: int, gpus_per_worker: float, cpus_per_worker: float,
                    what: str = "worker", flags: tuple[str, str, str] = ("--workers", "--gpus-per-worker",
                                                                         "--cpus-per-worker")) -> None:
    pf.resources = res
    have = f"{res.source} has {res.cpus:g} CPUs and {res.gpus:g} GPUs"
    w, g, c = flags
    if gpus_per_worker > 0 and res.gpus == 0:
        pf.add(g, f"{gpus_per_worker:g} GPU per {what} asked, but {have}: pass --address of a GPU cluster "
                  f"(or set RAY_ADDRESS), or {g} 0 to run on CPUs")
    elif gpus_per_worker > res.node_gpus:
        pf.add(g, f"{gpus_per_worker:g} GPUs per {what} asked, but no node has more than {res.node_gpus:g}: "
                  f"lower {g}")
    elif workers * gpus_per_worker > res.gpus:
        pf.add(f"{w} {workers}", f"{workers} x {gpus_per_worker:g} GPUs = {workers * gpus_per_worker:g} GPUs asked, "
                                 f"but {have}: lower {w} to {int(res.gpus // gpus_per_worker)} or add GPU nodes")
    if cpus_per_worker > res.node_cpus:
        pf.add(c, f"{cpus_per_worker:g} CPUs per {what} asked, but no node has more than {res.node_cpus:g}: lower {c}")
    elif workers * cpus_per_worker > res.cpus:
        pf.add(f"{w} {workers}", f"{workers} x {cpus_per_worker:g} CPUs = {workers * cpus_per_worker:g} CPUs asked, "
                                 f"but {have}: lower {w} to {max(1, int(res.cpus // cpus_per_worker))} or {c}")
    if pf.ok:
        pf.notes.append(f"cluster: {have}; {workers} {what}(s) x ({cpus_per_worker:g} CPU, {gpus_per_worker:g} GPU)")


# ---------------------------------------------------------------------------------------------- estimate

PAPER_CLASS_SECONDS = 210.0  # OVDIFF.md: sampling one class on one GPU at N=64, 30 steps, 512 px


def gpu_seconds_per_class(recipe: Recipe) -> float | None:
    """Estimated GPU seconds to build one class: the paper's 210 s scaled by N x steps x pixels; None for toy."""
    g = recipe.generation
    if g.generator != "diffusers":
        return None
    return PAPER_CLASS_SECONDS * (g.n_images / 64) * (g.steps / 30) * (g.resolution / 512) ** 2


def human_seconds(s: float) -> str:
    if s < 120:
        return f"{s:.0f} s"
    if s < 7200:
        return f"{s / 60:.0f} min"
    return f"{s / 3600:.1f} h"


# ---------------------------------------------------------------------------------------------- loading jobs

def cluster_resources(pf: Preflight, address: str | None) -> Resources | None:
    """This machine's resources when a local Ray would start, else the cluster's (connecting for the question
    and disconnecting again unless already connected). None, with a problem, when the cluster cannot be reached."""
    if local_ray_would_start(address):
        return local_resources()
    import ray

    connected = ray.is_initialized()
    try:
        if not connected:
            ray.init(address=address, logging_level="WARNING", log_to_driver=False)
        return ray_resources()
    except Exception as e:  # noqa: BLE001 - a wrong address, a cluster that is down, a version mismatch
        pf.add(f"--address {address or os.environ.get('RAY_ADDRESS', 'auto')}",
               f"cannot connect to the Ray cluster ({' '.join(str(e).split())[:300]}): check the address and that "
               "the cluster runs the same Ray version")
        return None
    finally:
        if not connected and ray.is_initialized():
            ray.shutdown()


def preflight_load(banks: list[tuple[str, int | None]], hub_timeout: float = HUB_TIMEOUT) -> Preflight:
    """For jobs that load banks (`label_dataset`, `ovdiff serve`): each bank readable, its recipe's models."""
    pf = Preflight()
    checked: set[str] = set()
    for uri, version in banks:
        sub = Preflight()
        check_bank(sub, uri, version)
        if sub.recipe is not None and sub.recipe.sha256() not in checked:
            checked.add(sub.recipe.sha256())
            check_models(sub, sub.recipe, hub_timeout)
        pf.problems += sub.problems
        pf.notes += sub.notes
        pf.recipe = pf.recipe or sub.recipe
    return pf


def run_for_load(prog: str, banks: list[tuple[str, int | None]], *, address: str | None = None,
                 workers: int | None = None, gpus: float = 0.0, cpus: float = 1.0, what: str = "worker",
                 flags: tuple[str, str, str] = ("--workers", "--gpus-per-worker", "--cpus-per-worker"),
                 file=None) -> int:
    """The preflight of a loading job, as one call at the start of its `main`: the banks and their models, then
    (only when those pass) the cluster for `workers` x (`cpus`, `gpus`); `workers` None = one per `gpus` GPUs, or
    1. Prints one line per problem; returns 2 on problems, else 0."""
    import sys

    out = file or sys.stderr
    pf = preflight_load(banks)
    if pf.ok and (gpus > 0 or workers):
        res = cluster_resources(pf, address)
        if res is not None:
            n = workers or (max(1, int(res.gpus // gpus)) if gpus > 0 else 1)
            check_resources(pf, res, n, gpus, cpus, what, flags)
    if not pf.ok:
        pf.report(prog, out)
        print(f"summary: preflight found {len(pf.problems)} problem(s); nothing was started or written", file=out)
        return 2
    return 0
