"""On the cluster fcclip is built for: an autoscaling cluster that starts empty (a head without CPUs, a GPU node type
and a CPU node type, both at min_workers 0; Ray's fake multi-node provider, GPUs are fake resources). The jobs ask
for what they need and the autoscaler provides it; nothing is sized from what the cluster holds at start-up.

- `fcclip label --actors 1-2`: the model actors hold GPUs (Ray's assigned ids, recorded by the stand-in model in
  each row), GPU nodes are launched for them, the pool reaches 2 while images wait and its nodes go back after,
  decode tasks run on a CPU node once it joins, every input lands exactly once;
- GPUs asked for and not granted: one line, exit status 1, nothing labeled on CPU instead;
- `fcclip train --num-workers N`: the workers ask for GPUs (N GPUs that the cluster cannot grant are refused the same
  way, before any training starts).

The jobs run as users run them, in their own processes (tests/label_job.py hands the stand-in model and a reader
that logs its node type to `fcclip label`), joining the cluster with --address.
"""
import json
import subprocess
import sys
import time
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from fake_cluster import FakeAutoscalingCluster
from fcclip.datasets.synthetic import write_images

pytestmark = [pytest.mark.ray, pytest.mark.slow]

TESTS = Path(__file__).resolve().parent
ROOT = TESTS.parent


@pytest.fixture(scope="module")
def cluster():
    with FakeAutoscalingCluster({
        "gpu": {"resources": {"CPU": 1, "GPU": 1}, "max_workers": 2},
        "cpu": {"resources": {"CPU": 2}, "max_workers": 1},
    }, idle_timeout_s=6) as c:
        yield c


def _alive_nodes(cluster) -> list[dict]:
    code = ("import json, ray\nray.init(address='%s', logging_level='ERROR', log_to_driver=False)\n"
            "print(json.dumps([n['Resources'] for n in ray.nodes() if n['Alive']]))" % cluster.address)
    proc = subprocess.run([sys.executable, "-c", code], env=cluster.env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def test_label_asks_for_gpus_and_the_pool_scales(cluster, tmp_path):
    images = write_images(tmp_path / "in", count=24, size=(32, 40))
    reads = tmp_path / "reads.log"
    assert not [n for n in _alive_nodes(cluster) if n.get("GPU")], "the cluster must start without GPU nodes"
    # reads of 0.5 s keep decode tasks asking for CPUs: the GPU nodes' one CPU goes to their actor, so the
    # autoscaler adds the CPU node for them
    command = [sys.executable, str(TESTS / "label_job.py"), "--slow-model", "0.5", "--log-reads", str(reads),
               "--read-seconds", "0.5", "--",
               str(tmp_path / "in"), "--out", str(tmp_path / "out"), "--vocab", "thing;", "--address", cluster.address,
               "--actors", "1-2", "--batch-size", "1", "--chunk-size", "2", "--shard-size", "4", "--no-progress",
               "--summary-json", str(tmp_path / "summary.json"), "--gpu-wait", "120"]
    proc = subprocess.run(command, env=cluster.env, capture_output=True, text=True, timeout=600, cwd=tmp_path)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "model actors: 1-2 x 1 GPU + 1 CPU, float32" in proc.stderr, proc.stderr[-3000:]

    summary = json.loads((tmp_path / "summary.json").read_text())
    assert (summary["ok"], summary["failed"]) == (24, 0), summary
    assert summary["model_actors"] == 2, summary  # the pool grew to MAX while images waited

    rows = [r for f in sorted((tmp_path / "out").glob("*.parquet")) for r in pq.read_table(f).to_pylist()]
    assert sorted(r["uri"] for r in rows) == sorted(str(p) for p in images)  # each input exactly once
    models = {r["model"] for r in rows}
    assert models and all(m.startswith("slow-stand-in@gpus=") and not m.endswith("=none") for m in models), models

    kinds = [line.split()[0] for line in reads.read_text().splitlines()]
    assert len(kinds) >= 24 and "cpu" in kinds, kinds  # decoding moved to the CPU node once it joined
    # GPU nodes were launched for the actors, and go back once idle (the autoscaler's idle timeout: 6 s here)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and [n for n in _alive_nodes(cluster) if n.get("GPU")]:
        time.sleep(3)
    assert not [n for n in _alive_nodes(cluster) if n.get("GPU")], "the GPU nodes were not given back"


def test_gpus_not_granted_is_one_line_and_a_failure(cluster, tmp_path):
    write_images(tmp_path / "in", count=2, size=(32, 40))
    command = [sys.executable, str(TESTS / "label_job.py"), "--slow-model", "0", "--", str(tmp_path / "in"),
               "--out", str(tmp_path / "out"), "--vocab", "thing;", "--address", cluster.address,
               "--gpus-per-actor", "4", "--gpu-wait", "5", "--no-progress"]  # no node type has 4 GPUs
    proc = subprocess.run(command, env=cluster.env, capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert proc.returncode == 1, proc.stderr[-3000:]
    errors = [line for line in proc.stderr.splitlines() if line.startswith("fcclip label: error:")]
    assert len(errors) == 1 and "did not grant 1 x {GPU: 4, CPU: 1} within 5 s" in errors[0], proc.stderr[-3000:]
    assert not list((tmp_path / "out").glob("*.parquet"))


def test_train_workers_ask_for_gpus(cluster, tmp_path):
    root = tmp_path / "coco"
    subprocess.run([sys.executable, "-m", "fcclip_pipelines", "synth", "coco-panoptic", "--out", str(root),
                    "--images", "2"], check=True, capture_output=True, timeout=300)
    command = [sys.executable, "-m", "fcclip_pipelines", "train", "--config", "fcclip-tiny-synthetic", "--data",
               str(root), "--storage", str(tmp_path / "runs"), "--address", cluster.address, "--num-workers", "3",
               "--gpu-wait", "5", "--max-iters", "1"]  # 3 GPUs: the node types hold at most 2
    proc = subprocess.run(command, env=cluster.env, capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert proc.returncode == 1, proc.stdout[-2000:] + proc.stderr[-3000:]
    assert "training workers: 3 x 1 GPU + 1 CPU" in proc.stderr, proc.stderr[-3000:]
    errors = [line for line in proc.stderr.splitlines() if line.startswith("fcclip train: error:")]
    assert len(errors) == 1 and "did not grant 3 x {GPU: 1, CPU: 1} within 5 s" in errors[0], proc.stderr[-3000:]
