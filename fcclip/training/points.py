"""Point sampling for the mask losses (PointRend's, as Mask2Former uses it), on `F.grid_sample`.

Masks are compared on a few thousand points instead of every pixel: the matcher samples the same uniform points
for predictions and targets, and the criterion samples mostly where the prediction is uncertain (logit near 0).
Coordinates are normalised to [0, 1] x [0, 1] in (x, y) order over the whole mask, so a stride-4 prediction and a
full-size target are sampled at the same places without resizing either.
"""
from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F

__all__ = ["point_sample", "uncertain_point_coords_with_randomness", "uncertainty"]


def point_sample(input: torch.Tensor, coords: torch.Tensor, align_corners: bool = False) -> torch.Tensor:
    """Bilinear samples of `input` at normalised points (zero outside), as detectron2's `point_sample`.

    Args:
        input: (N, C, H, W).
        coords: (N, P, 2) in [0, 1], (x, y) order: (0, 0) is the top-left corner of the top-left pixel and (1, 1)
            the bottom-right corner of the bottom-right pixel (with ``align_corners=False``), so pixel (i, j) has
            its centre at ((j + 0.5) / W, (i + 0.5) / H).
        align_corners: passed to `F.grid_sample`.
    Returns:
        (N, C, P).
    """
    grid = 2.0 * coords.unsqueeze(2) - 1.0  # (N, P, 1, 2) in [-1, 1]
    return F.grid_sample(input, grid.to(input.dtype), mode="bilinear", align_corners=align_corners).squeeze(3)


def uncertainty(logits: torch.Tensor) -> torch.Tensor:
    """-|logit|: highest where a mask logit is closest to 0 (the reference's `calculate_uncertainty`), same shape."""
    return -logits.abs()


def uncertain_point_coords_with_randomness(
    logits: torch.Tensor,
    uncertainty_fn: Callable[[torch.Tensor], torch.Tensor] = uncertainty,
    num_points: int = 12544,
    oversample_ratio: float = 3.0,
    importance_sample_ratio: float = 0.75,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Points biased towards uncertain regions, with some uniform ones (PointRend's training-time sampling).

    Draws ``int(num_points * oversample_ratio)`` uniform points per mask, keeps the
    ``int(importance_sample_ratio * num_points)`` most uncertain of them (by `uncertainty_fn` of the bilinearly
    sampled logits), and fills the rest with fresh uniform points.

    Args:
        logits: (N, 1, H, W) mask logits.
        uncertainty_fn: (N, 1, P) logits -> (N, 1, P) scores, higher = more uncertain.
        num_points: P, points per mask.
        oversample_ratio: >= 1.
        importance_sample_ratio: in [0, 1].
        generator: for the uniform draws (on `logits`' device); the global RNG when None.
    Returns:
        (N, P, 2) coordinates in [0, 1], (x, y) order.
    """
    if oversample_ratio < 1:
        raise ValueError(f"oversample_ratio must be >= 1, got {oversample_ratio}")
    if not 0 <= importance_sample_ratio <= 1:
        raise ValueError(f"importance_sample_ratio must be in [0, 1], got {importance_sample_ratio}")
    n = logits.shape[0]
    device = logits.device
    num_sampled = int(num_points * oversample_ratio)
    coords = torch.rand(n, num_sampled, 2, device=device, generator=generator)
    scores = uncertainty_fn(point_sample(logits, coords))  # (N, 1, num_sampled)
    num_uncertain = int(importance_sample_ratio * num_points)
    index = torch.topk(scores[:, 0, :], k=num_uncertain, dim=1).indices  # (N, num_uncertain)
    coords = torch.gather(coords, 1, index.unsqueeze(-1).expand(-1, -1, 2))
    num_random = num_points - num_uncertain
    if num_random > 0:
        extra = torch.rand(n, num_random, 2, device=device, generator=generator)
        coords = torch.cat([coords, extra], dim=1)
    return coords
