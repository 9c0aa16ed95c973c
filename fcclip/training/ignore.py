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

from .criterion import SetCriterion, build_criterion, masked_dice_loss, masked_sigmoid_ce_loss
from .points import point_sample

__all__ = ["IgnoreRegionCriterion", "build_ignore_criterion", "masked_dice_loss", "masked_sigmoid_ce_loss"]


class IgnoreRegionCriterion(SetCriterion):
    """`SetCriterion` whose mask losses skip the points in each image's ignore region (module docstring)."""

    def point_weights(self, targets: Sequence[Mapping[str, torch.Tensor]],
                      indices: Sequence[tuple[torch.Tensor, torch.Tensor]], coords: torch.Tensor,
                      size: tuple[int, int], device) -> torch.Tensor | None:
        """0 for the sampled points in the image's ignore region, 1 elsewhere; None where no image has one."""
        if not any(t.get("ignore") is not None and bool(t["ignore"].any()) for t in targets):
            return None
        ignore = torch.cat([self._ignore(targets[b], len(t), size, device) for b, (_, t) in enumerate(indices)])
        # a point is in the region or not (a fractional weight would half-count its border)
        return (point_sample(ignore[:, None], coords)[:, 0] < 0.5).float()

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
