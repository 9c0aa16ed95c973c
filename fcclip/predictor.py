"""Predictor: an image in, panoptic / semantic / instance results at the image's own size out.

    predictor = Predictor(model, vocabulary="ade20k_150")
    result = predictor("photo.jpg")          # path, URI, PIL image, HxWx3 uint8 array or encoded bytes
    result.panoptic.segment_map             # (H, W) int32 segment ids, 0 = unlabelled
    result.panoptic.segments                # [{id, label, category_id, is_thing, score, area, bbox}]

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
from PIL import Image

from .images import DEFAULT_MAX_PIXELS, load_image
from .masks import mask_to_bbox
from .model import FCCLIP, InferenceOutput
from .postprocess import instance_inference, panoptic_inference, panoptic_inference_rows, semantic_inference
from .text import TextClassifier, TextClassifierCache, build_text_classifier
from .vocabulary import Vocabulary, load_vocabulary

TASKS = ("panoptic", "semantic", "instance")
# Up to this many float32 values (queries x output pixels), post-processing upsamples every query's mask with
# the reference's interpolation. Above it, memory stays bounded: panoptic runs over bands of rows with the same
# bilinear resize written as two small matrices (identical up to float rounding), semantic over chunks of queries,
# instances only for the queries in the top k.
FULL_POSTPROCESS_LIMIT = 64_000_000
BAND_VALUES = 16_000_000  # float32 values per band of the bounded panoptic path


def bilinear_matrix(in_size: int, out_size: int, device=None) -> torch.Tensor:
    """(out, in) matrix of 1-D bilinear resizing with align_corners=False (PyTorch's convention)."""
    scale = in_size / out_size
    src = ((torch.arange(out_size, dtype=torch.float64) + 0.5) * scale - 0.5).clamp(min=0)
    i0 = src.floor().long().clamp(max=in_size - 1)
    i1 = (i0 + 1).clamp(max=in_size - 1)
    w1 = src - i0
    m = torch.zeros(out_size, in_size, dtype=torch.float64)
    rows = torch.arange(out_size)
    m.index_put_((rows, i0), 1 - w1, accumulate=True)
    m.index_put_((rows, i1), w1, accumulate=True)
    return m.to(device=device, dtype=torch.float32)


def resize_matrix(small: int, padded: int, resized: int, output: int, device=None) -> torch.Tensor:
    """(output, small): stride-4 grid -> padded size, crop to the resized image, -> output size."""
    m = bilinear_matrix(small, padded)[:resized]
    if resized != output:
        m = bilinear_matrix(resized, output) @ m
    return m.to(device)


@dataclass
class PanopticResult:
    segment_map: np.ndarray  # (H, W) int32, 0 = no segment
    segments: list[dict]  # {id, label, category_id, is_thing, score, area, bbox [x, y, w, h]}


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


def resized_shape(height: int, width: int, short_edge: int | None, max_size: int) -> tuple[int, int]:
    """The reference's ResizeShortestEdge: (new_h, new_w)."""
    if short_edge is None:
        return height, width
    scale = short_edge / min(height, width)
    new_h, new_w = height * scale, width * scale
    if max(new_h, new_w) > max_size:
        scale = max_size / max(new_h, new_w)
        new_h, new_w = new_h * scale, new_w * scale
    return max(1, int(new_h + 0.5)), max(1, int(new_w + 0.5))


def resize_image(image: np.ndarray, short_edge: int | None, max_size: int) -> np.ndarray:
    """(H, W, 3) uint8 -> resized (bilinear, with PIL as the reference) uint8."""
    h, w = image.shape[:2]
    new_h, new_w = resized_shape(h, w, short_edge, max_size)
    if (new_h, new_w) == (h, w):
        return image
    return np.asarray(Image.fromarray(image).resize((new_w, new_h), Image.BILINEAR))


def pad_batch(images: Sequence[torch.Tensor], divisibility: int) -> torch.Tensor:
    """Stack (3, h_i, w_i) normalised images into (B, 3, H, W), zero-padded at the bottom/right to a multiple of
    ``divisibility``."""
    h = max(t.shape[-2] for t in images)
    w = max(t.shape[-1] for t in images)
    h = -(-h // divisibility) * divisibility
    w = -(-w // divisibility) * divisibility
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
        autocast_dtype: e.g. torch.bfloat16 to run the backbone and decoder under autocast on a GPU.
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
        self.autocast_dtype = autocast_dtype
        self.max_pixels = max_pixels
        self.text: TextClassifier = build_text_classifier(
            model.backbone, self.vocabulary, train_vocabulary=inf.train_vocabulary, cache=text_cache
        )
        self.thing_mask = torch.tensor(self.vocabulary.thing_mask, dtype=torch.bool)
        self.category_ids = np.array(self.vocabulary.ids, dtype=np.int64)

    @property
    def device(self) -> torch.device:
        return self.model.device

    # ------------------------------------------------------------------ steps, usable one by one by pipelines
    def preprocess(self, image: Any) -> np.ndarray:
        """Decode any supported input to (H, W, 3) uint8 RGB (EXIF orientation applied, modes converted)."""
        return load_image(image, max_pixels=self.max_pixels)

    def infer(self, images: Sequence[np.ndarray]) -> tuple[InferenceOutput, list[tuple[int, int]], tuple[int, int]]:
        """Resize, normalise, pad and run the model on a batch of decoded images.

        Returns:
            the model outputs, the resized (h, w) of each image, and the padded (H, W).
        """
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
        mask_cls: torch.Tensor,
        mask_logits: torch.Tensor,
        resized_size: tuple[int, int],
        padded_size: tuple[int, int],
        output_size: tuple[int, int],
    ) -> Prediction:
        """One image's results at ``output_size``.

        Args:
            mask_cls: (Q, K + 1) ensembled log-probabilities.
            mask_logits: (Q, h, w) stride-4 mask logits of the padded input.
            resized_size: the (h, w) of the image as fed, before padding.
            padded_size: the padded (H, W) of the batch.
            output_size: (height, width) of the results (the original image's).
        """
        with torch.inference_mode():
            mask_cls = mask_cls.float()
            mask_logits = mask_logits.float()
            q, k = mask_cls.shape[0], mask_cls.shape[1] - 1
            h, w = output_size
            full = q * h * w <= FULL_POSTPROCESS_LIMIT
            probs = mask_cls.softmax(-1)
            cache: dict[str, torch.Tensor] = {}

            def masks_for(index: torch.Tensor | None) -> torch.Tensor:
                if full or index is None:
                    if "all" not in cache:
                        cache["all"] = self._resize_masks(mask_logits, resized_size, padded_size, output_size)
                    return cache["all"] if index is None else cache["all"][index]
                return self._resize_masks(mask_logits[index], resized_size, padded_size, output_size)

            pred = Prediction(height=h, width=w, vocabulary=self.vocabulary)
            thing = self.thing_mask.to(mask_cls.device)
            if "panoptic" in self.tasks:
                settings = dict(object_mask_threshold=self.object_mask_threshold, overlap_threshold=self.overlap_threshold)
                if full:
                    pan = panoptic_inference(mask_cls, masks_for(None), thing, **settings)
                else:
                    ry = resize_matrix(mask_logits.shape[-2], padded_size[0], resized_size[0], h, mask_logits.device)
                    rx = resize_matrix(mask_logits.shape[-1], padded_size[1], resized_size[1], w, mask_logits.device)
                    rows = lambda keep, a, b: torch.einsum(  # noqa: E731
                        "rh,nhw,cw->nrc", ry[a:b], mask_logits[keep], rx
                    )
                    band = max(1, BAND_VALUES // max(1, q * w))
                    pan = panoptic_inference_rows(mask_cls, rows, (h, w), thing, chunk_rows=band, **settings)
                pred.panoptic = self._panoptic_result(pan)
            if "semantic" in self.tasks:
                sem = semantic_inference(mask_cls, masks_for(None)) if full else self._semantic_chunked(
                    mask_cls, mask_logits, resized_size, padded_size, output_size
                )
                pred.semantic = SemanticResult(
                    class_map=sem.argmax(0).to(torch.int32).cpu().numpy(),
                    scores=sem.cpu().numpy() if self.semantic_scores else None,
                )
            if "instance" in self.tasks:
                if full:
                    inst = instance_inference(mask_cls, masks_for(None), thing, topk=self.topk)
                else:
                    flat = probs[:, :-1].flatten()
                    top = flat.topk(min(self.topk, flat.numel())).indices
                    queries = torch.unique(top // k)
                    inst = instance_inference(mask_cls[queries], masks_for(queries), thing, topk=self.topk)
                classes = inst.classes.cpu().numpy()
                pred.instances = InstanceResult(
                    masks=inst.masks.cpu().numpy(),
                    scores=inst.scores.float().cpu().numpy(),
                    classes=classes,
                    category_ids=self.category_ids[classes] if len(classes) else np.zeros(0, np.int64),
                    labels=[self.vocabulary.labels[c] for c in classes],
                )
            return pred

    def _semantic_chunked(self, mask_cls, mask_logits, resized_size, padded_size, output_size, chunk: int = 32):
        """Semantic scores accumulated over chunks of queries (bounded memory for very large outputs)."""
        probs = mask_cls.softmax(-1)[:, :-1]
        total = None
        for start in range(0, mask_cls.shape[0], chunk):
            m = self._resize_masks(mask_logits[start : start + chunk], resized_size, padded_size, output_size)
            part = torch.einsum("qc,qhw->chw", probs[start : start + chunk], m.sigmoid())
            total = part if total is None else total + part
        return total

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
        seg = pan.panoptic_seg.cpu().numpy().astype(np.int32)
        segments = []
        for s in pan.segments:
            c = int(s["category_id"])
            segments.append(
                {
                    "id": int(s["id"]),
                    "label": self.vocabulary.labels[c],
                    "category_id": int(self.category_ids[c]),
                    "class_index": c,
                    "is_thing": bool(s["isthing"]),
                    "score": float(s["score"]),
                    "area": int(s["area"]),
                    "bbox": mask_to_bbox(seg == s["id"]),
                }
            )
        return PanopticResult(segment_map=seg, segments=segments)

    # ------------------------------------------------------------------ the whole thing
    def predict_batch(self, images: Sequence[Any]) -> list[Prediction]:
        decoded = [self.preprocess(img) for img in images]
        out, sizes, padded = self.infer(decoded)
        return [
            self.postprocess(out.mask_cls[i], out.mask_logits[i], sizes[i], padded, img.shape[:2])
            for i, img in enumerate(decoded)
        ]

    def __call__(self, image: Any) -> Prediction:
        return self.predict_batch([image])[0]
