"""Predictor: an image in, panoptic / semantic / instance results at the image's own size out.

    predictor = Predictor(model, vocabulary="ade20k_150")
    result = predictor("photo.jpg")          # path, URI, PIL image, HxWx3 uint8 array or encoded bytes
    result.panoptic.segment_map             # (H, W) int32 segment ids, 0 = unlabeled
    result.panoptic.segments                # [{id, label, category_id, class_index, is_thing, score, area, bbox}]

Pre-processing follows the reference's test path: resize so the short edge is ``short_edge`` (800) unless the long
edge would pass ``max_size`` (1333), CLIP mean/std normalisation, zero padding to a multiple of 32. Mask logits are
upsampled to the padded size, cropped, and resized to the original image size before post-processing.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from typing import Any, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from .images import (  # noqa: F401 (re-exported)
    DEFAULT_MAX_PIXELS, batch_groups, load_image, padded_size, resize_image, resized_shape,
)
from .masks import segment_bboxes
from .model import FCCLIP, InferenceOutput
from .precision import resolve_autocast_dtype
from .postprocess import (
    PixelVotes,
    finish_panoptic,
    instance_mask_scores,
    rank_instances,
    select_instance_candidates,
    select_panoptic_queries,
    semantic_scores,
)
from .text import TextClassifier, TextClassifierCache, build_text_classifier
from .vocabulary import Vocabulary, load_vocabulary

TASKS = ("panoptic", "semantic", "instance")
# Post-processing upsamples the mask logits of the queries the tasks need (all of them for semantic; only the kept
# ones for panoptic and the top-k ones for instance), once for all tasks, in chunks of queries of at most this many
# float32 values (32 MiB), so memory stays bounded at any output size. Measured at 640x640 on a 2-core CPU: 1M
# values per chunk is 3x slower (each chunk adds into the (K, H, W) semantic scores), 8M is as fast as 32M.
CHUNK_VALUES = 8_000_000
# On a GPU each chunk is a few kernel launches whatever its size, and memory is plentiful next to the model's own
# (the paper's model at 1024 px): 64M values (256 MiB of logits, as much of probabilities), 46 queries of 1024x1365
# per chunk, all of them for most images. Not tuned on a GPU yet (benchmarks/gpu_throughput.py measures the label
# rows against the bare predictor).
CUDA_CHUNK_VALUES = 64_000_000


def chunk_values(device: torch.device) -> int:
    """How many float32 values of upsampled mask logits post-processing handles at a time on ``device``."""
    return CUDA_CHUNK_VALUES if device.type == "cuda" else CHUNK_VALUES


@dataclass
class PanopticResult:
    segment_map: np.ndarray  # (H, W) int32, 0 = no segment
    segments: list[dict]  # {id, label, category_id (the vocabulary's id), class_index, is_thing, score, area, bbox [x, y, w, h],
    # query_index (the query the segment came from; see fcclip.postprocess.PanopticOutput)}


@dataclass
class SemanticResult:
    class_map: np.ndarray  # (H, W) int32 contiguous class index (argmax of the class scores)
    scores: np.ndarray | None = None  # (K, H, W) float32 per-class scores, when requested


@dataclass
class InstanceResult:
    masks: np.ndarray  # (N, H, W) bool
    scores: np.ndarray  # (N,) float32, descending
    classes: np.ndarray  # (N,) int64 contiguous class index
    category_ids: np.ndarray  # (N,) int64 dataset category ids
    labels: list[str]

    def __len__(self) -> int:
        return len(self.scores)


@dataclass
class Prediction:
    height: int
    width: int
    vocabulary: Vocabulary
    panoptic: PanopticResult | None = None
    semantic: SemanticResult | None = None
    instances: InstanceResult | None = None
    extras: dict[str, Any] = field(default_factory=dict)


def _chunk_plan(needed: torch.Tensor, panoptic_index: torch.Tensor | None, instance_queries: torch.Tensor | None,
                chunk: int, device: torch.device) -> list[tuple]:
    """The chunks of post-processing: per chunk of at most ``chunk`` of the ``needed`` queries, (their indices, the
    chunk's rows the panoptic votes take, the rows the instance task takes). Rows are None where the task takes
    none of the chunk and ``...`` (every row: ``probs[...]`` is ``probs``) where it takes all of them.

    Planned on the host from the few query indices (a host sync per image, not one per chunk and task) and copied to
    ``device`` in one transfer."""
    host = [t.cpu() if t is not None else None for t in (needed, panoptic_index, instance_queries)]
    needed, selections = host[0], host[1:]
    plan = []
    for start in range(0, needed.numel(), chunk):
        index = needed[start : start + chunk]
        entry = [index]
        for selected in selections:
            rows = None
            if selected is not None:
                rows = torch.isin(index, selected).nonzero().squeeze(1)
                rows = None if rows.numel() == 0 else ... if rows.numel() == index.numel() else rows
            entry.append(rows)
        plan.append(entry)
    tensors = [t for entry in plan for t in entry if isinstance(t, torch.Tensor)]
    if device.type != "cpu" and tensors:
        flat = torch.cat(tensors)
        flat = flat.pin_memory().to(device, non_blocking=True) if device.type == "cuda" else flat.to(device)
        moved = iter(flat.split([t.numel() for t in tensors]))
        plan = [[next(moved) if isinstance(t, torch.Tensor) else t for t in entry] for entry in plan]
    return [tuple(entry) for entry in plan]


def pad_batch(images: Sequence[torch.Tensor], divisibility: int) -> torch.Tensor:
    """Stack (3, h_i, w_i) normalised images into (B, 3, H, W), zero-padded at the bottom/right to a multiple of
    ``divisibility``."""
    h, w = padded_size((max(t.shape[-2] for t in images), max(t.shape[-1] for t in images)), divisibility)
    out = images[0].new_zeros((len(images), 3, h, w))
    for i, t in enumerate(images):
        out[i, :, : t.shape[-2], : t.shape[-1]] = t
    return out


class Predictor:
    """FC-CLIP with one vocabulary.

    Args:
        model: a built :class:`fcclip.model.FCCLIP` (see :func:`fcclip.build_model`).
        vocabulary: a builtin name, a file, an inline "cat; dog, puppy" string, a list of names, or a Vocabulary.
        short_edge, max_size: test-time resize (default: the model config's, 800 / 1333 for the paper's model);
            ``short_edge=None`` keeps the image's own size.
        tasks: which of "panoptic", "semantic", "instance" to compute.
        semantic_scores: also return the (K, H, W) per-class semantic scores.
        object_mask_threshold, overlap_threshold, topk: post-processing settings (default: the config's).
        autocast_dtype: e.g. torch.bfloat16 to run the backbone and decoder under autocast, where the device runs
            that dtype natively (a GPU with bf16, a CPU with AVX-512 BF16 or AMX); elsewhere it warns once and runs
            float32 (see :mod:`fcclip.precision`). ``self.autocast_dtype`` is the dtype actually used.
        max_pixels: decompression-bomb limit for decoded images.
        text_cache: where text embeddings are cached (default: memory + $FCCLIP_CACHE/text).
    """

    def __init__(
        self,
        model: FCCLIP,
        vocabulary: Any = "coco_panoptic",
        *,
        short_edge: int | None | str = "default",
        max_size: int | None = None,
        tasks: Sequence[str] = TASKS,
        semantic_scores: bool = False,
        object_mask_threshold: float | None = None,
        overlap_threshold: float | None = None,
        topk: int | None = None,
        autocast_dtype: torch.dtype | None = None,
        max_pixels: int | None = DEFAULT_MAX_PIXELS,
        text_cache: TextClassifierCache | None = None,
    ):
        unknown = set(tasks) - set(TASKS)
        if unknown:
            raise ValueError(f"unknown task(s) {sorted(unknown)}; choose from {TASKS}")
        inf = model.config.inference
        self.model = model.eval()
        self.vocabulary = load_vocabulary(vocabulary)
        self.short_edge = inf.short_edge if short_edge == "default" else short_edge
        self.max_size = max_size if max_size is not None else inf.max_size
        self.tasks = tuple(tasks)
        self.semantic_scores = semantic_scores
        self.object_mask_threshold = inf.object_mask_threshold if object_mask_threshold is None else object_mask_threshold
        self.overlap_threshold = inf.overlap_threshold if overlap_threshold is None else overlap_threshold
        self.topk = inf.topk if topk is None else topk
        # a dtype this device cannot run natively is dropped with a warning (emulated, it would be slower)
        self.autocast_dtype = resolve_autocast_dtype(autocast_dtype, model.device)
        self.max_pixels = max_pixels
        self.text: TextClassifier = build_text_classifier(
            model.backbone, self.vocabulary, train_vocabulary=inf.train_vocabulary, cache=text_cache
        )
        self.thing_mask = torch.tensor(self.vocabulary.thing_mask, dtype=torch.bool)
        self.category_ids = np.array(self.vocabulary.ids, dtype=np.int64)

    @property
    def device(self) -> torch.device:
        return self.model.device

    # ------------------------------------------------------------------ steps, usable one by one (batching callers)
    def preprocess(self, image: Any) -> np.ndarray:
        """Decode any supported input to (H, W, 3) uint8 RGB (EXIF orientation applied, modes converted)."""
        return load_image(image, max_pixels=self.max_pixels)

    def batch_key(self, size: tuple[int, int]) -> tuple[int, int]:
        """The padded (H, W) at which an image of ``size`` (its decoded h, w) is fed to the model. Only images of one
        key share a forward pass (``infer``): zero padding changes what the backbone, the pixel decoder and the
        masked attention compute for the image it pads, so an image batched beside a larger one would not get the
        results it gets alone."""
        resized = resized_shape(int(size[0]), int(size[1]), self.short_edge, self.max_size)
        return padded_size(resized, self.model.config.inference.size_divisibility)

    def infer(self, images: Sequence[np.ndarray]) -> tuple[InferenceOutput, list[tuple[int, int]], tuple[int, int]]:
        """Resize, normalise, pad and run the model on a batch of decoded images of one ``batch_key`` (a
        ValueError otherwise: each image gets the results it gets alone).

        Returns:
            the model outputs, the resized (h, w) of each image, and the padded (H, W).
        """
        keys = {self.batch_key(img.shape[:2]) for img in images}
        if len(keys) > 1:
            raise ValueError(f"infer() takes images of one padded size (Predictor.batch_key), got {sorted(keys)}: "
                             "the padding of the larger would change the results of the smaller")
        tensors, sizes = [], []
        for img in images:
            resized = resize_image(img, self.short_edge, self.max_size)
            sizes.append(resized.shape[:2])
            t = torch.from_numpy(np.array(resized, copy=True)).to(self.device).permute(2, 0, 1).float()
            tensors.append(self.model.normalize(t))
        batch = pad_batch(tensors, self.model.config.inference.size_divisibility)
        with torch.inference_mode(), self._autocast():
            out = self.model.inference(batch, self.text)
        return out, sizes, tuple(batch.shape[-2:])

    def _autocast(self):
        if self.autocast_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.autocast_dtype)

    def postprocess(
        self,
        class_logits: torch.Tensor,
        mask_logits: torch.Tensor,
        resized_size: tuple[int, int],
        padded_size: tuple[int, int],
        output_size: tuple[int, int],
    ) -> Prediction:
        """One image's results at ``output_size``.

        Each task uses only the queries it needs: semantic all of them, panoptic those that pass its threshold,
        instance those in the top k. Their mask logits are upsampled once for all tasks, in chunks of queries
        (``CHUNK_VALUES``), and their sigmoid is computed once; the results are those of the reference's
        post-processing, which upsamples every query for every task.

        Args:
            class_logits: (Q, K + 1) ensembled class log-probabilities (``InferenceOutput.class_logits``).
            mask_logits: (Q, h, w) stride-4 mask logits of the padded input.
            resized_size: the (h, w) of the image as fed, before padding.
            padded_size: the padded (H, W) of the batch.
            output_size: (height, width) of the results (the original image's).
        """
        with torch.inference_mode():
            class_logits = class_logits.float()
            mask_logits = mask_logits.float()
            h, w = output_size
            device = mask_logits.device
            thing = self.thing_mask.to(class_logits.device)
            pred = Prediction(height=h, width=w, vocabulary=self.vocabulary)

            semantic = "semantic" in self.tasks
            panoptic = select_panoptic_queries(class_logits, self.object_mask_threshold) if "panoptic" in self.tasks else None
            candidates = select_instance_candidates(class_logits, thing, topk=self.topk) if "instance" in self.tasks else None
            needed = self._needed_queries(class_logits.shape[0], semantic, panoptic, candidates, device)

            # per task, its state; each chunk of upsampled queries is offered to every task
            class_probs = class_logits.softmax(-1)[:, :-1]
            sem = None
            votes = PixelVotes(panoptic.scores, (h, w), device) if panoptic is not None else None
            inst_queries, inst_position = candidates.queries() if candidates is not None else (None, None)
            inst_masks, inst_scores = [], []
            chunk = max(1, chunk_values(device) // max(1, h * w))
            plan = _chunk_plan(needed, panoptic.index if panoptic is not None else None, inst_queries, chunk, device)
            for index, pan_rows, inst_rows in plan:
                logits = self._resize_masks(mask_logits[index], resized_size, padded_size, output_size)
                probs = logits.sigmoid()
                if semantic:
                    if sem is None:
                        sem = semantic_scores(class_probs[index], probs)
                    else:  # accumulated in place: (K, H*W) += (K, n) @ (n, H*W)
                        sem.view(sem.shape[0], -1).addmm_(class_probs[index].T, probs.reshape(probs.shape[0], -1))
                if pan_rows is not None:
                    votes.add(probs[pan_rows])
                if inst_rows is not None:
                    masks, scores = instance_mask_scores(logits[inst_rows], probs[inst_rows])
                    inst_masks.append(masks)
                    inst_scores.append(scores)
                del logits, probs

            if panoptic is not None:
                pred.panoptic = self._panoptic_result(finish_panoptic(panoptic, votes, self.thing_mask, self.overlap_threshold))
            if semantic:
                if sem is None:  # no query at all
                    sem = torch.zeros((len(self.vocabulary), h, w), device=device)
                pred.semantic = SemanticResult(
                    class_map=sem.argmax(0).to(torch.int32).cpu().numpy(),
                    scores=sem.cpu().numpy() if self.semantic_scores else None,
                )
            if candidates is not None:
                pred.instances = self._instance_result(candidates, inst_masks, inst_scores, inst_position, (h, w), device)
            return pred

    def _instance_result(self, candidates, masks: list, scores: list, position: torch.Tensor, size: tuple[int, int],
                         device) -> InstanceResult:
        """The top-k instances from the candidates' upsampled masks and mask scores, gathered chunk by chunk."""
        if masks:
            masks, scores = torch.cat(masks), torch.cat(scores)
        else:
            masks, scores = torch.zeros((0, *size), dtype=torch.bool, device=device), torch.zeros(0, device=device)
        position = position.to(device)
        inst = rank_instances(candidates, masks[position], scores[position])
        classes = inst.classes.cpu().numpy()
        return InstanceResult(
            masks=inst.masks.cpu().numpy(),
            scores=inst.scores.float().cpu().numpy(),
            classes=classes,
            category_ids=self.category_ids[classes] if len(classes) else np.zeros(0, np.int64),
            labels=[self.vocabulary.labels[c] for c in classes],
        )

    @staticmethod
    def _needed_queries(num_queries, semantic, panoptic, candidates, device) -> torch.Tensor:
        """(N,) ascending indices of the queries whose masks some task reads."""
        if semantic:
            return torch.arange(num_queries, device=device)
        parts = []
        if panoptic is not None:
            parts.append(panoptic.index.to(device))
        if candidates is not None:
            parts.append(candidates.query_index.to(device))
        if not parts:
            return torch.zeros(0, dtype=torch.long, device=device)
        return torch.unique(torch.cat(parts), sorted=True)

    @staticmethod
    def _resize_masks(mask_logits, resized_size, padded_size, output_size) -> torch.Tensor:
        """(Q, h, w) stride-4 logits -> (Q, H, W) at the output size, as the reference's sem_seg_postprocess."""
        if mask_logits.shape[0] == 0:
            return mask_logits.new_zeros((0, *output_size))
        x = F.interpolate(mask_logits[None], size=padded_size, mode="bilinear", align_corners=False)
        x = x[:, :, : resized_size[0], : resized_size[1]]
        if tuple(resized_size) != tuple(output_size):
            x = F.interpolate(x, size=output_size, mode="bilinear", align_corners=False)
        return x[0]

    def _panoptic_result(self, pan) -> PanopticResult:
        segment_map = pan.segment_map.cpu().numpy().astype(np.int32)
        boxes = segment_bboxes(segment_map, [s["id"] for s in pan.segments])
        segments = []
        for s, bbox, query in zip(pan.segments, boxes, pan.query_index):
            c = int(s["class_index"])
            segments.append(
                {
                    "id": int(s["id"]),
                    "label": self.vocabulary.labels[c],
                    "category_id": int(self.category_ids[c]),
                    "class_index": c,
                    "is_thing": bool(s["is_thing"]),
                    "score": float(s["score"]),
                    "area": int(s["area"]),
                    "bbox": bbox,
                    "query_index": int(query),
                }
            )
        return PanopticResult(segment_map=segment_map, segments=segments)

    # ------------------------------------------------------------------ the whole thing
    def predict_batch(self, images: Sequence[Any]) -> list[Prediction]:
        """Each image's results, as ``predictor(image)`` gives them: images of one padded size (``batch_key``) share
        a forward pass."""
        decoded = [self.preprocess(img) for img in images]
        results: list = [None] * len(decoded)
        for index in batch_groups([self.batch_key(img.shape[:2]) for img in decoded]):
            out, sizes, padded = self.infer([decoded[i] for i in index])
            for j, i in enumerate(index):
                results[i] = self.postprocess(out.class_logits[j], out.mask_logits[j], sizes[j], padded,
                                              decoded[i].shape[:2])
        return results

    def __call__(self, image: Any) -> Prediction:
        return self.predict_batch([image])[0]
