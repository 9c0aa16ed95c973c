"""Does the labeling engine keep many GPUs busy? `fcclip label` on a simulated cluster of GPU nodes, with stand-ins
that take a fixed time per image, so that what is measured is the engine's own scheduling.

    python benchmarks/label_scale.py [--actors 16] [--per-image-ms 8] [--images 4000] [--scale 5]
                                     [--node-cpus 8] [--head-cpus 4] [--json PATH]

Each run is a fresh process holding a `ray.cluster_utils.Cluster`: a head (`--head-cpus` CPUs) and `--actors / 4`
nodes of 4 fake GPUs and `--node-cpus` CPUs each (GPUs are resources here, nothing runs on a GPU; on a small machine
fewer CPUs start fewer worker processes). The model stage sleeps `--per-image-ms` per image and returns a
small result (one segment over the whole image); the reader returns the same small PNG (64x64) for every URI, so the
decode tasks cost little. Everything else is the real job: the manifest, decode tasks, the model actors (asking for a
GPU each), mask encoding, fragments and Parquet commits.

Reported, for a run at N and one at scale x N images:
- the models' rows/s in the steady state against the ideal, actors x 1000 / per-image-ms: how busy the engine keeps
  the GPUs. Each stand-in model call notes its start and end (wall clock) in a file of its process; the steady state
  is the window from the call that brings the models' count to 10% of the run's rows to the one that brings it to
  90%. A model that runs one call at a time cannot exceed the ideal this way.
- rows/s written from the moment every model actor had started its first call to the last row: the end-to-end rate
  with start-up left out (the tail, and chunks waiting for their write tasks, are in it).
- rows/s written in the steady state, as the driver counts them (at each chunk's write task), and the driver's CPU per
  1,000 rows in that window (its own process, threads included). Counted at the write end, a window can read more
  than the ideal: chunks the models finished before it, still waiting for their write tasks, land in it (16 cores,
  2026-12-04: 1.33x). (Differences of two runs' wall times, which this script took first, are no measure either
  where the work takes seconds and start-up varies by as much.)
- the driver's peak memory at N and scale x N (flat when nothing in the driver grows with the collection).
"""
from __future__ import annotations

import argparse
import io
import itertools
import json
import os
import resource
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "benchmarks"))

from label_driver import _cpu_flags, _cpu_s, _window, record_chunks, steady  # noqa: E402


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

    def __init__(self, per_image_s: float, log_dir: str | None = None):
        self.per_image_s = per_image_s
        self.log = None if log_dir is None else os.path.join(log_dir, f"{os.getpid()}.txt")

    def __call__(self, images, sizes):
        started = time.time()
        time.sleep(self.per_image_s * len(images))
        if self.log is not None:  # one line per call: start, end (wall clock), images
            with open(self.log, "a") as f:
                f.write(f"{started} {time.time()} {len(images)}\n")
        segment = {"id": 1, "label": "thing", "category_id": 1, "is_thing": True, "score": 0.9}
        return [(np.ones(size, np.uint8), [segment]) for size in sizes]


def child(args) -> int:
    import functools

    import ray
    from ray.cluster_utils import Cluster

    from fcclip_pipelines.label import LabelConfig, run_label

    samples = record_chunks()
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": args.head_cpus, "include_dashboard": False})
    for _ in range(max(1, args.actors // 4)):
        cluster.add_node(num_cpus=args.node_cpus, num_gpus=4)
    cluster.wait_for_nodes()
    ray.init(address=cluster.address, log_to_driver=False, logging_level="ERROR")
    try:
        cfg = LabelConfig(
            source=args.source, dest=args.dest, vocab="thing;", model="fcclip-tiny", weights="random",
            batch_size=args.batch_size, actors=(args.actors, args.actors), gpus_per_actor=1, cpus_per_actor=0.5,
            short_edge=0, shard_size=args.shard_size, chunk_size=args.chunk_size, gpu_wait=120,
        )
        calls = tempfile.mkdtemp(prefix="fcclip-scale-calls-")
        cpu0 = _cpu_s()
        started = time.time()
        summary = run_label(cfg, progress=False, reader=StandInReader(),
                            make_model_stage=functools.partial(TimedModel, args.per_image_ms / 1000, calls))
        wall = time.time() - started
        cpu = _cpu_s() - cpu0
    finally:
        ray.shutdown()
        cluster.shutdown()
    print(json.dumps({"rows": summary.images, "ok": summary.ok, "wall_s": wall, "driver_cpu_s": cpu,
                      "driver_peak_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
                      "startup_s": summary.startup_seconds, "model_actors": summary.model_actors,
                      **steady(samples, summary.images, started), **model_side(calls, samples, started)}))
    shutil.rmtree(calls, ignore_errors=True)
    return 0


def model_side(log_dir: str, samples: list, started: float) -> dict:
    """From the stand-in model's calls (a file per actor process of start, end, images): the models' rows/s between
    the calls that bring their count to 10% and to 90% of the rows, and rows/s written from the moment every actor
    had started its first call to the last row."""
    per_actor = [[tuple(map(float, line.split())) for line in path.read_text().splitlines()]
                 for path in Path(log_dir).glob("*.txt")]
    calls = sorted((end, n) for actor in per_actor for _, end, n in actor)
    if not calls or not samples:
        return {"model_rows_per_s": None, "all_busy_rows_per_s": None, "all_busy_at_s": None}
    ends = list(zip((end for end, _ in calls), itertools.accumulate(n for _, n in calls)))  # (time, images so far)
    total = ends[-1][1]
    window = _window(ends, total, min_steps=1)
    rate = None if window is None else (window[1][1] - window[0][1]) / (window[1][0] - window[0][0])
    all_busy = max(min(start for start, _, _ in actor) for actor in per_actor)
    before = max((rows for t, rows, _ in samples if t <= all_busy), default=0)
    end_rate = None
    if samples[-1][0] > all_busy:
        end_rate = (samples[-1][1] - before) / (samples[-1][0] - all_busy)
    return {"model_rows_per_s": rate, "model_images": int(total), "all_busy_at_s": all_busy - started,
            "all_busy_rows_per_s": end_rate}


def run_once(n: int, tmp: Path, name: str, args) -> dict:
    manifest = tmp / f"{name}.txt"
    manifest.write_text("".join(f"/nonexistent/img_{i:07d}.png\n" for i in range(n)))
    ray_tmp = tempfile.mkdtemp(prefix="fcs", dir="/tmp")
    env = dict(os.environ, RAY_TMPDIR=ray_tmp)
    env.pop("RAY_ADDRESS", None)
    cmd = [sys.executable, __file__, "--child", "--source", str(manifest), "--dest", str(tmp / f"out_{name}"),
           "--actors", str(args.actors), "--per-image-ms", str(args.per_image_ms), "--batch-size",
           str(args.batch_size), "--chunk-size", str(args.chunk_size), "--shard-size", str(args.shard_size),
           "--node-cpus", str(args.node_cpus), "--head-cpus", str(args.head_cpus)]
    # in a session of its own, which is ended after it, also when this process is stopped (SIGTERM, e.g. timeout):
    # the child's simulated cluster (raylets, workers, actors) must not go on loading the machine
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, cwd=REPO,
                            start_new_session=True)
    try:
        stdout, stderr = proc.communicate()
    finally:
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        proc.wait()
        shutil.rmtree(ray_tmp, ignore_errors=True)
    if proc.returncode != 0:
        raise RuntimeError(f"the run failed:\n{stdout[-3000:]}\n{stderr[-3000:]}")
    return json.loads(stdout.strip().splitlines()[-1])


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--actors", type=int, default=16, help="simulated GPU model actors (4 per fake node)")
    p.add_argument("--per-image-ms", type=float, default=8.0)
    p.add_argument("--images", type=int, default=4000, help="N (the second run has scale x N)")
    p.add_argument("--scale", type=int, default=5)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--chunk-size", type=int, default=128)
    p.add_argument("--shard-size", type=int, default=1000)
    p.add_argument("--node-cpus", type=int, default=8, help="CPUs each fake node of 4 GPUs offers (its 4 model actors "
                   "take 0.5 each; the rest run decode and write tasks); fewer start fewer worker "
                   "processes on a small machine")
    p.add_argument("--head-cpus", type=int, default=4, help="CPUs the head node offers (the driver's node)")
    p.add_argument("--json", default=None)
    p.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--source", help=argparse.SUPPRESS)
    p.add_argument("--dest", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.child:
        return child(args)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # so that run_once ends the child's session
    with tempfile.TemporaryDirectory(prefix="fcclip-scale-") as tmp:
        runs = {name: run_once(n, Path(tmp), name, args)
                for name, n in (("N", args.images), (f"{args.scale}N", args.images * args.scale))}
    small, big = runs["N"], runs[f"{args.scale}N"]
    ideal = args.actors * 1000 / args.per_image_ms
    print(f"# label scale: {args.actors} simulated GPU actors, {args.per_image_ms:g} ms per image, batch "
          f"{args.batch_size}, chunk {args.chunk_size}, shard {args.shard_size}; {os.cpu_count()} cores, {_cpu_flags()}")
    print()
    print("| run | rows | wall s | every actor busy at s | first rows at s | models' rows/s (10-90%) | of the ideal | "
          "rows/s, every actor busy to last row | of the ideal | rows/s written (10-90%) | driver CPU s / 1,000 rows "
          "(that window) | same, whole run | driver peak MiB | model actors |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|---|")

    def rate(x):
        return ("-", "-") if x is None else (f"{x:.0f}", f"{x / ideal:.2f}x")

    for name, r in runs.items():
        cpu = r["steady_cpu_s_per_1000"]
        first = "-" if r["all_busy_at_s"] is None else f"{r['all_busy_at_s']:.1f}"
        print(f"| {name} | {r['rows']} | {r['wall_s']:.1f} | {first} | {r['startup_s']:.1f} | "
              f"{' | '.join(rate(r['model_rows_per_s']))} | {' | '.join(rate(r['all_busy_rows_per_s']))} | "
              f"{rate(r['steady_rows_per_s'])[0]} | {'-' if cpu is None else f'{cpu:.3f}'} | "
              f"{1000 * r['driver_cpu_s'] / max(r['rows'], 1):.3f} | {r['driver_peak_mib']:.0f} | "
              f"{r['model_actors']} |")
    print()
    model, cpu = big["model_rows_per_s"], big["steady_cpu_s_per_1000"]
    if model is not None:
        print(f"{args.scale}N run: the models labeled {model:.0f} rows/s in the steady state, of an ideal {ideal:.0f} "
              f"({model / ideal:.2f}x); {rate(big['all_busy_rows_per_s'])[0]} rows/s from every actor busy to the last "
              f"row ({rate(big['all_busy_rows_per_s'])[1]}); driver CPU "
              f"{'-' if cpu is None else f'{cpu:.3f}'} s per 1,000 rows; driver peak "
              f"{small['driver_peak_mib']:.0f} -> {big['driver_peak_mib']:.0f} MiB")
    if args.json:
        Path(args.json).write_text(json.dumps({"model_rows_per_s": model, "ideal_rows_per_s": ideal,
                                               "all_busy_rows_per_s": big["all_busy_rows_per_s"],
                                               "driver_cpu_s_per_1000_rows": cpu, "runs": runs,
                                               "args": vars(args)}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
