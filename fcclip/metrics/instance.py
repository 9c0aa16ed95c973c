"""Instance segmentation mask AP, COCO-style, through pycocotools' COCOeval (iouType "segm").

`InstanceAccumulator` collects, per image, the ground-truth instances (masks as COCO RLE, category, iscrowd, area)
and the predictions (RLE, category, score); `result()` builds in-memory COCO objects and runs COCOeval. AP is the
COCO AP@[.50:.95] with at most 100 detections per image, averaged over the categories that have ground truth.
"""
from __future__ import annotations

import contextlib
import io
import warnings
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import numpy as np
import pycocotools.mask as mask_utils
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

from ..masks import encode_rle

__all__ = ["InstanceAccumulator"]

_STAT_NAMES = ("AP", "AP50", "AP75", "APs", "APm", "APl")


def _to_rles(name: str, masks: Any) -> list[dict]:
    """COCO RLEs (`counts` as str) of (N, H, W) masks, a sequence of (H, W) masks, or a sequence of RLE dicts."""
    if masks is None:
        return []
    if hasattr(masks, "detach"):  # a torch tensor
        masks = masks.detach().cpu().numpy()
    if isinstance(masks, np.ndarray):
        if masks.ndim != 3:
            raise ValueError(f"{name} must be (N, H, W) masks, got shape {masks.shape}")
        return [encode_rle(m) for m in masks]
    rles = []
    for m in masks:
        if isinstance(m, Mapping):
            counts = m["counts"]
            if isinstance(counts, list):  # uncompressed RLE: compress it
                h, w = (int(s) for s in m["size"])
                rle = mask_utils.frPyObjects({"size": [h, w], "counts": counts}, h, w)
                counts = rle["counts"]
            if isinstance(counts, bytes):
                counts = counts.decode("ascii")
            rles.append({"size": [int(s) for s in m["size"]], "counts": counts})
        else:
            rles.append(encode_rle(m))
    return rles


def _area(rle: dict) -> int:
    return int(mask_utils.area({"size": rle["size"], "counts": rle["counts"].encode("ascii")}))


def _image_key(image_id: Any) -> tuple[str, Any]:
    return (type(image_id).__name__, image_id)


class InstanceAccumulator:
    """Mask AP over a set of images, one `update` per image.

    Args:
        categories: the evaluated categories, `[{"id": int, "name": str (optional), ...}]`. Ground truth of other
            categories is dropped and a prediction of another category is an error. `None`: every category that
            appears in the ground truth or the predictions.

    `merge` concatenates another accumulator's images (exact: the result does not depend on the sharding);
    `state_dict()` is plain JSON.
    """

    def __init__(self, categories: Iterable[Mapping[str, Any]] | None = None):
        if categories is None:
            self.categories = None
        else:
            self.categories = [{"id": int(c["id"]), "name": str(c.get("name", c["id"]))} for c in categories]
            ids = [c["id"] for c in self.categories]
            if len(set(ids)) != len(ids):
                raise ValueError("category ids must be unique")
        self._images: dict[Any, list[int] | None] = {}  # image_id -> [H, W] (None when it has no mask at all)
        self._gt: list[dict] = []
        self._pred: list[dict] = []

    @property
    def num_images(self) -> int:
        return len(self._images)

    def update(
        self,
        image_id: int | str,
        gt_masks: Any,
        gt_categories: Sequence[int],
        pred_masks: Any,
        pred_categories: Sequence[int],
        pred_scores: Sequence[float],
        *,
        gt_iscrowd: Sequence[bool] | None = None,
    ) -> None:
        """Add one image.

        Args:
            image_id: unique over the whole evaluation (int or str).
            gt_masks: (N, H, W) bool masks (numpy or torch), a sequence of (H, W) masks, or of COCO RLE dicts.
            gt_categories: (N,) category ids.
            pred_masks: (M, H, W) masks, or a sequence of masks or COCO RLE dicts (`fcclip label` output).
            pred_categories: (M,) category ids.
            pred_scores: (M,) confidences.
            gt_iscrowd: (N,) crowd flags (default: none is crowd).
        """
        if isinstance(image_id, np.integer):
            image_id = int(image_id)
        if not isinstance(image_id, (int, str)) or isinstance(image_id, bool):
            raise ValueError(f"image_id must be an int or a str, got {image_id!r}")
        if image_id in self._images:
            raise ValueError(f"image {image_id!r} was already added")
        gt_rles = _to_rles("gt_masks", gt_masks)
        pred_rles = _to_rles("pred_masks", pred_masks)
        gt_categories = [int(c) for c in np.asarray(gt_categories).reshape(-1)]
        pred_categories = [int(c) for c in np.asarray(pred_categories).reshape(-1)]
        pred_scores = [float(s) for s in np.asarray(pred_scores, dtype=np.float64).reshape(-1)]
        crowd = [False] * len(gt_rles) if gt_iscrowd is None else [bool(c) for c in np.asarray(gt_iscrowd).ravel()]
        if not len(gt_rles) == len(gt_categories) == len(crowd):
            raise ValueError(f"image {image_id!r}: gt_masks, gt_categories and gt_iscrowd differ in length")
        if not len(pred_rles) == len(pred_categories) == len(pred_scores):
            raise ValueError(f"image {image_id!r}: pred_masks, pred_categories and pred_scores differ in length")
        sizes = {tuple(r["size"]) for r in gt_rles + pred_rles}
        if len(sizes) > 1:
            raise ValueError(f"image {image_id!r}: masks of different sizes {sorted(sizes)}")
        known = None if self.categories is None else {c["id"] for c in self.categories}
        if known is not None:
            unknown = sorted(set(pred_categories) - known)
            if unknown:
                raise ValueError(f"image {image_id!r}: predictions of unknown categories {unknown}")

        self._images[image_id] = list(sizes.pop()) if sizes else None
        for rle, category, iscrowd in zip(gt_rles, gt_categories, crowd):
            if known is None or category in known:
                self._gt.append(
                    {"image_id": image_id, "category_id": category, "iscrowd": int(iscrowd), "area": _area(rle),
                     "segmentation": rle}
                )
        for rle, category, score in zip(pred_rles, pred_categories, pred_scores):
            self._pred.append({"image_id": image_id, "category_id": category, "score": score, "segmentation": rle})

    # ---------------------------------------------------------------- sharding
    def merge(self, other: InstanceAccumulator) -> InstanceAccumulator:
        """Append the images of `other` (none may already be here); returns self."""
        if other.categories != self.categories:
            raise ValueError("cannot merge accumulators over different categories")
        twice = set(self._images) & set(other._images)
        if twice:
            raise ValueError(f"images added to both accumulators: {sorted(twice, key=_image_key)[:5]}")
        self._images.update(other._images)
        self._gt.extend(dict(a) for a in other._gt)
        self._pred.extend(dict(a) for a in other._pred)
        return self

    def state_dict(self) -> dict:
        """Plain JSON-able state: categories, images and every collected instance (RLE counts as text)."""
        return {
            "kind": "instance",
            "categories": None if self.categories is None else [dict(c) for c in self.categories],
            "images": [{"id": i, "size": size} for i, size in self._images.items()],
            "gt": [dict(a) for a in self._gt],
            "pred": [dict(a) for a in self._pred],
        }

    @classmethod
    def from_state_dict(cls, state: Mapping[str, Any]) -> InstanceAccumulator:
        if state.get("kind", "instance") != "instance":
            raise ValueError(f"not an instance state: kind {state.get('kind')!r}")
        acc = cls(state["categories"])
        acc._images = {im["id"]: im["size"] for im in state["images"]}
        acc._gt = [dict(a) for a in state["gt"]]
        acc._pred = [dict(a) for a in state["pred"]]
        return acc

    # ---------------------------------------------------------------- result
    def result(self) -> dict:
        """COCO mask AP as fractions (0-1).

        Returns:
            `{"AP", "AP50", "AP75", "APs", "APm", "APl", "per_class": {category_id: AP}}`; a value COCOeval leaves
            undefined (-1: no ground truth in that category or area range) is `None`.
        """

        images = sorted(self._images, key=_image_key)
        coco_id = {image_id: i + 1 for i, image_id in enumerate(images)}
        if self.categories is not None:
            categories = [dict(c) for c in self.categories]
        else:
            seen = sorted({a["category_id"] for a in self._gt} | {a["category_id"] for a in self._pred})
            categories = [{"id": c, "name": str(c)} for c in seen]
        empty = {name: None for name in _STAT_NAMES} | {"per_class": {c["id"]: None for c in categories}}
        if not images or not categories:
            return empty

        def by_image(annotations: list[dict]) -> list[dict]:  # sharding-independent order
            ordered = sorted(annotations, key=lambda a: coco_id[a["image_id"]])  # stable: keeps per-image order
            return [dict(a, image_id=coco_id[a["image_id"]]) for a in ordered]

        gt_anns = [
            dict(a, id=i + 1, segmentation={"size": a["segmentation"]["size"],
                                             "counts": a["segmentation"]["counts"].encode("ascii")})
            for i, a in enumerate(by_image(self._gt))
        ]
        pred_anns = [
            dict(a, segmentation={"size": a["segmentation"]["size"],
                                  "counts": a["segmentation"]["counts"].encode("ascii")})
            for a in by_image(self._pred)
        ]
        coco_images = []
        for image_id in images:
            size = self._images[image_id] or [0, 0]
            coco_images.append({"id": coco_id[image_id], "height": size[0], "width": size[1]})

        with contextlib.redirect_stdout(io.StringIO()), warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*__array__ implementation doesn't accept a copy keyword")
            gt = COCO()
            gt.dataset = {"images": coco_images, "categories": categories, "annotations": gt_anns}
            gt.createIndex()
            if pred_anns:
                dt = gt.loadRes(pred_anns)
            else:  # loadRes cannot take an empty list
                dt = COCO()
                dt.dataset = {"images": coco_images, "categories": categories, "annotations": []}
                dt.createIndex()
            evaluator = COCOeval(gt, dt, iouType="segm")
            evaluator.evaluate()
            evaluator.accumulate()
            evaluator.summarize()

        def defined(x: float) -> float | None:
            return None if x < 0 else float(x)

        out: dict[str, Any] = {name: defined(evaluator.stats[i]) for i, name in enumerate(_STAT_NAMES)}
        precision = evaluator.eval["precision"]  # (T, R, K, A, M): IoU thresholds, recall, category, area, maxDets
        per_class = {}
        for k, category_id in enumerate(evaluator.params.catIds):
            p = precision[:, :, k, 0, -1]
            p = p[p > -1]
            per_class[category_id] = float(p.mean()) if p.size else None
        out["per_class"] = per_class
        return out
