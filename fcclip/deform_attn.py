"""Multi-scale deformable attention (Deformable DETR) in pure PyTorch.

Each query attends to ``n_points`` locations per head and feature level, placed around its reference point by
learned offsets; values are read with bilinear interpolation (zero outside the map) and combined with learned,
softmax-normalised weights. No compiled extension is needed; the same code runs on CPU and GPU: the bilinear
weights and the attention weights are folded into one weighted gather of value rows over all levels
(``embedding_bag``), several times faster on a CPU than ``grid_sample`` per level.

Everything here computes in float32 with autocast off, also inside ``torch.autocast`` (as the reference's CUDA
kernel does): a sampling position in bf16 has 8 bits of mantissa, so beyond 128 px it is a whole pixel and the
bilinear sample loses its fraction. No tensor is written in place through a strided view, so ``torch.compile``
traces it in one graph.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from .precision import float32_region


def multi_scale_deformable_attention(
    value: torch.Tensor,
    spatial_shapes: list[tuple[int, int]],
    sampling_locations: torch.Tensor,
    attention_weights: torch.Tensor,
) -> torch.Tensor:
    """The core sampling-and-weighting step, as one weighted gather over all levels.

    Bilinear sampling with zero padding outside the map (``grid_sample``'s ``align_corners=False`` convention) is a
    weighted sum of the four neighbouring pixels; with the attention weights folded in, every output is a weighted
    sum of ``L * P * 4`` value rows, which ``embedding_bag(mode="sum", per_sample_weights=...)`` computes in one
    call over all levels, reading each value row (D contiguous channels) once per use. Equal to
    :func:`multi_scale_deformable_attention_grid_sample` up to float rounding.

    Args:
        value: (B, S, M, D) values of all levels flattened, S = sum of H_l * W_l, M heads of D channels.
        spatial_shapes: [(H_l, W_l)] for each level l, in the order of ``value``.
        sampling_locations: (B, Lq, M, L, P, 2) normalised (x, y) in [0, 1] (0 and 1 are the outer pixel edges).
        attention_weights: (B, Lq, M, L, P), summing to 1 over (L, P).
    Returns:
        (B, Lq, M * D), float32.
    """
    with float32_region(value.device.type):
        return _gather_attention(value.float(), spatial_shapes, sampling_locations.float(), attention_weights.float())


def _gather_attention(value, spatial_shapes, sampling_locations, attention_weights):
    b, s, m, d = value.shape
    _, lq, _, n_levels, n_points, _ = sampling_locations.shape
    if b * m * s >= 2**31:
        raise ValueError(f"too many value rows ({b} x {m} x {s}) for int32 indices")
    device = value.device
    # per (batch, query, head): L levels x 4 neighbours x P points, each a value row and its weight; L * 4 of
    # (B, Lq, M, P) each, stacked at the end (the weights are differentiable: training learns the offsets)
    index, weight = [], []
    # the value row of (batch, head, position) in a (B * M * S, D) table
    base = (torch.arange(b, device=device, dtype=torch.int32).view(b, 1, 1, 1) * m
            + torch.arange(m, device=device, dtype=torch.int32).view(1, 1, m, 1)) * s
    start = 0
    for level, (h, w) in enumerate(spatial_shapes):
        loc = sampling_locations[:, :, :, level]  # (B, Lq, M, P, 2)
        attn = attention_weights[:, :, :, level]  # (B, Lq, M, P)
        # pixel coordinates: grid_sample's unnormalisation with align_corners=False
        x = loc[..., 0] * w - 0.5
        y = loc[..., 1] * h - 0.5
        x0, y0 = x.floor(), y.floor()
        fx, fy = x - x0, y - y0
        # a neighbour outside the map reads zero: weight 0 (its index is clamped to stay in the table)
        wx = ((1 - fx) * ((x0 >= 0) & (x0 <= w - 1)), fx * ((x0 >= -1) & (x0 <= w - 2)))
        wy = ((1 - fy) * ((y0 >= 0) & (y0 <= h - 1)) * attn, fy * ((y0 >= -1) & (y0 <= h - 2)) * attn)
        xs = (x0.clamp(0, w - 1).int(), (x0 + 1).clamp(0, w - 1).int())
        ys = (y0.clamp(0, h - 1).int() * w, (y0 + 1).clamp(0, h - 1).int() * w)
        row0 = base + start
        for dx, dy in ((0, 0), (1, 0), (0, 1), (1, 1)):
            index.append(row0 + ys[dy] + xs[dx])
            weight.append(wy[dy] * wx[dx])
        start += h * w
    table = value.permute(0, 2, 1, 3).reshape(b * m * s, d)
    index = torch.stack(index, dim=3)  # (B, Lq, M, L * 4, P)
    weight = torch.stack(weight, dim=3)  # (B, Lq, M, L * 4, P), the order of `index`
    out = F.embedding_bag(
        index.view(b * lq * m, -1), table, per_sample_weights=weight.reshape(b * lq * m, -1), mode="sum"
    )  # (B * Lq * M, D)
    return out.view(b, lq, m * d)


def multi_scale_deformable_attention_grid_sample(
    value: torch.Tensor,
    spatial_shapes: list[tuple[int, int]],
    sampling_locations: torch.Tensor,
    attention_weights: torch.Tensor,
) -> torch.Tensor:
    """The same step written with ``grid_sample`` per level, as the reference's pure-PyTorch fallback does.

    Kept as the specification :func:`multi_scale_deformable_attention` is tested against. Same arguments.
    """
    b, _, m, d = value.shape
    _, lq, _, n_levels, n_points, _ = sampling_locations.shape
    values = value.split([h * w for h, w in spatial_shapes], dim=1)
    grids = 2 * sampling_locations - 1
    sampled = []
    for level, (h, w) in enumerate(spatial_shapes):
        # (B, HW, M, D) -> (B*M, D, H, W)
        v = values[level].flatten(2).transpose(1, 2).reshape(b * m, d, h, w)
        # (B, Lq, M, P, 2) -> (B*M, Lq, P, 2)
        g = grids[:, :, :, level].transpose(1, 2).flatten(0, 1)
        sampled.append(F.grid_sample(v, g, mode="bilinear", padding_mode="zeros", align_corners=False))
    # (B*M, D, Lq, L*P)
    stacked = torch.stack(sampled, dim=-2).flatten(-2)
    weights = attention_weights.transpose(1, 2).reshape(b * m, 1, lq, n_levels * n_points)
    out = (stacked * weights).sum(-1).view(b, m * d, lq)
    return out.transpose(1, 2).contiguous()


class MSDeformAttn(nn.Module):
    """Multi-scale deformable attention with Deformable DETR's parameterisation and parameter names.

    Args:
        d_model: channels of queries and values.
        n_levels: feature levels.
        n_heads: attention heads.
        n_points: sampling points per head and level.
    """

    def __init__(self, d_model: int = 256, n_levels: int = 4, n_heads: int = 8, n_points: int = 4):
        super().__init__()
        if d_model % n_heads != 0:
            raise ValueError(f"d_model ({d_model}) must be divisible by n_heads ({n_heads})")
        self.d_model = d_model
        self.n_levels = n_levels
        self.n_heads = n_heads
        self.n_points = n_points
        self.sampling_offsets = nn.Linear(d_model, n_heads * n_levels * n_points * 2)
        self.attention_weights = nn.Linear(d_model, n_heads * n_levels * n_points)
        self.value_proj = nn.Linear(d_model, d_model)
        self.output_proj = nn.Linear(d_model, d_model)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Deformable DETR's initialisation: offsets start on rings around the reference point, one direction per head."""
        nn.init.zeros_(self.sampling_offsets.weight)
        thetas = torch.arange(self.n_heads, dtype=torch.float32) * (2.0 * math.pi / self.n_heads)
        grid = torch.stack([thetas.cos(), thetas.sin()], -1)
        grid = grid / grid.abs().max(-1, keepdim=True)[0]
        grid = grid.view(self.n_heads, 1, 1, 2).repeat(1, self.n_levels, self.n_points, 1)
        grid = grid * torch.arange(1, self.n_points + 1, dtype=torch.float32).view(1, 1, -1, 1)
        with torch.no_grad():
            self.sampling_offsets.bias.copy_(grid.view(-1))
        nn.init.zeros_(self.attention_weights.weight)
        nn.init.zeros_(self.attention_weights.bias)
        nn.init.xavier_uniform_(self.value_proj.weight)
        nn.init.zeros_(self.value_proj.bias)
        nn.init.xavier_uniform_(self.output_proj.weight)
        nn.init.zeros_(self.output_proj.bias)

    def forward(
        self,
        query: torch.Tensor,
        reference_points: torch.Tensor,
        value_input: torch.Tensor,
        spatial_shapes: list[tuple[int, int]],
    ) -> torch.Tensor:
        """
        Args:
            query: (B, Lq, C) queries (with position embedding).
            reference_points: (B, Lq, L, 2) normalised (x, y) reference point of each query on each level.
            value_input: (B, S, C) flattened features of all levels.
            spatial_shapes: [(H_l, W_l)] of the levels.
        Returns:
            (B, Lq, C) float32, computed in float32 with autocast off (see the module's docstring).
        """
        with float32_region(query.device.type):
            return self._forward(query.float(), reference_points.float(), value_input.float(), spatial_shapes)

    def _forward(self, query, reference_points, value_input, spatial_shapes):
        b, lq, _ = query.shape
        s = value_input.shape[1]
        value = self.value_proj(value_input).view(b, s, self.n_heads, self.d_model // self.n_heads)
        offsets = self.sampling_offsets(query).view(b, lq, self.n_heads, self.n_levels, self.n_points, 2)
        weights = self.attention_weights(query).view(b, lq, self.n_heads, self.n_levels * self.n_points)
        weights = weights.softmax(-1).view(b, lq, self.n_heads, self.n_levels, self.n_points)
        # offsets are in pixels of each level: normalise by (W_l, H_l)
        normalizer = torch.tensor([[w, h] for h, w in spatial_shapes], dtype=query.dtype, device=query.device)
        locations = reference_points[:, :, None, :, None, :] + offsets / normalizer[None, None, None, :, None, :]
        out = multi_scale_deformable_attention(value, spatial_shapes, locations, weights)
        return self.output_proj(out)
