"""The Ray runtime shared by `fcclip label`, `fcclip train` and `fcclip eval`.

    started = runtime.init_ray(address=None, num_cpus=None, verbose=False)   # a NEW local Ray, or join a cluster
    try:
        gpus = runtime.resolve_gpus(requested, address)                       # asked for, never read off the cluster
        runtime.wait_for_resources({"GPU": gpus, "CPU": 1}, 1, 600, "model actors")  # granted, or one line
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

import contextlib
import logging
import math
import os
import signal
import socket
import threading
import time

logger = logging.getLogger(__name__)

RETRIES = 2  # attempts after the first, for a task whose worker died or an actor that died


def init_ray(address: str | None = None, num_cpus: int | None = None, verbose: bool = False,
             log_to_driver: bool = True, dashboard: bool = False, tell_workers: bool = False) -> bool:
    """Start a new local Ray (``address`` None and no ``RAY_ADDRESS``) or join ``address``.

    ``tell_workers``: a new local Ray's worker processes get its address as ``RAY_ADDRESS``. Ray's libraries look
    their cluster up from inside its workers (Ray Train's placement-group cleaner asks the state API), and without
    it they find every Ray on the machine and fail with a traceback when another runs beside this one ("Found
    multiple active Ray instances"): two fcclip commands at once on a laptop. It costs about a second at the first
    task (the workers Ray starts ahead have no such environment), so only `fcclip train` asks for it.

    Returns True when this call started or joined Ray (so the caller shuts it down with ``shutdown_ray``), False
    when Ray was already initialized in this process (a test's cluster, a job's own ``ray.init``), which is used
    as it is.
    """
    import ray

    if ray.is_initialized():
        return False
    address = address or os.environ.get("RAY_ADDRESS") or None
    quiet(verbose)
    try:
        if address:
            check_address(address)
            try:
                ray.init(address=address, log_to_driver=log_to_driver,
                         logging_level=logging.INFO if verbose else logging.ERROR)
            except ConnectionError as e:  # not an OSError of storage: the cluster's address or its token
                raise RayUnreachable(
                    f"cannot join the Ray cluster at {address}: {' '.join(str(e).split())[:300]}. Check the address "
                    "(the head's, HOST:6379 by default); a cluster with token authentication needs RAY_AUTH_MODE=token "
                    "and its token (RAY_AUTH_TOKEN or ~/.ray/auth_token) here too") from None
        else:
            options, gcs_port = {}, contextlib.nullcontext()
            if tell_workers:  # the GCS on a port chosen here (Ray reads RAY_GCS_SERVER_PORT), so its address is known
                port = _free_port()
                options["runtime_env"] = {"env_vars": {"RAY_ADDRESS": f"{ray.util.get_node_ip_address()}:{port}"}}
                gcs_port = _environ("RAY_GCS_SERVER_PORT", str(port))
            with gcs_port:
                ray.init(
                    address="local", num_cpus=local_cpus(None, num_cpus), include_dashboard=dashboard,
                    log_to_driver=log_to_driver,
                    logging_level=logging.INFO if verbose else logging.ERROR, **options,
                )
    except SystemExit as e:  # SIGTERM while Ray starts: its own handler, set first thing in ray.init, exits with 15
        if e.code != signal.SIGTERM:
            raise
        _on_sigterm(signal.SIGTERM, None)
    raise_on_sigterm()  # Ray's driver set its own: a C++ stack dump and an abort (exit 134, the local Ray left
    return True  # running) on `ray job stop`


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def _environ(name: str, value: str):
    """``name=value`` in this process's environment (so in the processes it starts meanwhile), then as before."""
    before = os.environ.get(name)
    os.environ[name] = value
    try:
        yield
    finally:
        if before is None:
            os.environ.pop(name, None)
        else:
            os.environ[name] = before


class RayUnreachable(RuntimeError):
    """``--address`` (or RAY_ADDRESS) names a Ray cluster this process cannot join; the message is one line."""


def check_address(address: str | None, timeout_s: float = 10.0) -> None:
    """Refuse in one line a cluster address that ``ray.init`` would answer with a traceback (an HTTP address: the
    dashboard's) or with a wait without end (HOST:PORT where nothing answers). None (a local Ray) passes, as does any
    address where Ray is already initialized in this process (it is used as it is)."""
    import ray

    if not address or ray.is_initialized():
        return
    if address.startswith(("http://", "https://")):
        raise RayUnreachable(
            f"{address} is the address of a cluster's dashboard / Job API; a command joins a cluster at its GCS "
            "address (HOST:6379 by default, or `auto` on one of its nodes). To run the command on the cluster from "
            f"here, submit it: fcclip submit --address {address} -- fcclip ...")
    host, _, port = address.rpartition(":")
    if "://" in address or not host or not port.isdigit():  # `auto`, a ray:// client address: Ray's to resolve
        return
    try:
        socket.create_connection((host.strip("[]"), int(port)), timeout=timeout_s).close()
    except OSError as e:
        raise RayUnreachable(
            f"cannot reach the Ray cluster at {address}: {e.strerror or type(e).__name__} (within {timeout_s:g} s). "
            "Check the address (the head's GCS, HOST:6379 by default) and that the head is up") from None


class Terminated(KeyboardInterrupt):
    """SIGTERM (``ray job stop``, a pod being stopped, ``kill``) outside a job's own stop handling: unwinds the
    command as Ctrl-C does (``finally`` blocks run: locks released, Ray stopped), and the command line says so in one
    line with exit status 128 + 15. Ray turns it into a plain KeyboardInterrupt where it arrives inside one of its
    calls (``ray.wait``, ``ray.get``): :func:`terminated` tells the two apart."""


_sigterm_received = False


def raise_on_sigterm() -> None:
    """Make SIGTERM raise :class:`Terminated` in the main thread (elsewhere, where handlers cannot be set, nothing)."""
    global _sigterm_received
    if threading.current_thread() is threading.main_thread():
        _sigterm_received = False
        signal.signal(signal.SIGTERM, _on_sigterm)


def terminated() -> bool:
    """Whether SIGTERM arrived since :func:`raise_on_sigterm`."""
    return _sigterm_received


def _on_sigterm(signum: int, frame) -> None:
    global _sigterm_received
    _sigterm_received = True
    raise Terminated()


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
    # the autoscaler's event lines ("Tip: use `ray status`", "No available node types can fulfill ..."): the jobs say
    # what they wait for themselves. Ray's switch, RAY_SCHEDULER_EVENTS=0, is read when ray is imported: set here too
    os.environ.setdefault("RAY_SCHEDULER_EVENTS", "0")
    from ray._private import ray_constants

    ray_constants.AUTOSCALER_EVENTS = os.environ["RAY_SCHEDULER_EVENTS"] not in ("", "0")


class StopSignals:
    """Within the block, the first SIGINT (Ctrl-C, sent to the terminal's whole process group) or SIGTERM (``ray job
    stop``, a pod being stopped) is a request to stop: ``received`` names it, and the job's loop ends at its next turn
    and records what is done. A second one quits at once (KeyboardInterrupt, or SystemExit with 128 + the signal).
    Signal handlers can only be set from the main thread: elsewhere the block changes nothing. A signal the process
    ignores stays ignored (a shell starts a background job, ``cmd &``, with SIGINT ignored, so that a Ctrl-C at the
    terminal is not for it)."""

    SIGNALS = (signal.SIGINT, signal.SIGTERM)

    def __init__(self, what: str = "the job", log: logging.Logger = logger):
        self.what = what
        self.log = log
        self.received: signal.Signals | None = None
        self._previous: dict = {}

    def __enter__(self) -> "StopSignals":
        if threading.current_thread() is threading.main_thread():
            self._previous = {s: signal.signal(s, self._on_signal) for s in self.SIGNALS
                              if signal.getsignal(s) is not signal.SIG_IGN}
        return self

    def __exit__(self, *exc) -> None:
        for s, handler in self._previous.items():
            signal.signal(s, handler)
        self._previous = {}

    def _on_signal(self, signum: int, frame) -> None:
        if self.received is not None:  # the second: at once
            self.__exit__()
            if signum == signal.SIGINT:
                raise KeyboardInterrupt
            raise SystemExit(128 + signum)
        self.received = signal.Signals(signum)
        self.log.warning("%s: stopping %s; what is done is kept (%s again to quit at once)", self.received.name,
                         self.what, "Ctrl-C" if signum == signal.SIGINT else "the signal")


GPU_WAIT_S = 600.0
"""How long a job waits for the GPUs it asked for (``--gpu-wait``) before it says so and exits non-zero."""


class ResourcesNotGranted(RuntimeError):
    """The cluster did not grant what a job asked for within the wait; the message is one line for the user."""


def on_cluster(address: str | None) -> bool:
    """Whether the job joins a cluster (``address``, or ``RAY_ADDRESS`` as ``ray job submit`` sets it) rather than
    starting Ray on this machine."""
    return bool(address or os.environ.get("RAY_ADDRESS"))


def default_gpus(address: str | None) -> float:
    """The GPUs per model actor or training worker when none are asked for: 1 on a cluster, whatever it holds at
    this moment (an autoscaling cluster starts without GPU nodes: asking is what makes its autoscaler add them;
    pass 0 for a CPU-only cluster); on this machine, 1 when it has a GPU (:func:`machine_has_gpu`), else 0."""
    if on_cluster(address):
        return 1.0
    return 1.0 if machine_has_gpu() else 0.0


NVIDIA_GPUS = "/proc/driver/nvidia/gpus"  # a folder per GPU, made by the NVIDIA driver (in containers given GPUs too)


def machine_has_gpu() -> bool:
    """Whether this machine has a GPU for the job, without importing torch (1.5 s and ~470 MiB of a driver's
    start-up): an NVIDIA GPU the driver lists, unless CUDA_VISIBLE_DEVICES hides them all; on a machine with AMD's
    ROCm (/dev/kfd), what PyTorch's build can use."""
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    if visible is not None and visible.strip() in ("", "-1"):
        return False
    try:
        if os.listdir(NVIDIA_GPUS):
            return True
    except OSError:
        pass
    if os.path.exists("/dev/kfd"):
        import torch

        return torch.cuda.is_available()
    return False


def resolve_gpus(requested: float | None, address: str | None) -> float:
    """``requested`` when given, else :func:`default_gpus`."""
    return float(requested) if requested is not None else default_gpus(address)


def local_cpus(address: str | None, num_cpus: int | None) -> int | None:
    """The CPUs of the local Ray a job runs on (no ``address``, no RAY_ADDRESS): ``num_cpus`` (``--num-cpus``) when
    given, else this machine's (:func:`machine_cpus`, what :func:`init_ray` starts it with); None for a cluster. Known
    from what the job asked for, never read off the Ray: a local Ray does not grow, a cluster may."""
    if on_cluster(address):
        return None
    return int(num_cpus) if num_cpus else machine_cpus()


def machine_cpus() -> int:
    """This machine's CPUs as Ray counts them for a local Ray: its container's CPU limit where one is set (cgroups),
    else the CPUs this process may run on."""
    try:
        from ray._private.utils import get_num_cpus  # the count Ray itself uses; private: a fallback below

        return max(1, int(get_num_cpus()))
    except (ImportError, AttributeError):
        return max(1, len(os.sched_getaffinity(0)))


def local_actor_cpus(cpus_per_actor: float, max_actors: int, cpus: int | None) -> float:
    """The CPUs each model actor asks for on a local Ray of ``cpus`` CPUs (None: a cluster, ``cpus_per_actor`` as
    given): lowered so that MAX actors leave one CPU for the decode and write tasks, which ask for one each. Without
    it a 1-CPU container, or ``--actors 2`` on 2 cores, waited for ever: the actors held every CPU, idle, and no image
    could be decoded for them. An autoscaling cluster adds CPU nodes for those tasks instead."""
    if cpus is None:
        return cpus_per_actor
    room = max(0.0, cpus - 1.0) / max(1, max_actors)
    return min(cpus_per_actor, math.floor(room * 1e4) / 1e4)  # Ray counts CPUs to 1/10,000


def cpu_model_threads(cpus: int | None, max_actors: int) -> int | None:
    """PyTorch's threads in each model actor that runs the model on CPU. On a local Ray of ``cpus`` CPUs (this
    machine's alone) they are shared among the ``max_actors`` model actors, at least one each: Ray gives an actor
    that asked for one CPU one thread (OMP_NUM_THREADS), and the model, the job's only heavy work, used one core of
    the machine (on 2 cores: 4.2 images/s of fcclip-tiny at 512 px where two threads give 7.7; the decode and write
    tasks take a few percent of one core). On a cluster (None) as many threads as CPUs the actor asked for
    (``--cpus-per-actor``), as Ray sets them: the cores it set aside for the actor on a node it shares."""
    return None if cpus is None else max(1, cpus // max(1, max_actors))


def model_actor_cpus(address: str | None, num_cpus: int | None, gpus: float, cpus_per_actor: float,
                     actors: tuple[int, int]) -> tuple[float, int | None, str]:
    """What each of MIN-MAX ``actors`` model actors asks for beside ``gpus`` GPUs: (CPUs, PyTorch threads on CPU or
    None, the line the job says it with: "model actors: 1-2 on CPU + 0.5 CPU (1 thread each)"). :func:`local_cpus`,
    :func:`local_actor_cpus`, :func:`cpu_model_threads`."""
    cpus = local_cpus(address, num_cpus)
    asked_cpus = local_actor_cpus(cpus_per_actor, actors[1], cpus)
    threads = None if gpus else cpu_model_threads(cpus, actors[1])
    text = (f"model actors: {actors[0]}" + (f"-{actors[1]}" if actors[1] != actors[0] else "")
            + (f" x {gpus:g} GPU" if gpus else " on CPU") + f" + {asked_cpus:g} CPU"
            + (f" ({threads} thread{'s' if threads > 1 else ''} each)" if threads else ""))
    return asked_cpus, threads, text


def use_cpu_threads(device, threads: int | None) -> None:
    """PyTorch's threads, where a model actor's model runs on CPU (``threads`` from :func:`cpu_model_threads`; None:
    as Ray set them). On a GPU nothing changes."""
    if threads and str(getattr(device, "type", device)) == "cpu":
        import torch

        torch.set_num_threads(threads)


def wait_for_resources(bundle: dict[str, float], count: int, timeout_s: float, what: str,
                       stop: "StopSignals | None" = None, flag: str = "--gpus-per-actor",
                       say_every_s: float = 30.0) -> float:
    """Ask the cluster for ``count`` x ``bundle`` (a placement group, which an autoscaler answers by adding nodes)
    and wait until it is granted, saying so every ``say_every_s`` seconds; the group is released at once (the nodes
    stay until their idle timeout, for the job's actors or workers to take). Returns the seconds waited; raises
    ResourcesNotGranted after ``timeout_s`` (its message names ``flag``, the GPUs asked for, to run on CPU instead).
    With ``stop`` (entered by the caller), a stop asked for while waiting ends the wait within a second, the group
    released; the caller finds it in ``stop.received``."""
    import ray
    from ray.util.placement_group import placement_group, remove_placement_group

    bundle = {k: float(v) for k, v in bundle.items() if v}
    started = time.monotonic()
    group = placement_group([dict(bundle) for _ in range(count)], strategy="PACK")
    try:
        granted, ready, deadline, said = group.ready(), [], started + timeout_s, started
        while not ready and time.monotonic() < deadline:
            if stop is not None and stop.received is not None:
                return time.monotonic() - started
            ready, _ = ray.wait([granted], timeout=max(0.0, min(1.0, deadline - time.monotonic())))
            if not ready and time.monotonic() - said >= say_every_s:
                said = time.monotonic()
                logger.info("waiting for the cluster to grant %d x %s: %.0f s of --gpu-wait %g s", count,
                            _bundle_text(bundle), said - started, timeout_s)
    finally:
        remove_placement_group(group)
    if not ready:
        raise ResourcesNotGranted(
            f"asked for {what}; the cluster did not grant {count} x {_bundle_text(bundle)} within {timeout_s:g} s. "
            f"Add such nodes (or let the autoscaler add them), wait longer with --gpu-wait, or pass {flag} 0 to "
            "run on CPU")
    return time.monotonic() - started


def _bundle_text(bundle: dict[str, float]) -> str:
    return "{" + ", ".join(f"{k}: {v:g}" for k, v in bundle.items()) + "}"


def add_gpu_arguments(p, flag: str, who: str, on_cpu: str, wait_for: str) -> None:
    """The GPU request of a job's command line: ``flag`` (GPUs each of ``who`` asks for, default
    :func:`default_gpus`) and ``--gpu-wait`` (how long to wait for ``wait_for``)."""
    from .arguments import number

    p.add_argument(flag, type=number(minimum=0), default=None,
                   help=f"GPUs each {who} asks for: default 1 on a cluster (--address / $RAY_ADDRESS; its autoscaler "
                   f"adds GPU nodes for them), and on this machine 1 if it has a GPU, else 0; 0 {on_cpu}")
    p.add_argument("--gpu-wait", type=number(minimum=0), default=GPU_WAIT_S,
                   help=f"seconds to wait for {wait_for} before exiting with status 1 (default: %(default)g)")


def assigned_gpus() -> list:
    """The GPU ids Ray assigned to the current worker or actor ([] outside Ray or without GPUs)."""
    import ray

    if not ray.is_initialized():
        return []
    return list(ray.get_runtime_context().get_accelerator_ids().get("GPU", []))


def actor_device(device: str = "auto") -> str:
    """The device a model actor builds its model on. ``auto``: inside Ray, the GPU Ray assigned to it (Ray sets
    CUDA_VISIBLE_DEVICES: PyTorch's ``cuda`` is that GPU), else the CPU, whatever else the node holds; outside Ray,
    PyTorch's choice. A GPU assigned that PyTorch cannot use (a CPU-only build of PyTorch, no driver) raises, with
    what to do: the model never runs on the CPU of a node whose GPU it holds."""
    if device != "auto":
        return device
    import ray

    if not ray.is_initialized():
        return "auto"
    gpus = assigned_gpus()
    if not gpus:
        return "cpu"
    import torch

    if not torch.cuda.is_available():
        build = f"built for CUDA {torch.version.cuda}: no NVIDIA driver or device is visible" if torch.version.cuda \
            else "a build without CUDA"
        raise RuntimeError(
            f"Ray assigned GPU {', '.join(map(str, gpus))} to this model actor, but PyTorch {torch.__version__} cannot "
            f"use it ({build}). Install the NVIDIA driver and a CUDA build of PyTorch on the GPU nodes, or pass "
            "--gpus-per-actor 0 to run on CPU")
    return "cuda"


_batch_started: float | None = None  # in a model actor's process: when the running call's current batch started


def mark_batch() -> None:
    """Called by the work running in a model actor as each batch starts (ModelActor.batch_age reads it)."""
    global _batch_started
    _batch_started = time.monotonic()


class ModelStageFailed(RuntimeError):
    """A model actor could not build its model stage (weights that are not a checkpoint, a class name too long for
    the text encoder, ...): the exception's type and message, from ``ModelActor.ready``."""


class ModelActor:
    """The model actor: builds its model stage once (``make_model_stage()``, e.g. the callable that
    ``stages.FCCLIPSegmenter.builder(spec)`` returns), then runs ``work(model_stage, *args)`` on it, call after call. Device work only belongs here: the callers keep decoding and
    encoding in CPU tasks."""

    def __init__(self, make_model_stage):
        self.failed = None
        try:
            self.model_stage = make_model_stage()
        except Exception as e:  # ready() says so to the caller, who decides (not a traceback per actor on its log)
            self.model_stage, self.failed = None, f"{type(e).__name__}: {e}"
            logging.getLogger(__name__).debug("the model stage could not be built", exc_info=True)

    def ready(self) -> str:
        """The model's id once it is loaded (``model_id`` when it has one); ModelStageFailed where it was not."""
        if self.failed is not None:
            raise ModelStageFailed(self.failed)
        return str(getattr(self.model_stage, "model_id", type(self.model_stage).__name__))

    def run(self, work, *args) -> tuple[dict, object]:
        """(info, result): ``info["total_s"]`` is the call's time inside the actor; a dict result's ``model_s`` (the
        time spent inside the model itself) is copied there too. Call with ``num_returns=2`` so that the small info
        can be fetched without the result."""
        from .stages import DeviceLost

        global _batch_started
        started = time.perf_counter()
        _batch_started = time.monotonic()
        try:
            result = work(self.model_stage, *args)
        except DeviceLost as e:  # this process's CUDA context is dead: end it, the caller starts another actor
            logging.getLogger(__name__).error("%s; ending this model actor", e)
            os._exit(70)
        finally:
            _batch_started = None
        info = {"total_s": time.perf_counter() - started}
        if isinstance(result, dict) and "model_s" in result:
            info["model_s"] = result["model_s"]
        return info, result

    def batch_age(self) -> float | None:
        """Seconds since the running call's current batch started (None when idle). Call it in the actor's "probe"
        concurrency group, so that it is answered while ``run`` works (``run`` itself never runs twice at once)."""
        started = _batch_started
        return None if started is None else time.monotonic() - started


def start_model_actor(make_model_stage, *, gpus: float, cpus: float = 1.0):
    """A new ModelActor. Ray never restarts it (``max_restarts=0``, no task retries): a caller whose actor died or hung
    kills it (``ray.kill``) and starts another, counting its own bounded retries (see pipelines/engine.py)."""
    import ray

    cls = ray.remote(concurrency_groups={"probe": 1})(ModelActor)
    return cls.options(num_cpus=cpus, num_gpus=gpus, max_restarts=0, max_task_retries=0).remote(make_model_stage)
