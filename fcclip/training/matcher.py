"""Hungarian matching of predicted masks to ground-truth segments (Mask2Former's matcher, as FC-CLIP trains it).

For each image the cost of giving target j to query i is

    cost_class * -p_i(label_j) + cost_mask * BCE(mask_i, target_j) + cost_dice * dice(mask_i, target_j)

where p_i is the softmax over the K + 1 logits (void included), and both mask costs are computed on the same
`num_points` uniform random points for every prediction and target. The assignment minimising the total cost is
found with scipy's `linear_sum_assignment` on CPU. Unmatched queries are trained towards "no object" by the
criterion.
"""
from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from scipy.optimize import linear_sum_assignment
from torch import nn

from .points import point_sample

__all__ = ["HungarianMatcher", "batch_dice_cost", "batch_sigmoid_ce_cost"]


def batch_dice_cost(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Dice cost of every prediction against every target: (Q, P) logits, (T, P) {0, 1} -> (Q, T).

    1 - (2 |p * t| + 1) / (|p| + |t| + 1), with p the sigmoid of the logits (the +1 smoothing of the reference).
    """
    p = logits.sigmoid()
    numerator = 2 * p @ targets.T
    denominator = p.sum(-1)[:, None] + targets.sum(-1)[None, :]
    return 1 - (numerator + 1) / (denominator + 1)


def batch_sigmoid_ce_cost(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Mean binary cross-entropy of every prediction against every target: (Q, P), (T, P) -> (Q, T)."""
    num_points = logits.shape[1]
    pos = F.binary_cross_entropy_with_logits(logits, torch.ones_like(logits), reduction="none")
    neg = F.binary_cross_entropy_with_logits(logits, torch.zeros_like(logits), reduction="none")
    return (pos @ targets.T + neg @ (1 - targets).T) / num_points


class HungarianMatcher(nn.Module):
    """One-to-one assignment of queries to targets, per image.

    Args:
        cost_class: weight of the classification cost (-probability of the target class).
        cost_mask: weight of the mask binary cross-entropy cost.
        cost_dice: weight of the mask dice cost.
        num_points: points sampled per image (shared by all its predictions and targets); 112 * 112 in the
            reference.
    """

    def __init__(self, cost_class: float = 2.0, cost_mask: float = 5.0, cost_dice: float = 5.0,
                 num_points: int = 12544):
        super().__init__()
        if cost_class == 0 and cost_mask == 0 and cost_dice == 0:
            raise ValueError("at least one matching cost must be non-zero")
        if num_points <= 0:
            raise ValueError(f"num_points must be positive, got {num_points}")
        self.cost_class = cost_class
        self.cost_mask = cost_mask
        self.cost_dice = cost_dice
        self.num_points = num_points

    @torch.no_grad()
    def cost_matrix(self, class_logits: torch.Tensor, mask_logits: torch.Tensor, labels: torch.Tensor,
                    masks: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        """Matching cost of one image, float32, on the inputs' device.

        Args:
            class_logits: (Q, K + 1).
            mask_logits: (Q, h, w).
            labels: (T,) int64 in [0, K).
            masks: (T, H, W) bool or float, any size (the points are normalised coordinates).
            generator: for the random points; the global RNG when None.
        Returns:
            (Q, T).
        """
        device = mask_logits.device
        with torch.autocast(device_type=device.type, enabled=False):
            prob = class_logits.float().softmax(-1)
            cost_class = -prob[:, labels]
            coords = torch.rand(1, self.num_points, 2, device=device, generator=generator)
            pred = point_sample(mask_logits[:, None].float(), coords.expand(mask_logits.shape[0], -1, -1))[:, 0]
            tgt = point_sample(masks[:, None].float(), coords.expand(masks.shape[0], -1, -1))[:, 0]
            cost_mask = batch_sigmoid_ce_cost(pred, tgt)
            cost_dice = batch_dice_cost(pred, tgt)
        return self.cost_class * cost_class + self.cost_mask * cost_mask + self.cost_dice * cost_dice

    @torch.no_grad()
    def forward(self, outputs: dict, targets: Sequence[dict],
                generator: torch.Generator | None = None) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Match each image's queries to its targets.

        Args:
            outputs: ``{"pred_logits": (B, Q, K + 1), "pred_masks": (B, Q, h, w)}``.
            targets: B dicts ``{"labels": (T_b,) int64, "masks": (T_b, H, W)}``.
            generator: for the random points; the global RNG when None.
        Returns:
            B pairs ``(pred_index, target_index)``, int64 CPU tensors of length min(Q, T_b): query
            ``pred_index[k]`` is matched to target ``target_index[k]``; `pred_index` is sorted.
        """
        class_logits, mask_logits = outputs["pred_logits"], outputs["pred_masks"]
        if len(targets) != class_logits.shape[0]:
            raise ValueError(f"{class_logits.shape[0]} images in the outputs but {len(targets)} targets")
        indices = []
        for b, target in enumerate(targets):
            labels = target["labels"].to(class_logits.device)
            if labels.numel() == 0:
                empty = torch.empty(0, dtype=torch.int64)
                indices.append((empty, empty.clone()))
                continue
            cost = self.cost_matrix(class_logits[b], mask_logits[b], labels,
                                    target["masks"].to(mask_logits.device), generator=generator)
            rows, cols = linear_sum_assignment(cost.cpu().numpy())
            indices.append((torch.as_tensor(rows, dtype=torch.int64), torch.as_tensor(cols, dtype=torch.int64)))
        return indices

    def extra_repr(self) -> str:
        return (f"cost_class={self.cost_class}, cost_mask={self.cost_mask}, cost_dice={self.cost_dice}, "
                f"num_points={self.num_points}")
