"""Semantic, panoptic and instance post-processing of FC-CLIP's per-query outputs (pure functions).

Every task takes one image's outputs, already resized to the output size:

- `class_logits` (Q, K+1): class logits or log-probabilities; softmax is applied here, the last column is void.
- `mask_logits` (Q, H, W): mask logits.

They reproduce the reference's `FCCLIP.semantic_inference`, `panoptic_inference` and `instance_inference`
(bytedance/fc-clip), including its quirks (see tests/fixtures/parity/README.md, "Post-processing"). Inputs may live
on any device; half-precision inputs are computed in float32.

Panoptic and instance inference are also offered in parts, so that a caller can upsample only the queries a task
uses, and only once for all tasks (`fcclip.predictor.Predictor` does):

- panoptic: :func:`select_panoptic_queries` (which queries can form a segment), :class:`PixelVotes` (each pixel's
  winning query, fed the kept queries' mask probabilities in query order, in one piece or in chunks),
  :func:`merge_segments` (which queries become segments, stuff merged by class) and :func:`paint_segments` (the map).
- instance: :func:`select_instance_candidates` (the top (query, class) pairs), :func:`instance_mask_scores` (each
  query's binary mask and its mean mask probability) and :func:`rank_instances`.

Names: a *class index* is a position in the vocabulary (0..K-1; K = void); the vocabulary's own ids (`category_id`
in `fcclip.predictor`) are not used here.
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = [
    "InstanceCandidates",
    "InstanceOutput",
    "PanopticOutput",
    "PanopticQueries",
    "PixelVotes",
    "instance_inference",
    "instance_mask_scores",
    "merge_segments",
    "paint_segments",
    "panoptic_inference",
    "rank_instances",
    "select_instance_candidates",
    "segment_queries",
    "select_panoptic_queries",
    "semantic_inference",
]


def _as_float(x: Tensor) -> Tensor:
    """float16 / bfloat16 / integer tensors as float32; float32 and float64 unchanged."""
    if not x.is_floating_point() or x.element_size() < 4:
        return x.float()
    return x


def _check_inputs(class_logits: Tensor, mask_logits: Tensor) -> tuple[Tensor, Tensor]:
    if class_logits.dim() != 2 or class_logits.shape[1] < 2:
        raise ValueError(f"class_logits must be (Q, K+1) with K >= 1, got shape {tuple(class_logits.shape)}")
    if mask_logits.dim() != 3 or mask_logits.shape[0] != class_logits.shape[0]:
        raise ValueError(
            f"mask_logits must be (Q, H, W) with Q = class_logits.shape[0] = {class_logits.shape[0]}, "
            f"got shape {tuple(mask_logits.shape)}"
        )
    return _as_float(class_logits), _as_float(mask_logits)


def _count_true(mask: Tensor) -> Tensor:
    """(N, P) bool -> (N,) int32 count of True per row.

    Summed as uint8 into int32 (7x faster on CPU than `mask.sum(1)`, which first copies the mask to int64).
    """
    if mask.numel() == 0 or mask.shape[1] >= 2**31:
        return mask.sum(1)
    return mask.view(torch.uint8).sum(1, dtype=torch.int32)


def _thing_lookup(thing_mask: Sequence[bool] | Tensor, num_classes: int, device: torch.device) -> Tensor:
    """(K,) bool tensor on `device`: True for thing classes (by class index)."""
    thing = torch.as_tensor(thing_mask, device=device).bool().flatten()
    if thing.numel() != num_classes:
        raise ValueError(f"thing_mask has {thing.numel()} entries, expected one per class ({num_classes})")
    return thing


# --------------------------------------------------------------------------------------------------------- semantic
def semantic_inference(class_logits: Tensor, mask_logits: Tensor) -> Tensor:
    """Per-class score maps: sum over queries of class probability times mask probability.

    Args:
        class_logits: (Q, K+1) class logits (void last).
        mask_logits: (Q, H, W) mask logits.

    Returns:
        (K, H, W) float tensor, `einsum("qk,qhw->khw", softmax(class_logits)[:, :-1], sigmoid(mask_logits))`.
    """
    class_logits, mask_logits = _check_inputs(class_logits, mask_logits)
    return semantic_scores(F.softmax(class_logits, dim=-1)[:, :-1], mask_logits.sigmoid())


def semantic_scores(class_probs: Tensor, mask_probs: Tensor) -> Tensor:
    """(K, H, W) = `einsum("qk,qhw->khw", class_probs, mask_probs)`: the semantic scores of some queries.

    Summing this over disjoint sets of queries gives :func:`semantic_inference` (up to float rounding).
    """
    return torch.einsum("qk,qhw->khw", class_probs, mask_probs)


# --------------------------------------------------------------------------------------------------------- panoptic
@dataclass
class PanopticOutput:
    """Panoptic segmentation of one image.

    Attributes:
        segment_map: (H, W) int32 segment id per pixel; 0 = no segment.
        segments: one dict per segment, in id order: `id` (1, 2, ...), `class_index`, `is_thing` (bool), `score`
            (the query's class probability; for a stuff segment merged from several queries, the largest of
            theirs) and `area` (pixels of `id` in `segment_map`).
        query_index: per segment (in the order of `segments`), the query it came from; for a stuff segment merged
            from several queries, the one with the largest score (the first in query order on ties), whose score
            is the segment's. Filled by :func:`finish_panoptic` / :func:`panoptic_inference`.
    """

    segment_map: Tensor
    segments: list[dict] = field(default_factory=list)
    query_index: list[int] = field(default_factory=list)


@dataclass
class PanopticQueries:
    """The queries that may form a panoptic segment, in query order.

    Attributes:
        index: (N,) int64 query indices, ascending.
        scores: (N,) their top class probability.
        classes: (N,) int64 their top class index (never void).
    """

    index: Tensor
    scores: Tensor
    classes: Tensor

    def __len__(self) -> int:
        return int(self.index.numel())


def select_panoptic_queries(class_logits: Tensor, object_mask_threshold: float = 0.0) -> PanopticQueries:
    """Queries whose top class is not void and whose top probability is > `object_mask_threshold`.

    Args:
        class_logits: (Q, K+1) class logits (void last).
    """
    class_logits = _as_float(class_logits)
    num_classes = class_logits.shape[1] - 1
    scores, classes = F.softmax(class_logits, dim=-1).max(-1)
    keep = (classes.ne(num_classes) & (scores > object_mask_threshold)).nonzero().squeeze(1)
    return PanopticQueries(index=keep, scores=scores[keep], classes=classes[keep])


class PixelVotes:
    """Each pixel's winning query among the kept ones, accumulated over chunks of queries fed in query order.

    A pixel goes to the query with the largest `score * sigmoid(mask)` (the first one on ties, as `argmax` in the
    reference); it is *in* its winner's mask where the winner's own sigmoid is >= 0.5. Per query, the pixels with
    sigmoid >= 0.5 (`original_area`) are counted as the chunks go by. Feeding all queries at once or in chunks gives
    the same result.

    Args:
        scores: (N,) the kept queries' scores (:attr:`PanopticQueries.scores`).
        size: (H, W).
        device: where the per-pixel state lives.
    """

    def __init__(self, scores: Tensor, size: tuple[int, int], device: torch.device | None = None):
        self.device = device if device is not None else scores.device
        self.scores = _as_float(scores).to(self.device)
        self.size = (int(size[0]), int(size[1]))
        self.fed = 0
        self.best: Tensor | None = None  # (H, W) winning score * sigmoid so far
        self.winner = torch.zeros(self.size, dtype=torch.long, device=self.device)
        self.in_mask = torch.zeros(self.size, dtype=torch.bool, device=self.device)
        self.original_area = torch.zeros(len(self.scores), dtype=torch.long, device=self.device)

    def add(self, mask_probs: Tensor) -> None:
        """Feed the next (n, H, W) mask probabilities (sigmoid of the mask logits) of kept queries, in order."""
        n = mask_probs.shape[0]
        if self.fed + n > len(self.scores):
            raise ValueError(f"fed {self.fed + n} queries' masks, but only {len(self.scores)} were kept")
        if n == 0:
            return
        mask_probs = _as_float(mask_probs).to(self.device)
        weighted = self.scores[self.fed : self.fed + n].view(-1, 1, 1) * mask_probs
        best, winner = weighted.max(0)  # the first maximum on ties
        in_mask = mask_probs.gather(0, winner.unsqueeze(0)).squeeze(0) >= 0.5
        self.original_area[self.fed : self.fed + n] = _count_true((mask_probs >= 0.5).flatten(1))
        winner += self.fed
        if self.best is None:
            self.best, self.winner, self.in_mask = best, winner, in_mask
        else:  # strictly larger: an earlier query keeps the pixel on ties
            better = best > self.best
            self.best = torch.where(better, best, self.best)
            self.winner = torch.where(better, winner, self.winner)
            self.in_mask = torch.where(better, in_mask, self.in_mask)
        self.fed += n

    def areas(self) -> tuple[Tensor, Tensor, Tensor]:
        """Per kept query: pixels it wins, its own pixels (sigmoid >= 0.5), and pixels it wins inside its own mask."""
        if self.fed != len(self.scores):
            raise ValueError(f"{len(self.scores)} queries were kept but only {self.fed} were fed")
        n = len(self.scores)
        mask_area = torch.bincount(self.winner.flatten(), minlength=n)
        mask_sum = torch.bincount(self.winner[self.in_mask], minlength=n)
        return mask_area, self.original_area, mask_sum


def merge_segments(
    classes: Sequence[int],
    scores: Sequence[float],
    mask_area: Sequence[int],
    original_area: Sequence[int],
    mask_sum: Sequence[int],
    is_thing: Sequence[bool],
    overlap_threshold: float = 0.8,
) -> tuple[list[int], list[dict]]:
    """The reference's segment loop over the kept queries, in query order.

    A query is skipped unless it wins some pixels, has some of its own, wins some inside its own, and
    `mask_area / original_area >= overlap_threshold` (as in the reference, `mask_area` is not intersected with
    the query's own mask). A stuff class that already has a segment adds the query to it (keeping the larger score);
    otherwise the query opens a new segment with the next id.

    Args:
        classes, scores: per kept query, its class index and score.
        mask_area, original_area, mask_sum: per kept query, from :meth:`PixelVotes.areas`.
        is_thing: (K,) per class index.

    Returns:
        the segment id of each kept query (0 = none) and the segments (`id`, `class_index`, `is_thing`, `score`).
    """
    segment_of_query = [0] * len(classes)
    segments: list[dict] = []
    stuff_segment: dict[int, dict] = {}
    for k, class_index in enumerate(classes):
        area, own_area, both = mask_area[k], original_area[k], mask_sum[k]
        if not (area > 0 and own_area > 0 and both > 0):
            continue
        if area / own_area < overlap_threshold:
            continue
        thing = bool(is_thing[class_index])
        if not thing and class_index in stuff_segment:
            segment = stuff_segment[class_index]
            segment["score"] = max(segment["score"], scores[k])
            segment_of_query[k] = segment["id"]
            continue
        segment = {"id": len(segments) + 1, "class_index": class_index, "is_thing": thing, "score": scores[k]}
        segments.append(segment)
        if not thing:
            stuff_segment[class_index] = segment
        segment_of_query[k] = segment["id"]
    return segment_of_query, segments


def segment_queries(segment_of_query: Sequence[int], scores: Sequence[float], segments: list[dict]) -> list[int]:
    """Per segment, the position (among the kept queries) of the query that represents it: the first query of the
    segment whose score is the segment's score (for a stuff segment merged from several queries, the one with the
    largest score, the first in query order on ties; otherwise its only query)."""
    chosen: dict[int, int] = {}
    for k, segment_id in enumerate(segment_of_query):
        if segment_id and segment_id not in chosen and scores[k] == segments[segment_id - 1]["score"]:
            chosen[segment_id] = k
    return [chosen[s["id"]] for s in segments]


def paint_segments(votes: PixelVotes, segment_of_query: Sequence[int], segments: list[dict]) -> PanopticOutput:
    """The (H, W) int32 segment map: a pixel gets its winner's segment where it is in the winner's mask.

    Segments painted by different queries are disjoint (each pixel has one winner), so painting order does not
    matter. Adds each segment's `area`.
    """
    segment_map = torch.zeros(votes.size, dtype=torch.int32, device=votes.device)
    if segments:
        lookup = torch.tensor(segment_of_query, dtype=torch.int32, device=votes.device)
        segment_map = torch.where(votes.in_mask, lookup[votes.winner], segment_map)
        areas = torch.bincount(segment_map.flatten().long(), minlength=len(segments) + 1).tolist()
        for segment in segments:
            segment["area"] = int(areas[segment["id"]])
    return PanopticOutput(segment_map, segments)


def finish_panoptic(
    queries: PanopticQueries,
    votes: PixelVotes,
    thing_mask: Sequence[bool] | Tensor,
    overlap_threshold: float = 0.8,
) -> PanopticOutput:
    """Segments and map once every kept query's mask has been fed to `votes`."""
    if len(queries) == 0:
        return PanopticOutput(torch.zeros(votes.size, dtype=torch.int32, device=votes.device), [])
    mask_area, original_area, mask_sum = votes.areas()
    # one transfer for the loop (the loop is over kept queries only and needs no device syncs)
    stats = torch.stack([mask_area, original_area, mask_sum]).tolist()
    is_thing = torch.as_tensor(thing_mask).bool().flatten().tolist()
    scores = queries.scores.tolist()
    segment_of_query, segments = merge_segments(
        queries.classes.tolist(), scores, *stats, is_thing, overlap_threshold
    )
    out = paint_segments(votes, segment_of_query, segments)
    index = queries.index.tolist()
    out.query_index = [index[k] for k in segment_queries(segment_of_query, scores, segments)]
    return out


def panoptic_inference(
    class_logits: Tensor,
    mask_logits: Tensor,
    thing_mask: Sequence[bool] | Tensor,
    *,
    object_mask_threshold: float = 0.0,
    overlap_threshold: float = 0.8,
) -> PanopticOutput:
    """Panoptic segmentation as the reference computes it.

    Queries whose top class is void, or whose top probability is <= `object_mask_threshold`, are dropped. Each
    pixel goes to the kept query with the largest `score * sigmoid(mask)`. Then, for each kept query in query
    order: `mask_area` = pixels it wins, `original_area` = pixels with sigmoid >= 0.5, its segment = both; it is
    skipped unless all three are non-empty and `mask_area / original_area >= overlap_threshold`. A stuff class that
    already has a segment adds its pixels to that segment; otherwise the query opens a new segment with the next id.

    Args:
        class_logits: (Q, K+1) class logits (void last).
        mask_logits: (Q, H, W) mask logits.
        thing_mask: (K,) True for thing classes.
        object_mask_threshold: minimum top-class probability (exclusive) of a kept query.
        overlap_threshold: minimum ratio of won pixels to the query's own (>= 0.5) pixels.

    Returns:
        PanopticOutput with an (H, W) int32 map on the input's device.
    """
    class_logits, mask_logits = _check_inputs(class_logits, mask_logits)
    _thing_lookup(thing_mask, class_logits.shape[1] - 1, torch.device("cpu"))
    queries = select_panoptic_queries(class_logits, object_mask_threshold)
    votes = PixelVotes(queries.scores, mask_logits.shape[-2:], mask_logits.device)
    if len(queries) and mask_logits.shape[-2] * mask_logits.shape[-1] > 0:
        votes.add(mask_logits[queries.index].sigmoid())
    else:
        return PanopticOutput(torch.zeros(mask_logits.shape[-2:], dtype=torch.int32, device=mask_logits.device), [])
    return finish_panoptic(queries, votes, thing_mask, overlap_threshold)


# --------------------------------------------------------------------------------------------------------- instance
@dataclass
class InstanceOutput:
    """Instance segmentation of one image, N detections sorted by score (descending).

    Attributes:
        scores: (N,) float class probability times the mean mask probability inside the mask.
        classes: (N,) int64 class index.
        masks: (N, H, W) bool, mask logit > 0.
        query_index: (N,) int64 query that produced each detection.
    """

    scores: Tensor
    classes: Tensor
    masks: Tensor
    query_index: Tensor

    def __len__(self) -> int:
        return int(self.scores.shape[0])


@dataclass
class InstanceCandidates:
    """The top (query, class) pairs, in the order of `topk(sorted=False)`.

    Attributes:
        probs: (N,) class probabilities.
        classes: (N,) int64 class index.
        query_index: (N,) int64 query.
    """

    probs: Tensor
    classes: Tensor
    query_index: Tensor

    def queries(self) -> tuple[Tensor, Tensor]:
        """The distinct queries (ascending) and, per candidate, the position of its query among them."""
        return torch.unique(self.query_index, sorted=True, return_inverse=True)


def select_instance_candidates(
    class_logits: Tensor, thing_mask: Sequence[bool] | Tensor, *, topk: int = 100, things_only: bool = True
) -> InstanceCandidates:
    """The `topk` largest (query, class) probabilities (void excluded); with `things_only`, stuff ones dropped."""
    class_logits = _as_float(class_logits)
    num_queries, num_classes = class_logits.shape[0], class_logits.shape[1] - 1
    thing = _thing_lookup(thing_mask, num_classes, class_logits.device)
    probs = F.softmax(class_logits, dim=-1)[:, :-1].flatten()  # (Q*K,), query-major
    k = max(0, min(int(topk), num_queries * num_classes))
    top_probs, top_index = probs.topk(k, sorted=False)
    classes = top_index % num_classes
    query_index = torch.div(top_index, num_classes, rounding_mode="floor")
    if things_only:
        keep = thing[classes]
        top_probs, classes, query_index = top_probs[keep], classes[keep], query_index[keep]
    return InstanceCandidates(top_probs, classes, query_index)


def instance_mask_scores(mask_logits: Tensor, mask_probs: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """Binary masks and mask scores of some queries.

    Args:
        mask_logits: (U, H, W) mask logits.
        mask_probs: their sigmoid, when already computed.

    Returns:
        (U, H, W) bool masks (logit > 0) and (U,) mean mask probability inside each mask (0 for an empty mask).
    """
    mask_logits = _as_float(mask_logits)
    if mask_probs is None:
        mask_probs = mask_logits.sigmoid()
    masks = mask_logits > 0
    mask_area = _count_true(masks.flatten(1)).to(mask_logits.dtype)
    mask_score = (mask_probs * masks).flatten(1).sum(1) / (mask_area + 1e-6)
    return masks, mask_score


def rank_instances(candidates: InstanceCandidates, masks: Tensor, mask_score: Tensor) -> InstanceOutput:
    """Scores (class probability times mask score) sorted descending, with a stable sort over the candidates' order.

    Args:
        masks: (N, H, W) bool, one per candidate; mask_score: (N,) one per candidate.
    """
    scores = candidates.probs.to(mask_score.device) * mask_score
    order = torch.sort(scores, descending=True, stable=True).indices
    return InstanceOutput(
        scores=scores[order],
        classes=candidates.classes.to(order.device)[order],
        masks=masks[order],
        query_index=candidates.query_index.to(order.device)[order],
    )


def instance_inference(
    class_logits: Tensor,
    mask_logits: Tensor,
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
        class_logits: (Q, K+1) class logits (void last).
        mask_logits: (Q, H, W) mask logits.
        thing_mask: (K,) True for thing classes.
        topk: number of (query, class) candidates; capped at Q * K.
        things_only: keep thing classes only (the reference's panoptic setting).

    Returns:
        InstanceOutput on the input's device.
    """
    class_logits, mask_logits = _check_inputs(class_logits, mask_logits)
    candidates = select_instance_candidates(class_logits, thing_mask, topk=topk, things_only=things_only)
    queries, position = candidates.queries()
    masks, mask_score = instance_mask_scores(mask_logits[queries.to(mask_logits.device)])
    position = position.to(mask_logits.device)
    return rank_instances(candidates, masks[position], mask_score[position])
