"""The Ray runtime shared by `fcclip label`, `fcclip train` and `fcclip eval`.

    started = runtime.init_ray(address=None, num_cpus=None, verbose=False)   # a NEW local Ray, or join a cluster
    try:
        gpus = runtime.gpus_per_actor(requested=None)                         # 1 when the cluster has GPUs, else 0
        actor = runtime.start_model_actor(make_model_stage, gpus=gpus, cpus=1.0)  # builds it, once
        model_id = ray.get(actor.ready.remote())
        info_ref, out_ref = actor.run.options(num_returns=2).remote(work, *args)   # work(model_stage, *args)
    finally:
        runtime.shutdown_ray(started)                                         # only what init_ray started

- Without ``address`` (and without ``RAY_ADDRESS``) a new local Ray is started, always: a bare ``ray.init()`` would
  join whatever cluster ``/tmp/ray/ray_current_cluster`` names (the last ``ray start`` on the machine, possibly
  another user's, possibly dead).
- ``RETRIES`` bounds every retry the jobs ask Ray for. Ray's defaults: a task is retried 3 times when its worker
  dies; an actor is never restarted (``max_restarts=0``), and the model actors keep that: the engine replaces a dead
  or hung actor itself, within its own bound.
- Ray's own start-up chatter is kept at ERROR on the driver unless ``verbose``: the token-authentication notice of a
  local cluster, its INFO lines, Ray Data's hint about its progress UI.
"""
from __future__ import annotations

import logging
import os
import time

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


class ModelActor:
    """The model actor: builds its model stage once (``make_model_stage()``, e.g. the callable that
    ``stages.FCCLIPSegmenter.builder(spec)`` returns), then runs ``work(model_stage, *args)`` on it, call after call. Device work only belongs here: the callers keep decoding and
    encoding in CPU tasks."""

    def __init__(self, make_model_stage):
        self.model_stage = make_model_stage()

    def ready(self) -> str:
        """The model's id once it is loaded (``model_id`` when it has one)."""
        return str(getattr(self.model_stage, "model_id", type(self.model_stage).__name__))

    def run(self, work, *args) -> tuple[dict, object]:
        """(info, result): ``info["total_s"]`` is the call's time inside the actor; a dict result's ``model_s`` (the
        time spent inside the model itself) is copied there too. Call with ``num_returns=2`` so that the small info
        can be fetched without the result."""
        started = time.perf_counter()
        result = work(self.model_stage, *args)
        info = {"total_s": time.perf_counter() - started}
        if isinstance(result, dict) and "model_s" in result:
            info["model_s"] = result["model_s"]
        return info, result


def start_model_actor(make_model_stage, *, gpus: float, cpus: float = 1.0):
    """A new ModelActor. Ray never restarts it (``max_restarts=0``, no task retries): a caller whose actor died or hung
    kills it (``ray.kill``) and starts another, counting its own bounded retries (see pipelines/engine.py)."""
    import ray

    cls = ray.remote(ModelActor)
    return cls.options(num_cpus=cpus, num_gpus=gpus, max_restarts=0, max_task_retries=0).remote(make_model_stage)
