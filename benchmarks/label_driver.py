"""What the labeling driver costs per row: the real `fcclip label` pipeline with a stand-in model that costs nothing.

    python benchmarks/label_driver.py [--images 200] [--scale 10] [--num-cpus 2] [--chunk-size 128] [--json PATH]

The stand-in model stage (handed to ``run_label`` through its ``make_model_stage`` argument, the seam tests use too)
returns a realistic result per image, one of 16 made in advance and chosen by the image's content: an 800x1200
segment map with 10 to 40 irregular segments (COCO RLE of 10-40 KiB per row), so that rows differ from image to image.
The inputs are 16 different 800x1200 JPEGs (a colour and a pattern each), copied round-robin, at their own size
(``--short-edge 0``). Everything else is the real job: listing, decode tasks, the model actor, mask encoding, Parquet
commits.

Each run is a fresh process (its own local Ray) at N and at scale x N images. Reported:
- rows/s: the steady rate, (10N - N) rows over the difference of the two runs' wall times (start-up cancels out);
- driver CPU s per 1,000 rows: the driver process's own CPU time (user + system, its threads included; not the
  Ray workers, not the raylet) while labeling, as the difference between the two runs per 1,000 extra rows; beside
  it the part left once an idle driver's CPU (Ray's own threads, measured for 10 s before each run: it grows with
  time, not rows) is taken out;
- the same driver CPU measured inside the 10N run alone: between the chunks that bring its rows to 10% and to 90%
  (the driver notes the time and its CPU as it counts each chunk's rows; idle cost included), as label_scale.py does;
- driver and worker peak memory (VmHWM) in each run: flat from N to 10N when nothing grows with the collection;
- the model actor's time per image outside the model stage's call (unpacking inputs, packing outputs), from the
  actor's own clock, when the engine reports it.
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

HEIGHT, WIDTH, SEGMENTS = 800, 1200, 30


def standin_result(height: int = HEIGHT, width: int = WIDTH, count: int = SEGMENTS, seed: int = 0):
    """A fixed panoptic result: ``count`` segments with irregular borders (nearest of ``count`` random centres under
    a wavy distortion), as (segment_map, segments)."""
    rng = np.random.default_rng(seed)
    centres = rng.uniform((0, 0), (height, width), size=(count, 2))
    ys, xs = np.mgrid[0:height, 0:width].astype(np.float32)
    ys = ys + 25 * np.sin(xs / 23.0) + 10 * np.cos(xs / 7.0)
    xs = xs + 25 * np.cos(ys / 31.0) + 10 * np.sin(ys / 5.0)
    best = np.full((height, width), np.inf, np.float32)
    segment_map = np.zeros((height, width), np.uint8)
    for i, (cy, cx) in enumerate(centres):
        d = (ys - cy) ** 2 + (xs - cx) ** 2
        closer = d < best
        best[closer] = d[closer]
        segment_map[closer] = i + 1
    segments = [
        {"id": i + 1, "label": f"class{i % 7}", "category_id": i % 7 + 1, "is_thing": bool(i % 2), "score": 0.5}
        for i in range(count)
    ]
    return segment_map, segments


VARIANTS = 16


class StandInModel:
    """A model stage that costs next to nothing: one of VARIANTS results made in advance (10 to 40 segments), chosen
    by the image's top-left pixel (the inputs' variant), at the image's own size when that is 800x1200."""

    model_id = "stand-in@none"

    def __init__(self):
        self.results = [standin_result(count=10 + 2 * v, seed=v) for v in range(VARIANTS)]

    def __call__(self, images, sizes):
        out = []
        for image, size in zip(images, sizes):  # a map of its own per image, as a real model returns (shipped)
            segment_map, segments = self.results[int(image[0, 0, 0]) // 10 % VARIANTS]
            fits = tuple(size) == segment_map.shape
            out.append((segment_map.copy() if fits else np.zeros(size, np.uint8), segments if fits else []))
        return out


def write_inputs(folder: Path, n: int) -> None:
    """``n`` JPEGs: VARIANTS different ones (the top-left pixel's red value, 10 * variant + 5, names the variant; a
    pattern of stripes each), copied round-robin."""
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    ys, xs = np.mgrid[0:HEIGHT, 0:WIDTH]
    for v in range(min(n, VARIANTS)):
        pixels = np.empty((HEIGHT, WIDTH, 3), np.uint8)
        pixels[..., 0] = 10 * v + 5
        pixels[..., 1] = (((xs + v * 37) // (20 + 3 * v)) % 2) * 120 + 60
        pixels[..., 2] = (((ys + xs * v) // 50) % 3) * 60 + 40
        pixels[:16, :16, 0] = 10 * v + 5  # a flat corner: JPEG keeps the variant's value there
        Image.fromarray(pixels).save(folder / f"img_{v:06d}.jpg", quality=95)
    for i in range(VARIANTS, n):
        shutil.copyfile(folder / f"img_{i % VARIANTS:06d}.jpg", folder / f"img_{i:06d}.jpg")


# ------------------------------------------------------------------------------------------------ the driver
def child(args) -> int:
    """One labeling run in this process (the driver); prints its own measurements as JSON on the last line."""
    from fcclip_pipelines.label import LabelConfig, run_label

    samples = record_chunks()
    cfg = LabelConfig(
        source=args.source, dest=args.dest, vocab="cat; dog", model="fcclip-tiny", weights="random",
        batch_size=args.batch_size, short_edge=0, shard_size=args.shard_size, num_cpus=args.num_cpus,
        chunk_size=args.chunk_size,
    )
    from fcclip_pipelines import runtime

    started_ray = runtime.init_ray(num_cpus=args.num_cpus)  # here, so that its start-up is not in the figures
    idle = _cpu_s()
    time.sleep(IDLE_S)  # what the driver costs doing nothing (Ray's own threads): it scales with time, not rows
    idle_cpu_per_s = (_cpu_s() - idle) / IDLE_S
    started, started_wall = time.perf_counter(), time.time()
    cpu0 = _cpu_s()
    summary = run_label(cfg, progress=False, make_model_stage=StandInModel)
    cpu1 = _cpu_s()
    wall = time.perf_counter() - started
    runtime.shutdown_ray(started_ray)
    result = {
        "rows": summary.images,
        "ok": summary.ok,
        "wall_s": wall,
        "driver_cpu_s": cpu1 - cpu0,
        "driver_idle_cpu_s_per_s": idle_cpu_per_s,
        "driver_peak_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "startup_s": summary.startup_seconds,
    }
    result.update(steady(samples, summary.images, started_wall))
    for key in ("actor_overhead_s_per_image",):
        value = getattr(summary, key, None)
        if value is not None:
            result[key] = value
    print(json.dumps(result))
    return 0


IDLE_S = 10.0


def record_chunks() -> list:
    """(wall-clock seconds, rows labeled so far, the driver's CPU s), appended each time the driver counts a chunk's
    rows: through the progress hook run_label builds (``fcclip_pipelines.label.JobProgress``), replaced here."""
    import fcclip_pipelines.label as label

    samples: list = []

    class Recording(label.JobProgress):
        def labeled(self, ok: int, failed: int) -> None:
            super().labeled(ok, failed)
            samples.append((time.time(), (samples[-1][1] if samples else 0) + ok + failed, _cpu_s()))

    label.JobProgress = Recording
    return samples


def steady(samples: list, rows: int, started: float) -> dict:
    """Rows/s and driver CPU per 1,000 rows between the samples where 10% and 90% of ``rows`` were labeled."""
    window = _window(samples, rows, min_steps=4)
    if window is None:  # too few chunks between for a rate
        return {"steady_rows_per_s": None, "steady_cpu_s_per_1000": None, "window_s": None, "window_rows": 0}
    first, last = window
    n = last[1] - first[1]
    return {"steady_rows_per_s": n / (last[0] - first[0]), "steady_cpu_s_per_1000": 1000 * (last[2] - first[2]) / n,
            "window_s": [first[0] - started, last[0] - started], "window_rows": n}


def _window(series: list, total: float, min_steps: int) -> tuple | None:
    """The entries of ``series`` ((time, count so far, ...), in time order) where the count first reaches 10% and
    90% of ``total``; None when they are fewer than ``min_steps`` entries apart or at the same time."""
    first = next((i for i, s in enumerate(series) if s[1] >= 0.1 * total), None)
    last = next((i for i, s in enumerate(series) if s[1] >= 0.9 * total), None)
    if first is None or last is None or last - first < min_steps or series[last][0] <= series[first][0]:
        return None
    return series[first], series[last]


def _cpu_s() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def _descendants(pid: int) -> list[int]:
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as f:
                    ppid = int(f.read().rsplit(")", 1)[1].split()[1])
            except (OSError, ValueError, IndexError):
                continue
            children.setdefault(ppid, []).append(int(entry))
    out, stack = [], [pid]
    while stack:
        for c in children.get(stack.pop(), []):
            out.append(c)
            stack.append(c)
    return out


def _status(pid: int) -> tuple[str, int]:
    name, hwm = "", 0
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("Name:"):
                    name = line.split()[1]
                elif line.startswith("VmHWM:"):
                    hwm = int(line.split()[1])
    except OSError:
        pass
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            cmd = f.read().split(b"\0")[0].decode(errors="replace")
    except OSError:
        cmd = ""
    return cmd or name, hwm


def run_once(folder: Path, dest: Path, args) -> dict:
    ray_tmp = tempfile.mkdtemp(prefix="fcb", dir="/tmp")
    env = dict(os.environ, RAY_TMPDIR=ray_tmp)
    env.pop("RAY_ADDRESS", None)
    cmd = [sys.executable, __file__, "--child", "--source", str(folder), "--dest", str(dest),
           "--num-cpus", str(args.num_cpus), "--batch-size", str(args.batch_size), "--shard-size", str(args.shard_size),
           "--chunk-size", str(args.chunk_size)]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env, cwd=REPO,
                            start_new_session=True)
    peaks: dict[int, tuple[str, int]] = {}
    done = threading.Event()

    def watch():
        while not done.is_set():
            for pid in _descendants(proc.pid):
                cmd, hwm = _status(pid)
                if hwm > peaks.get(pid, ("", 0))[1]:
                    peaks[pid] = (cmd, hwm)
            time.sleep(0.25)

    watcher = threading.Thread(target=watch, daemon=True)
    watcher.start()
    try:
        output, _ = proc.communicate()
    finally:
        done.set()
        watcher.join()
        try:
            os.killpg(proc.pid, 9)  # what is left of its local Ray
        except ProcessLookupError:
            pass
        shutil.rmtree(ray_tmp, ignore_errors=True)
    if proc.returncode != 0:
        raise RuntimeError(f"the labeling run failed:\n{output[-4000:]}")
    result = json.loads(output.strip().splitlines()[-1])
    workers = [kib for cmd, kib in peaks.values() if cmd.startswith("ray::")]
    result["worker_peak_mib_max"] = max(workers, default=0) / 1024
    result["workers"] = len(workers)
    return result


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--images", type=int, default=200, help="N (the second run has scale x N)")
    p.add_argument("--scale", type=int, default=10)
    p.add_argument("--num-cpus", type=int, default=os.cpu_count() or 2, help="CPUs of each run's local Ray")
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--shard-size", type=int, default=1000, help="fcclip label's default")
    p.add_argument("--chunk-size", type=int, default=128,
                   help="images per task and model call (fcclip label's default)")
    p.add_argument("--json", default=None, help="also write the figures here")
    p.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--source", help=argparse.SUPPRESS)
    p.add_argument("--dest", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.child:
        return child(args)

    runs = {}
    with tempfile.TemporaryDirectory(prefix="fcclip-driver-") as tmp:
        tmp = Path(tmp)
        for name, n in (("N", args.images), (f"{args.scale}N", args.images * args.scale)):
            write_inputs(tmp / f"in_{name}", n)
            runs[name] = run_once(tmp / f"in_{name}", tmp / f"out_{name}", args)
            shutil.rmtree(tmp / f"in_{name}")
    small, big = runs["N"], runs[f"{args.scale}N"]
    extra = big["rows"] - small["rows"]
    extra_wall = max(big["wall_s"] - small["wall_s"], 1e-9)
    rows_per_s = extra / extra_wall
    cpu_per_1000 = 1000 * (big["driver_cpu_s"] - small["driver_cpu_s"]) / extra
    idle_rate = (small["driver_idle_cpu_s_per_s"] + big["driver_idle_cpu_s_per_s"]) / 2
    net_per_1000 = cpu_per_1000 - 1000 * idle_rate * extra_wall / extra
    flags = _cpu_flags()
    print(f"# label driver: stand-in model ({HEIGHT}x{WIDTH}, {VARIANTS} results of 10-40 segments), batch {args.batch_size}, "
          f"shard size {args.shard_size}, chunk size {args.chunk_size}, local Ray with {args.num_cpus} CPUs; "
          f"{os.cpu_count()} cores, {flags}")
    print()
    print("| run | rows | wall s | driver CPU s | driver CPU s / 1,000 rows (whole run) | driver peak MiB | "
          "worker peak MiB (max, n) | actor s / image outside the model |")
    print("|---|---|---|---|---|---|---|---|")
    for name, r in runs.items():
        outside = r.get("actor_overhead_s_per_image")
        print(f"| {name} | {r['rows']} | {r['wall_s']:.1f} | {r['driver_cpu_s']:.2f} | "
              f"{1000 * r['driver_cpu_s'] / r['rows']:.3f} | {r['driver_peak_mib']:.0f} | "
              f"{r['worker_peak_mib_max']:.0f}, {r['workers']} | {'-' if outside is None else f'{outside:.4f}'} |")
    print()
    print(f"steady state (N -> {args.scale}N): {rows_per_s:.1f} rows/s, "
          f"driver CPU {cpu_per_1000:.3f} s per 1,000 rows; "
          f"an idle driver costs {idle_rate:.4f} CPU s per s, so {net_per_1000:.3f} s per 1,000 rows are the rows' own")
    window = big.get("steady_cpu_s_per_1000")
    if window is not None:
        print(f"{args.scale}N run between 10% and 90% of its rows: {big['steady_rows_per_s']:.1f} rows/s, driver CPU "
              f"{window:.3f} s per 1,000 rows (first rows at {big['startup_s']:.1f} s of {big['wall_s']:.1f})")
        if big["steady_rows_per_s"] > 2 * rows_per_s:
            print(f"  not a steady state: the window's rows came {big['steady_rows_per_s'] / rows_per_s:.1f}x faster "
                  "than the run labeled them, in a burst (rows written late, e.g. write tasks waiting for a CPU)")
    if args.json:
        Path(args.json).write_text(json.dumps(
            {"rows_per_s": rows_per_s, "driver_cpu_s_per_1000_rows": cpu_per_1000,
             "window_driver_cpu_s_per_1000_rows": window,
             "driver_idle_cpu_s_per_s": idle_rate, "driver_cpu_s_per_1000_rows_net_of_idle": net_per_1000, "runs": runs,
             "args": {k: v for k, v in vars(args).items() if k not in ("child", "source", "dest")}}, indent=1))
    return 0


def _cpu_flags() -> str:
    """The CPU model and its vector flags (the figures depend on them)."""
    model, flags = "", []
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name") and not model:
                    model = line.split(":", 1)[1].strip()
                elif line.startswith("flags") and not flags:
                    flags = [x for x in line.split(":", 1)[1].split() if x.startswith(("avx", "sse4", "amx", "fma"))]
    except OSError:
        pass
    return f"{model}; flags {' '.join(sorted(flags))}"


if __name__ == "__main__":
    sys.exit(main())
