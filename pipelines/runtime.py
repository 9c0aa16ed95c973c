"""The Ray runtime shared by `fcclip label`, `fcclip train` and `fcclip eval`.

    started = runtime.init_ray(address=None, num_cpus=None, verbose=False)   # a NEW local Ray, or join a cluster
    gpus = runtime.gpus_per_actor(requested=None)                             # 1 when the cluster has GPUs, else 0
    ...
    runtime.shutdown_ray(started)                                             # only what init_ray started

- Without ``address`` (and without ``RAY_ADDRESS``) a new local Ray is started, always: a bare ``ray.init()`` would
  join whatever cluster ``/tmp/ray/ray_current_cluster`` names (the last ``ray start`` on the machine, possibly
  another user's, possibly dead).
- ``RETRIES`` bounds every retry the jobs ask Ray for (Ray's default for actors is to retry forever).
- Ray's own start-up chatter is kept at ERROR on the driver unless ``verbose``: the token-authentication notice of a
  local cluster, its INFO lines, Ray Data's hint about its progress UI.
"""
from __future__ import annotations

import logging
import os

logger = logging.getLogger(__name__)

RETRIES = 2  # attempts after the first, for a task whose worker died or an actor that died


def init_ray(address: str | None = None, num_cpus: int | None = None, verbose: bool = False,
             log_to_driver: bool = True) -> bool:
    """Start a new local Ray (``address`` None and no ``RAY_ADDRESS``) or join ``address``.

    Returns True when this call started or joined Ray (so the caller shuts it down with ``shutdown_ray``), False
    when Ray was already initialized in this process (a test's cluster, a job's own ``ray.init``), which is used
    as it is.
    """
    import ray

    if ray.is_initialized():
        return False
    address = address or os.environ.get("RAY_ADDRESS") or None
    quiet(verbose)
    if address:
        ray.init(address=address, log_to_driver=log_to_driver, logging_level=logging.INFO if verbose else logging.ERROR)
    else:
        ray.init(
            address="local", num_cpus=num_cpus, include_dashboard=False, log_to_driver=log_to_driver,
            logging_level=logging.INFO if verbose else logging.ERROR,
        )
    return True


def shutdown_ray(started: bool) -> None:
    import ray

    if started and ray.is_initialized():
        ray.shutdown()


def quiet(verbose: bool) -> None:
    """Keep Ray's internals off the user's terminal unless ``verbose``."""
    if verbose:
        return
    for name in ("ray", "ray.data", "ray._private", "ray.util"):
        logging.getLogger(name).setLevel(logging.ERROR)


def cluster_gpus() -> float:
    import ray

    return float(ray.cluster_resources().get("GPU", 0))


def gpus_per_actor(requested: float | None = None) -> float:
    """``requested``, or 1 when the cluster has GPUs, else 0."""
    if requested is not None:
        return float(requested)
    return 1.0 if cluster_gpus() > 0 else 0.0


def device_for(gpus: float) -> str:
    return "cuda" if gpus > 0 else "cpu"
