"""Labeling pipeline throughput and memory, next to a bare loop of the same model.

    python benchmarks/label_throughput.py --model fcclip-tiny --size 512 --images 40 [--scale 10]

1. Bare loop: the model in this process (on the GPU where the machine has one, as `fcclip label`'s) over
   already-decoded images (resize, forward, panoptic post-processing), no I/O: the best the hardware can do with
   this model, batch size and size; measured before and after the pipelines (on a shared machine the two differ),
   the reference being their mean.
2. Pipeline: `fcclip label` on the same images written as JPEG files (a subprocess with its own local Ray): decode,
   model actor, RLE encoding, Parquet commits. images/s is end to end (the whole command, Ray start-up and model
   loading included, so it grows with N); the time until the driver received its first labeled rows is printed
   beside it. efficiency = pipeline images/s / bare-loop images/s.
3. Same work, one process: what `fcclip label` does to each image, in this process without Ray, one chunk after the
   other: read and decode the JPEG files (stages.ReadDecode), the model stage (stages.label_images over
   FCCLIPSegmenter: the model, panoptic post-processing, each segment's doubt), the rows encoded (stages.encode_rows:
   RLE, areas, boxes) and written as Parquet, one file per 10 images. What a user's own script would do; on a machine
   without a GPU its decode and encode take the cores' time from the model, which the bare loop leaves out. The model
   is built before the clock starts, as in the bare loop. vs same work = pipeline images/s / this one's.
4. Memory: the driver's and the Ray workers' peak RSS (VmHWM, read from /proc while the job runs), at N images and
   at scale x N, to show it stays flat as the collection grows.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
import warnings
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "benchmarks"))

# the processes below the label job, as label_driver counts them; the CPU's model and flags
from label_driver import _cpu_flags, _descendants  # noqa: E402


def write_images(folder: Path, n: int, size: int) -> None:
    from PIL import Image

    from fcclip.datasets.synthetic import synthetic_image

    folder.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        Image.fromarray(synthetic_image(i, size, size)).save(folder / f"img_{i:06d}.jpg", quality=90)


def bare_loop(model_name: str, size: int, images: int, batch: int, vocab: str, threads: int | None) -> float:
    import torch

    from fcclip import Predictor, build_model
    from fcclip.datasets.synthetic import synthetic_image

    if threads:
        torch.set_num_threads(threads)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        # where `fcclip label` runs it: the GPU when the machine has one (its model actors ask for it), else the CPU
        model = build_model(model_name, weights="random", device="cuda" if torch.cuda.is_available() else "cpu")
    pred = Predictor(model, vocab, short_edge=size, max_size=size, tasks=("panoptic",))
    decoded = [synthetic_image(i, size, size) for i in range(images)]
    pred.predict_batch(decoded[:batch])  # warm-up
    start = time.perf_counter()
    for i in range(0, images, batch):
        chunk = decoded[i : i + batch]
        out, sizes, padded = pred.infer(chunk)
        for j, img in enumerate(chunk):
            pred.postprocess(out.class_logits[j], out.mask_logits[j], sizes[j], padded, img.shape[:2])
    return images / (time.perf_counter() - start)


def same_work_loop(model_name: str, folder: Path, out: Path, size: int, batch: int, vocab: str) -> float:
    import pyarrow.parquet as pq

    from fcclip.images import DEFAULT_MAX_PIXELS
    from fcclip.vocabulary import load_vocabulary
    from fcclip_pipelines.stages import FCCLIPSegmenter, ModelSpec, ReadDecode, encode_rows, label_images

    vocabulary = load_vocabulary(vocab)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        stage = FCCLIPSegmenter(ModelSpec(model=model_name, weights="random", vocabulary=vocabulary.to_dict()))
    decoder = ReadDecode(size, size, DEFAULT_MAX_PIXELS)
    constants = {"vocabulary": vocabulary.name, "run_id": "same-work", "model": stage.model_id}
    uris = sorted(str(f) for f in folder.iterdir())
    meta, images = decoder(uris[:batch])
    label_images(stage, meta, images, batch)  # warm-up, as the bare loop's
    out.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    for k in range(0, len(uris), SHARD):
        chunk = uris[k : k + SHARD]
        meta, images = decoder(chunk)
        labeled = label_images(stage, meta, images, batch)
        table = encode_rows(chunk, list(range(len(chunk))), meta, labeled, constants)
        pq.write_table(table, out / f"part-{k // SHARD:06d}.parquet")
    return len(uris) / (time.perf_counter() - start)


def _hwm_kib(pid: int) -> int:
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1])
    except OSError:
        pass
    return 0


def _cmdline(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return f.read().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return ""


SHARD = 10  # images per shard, so per chunk: the first rows are the first 10 images'


def pipeline(model_name: str, folder: Path, out: Path, batch: int, vocab: str, num_cpus: int, size: int,
             actors: str = "1") -> dict:
    # the model sees the images at the bare loop's size (--short-edge / --max-size), not at the preset's own test size
    # (fcclip-tiny's is 256: until 2026-12-07 the pipeline ran at a quarter of the bare loop's pixels)
    cmd = [
        sys.executable, "-m", "fcclip_pipelines", "label", str(folder), "--out", str(out), "--vocab", vocab,
        "--model", model_name, "--weights", "random", "--batch-size", str(batch), "--num-cpus", str(num_cpus),
        "--short-edge", str(size), "--max-size", str(size),
        "--shard-size", str(SHARD), "--actors", actors, "--no-progress", "--summary-json", str(out) + ".summary.json",
    ]
    env = dict(os.environ, RAY_DEDUP_LOGS="1")
    start = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env, cwd=REPO)
    peaks: dict[int, tuple[str, int]] = {}
    done = threading.Event()

    def watch():
        while not done.is_set():
            for pid in [proc.pid, *_descendants(proc.pid)]:
                hwm = _hwm_kib(pid)
                if hwm:
                    name = "driver" if pid == proc.pid else _cmdline(pid).split(" ")[0]
                    if hwm > peaks.get(pid, ("", 0))[1]:
                        peaks[pid] = (name, hwm)
            time.sleep(0.2)

    watcher = threading.Thread(target=watch, daemon=True)
    watcher.start()
    output, _ = proc.communicate()
    done.set()
    watcher.join()
    wall = time.perf_counter() - start
    if proc.returncode != 0:
        raise RuntimeError(f"fcclip label failed:\n{output[-3000:]}")
    summary = json.loads(Path(str(out) + ".summary.json").read_text())
    n = summary["images"]
    workers = [kib for name, kib in peaks.values() if name.startswith("ray::")]
    return {
        "images": n,
        "wall_s": wall,
        "startup_s": summary["startup_seconds"],
        "end_to_end_images_per_s": n / wall,
        # the rate once the first chunk's rows are written: start-up (Ray, the model actor) left out
        "after_first_rows_images_per_s": (n - SHARD) / max(wall - summary["startup_seconds"], 1e-9),
        "driver_peak_mib": peaks.get(proc.pid, ("", 0))[1] / 1024,
        "worker_peak_mib_max": max(workers, default=0) / 1024,
        "worker_peak_mib_sum": sum(workers) / 1024,
        "workers": len(workers),
    }


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="fcclip-tiny")
    p.add_argument("--size", type=int, default=512)
    p.add_argument("--images", type=int, default=40, help="N (the memory check also runs scale x N)")
    p.add_argument("--scale", type=int, default=10)
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--num-cpus", type=int, default=os.cpu_count() or 2, help="CPUs of the pipeline's local Ray")
    p.add_argument("--vocab", default="coco_panoptic")
    p.add_argument("--actors", default="1", help="fcclip label --actors (on a local Ray without a GPU the model actors "
                   "share its CPUs' threads: 2 actors on 2 cores compute with one thread each)")
    p.add_argument("--json", default=None)
    args = p.parse_args(argv)

    import torch

    rows = {}
    with tempfile.TemporaryDirectory(prefix="fcclip-bench-") as tmp:
        tmp = Path(tmp)
        big = args.images * args.scale
        write_images(tmp / "images_n", args.images, args.size)
        write_images(tmp / "images_big", big, args.size)
        bare_before = bare_loop(args.model, args.size, args.images, args.batch_size, args.vocab, None)
        same_before = same_work_loop(args.model, tmp / "images_n", tmp / "same_before", args.size, args.batch_size,
                                     args.vocab)
        rows["N"] = pipeline(args.model, tmp / "images_n", tmp / "out_n", args.batch_size, args.vocab, args.num_cpus,
                             args.size, args.actors)
        rows[f"{args.scale}N"] = pipeline(
            args.model, tmp / "images_big", tmp / "out_big", args.batch_size, args.vocab, args.num_cpus, args.size,
            args.actors,
        )
        # again after the pipelines: on a machine shared with other jobs the two differ, and so would the ratio
        bare_after = bare_loop(args.model, args.size, args.images, args.batch_size, args.vocab, None)
        same_after = same_work_loop(args.model, tmp / "images_n", tmp / "same_after", args.size, args.batch_size,
                                    args.vocab)
        bare = (bare_before + bare_after) / 2
        same = (same_before + same_after) / 2

    print(f"# label throughput: {args.model}, {args.size}x{args.size}, batch {args.batch_size}, "
          f"vocabulary {args.vocab}, fcclip label --actors {args.actors}")
    print(f"# torch {torch.__version__}, CPU threads {torch.get_num_threads()}, local Ray with {args.num_cpus} CPUs, "
          f"no GPU" if not torch.cuda.is_available() else f"# GPU {torch.cuda.get_device_name()}")
    print(f"# CPU: {os.cpu_count()} cores, {_cpu_flags()}")
    print()
    print(f"bare loop (same process, decoded images): {bare:.2f} images/s (before the pipelines {bare_before:.2f}, "
          f"after {bare_after:.2f}; efficiency is against their mean)")
    print(f"same work, one process (JPEG files -> rows in Parquet, no Ray): {same:.2f} images/s "
          f"(before {same_before:.2f}, after {same_after:.2f})")
    print()
    print("| run | images | end-to-end images/s | efficiency | vs same work | first rows after s | "
          "images/s after them | wall s | driver peak MiB | worker peak MiB (max / sum, n) |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for name, r in rows.items():
        print(f"| {name} | {r['images']} | {r['end_to_end_images_per_s']:.2f} | "
              f"{r['end_to_end_images_per_s'] / bare:.0%} | {r['end_to_end_images_per_s'] / same:.0%} | "
              f"{r['startup_s']:.1f} | {r['after_first_rows_images_per_s']:.2f} "
              f"({r['after_first_rows_images_per_s'] / bare:.0%}, {r['after_first_rows_images_per_s'] / same:.0%}) | "
              f"{r['wall_s']:.1f} | "
              f"{r['driver_peak_mib']:.0f} | {r['worker_peak_mib_max']:.0f} / {r['worker_peak_mib_sum']:.0f}, "
              f"{r['workers']} |")
    if args.json:
        Path(args.json).write_text(json.dumps(
            {"bare_images_per_s": bare, "bare_before": bare_before, "bare_after": bare_after,
             "same_work_images_per_s": same, "same_before": same_before, "same_after": same_after, "runs": rows,
             "args": vars(args)}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
