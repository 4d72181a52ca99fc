"""The cluster a job would run on: asked of Ray (with its autoscaler's limits) only when there is a cluster to ask,
otherwise this machine's resources, which a local Ray would get, counted without starting Ray."""
from __future__ import annotations

import os

from .result import Preflight, Resources


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
