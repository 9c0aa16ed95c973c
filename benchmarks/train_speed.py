"""Training speed of `fcclip train` (Ray Train, DDP) on a synthetic COCO-panoptic set it generates, read as a COCO
tree, as pseudo-labels (a labeling output streamed through Ray Data), or both mixed (``fcclip train --mix``).

    .venv/bin/python benchmarks/train_speed.py --model fcclip-tiny --num-workers 2 --iters 40 --image-size 128
    .venv/bin/python benchmarks/train_speed.py --data-kind labels --iters 100 --num-cpus 2
    .venv/bin/python benchmarks/train_speed.py --data-kind mix --mix-share 0.5 --iters 100 --num-cpus 2

With ``--data-kind labels`` the generated images are first labeled by ``fcclip label`` (fcclip-tiny, random weights
unless --label-weights, at their own size) and training reads that output (`fcclip_pipelines.train_data`): Parquet part
files, images from their URIs, masks from the RLEs, LSJ on Ray Data CPU tasks, batches into the workers' shards.
Labeling is not timed. The training workers then get (CPUs - 1) / workers CPUs by default, leaving one to Ray Data.
``--data-kind mix`` trains on that output with ``--mix coco=ROOT:SHARE``, ROOT the generated tree (``--mix-share``
of the samples decoded by the training workers themselves, as on a COCO tree).

Runs the real training job (`fcclip_pipelines.train.run_train`: data loading with LSJ, forward, criterion, backward, DDP
all-reduce, optimizer) for --iters iterations with deterministic random weights, and reports, over the iterations
after --warmup:

- iterations/s and samples/s (global batch x iterations/s),
- data-wait share: the part of the step time a worker waited for its next batch (mean over the workers),
- peak memory: the largest training-worker process's peak RSS, and on GPUs the peak allocated CUDA memory.

Every report of every worker is collected with a Ray Train callback (Ray Train itself keeps only those that come
with a checkpoint). Only the final iteration writes a checkpoint, so checkpointing is not timed. Keep a window
(--log-every iterations) longer than ~2 s: Ray Train takes one report per worker at a time and collects them about
every 2 s, so more frequent reports stall the workers (measured with fcclip-tiny on 2 CPUs: 2.5 it/s with a report
every 5 iterations, 14 it/s with one every 20). Without --address
a local Ray is started with --num-cpus CPUs; each worker gets --cpus-per-worker (default: an equal share, which
sets its torch thread count) and a GPU when the cluster has GPUs.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

DEFAULT_CONFIG = "fcclip-tiny-synthetic"  # a packaged training config (configs/train/)
_DATA_NAMES = {"coco": "COCO tree", "labels": "labeling output", "mix": "labeling output + {share:.0%} COCO tree"}


def _collector_class():
    import ray

    @ray.remote(num_cpus=0)
    class Collector:
        def __init__(self):
            self.reports = []

        def add(self, metrics: list[dict]) -> None:
            self.reports.append(metrics)

        def get(self) -> list[list[dict]]:
            return self.reports

    return Collector


def _callback(collector):
    import ray
    import ray.train

    class Collect(ray.train.UserCallback):
        def __init__(self, handle):
            self.handle = handle

        def after_report(self, run_context, metrics, checkpoint):
            ray.get(self.handle.add.remote([dict(m) for m in metrics]))

    return Collect(collector)


def summarise(reports: list[list[dict]], warmup: int, global_batch: int) -> dict:
    """Aggregate the per-window reports (one list of per-worker metric dicts per report) after `warmup`."""
    iters = seconds = wait = 0.0
    peak_rss = peak_gpu = 0.0
    previous = None
    for per_worker in reports:
        lead = per_worker[0]
        it = int(lead["iteration"])
        done = it - previous if previous is not None else it - int(lead.get("start_iteration", 0))
        previous = it
        for m in per_worker:
            peak_rss = max(peak_rss, float(m.get("max_rss_mb", 0.0)))
            peak_gpu = max(peak_gpu, float(m.get("gpu_max_allocated_mb", 0.0)))
        if it - done < warmup or lead["iters_per_s"] <= 0:
            continue
        window = done / lead["iters_per_s"]
        iters += done
        seconds += window
        wait += window * sum(m["data_wait_share"] for m in per_worker) / len(per_worker)
    if not seconds:
        raise ValueError(f"no timed window after {warmup} warmup iterations: raise --iters")
    return {
        "timed_iters": int(iters),
        "iters_per_s": iters / seconds,
        "samples_per_s": iters * global_batch / seconds,
        "data_wait_share": wait / seconds,
        "peak_rss_mb": peak_rss,
        "peak_gpu_mb": peak_gpu or None,
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default=None, help="model preset or YAML (default: the config's, fcclip-tiny)")
    p.add_argument("--config", default=DEFAULT_CONFIG, help="a packaged training config's name or a YAML file")
    p.add_argument("--num-workers", type=int, default=1)
    p.add_argument("--iters", type=int, default=100, help="training iterations, warmup included")
    p.add_argument("--warmup", type=int, default=20, help="iterations left out of the figures (multiple of --log-every)")
    p.add_argument("--log-every", type=int, default=20, help="iterations per timing window (one Ray report each)")
    p.add_argument("--image-size", type=int, default=None, help="LSJ crop side (default: the config's)")
    p.add_argument("--batch-size", type=int, default=None, help="global batch (default: the config's)")
    p.add_argument("--loader-workers", type=int, default=None, help="loader processes per worker (default: config)")
    p.add_argument("--images", type=int, default=16, help="synthetic training images")
    p.add_argument("--num-cpus", type=int, default=None, help="CPUs of the local Ray (default: all)")
    p.add_argument("--cpus-per-worker", type=float, default=None, help="default: CPUs / workers")
    p.add_argument("--gpus-per-worker", type=float, default=None, help="default: 1 if the cluster has GPUs")
    p.add_argument("--address", default=None, help="Ray cluster address (default: a local Ray)")
    p.add_argument("--data-kind", choices=("coco", "labels", "mix"), default="coco",
                   help="read the data as a COCO tree, or label it first and train on the labeling output (mix: "
                        "and on the tree, --mix-share of the samples)")
    p.add_argument("--mix-share", type=float, default=0.5, help="with --data-kind mix: the COCO tree's share")
    p.add_argument("--label-weights", default="random", help="weights of the fcclip-tiny that labels (labels only)")
    p.add_argument("--json", default=None, help="also write the figures here")
    args = p.parse_args(argv)
    if args.iters <= args.warmup:
        p.error("--iters must be larger than --warmup")

    import ray

    from fcclip.datasets.synthetic_panoptic import write_coco_panoptic
    from fcclip_pipelines.train import load_train_config, run_train
    from fcclip_pipelines.train_data import MixSpec

    cfg = load_train_config(args.config)
    data = dataclasses.replace(
        cfg.data,
        image_size=args.image_size or cfg.data.image_size,
        loader_workers=cfg.data.loader_workers if args.loader_workers is None else args.loader_workers,
    )
    solver = dataclasses.replace(cfg.solver, batch_size=args.batch_size or cfg.solver.batch_size,
                                 max_iters=args.iters)
    cfg = dataclasses.replace(
        cfg, model=args.model or cfg.model, weights="random", data=data, solver=solver,
        log_every=args.log_every, checkpoint_every=args.iters, keep_checkpoints=1, max_failures=0,
        eval_every=0,  # the generated tree has no val split, and validation is not training speed
    )

    if args.address or os.environ.get("RAY_ADDRESS"):
        ray.init(address=args.address or os.environ["RAY_ADDRESS"])
    else:
        ray.init(num_cpus=args.num_cpus, include_dashboard=False, log_to_driver=False)
    try:
        total_cpus = int(ray.cluster_resources().get("CPU", 1))
        if args.data_kind != "coco":  # one CPU for the Ray Data tasks
            cpus = args.cpus_per_worker or max(0.5, (total_cpus - 1) / args.num_workers)
        else:
            cpus = args.cpus_per_worker or max(1.0, float(total_cpus // args.num_workers))
        collector = _collector_class().remote()
        with tempfile.TemporaryDirectory(prefix="fcclip-train-speed-") as tmp:
            side = data.image_size
            write_coco_panoptic(Path(tmp) / "data", args.images, seed=0, size=(side, side * 5 // 4), also_val=False)
            source, segments, mix = str(Path(tmp) / "data"), None, None
            if args.data_kind != "coco":
                if args.data_kind == "mix":
                    mix = MixSpec("coco", source, args.mix_share)
                source, segments = _label(Path(tmp), cfg, args.label_weights)
            started = time.perf_counter()
            run_train(
                cfg, source, str(Path(tmp) / "runs"), num_workers=args.num_workers,
                gpus_per_worker=args.gpus_per_worker, cpus_per_worker=cpus, name="train-speed",
                callbacks=[_callback(collector)], mix=mix,
            )
            wall = time.perf_counter() - started
        reports = ray.get(collector.get.remote())
    finally:
        ray.shutdown()

    figures = summarise(reports, args.warmup, solver.batch_size)
    row = {
        "data": args.data_kind, "mix_share": args.mix_share if mix else None, "segments_per_image": segments,
        "model": cfg.model, "workers": args.num_workers, "cpus_per_worker": cpus, "batch": solver.batch_size,
        "image_size": data.image_size, "iters": args.iters, **figures, "wall_s": wall,
    }
    header = ["data", "model", "workers", "cpus/worker", "global batch", "crop", "iters/s", "samples/s", "data wait",
              "peak RSS/worker", "peak GPU", "wall (startup incl.)"]
    values = [
        _DATA_NAMES[args.data_kind].format(share=args.mix_share), row["model"], str(row["workers"]), f"{cpus:g}",
        str(row["batch"]), f"{row['image_size']}px",
        f"{row['iters_per_s']:.2f}", f"{row['samples_per_s']:.1f}", f"{100 * row['data_wait_share']:.1f}%",
        f"{row['peak_rss_mb']:.0f} MB", f"{row['peak_gpu_mb']:.0f} MB" if row["peak_gpu_mb"] else "-",
        f"{wall:.0f}s",
    ]
    print(f"timed: the last {row['timed_iters']} of {args.iters} iterations"
          + (f"; {segments:.1f} pseudo-label segments per image" if segments is not None else ""))
    print("| " + " | ".join(header) + " |")
    print("|" + "|".join("---" for _ in header) + "|")
    print("| " + " | ".join(values) + " |")
    if args.json:
        Path(args.json).write_text(json.dumps(row, indent=2))
    return 0


def _label(tmp: Path, cfg, weights: str) -> tuple[str, float]:
    """Label the generated training images with `fcclip label` (on the running Ray); (the output, segments per
    image)."""
    import pyarrow.parquet as pq

    from fcclip.datasets.coco_panoptic import CocoPanoptic
    from fcclip_pipelines.cli import main as fcclip

    vocab = tmp / "vocabulary.json"
    vocab.write_text(json.dumps(CocoPanoptic(tmp / "data").vocabulary(synonyms=cfg.data.synonyms).to_dict()))
    dest = tmp / "labels"
    code = fcclip(["label", str(tmp / "data" / cfg.data.split), "--out", str(dest), "--vocab", str(vocab),
                   "--model", "fcclip-tiny", "--weights", weights, "--short-edge", "0", "--no-progress"])
    if code:
        raise SystemExit(f"fcclip label failed ({code})")
    rows = [r for f in sorted(dest.glob("*.parquet")) for r in pq.read_table(f, columns=["segments"]).to_pylist()]
    return str(dest), sum(len(r["segments"] or ()) for r in rows) / max(len(rows), 1)


if __name__ == "__main__":
    sys.exit(main())
