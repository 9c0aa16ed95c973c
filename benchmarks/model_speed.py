"""Speed and memory of FC-CLIP on a synthetic image: the model forward, the full predictor, and each stage.

    python benchmarks/model_speed.py --model fcclip-tiny --size 512
    python benchmarks/model_speed.py --model fcclip-convnext-large --size 640 --iters 3 --warmup 1 --json out.json

The model is built with random weights (nothing is downloaded), so the figures are those of the architecture; the
post-processing cost depends a little on how many masks survive its thresholds, which differs with trained weights
(the report gives the counts). The predictor resizes with ``short_edge=min(H, W), max_size=max(H, W)``, so the model
sees exactly the requested size (zero-padded to a multiple of 32) and the results are at that size too.

Measured:
    forward    ``model.inference(images, text)`` on a ready (B, 3, H, W) batch.
    predictor  ``Predictor.infer`` + ``Predictor.postprocess`` on decoded (H, W, 3) uint8 arrays: resize, normalise,
               pad, model, post-processing at the image's size. Decoding (``Predictor.preprocess``) is excluded.
    stages     the same work, called stage by stage on the same inputs: pre-processing, backbone, pixel decoder,
               transformer decoder (with the in-vocabulary class head), out-of-vocabulary branch + ensemble,
               post-processing. Each task's post-processing is also timed alone.
    one-time   building the model, hashing the text tower (the text cache's key) and encoding the vocabulary into the
               text classifier with the disk cache disabled.
    memory     per timed call, the largest over the calls: on CUDA ``torch.cuda.max_memory_allocated`` (reset before
               the call) against the memory allocated before it; on CPU the process's resident set before the call
               and its peak during the call. The peak (VmHWM, which is also what ``getrusage().ru_maxrss`` reports)
               is reset through ``/proc/self/clear_refs`` before each call; where that is not allowed it is the
               process's peak since its start, and the report says so.

Each timed round calls the forward, the predictor, the stages and each task's post-processing once, so all of them
see the same conditions (warm caches, other work on the machine); figures are medians over the rounds. The header
gives the load average before and after: on a shared machine, a load above the threads used means contended figures.
"""
from __future__ import annotations

import argparse
import contextlib
import datetime
import functools
import json
import os
import platform
import resource
import statistics
import sys
import time
import warnings
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F

from fcclip.build import build_model, resolve_device
from fcclip.datasets.synthetic import synthetic_image
from fcclip.ensemble import classification_logits, geometric_ensemble
from fcclip.precision import cpu_flags, resolve_autocast_dtype
from fcclip.predictor import TASKS, Predictor, pad_batch, resize_image
from fcclip.text import PROMPT_TEMPLATES, TextClassifierCache, build_text_classifier, text_tower_digest
from fcclip.vocabulary import load_vocabulary

DTYPES = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}
STAGES = (
    ("preprocess", "pre-processing (resize, normalise, pad)"),
    ("backbone", "backbone (frozen CLIP visual tower)"),
    ("pixel_decoder", "pixel decoder (deformable encoder + FPN)"),
    ("transformer_decoder", "transformer decoder (+ in-vocabulary class head)"),
    ("out_of_vocabulary", "out-of-vocabulary branch + ensemble"),
    ("postprocess", "post-processing"),
)
MODEL_STAGES = ("backbone", "pixel_decoder", "transformer_decoder", "out_of_vocabulary")
MIB = 1024 * 1024
MATCH_TOLERANCE = 1e-2  # class_logits are log-probabilities; the stages and model.inference run the same operations


class BenchmarkError(Exception):
    """A setting this machine cannot run (e.g. fp16 autocast on a CPU without it): reported, not a traceback."""


# ---------------------------------------------------------------------------------------------------- clocks, memory
def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def clock(device: torch.device) -> float:
    """A time stamp taken after the device has finished its queued work."""
    sync(device)
    return time.perf_counter()


def current_rss() -> int | None:
    """Resident set size of this process in bytes (Linux), else None."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return None


def reset_peak_rss() -> bool:
    """Reset the process's RSS high-water mark (Linux >= 4.0); False where that is not allowed."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def peak_rss() -> int:
    """The RSS high-water mark in bytes (ru_maxrss is KiB on Linux, bytes on macOS)."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak if sys.platform == "darwin" else peak * 1024


class MemoryProbe:
    """Peak memory of one call: the CUDA allocator's, or the process's resident set on a CPU."""

    def __init__(self, device: torch.device):
        self.device = device
        self.before = 0
        self.call_only = True

    def start(self) -> None:
        if self.device.type == "cuda":
            sync(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self.before = torch.cuda.memory_allocated(self.device)
        else:
            self.before = current_rss() or 0
            self.call_only = reset_peak_rss()

    def stop(self) -> dict:
        if self.device.type == "cuda":
            sync(self.device)
            peak = torch.cuda.max_memory_allocated(self.device)
            kind = "cuda max_memory_allocated"
        else:
            peak = peak_rss()
            kind = "process RSS, peak reset before each call" if self.call_only else "process RSS, peak since start"
        return {
            "kind": kind,
            "before_mib": self.before / MIB,
            "peak_mib": peak / MIB,
            "growth_mib": (peak - self.before) / MIB,
            "peak_is_per_call": self.call_only,
        }


def timed_call(fn: Callable[[], object], device: torch.device) -> tuple[float, dict, object]:
    """Seconds and memory of one call of ``fn``, and what it returned."""
    probe = MemoryProbe(device)
    probe.start()
    start = clock(device)
    result = fn()
    seconds = clock(device) - start
    return seconds, probe.stop(), result


# ---------------------------------------------------------------------------------------------------- the stages
def prepare_batch(predictor: Predictor, decoded: list) -> tuple[torch.Tensor, list[tuple[int, int]]]:
    """What ``Predictor.infer`` does before the model: (B, 3, H, W) normalised, padded batch and the resized sizes."""
    model = predictor.model
    tensors, sizes = [], []
    for img in decoded:
        resized = resize_image(img, predictor.short_edge, predictor.max_size)
        sizes.append(resized.shape[:2])
        t = torch.from_numpy(resized.copy()).to(predictor.device).permute(2, 0, 1).float()
        tensors.append(model.normalize(t))
    return pad_batch(tensors, model.config.inference.size_divisibility), sizes


def out_of_vocabulary(model, text, features, class_logits, mask_logits, classifier) -> torch.Tensor:
    """The part of ``FCCLIP.inference`` after the forward: mask-pooled CLIP embeddings, their classification and the
    geometric ensemble. Returns the ensembled class_logits (B, Q, K + 1). Checked against ``model.inference`` in :func:`run`."""
    inf = model.config.inference
    dense = features["clip_vis_dense"]
    masks_small = F.interpolate(mask_logits, size=dense.shape[-2:], mode="bilinear", align_corners=False)
    pooled = model.backbone.pooled_embeddings(dense, masks_small.to(dense.dtype))
    out_vocab_logits = classification_logits(
        pooled.to(classifier.dtype), classifier, model.backbone.logit_scale, text.synonym_class, text.num_classes
    )
    valid = (masks_small > 0).flatten(2).any(-1) if inf.ensemble_on_valid_mask else None
    return geometric_ensemble(class_logits, out_vocab_logits, text.seen, inf.alpha, inf.beta, valid=valid).log_probs


def run_stages(predictor: Predictor, decoded: list, autocast: Callable) -> tuple[dict[str, float], dict]:
    """One pass of the predictor's work, stage by stage. Returns each stage's seconds and the stage outputs."""
    model, text, device = predictor.model, predictor.text, predictor.device
    laps: dict[str, float] = {}
    last = clock(device)

    def lap(name: str) -> None:
        nonlocal last
        now = clock(device)
        laps[name] = now - last
        last = now

    images, sizes = prepare_batch(predictor, decoded)
    lap("preprocess")
    with torch.inference_mode():
        with autocast():
            features = model.backbone(images)
            lap("backbone")
            pd = model.sem_seg_head.pixel_decoder(features)
            lap("pixel_decoder")
            classifier = model.classifier_with_void(text)
            dec = model.sem_seg_head.predictor(
                pd.multi_scale, pd.mask_features, classifier, text.synonym_class, text.num_classes
            )
            lap("transformer_decoder")
            class_logits = out_of_vocabulary(model, text, features, dec.class_logits, dec.mask_logits, classifier)
            lap("out_of_vocabulary")
    padded = tuple(images.shape[-2:])
    predictions = [
        predictor.postprocess(class_logits[i], dec.mask_logits[i], sizes[i], padded, img.shape[:2])
        for i, img in enumerate(decoded)
    ]
    lap("postprocess")
    outputs = {"class_logits": class_logits, "mask_logits": dec.mask_logits, "sizes": sizes, "padded": padded,
               "predictions": predictions}
    return laps, outputs


# ---------------------------------------------------------------------------------------------------- the benchmark
def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    name = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            name = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), name)
    except OSError:
        pass
    return f"cpu: {name}, {os.cpu_count()} logical cores"


def autocast_factory(device: torch.device, dtype: torch.dtype | None) -> Callable:
    """A function returning a fresh autocast context (or a null one for fp32); raises if autocast refuses dtype."""
    if dtype is None:
        return contextlib.nullcontext
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        native = resolve_autocast_dtype(dtype, device) is not None
    if not native:  # the predictor would run float32 (fcclip.precision); timing emulated bf16 tells nothing
        raise BenchmarkError(
            f"{device_name(device)} has no native {dtype} (CPU flags: {', '.join(sorted(relevant_cpu_flags())) or 'none'}); "
            "the predictor runs such a request in float32, so there is nothing to measure"
        )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # older torch disables an unsupported CPU autocast dtype with a warning
        with torch.autocast(device.type, dtype=dtype):
            enabled = torch.is_autocast_enabled(device.type) and torch.get_autocast_dtype(device.type) == dtype
    if not enabled:
        raise BenchmarkError(f"torch {torch.__version__} has no {dtype} autocast on {device.type}")
    return lambda: torch.autocast(device.type, dtype=dtype)


CPU_FLAGS_SHOWN = ("avx2", "avx512f", "avx512_bf16", "avx512_fp16", "amx_bf16", "amx_fp16", "amx_tile")


def relevant_cpu_flags() -> list[str]:
    """The CPU's instruction-set flags that decide float32 / bf16 / fp16 speed (from /proc/cpuinfo)."""
    return sorted(cpu_flags() & set(CPU_FLAGS_SHOWN))


def per_image_ms(seconds: list[float], batch: int) -> float:
    """Median milliseconds per image (the median keeps one slow iteration on a shared machine from counting)."""
    return 1000 * statistics.median(seconds) / batch


def load_average() -> list[float] | None:
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:
        return None


def run(args: argparse.Namespace) -> dict:
    device = resolve_device(args.device)
    if args.threads:
        torch.set_num_threads(args.threads)
    height = args.height or args.size
    width = args.width or args.size
    tasks = tuple(t.strip() for t in args.tasks.split(",") if t.strip())
    autocast = autocast_factory(device, DTYPES[args.dtype])
    load_before = load_average()

    start = time.perf_counter()
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*random weights.*")
        model = build_model(args.model, weights="random", device=device)
    if args.channels_last:
        model.backbone.use_channels_last(True)
    if args.compile:
        model.compile_parts()
    one_time = {"build_model_s": time.perf_counter() - start}

    # the one-time text classifier, encoded in full precision as the Predictor does, with no disk cache
    vocabulary = load_vocabulary(args.vocab)
    cache = TextClassifierCache(enabled=False)
    start = clock(device)
    text_tower_digest(model.backbone)
    one_time["text_digest_s"] = clock(device) - start
    start = clock(device)
    build_text_classifier(
        model.backbone, vocabulary, train_vocabulary=model.config.inference.train_vocabulary, cache=cache
    )
    one_time["text_encoding_s"] = clock(device) - start

    def make_predictor(task_list) -> Predictor:
        # short_edge/max_size keep the image's own size; the classifier comes from the cache's memory
        return Predictor(
            model, vocabulary, short_edge=min(height, width), max_size=max(height, width), tasks=task_list,
            autocast_dtype=DTYPES[args.dtype], text_cache=cache,
        )

    predictor = make_predictor(tasks)
    decoded = [synthetic_image(seed, height, width) for seed in range(args.batch)]
    images, _ = prepare_batch(predictor, decoded)
    text = predictor.text

    last: dict = {}

    def forward():
        with torch.inference_mode(), autocast():
            last["forward"] = model.inference(images, text)

    def predict():
        out, sizes, padded = predictor.infer(decoded)
        return [
            predictor.postprocess(out.class_logits[i], out.mask_logits[i], sizes[i], padded, img.shape[:2])
            for i, img in enumerate(decoded)
        ]

    if args.dtype != "fp32":  # a first call that says clearly when this device cannot run the dtype
        try:
            forward()
        except RuntimeError as e:
            raise BenchmarkError(f"the model does not run under {args.dtype} autocast on {device.type}: {e}") from e

    def stages():
        laps, last["stages"] = run_stages(predictor, decoded, autocast)
        return laps

    def postprocess_alone(single: Predictor):
        out = last["stages"]
        for i, img in enumerate(decoded):
            single.postprocess(out["class_logits"][i], out["mask_logits"][i], out["sizes"][i], out["padded"], img.shape[:2])

    # every round calls each of these once, so they all see the same conditions (warm caches, other load)
    calls = {"forward": forward, "predictor": predict, "stages": stages}
    if len(tasks) > 1:  # each task's post-processing alone, on the outputs of the round's stages
        for task in tasks:
            calls[f"postprocess:{task}"] = functools.partial(postprocess_alone, make_predictor((task,)))
    for _ in range(args.warmup):
        for fn in calls.values():
            fn()
    seconds: dict[str, list[float]] = {name: [] for name in calls}
    memory: dict[str, list[dict]] = {name: [] for name in calls}
    stage_laps = []
    for _ in range(args.iters):
        for name, fn in calls.items():
            secs, mem, result = timed_call(fn, device)
            seconds[name].append(secs)
            memory[name].append(mem)
            if name == "stages":
                stage_laps.append(result)
    stages_ms = {name: per_image_ms([laps[name] for laps in stage_laps], args.batch) for name, _ in STAGES}
    postprocess_ms = {task: per_image_ms(seconds[f"postprocess:{task}"], args.batch) for task in tasks
                      if f"postprocess:{task}" in seconds}
    diff = (last["stages"]["class_logits"].float() - last["forward"].class_logits.float()).abs().max().item()
    prediction = last["stages"]["predictions"][0]
    return {
        "header": {
            "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
            "torch": torch.__version__,
            "device": device_name(device),
            "device_type": device.type,
            "cpu_flags": relevant_cpu_flags(),
            "channels_last": model.backbone.channels_last,
            "compiled": bool(args.compile),
            "threads": torch.get_num_threads(),
            "model": args.model,
            "weights": "random",
            "input": [height, width],
            "padded_input": list(images.shape[-2:]),
            "dtype": args.dtype,
            "batch": args.batch,
            "iters": args.iters,
            "warmup": args.warmup,
            "vocabulary": vocabulary.name,
            "classes": len(vocabulary.categories),
            "synonyms": sum(len(s) for s in vocabulary.synonyms),
            "prompts_per_synonym": len(PROMPT_TEMPLATES),
            "queries": model.config.head.num_queries,
            "tasks": list(tasks),
            "logical_cores": os.cpu_count(),
            "load_average_before": load_before,
            "load_average_after": load_average(),
        },
        "throughput": {
            name: {
                "ms_per_iter": [1000 * t for t in seconds[name]],
                "ms_per_image": per_image_ms(seconds[name], args.batch),
                "images_per_s": 1000 / per_image_ms(seconds[name], args.batch),
                # the call that grew memory most
                "memory": max(memory[name], key=lambda m: m["growth_mib"]),
            }
            for name in ("forward", "predictor")
        },
        "stages_ms_per_image": stages_ms,
        "stages_ms_per_iter": [{name: 1000 * t for name, t in laps.items()} for laps in stage_laps],
        "postprocess_alone_ms_per_image": postprocess_ms,
        "one_time": one_time,
        "stages_match_inference": {"max_abs_diff_class_logits": diff},
        "outputs": {
            "panoptic_segments": len(prediction.panoptic.segments) if prediction.panoptic else None,
            "instances": len(prediction.instances) if prediction.instances else None,
        },
    }


# ---------------------------------------------------------------------------------------------------- the report
def format_report(r: dict) -> str:
    h, tp, st = r["header"], r["throughput"], r["stages_ms_per_image"]
    fwd = tp["forward"]["ms_per_image"]
    lines = [
        f"## {h['model']}, {h['input'][0]}x{h['input'][1]}, {h['dtype']}, batch {h['batch']}",
        "",
        f"- date: {h['date']}; torch {h['torch']}; device: {h['device']}; threads: {h['threads']}",
        f"- CPU flags: {', '.join(h.get('cpu_flags') or []) or 'none of ' + ', '.join(CPU_FLAGS_SHOWN)}; backbone "
        f"channels-last: {h.get('channels_last')}; compiled: {h.get('compiled')}",
        f"- model: {h['model']} ({h['weights']} weights, {h['queries']} queries); input {h['input'][0]}x{h['input'][1]}"
        f" (padded {h['padded_input'][0]}x{h['padded_input'][1]}); dtype {h['dtype']}; batch {h['batch']}",
        f"- vocabulary: {h['vocabulary']} ({h['classes']} classes, {h['synonyms']} synonyms x"
        f" {h['prompts_per_synonym']} prompts); tasks: {', '.join(h['tasks'])}; {h['iters']} timed rounds after"
        f" {h['warmup']} warm-up (medians)",
        f"- load average (1, 5, 15 min) before: {h['load_average_before']}, after: {h['load_average_after']}"
        f" on {h['logical_cores']} logical cores (a load above the threads used means other work shared the CPU)",
        "",
        "| measure | ms / image | images / s | memory before | peak memory | peak - before |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for name, label in (("forward", "model forward (`model.inference`)"),
                        ("predictor", "predictor (pre-processing + model + post-processing)")):
        t = tp[name]
        m = t["memory"]
        lines.append(
            f"| {label} | {t['ms_per_image']:.1f} | {t['images_per_s']:.2f} | {m['before_mib']:.0f} MiB"
            f" | {m['peak_mib']:.0f} MiB | {round(m['growth_mib'])} MiB |"
        )
    memory_kind = tp["forward"]["memory"]["kind"]
    note = "" if tp["forward"]["memory"]["peak_is_per_call"] else " (the peak could not be reset before each call)"
    lines += [
        "",
        f"Memory: {memory_kind}{note}; the call with the largest growth.",
        "",
        "| stage | ms / image | vs forward |",
        "|---|---:|---:|",
    ]
    for name, label in STAGES:
        if name == "postprocess":
            model_sum = sum(st[s] for s in MODEL_STAGES)
            lines.append(f"| **sum of the model stages** | **{model_sum:.1f}** | {100 * model_sum / fwd:.0f}% |")
            lines.append(f"| model forward, measured whole | {fwd:.1f} | 100% |")
            label = f"{label} ({', '.join(h['tasks'])})"
        lines.append(f"| {label} | {st[name]:.1f} | {100 * st[name] / fwd:.0f}% |")
    for task, ms in r["postprocess_alone_ms_per_image"].items():
        lines.append(f"| &nbsp;&nbsp;{task} alone | {ms:.1f} | {100 * ms / fwd:.0f}% |")
    total = sum(st.values())
    lines.append(f"| **sum of all stages** | **{total:.1f}** | |")
    lines.append(f"| predictor, measured whole | {tp['predictor']['ms_per_image']:.1f} | |")
    o, out = r["one_time"], r["outputs"]
    diff = r["stages_match_inference"]["max_abs_diff_class_logits"]
    check = f"Stage outputs vs `model.inference`: max |diff| of class_logits = {diff:.2g}"
    if diff > MATCH_TOLERANCE:
        check += " -- THE STAGE SPLIT NO LONGER MATCHES FCCLIP.inference (update out_of_vocabulary)"
    lines += [
        "",
        "| one-time | s |",
        "|---|---:|",
        f"| build the model (random weights) | {o['build_model_s']:.2f} |",
        f"| hash the text tower (text cache key) | {o['text_digest_s']:.2f} |",
        f"| encode the vocabulary ({h['synonyms'] * h['prompts_per_synonym']} prompts, disk cache off)"
        f" | {o['text_encoding_s']:.2f} |",
        "",
        f"{check}. Kept by post-processing (image 0): {out['panoptic_segments']} panoptic segments,"
        f" {out['instances']} instances.",
    ]
    return "\n".join(lines)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    p.add_argument("--model", default="fcclip-tiny", help="preset name or preset YAML (default: fcclip-tiny)")
    p.add_argument("--size", type=int, default=512, help="square input size (default: 512)")
    p.add_argument("--height", type=int, help="input height (default: --size)")
    p.add_argument("--width", type=int, help="input width (default: --size)")
    p.add_argument("--dtype", choices=sorted(DTYPES), default="fp32", help="bf16/fp16: autocast around the model")
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--iters", type=int, default=5, help="timed rounds (forward, predictor, stages)")
    p.add_argument("--warmup", type=int, default=2, help="untimed rounds first")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:1, ... (default: auto)")
    p.add_argument("--threads", type=int, help="torch.set_num_threads (default: torch's)")
    p.add_argument("--vocab", default="ade20k_150", help="vocabulary (default: ade20k_150)")
    p.add_argument("--tasks", default=",".join(TASKS), help="comma-separated post-processing tasks")
    p.add_argument("--channels-last", action="store_true", help="run the ConvNeXt backbone channels-last (NHWC)")
    p.add_argument("--compile", action="store_true", help="torch.compile the model's parts (FCCLIP.compile_parts)")
    p.add_argument("--json", type=Path, help="also write the figures to this JSON file")
    args = p.parse_args(argv)
    tasks = [t.strip() for t in args.tasks.split(",") if t.strip()]
    if not tasks or set(tasks) - set(TASKS):
        p.error(f"--tasks: choose from {', '.join(TASKS)}")
    for name in ("size", "height", "width", "batch", "iters"):
        value = getattr(args, name)
        if value is not None and value < 1:
            p.error(f"--{name} must be >= 1")
    if args.warmup < 0:
        p.error("--warmup must be >= 0")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        result = run(args)
    except BenchmarkError as e:
        print(f"model_speed: {e}", file=sys.stderr)
        return 2
    print(format_report(result))
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(result, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
