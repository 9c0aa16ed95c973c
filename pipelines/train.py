"""`fcclip train`: FC-CLIP training with Ray Train (DDP), resumable, on a COCO panoptic tree, on pseudo-labels, or
on both mixed by a share.

    fcclip train --config NAME_OR_YAML --data ROOT_OR_DEST --storage URI
                 [--num-workers N] [--gpus-per-worker F] [--max-iters N] [--resume] [--address RAY_ADDRESS]
                 [--min-score S] [--class-map OLD=NEW ...] [--keep NAMES] [--drop NAMES]
                 [--mix coco=ROOT:SHARE | --mix labels=DEST:SHARE]

``--config`` is a packaged training config's name (``fcclip-convnext-large-coco``, the paper's recipe;
``fcclip-tiny-synthetic``, a smoke run) or a path to a YAML file in the same format.

``--data`` is detected (`fcclip_pipelines.train_data.open_training_data`): a COCO panoptic tree, whose categories are the
training vocabulary, or a labeling output (``fcclip label``'s part files), whose run vocabulary is (after
``--class-map``, ``--keep``, ``--drop``). ``--mix`` adds a source of the other kind that gives SHARE of the training
samples; the training vocabulary is then the union of both (`fcclip_pipelines.train_data.open_training_sources`,
`fcclip.training.mix`). Each Ray Train worker builds the model (frozen CLIP + trainable head) and trains with DDP;
the global batch is split across the workers. A COCO tree is read by each worker's own loader processes (decode +
large-scale jitter on CPU); a labeling output streams through Ray Data into the workers' dataset shards (read,
decoded and augmented on CPU tasks; see `fcclip_pipelines.train_data`), with segments scoring below ``--min-score`` as
ignore regions (`fcclip.training.ignore`); with ``--mix`` each worker draws every sample from one source or the
other by share and reports how many it drew from each. Every ``checkpoint_every`` iterations rank 0 writes a
checkpoint (model in the reference's checkpoint layout, optimizer, scheduler, grad scaler, iteration, RNG states) to
``--storage``; Ray Train keeps the newest ones. A lost worker or node restarts the worker group from the latest
checkpoint (``max_failures`` times); a stopped run continues with ``--resume`` (same --storage and run name), with
the data (a labeling output at the table version it started on), selection, vocabulary and model it was started with
(`run_settings`: a resume that changes them is refused).
At the end the command prints ``final checkpoint: PATH``, the file ``fcclip predict/label --weights PATH`` take.
"""
from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import logging
import math
import os
import random
import resource
import shutil
import sys
import tempfile
import threading
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import fsspec
import numpy as np
import pyarrow.fs
import ray
import ray.train
import ray.train.torch
import torch
import yaml
from PIL import Image
from ray.train.torch import TorchTrainer

from fcclip.build import build_model
from fcclip.checkpoint import load_weights, official_state_dict
from fcclip.config import ConfigError, build_strict, train_config_path
from fcclip.datasets.coco_panoptic import CocoPanoptic, filter_empty
from fcclip.datasets.labels import LabelSelection, parse_class_map
from fcclip.masks import rgb2id
from fcclip.metrics.panoptic import PanopticAccumulator
from fcclip.precision import use_tf32
from fcclip.predictor import Predictor
from fcclip.text import TextClassifierCache, build_text_classifier
from fcclip.training.criterion import outputs_from_model, weighted_total
from fcclip.training.data import collate, collate_batches, normalize_images, train_sample
from fcclip.training.ignore import build_ignore_criterion
from fcclip.training.mix import MixedSamples
from fcclip.vocabulary import Vocabulary
from fcclip_pipelines import runtime
from fcclip_pipelines.train_data import (
    KINDS,
    MixSpec,
    TrainingSources,
    label_dataset,
    open_training_sources,
    parse_mix,
    stream_batches,
    stream_samples,
)

logger = logging.getLogger("fcclip.train")


# ---------------------------------------------------------------------------------------------------- configuration
@dataclass(frozen=True)
class DataConfig:
    split: str = "train2017"
    val_split: str = "val2017"
    image_size: int = 1024  # large-scale jitter crop
    min_scale: float = 0.1
    max_scale: float = 2.0
    filter_empty: bool = False  # the reference's FILTER_EMPTY_ANNOTATIONS has no effect on panoptic data
    loader_workers: int = 2  # loader processes per training worker (decode + augmentation)
    synonyms: str | None = "coco_panoptic"  # class names with the reference's synonyms, matched by category id


@dataclass(frozen=True)
class SolverConfig:
    batch_size: int = 16  # global, split across workers
    lr: float = 1e-4
    weight_decay: float = 0.05
    weight_decay_norm: float = 0.0
    weight_decay_embed: float = 0.0
    max_iters: int = 368_750
    steps: tuple[int, ...] = (327_778, 355_092)
    gamma: float = 0.1
    warmup_iters: int = 10
    warmup_factor: float = 1.0
    clip_grad: float = 0.01  # full-model gradient-norm clipping
    amp: bool = True  # mixed precision (GPU only)


@dataclass(frozen=True)
class LossConfig:
    class_weight: float = 2.0
    mask_weight: float = 5.0
    dice_weight: float = 5.0
    no_object_weight: float = 0.1
    num_points: int = 12544
    oversample_ratio: float = 3.0
    importance_sample_ratio: float = 0.75


@dataclass(frozen=True)
class TrainConfig:
    name: str
    model: str
    weights: str = "clip"  # "clip": open_clip's pretrained CLIP + a new head; "random"; or a checkpoint to fine-tune
    data: DataConfig = field(default_factory=DataConfig)
    solver: SolverConfig = field(default_factory=SolverConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    checkpoint_every: int = 5000
    eval_every: int = 0  # PQ on the first `eval_images` images of the val split at these checkpoints (0: never)
    eval_images: int = 50
    keep_checkpoints: int = 3
    log_every: int = 20  # a Ray report per window; Ray Train collects them ~every 2 s, shorter windows stall
    max_failures: int = 3
    seed: int = 0


def load_train_config(spec: str | Path) -> TrainConfig:
    """A training config with strict keys: the name of a packaged one (``fcclip-tiny-synthetic``, see
    ``fcclip.config.list_train_configs``) or a path to a YAML file."""
    path = train_config_path(spec)
    with open(path) as f:
        raw = yaml.safe_load(f) or {}
    nested = {"data": DataConfig, "solver": SolverConfig, "loss": LossConfig}
    top = {k: v for k, v in raw.items() if k not in nested}
    if not raw.get("model"):
        raise ConfigError(f"{path}: 'model' is required (a preset name or a model YAML)")
    cfg = build_strict(TrainConfig, {**top, "name": raw.get("name", path.stem), "model": raw.get("model")}, str(path))
    return dataclasses.replace(
        cfg, **{k: build_strict(c, raw.get(k), f"{path}: {k}") for k, c in nested.items()}
    )


def lr_factor(iteration: int, solver: SolverConfig) -> float:
    """detectron2's WarmupMultiStepLR: linear warmup from warmup_factor, then x gamma at each step."""
    factor = solver.gamma ** sum(1 for s in solver.steps if iteration >= s)
    if iteration < solver.warmup_iters:
        alpha = iteration / solver.warmup_iters
        factor *= solver.warmup_factor * (1 - alpha) + alpha
    return factor


def param_groups(model, solver: SolverConfig) -> list[dict]:
    """Trainable parameters with the reference's weight decay (none on norm layers and nn.Embedding tables), one
    group per (learning rate, weight decay): two or three groups, not one per tensor (~300 for the paper's model),
    so the optimizer's multi-tensor step handles each group in a few kernel launches. Within a group the parameters
    keep the model's order."""
    norm_types = (
        torch.nn.LayerNorm, torch.nn.GroupNorm, torch.nn.BatchNorm2d, torch.nn.BatchNorm1d, torch.nn.LocalResponseNorm,
    )
    groups: dict[tuple[float, float], dict] = {}
    for p, wd in _trainable(model, solver, norm_types):
        groups.setdefault((solver.lr, wd), {"params": [], "weight_decay": wd, "lr": solver.lr})["params"].append(p)
    return list(groups.values())


def _trainable(model, solver: SolverConfig, norm_types) -> list[tuple[torch.nn.Parameter, float]]:
    """(parameter, weight decay) of each trainable parameter, in the model's order (``model.modules()``)."""
    out, seen = [], set()
    for module in model.modules():
        for p in module.parameters(recurse=False):
            if not p.requires_grad or id(p) in seen:
                continue
            seen.add(id(p))
            wd = solver.weight_decay
            if isinstance(module, norm_types):
                wd = solver.weight_decay_norm
            elif isinstance(module, torch.nn.Embedding):
                wd = solver.weight_decay_embed
            out.append((p, wd))
    return out


def load_optimizer_state(optimizer: torch.optim.Optimizer, state: dict, model, solver: SolverConfig) -> None:
    """Load an optimizer state dict into the optimizer of `param_groups`, also one written with a parameter group per
    tensor (as runs did before the groups were merged): each tensor's state is then mapped by the model's order.
    The state's tensors go to each parameter's device (a checkpoint written on a CPU resumes on a GPU and back)."""
    saved = state["param_groups"]
    if len(saved) != len(optimizer.param_groups) and all(len(g["params"]) == 1 for g in saved):
        norm_types = (torch.nn.LayerNorm, torch.nn.GroupNorm, torch.nn.BatchNorm2d, torch.nn.BatchNorm1d,
                      torch.nn.LocalResponseNorm)
        model_index = {id(p): i for i, (p, _) in enumerate(_trainable(model, solver, norm_types))}
        old_index = [g["params"][0] for g in saved]  # saved group i held the model's i-th trainable tensor
        if sorted(old_index) != list(range(len(model_index))):
            raise ValueError(f"the checkpoint's optimizer has {len(saved)} tensors, the model {len(model_index)}")
        by_tensor = {g["params"][0]: g for g in saved}
        groups, states, j = [], {}, 0
        for group in optimizer.param_groups:
            indices = []
            for p in group["params"]:
                i = model_index[id(p)]
                if i in state["state"]:
                    states[j] = state["state"][i]
                indices.append(j)
                j += 1
            first = by_tensor[model_index[id(group["params"][0])]]
            groups.append({**first, "params": indices})
        state = {"state": states, "param_groups": groups}
    optimizer.load_state_dict(state)


# ---------------------------------------------------------------------------------------------------- data
class Samples(torch.utils.data.IterableDataset):
    """An endless stream of augmented training samples of a COCO tree for one worker; each loader process draws its
    own. `class_index`: the tree's category id -> training class index (not the tree's own order when the training
    vocabulary is a union, see ``--mix``)."""

    def __init__(self, root: str, split: str, data: DataConfig, seed: int, class_index: dict[int, int]):
        self.root, self.split, self.data, self.seed = root, split, data, seed
        self.class_index = class_index

    def __iter__(self):
        ds = CocoPanoptic(self.root, self.split)
        records = filter_empty(ds.records()) if self.data.filter_empty else ds.records()
        remap = np.array([self.class_index[c["id"]] for c in ds.categories], dtype=np.int64)  # tree's -> training
        info = torch.utils.data.get_worker_info()
        rng = np.random.default_rng([self.seed, info.id if info else 0])
        while True:
            record = records[int(rng.integers(len(records)))]
            image, masks, classes, iscrowd = ds.load(record)
            yield train_sample(
                image, masks, remap[classes], iscrowd, rng, image_size=self.data.image_size,
                min_scale=self.data.min_scale, max_scale=self.data.max_scale,
            )


def _loader(source: dict, cfg: TrainConfig, batch_size: int | None, seed: int, pin: bool = False):
    """A COCO source's loader: batches of `batch_size`, or single samples (``None``); `pin`: batches in pinned
    memory (for a GPU)."""
    return torch.utils.data.DataLoader(
        Samples(source["uri"], cfg.data.split, cfg.data, seed, source["class_index"]),
        batch_size=batch_size,
        num_workers=cfg.data.loader_workers,
        collate_fn=collate if batch_size else _as_is,
        persistent_workers=cfg.data.loader_workers > 0,
        prefetch_factor=2 if cfg.data.loader_workers > 0 else None,
        pin_memory=pin and bool(batch_size),
    )


def _as_is(sample: dict) -> dict:
    """The loader's collate function for single samples (picklable, unlike a lambda)."""
    return sample


def _batches(w: _Worker, sources: list[dict], start: int) -> tuple[Any, MixedSamples | None]:
    """The worker's batches: from its one source, or drawn from two by share, then also the `MixedSamples` whose
    counts say how many samples came from each. A restarted worker group gets a fresh data stream: its seeds
    include the iteration it starts at.

    Every worker draws the same sequence of sources (the draws' seed leaves the rank out); its samples are its own
    (its own shard of the labeling output, its own COCO stream). Ray Train's streaming split hands a labeling
    output's rows to all workers together, and each pass over them starts on all workers at once: a worker that
    asked for its next pseudo-label while another did not would wait for it, and that one waits in the gradient
    all-reduce for the first, for ever.
    """
    seed = w.cfg.seed * 100_003 + w.rank * 7919 + start

    def stream(source: dict, batch_size: int | None):
        if source["kind"] == "labels":  # Ray Data streams this worker's share of the labeling output's samples
            shard = ray.train.get_dataset_shard("labels")
            return stream_batches(shard, batch_size) if batch_size else stream_samples(shard)
        return iter(_loader(source, w.cfg, batch_size, seed, pin=w.device.type == "cuda"))

    if len(sources) == 1:
        return stream(sources[0], w.per_worker_batch), None
    mixed = MixedSamples({s["kind"]: stream(s, None) for s in sources}, {s["kind"]: s["share"] for s in sources},
                         seed=[w.cfg.seed, start])
    return collate_batches(mixed, w.per_worker_batch), mixed


# ---------------------------------------------------------------------------------------------------- the loop
@dataclass
class _Worker:
    """What one Ray Train worker trains with."""

    cfg: TrainConfig
    rank: int
    world: int
    device: torch.device
    model: torch.nn.Module
    vocabulary: Any
    text: torch.Tensor  # the training vocabulary's text classifier
    criterion: torch.nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LambdaLR
    scaler: torch.amp.GradScaler
    use_amp: bool

    @property
    def per_worker_batch(self) -> int:
        return max(1, self.cfg.solver.batch_size // self.world)


def _build_worker(cfg: TrainConfig, vocabulary: Vocabulary) -> _Worker:
    """Model, text classifier of the training vocabulary, criterion, optimizer, schedule and grad scaler."""
    ctx = ray.train.get_context()
    device = ray.train.torch.get_device()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = build_model(cfg.model, weights=cfg.weights, device=device)
    use_tf32(device)
    text = build_text_classifier(
        model.backbone, vocabulary, train_vocabulary=vocabulary, cache=TextClassifierCache(enabled=False)
    )
    criterion = build_ignore_criterion(
        len(vocabulary), class_weight=cfg.loss.class_weight, mask_weight=cfg.loss.mask_weight,
        dice_weight=cfg.loss.dice_weight, no_object_weight=cfg.loss.no_object_weight,
        dec_layers=model.sem_seg_head.predictor.num_layers + 1, num_points=cfg.loss.num_points,
        oversample_ratio=cfg.loss.oversample_ratio, importance_sample_ratio=cfg.loss.importance_sample_ratio,
    ).to(device)
    optimizer = torch.optim.AdamW(param_groups(model, cfg.solver), lr=cfg.solver.lr)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda it: lr_factor(it, cfg.solver))
    use_amp = cfg.solver.amp and device.type == "cuda"
    return _Worker(
        cfg=cfg, rank=ctx.get_world_rank(), world=ctx.get_world_size(), device=device, model=model,
        vocabulary=vocabulary, text=text, criterion=criterion, optimizer=optimizer, scheduler=scheduler,
        scaler=torch.amp.GradScaler("cuda", enabled=use_amp), use_amp=use_amp,
    )


def _restore(w: _Worker) -> tuple[int, str | None]:
    """Continue from Ray Train's latest checkpoint, if any: (the iteration to start at, a TensorBoard folder that
    holds the run's history so far on rank 0)."""
    checkpoint = ray.train.get_checkpoint()
    if checkpoint is None:
        torch.manual_seed(w.cfg.seed + w.rank)  # every device's generator
        random.seed(w.cfg.seed + w.rank)
        return 0, None
    tensorboard_dir = None
    with checkpoint_files(checkpoint) as d:
        load_weights(w.model, os.path.join(d, "model.pth"))
        state = torch.load(os.path.join(d, "state.pt"), map_location="cpu", weights_only=True)
        if w.rank == 0 and os.path.isdir(os.path.join(d, "tensorboard")):  # keep the run's history
            tensorboard_dir = tempfile.mkdtemp(prefix="fcclip-tb-")
            shutil.copytree(os.path.join(d, "tensorboard"), tensorboard_dir, dirs_exist_ok=True)
    start = restore_state(w, state)
    logger.info("rank %d resumes at iteration %d", w.rank, start)
    return start, tensorboard_dir


@contextlib.contextmanager
def checkpoint_files(checkpoint: ray.train.Checkpoint):
    """A local folder holding `checkpoint`'s files, for this process alone while the context lasts.

    Not ``Checkpoint.as_directory()``: for a checkpoint on S3 or GCS it gives every process of a node one shared
    folder, and a process that finds no download in progress downloads again into it. Two ranks on one node that
    resume together then race: the second rewrites ``model.pth`` while the first reads it, and the first fails with
    "...not saved properly..." (ray-project/ray#48726, open). Here each process downloads into a folder of its own, removed afterwards; a checkpoint
    on a local or shared file system is read where it is."""
    if isinstance(checkpoint.filesystem, pyarrow.fs.LocalFileSystem):
        yield checkpoint.path
        return
    folder = tempfile.mkdtemp(prefix="fcclip-checkpoint-")
    try:
        yield checkpoint.to_directory(folder)
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def training_state(w: _Worker, iteration: int, rng_states: list[dict], train_config: dict) -> dict:
    """What a checkpoint's ``state.pt`` holds besides the model: optimizer, schedule, grad scaler (empty without
    mixed precision), the iteration, every rank's random states (`gather_rng_states`) and the config."""
    return {
        "optimizer": w.optimizer.state_dict(),
        "scheduler": w.scheduler.state_dict(),
        "scaler": w.scaler.state_dict(),
        "iteration": iteration,
        "rng": rng_states,
        "config": json.dumps(train_config),
    }


def restore_state(w: _Worker, state: dict) -> int:
    """Load `training_state`'s dict (as ``torch.load(map_location="cpu", weights_only=True)`` gives it) into the
    worker, on whatever device the worker has; returns the iteration to start at.

    A checkpoint may come from another device: the optimizer's tensors go to the parameters' device; a grad-scaler
    state written without mixed precision (a CPU run: empty) leaves an enabled scaler as it starts; each rank takes
    its own random states, and a rank the checkpoint has none for (more workers than it was written with, a GPU
    rank after a CPU run for its CUDA generator) is seeded from (seed, rank, iteration): ranks never draw alike.
    """
    load_optimizer_state(w.optimizer, state["optimizer"], w.model, w.cfg.solver)
    w.scheduler.load_state_dict(state["scheduler"])
    if len(w.scheduler.base_lrs) != len(w.optimizer.param_groups):  # written with a parameter group per tensor
        w.scheduler.base_lrs = [g["initial_lr"] for g in w.optimizer.param_groups]
        w.scheduler._last_lr = [g["lr"] for g in w.optimizer.param_groups]
    if state.get("scaler") and w.scaler.is_enabled():
        w.scaler.load_state_dict(state["scaler"])
    start = int(state["iteration"])
    # checkpoints from before every rank's states were saved hold rank 0's CPU generator only ("torch_rng")
    states = state.get("rng") or [{"cpu": t} for t in state.get("torch_rng", [])[:1]]
    restore_rng(states, w.rank, w.device, fallback_seed=_seed(w.cfg.seed, w.rank, start))
    return start


def _seed(*parts: int) -> int:
    return int(np.random.SeedSequence(list(parts)).generate_state(1)[0])


def rng_state(device: torch.device) -> dict:
    """This process's random states, as tensors and plain values (``torch.load(weights_only=True)`` reads them):
    torch's CPU generator, the CUDA generator of ``device`` (on a GPU: point sampling draws there), Python's
    ``random`` and numpy's global generator."""
    keys, pos, has_gauss, gauss = np.random.get_state()[1:]
    out = {
        "cpu": torch.get_rng_state(),
        "python": random.getstate(),
        "numpy": [torch.from_numpy(keys.astype(np.int64)), int(pos), int(has_gauss), float(gauss)],
    }
    if device.type == "cuda":
        out["cuda"] = torch.cuda.get_rng_state(device)
    return out


def gather_rng_states(device: torch.device) -> list[dict]:
    """Every rank's `rng_state`, in rank order (an all-gather: every rank calls it together)."""
    import torch.distributed as dist

    mine = rng_state(device)
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return [mine]
    states: list = [None] * dist.get_world_size()
    dist.all_gather_object(states, mine)
    return states


def restore_rng(states: list[dict], rank: int, device: torch.device, fallback_seed: int) -> None:
    """Restore ``states[rank]`` (`rng_state`'s dict). Each generator without a saved state (no entry for this
    rank, or a key missing from it) is seeded from ``fallback_seed`` instead."""
    mine = states[rank] if rank < len(states) else {}
    if "cpu" in mine:
        torch.set_rng_state(mine["cpu"])
    else:
        torch.manual_seed(fallback_seed)
    if "python" in mine:
        version, internal, gauss = mine["python"]
        random.setstate((version, tuple(internal), gauss))
    else:
        random.seed(fallback_seed)
    if "numpy" in mine:
        keys, pos, has_gauss, gauss = mine["numpy"]
        np.random.set_state(("MT19937", keys.numpy().astype(np.uint32), pos, has_gauss, gauss))
    else:
        np.random.seed(fallback_seed % 2**32)
    if device.type == "cuda":
        if mine.get("cuda") is not None:
            torch.cuda.set_rng_state(mine["cuda"], device)
        else:
            torch.cuda.manual_seed(fallback_seed)


def _step(w: _Worker, net: torch.nn.Module, batch: dict, params: list) -> tuple[torch.Tensor, dict]:
    """One optimizer step on a batch; (the weighted total loss, the loss terms)."""
    inference = w.model.config.inference
    images = normalize_images(_to_device(batch["images"], w.device), batch["image_sizes"], inference.pixel_mean,
                              inference.pixel_std)
    targets = [{k: _to_device(v, w.device) for k, v in t.items()} for t in batch["targets"]]
    w.model.train()
    with torch.autocast(w.device.type, dtype=torch.float16, enabled=w.use_amp):
        out = net(images, w.text)
    losses = w.criterion(outputs_from_model(out), targets)
    total, _ = weighted_total(losses, w.criterion.weight_dict)
    w.optimizer.zero_grad(set_to_none=True)
    w.scaler.scale(total).backward()
    w.scaler.unscale_(w.optimizer)
    torch.nn.utils.clip_grad_norm_(params, w.cfg.solver.clip_grad)
    w.scaler.step(w.optimizer)
    w.scaler.update()
    w.scheduler.step()
    return total, losses


def _to_device(t: torch.Tensor, device: torch.device) -> torch.Tensor:
    """A batch tensor on the worker's device; to a GPU from pinned memory without blocking (the COCO loader pins
    its batches; others are pinned here)."""
    if device.type != "cuda":
        return t.to(device)
    return (t if t.is_pinned() else t.pin_memory()).to(device, non_blocking=True)


@dataclass
class _Window:
    """Throughput over the iterations since the last report."""

    started: float = field(default_factory=time.perf_counter)
    data_wait: float = 0.0
    iterations: int = 0

    def metrics(self, w: _Worker) -> dict:
        elapsed = time.perf_counter() - self.started
        per_second = 1 / elapsed if elapsed else 0.0
        out = {
            "iters_per_s": self.iterations * per_second,
            "samples_per_s": self.iterations * w.per_worker_batch * w.world * per_second,
            "data_wait_share": self.data_wait * per_second,
            "max_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,  # this worker's peak (KiB)
        }
        if w.device.type == "cuda":
            out["gpu_max_allocated_mb"] = torch.cuda.max_memory_allocated(w.device) / 2**20
        return out


def _report(w: _Worker, metrics: dict, it: int, train_config: dict, writer, save: bool) -> None:
    """``ray.train.report`` the metrics; with ``save``, rank 0 adds a checkpoint of everything needed to resume."""
    if not save:
        ray.train.report(metrics)
        return
    rng_states = gather_rng_states(w.device)  # every rank's, on every rank (a collective)
    with tempfile.TemporaryDirectory() as d:
        checkpoint = None
        if w.rank == 0:
            torch.save({"model": official_state_dict(w.model, len(w.vocabulary))}, os.path.join(d, "model.pth"))
            torch.save(training_state(w, it, rng_states, train_config), os.path.join(d, "state.pt"))
            if writer is not None:
                shutil.copytree(writer.logdir, os.path.join(d, "tensorboard"), dirs_exist_ok=True)
            checkpoint = ray.train.Checkpoint.from_directory(d)
        ray.train.report(metrics, checkpoint=checkpoint)


def _buffers_change(model: torch.nn.Module) -> bool:
    """Whether a training forward updates some buffer (a BatchNorm in training mode that tracks statistics)."""
    return any(isinstance(m, torch.nn.modules.batchnorm._BatchNorm) and m.training and m.track_running_stats
               for m in model.modules())


def train_loop_per_worker(config: dict) -> None:
    """Runs on every Ray Train worker."""
    cfg = _config_from_dict(config["train"])
    sources, max_iters = config["sources"], config["max_iters"]
    coco = next((s for s in sources if s["kind"] == "coco"), None)  # its val split gives the periodic PQ
    w = _build_worker(cfg, Vocabulary.from_dict(config["vocabulary"]))
    start, tensorboard_dir = _restore(w)

    w.model.train()
    # buffers are broadcast from rank 0 before each forward only where training changes them (BatchNorm statistics;
    # the frozen CLIP stays in eval mode)
    net = ray.train.torch.prepare_model(w.model, parallel_strategy_kwargs={
        "find_unused_parameters": False, "broadcast_buffers": _buffers_change(w.model)})
    loader, mixed = _batches(w, sources, start)
    params = [p for p in w.model.parameters() if p.requires_grad]
    writer = _tensorboard(w.rank, tensorboard_dir)
    window = _Window()

    for iteration in range(start, max_iters):
        t0 = time.perf_counter()
        batch = next(loader)
        window.data_wait += time.perf_counter() - t0
        total, losses = _step(w, net, batch, params)
        window.iterations += 1

        it = iteration + 1
        save = it == max_iters or it % cfg.checkpoint_every == 0
        if not (save or it % cfg.log_every == 0):
            continue
        metrics = {
            "iteration": it,
            "start_iteration": start,  # where this worker group (re)started: > 0 after a restart or --resume
            "loss": float(total.detach()),
            **{k: float(losses[k].detach()) for k in ("loss_ce", "loss_mask", "loss_dice")},
            "lr": w.optimizer.param_groups[0]["lr"],
            **window.metrics(w),
        }
        if mixed is not None:  # samples this worker drew from each source since it (re)started
            metrics.update({f"samples_from_{k}": n for k, n in mixed.counts.items()})
        window = _Window()
        if not all(math.isfinite(v) for v in metrics.values()):
            raise FloatingPointError(f"non-finite training metrics at iteration {it}: {metrics}")
        if writer is not None:
            for k, v in metrics.items():
                if k != "iteration":
                    writer.add_scalar(f"train/{k}", v, it)
            writer.flush()
        if save and w.rank == 0 and cfg.eval_every and it % cfg.eval_every == 0 and coco is not None:
            metrics["val_pq"] = validation_pq(w.model, coco["uri"], cfg, Vocabulary.from_dict(coco["vocabulary"]))
            w.model.train()
        _report(w, metrics, it, config["train"], writer, save)


def validation_pq(model, root: str, cfg: TrainConfig, vocabulary) -> float:
    """PQ (0-1) of the model on the first ``cfg.eval_images`` images of the validation split, predicting with
    `vocabulary` (the tree's own, also when training on a union with ``--mix``)."""
    dataset = CocoPanoptic(root, cfg.data.val_split)
    predictor = Predictor(model, vocabulary, tasks=("panoptic",), text_cache=TextClassifierCache(enabled=False))
    acc = PanopticAccumulator(dataset.categories)
    for record in dataset.records()[: cfg.eval_images]:
        image = dataset.load(record)[0]
        with fsspec.open(record["panoptic_uri"], "rb") as f:
            gt_map = rgb2id(np.asarray(Image.open(f).convert("RGB")))
        pred = predictor(image).panoptic
        acc.update(gt_map, record["segments_info"], pred.segment_map,
                   [{"id": s["id"], "category_id": s["category_id"]} for s in pred.segments])
    pq = acc.result()["All"]["pq"]
    return float(pq) if pq is not None else 0.0


def _tensorboard(rank: int, logdir: str | None = None):
    """A TensorBoard writer on rank 0 when tensorboardX is installed (it is optional), else None."""
    if rank != 0:
        return None
    try:
        from tensorboardX import SummaryWriter
    except ImportError:
        return None
    return SummaryWriter(logdir or tempfile.mkdtemp(prefix="fcclip-tb-"))


def _config_from_dict(d: dict) -> TrainConfig:
    return dataclasses.replace(
        TrainConfig(name=d["name"], model=d["model"]),
        **{k: v for k, v in d.items() if k not in ("data", "solver", "loss", "name", "model")},
        data=DataConfig(**d["data"]),
        solver=SolverConfig(**{**d["solver"], "steps": tuple(d["solver"]["steps"])}),
        loss=LossConfig(**d["loss"]),
    )


# ---------------------------------------------------------------------------------------------------- driver
def run_train(
    cfg: TrainConfig,
    data_root: str,
    storage: str,
    *,
    num_workers: int = 1,
    gpus_per_worker: float | None = None,
    cpus_per_worker: float = 1.0,
    gpu_wait: float = runtime.GPU_WAIT_S,
    max_iters: int | None = None,
    resume: bool = False,
    address: str | None = None,
    name: str | None = None,
    num_cpus: int | None = None,
    callbacks: list | None = None,
    selection: LabelSelection = LabelSelection(),
    mix: MixSpec | None = None,
    data_version: int | None = None,
):
    """Train; returns (ray.train.Result, the final model checkpoint's URI).

    `data_root`: a COCO panoptic tree or a labeling output (detected). `selection`: which pseudo-labels of a
    labeling output to train on (min score, class map, keep, drop). `mix`: a second source of the other kind and
    its share of the samples (``--mix``).
    `callbacks`: `ray.train.UserCallback`s, run on the controller; they see every report of every worker (Ray
    Train keeps only the metrics that come with a checkpoint).
    A resume (`resume`) with other data, selection, vocabulary or model config than the run was started with is
    refused before Ray starts (`SettingsMismatch`, a ValueError; see `run_settings`).
    """
    check_gpus_per_worker(gpus_per_worker, num_workers)
    # the training workers run in other folders: a local path relative to this one must not reach them as it is
    data_root = _absolute(data_root)
    if mix is not None:
        mix = dataclasses.replace(mix, uri=_absolute(mix.uri))
    name = name or cfg.name
    storage = storage.rstrip("/")
    if "://" not in storage:
        storage = os.path.abspath(storage)
    run_dir = f"{storage}/{name}"
    if _exists(run_dir) and not resume:
        raise FileExistsError(f"{run_dir} already holds a training run: pass --resume to continue it, or --name")
    if resume and not _exists(run_dir):  # the KubeRay job's first run; or a typo'd --name / --storage: said
        logger.info("--resume: %s holds no training run yet: starting a new one", run_dir)
    recorded = _recorded_settings(run_dir) if resume else None
    if data_version is None and recorded is not None:
        # a resume goes on with the labels the run started on, not the version that nightly labeling has made
        # current since; another --version is another training (refused below once the run has a checkpoint)
        data_version = _labels_version(recorded["sources"])
        if data_version is not None:
            logger.info("resuming on version %d of the labeling output's table, the one the run started on",
                        data_version)
    training = open_training_sources(data_root, mix, split=cfg.data.split, synonyms=cfg.data.synonyms,
                                     selection=selection, version=data_version)
    by_kind = {s.kind: s for s in training.sources}
    if "coco" not in by_kind and cfg.eval_every:
        logger.info("eval_every is set but %s is a labeling output (no val split): no periodic validation PQ",
                    data_root)
    if mix is not None:
        logger.info("training vocabulary: %d classes (the union of %s); samples: %s", len(training.vocabulary),
                    " and ".join(f"{len(s.vocabulary)} of the {KINDS[s.kind]}" for s in training.sources),
                    ", ".join(f"{s.share:.0%} {s.kind}" for s in training.sources))
    settings = run_settings(cfg, training, selection)
    differences = _differences(recorded, settings) if recorded is not None else []
    if differences and _has_checkpoint(run_dir):
        raise SettingsMismatch(run_dir, differences)
    # joins address / $RAY_ADDRESS, else a new local Ray, with its dashboard: Ray Train asks its State API every
    # second whether the run's controller lives, and logs a warning each time it cannot
    started = runtime.init_ray(address, num_cpus, verbose=True, dashboard=True, tell_workers=True)
    try:
        return _train_on_ray(cfg, training, by_kind, selection, recorded, settings, run_dir, storage, address,
                             num_workers, gpus_per_worker, cpus_per_worker, gpu_wait, max_iters, name, callbacks)
    finally:  # Ray's last buffered worker lines come out here: the command's own last lines come after them
        runtime.shutdown_ray(started)


def _train_on_ray(cfg, training, by_kind, selection, recorded, settings, run_dir, storage, address, num_workers,
                  gpus_per_worker, cpus_per_worker, gpu_wait, max_iters, name, callbacks):
    gpus_per_worker = runtime.resolve_gpus(gpus_per_worker, address)  # asked for, never read off the cluster
    check_gpus_per_worker(gpus_per_worker, num_workers)
    resources = {"CPU": cpus_per_worker}
    if gpus_per_worker:
        resources["GPU"] = gpus_per_worker
    asked = (f"training workers: {num_workers} x " + (f"{gpus_per_worker:g} GPU + " if gpus_per_worker else "")
             + f"{cpus_per_worker:g} CPU, {'nccl' if gpus_per_worker else 'gloo'}")
    logger.info("%s", asked)
    if gpus_per_worker:  # all of them, granted (an autoscaler adds the nodes), or one line: never CPU instead
        runtime.wait_for_resources({"GPU": gpus_per_worker, "CPU": cpus_per_worker}, num_workers, gpu_wait, asked,
                                   flag="--gpus-per-worker")
    datasets = None
    if "labels" in by_kind:
        datasets = {"labels": label_dataset(
            by_kind["labels"], image_size=cfg.data.image_size, min_scale=cfg.data.min_scale,
            max_scale=cfg.data.max_scale, min_score=selection.min_score, seed=cfg.seed,
        )}
    trainer = TorchTrainer(
        train_loop_per_worker,
        train_loop_config={
            "train": dataclasses.asdict(cfg),
            "sources": [{"kind": s.kind, "uri": s.uri, "share": s.share, "class_index": s.class_index,
                         "vocabulary": s.vocabulary.to_dict()} for s in training.sources],
            "vocabulary": training.vocabulary.to_dict(),
            "max_iters": max_iters or cfg.solver.max_iters,
        },
        datasets=datasets,
        scaling_config=ray.train.ScalingConfig(
            num_workers=num_workers, use_gpu=gpus_per_worker > 0, resources_per_worker=resources
        ),
        run_config=ray.train.RunConfig(
            name=name,
            storage_path=storage,
            failure_config=ray.train.FailureConfig(max_failures=cfg.max_failures),
            checkpoint_config=ray.train.CheckpointConfig(num_to_keep=cfg.keep_checkpoints),
            callbacks=callbacks,
        ),
        torch_config=ray.train.torch.TorchConfig(backend="nccl" if gpus_per_worker else "gloo"),
    )
    # recorded when the run has none yet (a new run, also one started with --resume as the KubeRay job does, or one
    # from before they were recorded: its resumes are checked from now on) or trained nothing with the recorded ones;
    # last, so that a command refused above (a typo) leaves no file that blocks its corrected re-run
    if recorded != settings:
        _record_settings(run_dir, settings)
    result = _fit(trainer)
    if result.checkpoint is None:
        raise RuntimeError(f"training finished without a checkpoint: {result.error}")
    final = f"{result.checkpoint.path.rstrip('/')}/model.pth"
    if "://" not in final and "://" in storage:
        final = f"{storage.split('://', 1)[0]}://{final}"
    return result, final


def _fit(trainer):
    """``trainer.fit()`` in a thread of its own. In the main thread Ray Train sets a SIGINT handler of its own (a
    "graceful abort" after which the command ended with status 1 in Ray's words, the handler left in place); here
    Ctrl-C stays the command's, as SIGTERM is: it ends the wait in the main thread, the command says so in one line
    with status 130, and the run's checkpoints stay for --resume."""
    box: dict = {}

    def fit():
        try:
            box["result"] = trainer.fit()
        except BaseException as e:  # raised again in the main thread
            box["error"] = e

    thread = threading.Thread(target=fit, name="fcclip-train-fit", daemon=True)
    thread.start()
    while thread.is_alive():
        thread.join(timeout=0.5)
    if "error" in box:
        raise box["error"]
    return box["result"]


def check_gpus_per_worker(gpus_per_worker: float | None, num_workers: int) -> None:
    """Refuse a fractional GPU per worker with more than one worker (ValueError, one line): workers with GPUs
    all-reduce over NCCL, which cannot have two ranks on one GPU ("Duplicate GPU detected"). One worker may share
    a GPU."""
    if gpus_per_worker and num_workers > 1 and gpus_per_worker != int(gpus_per_worker):
        raise ValueError(f"--gpus-per-worker {gpus_per_worker:g} with {num_workers} workers: the workers all-reduce "
                         "over NCCL, which needs a GPU of its own for each (two ranks on one GPU fail with "
                         "'Duplicate GPU detected'); give whole GPUs, or --num-workers 1")


def _exists(uri: str) -> bool:
    fs, path = fsspec.core.url_to_fs(uri)
    return fs.exists(path)


# ---------------------------------------------------------------------------------------------------- run settings
SETTINGS_FILE = "fcclip_train.json"  # in the run folder, next to Ray Train's files
# the config's fields that say what the class head learns from what (a resume may change the others: --max-iters
# extends a run, lr, steps or checkpoint_every may be tuned for its rest)
_MODEL_FIELDS = ("name", "model", "data.split", "data.image_size", "data.synonyms", "solver.batch_size")


def run_settings(cfg: TrainConfig, training: TrainingSources, selection: LabelSelection) -> dict:
    """What a run trains on and what it trains, as JSON: the sources (kind, URI, share), the pseudo-label
    selection, the training vocabulary (the meaning of each class of the head) and the config's model and data
    fields. A resume that changes any of them would continue the run's checkpoint as another training, under the
    same name; `run_train` records them when the run starts and refuses such a resume (`SettingsMismatch`)."""
    config = dataclasses.asdict(cfg)
    sources = []
    for s in training.sources:
        sources.append({"kind": s.kind, "uri": _absolute(s.uri), "share": s.share})
        if s.output is not None and s.output.version is not None:  # a labeling output's table: which version
            sources[-1]["version"] = s.output.version
    settings = {
        "sources": sources,
        "selection": dataclasses.asdict(selection),
        "vocabulary": training.vocabulary.to_dict(),
        "config": {key: _field(config, key) for key in _MODEL_FIELDS},
    }
    return json.loads(json.dumps(settings))  # as read back from the file: lists, not tuples


def _absolute(uri: str) -> str:
    """A local path made absolute (for the workers, and a run resumed from another folder names the same data), a
    URI as it is."""
    return uri if "://" in uri else os.path.abspath(uri)


def _field(config: dict, dotted: str):
    """`config`'s value at a dotted key (``data.image_size``)."""
    for key in dotted.split("."):
        config = config[key]
    return config


class SettingsMismatch(ValueError):
    """``--resume`` with other settings than the run was started with (`run_settings`): one line that names each
    setting that differs, the run's value and the command's."""

    def __init__(self, run_dir: str, differences: list[tuple[str, str, str]]):
        self.differences = differences
        said = "; ".join(f"{what} {old} (this command says {new})" for what, old, new in differences)
        super().__init__(f"{run_dir} was trained with {said}: resume with the run's settings, or start a new run "
                         "with --name")


def _differences(recorded: dict, settings: dict) -> list[tuple[str, str, str]]:
    """(setting as the command line or config names it, the run's value, the command's) for each that differs."""
    out = []

    def differ(what: str, old, new, text=str) -> None:
        if old != new:
            out.append((what, text(old), text(new)))

    (old_data, *old_mix), (new_data, *new_mix) = recorded["sources"], settings["sources"]
    kinds = old_data["kind"] != new_data["kind"]  # the same URI may hold other data now
    differ("--data", (old_data["uri"], old_data["kind"]), (new_data["uri"], new_data["kind"]),
           lambda s: s[0] + (f" (a {KINDS[s[1]]})" if kinds else ""))

    def unversioned(sources: list[dict]) -> list[dict]:
        return [{k: v for k, v in s.items() if k != "version"} for s in sources]

    differ("--mix", unversioned(old_mix), unversioned(new_mix),
           lambda s: f"{s[0]['kind']}={s[0]['uri']}:{s[0]['share']:g}" if s else "none")
    # the labeling output's table version, where the run recorded one (runs from before it resume unchecked on it)
    old_version, new_version = _labels_version(recorded["sources"]), _labels_version(settings["sources"])
    if old_version is not None:
        differ("--version", old_version, new_version, lambda v: "(a folder of part files, no table)" if v is None
               else str(v))
    old_selection, new_selection = recorded["selection"], settings["selection"]
    differ("--min-score", old_selection["min_score"], new_selection["min_score"], lambda v: f"{v:g}")
    differ("--class-map", old_selection["class_map"], new_selection["class_map"],
           lambda pairs: " ".join(f"{a}={b}" for a, b in pairs) or "none")
    for flag in ("keep", "drop"):
        differ(f"--{flag}", old_selection[flag], new_selection[flag], lambda names: "; ".join(names) or "none")
    old_classes, new_classes = _classes(recorded["vocabulary"]), _classes(settings["vocabulary"])
    if old_classes != new_classes:  # the class head's classes would mean other things
        out.append(("a vocabulary of", _classes_text(old_classes, new_classes),
                    _classes_text(new_classes, old_classes)))
    for key in _MODEL_FIELDS:
        differ(f"the config's {key}", recorded["config"][key], settings["config"][key])
    return out


def _labels_version(sources: list[dict]) -> int | None:
    """The table version recorded for the labeling output among `sources` (`run_settings`'s), if any."""
    return next((s.get("version") for s in sources if s["kind"] == "labels"), None)


def _classes(vocabulary: dict) -> list[tuple]:
    """What the class head's classes mean, in its order: id, names, thing or stuff (not the colours)."""
    return [(c["id"], tuple(c["names"]), bool(c["isthing"])) for c in vocabulary["categories"]]


def _classes_text(classes: list[tuple], other: list[tuple], most: int = 6) -> str:
    """`classes` against `other`, short (a vocabulary of 133 classes is no line): how many, and those `other` lacks,
    or their order when they are the same classes."""
    only = [c for c in classes if c not in other]
    if only:
        more = f" and {len(only) - most} more" if len(only) > most else ""
        return f"{len(classes)} classes with " + ", ".join(
            f"{cid} {'/'.join(names)}{'' if thing else ' [stuff]'}" for cid, names, thing in only[:most]) + more
    if len(classes) == len(other):
        ids = [str(c[0]) for c in classes]
        return f"{len(classes)} classes in the order " + ", ".join(ids[:2 * most]) + (", ..." if ids[2 * most:] else "")
    return f"{len(classes)} classes"


def _recorded_settings(run_dir: str) -> dict | None:
    """The settings the run at `run_dir` was started with, or None for a run without them (nothing there yet, or
    a run from before they were recorded: it resumes unchecked)."""
    uri = f"{run_dir}/{SETTINGS_FILE}"
    if not _exists(uri):
        return None
    try:
        with fsspec.open(uri, "r") as f:
            return json.load(f)
    except json.JSONDecodeError as e:  # a local write cut short
        raise ValueError(f"{uri} is not the JSON fcclip train writes ({e}): delete it to resume unchecked") from None


def _record_settings(run_dir: str, settings: dict) -> None:
    fs, path = fsspec.core.url_to_fs(run_dir)
    fs.makedirs(path, exist_ok=True)
    with fs.open(f"{path}/{SETTINGS_FILE}", "w") as f:
        json.dump(settings, f, indent=1)


def _has_checkpoint(run_dir: str) -> bool:
    """Whether Ray Train continues the run at `run_dir` from a checkpoint. A run that stopped before its first one
    trained nothing that other settings could be mixed with: its re-run with corrected settings starts afresh and
    records them. Ray Train's documented layout: each reported checkpoint is a ``checkpoint_*`` folder of the run's
    (not Result.from_path, which logs a paragraph; no private Ray module)."""
    fs, path = fsspec.core.url_to_fs(run_dir)
    return any(fs.find(folder) for folder in fs.glob(f"{path.rstrip('/')}/checkpoint_*") if fs.isdir(folder))


def _names(text: str) -> tuple[str, ...]:
    return tuple(n.strip() for n in text.split(";") if n.strip())


def main_args(args: argparse.Namespace) -> int:
    try:
        cfg = load_train_config(args.config)
        selection = LabelSelection(
            min_score=args.min_score, class_map=parse_class_map(args.class_map),
            keep=_names(args.keep), drop=_names(args.drop),
        )
        mix = parse_mix(args.mix) if args.mix else None
        result, final = run_train(
            cfg, args.data, args.storage, num_workers=args.num_workers, gpus_per_worker=args.gpus_per_worker,
            gpu_wait=args.gpu_wait,
            cpus_per_worker=args.cpus_per_worker, max_iters=args.max_iters, resume=args.resume,
            address=args.address, name=args.name, num_cpus=args.num_cpus, selection=selection, mix=mix,
            data_version=args.version,
        )
    except (ValueError, FileExistsError, FileNotFoundError) as e:
        print(f"fcclip train: error: {e}", file=sys.stderr)
        return 2
    except runtime.ResourcesNotGranted as e:
        print(f"fcclip train: error: {e}", file=sys.stderr)
        return 1
    metrics = result.metrics or {}
    print(
        f"trained to iteration {metrics.get('iteration')}: loss {metrics.get('loss', float('nan')):.4f}, "
        f"{metrics.get('iters_per_s', 0):.2f} it/s"
    )
    drawn = {k.removeprefix("samples_from_"): int(v) for k, v in metrics.items() if k.startswith("samples_from_")}
    if drawn:
        total = sum(drawn.values())
        print("samples drawn by worker 0 since it started: "
              + ", ".join(f"{k} {n} ({n / max(total, 1):.0%})" for k, n in drawn.items()))
    print(f"final checkpoint: {final}")
    return 0
