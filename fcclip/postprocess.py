"""Semantic, panoptic and instance post-processing of FC-CLIP's per-query outputs (pure functions).

Every function takes one image's outputs, already resized to the output size:

- `mask_cls` (Q, K+1): class logits or log-probabilities; softmax is applied here, the last column is void.
- `mask_pred` (Q, H, W): mask logits.

They reproduce the reference's `FCCLIP.semantic_inference`, `panoptic_inference` and `instance_inference`
(bytedance/fc-clip), including its quirks (see tests/fixtures/parity/README.md, "Post-processing"). Inputs may live
on any device; half-precision inputs are computed in float32.
"""
from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = [
    "InstanceOutput",
    "PanopticOutput",
    "instance_inference",
    "panoptic_inference",
    "semantic_inference",
]


def _as_float(x: Tensor) -> Tensor:
    """float16 / bfloat16 / integer tensors as float32; float32 and float64 unchanged."""
    if not x.is_floating_point() or x.element_size() < 4:
        return x.float()
    return x


def _check_inputs(mask_cls: Tensor, mask_pred: Tensor) -> tuple[Tensor, Tensor]:
    if mask_cls.dim() != 2 or mask_cls.shape[1] < 2:
        raise ValueError(f"mask_cls must be (Q, K+1) with K >= 1, got shape {tuple(mask_cls.shape)}")
    if mask_pred.dim() != 3 or mask_pred.shape[0] != mask_cls.shape[0]:
        raise ValueError(
            f"mask_pred must be (Q, H, W) with Q = mask_cls.shape[0] = {mask_cls.shape[0]}, "
            f"got shape {tuple(mask_pred.shape)}"
        )
    return _as_float(mask_cls), _as_float(mask_pred)


def _thing_lookup(thing_mask: Sequence[bool] | Tensor, num_classes: int, device: torch.device) -> Tensor:
    """(K,) bool tensor on `device`: True for thing classes (contiguous index)."""
    thing = torch.as_tensor(thing_mask, device=device).bool().flatten()
    if thing.numel() != num_classes:
        raise ValueError(f"thing_mask has {thing.numel()} entries, expected one per class ({num_classes})")
    return thing


def semantic_inference(mask_cls: Tensor, mask_pred: Tensor) -> Tensor:
    """Per-class score maps: sum over queries of class probability times mask probability.

    Args:
        mask_cls: (Q, K+1) class logits (void last).
        mask_pred: (Q, H, W) mask logits.

    Returns:
        (K, H, W) float tensor, `einsum("qk,qhw->khw", softmax(mask_cls)[:, :-1], sigmoid(mask_pred))`.
    """
    mask_cls, mask_pred = _check_inputs(mask_cls, mask_pred)
    probs = F.softmax(mask_cls, dim=-1)[:, :-1]
    return torch.einsum("qk,qhw->khw", probs, mask_pred.sigmoid())


@dataclass
class PanopticOutput:
    """Panoptic segmentation of one image.

    Attributes:
        panoptic_seg: (H, W) int32 segment id per pixel; 0 = no segment.
        segments: one dict per segment, in id order: `id` (1, 2, ...), `category_id` (contiguous class index),
            `isthing` (bool), `score` (the query's class probability; for a stuff segment merged from several
            queries, the largest of theirs) and `area` (pixels of `id` in `panoptic_seg`).
    """

    panoptic_seg: Tensor
    segments: list[dict] = field(default_factory=list)


def panoptic_inference(
    mask_cls: Tensor,
    mask_pred: Tensor,
    thing_mask: Sequence[bool] | Tensor,
    *,
    object_mask_threshold: float = 0.0,
    overlap_threshold: float = 0.8,
) -> PanopticOutput:
    """Panoptic segmentation as the reference computes it.

    Queries whose top class is void, or whose top probability is <= `object_mask_threshold`, are dropped. Each
    pixel goes to the kept query with the largest `score * sigmoid(mask)`. Then, for each kept query in query
    order: `mask_area` = pixels it wins, `original_area` = pixels with sigmoid >= 0.5, its segment = both; it is
    skipped unless all three are non-empty and `mask_area / original_area >= overlap_threshold` (as in the
    reference, `mask_area` is not intersected with the >= 0.5 mask). A stuff class that already has a segment adds
    its pixels to that segment; otherwise the query opens a new segment with the next id.

    Args:
        mask_cls: (Q, K+1) class logits (void last).
        mask_pred: (Q, H, W) mask logits.
        thing_mask: (K,) True for thing classes.
        object_mask_threshold: minimum top-class probability (exclusive) of a kept query.
        overlap_threshold: minimum ratio of won pixels to the query's own (>= 0.5) pixels.

    Returns:
        PanopticOutput with an (H, W) int32 map on the input's device.
    """
    mask_cls, mask_pred = _check_inputs(mask_cls, mask_pred)
    height, width = mask_pred.shape[-2:]
    return panoptic_inference_rows(
        mask_cls,
        lambda keep, start, stop: mask_pred[keep, start:stop],
        (height, width),
        thing_mask,
        object_mask_threshold=object_mask_threshold,
        overlap_threshold=overlap_threshold,
        chunk_rows=max(height, 1),
        device=mask_pred.device,
    )


def panoptic_inference_rows(
    mask_cls: Tensor,
    mask_rows: Callable[[Tensor, int, int], Tensor],
    size: tuple[int, int],
    thing_mask: Sequence[bool] | Tensor,
    *,
    object_mask_threshold: float = 0.0,
    overlap_threshold: float = 0.8,
    chunk_rows: int = 256,
    device: torch.device | None = None,
) -> PanopticOutput:
    """:func:`panoptic_inference` computed over bands of rows, for outputs too large to hold (Q, H, W) at once.

    Every quantity of the reference's algorithm is either per pixel (the winning query, and whether the winner's
    sigmoid is >= 0.5) or a per-query pixel count, so it can be accumulated band by band with the same result.

    Args:
        mask_cls: (Q, K+1) class logits (void last).
        mask_rows: ``mask_rows(keep, start, stop)`` returns the (N, stop - start, W) mask logits of the kept queries
            (``keep``: (N,) long indices into Q) for output rows start..stop.
        size: (H, W) of the output.
        chunk_rows: rows per band.
    """
    mask_cls = _as_float(mask_cls)
    device = device if device is not None else mask_cls.device
    num_classes = mask_cls.shape[1] - 1
    height, width = size
    thing = _thing_lookup(thing_mask, num_classes, torch.device("cpu"))

    scores, labels = F.softmax(mask_cls, dim=-1).max(-1)
    keep = (labels.ne(num_classes) & (scores > object_mask_threshold)).nonzero().squeeze(1)
    cur_scores = scores[keep]
    cur_classes = labels[keep]
    num_kept = int(keep.numel())
    panoptic_seg = torch.zeros((height, width), dtype=torch.int32, device=device)
    if num_kept == 0 or height * width == 0:
        return PanopticOutput(panoptic_seg, [])

    winner = torch.empty((height, width), dtype=torch.long, device=device)
    in_mask = torch.empty((height, width), dtype=torch.bool, device=device)
    original_area = torch.zeros(num_kept, dtype=torch.long, device=device)
    for start in range(0, height, chunk_rows):
        stop = min(start + chunk_rows, height)
        band = _as_float(mask_rows(keep, start, stop)).to(device).sigmoid()  # (N, rows, W)
        # The winner of each pixel; argmax takes the first query on ties, as in the reference.
        band_winner = (cur_scores.to(device).view(-1, 1, 1) * band).argmax(0)
        confident = band >= 0.5
        winner[start:stop] = band_winner
        # A pixel belongs to its winner's mask only where the winner's own sigmoid is >= 0.5.
        in_mask[start:stop] = confident.gather(0, band_winner.unsqueeze(0)).squeeze(0)
        original_area += confident.flatten(1).sum(1)
    mask_area = torch.bincount(winner.flatten(), minlength=num_kept)
    mask_sum = torch.bincount(winner[in_mask], minlength=num_kept)

    # One transfer for the whole loop (the loop is over kept queries only, and needs no device syncs).
    stats = torch.stack([mask_area, original_area, mask_sum]).tolist()
    classes = cur_classes.tolist()
    query_scores = cur_scores.tolist()
    is_thing = thing.tolist()

    # Segments painted by different queries are disjoint (each pixel has one winner), so painting order does not
    # matter and the map is a lookup from the winning query to its segment id.
    segment_of_query = [0] * num_kept
    segments: list[dict] = []
    stuff_segment: dict[int, dict] = {}
    for k in range(num_kept):
        area, own_area, both = stats[0][k], stats[1][k], stats[2][k]
        if not (area > 0 and own_area > 0 and both > 0):
            continue
        if area / own_area < overlap_threshold:
            continue
        category = classes[k]
        isthing = bool(is_thing[category])
        if not isthing and category in stuff_segment:
            segment = stuff_segment[category]
            segment["score"] = max(segment["score"], query_scores[k])
            segment_of_query[k] = segment["id"]
            continue
        segment = {"id": len(segments) + 1, "category_id": category, "isthing": isthing, "score": query_scores[k]}
        segments.append(segment)
        if not isthing:
            stuff_segment[category] = segment
        segment_of_query[k] = segment["id"]

    if segments:
        lookup = torch.tensor(segment_of_query, dtype=torch.int32, device=device)
        panoptic_seg = torch.where(in_mask, lookup[winner], panoptic_seg)
        areas = torch.bincount(panoptic_seg.flatten().long(), minlength=len(segments) + 1).tolist()
        for segment in segments:
            segment["area"] = int(areas[segment["id"]])
    return PanopticOutput(panoptic_seg, segments)


@dataclass
class InstanceOutput:
    """Instance segmentation of one image, N detections sorted by score (descending).

    Attributes:
        scores: (N,) float class probability times the mean mask probability inside the mask.
        classes: (N,) int64 contiguous class index.
        masks: (N, H, W) bool, mask logit > 0.
        query_index: (N,) int64 query that produced each detection.
    """

    scores: Tensor
    classes: Tensor
    masks: Tensor
    query_index: Tensor

    def __len__(self) -> int:
        return int(self.scores.shape[0])


def instance_inference(
    mask_cls: Tensor,
    mask_pred: Tensor,
    thing_mask: Sequence[bool] | Tensor,
    *,
    topk: int = 100,
    things_only: bool = True,
) -> InstanceOutput:
    """Instance segmentation as the reference computes it.

    The `topk` largest (query, class) probabilities (void excluded) are candidates; with `things_only`, those of
    stuff classes are dropped; each candidate's mask is its query's mask logit > 0, and its score is the class
    probability times the mean sigmoid inside that mask (0 for an empty mask).

    The reference's topk is unsorted; the result here is sorted by score with a stable sort over the positions of
    `topk(sorted=False)`, so exact ties (typically several empty masks, score 0) keep torch's unsorted-topk order.
    On CPU this reproduces the reference's order; on other devices tied detections may come in another order.

    Args:
        mask_cls: (Q, K+1) class logits (void last).
        mask_pred: (Q, H, W) mask logits.
        thing_mask: (K,) True for thing classes.
        topk: number of (query, class) candidates; capped at Q * K.
        things_only: keep thing classes only (the reference's panoptic setting).

    Returns:
        InstanceOutput on the input's device.
    """
    mask_cls, mask_pred = _check_inputs(mask_cls, mask_pred)
    num_queries, num_classes = mask_cls.shape[0], mask_cls.shape[1] - 1
    device = mask_pred.device
    thing = _thing_lookup(thing_mask, num_classes, device)

    probs = F.softmax(mask_cls, dim=-1)[:, :-1].flatten()  # (Q*K,), query-major
    k = max(0, min(int(topk), num_queries * num_classes))
    top_probs, top_index = probs.topk(k, sorted=False)
    classes = top_index % num_classes
    query_index = torch.div(top_index, num_classes, rounding_mode="floor")
    if things_only:
        keep = thing[classes]
        top_probs, classes, query_index = top_probs[keep], classes[keep], query_index[keep]

    logits = mask_pred[query_index]  # (N, H, W)
    masks = logits > 0
    mask_area = masks.flatten(1).sum(1).to(logits.dtype)
    mask_score = (logits.sigmoid() * masks).flatten(1).sum(1) / (mask_area + 1e-6)
    scores = top_probs * mask_score
    order = torch.sort(scores, descending=True, stable=True).indices
    return InstanceOutput(
        scores=scores[order],
        classes=classes[order],
        masks=masks[order],
        query_index=query_index[order],
    )
