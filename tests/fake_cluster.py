"""An autoscaling Ray cluster on this machine, for tests: Ray's fake multi-node provider (the one
``ray.cluster_utils.AutoscalingCluster`` uses) behind a head started by ``ray start --head --autoscaling-config``.

Worker nodes are real raylets that the autoscaler launches and terminates on this machine when demand asks for them;
GPUs are fake resources. ``AutoscalingCluster.start()`` itself runs ``ray stop --force`` (every Ray on the machine),
so the head is started here instead, on free ports, in its own temp dir and process group, with token
authentication (as cluster/ configures real clusters); ``stop()`` ends only this cluster's processes.

    with FakeAutoscalingCluster(node_types={"gpu": {"resources": {"CPU": 1, "GPU": 1}, "max_workers": 2}}) as c:
        subprocess.run([..., "--address", c.address], env=c.env)
"""
from __future__ import annotations

import json
import os
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
from pathlib import Path

from tests.servers import free_port

BIN = Path(sys.executable).parent


class FakeAutoscalingCluster:
    def __init__(self, node_types: dict[str, dict], head_cpus: float = 0, idle_timeout_s: float = 6.0):
        self.port = free_port()
        self.token = secrets.token_hex(32)
        # short: Ray's socket paths must stay under 107 bytes
        self.temp = Path(tempfile.mkdtemp(prefix="fk", dir="/tmp"))
        types = {"ray.head.default": {"resources": {"CPU": head_cpus}, "node_config": {}, "max_workers": 0}}
        for name, spec in node_types.items():
            types[name] = {"resources": dict(spec["resources"]), "node_config": {},
                           "min_workers": spec.get("min_workers", 0), "max_workers": spec.get("max_workers", 1)}
        self.config = {
            "cluster_name": f"fcclip-test-{self.port}",
            "max_workers": sum(t.get("max_workers", 0) for t in types.values()),
            "upscaling_speed": 1.0,
            "idle_timeout_minutes": idle_timeout_s / 60,
            "provider": {"type": "fake_multinode", "gcs_address": f"127.0.0.1:{self.port}",
                         "use_node_id_as_ip": True, "disable_node_updaters": True,
                         "disable_launch_config_check": True},
            "auth": {"ssh_user": "ubuntu"},
            "available_node_types": types,
            "head_node_type": "ray.head.default",
            "file_mounts": {}, "cluster_synced_files": [], "file_mounts_sync_continuously": False,
            "rsync_exclude": [], "rsync_filter": [], "initialization_commands": [], "setup_commands": [],
            "head_setup_commands": [], "worker_setup_commands": [], "head_start_ray_commands": [],
            "worker_start_ray_commands": [],
        }
        self.env = dict(os.environ, RAY_USAGE_STATS_ENABLED="0", RAY_AUTH_MODE="token", RAY_AUTH_TOKEN=self.token,
                        PATH=f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}")
        self.env.pop("RAY_ADDRESS", None)
        self.address = f"127.0.0.1:{self.port}"
        self.proc: subprocess.Popen | None = None

    def start(self, timeout: float = 120) -> "FakeAutoscalingCluster":
        config = self.temp / "autoscaling.json"
        config.write_text(json.dumps(self.config))
        env = dict(self.env, RAY_FAKE_CLUSTER="1")
        self.proc = subprocess.Popen(
            [str(BIN / "ray"), "start", "--head", "--block", f"--port={self.port}", "--node-ip-address=127.0.0.1",
             f"--num-cpus={self.config['available_node_types']['ray.head.default']['resources']['CPU']}",
             "--num-gpus=0", "--include-dashboard=false", f"--autoscaling-config={config}",
             f"--temp-dir={self.temp / 'ray'}", "--disable-usage-stats",
             # fixed default ports another Ray on the machine may hold (the suite runs two test files at a time)
             f"--dashboard-agent-listen-port={free_port()}", f"--ray-client-server-port={free_port()}"],
            env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True,
        )
        # `ray start` prints this line once its node is up (GCS, raylet, the autoscaler's monitor started), then
        # blocks; the thread goes on reading its output, which nobody else reads
        started, output = threading.Event(), []

        def read() -> None:
            for line in self.proc.stdout:
                output.append(line)
                if "Ray runtime started." in line:
                    started.set()
            started.set()

        threading.Thread(target=read, daemon=True).start()
        if not started.wait(timeout) or self.proc.poll() is not None:
            raise RuntimeError(f"the fake cluster's head did not come up within {timeout:.0f} s:\n{''.join(output)}")
        return self

    def processes(self) -> list[int]:
        """This cluster's processes: the head's group, and the worker nodes' raylets and workers (their command
        lines name the head's port or temp dir; a Ray worker renames itself, ``ray::TrainController``, and starts a
        process group of its own, but keeps the environment it was started with, the cluster's token in it)."""
        return [pid for pid in _other_processes() if str(self.temp) in _read(pid, "cmdline")
                or f"127.0.0.1:{self.port}" in _read(pid, "cmdline")
                or f"RAY_AUTH_TOKEN={self.token} " in _read(pid, "environ")]

    def stop(self) -> None:
        if self.proc is not None:
            stop_ray_start(self.proc)
        for pid in self.processes():
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        shutil.rmtree(self.temp, ignore_errors=True)

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc):
        self.stop()


def _other_processes() -> list[int]:
    return [int(e.name) for e in Path("/proc").iterdir() if e.name.isdigit() and int(e.name) != os.getpid()]


def _read(pid: int, what: str) -> str:
    """/proc/PID/cmdline or /proc/PID/environ, its NUL separators as spaces ("" for a process gone or not ours)."""
    try:
        return (Path("/proc") / str(pid) / what).read_bytes().replace(b"\0", b" ").decode("utf-8", "replace") + " "
    except OSError:
        return ""


def stop_ray_start(proc: subprocess.Popen) -> None:
    """End a ``ray start --head --block`` started in a process group of its own, and its node's processes in that
    group: SIGKILL (on SIGTERM it leaves its node's processes running for seconds, and lingers itself for about 30 s).
    Its workers, each in a process group of its own, are the caller's to end."""
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    proc.wait()


def kill_processes_with_token(token: str) -> list[int]:
    """SIGKILL every process whose environment holds ``RAY_AUTH_TOKEN=token`` (a test cluster's own token: its
    raylets, GCS and workers, whatever process group or name they took); returns their ids."""
    pids = [pid for pid in _other_processes() if f"RAY_AUTH_TOKEN={token} " in _read(pid, "environ")]
    for pid in pids:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    return pids
