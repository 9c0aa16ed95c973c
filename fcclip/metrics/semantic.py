"""Semantic segmentation metrics (mIoU, fwIoU, mACC, pACC) from a confusion matrix, as detectron2's SemSegEvaluator
computes them (the evaluator behind FC-CLIP's published semantic numbers).

With K classes, TP_c the pixels of class c predicted c, GT_c the ground-truth pixels of c, P_c the pixels predicted c
(over labeled ground truth only):

    IoU_c = TP_c / (GT_c + P_c - TP_c),   acc_c = TP_c / GT_c
    mIoU, mACC: means over the classes with ground-truth pixels (the others have no accuracy and their IoU is left
                out: a class only predicted, never present, does not lower mIoU)
    fwIoU = sum_c IoU_c * GT_c / sum GT,  pACC = sum TP / sum GT

Ground-truth pixels equal to `ignore_index` are left out. A predicted label outside [0, K) (say 255, "unlabeled")
counts as wrong for the pixel's ground-truth class and as nobody's prediction.
"""
from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

__all__ = ["SemanticAccumulator", "semantic_compute"]


def _as_label_map(name: str, labels: Any) -> np.ndarray:
    if hasattr(labels, "detach"):  # a torch tensor, without importing torch here
        labels = labels.detach().cpu().numpy()
    labels = np.asarray(labels)
    if labels.dtype.kind not in "iu":
        raise ValueError(f"{name} must hold integer labels, got dtype {labels.dtype}")
    return labels.astype(np.int64, copy=False)


class SemanticAccumulator:
    """Confusion matrix over a set of images, one `update` per image.

    Args:
        num_classes: K; labels are 0..K-1.
        ignore_index: ground-truth label that is not evaluated.

    `confusion` is (K, K+1) int64, indexed [ground truth, prediction]; the last column holds predictions
    outside [0, K). `merge` adds another accumulator's matrix (exact); `state_dict()` is plain JSON.
    """

    def __init__(self, num_classes: int, ignore_index: int | None = 255):
        if num_classes < 1:
            raise ValueError(f"num_classes must be >= 1, got {num_classes}")
        self.num_classes = int(num_classes)
        self.ignore_index = None if ignore_index is None else int(ignore_index)
        self.confusion = np.zeros((self.num_classes, self.num_classes + 1), dtype=np.int64)
        self.num_images = 0

    def update(self, gt: np.ndarray, pred: np.ndarray) -> None:
        """Add one image: `gt` and `pred` are (H, W) integer label maps of the same shape.

        Raises:
            ValueError: shapes differ, or a ground-truth label is outside [0, K) and is not `ignore_index`.
        """
        gt = _as_label_map("gt", gt)
        pred = _as_label_map("pred", pred)
        if gt.shape != pred.shape:
            raise ValueError(f"gt {gt.shape} and pred {pred.shape} differ in shape")
        k = self.num_classes
        gt, pred = gt.ravel(), pred.ravel()
        if self.ignore_index is not None:
            keep = gt != self.ignore_index
            if not keep.all():
                gt, pred = gt[keep], pred[keep]
        if gt.size and (gt.min() < 0 or gt.max() >= k):
            bad = np.unique(gt[(gt < 0) | (gt >= k)])[:5].tolist()
            raise ValueError(f"ground-truth labels {bad} are outside [0, {k}) and are not the ignore label")
        pred = np.where((pred < 0) | (pred >= k), k, pred)
        self.confusion += np.bincount(gt * (k + 1) + pred, minlength=k * (k + 1)).reshape(k, k + 1)
        self.num_images += 1

    def merge(self, other: SemanticAccumulator) -> SemanticAccumulator:
        """Add the confusion matrix of `other` (another set of images); returns self."""
        if other.num_classes != self.num_classes or other.ignore_index != self.ignore_index:
            raise ValueError("cannot merge accumulators with different num_classes or ignore_index")
        self.confusion += other.confusion
        self.num_images += other.num_images
        return self

    def state_dict(self) -> dict:
        """Plain JSON-able state; the confusion matrix is stored sparsely (flat index and count of non-zeros)."""
        flat = self.confusion.ravel()
        index = np.flatnonzero(flat)
        return {
            "kind": "semantic",
            "num_classes": self.num_classes,
            "ignore_index": self.ignore_index,
            "num_images": self.num_images,
            "confusion": {"index": index.tolist(), "count": flat[index].tolist()},
        }

    @classmethod
    def from_state_dict(cls, state: Mapping[str, Any]) -> SemanticAccumulator:
        if state.get("kind", "semantic") != "semantic":
            raise ValueError(f"not a semantic state: kind {state.get('kind')!r}")
        acc = cls(state["num_classes"], state["ignore_index"])
        acc.num_images = int(state.get("num_images", 0))
        flat = acc.confusion.reshape(-1)
        flat[np.asarray(state["confusion"]["index"], dtype=np.int64)] = np.asarray(
            state["confusion"]["count"], dtype=np.int64
        )
        return acc

    def result(self) -> dict:
        """mIoU, fwIoU, mACC, pACC as fractions (0-1).

        Returns:
            `{"mIoU", "fwIoU", "mACC", "pACC", "n", "per_class": {c: {"iou", "acc"}}}`; `n` is the number of
            classes averaged (those with ground-truth pixels); undefined values are `None`.
        """
        k = self.num_classes
        tp = np.diag(self.confusion)[:k].astype(np.float64)
        pos_gt = self.confusion.sum(axis=1).astype(np.float64)
        pos_pred = self.confusion[:, :k].sum(axis=0).astype(np.float64)
        valid = pos_gt > 0  # the union is then > 0 as well
        iou = np.full(k, np.nan)
        acc = np.full(k, np.nan)
        iou[valid] = tp[valid] / (pos_gt[valid] + pos_pred[valid] - tp[valid])
        acc[valid] = tp[valid] / pos_gt[valid]
        total = pos_gt.sum()
        n = int(valid.sum())

        def value(x: float) -> float | None:
            return None if np.isnan(x) else float(x)

        return {
            "mIoU": float(iou[valid].mean()) if n else None,
            "fwIoU": float((iou[valid] * pos_gt[valid]).sum() / total) if n else None,
            "mACC": float(acc[valid].mean()) if n else None,
            "pACC": float(tp.sum() / total) if n else None,
            "n": n,
            "per_class": {c: {"iou": value(iou[c]), "acc": value(acc[c])} for c in range(k)},
        }


def _load_labels(path: Path) -> np.ndarray:
    with Image.open(path) as im:
        if im.mode in ("RGB", "RGBA"):
            raise ValueError(f"{path}: a label map must be single-channel, got mode {im.mode}")
        return np.asarray(im).astype(np.int64)


def semantic_compute(
    gt_dir: str | os.PathLike, pred_dir: str | os.PathLike, num_classes: int, ignore: int | None = 255
) -> dict:
    """Semantic metrics over PNG label maps, one per image, matched by file name.

    Every `*.png` of `gt_dir` needs a prediction of the same name in `pred_dir` (extra predictions are not read).

    Raises:
        FileNotFoundError: a folder is missing, it has no PNG, or a prediction is missing (named).
    """
    gt_dir, pred_dir = Path(gt_dir), Path(pred_dir)
    for folder in (gt_dir, pred_dir):
        if not folder.is_dir():
            raise FileNotFoundError(f"no folder {folder}")
    names = sorted(p.name for p in gt_dir.glob("*.png"))
    if not names:
        raise FileNotFoundError(f"no PNG label maps in {gt_dir}")
    missing = [n for n in names if not (pred_dir / n).is_file()]
    if missing:
        more = f" and {len(missing) - 5} more" if len(missing) > 5 else ""
        raise FileNotFoundError(f"no prediction in {pred_dir} for {', '.join(missing[:5])}{more}")
    acc = SemanticAccumulator(num_classes, ignore)
    for name in names:
        gt = _load_labels(gt_dir / name)
        pred = _load_labels(pred_dir / name)
        try:
            acc.update(gt, pred)
        except ValueError as e:
            raise ValueError(f"{name}: {e}") from None
    return acc.result()
