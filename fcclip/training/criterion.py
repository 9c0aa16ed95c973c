"""The training loss of FC-CLIP (Mask2Former's set criterion): Hungarian matching, then class and mask losses.

For each decoder head (the last one and, with deep supervision, every earlier one) the queries are matched to the
ground-truth segments, then

- ``loss_ce``: cross-entropy over K + 1 classes for every query; matched queries target their segment's class,
  the others the no-object class K, whose weight is `eos_coef` (0.1) instead of 1;
- ``loss_mask``: sigmoid binary cross-entropy of each matched mask against its target, on `num_points` points
  sampled mostly where the prediction is uncertain;
- ``loss_dice``: dice loss on the same points.

Mask losses are summed over matched pairs and divided by the number of target segments per image averaged over
the whole (distributed) batch, at least 1. Losses of earlier heads get the suffixes ``_0`` .. ``_{L-1}``. The
criterion returns unweighted losses; `weighted_total` applies the weights (``loss_ce`` 2, ``loss_mask`` 5,
``loss_dice`` 5 for every head in the reference, see `build_weight_dict`).
"""
from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
from torch import nn

from .matcher import HungarianMatcher
from .points import point_sample, uncertain_point_coords_with_randomness, uncertainty

if TYPE_CHECKING:
    from fcclip.model import FCCLIPOutput

__all__ = [
    "SetCriterion",
    "average_num_masks",
    "build_criterion",
    "build_weight_dict",
    "dice_loss",
    "outputs_from_model",
    "sigmoid_ce_loss",
    "weighted_total",
]


def dice_loss(logits: torch.Tensor, targets: torch.Tensor, num_masks: float) -> torch.Tensor:
    """Sum over masks of 1 - (2 |p * t| + 1) / (|p| + |t| + 1), divided by `num_masks`.

    Args:
        logits: (M, P) mask logits at the sampled points; p = sigmoid(logits).
        targets: (M, P) in {0, 1}.
        num_masks: the normaliser.
    """
    p = logits.sigmoid()
    numerator = 2 * (p * targets).sum(-1)
    denominator = p.sum(-1) + targets.sum(-1)
    return (1 - (numerator + 1) / (denominator + 1)).sum() / num_masks


def sigmoid_ce_loss(logits: torch.Tensor, targets: torch.Tensor, num_masks: float) -> torch.Tensor:
    """Sum over masks of the mean binary cross-entropy over points, divided by `num_masks`: (M, P), (M, P)."""
    loss = F.binary_cross_entropy_with_logits(logits, targets, reduction="none")
    return loss.mean(1).sum() / num_masks


def masked_sigmoid_ce_loss(logits: torch.Tensor, targets: torch.Tensor, weights: torch.Tensor,
                           num_masks: float) -> torch.Tensor:
    """Sum over masks of the mean binary cross-entropy over the points of weight 1, divided by `num_masks`.

    logits, targets, weights: (M, P); weights in {0, 1} (a mask whose points all have weight 0 contributes 0).
    """
    loss = F.binary_cross_entropy_with_logits(logits, targets, reduction="none") * weights
    return (loss.sum(1) / weights.sum(1).clamp(min=1)).sum() / num_masks


def masked_dice_loss(logits: torch.Tensor, targets: torch.Tensor, weights: torch.Tensor,
                     num_masks: float) -> torch.Tensor:
    """`dice_loss` over the points of weight 1 only: (M, P) each."""
    p = logits.sigmoid() * weights
    t = targets * weights
    numerator = 2 * (p * t).sum(-1)
    denominator = p.sum(-1) + t.sum(-1)
    return (1 - (numerator + 1) / (denominator + 1)).sum() / num_masks


def outputs_from_model(out: FCCLIPOutput | Any) -> dict[str, Any]:
    """The criterion's input from a model forward (`fcclip.model.FCCLIPOutput` or a `DecoderOutput`).

    Returns:
        ``{"pred_logits": (B, Q, K + 1), "pred_masks": (B, Q, h, w),
        "aux_outputs": [{"pred_logits", "pred_masks"}, ...]}``, earlier heads first.
    """
    return {
        "pred_logits": out.class_logits,
        "pred_masks": out.mask_logits,
        "aux_outputs": [{"pred_logits": c, "pred_masks": m} for c, m in out.aux],
    }


def average_num_masks(targets: Sequence[Mapping[str, torch.Tensor]], device: torch.device | str = "cpu") -> float:
    """Target segments per process, averaged over all processes when torch.distributed is initialised; >= 1.

    With torch.distributed initialised this is a collective (an all-reduce): every process must call it.
    """
    count = torch.tensor([float(sum(len(t["labels"]) for t in targets))], device=device)
    world_size = 1
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.all_reduce(count)
        world_size = torch.distributed.get_world_size()
    return max(count.item() / world_size, 1.0)


def build_weight_dict(class_weight: float = 2.0, mask_weight: float = 5.0, dice_weight: float = 5.0,
                      dec_layers: int = 10, deep_supervision: bool = True) -> dict[str, float]:
    """Loss weights of the reference: the same three weights for the last head and the ``dec_layers - 1`` earlier.

    `dec_layers` is the reference's ``DEC_LAYERS`` (10: 9 decoder layers plus the prediction from the learnable
    queries), so deep supervision adds keys ``loss_ce_0`` .. ``loss_dice_8``.
    """
    base = {"loss_ce": class_weight, "loss_mask": mask_weight, "loss_dice": dice_weight}
    weights = dict(base)
    if deep_supervision:
        for i in range(dec_layers - 1):
            weights.update({f"{k}_{i}": v for k, v in base.items()})
    return weights


def weighted_total(losses: Mapping[str, torch.Tensor],
                   weight_dict: Mapping[str, float]) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Apply the weights: returns (sum of the weighted losses, the weighted losses by key).

    Losses without a weight are dropped, as in the reference.
    """
    weighted = {k: v * weight_dict[k] for k, v in losses.items() if k in weight_dict}
    if not weighted:
        raise ValueError(f"no loss has a weight: losses {sorted(losses)}, weights {sorted(weight_dict)}")
    total = torch.stack([v.float() for v in weighted.values()]).sum()
    return total, weighted


class SetCriterion(nn.Module):
    """Matching-based loss for mask classification.

    Args:
        num_classes: K, without the no-object class.
        matcher: assigns queries to targets.
        weight_dict: loss name -> weight (see `build_weight_dict`); used by `total`.
        eos_coef: cross-entropy weight of the no-object class (the others weigh 1).
        num_points: points sampled per matched mask for the mask losses.
        oversample_ratio: candidate points per kept point for the importance sampling.
        importance_sample_ratio: share of the points chosen by uncertainty (the rest are uniform).
    """

    empty_weight: torch.Tensor

    def __init__(self, num_classes: int, matcher: HungarianMatcher, weight_dict: Mapping[str, float],
                 eos_coef: float = 0.1, num_points: int = 12544, oversample_ratio: float = 3.0,
                 importance_sample_ratio: float = 0.75):
        super().__init__()
        self.num_classes = num_classes
        self.matcher = matcher
        self.weight_dict = dict(weight_dict)
        self.eos_coef = eos_coef
        self.num_points = num_points
        self.oversample_ratio = oversample_ratio
        self.importance_sample_ratio = importance_sample_ratio
        empty_weight = torch.ones(num_classes + 1)
        empty_weight[-1] = eos_coef
        self.register_buffer("empty_weight", empty_weight)

    def loss_labels(self, outputs: Mapping[str, torch.Tensor], targets: Sequence[Mapping[str, torch.Tensor]],
                    indices: Sequence[tuple[torch.Tensor, torch.Tensor]]) -> dict[str, torch.Tensor]:
        """``loss_ce``: weighted cross-entropy over all B * Q queries (weighted mean, as `F.cross_entropy`)."""
        logits = outputs["pred_logits"].float()  # (B, Q, K + 1)
        if logits.shape[-1] != self.num_classes + 1:
            raise ValueError(f"pred_logits has {logits.shape[-1]} classes, expected K + 1 = {self.num_classes + 1}")
        target_classes = torch.full(logits.shape[:2], self.num_classes, dtype=torch.int64, device=logits.device)
        for b, (src, tgt) in enumerate(indices):
            target_classes[b, src.to(logits.device)] = targets[b]["labels"].to(logits.device)[tgt.to(logits.device)]
        loss = F.cross_entropy(logits.transpose(1, 2), target_classes, self.empty_weight.to(logits.device))
        return {"loss_ce": loss}

    def loss_masks(self, outputs: Mapping[str, torch.Tensor], targets: Sequence[Mapping[str, torch.Tensor]],
                   indices: Sequence[tuple[torch.Tensor, torch.Tensor]], num_masks: float,
                   generator: torch.Generator | None = None) -> dict[str, torch.Tensor]:
        """``loss_mask`` and ``loss_dice`` of the matched pairs on importance-sampled points."""
        pred_masks = outputs["pred_masks"]  # (B, Q, h, w)
        device = pred_masks.device
        src = torch.cat([pred_masks[b, s.to(device)] for b, (s, _) in enumerate(indices)])  # (M, h, w)
        if src.shape[0] == 0:
            # No target anywhere in the batch: zero losses that still depend on the predictions (so that every
            # parameter gets a gradient, as DDP requires).
            zero = pred_masks.float().sum() * 0.0
            return {"loss_mask": zero, "loss_dice": zero.clone()}
        size = _max_size(targets)
        tgt = torch.cat([_padded(targets, b, t, size, device) for b, (_, t) in enumerate(indices)])
        src = src[:, None].float()
        tgt = tgt[:, None]
        with torch.no_grad():
            coords = uncertain_point_coords_with_randomness(
                src, uncertainty, self.num_points, self.oversample_ratio, self.importance_sample_ratio,
                generator=generator,
            )
            labels = point_sample(tgt, coords)[:, 0]
            weights = self.point_weights(targets, indices, coords, size, device)
        logits = point_sample(src, coords)[:, 0]
        if weights is None:
            return {
                "loss_mask": sigmoid_ce_loss(logits, labels, num_masks),
                "loss_dice": dice_loss(logits, labels, num_masks),
            }
        return {
            "loss_mask": masked_sigmoid_ce_loss(logits, labels, weights, num_masks),
            "loss_dice": masked_dice_loss(logits, labels, weights, num_masks),
        }

    def point_weights(self, targets: Sequence[Mapping[str, torch.Tensor]],
                      indices: Sequence[tuple[torch.Tensor, torch.Tensor]], coords: torch.Tensor,
                      size: tuple[int, int], device) -> torch.Tensor | None:
        """(M, P) weights in {0, 1} of the sampled points of the matched masks, or None: every point counts.

        The reference's criterion counts every point; `fcclip.training.ignore.IgnoreRegionCriterion` leaves out
        those in an image's ignore region.
        """
        return None

    def forward(self, outputs: Mapping[str, Any], targets: Sequence[Mapping[str, torch.Tensor]],
                num_masks: float | None = None, generator: torch.Generator | None = None) -> dict[str, torch.Tensor]:
        """Unweighted losses of the last head and (if ``outputs["aux_outputs"]``) of the earlier ones.

        Args:
            outputs: ``{"pred_logits": (B, Q, K + 1), "pred_masks": (B, Q, h, w), "aux_outputs": [...]}``
                (`outputs_from_model` makes it from a model forward).
            targets: B dicts ``{"labels": (T_b,) int64 in [0, K), "masks": (T_b, H, W) bool or float}`` at the
                padded input size (images with different mask sizes are zero-padded bottom/right to the largest).
            num_masks: the mask-loss normaliser; by default `average_num_masks` (an all-reduce under
                torch.distributed, so every process must call the criterion; pass the global mean to avoid it).
            generator: for the point sampling; the global RNG when None.
        Returns:
            ``loss_ce``, ``loss_mask``, ``loss_dice`` and, for aux head i, the same keys with suffix ``_i``.
        """
        if num_masks is None:
            num_masks = average_num_masks(targets, outputs["pred_logits"].device)
        losses = self._head_losses(outputs, targets, num_masks, generator)
        for i, aux in enumerate(outputs.get("aux_outputs") or ()):
            losses.update({f"{k}_{i}": v for k, v in self._head_losses(aux, targets, num_masks, generator).items()})
        return losses

    def total(self, losses: Mapping[str, torch.Tensor]) -> torch.Tensor:
        """Sum of the losses weighted by `weight_dict` (losses without a weight are ignored)."""
        return weighted_total(losses, self.weight_dict)[0]

    def _head_losses(self, outputs, targets, num_masks, generator) -> dict[str, torch.Tensor]:
        indices = _on_device(self.matcher(outputs, targets, generator=generator), outputs["pred_logits"].device)
        losses = self.loss_labels(outputs, targets, indices)
        losses.update(self.loss_masks(outputs, targets, indices, num_masks, generator=generator))
        return losses

    def extra_repr(self) -> str:
        return (f"num_classes={self.num_classes}, eos_coef={self.eos_coef}, num_points={self.num_points}, "
                f"oversample_ratio={self.oversample_ratio}, importance_sample_ratio={self.importance_sample_ratio}")


def build_criterion(num_classes: int, *, class_weight: float = 2.0, mask_weight: float = 5.0,
                    dice_weight: float = 5.0, no_object_weight: float = 0.1, dec_layers: int = 10,
                    deep_supervision: bool = True, num_points: int = 12544, oversample_ratio: float = 3.0,
                    importance_sample_ratio: float = 0.75) -> SetCriterion:
    """The reference's criterion (its `from_config`): matcher costs equal to the loss weights.

    Defaults are FC-CLIP's COCO recipe (``maskformer2_R50_bs16_50ep.yaml``).
    """
    matcher = HungarianMatcher(cost_class=class_weight, cost_mask=mask_weight, cost_dice=dice_weight,
                               num_points=num_points)
    weights = build_weight_dict(class_weight, mask_weight, dice_weight, dec_layers, deep_supervision)
    return SetCriterion(num_classes, matcher, weights, eos_coef=no_object_weight, num_points=num_points,
                        oversample_ratio=oversample_ratio, importance_sample_ratio=importance_sample_ratio)


def _on_device(indices: Sequence[tuple[torch.Tensor, torch.Tensor]], device: torch.device):
    """The matcher's (query, target) index pairs of every image on `device` in one copy (not two per image and
    loss: a GPU step made about 80 blocking copies of them)."""
    if device.type == "cpu" or not indices:
        return indices
    lengths = [len(src) for src, _ in indices]
    flat = torch.cat([torch.stack((src, tgt)) for src, tgt in indices], dim=1)  # (2, M) int64
    flat = flat.pin_memory().to(device, non_blocking=True) if device.type == "cuda" else flat.to(device)
    return [(pair[0], pair[1]) for pair in flat.split(lengths, dim=1)]


def _max_size(targets: Sequence[Mapping[str, torch.Tensor]]) -> tuple[int, int]:
    return (max(t["masks"].shape[-2] for t in targets), max(t["masks"].shape[-1] for t in targets))


def _padded(targets, b: int, index: torch.Tensor, size: tuple[int, int], device) -> torch.Tensor:
    """Float target masks `index` of image b, zero-padded bottom/right to `size`: (len(index), H, W)."""
    masks = targets[b]["masks"]
    masks = masks[index.to(masks.device)].to(device=device, dtype=torch.float32)
    h, w = masks.shape[-2:]
    if (h, w) != size:
        masks = F.pad(masks, (0, size[1] - w, 0, size[0] - h))
    return masks
