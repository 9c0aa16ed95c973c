"""The labeling pipeline's stages: small callables on column batches, testable without Ray.

    ExpandShards  {shard}                       -> {shard, row, uri}
    ReadDecode    {shard, row, uri}             -> + pixels (resized RGB bytes), height/width (original), rh/rw, error
    LabelModel    (actor: model loaded once)    -> + segmap (segment ids at the original size), segments (JSON), model
    encode_masks  (CPU)                         -> {shard, row, record}: the output row as JSON, masks as COCO RLE

A row that fails at any stage carries its reason in ``error`` through the later stages and becomes an error row.
Stages hold only plain settings (no filesystem objects, no credentials); workers read object storage with the
credentials of their own environment.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import signal
import threading
import time
import traceback
import zlib
from contextlib import contextmanager
from dataclasses import dataclass

import numpy as np

logger = logging.getLogger(__name__)

MAX_IMAGE_BYTES = 512 * 1024 * 1024


def image_id(uri: str) -> str:
    """A stable id derived from the URI: the first 16 hex digits of its sha256."""
    return hashlib.sha256(uri.encode("utf-8")).hexdigest()[:16]


def _column(batch, name, n, default=""):
    value = batch.get(name)
    return list(value) if value is not None else [default] * n


class ExpandShards:
    """{shard} -> one row per URI of each shard (read from the run's manifest)."""

    def __init__(self, dest_uri: str):
        self.dest_uri = dest_uri

    def __call__(self, row: dict) -> list[dict]:
        from .sink import Destination
        from .sources import read_manifest_shard

        shard = int(row["shard"])
        uris = read_manifest_shard(Destination(self.dest_uri), shard)
        return [{"shard": shard, "row": i, "uri": u} for i, u in enumerate(uris)]


class _Timeout(BaseException):
    """Raised by the alarm; a BaseException so that a library's ``except Exception`` cannot swallow it."""


@contextmanager
def _time_limit(seconds: float | None):
    """Bound the time spent in the block.

    After ``seconds``, SIGALRM raises _Timeout in the block (the row becomes a "timed out" error row, the worker
    lives on). The alarm only reaches Python code in the main thread: Ray runs task UDFs there (ReadDecode is a task),
    but a decoder stuck in native code never returns to the interpreter, and a UDF run on another thread cannot be
    signalled at all. So a watchdog thread also ends the whole worker process if the block is still running at twice
    the limit (and at least 2 s past it): a stuck worker then becomes a crashed worker, which the pipeline retries a
    bounded number of times and then turns into an error row. Either way the job never waits on one image forever.
    """
    if not seconds:
        yield
        return
    done = threading.Event()

    def watchdog():
        if not done.wait(seconds + max(seconds, 2.0)):
            logger.error("stuck far past the %s s time limit, out of the alarm's reach; ending this worker", seconds)
            os._exit(75)

    threading.Thread(target=watchdog, name="fcclip-time-limit", daemon=True).start()
    soft = threading.current_thread() is threading.main_thread()
    if soft:

        def on_alarm(signum, frame):
            raise _Timeout()

        previous = signal.signal(signal.SIGALRM, on_alarm)
        signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        if soft:
            signal.setitimer(signal.ITIMER_REAL, 0)
            signal.signal(signal.SIGALRM, previous)
        done.set()


def _inject_fault(uri: str) -> None:
    """Testing hook: ``FCCLIP_TEST_FAULTS="crash:NAME,hang:NAME,stall:NAME"`` on URIs containing NAME makes this
    worker die (``crash``, like a decoder segfault), sleep in Python (``hang``, like a read that never returns), or
    sleep out of the alarm's reach (``stall``, like a decoder stuck in native code: SIGALRM is blocked in this thread
    so no Python handler runs). Inert unless the variable is set (the fault-injection tests set it for their Ray
    workers). Called inside ReadDecode's time limit, where a real decoder would be."""
    spec = os.environ.get("FCCLIP_TEST_FAULTS")
    if not spec:
        return
    for item in spec.split(","):
        kind, _, needle = item.partition(":")
        if needle and needle in uri:
            if kind == "crash":
                os._exit(77)
            if kind == "hang":
                time.sleep(3600)
            if kind == "stall":
                signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGALRM})
                time.sleep(3600)


class ReadDecode:
    """Read each URI's bytes, decode to RGB as the predictor does, resize for the model. Errors become the row's
    ``error``; nothing raises."""

    def __init__(self, short_edge: int | None, max_size: int, max_pixels: int | None, timeout_s: float | None = 120):
        self.short_edge = short_edge
        self.max_size = max_size
        self.max_pixels = max_pixels
        self.timeout_s = timeout_s

    def __call__(self, batch: dict) -> dict:
        import fsspec

        from fcclip.images import decode_image_bytes
        from fcclip.predictor import resize_image

        uris = list(batch["uri"])
        n = len(uris)
        out = {k: [] for k in ("pixels", "height", "width", "rh", "rw", "error")}
        for uri in uris:
            pixels, h, w, rh, rw, err = b"", 0, 0, 0, 0, ""
            try:
                with _time_limit(self.timeout_s):
                    _inject_fault(uri)
                    with fsspec.open(uri, "rb") as f:
                        data = f.read(MAX_IMAGE_BYTES + 1)
                    if len(data) > MAX_IMAGE_BYTES:
                        raise ValueError(f"file larger than {MAX_IMAGE_BYTES} bytes")
                    image = decode_image_bytes(data, max_pixels=self.max_pixels)
                    h, w = image.shape[:2]
                    resized = resize_image(image, self.short_edge, self.max_size)
                    rh, rw = resized.shape[:2]
                    pixels = np.ascontiguousarray(resized).tobytes()
            except _Timeout:
                err = f"timed out after {self.timeout_s} s while reading or decoding"
            except FileNotFoundError as e:
                err = f"not found: {e}"
            except Exception as e:  # a bad image is an error row, never a failed job
                err = f"{type(e).__name__}: {e}"
            out["pixels"].append(pixels)
            out["height"].append(h)
            out["width"].append(w)
            out["rh"].append(rh)
            out["rw"].append(rw)
            out["error"].append(err)
        result = {k: batch[k] for k in ("shard", "row", "uri")}
        result.update(
            pixels=np.array(out["pixels"], dtype=object),
            height=np.array(out["height"], dtype=np.int32),
            width=np.array(out["width"], dtype=np.int32),
            rh=np.array(out["rh"], dtype=np.int32),
            rw=np.array(out["rw"], dtype=np.int32),
            error=np.array(out["error"], dtype=object),
        )
        assert len(result["pixels"]) == n
        return result


@dataclass(frozen=True)
class ModelSpec:
    """What each model actor loads (plain values: safe to ship to workers)."""

    model: str
    weights: str
    vocabulary: dict  # Vocabulary.to_dict()
    min_score: float = 0.0
    device: str = "auto"
    autocast: str | None = None  # "bf16" / "fp16" on GPUs


class LabelModel:
    """The model stage: one FC-CLIP per actor, loaded once, text classifier computed once; batched forward passes,
    panoptic post-processing at each image's original size."""

    def __init__(self, spec: ModelSpec):
        import warnings

        import torch

        from fcclip.build import build_model
        from fcclip.predictor import Predictor
        from fcclip.vocabulary import Vocabulary

        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            self.model = build_model(spec.model, weights=spec.weights, device=spec.device)
        dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(spec.autocast or "")
        if dtype is not None and self.model.device.type != "cuda":
            dtype = None
        self.predictor = Predictor(
            self.model, Vocabulary.from_dict(spec.vocabulary), short_edge=None, tasks=("panoptic",), autocast_dtype=dtype
        )
        self.spec = spec
        self.model_id = f"{self.model.config.name}@{self.model.weights_id}"

    def __call__(self, batch: dict) -> dict:
        n = len(batch["uri"])
        errors = list(batch["error"])
        segmaps = [b""] * n
        segments = ["[]"] * n
        todo = [i for i in range(n) if not errors[i]]
        try:
            self._label(batch, todo, segmaps, segments)
        except Exception as e:  # e.g. a CUDA OOM on one huge batch: retry the images one by one
            logger.warning("batch failed (%s); labelling its images one at a time", e)
            for i in todo:
                try:
                    self._label(batch, [i], segmaps, segments)
                except Exception as e1:
                    errors[i] = f"model failed: {type(e1).__name__}: {e1}"
                    logger.debug("%s", traceback.format_exc())
        return {
            "shard": batch["shard"],
            "row": batch["row"],
            "uri": batch["uri"],
            "height": batch["height"],
            "width": batch["width"],
            "error": np.array(errors, dtype=object),
            "segmap": np.array(segmaps, dtype=object),
            "segments": np.array(segments, dtype=object),
            "model": np.array([self.model_id] * n, dtype=object),
        }

    def _label(self, batch, index, segmaps, segments):
        if not index:
            return
        images = [
            np.frombuffer(batch["pixels"][i], dtype=np.uint8).reshape(int(batch["rh"][i]), int(batch["rw"][i]), 3)
            for i in index
        ]
        out, sizes, padded = self.predictor.infer(images)
        for j, i in enumerate(index):
            size = (int(batch["height"][i]), int(batch["width"][i]))
            pred = self.predictor.postprocess(out.mask_cls[j], out.mask_logits[j], sizes[j], padded, size)
            seg_map = pred.panoptic.segment_map
            kept = [s for s in pred.panoptic.segments if s["score"] >= self.spec.min_score and s["area"] > 0]
            if len(kept) < len(pred.panoptic.segments):
                keep_ids = np.array([s["id"] for s in kept], dtype=seg_map.dtype)
                seg_map = np.where(np.isin(seg_map, keep_ids), seg_map, 0)
            dtype = np.uint8 if seg_map.max(initial=0) < 256 else np.uint16
            segmaps[i] = zlib.compress(seg_map.astype(dtype).tobytes(), 1) + dtype().dtype.char.encode()
            segments[i] = json.dumps(
                [{k: s[k] for k in ("id", "label", "category_id", "is_thing", "score")} for s in kept]
            )


def _decode_segmap(blob: bytes, height: int, width: int) -> np.ndarray:
    dtype = np.dtype(blob[-1:].decode())
    return np.frombuffer(zlib.decompress(blob[:-1]), dtype=dtype).reshape(height, width)


def encode_masks(batch: dict) -> dict:
    """Segment maps -> per-segment COCO RLE, area and box; emits each image's output row as JSON."""
    from fcclip.masks import encode_rle, mask_to_bbox

    records = []
    for i, uri in enumerate(batch["uri"]):
        h, w = int(batch["height"][i]), int(batch["width"][i])
        error = batch["error"][i]
        record = {
            "uri": uri,
            "image_id": image_id(uri),
            "width": w if not error or w else None,
            "height": h if not error or h else None,
            "status": "error" if error else "ok",
            "error": error or None,
            "segments": [] if error else None,
            "model": batch["model"][i],
        }
        if not error:
            try:
                seg_map = _decode_segmap(batch["segmap"][i], h, w)
                segs = []
                for s in json.loads(batch["segments"][i]):
                    mask = seg_map == s["id"]
                    segs.append(
                        dict(s, area=int(mask.sum()), bbox=[float(v) for v in mask_to_bbox(mask)], rle=encode_rle(mask))
                    )
                record["segments"] = segs
            except Exception as e:
                record.update(status="error", error=f"encoding failed: {type(e).__name__}: {e}", segments=[])
        records.append(json.dumps(record))
    return {"shard": batch["shard"], "row": batch["row"], "record": np.array(records, dtype=object)}
