"""The labeling pipeline's stages: small callables, testable without Ray (pipelines/engine.py runs them on Ray).

    ReadDecode      URIs -> (meta: original height/width and error per image, images: resized RGB arrays)   CPU task
    label_images    a model stage over decoded images -> segment maps + segments per image                 model actor
    encode_rows     segment maps -> the output rows as an Arrow table (COCO RLE, area, box, labels)        CPU task
    write_fragment / commit_shard (pipelines/output.py)                                                         CPU tasks

A row that fails at any stage carries its reason in ``error`` through the later stages and becomes an error row.
Stages hold only plain settings (no filesystem objects, no credentials); workers read object storage with the
credentials of their own environment.

Two seams take stand-ins (benchmarks, fault tests) through the Python API, never through flags production code
reads: ``reader`` (URI -> bytes) in ReadDecode, and the model stage factory (see FCCLIPSegmenter).
"""
from __future__ import annotations

import functools
import hashlib
import logging
import os
import signal
import threading
import time
import traceback
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Callable

import numpy as np
import pyarrow as pa

from fcclip.images import batch_groups
from fcclip.masks import panoptic_columns

from .output import EMBEDDING_COLUMNS, SEGMENT, output_schema

logger = logging.getLogger(__name__)

MAX_IMAGE_BYTES = 512 * 1024 * 1024
SEGMENT_KEYS = ("id", "label", "category_id", "is_thing", "score")
UNCERTAINTY_KEYS = ("margin", "branches_agree", "mask_score", "kept_share", "doubt")
"""What a model stage may add to each segment (fcclip.uncertainty; stand-in stages may not): the stored signals, and
``doubt``, which is not stored: the image's ``uncertainty`` is made of it."""


def image_id(uri: str) -> str:
    """A stable id derived from the URI: the first 16 hex digits of its sha256."""
    return hashlib.sha256(uri.encode("utf-8")).hexdigest()[:16]


class _Timeout(BaseException):
    """Raised by the alarm; a BaseException so that a library's ``except Exception`` cannot swallow it."""


class _Watchdog:
    """One thread per process that ends the process when a time-limited block runs past its hard deadline (see
    _time_limit). Started on first use; a block registers its deadline on entry and removes it on exit, so an
    image costs a dict entry, not a thread."""

    def __init__(self):
        self._reset()
        os.register_at_fork(after_in_child=self._reset)  # a forked child has neither the thread nor a free lock

    def _reset(self) -> None:
        self._cond = threading.Condition()
        self._deadlines: dict[int, tuple[float, float]] = {}  # block -> (monotonic hard deadline, its limit)
        self._waiting_until: float | None = None  # the deadline the thread sleeps towards (None: none)
        self._started = False
        self._next = 0

    def add(self, hard_s: float, seconds: float) -> int:
        with self._cond:
            if not self._started:
                threading.Thread(target=self._run, name="fcclip-time-limit", daemon=True).start()
                self._started = True
            self._next += 1
            deadline = time.monotonic() + hard_s
            self._deadlines[self._next] = (deadline, seconds)
            if self._waiting_until is None or deadline < self._waiting_until:
                self._cond.notify()
            return self._next

    def remove(self, block: int) -> None:
        with self._cond:
            self._deadlines.pop(block, None)

    def _run(self) -> None:
        with self._cond:
            while True:
                now = time.monotonic()
                overdue = [limit for deadline, limit in self._deadlines.values() if deadline <= now]
                if overdue:
                    logger.error("stuck far past the %s s time limit, out of the alarm's reach; ending this worker",
                                 overdue[0])
                    os._exit(75)
                self._waiting_until = min((deadline for deadline, _ in self._deadlines.values()), default=None)
                self._cond.wait(None if self._waiting_until is None else self._waiting_until - now)


_WATCHDOG = _Watchdog()


@contextmanager
def _time_limit(seconds: float | None):
    """Bound the time spent in the block.

    After ``seconds``, SIGALRM raises _Timeout in the block (the row becomes a "timed out" error row, the worker
    lives on). The alarm only reaches Python code in the main thread: Ray runs task functions there (ReadDecode runs
    in a task), but a decoder stuck in native code never returns to the interpreter, and code run on another thread
    cannot be signalled at all. So the process's watchdog thread also ends the whole worker process if the block is
    still running at twice the limit (and at least 2 s past it): a stuck worker then becomes a crashed worker, which
    the pipeline retries a bounded number of times and then turns into an error row. Either way the job never waits
    on one image forever.
    """
    if not seconds:
        yield
        return
    block = _WATCHDOG.add(seconds + max(seconds, 2.0), seconds)
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
        _WATCHDOG.remove(block)


def read_bytes(uri: str) -> bytes:
    """The default reader: the object's bytes through fsspec (local paths, s3://, gs://, ...)."""
    import fsspec

    with fsspec.open(uri, "rb") as f:
        data = f.read(MAX_IMAGE_BYTES + 1)
    if len(data) > MAX_IMAGE_BYTES:
        raise ValueError(f"file larger than {MAX_IMAGE_BYTES} bytes")
    return data


def _import_before_time_limit(uris: list[str]) -> None:
    """Import, before any time limit starts, what reading and decoding ``uris`` imports on first use: PIL's image
    plugins, and the fsspec file system of each protocol (``s3fs`` and its aiobotocore, aiohttp; the instance is
    cached, so the reads reuse it). The time limit's alarm can land anywhere in the main thread; landing in an import
    it leaves that package half-imported for the rest of the worker's life, and every later read or write of the
    worker then fails ("AttributeError: module aiohttp has no attribute http_exceptions", seen with a
    --decode-timeout of 0.1-0.2 s on a worker's first S3 read)."""
    import fsspec
    from PIL import Image

    Image.init()
    seen = set()
    for uri in uris:
        protocol = fsspec.utils.get_protocol(uri)
        if protocol not in seen:
            seen.add(protocol)
            try:
                fsspec.core.url_to_fs(uri)
            except Exception:  # noqa: BLE001 - an unknown protocol, a missing package: the image's read says so
                pass


class ReadDecode:
    """Read each URI's bytes (``reader``), decode to RGB as the predictor does, resize for the model. Errors become
    the image's ``error``; nothing raises.

    Returns (meta, images): meta {"height", "width": original sizes (0 when unread), "error": "" or the reason},
    images the resized (h, w, 3) uint8 arrays (None where the image failed).
    """

    def __init__(self, short_edge: int | None, max_size: int, max_pixels: int | None, timeout_s: float | None = 120,
                 reader: Callable[[str], bytes] | None = None):
        self.short_edge = short_edge
        self.max_size = max_size
        self.max_pixels = max_pixels
        self.timeout_s = timeout_s
        self.reader = reader or read_bytes

    def __call__(self, uris: list[str]) -> tuple[dict, list]:
        from fcclip.images import decode_image_bytes, resize_image  # PIL and numpy only: no torch in decode tasks

        _import_before_time_limit(uris)
        meta = {"height": [], "width": [], "error": []}
        images = []
        for uri in uris:
            image, h, w, err = None, 0, 0, ""
            try:
                with _time_limit(self.timeout_s):
                    decoded = decode_image_bytes(self.reader(uri), max_pixels=self.max_pixels)
                    h, w = decoded.shape[:2]
                    image = np.ascontiguousarray(resize_image(decoded, self.short_edge, self.max_size))
            except _Timeout:
                err = f"timed out after {self.timeout_s} s while reading or decoding"
            except FileNotFoundError as e:
                err = f"not found: {e}"
            except Exception as e:  # a bad image is an error row, never a failed job
                err = f"{type(e).__name__}: {e}"
            if err:
                image, h, w = None, h, w
            images.append(image)
            meta["height"].append(int(h))
            meta["width"].append(int(w))
            meta["error"].append(err)
        return meta, images


@dataclass(frozen=True)
class ModelSpec:
    """What each model actor loads (plain values: safe to ship to workers)."""

    model: str
    weights: str
    vocabulary: dict  # Vocabulary.to_dict()
    min_score: float = 0.0
    device: str = "auto"  # "auto": the GPU Ray assigned to the actor (it sets CUDA_VISIBLE_DEVICES), else the CPU
    autocast: str | None = None  # "bf16" / "fp16"
    embeddings: bool = False  # add each segment's query embeddings (fcclip label --embeddings)
    threads: int | None = None  # PyTorch's threads where the model runs on CPU (None: as Ray set them, one per CPU)


class FCCLIPSegmenter:
    """The default model stage: one FC-CLIP, loaded once, text classifier computed once; batched forward passes,
    panoptic post-processing at each image's original size, on the model's device.

    A model stage is any object built inside the model actor by a zero-argument, picklable factory (``run_label(...,
    model_stage=factory)``), with a ``model_id`` string and ``__call__(images, sizes)``:

        images: resized RGB images, each (h, w, 3) uint8; sizes: each image's original (H, W).
        returns: per image (segment_map, segments): segment_map (H, W) integer segment ids (0 = none), segments
                 [{id, label, category_id, is_thing, score}] for the ids present in the map.

    and, optionally, ``batch_key(size)``: images of one key only are passed in one call (label_images); this one's is
    the padded size the model sees, since padding changes the results of the image it pads.

    With ``spec.embeddings``, each segment also carries its query (``query_index``; for a stuff segment merged from
    several queries, the one with the largest score, whose score is the segment's) and that query's two embeddings,
    L2-normalised, as (D,) float16 arrays (``embedding_in``: the decoder's class embedding; ``embedding_out``: the
    mask-pooled CLIP embedding) with ``embedding_valid``; ``run_metadata["embeddings"]`` is the model's
    ``fcclip.reclassify.EmbeddingSpace``, which the run's metadata records.
    """

    def __init__(self, spec: ModelSpec):
        import warnings

        import torch

        from fcclip.build import build_model
        from fcclip.precision import use_tf32
        from fcclip.predictor import Predictor
        from fcclip.vocabulary import Vocabulary

        from .runtime import actor_device, use_cpu_threads

        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            self.model = build_model(spec.model, weights=spec.weights, device=actor_device(spec.device))
        use_tf32(self.model.device)
        use_cpu_threads(self.model.device, spec.threads)
        # the predictor runs it where the device has it natively and says so where not (fcclip.precision)
        dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(spec.autocast or "")
        self.predictor = Predictor(
            self.model, Vocabulary.from_dict(spec.vocabulary), short_edge=None, tasks=("panoptic",),
            autocast_dtype=dtype,
        )
        self.batch_key = self.predictor.batch_key  # images are fed to the model at their decoded size
        self.min_score = spec.min_score
        self.model_id = f"{self.model.config.name}@{self.model.weights_id}"
        self.embeddings = spec.embeddings
        inference = self.model.config.inference
        self.use_agreement = inference.alpha > 0 or inference.beta > 0  # the CLIP branch has a say
        self.run_metadata = {}
        if spec.embeddings:
            from fcclip.reclassify import EmbeddingSpace

            self.run_metadata["embeddings"] = EmbeddingSpace.from_model(self.model).to_dict()

    @classmethod
    def builder(cls, spec: ModelSpec):
        """The zero-argument callable that builds this model stage in a model actor (``make_model_stage``)."""
        return functools.partial(cls, spec)

    def __call__(self, images: list[np.ndarray], sizes: list[tuple[int, int]]) -> list[tuple[np.ndarray, list]]:
        out, resized, padded = self.predictor.infer(images)
        results = []
        for j, size in enumerate(sizes):
            pred = self.predictor.postprocess(out.class_logits[j], out.mask_logits[j], resized[j], padded, size)
            segment_map = pred.panoptic.segment_map
            kept = [s for s in pred.panoptic.segments if s["score"] >= self.min_score and s["area"] > 0]
            if len(kept) < len(pred.panoptic.segments):
                keep_ids = np.array([s["id"] for s in kept], dtype=segment_map.dtype)
                segment_map = np.where(np.isin(segment_map, keep_ids), segment_map, 0)
            segments = [{k: s[k] for k in SEGMENT_KEYS} for s in kept]
            _add_uncertainty(segments, [s["query_index"] for s in kept], [s["area"] for s in kept], out, j,
                             resized[j], size, self.use_agreement)
            if self.embeddings:
                _add_embeddings(segments, [s["query_index"] for s in kept], out, j)
            results.append((_narrow(segment_map), segments))
        return results


def _add_uncertainty(segments: list[dict], queries: list[int], areas: list[int], out, j: int,
                     resized: tuple[int, int], size: tuple[int, int], use_agreement: bool) -> None:
    """Attach to each segment its query's signals (fcclip.uncertainty: margin, branch agreement, mask score, kept
    share) and its doubt; the doubt counts the agreement when ``use_agreement`` (the ensemble weights CLIP's
    branch). ``resized``: the image's (h, w) as fed to the model; ``size``: the output's (H, W)."""
    if not segments:
        return
    import torch

    from fcclip.uncertainty import mask_signals, query_signals, segment_doubt

    ens = out.ensemble
    margin, agree = query_signals(ens.probs[j], ens.in_vocab_probs[j], ens.out_vocab_probs[j])
    margin, agree = margin.cpu().numpy(), agree.cpu().numpy()
    index = torch.as_tensor(queries, dtype=torch.long)
    h4, w4 = -(-int(resized[0]) // 4), -(-int(resized[1]) // 4)
    logits = out.mask_logits[j][index.to(out.mask_logits.device), :h4, :w4]
    scale = (int(size[0]) * int(size[1])) / max(logits.shape[-2] * logits.shape[-1], 1)
    mask_score, kept_share = mask_signals(logits, torch.as_tensor(areas, device=logits.device), scale)
    mask_score, kept_share = mask_score.cpu().numpy(), kept_share.cpu().numpy()
    for k, (s, q) in enumerate(zip(segments, queries)):
        s.update(margin=float(margin[q]), branches_agree=bool(agree[q]), mask_score=float(mask_score[k]),
                 kept_share=float(kept_share[k]))
        s["doubt"] = segment_doubt(s["margin"], s["branches_agree"], s["mask_score"], s["kept_share"],
                                   use_agreement)


def _add_embeddings(segments: list[dict], queries: list[int], out, j: int) -> None:
    """Attach to each segment its query's embeddings (float16, as stored) from the model's InferenceOutput."""
    if not segments:
        return
    index = np.asarray(queries, dtype=np.int64)
    emb_in = out.in_vocab_embeddings[j].float().cpu().numpy()[index].astype(np.float16)
    emb_out = out.out_vocab_embeddings[j].float().cpu().numpy()[index].astype(np.float16)
    valid = out.valid[j].cpu().numpy()[index]
    for k, s in enumerate(segments):
        s.update(query_index=int(index[k]), embedding_in=emb_in[k], embedding_out=emb_out[k],
                 embedding_valid=bool(valid[k]))


def run_metadata(model_stage) -> dict:
    """What a model stage adds to the run's metadata (its ``run_metadata`` attribute; stand-in stages have none)."""
    return dict(getattr(model_stage, "run_metadata", None) or {})


def _narrow(segment_map: np.ndarray) -> np.ndarray:
    """The smallest unsigned dtype that holds the ids (a uint8 map is a quarter of an int32 one to ship)."""
    top = int(segment_map.max(initial=0))
    dtype = np.uint8 if top < 256 else np.uint16 if top < 65536 else np.uint32
    return segment_map.astype(dtype, copy=False)


class DeviceLost(RuntimeError):
    """A CUDA error after which the process's CUDA context is unusable (a device-side assert, an illegal address):
    every later call on it fails too. The model actor ends on it (pipelines/runtime.py), so that the engine replaces
    it and retries its images on a fresh one, instead of turning them all into error rows."""


def device_lost(e: BaseException) -> bool:
    """Whether `e` is a sticky CUDA error (not out of memory, after which the device works on)."""
    import torch

    if isinstance(e, torch.cuda.OutOfMemoryError):
        return False
    if isinstance(e, getattr(torch, "AcceleratorError", ())):
        return True
    text = str(e)
    return isinstance(e, RuntimeError) and "out of memory" not in text and any(
        marker in text for marker in ("CUDA error", "CUBLAS_STATUS", "CUDNN_STATUS", "cuDNN error"))


def label_images(model_stage, meta: dict, images: list, batch_size: int, on_batch: Callable[[], None] | None = None
                 ) -> dict:
    """Run the model stage over one chunk's decoded images in batches of ``batch_size``; device work only.

    Images whose decode failed (``meta["error"]``) are skipped. Where the model stage has a ``batch_key(size)``
    (FCCLIPSegmenter: the padded size the model sees), a batch holds images of one key only, so that each image's
    rows are the ones it gets alone, whatever images share its chunk or its batch; without, images of similar
    aspect ratio are batched together. Results go back to each image's own position. A batch that raises (e.g. out
    of memory on one huge batch) is run again one image at a time; an image that still raises is an error row; a
    sticky CUDA error (`device_lost`) raises `DeviceLost` instead. ``on_batch`` is called as each batch starts (the
    model actor's heartbeat, see runtime.ModelActor). Returns {"maps": [(H, W) array or None], "segments": [[...]],
    "error": [...], "model": id, "model_s": seconds inside the model stage}.
    """
    n = len(images)
    errors = list(meta["error"])
    maps: list = [None] * n
    segments: list = [[] for _ in range(n)]
    todo = sorted((i for i in range(n) if not errors[i]), key=lambda i: images[i].shape[0] / images[i].shape[1])
    batch_key = getattr(model_stage, "batch_key", None)
    keys = [batch_key(images[i].shape[:2]) if batch_key else None for i in todo]
    model_s = 0.0

    def run(index):
        nonlocal model_s
        if on_batch is not None:
            on_batch()
        t = time.perf_counter()
        out = model_stage([images[i] for i in index], [(meta["height"][i], meta["width"][i]) for i in index])
        model_s += time.perf_counter() - t
        for i, (segment_map, segs) in zip(index, out):
            maps[i] = _narrow(np.asarray(segment_map))
            segments[i] = [{k: s[k] for k in SEGMENT_KEYS + EMBEDDING_COLUMNS + UNCERTAINTY_KEYS if k in s}
                           for s in segs]

    for group in batch_groups(keys, max(1, batch_size)):
        batch = [todo[j] for j in group]
        try:
            run(batch)
        except Exception as e:
            if device_lost(e):
                raise DeviceLost(f"the device is lost: {type(e).__name__}: {e}") from e
            logger.warning("batch failed (%s); labeling its images one at a time", e)
            for i in batch:
                try:
                    run([i])
                except Exception as e1:
                    if device_lost(e1):
                        raise DeviceLost(f"the device is lost: {type(e1).__name__}: {e1}") from e1
                    errors[i] = f"model failed: {type(e1).__name__}: {e1}"
                    logger.debug("%s", traceback.format_exc())
    return {"maps": maps, "segments": segments, "error": errors, "model": model_stage.model_id, "model_s": model_s}


def encode_rows(uris: list[str], rows: list[int], meta: dict, labeled: dict | None, constants: dict,
                errors: list[str] | None = None) -> pa.Table:
    """The output rows of one chunk as an Arrow table: output.SCHEMA plus ``row`` (the row's place in its shard).

    ``labeled`` is label_images' result (None when every row failed earlier); ``errors`` overrides the per-row
    error (rows that failed outside the stages, e.g. a worker that kept crashing). ``constants``: vocabulary and
    run_id, the model id used when ``labeled`` is None, and ``embedding_dim`` (D) when the run stores embeddings
    (then the table has output.EMBEDDING_COLUMNS too). Segments are built as list<struct> columns directly.
    """
    dim = constants.get("embedding_dim")
    schema = output_schema(dim)
    embedded: list[dict] = []

    n = len(uris)
    error = list(errors) if errors is not None else list((labeled or meta)["error"])
    model = (labeled or {}).get("model") or constants["model"]
    seg_fields = {k: [] for k in ("id", "label", "category_id", "is_thing", "score", "area", "bbox", "size", "counts")}
    offsets = [0]
    status, widths, heights = [], [], []
    for i in range(n):
        err = error[i]
        if not err and labeled is not None:
            try:
                cols = panoptic_columns(labeled["maps"][i], labeled["segments"][i])
            except Exception as e:
                err = error[i] = f"encoding failed: {type(e).__name__}: {e}"
            else:
                segs = labeled["segments"][i]
                for key in ("id", "label", "category_id", "is_thing", "score"):
                    seg_fields[key].extend(s[key] for s in segs)
                seg_fields["area"].extend(cols["area"])
                seg_fields["bbox"].extend(cols["bbox"])
                seg_fields["size"].extend([list(cols["size"])] * len(segs))
                seg_fields["counts"].extend(cols["counts"])
                embedded.extend(segs)
        offsets.append(len(seg_fields["id"]))
        status.append("error" if err else "ok")
        h, w = int(meta["height"][i]) if meta else 0, int(meta["width"][i]) if meta else 0
        widths.append(w if (not err or w) else None)
        heights.append(h if (not err or h) else None)
    rle_type = SEGMENT.field("rle").type
    rle = pa.StructArray.from_arrays(
        [pa.array(seg_fields["size"], rle_type.field("size").type), pa.array(seg_fields["counts"], pa.string())],
        fields=list(rle_type),
    )
    struct = pa.StructArray.from_arrays(
        [
            pa.array(seg_fields["id"], pa.int32()),
            pa.array(seg_fields["label"], pa.string()),
            pa.array(seg_fields["category_id"], pa.int32()),
            pa.array(seg_fields["is_thing"], pa.bool_()),
            pa.array(seg_fields["score"], pa.float32()),
            pa.array(seg_fields["area"], pa.int64()),
            pa.array(seg_fields["bbox"], SEGMENT.field("bbox").type),
            rle,
        ],
        fields=list(SEGMENT),
    )
    offsets_array = pa.array(offsets, pa.int32())
    segments = pa.ListArray.from_arrays(offsets_array, struct)
    columns = {
        "uri": pa.array(uris, pa.string()),
        "image_id": pa.array([image_id(u) for u in uris], pa.string()),
        "width": pa.array(widths, pa.int32()),
        "height": pa.array(heights, pa.int32()),
        "status": pa.array(status, pa.string()),
        "error": pa.array([e or None for e in error], pa.string()),
        "segments": segments,
        "model": pa.array([model] * n, pa.string()),
        "vocabulary": pa.array([constants["vocabulary"]] * n, pa.string()),
        "run_id": pa.array([constants["run_id"]] * n, pa.string()),
    }
    columns.update(_uncertainty_columns(embedded, offsets, status, widths, heights, seg_fields["area"]))
    if dim:
        columns.update(_embedding_columns(embedded, offsets_array, dim, schema))
    table = pa.Table.from_arrays([columns[f.name] for f in schema], schema=schema)
    return table.append_column("row", pa.array(rows, pa.int32()))


def _uncertainty_columns(segments: list[dict], offsets: list[int], status: list[str], widths: list, heights: list,
                         areas: list[int]) -> dict:
    """output.UNCERTAINTY_COLUMNS for a chunk, from the signals the model stage put on each segment (null where it
    gave none)."""
    return uncertainty_columns(
        offsets, status, widths, heights, areas, margins=[s.get("margin") for s in segments],
        agree=[s.get("branches_agree") for s in segments], mask_scores=[s.get("mask_score") for s in segments],
        kept=[s.get("kept_share") for s in segments], doubts=[s.get("doubt") for s in segments])


def uncertainty_columns(offsets: list[int], status: list[str], widths: list, heights: list, areas: list[int], *,
                        margins: list, agree: list, mask_scores: list, kept: list, doubts: list) -> dict:
    """output.UNCERTAINTY_COLUMNS: the per-segment signals as lists parallel to the segments (``offsets`` delimit
    each row's), the unlabeled share and the image's uncertainty (null on error rows, and the uncertainty also where
    a segment has no doubt). Labeling (here) and fcclip relabel (under a new vocabulary) both build them so."""
    from fcclip.uncertainty import image_uncertainty, unlabeled_share

    shares, scores = [], []
    for i, st in enumerate(status):
        lo, hi = offsets[i], offsets[i + 1]
        if st != "ok":
            shares.append(None)
            scores.append(None)
            continue
        share = unlabeled_share(areas[lo:hi], heights[i], widths[i])
        shares.append(share)
        d = doubts[lo:hi]
        scores.append(None if any(v is None for v in d) else image_uncertainty(d, share))
    off = pa.array(offsets, pa.int32())
    return {
        "margin": pa.ListArray.from_arrays(off, pa.array(margins, pa.float32())),
        "branches_agree": pa.ListArray.from_arrays(off, pa.array(agree, pa.bool_())),
        "mask_score": pa.ListArray.from_arrays(off, pa.array(mask_scores, pa.float32())),
        "kept_share": pa.ListArray.from_arrays(off, pa.array(kept, pa.float32())),
        "unlabeled_share": pa.array(shares, pa.float32()),
        "uncertainty": pa.array(scores, pa.float32()),
    }


def _embedding_columns(segments: list[dict], offsets: pa.Array, dim: int, schema: pa.Schema) -> dict:
    """The embedding columns (output.EMBEDDING_COLUMNS) of the segments of a chunk, lists parallel to ``segments``."""
    n = len(segments)
    if any("embedding_in" not in s for s in segments):
        raise ValueError("the model stage gave segments without embeddings to a run that stores them")
    columns = {}
    for name in ("embedding_in", "embedding_out"):
        flat = np.stack([np.asarray(s[name], np.float16) for s in segments]) if n else np.zeros((0, dim), np.float16)
        if flat.shape[1] != dim:
            raise ValueError(f"{name} has {flat.shape[1]} values, the run stores {dim}")
        vectors = pa.FixedSizeListArray.from_arrays(pa.array(flat.ravel(), pa.float16()), dim)
        columns[name] = pa.ListArray.from_arrays(offsets, vectors, type=schema.field(name).type)
    queries = pa.array([s["query_index"] for s in segments], pa.int32())
    columns["query_index"] = pa.ListArray.from_arrays(offsets, queries)
    columns["embedding_valid"] = pa.ListArray.from_arrays(
        offsets, pa.array([bool(s["embedding_valid"]) for s in segments], pa.bool_()))
    return columns
