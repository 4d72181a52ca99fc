"""The device the workers will run the models on, decided on the driver from the flags alone (no Ray, no CUDA).

Ray hides the GPUs from an actor that asks for none (`CUDA_VISIBLE_DEVICES=""`), so an actor with 0 GPUs runs its
models on the CPU whatever the machine has. That is right for the toy world and the `tiny:` models, and a mistake
for real ones: the paper recipe in fp32 on the host takes hours per class. So a recipe with real models (any model
reference that is not `tiny:`) on workers with 0 GPUs is refused unless the user says so with `--device cpu`.

`--device`: `auto` (the default) = `cuda` when each worker has GPUs (`--gpus-per-worker` > 0, serve's `--num-gpus`),
else `cpu`; `cuda` with 0 GPUs per worker and `cpu` with GPUs per worker are contradictions and refused too.
"""
from __future__ import annotations

from collections.abc import Iterable

from ..recipe import Recipe
from .models import model_uses
from .result import Preflight

DEVICES = ("auto", "cuda", "cpu")
GPU_ADVICE = "1"  # what the refusal line recommends per worker on a GPU cluster (a fraction may follow: issue 19)


def device_help(what: str = "worker") -> str:
    """`--device`'s help text for a job whose actors are `what`s."""
    return (f"where the {what}s run the models: auto (default: cuda when each {what} has GPUs, else cpu), cuda, or "
            f"cpu (needed to run a recipe with real models on {what}s with no GPU on purpose)")


def real_models(recipe: Recipe) -> list[str]:
    """The recipe's model references that are real weights (not `tiny:`), each once, in recipe order; [] for the
    toy world and the tiny recipe."""
    refs: list[str] = []
    for use in model_uses(recipe):
        if not use.ref.startswith("tiny:") and use.ref not in refs:
            refs.append(use.ref)
    return refs


def _real(recipes: Iterable[Recipe]) -> list[str]:
    real: list[str] = []
    for r in recipes:
        real += [ref for ref in real_models(r) if ref not in real]
    return real


def resolve_device(device: str, gpus_per_worker: float) -> str:
    """`auto` -> `cuda` when each worker has GPUs, else `cpu`; `cuda` and `cpu` as given."""
    if device == "auto":
        return "cuda" if gpus_per_worker > 0 else "cpu"
    return device


def check_device(pf: Preflight, recipes: Iterable[Recipe], device: str, gpus_per_worker: float, *,
                 gpus_flag: str = "--gpus-per-worker", what: str = "worker", device_flag: str = "--device",
                 cost: str = "hours per class for the paper recipe") -> str:
    """Add a problem when the flags contradict each other or would run real models on a CPU by accident; else a
    note naming the device each `what` will use (`--check` prints it); `cost` says what the CPU would cost in the
    refusal. Returns the device the workers get (`cuda` | `cpu`), also when a problem was added."""
    dev = resolve_device(device, gpus_per_worker)
    gpus = f"{gpus_per_worker:g} GPU{'' if gpus_per_worker == 1 else 's'} per {what}"
    if device not in DEVICES:
        pf.add(f"{device_flag} {device}", f"unknown device: choose one of {', '.join(DEVICES)}")
        return "cpu"
    if device == "cuda" and gpus_per_worker <= 0:
        pf.add(f"{device_flag} cuda", f"asks for CUDA but {gpus_flag} is {gpus_per_worker:g}, and Ray hides the GPUs "
                                      f"from a {what} that asks for none: pass {gpus_flag} {GPU_ADVICE} (or a "
                                      f"fraction), or {device_flag} cpu")
        return dev
    if device == "cpu" and gpus_per_worker > 0:
        pf.add(f"{device_flag} cpu", f"with {gpus_flag} {gpus_per_worker:g}: each {what} would hold GPUs it never "
                                     f"uses; pass {gpus_flag} 0 to run on the CPU, or {device_flag} auto")
        return dev
    real = _real(recipes)
    if dev == "cpu" and device == "auto" and real:
        shown = ", ".join(real[:3]) + (f" and {len(real) - 3} more" if len(real) > 3 else "")
        pf.add(f"{gpus_flag} {gpus_per_worker:g}",
               f"the recipe runs real models ({shown}) and each {what} would get no GPU, so they would run on the "
               f"CPU ({cost}): pass {gpus_flag} {GPU_ADVICE} on a GPU cluster, or "
               f"{device_flag} cpu to run them on the CPU on purpose")
        return dev
    kind = "real models" if real else "tiny/toy models only"
    pf.notes.append(f"device: each {what} runs the models on {dev} ({device_flag} {device}, {gpus}; {kind})")
    return dev


def check_cpu_builds(pf: Preflight, recipes: Iterable[Recipe], device: str, gpus_per_worker: float, *,
                     gpus_flag: str, what: str = "class-building worker", device_flag: str = "--device") -> None:
    """Workers that build classes beside a job whose `device` is for something else (serve's `--follow` builds):
    only the accident is refused: real models, 0 GPUs per worker, and no `device_flag cpu`."""
    real = _real(recipes)
    if gpus_per_worker <= 0 and device != "cpu" and real:
        pf.add(f"{gpus_flag} {gpus_per_worker:g}",
               f"the followed banks' recipe runs real models ({', '.join(real[:3])}) and each {what} would get no "
               f"GPU, so new classes would be built on the CPU: pass {gpus_flag} {GPU_ADVICE} on a GPU cluster, or "
               f"{device_flag} cpu to run them on the CPU on purpose")
    elif real or gpus_per_worker > 0:
        dev = "cuda" if gpus_per_worker > 0 else "cpu"
        pf.notes.append(f"device: each {what} runs the models on {dev} ({gpus_flag} {gpus_per_worker:g})")
