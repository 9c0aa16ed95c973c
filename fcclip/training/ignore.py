"""Ignore regions in the mask losses: pixels of a training image that supervise no mask.

Pseudo-labels come with a confidence. A segment the teacher scored below ``--min-score`` is neither a target nor
background: if it were left out of the targets, every matched query would still be trained towards 0 on its pixels
(they lie outside its target mask), teaching the student that the uncertain region belongs to no segment it knows.
`IgnoreRegionCriterion` is the reference's `SetCriterion` with one change: the points sampled for ``loss_mask`` and
``loss_dice`` that fall in a target's image's ignore region (``target["ignore"]``, (H, W) bool, from
`fcclip.training.data.collate`) count for nothing. Without ignore regions it computes exactly `SetCriterion`'s
losses. Matching and ``loss_ce`` are unchanged.
"""
from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
import torch.nn.functional as F

from .criterion import SetCriterion, _max_size, _padded, build_criterion
from .points import point_sample, uncertain_point_coords_with_randomness, uncertainty

__all__ = ["IgnoreRegionCriterion", "build_ignore_criterion", "masked_dice_loss", "masked_sigmoid_ce_loss"]


def masked_sigmoid_ce_loss(logits: torch.Tensor, targets: torch.Tensor, weights: torch.Tensor,
                           num_masks: float) -> torch.Tensor:
    """Sum over masks of the mean binary cross-entropy over the points of weight 1, divided by `num_masks`.

    logits, targets, weights: (M, P); weights in {0, 1} (a mask whose points all have weight 0 contributes 0).
    """
    loss = F.binary_cross_entropy_with_logits(logits, targets, reduction="none") * weights
    return (loss.sum(1) / weights.sum(1).clamp(min=1)).sum() / num_masks


def masked_dice_loss(logits: torch.Tensor, targets: torch.Tensor, weights: torch.Tensor,
                     num_masks: float) -> torch.Tensor:
    """`fcclip.training.criterion.dice_loss` over the points of weight 1 only: (M, P) each."""
    p = logits.sigmoid() * weights
    t = targets * weights
    numerator = 2 * (p * t).sum(-1)
    denominator = p.sum(-1) + t.sum(-1)
    return (1 - (numerator + 1) / (denominator + 1)).sum() / num_masks


class IgnoreRegionCriterion(SetCriterion):
    """`SetCriterion` whose mask losses skip the points in each image's ignore region (module docstring)."""

    def loss_masks(self, outputs: Mapping[str, torch.Tensor], targets: Sequence[Mapping[str, torch.Tensor]],
                   indices: Sequence[tuple[torch.Tensor, torch.Tensor]], num_masks: float,
                   generator: torch.Generator | None = None) -> dict[str, torch.Tensor]:
        if not any(t.get("ignore") is not None and bool(t["ignore"].any()) for t in targets):
            return super().loss_masks(outputs, targets, indices, num_masks, generator=generator)
        pred_masks = outputs["pred_masks"]  # (B, Q, h, w)
        device = pred_masks.device
        src = torch.cat([pred_masks[b, s.to(device)] for b, (s, _) in enumerate(indices)])  # (M, h, w)
        if src.shape[0] == 0:
            zero = pred_masks.float().sum() * 0.0
            return {"loss_mask": zero, "loss_dice": zero.clone()}
        size = _max_size(targets)
        tgt = torch.cat([_padded(targets, b, t, size, device) for b, (_, t) in enumerate(indices)])
        ignore = torch.cat([self._ignore(targets[b], len(t), size, device) for b, (_, t) in enumerate(indices)])
        src = src[:, None].float()
        with torch.no_grad():
            coords = uncertain_point_coords_with_randomness(
                src, uncertainty, self.num_points, self.oversample_ratio, self.importance_sample_ratio,
                generator=generator,
            )
            labels = point_sample(tgt[:, None], coords)[:, 0]
            # a point is in the region or not (a fractional weight would half-count its border)
            weights = (point_sample(ignore[:, None], coords)[:, 0] < 0.5).float()
        logits = point_sample(src, coords)[:, 0]
        return {
            "loss_mask": masked_sigmoid_ce_loss(logits, labels, weights, num_masks),
            "loss_dice": masked_dice_loss(logits, labels, weights, num_masks),
        }

    @staticmethod
    def _ignore(target: Mapping[str, torch.Tensor], count: int, size: tuple[int, int], device) -> torch.Tensor:
        """The image's ignore region, once per matched mask: (count, H, W) float, zero-padded to `size`."""
        region = target.get("ignore")
        if region is None:
            return torch.zeros((count, *size), device=device)
        region = region.to(device=device, dtype=torch.float32)
        h, w = region.shape[-2:]
        if (h, w) != size:
            region = F.pad(region, (0, size[1] - w, 0, size[0] - h))
        return region[None].expand(count, -1, -1)


def build_ignore_criterion(num_classes: int, **kwargs) -> IgnoreRegionCriterion:
    """`build_criterion`'s criterion (same arguments and defaults), as an `IgnoreRegionCriterion`."""
    base = build_criterion(num_classes, **kwargs)
    return IgnoreRegionCriterion(num_classes, base.matcher, base.weight_dict, eos_coef=base.eos_coef,
                                 num_points=base.num_points, oversample_ratio=base.oversample_ratio,
                                 importance_sample_ratio=base.importance_sample_ratio)
