"""`fcclip eval`: the paper's zero-shot benchmarks (PQ, AP, mIoU) as a Ray Data job with exact metric merging.

    fcclip eval --model PRESET --weights W --dataset NAME --data ROOT [--out results.json] [--address ...]
    fcclip eval --model PRESET --weights W --data DEST [--min-score S] [--short-edge N]   (DEST: a labeling output)

Without ``--dataset``, ``--data`` is a labeling output of ``fcclip label`` and its pseudo-labels are the ground
truth: the PQ of a model against them is its agreement with the model that labeled (a student against its
teacher). The run's vocabulary is the vocabulary of both; segments scoring below ``--min-score`` are void (as they
are ignore regions in ``fcclip train``); error rows are skipped. The rows stream through Ray Data (part files read
with only the columns needed, error rows filtered in the scan), never listed on the driver.

The validation split streams through an actor pool (one model per actor, as `fcclip label`), each actor predicting
its images at the benchmark's test resolution with the benchmark's vocabulary and adding them to its own metric
accumulators; each batch returns the accumulators' statistics (per-class sums and confusion matrices, never
averages) and the driver merges them, so the figures are exactly those of a single pass.

Instance AP is computed against instances derived from the panoptic ground truth (the thing segments, with their
crowd flags), which is what the panoptic annotation holds; the reference reads the separate instance JSON of each
dataset, whose masks can differ slightly at segment borders.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import logging
import sys
import time
import warnings

import numpy as np
import pyarrow as pa
import pyarrow.fs as pafs
import ray.data as ray_data
from ray.data.expressions import col

from fcclip.config import check_weights, load_config
from fcclip.build import build_model
from fcclip.datasets.benchmarks import list_benchmarks, open_benchmark
from fcclip.metrics.instance import InstanceAccumulator
from fcclip.metrics.panoptic import PanopticAccumulator
from fcclip.metrics.semantic import SemanticAccumulator
from fcclip.precision import use_tf32
from fcclip.predictor import Predictor
from fcclip.vocabulary import Vocabulary
from fcclip_pipelines.arguments import COUNT, SCORE, number
from fcclip_pipelines import runtime
from fcclip_pipelines.output import OutputError, add_version_argument, open_output, read_labeled_image, segment_map

logger = logging.getLogger("fcclip.eval")


class EvalModel:
    """Actor: predicts a batch of benchmark images and returns the batch's metric statistics (as JSON)."""

    def __init__(self, model: str, weights: str, dataset: str, root: str, device: str, short_edge, max_size,
                 threads: int | None = None):
        self.dataset = open_benchmark(dataset, root)
        self.spec = self.dataset.spec
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            net = build_model(model, weights=weights, device=runtime.actor_device(device))
        use_tf32(net.device)
        runtime.use_cpu_threads(net.device, threads)
        self.predictor = Predictor(
            net,
            self.dataset.vocabulary(),
            short_edge=short_edge or self.spec.short_edge,
            max_size=max_size or self.spec.max_size,
            tasks=self.spec.tasks,
        )
        self.records = {r.image_id: r for r in self.dataset.records()}

    def __call__(self, batch: dict) -> dict:
        acc = new_accumulators(self.dataset)
        errors = []
        for image_id in batch["image_id"]:
            record = self.records[str(image_id)]
            try:
                image = self.dataset.load_image(record)
                pred = self.predictor(image)
                update(acc, self.dataset, record, pred)
            except Exception as e:  # an unreadable file is reported, the rest of the evaluation goes on
                errors.append(f"{record.image_uri}: {type(e).__name__}: {e}")
        state = {k: v.state_dict() for k, v in acc.items()}
        return {"state": np.array([json.dumps(state)], dtype=object), "errors": np.array([json.dumps(errors)], dtype=object),
                "count": np.array([len(batch["image_id"])])}


def new_accumulators(dataset) -> dict:
    vocab = dataset.vocabulary()
    cats = [{"id": c.id, "isthing": c.is_thing, "name": c.names[0]} for c in vocab.categories]
    acc = {}
    if "panoptic" in dataset.spec.tasks:
        acc["panoptic"] = PanopticAccumulator(cats)
    if "instance" in dataset.spec.tasks:
        acc["instance"] = InstanceAccumulator([c for c in cats if c["isthing"]])
    if "semantic" in dataset.spec.tasks:
        acc["semantic"] = SemanticAccumulator(len(vocab), ignore_index=dataset.spec.ignore_label)
    return acc


def update(acc: dict, dataset, record, pred) -> None:
    """Add one image's prediction to the accumulators."""
    if "panoptic" in acc or "instance" in acc:
        gt_map, gt_segments = dataset.load_panoptic(record)
    if "panoptic" in acc:
        acc["panoptic"].update(
            gt_map, gt_segments, pred.panoptic.segment_map,
            [{"id": s["id"], "category_id": s["category_id"]} for s in pred.panoptic.segments],
            image_id=record.image_id,
        )
    if "instance" in acc:
        things = {c["id"] for c in acc["instance"].categories}
        gt = [s for s in gt_segments if s["category_id"] in things]
        inst = pred.instances
        acc["instance"].update(
            record.image_id,
            np.stack([gt_map == s["id"] for s in gt]) if gt else np.zeros((0, *gt_map.shape), bool),
            [s["category_id"] for s in gt],
            inst.masks, inst.category_ids.tolist(), inst.scores.tolist(),
            gt_iscrowd=[bool(s.get("iscrowd", 0)) for s in gt],
        )
    if "semantic" in acc:
        acc["semantic"].update(dataset.load_semantic(record), pred.semantic.class_map)


def merge_states(dataset, states: list[dict]) -> dict:
    kinds = {"panoptic": PanopticAccumulator, "instance": InstanceAccumulator, "semantic": SemanticAccumulator}
    total = new_accumulators(dataset)
    for state in states:
        for k, s in state.items():
            total[k].merge(kinds[k].from_state_dict(s))
    return total


# what eval --data reads of a labeling output (the source columns where its files have them: read_labeled_image)
LABEL_COLUMNS = ("uri", "image_id", "status", "segments", "source_etag", "source_size", "source_mtime")


class LabelsEvalModel:
    """Actor: predicts a batch of a labeling output's images and returns the PQ statistics against its rows."""

    def __init__(self, model: str, weights: str, vocabulary: dict, device: str, short_edge, max_size,
                 min_score: float, threads: int | None = None):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            net = build_model(model, weights=weights, device=runtime.actor_device(device))
        use_tf32(net.device)
        runtime.use_cpu_threads(net.device, threads)
        kwargs = {} if short_edge is None else {"short_edge": short_edge or None}
        if max_size is not None:
            kwargs["max_size"] = max_size
        self.vocabulary = Vocabulary.from_dict(vocabulary)
        self.predictor = Predictor(net, self.vocabulary, tasks=("panoptic",), **kwargs)
        self.min_score = float(min_score)

    def __call__(self, batch: pa.Table) -> dict:
        acc = PanopticAccumulator(label_categories(self.vocabulary))
        errors = []
        rows = batch.select([c for c in LABEL_COLUMNS if c != "status" and c in batch.column_names]).to_pylist()
        for row in rows:
            try:
                image = read_labeled_image(row)  # a row whose image was replaced since is an error, not a comparison
                kept = [s for s in row["segments"] or () if s["score"] is None or s["score"] >= self.min_score]
                gt_map = segment_map(kept, image.shape[0], image.shape[1])
                pred = self.predictor(image).panoptic
                acc.update(gt_map, [{"id": s["id"], "category_id": s["category_id"]} for s in kept],
                           pred.segment_map,
                           [{"id": s["id"], "category_id": s["category_id"]} for s in pred.segments],
                           image_id=row["image_id"])
            except Exception as e:  # an unreadable image is reported, the rest of the evaluation goes on
                errors.append(f"{row['uri']}: {type(e).__name__}: {e}")
        return {"state": np.array([json.dumps(acc.state_dict())], dtype=object),
                "errors": np.array([json.dumps(errors)], dtype=object), "count": np.array([len(rows)])}


def label_categories(vocabulary: Vocabulary) -> list[dict]:
    return [{"id": c.id, "isthing": c.is_thing, "name": c.names[0]} for c in vocabulary.categories]



@contextlib.contextmanager
def _ray_for_models(address: str | None, num_cpus: int | None, gpus_per_actor: float | None, progress: bool,
                    actors: tuple[int, int], gpu_wait: float):
    """Join ``address`` / $RAY_ADDRESS or start a local Ray for the block, and end what it started as the block ends
    (runtime.shutdown_ray, as `fcclip label` does, not Ray's exit handler), also on an error. Yields what each model
    actor asks for: GPUs (asked for, runtime.resolve_gpus, and granted for the first actor within ``gpu_wait``
    seconds, else ResourcesNotGranted) and CPUs, and its PyTorch threads on CPU (as `fcclip label`'s:
    runtime.model_actor_cpus)."""
    started = runtime.init_ray(address, num_cpus, verbose=True)
    try:
        ray_data.DataContext.get_current().enable_progress_bars = progress
        gpus = runtime.resolve_gpus(gpus_per_actor, address)
        cpus, threads, asked = runtime.model_actor_cpus(address, num_cpus, gpus, 1.0, actors)
        logger.info("%s", asked)
        if gpus:
            runtime.wait_for_resources({"GPU": gpus, "CPU": cpus}, 1, gpu_wait, asked)
        yield gpus, cpus, threads
    finally:
        runtime.shutdown_ray(started)


def _map_models(ds, model_class, args: tuple, batch_size: int, batch_format: str, actors: tuple[int, int],
                gpus_per_actor: float, cpus_per_actor: float = 1.0):
    """``ds`` through a pool of ``model_class(*args)`` actors, each holding one model."""
    return ds.map_batches(
        model_class,
        fn_constructor_args=args,
        batch_size=batch_size,
        batch_format=batch_format,
        compute=ray_data.ActorPoolStrategy(min_size=actors[0], max_size=actors[1]),
        num_gpus=gpus_per_actor,
        num_cpus=cpus_per_actor,
    )


def _summary(dataset: str, model: str, weights: str, count: int, errors: list, seconds: float) -> dict:
    return {
        "dataset": dataset,
        "model": model,
        "weights": weights,
        "images": count,
        "failed": len(errors),
        "errors": errors[:100],
        "seconds": seconds,
        "images_per_s": count / seconds if seconds else 0.0,
    }


def run_eval_labels(
    model: str, weights: str, dest: str, *, batch_size: int = 2, actors: tuple[int, int] = (1, 1),
    gpus_per_actor: float | None = None, address: str | None = None, short_edge: int | None = None,
    max_size: int | None = None, min_score: float = 0.0, num_cpus: int | None = None, progress: bool = True,
    gpu_wait: float = runtime.GPU_WAIT_S,
    version: int | None = None,
) -> dict:
    """PQ of a model against a labeling output's pseudo-labels (module docstring). ``short_edge``: None for the
    model's test size, 0 for each image's own size; ``version``: of DEST's table (default: the current one)."""
    output = open_output(dest, version)
    vocabulary = Vocabulary.from_dict(output.vocabulary)
    with _ray_for_models(address, num_cpus, gpus_per_actor, progress, actors, gpu_wait) as (
            gpus_per_actor, cpus_per_actor, threads):
        started = time.time()
        columns = [c for c in LABEL_COLUMNS if c in output.columns]
        ds = (ray_data.read_parquet(list(output.files), filesystem=pafs.PyFileSystem(pafs.FSSpecHandler(output.fs)),
                                    schema=output.arrow_schema(columns))
              .select_columns(columns)  # both pushed into the Parquet scan
              .filter(expr=col("status") == "ok"))
        ds = _map_models(ds, LabelsEvalModel, (model, weights, output.vocabulary, "auto",
                                               short_edge, max_size, min_score, threads),
                         batch_size, "pyarrow", actors, gpus_per_actor, cpus_per_actor)
        total = PanopticAccumulator(label_categories(vocabulary))
        errors, count = [], 0
        for batch in ds.iter_batches(batch_format="numpy", batch_size=None):
            for s, e, c in zip(batch["state"], batch["errors"], batch["count"]):
                total.merge(PanopticAccumulator.from_state_dict(json.loads(s)))
                errors.extend(json.loads(e))
                count += int(c)
        seconds = time.time() - started
        return {
            **_summary(dest, model, weights, count, errors, seconds),
            "min_score": min_score,
            **jsonable({"panoptic": total.result()}),
        }


def run_eval(
    model: str, weights: str, dataset: str, root: str, *, batch_size: int = 2, actors: tuple[int, int] = (1, 1),
    gpus_per_actor: float | None = None, address: str | None = None, limit: int | None = None,
    short_edge: int | None = None, max_size: int | None = None, num_cpus: int | None = None, progress: bool = True,
    gpu_wait: float = runtime.GPU_WAIT_S,
) -> dict:
    ds_reader = open_benchmark(dataset, root)
    records = ds_reader.records()[: limit or None]
    with _ray_for_models(address, num_cpus, gpus_per_actor, progress, actors, gpu_wait) as (
            gpus_per_actor, cpus_per_actor, threads):
        started = time.time()
        items = [{"image_id": r.image_id} for r in records]
        ds = ray_data.from_items(items, override_num_blocks=max(1, min(len(items), 64)))
        ds = _map_models(ds, EvalModel, (model, weights, dataset, root, "auto", short_edge,
                                         max_size, threads),
                         batch_size, "numpy", actors, gpus_per_actor, cpus_per_actor)
        states, errors, count = [], [], 0
        for batch in ds.iter_batches(batch_format="numpy", batch_size=None):
            for s, e, c in zip(batch["state"], batch["errors"], batch["count"]):
                states.append(json.loads(s))
                errors.extend(json.loads(e))
                count += int(c)
        total = merge_states(ds_reader, states)
        seconds = time.time() - started
        results = {k: v.result() for k, v in total.items()}
        return {
            **_summary(dataset, model, weights, count, errors, seconds),
            "test_size": [short_edge or ds_reader.spec.short_edge, max_size or ds_reader.spec.max_size],
            **jsonable(results),
        }


def jsonable(obj):
    """Plain JSON types throughout (numpy scalars and keys become Python ones)."""
    if isinstance(obj, dict):
        return {(k.item() if isinstance(k, np.generic) else k): jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [jsonable(v) for v in obj]
    if isinstance(obj, np.generic):
        return obj.item()
    return obj


def _pct(x) -> str:
    return "-" if x is None else f"{100 * x:.1f}"


def format_results(r: dict) -> str:
    pan, inst, sem = r.get("panoptic"), r.get("instance"), r.get("semantic")
    head = ["dataset", "PQ", "PQ_th", "PQ_st", "SQ", "RQ", "AP", "mIoU", "images"]
    row = [
        r["dataset"],
        _pct(pan["All"]["pq"]) if pan else "-",
        _pct(pan["Things"]["pq"]) if pan else "-",
        _pct(pan["Stuff"]["pq"]) if pan else "-",
        _pct(pan["All"]["sq"]) if pan else "-",
        _pct(pan["All"]["rq"]) if pan else "-",
        _pct(inst["AP"]) if inst else "-",
        _pct(sem["mIoU"]) if sem else "-",
        str(r["images"]),
    ]
    return "| " + " | ".join(head) + " |\n|" + "---|" * len(head) + "\n| " + " | ".join(row) + " |"


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default="fcclip-convnext-large",
                   help="preset or preset YAML (default: %(default)s)")
    p.add_argument("--weights", default="official",
                   help="'official', 'random' (smoke runs), or a path/URI (default: %(default)s)")
    p.add_argument("--dataset", default=None, choices=list_benchmarks(),
                   help="a benchmark; without it, --data is a labeling output whose pseudo-labels are the ground truth")
    add_version_argument(p, "--data")
    p.add_argument("--data", required=True, help="datasets root ($DETECTRON2_DATASETS layout) or the dataset folder; "
                                                 "without --dataset, a labeling output (local or s3://)")
    p.add_argument("--min-score", type=SCORE, default=0.0,
                   help="labeling output only: pseudo-label segments scoring below this are void")
    p.add_argument("--out", default=None, help="write the results (overall and per class) as JSON")
    p.add_argument("--batch-size", type=COUNT, default=2,
                   help="images per model actor call, each predicted on its own (default: %(default)d)")
    p.add_argument("--actors", type=COUNT, default=1,
                   help="model actors, each holding one model (default: %(default)d)")
    runtime.add_gpu_arguments(p, "--gpus-per-actor", "model actor", "runs the model on CPU", "the first GPU")
    p.add_argument("--limit", type=COUNT, default=None, help="evaluate the first N images only")
    p.add_argument("--short-edge", type=number(int, minimum=0), default=None,
                   help="override the benchmark's (or the model's) test size; 0: each image's own size")
    p.add_argument("--max-size", type=COUNT, default=None,
                   help="override the benchmark's (or the model's) long-edge limit")
    p.add_argument("--address", default=None, help="Ray cluster address (default: $RAY_ADDRESS, else a local Ray)")
    p.add_argument("--num-cpus", type=COUNT, default=None, help="CPUs of the local Ray (default: all)")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")


def main_args(args: argparse.Namespace) -> int:
    try:
        check_weights(load_config(args.model), args.weights)  # before Ray and the model actors that would load them
        if args.dataset is None:
            if args.limit is not None:
                raise ValueError("--limit applies to benchmarks (--dataset) only")
            results = run_eval_labels(
                args.model, args.weights, args.data, batch_size=args.batch_size, actors=(args.actors, args.actors),
                gpus_per_actor=args.gpus_per_actor, gpu_wait=args.gpu_wait, address=args.address,
                short_edge=args.short_edge,
                max_size=args.max_size, min_score=args.min_score, num_cpus=args.num_cpus,
                progress=not args.no_progress, version=args.version,
            )
        else:
            if args.version is not None:
                raise ValueError("--version applies to labeling outputs (without --dataset) only")
            results = run_eval(
                args.model, args.weights, args.dataset, args.data, batch_size=args.batch_size,
                actors=(args.actors, args.actors), gpus_per_actor=args.gpus_per_actor, gpu_wait=args.gpu_wait,
                address=args.address,
                limit=args.limit, short_edge=args.short_edge, max_size=args.max_size, num_cpus=args.num_cpus,
                progress=not args.no_progress,
            )
    except OutputError as e:
        print(f"fcclip eval: error: {e} (without --dataset, --data must be a labeling output)", file=sys.stderr)
        return 2
    except runtime.ResourcesNotGranted as e:
        print(f"fcclip eval: error: {e}", file=sys.stderr)
        return 1
    except (ValueError, FileNotFoundError, KeyError) as e:
        print(f"fcclip eval: error: {e}", file=sys.stderr)
        return 2
    print(format_results(results))
    print(f"{results['images']} images in {results['seconds']:.1f} s ({results['images_per_s']:.2f} images/s), "
          f"{results['failed']} failed")
    for e in results["errors"][:10]:
        print(f"  error: {e}")
    if args.out:
        with open(args.out, "w") as f:
            json.dump(results, f, indent=1)
        print(f"results: {args.out}")
    return 1 if results["failed"] else 0
