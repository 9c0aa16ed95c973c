"""Panoptic quality (PQ, SQ, RQ) as the COCO panoptic API defines it (cocodataset/panopticapi, `pq_compute`).

Per image, a predicted segment and a ground-truth segment of the same category match when their IoU is above 0.5,
where the pixels the prediction puts over void are left out of the union:

    IoU = |P ∩ G| / (|P ∪ G| - |P ∩ void|)

Matches are true positives (their IoU is summed); unmatched non-crowd ground-truth segments are false negatives;
unmatched predictions are false positives unless more than half of their pixels lie on void or on a crowd region of
their own category. Crowd segments are never true positives nor false negatives. Per category:

    PQ = sum(IoU) / (TP + FP/2 + FN/2),   SQ = sum(IoU) / TP,   RQ = TP / (TP + FP/2 + FN/2)

and PQ, SQ, RQ are averaged over the categories that have any TP, FP or FN (All, Things, Stuff).

Void pixels: ground-truth id 0, an id that no segment of `segments_info` has, or a segment whose category is not an
evaluated category. (For COCO, whose ground truth has only known categories, this is the API's VOID exactly.)

Where this departs from the API, only on input COCO never has: areas are counted on the maps (the API takes the
ground-truth `area` from the JSON); several crowd segments of one category in an image all count as crowd (the API
keeps the last one listed); ground-truth ids without a segment, or of an unevaluated category, are void (the API
leaves them out of the matching but counts predictions over them as false positives).

`PanopticAccumulator` keeps per-category sums; accumulators of disjoint image sets merge exactly (the IoU sums are
kept as exact floating-point expansions, so any sharding gives the same numbers, bit for bit).
"""
from __future__ import annotations

import json
import math
import os
from collections.abc import Iterable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from ..masks import rgb2id

__all__ = ["PanopticAccumulator", "load_panoptic_png", "pq_compute"]

_MAX_ID = 1 << 24  # a COCO panoptic PNG holds ids below 256 ** 3


def _add_exact(partials: list[float], x: float) -> None:
    """Add `x` to the non-overlapping expansion `partials` (Shewchuk), keeping the sum exact.

    The value of the expansion is the exact sum of everything added; `math.fsum(partials)` rounds it once, so the
    result does not depend on the order of the additions.
    """
    i = 0
    for y in partials:
        if abs(x) < abs(y):
            x, y = y, x
        hi = x + y
        lo = y - (hi - x)
        if lo:
            partials[i] = lo
            i += 1
        x = hi
    partials[i:] = [x]


class _CategoryStat:
    __slots__ = ("iou", "tp", "fp", "fn")

    def __init__(self) -> None:
        self.iou: list[float] = []  # exact expansion of the IoU sum of the true positives
        self.tp = 0
        self.fp = 0
        self.fn = 0

    def iou_sum(self) -> float:
        return math.fsum(self.iou)


def _normalise_categories(categories: Iterable[Mapping[str, Any]]) -> list[dict]:
    out, seen = [], set()
    for c in categories:
        if "id" not in c or "isthing" not in c:
            raise ValueError(f"a category needs 'id' and 'isthing', got {dict(c)}")
        cid = int(c["id"])
        if cid in seen:
            raise ValueError(f"category id {cid} appears twice")
        seen.add(cid)
        entry = {"id": cid, "isthing": int(bool(c["isthing"]))}
        if c.get("name") is not None:
            entry["name"] = str(c["name"])
        out.append(entry)
    if not out:
        raise ValueError("no categories")
    return out


def _as_id_map(name: str, ids: Any) -> np.ndarray:
    if hasattr(ids, "detach"):  # a torch tensor, without importing torch here
        ids = ids.detach().cpu().numpy()
    ids = np.asarray(ids)
    if ids.ndim != 2:
        raise ValueError(f"{name} must be an (H, W) segment-id map, got shape {ids.shape}")
    if ids.dtype.kind not in "iu":
        raise ValueError(f"{name} must hold integer segment ids, got dtype {ids.dtype}")
    if ids.size and (ids.min() < 0 or ids.max() >= _MAX_ID):
        raise ValueError(f"{name} ids must be in [0, 2**24)")
    return ids.astype(np.int64, copy=False)


def _segments_by_id(name: str, segments: Iterable[Mapping[str, Any]], where: str) -> dict[int, Mapping]:
    out: dict[int, Mapping] = {}
    for s in segments:
        sid = int(s["id"])
        if sid in out:
            raise ValueError(f"{where}: {name} segment id {sid} appears twice in segments_info")
        out[sid] = s
    return out


def _pixel_overlaps(gt: np.ndarray, pred: np.ndarray, gt_info: Mapping[int, Any]):
    """Pixel counts of every (ground-truth id, predicted id) pair present, with ground truth that is not in
    ``gt_info`` (void) folded into id 0; and the areas of each ground-truth and predicted id."""
    pairs, counts = np.unique(gt * _MAX_ID + pred, return_counts=True)
    gt_ids, pred_ids = (pairs // _MAX_ID).tolist(), (pairs % _MAX_ID).tolist()
    overlap: dict[tuple[int, int], int] = {}
    gt_area: dict[int, int] = {}
    pred_area: dict[int, int] = {}
    for g, p, n in zip(gt_ids, pred_ids, counts.tolist()):
        if g not in gt_info:
            g = 0
        overlap[g, p] = overlap.get((g, p), 0) + n
        gt_area[g] = gt_area.get(g, 0) + n
        pred_area[p] = pred_area.get(p, 0) + n
    return overlap, gt_area, pred_area


def _check_predicted_ids(in_map: set[int], listed: set[int], where: str) -> None:
    """The non-zero ids of the predicted map are exactly the ids of the predicted segments."""
    if in_map == listed:
        return
    missing = sorted(in_map - listed)
    if missing:
        raise ValueError(f"{where}: predicted segment ids {missing} are in the map but not in segments_info")
    raise ValueError(
        f"{where}: predicted segment ids {sorted(listed - in_map)} are in segments_info but have no pixel in the map"
    )


class PanopticAccumulator:
    """Panoptic quality over a set of images, one `update` per image.

    Args:
        categories: the evaluated categories, `[{"id": int, "isthing": bool | 0/1, "name": str (optional)}]`.
            Ground-truth segments of other categories are void; a prediction of another category is an error.

    `state_dict()` is plain JSON; `merge` adds another accumulator's sums (disjoint images), exactly.
    """

    def __init__(self, categories: Iterable[Mapping[str, Any]]):
        self.categories = _normalise_categories(categories)
        self._isthing = {c["id"]: bool(c["isthing"]) for c in self.categories}
        self._stats = {c["id"]: _CategoryStat() for c in self.categories}
        self.num_images = 0

    # ---------------------------------------------------------------- per image
    def update(
        self,
        gt_map: np.ndarray,
        gt_segments: Sequence[Mapping[str, Any]],
        pred_map: np.ndarray,
        pred_segments: Sequence[Mapping[str, Any]],
        *,
        image_id: Any = None,
    ) -> None:
        """Add one image.

        Args:
            gt_map: (H, W) int ground-truth segment ids (0: void).
            gt_segments: `[{"id", "category_id", "iscrowd" (default 0), ...}]`; other keys (`area`) are not read:
                areas are counted on the maps.
            pred_map: (H, W) int predicted segment ids (0: no prediction).
            pred_segments: `[{"id", "category_id", ...}]`, exactly the non-zero ids of `pred_map`.
            image_id: named in error messages only.

        Raises:
            ValueError: shapes differ, a predicted id is in the map but not in `pred_segments` or the other way
                round, or a prediction has a category that is not evaluated.
        """
        where = f"image {image_id!r}" if image_id is not None else "image"
        gt = _as_id_map("gt_map", gt_map)
        pred = _as_id_map("pred_map", pred_map)
        if gt.shape != pred.shape:
            raise ValueError(f"{where}: gt_map {gt.shape} and pred_map {pred.shape} differ in shape")
        gt_info, pred_info = self._evaluated_segments(gt_segments, pred_segments, where)
        overlap, gt_area, pred_area = _pixel_overlaps(gt, pred, gt_info)
        _check_predicted_ids(set(pred_area) - {0}, set(pred_info), where)

        gt_category = {g: int(s["category_id"]) for g, s in gt_info.items()}
        gt_crowd = {g for g, s in gt_info.items() if int(s.get("iscrowd", 0)) == 1}
        pred_category = {p: int(s["category_id"]) for p, s in pred_info.items()}
        gt_matched, pred_matched = self._count_matches(overlap, gt_area, pred_area, gt_category, gt_crowd,
                                                       pred_category)
        self._count_misses(overlap, pred_area, gt_category, gt_crowd, pred_category, gt_matched, pred_matched)
        self.num_images += 1

    def _evaluated_segments(
        self, gt_segments: Sequence[Mapping[str, Any]], pred_segments: Sequence[Mapping[str, Any]], where: str
    ) -> tuple[dict[int, Mapping], dict[int, Mapping]]:
        """The ground-truth segments of evaluated categories and the predicted segments, by id; a prediction of
        id 0 or of a category that is not evaluated is an error."""
        gt_info = {
            sid: s
            for sid, s in _segments_by_id("ground-truth", gt_segments, where).items()
            if sid != 0 and int(s["category_id"]) in self._stats
        }
        pred_info = _segments_by_id("predicted", pred_segments, where)
        if 0 in pred_info:
            raise ValueError(f"{where}: predicted segment id 0 is reserved for 'no prediction'")
        for sid, s in pred_info.items():
            if int(s["category_id"]) not in self._stats:
                raise ValueError(f"{where}: predicted segment {sid} has unknown category_id {s['category_id']}")
        return gt_info, pred_info

    def _count_matches(self, overlap, gt_area, pred_area, gt_category, gt_crowd, pred_category):
        """True positives: pairs of one category with IoU > 0.5 (pixels predicted over void left out of the
        union); returns the matched ground-truth and predicted ids."""
        gt_matched: set[int] = set()
        pred_matched: set[int] = set()
        for (g, p), inter in overlap.items():
            if g == 0 or p == 0 or g in gt_crowd or gt_category[g] != pred_category[p]:
                continue
            union = pred_area[p] + gt_area[g] - inter - overlap.get((0, p), 0)
            if 2 * inter > union:  # IoU > 0.5, decided on integers
                stat = self._stats[gt_category[g]]
                stat.tp += 1
                _add_exact(stat.iou, inter / union)
                gt_matched.add(g)
                pred_matched.add(p)
        return gt_matched, pred_matched

    def _count_misses(self, overlap, pred_area, gt_category, gt_crowd, pred_category, gt_matched, pred_matched):
        """False negatives (unmatched non-crowd ground truth) and false positives (unmatched predictions, unless
        more than half of them lies on void or on a crowd region of their own category)."""
        crowd_of_category: dict[int, list[int]] = {}
        for g, category in gt_category.items():
            if g in gt_crowd:
                crowd_of_category.setdefault(category, []).append(g)
            elif g not in gt_matched:
                self._stats[category].fn += 1
        for p, category in pred_category.items():
            if p in pred_matched:
                continue
            ignored = overlap.get((0, p), 0)
            ignored += sum(overlap.get((g, p), 0) for g in crowd_of_category.get(category, ()))
            if 2 * ignored > pred_area[p]:
                continue
            self._stats[category].fp += 1

    # ---------------------------------------------------------------- sharding
    def merge(self, other: PanopticAccumulator) -> PanopticAccumulator:
        """Add the statistics of `other` (another set of images) to this one, exactly; returns self."""
        if other.categories != self.categories:
            raise ValueError("cannot merge accumulators over different categories")
        for cid, theirs in other._stats.items():
            mine = self._stats[cid]
            for x in theirs.iou:
                _add_exact(mine.iou, x)
            mine.tp += theirs.tp
            mine.fp += theirs.fp
            mine.fn += theirs.fn
        self.num_images += other.num_images
        return self

    def state_dict(self) -> dict:
        """Plain JSON-able state: categories, image count and per-category sums (IoU sum as an exact expansion)."""
        return {
            "kind": "panoptic",
            "categories": [dict(c) for c in self.categories],
            "num_images": self.num_images,
            "stats": {
                str(cid): {"iou": list(s.iou), "tp": s.tp, "fp": s.fp, "fn": s.fn} for cid, s in self._stats.items()
            },
        }

    @classmethod
    def from_state_dict(cls, state: Mapping[str, Any]) -> PanopticAccumulator:
        if state.get("kind", "panoptic") != "panoptic":
            raise ValueError(f"not a panoptic state: kind {state.get('kind')!r}")
        acc = cls(state["categories"])
        acc.num_images = int(state.get("num_images", 0))
        for key, s in state["stats"].items():
            cid = int(key)
            if cid not in acc._stats:
                raise ValueError(f"state has statistics for unknown category {cid}")
            stat = acc._stats[cid]
            for x in s["iou"]:
                _add_exact(stat.iou, float(x))
            stat.tp, stat.fp, stat.fn = int(s["tp"]), int(s["fp"]), int(s["fn"])
        return acc

    # ---------------------------------------------------------------- result
    def result(self) -> dict:
        """PQ, SQ, RQ as fractions (0-1).

        Returns:
            `{"All" | "Things" | "Stuff": {"pq", "sq", "rq", "n"}, "per_class": {category_id: {"pq", "sq", "rq",
            "tp", "fp", "fn", "iou"}}}`; `n` counts the categories with any TP, FP or FN, the only ones averaged.
            A category without any has `None` for pq/sq/rq; an average over no category is `None`. SQ of a
            category with FP or FN but no TP is 0 (and enters the SQ average as 0), as in the COCO API.
        """
        per_class: dict[int, dict] = {}
        for cid, s in self._stats.items():
            iou = s.iou_sum()
            entry = {"pq": None, "sq": None, "rq": None, "tp": s.tp, "fp": s.fp, "fn": s.fn, "iou": iou}
            if s.tp + s.fp + s.fn:
                denominator = s.tp + 0.5 * s.fp + 0.5 * s.fn
                entry["pq"] = iou / denominator
                entry["sq"] = iou / s.tp if s.tp else 0.0
                entry["rq"] = s.tp / denominator
            per_class[cid] = entry

        out: dict[str, Any] = {}
        for name, want in (("All", None), ("Things", True), ("Stuff", False)):
            counted = [
                per_class[c["id"]]
                for c in self.categories
                if (want is None or self._isthing[c["id"]] == want) and per_class[c["id"]]["pq"] is not None
            ]
            n = len(counted)
            out[name] = {
                key: (sum(e[key] for e in counted) / n if n else None) for key in ("pq", "sq", "rq")
            } | {"n": n}
        out["per_class"] = per_class
        return out


# -------------------------------------------------------------------- COCO panoptic format on disk
def load_panoptic_png(path: str | os.PathLike) -> np.ndarray:
    """(H, W) int64 segment ids of a COCO panoptic PNG (id = R + 256 G + 256^2 B)."""
    with Image.open(path) as im:
        rgb = np.asarray(im.convert("RGB"))
    return rgb2id(rgb)


def _load_json(source: str | os.PathLike | Mapping) -> Mapping:
    if isinstance(source, Mapping):
        return source
    with open(source) as f:
        return json.load(f)


def _evaluate_pairs(
    categories: list[dict], pairs: list[tuple[dict, dict]], gt_dir: str | os.PathLike, pred_dir: str | os.PathLike
) -> dict:
    acc = PanopticAccumulator(categories)
    for gt_ann, pred_ann in pairs:
        gt_map = load_panoptic_png(Path(gt_dir) / gt_ann["file_name"])
        pred_map = load_panoptic_png(Path(pred_dir) / pred_ann["file_name"])
        acc.update(
            gt_map, gt_ann["segments_info"], pred_map, pred_ann["segments_info"], image_id=gt_ann["image_id"]
        )
    return acc.state_dict()


def pq_compute(
    gt_json: str | os.PathLike | Mapping,
    gt_dir: str | os.PathLike,
    pred_json: str | os.PathLike | Mapping,
    pred_dir: str | os.PathLike,
    *,
    workers: int = 1,
) -> dict:
    """PQ of COCO-panoptic predictions against COCO-panoptic ground truth on disk.

    Args:
        gt_json: path (or loaded dict) of the ground-truth JSON: `annotations` `[{image_id, file_name,
            segments_info}]` and `categories` `[{id, isthing, name}]`, which are the evaluated categories.
        gt_dir: folder of the ground-truth PNGs.
        pred_json: path (or dict) of the predictions' JSON (`annotations` as above; its categories are not read).
        pred_dir: folder of the predicted PNGs.
        workers: threads to spread the images over (PNG decoding and numpy release the GIL); the result is the
            same, exactly.

    Returns:
        `PanopticAccumulator.result()` over every ground-truth image.

    Raises:
        ValueError: a ground-truth image has no prediction (named), or an image id appears twice.
        FileNotFoundError: a folder or PNG is missing.
    """
    gt = _load_json(gt_json)
    pred = _load_json(pred_json)
    for folder in (gt_dir, pred_dir):
        if not Path(folder).is_dir():
            raise FileNotFoundError(f"no folder {folder}")
    categories = _normalise_categories(gt["categories"])

    pred_by_image: dict[Any, dict] = {}
    for ann in pred["annotations"]:
        if ann["image_id"] in pred_by_image:
            raise ValueError(f"image_id {ann['image_id']!r} appears twice in the predictions")
        pred_by_image[ann["image_id"]] = ann
    # predictions made without the ground truth's ids (fcclip predict names an image by its file's stem) are matched
    # by their PNG's name, which is the image's in both
    pred_by_file = {ann.get("file_name"): ann for ann in pred["annotations"]}
    pairs, seen = [], set()
    for ann in gt["annotations"]:
        image_id = ann["image_id"]
        if image_id in seen:
            raise ValueError(f"image_id {image_id!r} appears twice in the ground truth")
        seen.add(image_id)
        match = pred_by_image.get(image_id) or pred_by_file.get(ann["file_name"])
        if match is None:
            raise ValueError(f"no prediction for the image with id {image_id!r} ({ann['file_name']})")
        pairs.append((ann, match))

    if workers <= 1 or len(pairs) < 2:
        return PanopticAccumulator.from_state_dict(_evaluate_pairs(categories, pairs, gt_dir, pred_dir)).result()
    chunks = [pairs[i::workers] for i in range(min(workers, len(pairs)))]
    total = PanopticAccumulator(categories)
    with ThreadPoolExecutor(len(chunks)) as pool:
        futures = [pool.submit(_evaluate_pairs, categories, chunk, gt_dir, pred_dir) for chunk in chunks]
        for future in futures:
            total.merge(PanopticAccumulator.from_state_dict(future.result()))
    return total.result()
