"""Does the labeling engine keep many GPUs busy? `fcclip label` on a simulated cluster of GPU nodes, with stand-ins
that take a fixed time per image, so that what is measured is the engine's own scheduling.

    python benchmarks/label_scale.py [--actors 16] [--per-image-ms 8] [--images 4000] [--scale 5] [--json PATH]

Each run is a fresh process holding a `ray.cluster_utils.Cluster`: a head and `--actors / 4` nodes of 4 fake GPUs
each (GPUs are resources here, nothing runs on a GPU). The model stage sleeps `--per-image-ms` per image and returns a
small result (one segment over the whole image); the reader returns the same small PNG (64x64) for every URI, so the
decode tasks cost little. Everything else is the real job: the manifest, decode tasks, the model actors (asking for a
GPU each), mask encoding, fragments and Parquet commits.

Reported, from a run at N and one at scale x N images (start-up cancels out in the differences):
- rows/s in the steady state against the ideal, actors x 1000 / per-image-ms;
- the driver's CPU per 1,000 rows (its own process, threads included);
- the driver's peak memory at N and scale x N (flat when nothing in the driver grows with the collection).
"""
from __future__ import annotations

import argparse
import io
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "benchmarks"))

from label_driver import _cpu_flags  # noqa: E402


def _png() -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 255, (64, 64, 3), dtype=np.uint8)).save(buf, format="PNG")
    return buf.getvalue()


class StandInReader:
    """URI -> the same small PNG (the URIs name no real files)."""

    def __init__(self):
        self.data = _png()

    def __call__(self, uri: str) -> bytes:
        return self.data


class TimedModel:
    """A model stage that takes a fixed time per image and returns one segment covering it."""

    model_id = "timed-stand-in@none"

    def __init__(self, per_image_s: float):
        self.per_image_s = per_image_s

    def __call__(self, images, sizes):
        time.sleep(self.per_image_s * len(images))
        segment = {"id": 1, "label": "thing", "category_id": 1, "is_thing": True, "score": 0.9}
        return [(np.ones(size, np.uint8), [segment]) for size in sizes]


def child(args) -> int:
    import functools

    import ray
    from ray.cluster_utils import Cluster

    from fcclip_pipelines.label import LabelConfig, run_label

    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 4, "include_dashboard": False})
    for _ in range(max(1, args.actors // 4)):
        cluster.add_node(num_cpus=8, num_gpus=4)
    cluster.wait_for_nodes()
    ray.init(address=cluster.address, log_to_driver=False, logging_level="ERROR")
    try:
        cfg = LabelConfig(
            source=args.source, dest=args.dest, vocab="thing;", model="fcclip-tiny", weights="random",
            batch_size=args.batch_size, actors=(args.actors, args.actors), gpus_per_actor=1, cpus_per_actor=0.5,
            short_edge=0, shard_size=args.shard_size, chunk_size=args.chunk_size, gpu_wait=120,
        )
        cpu0 = _cpu_s()
        started = time.perf_counter()
        summary = run_label(cfg, progress=False, reader=StandInReader(),
                            make_model_stage=functools.partial(TimedModel, args.per_image_ms / 1000))
        wall = time.perf_counter() - started
        cpu = _cpu_s() - cpu0
    finally:
        ray.shutdown()
        cluster.shutdown()
    print(json.dumps({"rows": summary.images, "ok": summary.ok, "wall_s": wall, "driver_cpu_s": cpu,
                      "driver_peak_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
                      "startup_s": summary.startup_seconds, "model_actors": summary.model_actors}))
    return 0


def _cpu_s() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def run_once(n: int, tmp: Path, name: str, args) -> dict:
    manifest = tmp / f"{name}.txt"
    manifest.write_text("".join(f"/nonexistent/img_{i:07d}.png\n" for i in range(n)))
    ray_tmp = tempfile.mkdtemp(prefix="fcs", dir="/tmp")
    env = dict(os.environ, RAY_TMPDIR=ray_tmp)
    env.pop("RAY_ADDRESS", None)
    cmd = [sys.executable, __file__, "--child", "--source", str(manifest), "--dest", str(tmp / f"out_{name}"),
           "--actors", str(args.actors), "--per-image-ms", str(args.per_image_ms), "--batch-size",
           str(args.batch_size), "--chunk-size", str(args.chunk_size), "--shard-size", str(args.shard_size)]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=REPO, start_new_session=True)
    shutil.rmtree(ray_tmp, ignore_errors=True)
    if proc.returncode != 0:
        raise RuntimeError(f"the run failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--actors", type=int, default=16, help="simulated GPU model actors (4 per fake node)")
    p.add_argument("--per-image-ms", type=float, default=8.0)
    p.add_argument("--images", type=int, default=4000, help="N (the second run has scale x N)")
    p.add_argument("--scale", type=int, default=5)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--chunk-size", type=int, default=128)
    p.add_argument("--shard-size", type=int, default=1000)
    p.add_argument("--json", default=None)
    p.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--source", help=argparse.SUPPRESS)
    p.add_argument("--dest", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.child:
        return child(args)
    with tempfile.TemporaryDirectory(prefix="fcclip-scale-") as tmp:
        runs = {name: run_once(n, Path(tmp), name, args)
                for name, n in (("N", args.images), (f"{args.scale}N", args.images * args.scale))}
    small, big = runs["N"], runs[f"{args.scale}N"]
    extra = big["rows"] - small["rows"]
    rows_per_s = extra / max(big["wall_s"] - small["wall_s"], 1e-9)
    ideal = args.actors * 1000 / args.per_image_ms
    cpu_per_1000 = 1000 * (big["driver_cpu_s"] - small["driver_cpu_s"]) / extra
    print(f"# label scale: {args.actors} simulated GPU actors, {args.per_image_ms:g} ms per image, batch "
          f"{args.batch_size}, chunk {args.chunk_size}, shard {args.shard_size}; {os.cpu_count()} cores, {_cpu_flags()}")
    print()
    print("| run | rows | wall s | start-up s | driver CPU s | driver peak MiB | model actors |")
    print("|---|---|---|---|---|---|---|")
    for name, r in runs.items():
        print(f"| {name} | {r['rows']} | {r['wall_s']:.1f} | {r['startup_s']:.1f} | {r['driver_cpu_s']:.2f} | "
              f"{r['driver_peak_mib']:.0f} | {r['model_actors']} |")
    print()
    print(f"steady state: {rows_per_s:.0f} rows/s of an ideal {ideal:.0f} ({rows_per_s / ideal:.2f}x); driver CPU "
          f"{cpu_per_1000:.3f} s per 1,000 rows; driver peak {small['driver_peak_mib']:.0f} -> "
          f"{big['driver_peak_mib']:.0f} MiB")
    if args.json:
        Path(args.json).write_text(json.dumps({"rows_per_s": rows_per_s, "ideal_rows_per_s": ideal,
                                               "driver_cpu_s_per_1000_rows": cpu_per_1000, "runs": runs,
                                               "args": vars(args)}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
