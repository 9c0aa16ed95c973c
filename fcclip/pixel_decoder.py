"""Mask2Former's pixel decoder: a deformable-attention encoder over res3..res5 and an FPN level at stride 4.

It computes in float32, also under ``torch.autocast``, as the reference does (its ``forward_features`` runs with
autocast off): its inputs are cast to float32 and autocast is off inside (:func:`fcclip.precision.float32_region`).
In bf16 the deformable attention's sampling positions keep 8 bits of mantissa: at the stride-8 level of a
1024x1365 input, a position beyond 128 px is stored in whole pixels and its bilinear sample loses its fraction.

Parameter names follow the reference (``input_proj``, ``transformer.encoder.layers``, ``adapter_1``, ``layer_1``,
``mask_features``) so that released checkpoints load unchanged.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from .deform_attn import MSDeformAttn
from .layers import ConvNorm, c2_xavier_fill, sine_position_embedding
from .precision import float32_region


@dataclass
class PixelDecoderOutput:
    mask_features: torch.Tensor  # (B, mask_dim, H/4, W/4)
    multi_scale: list[torch.Tensor]  # 3 x (B, conv_dim, h, w): strides 32, 16, 8 (low to high resolution)


class DeformableEncoderLayer(nn.Module):
    """Deformable self-attention + FFN, post-norm."""

    def __init__(self, d_model: int, d_ffn: int, n_levels: int, n_heads: int, n_points: int):
        super().__init__()
        self.self_attn = MSDeformAttn(d_model, n_levels, n_heads, n_points)
        self.norm1 = nn.LayerNorm(d_model)
        self.linear1 = nn.Linear(d_model, d_ffn)
        self.linear2 = nn.Linear(d_ffn, d_model)
        self.norm2 = nn.LayerNorm(d_model)

    def forward(self, src, pos, reference_points, spatial_shapes):
        src = self.norm1(src + self.self_attn(src + pos, reference_points, src, spatial_shapes))
        return self.norm2(src + self.linear2(F.relu(self.linear1(src))))


class DeformableEncoder(nn.Module):
    def __init__(self, num_layers: int, **layer_kwargs):
        super().__init__()
        self.layers = nn.ModuleList(DeformableEncoderLayer(**layer_kwargs) for _ in range(num_layers))

    def forward(self, src, pos, spatial_shapes):
        reference_points = _reference_points(spatial_shapes, src.shape[0], src.device, src.dtype)
        for layer in self.layers:
            src = layer(src, pos, reference_points, spatial_shapes)
        return src


class DeformableTransformer(nn.Module):
    """Holds the encoder and the per-level embeddings (keys ``level_embed``, ``encoder.layers``)."""

    def __init__(self, d_model, n_heads, num_layers, d_ffn, n_levels, n_points):
        super().__init__()
        self.encoder = DeformableEncoder(
            num_layers, d_model=d_model, d_ffn=d_ffn, n_levels=n_levels, n_heads=n_heads, n_points=n_points
        )
        self.level_embed = nn.Parameter(torch.empty(n_levels, d_model))
        for p in self.encoder.parameters():
            if p.dim() > 1:
                nn.init.xavier_uniform_(p)
        for m in self.encoder.modules():
            if isinstance(m, MSDeformAttn):
                m.reset_parameters()
        nn.init.normal_(self.level_embed)


def _reference_points(spatial_shapes, batch, device, dtype):
    """(B, S, L, 2): every pixel centre of every level, normalised to [0, 1], repeated for each level."""
    points = []
    for h, w in spatial_shapes:
        # 0.5, 1.5, ..., h - 0.5 (exact in float32, as linspace gives them; arange keeps h symbolic under
        # torch.compile(dynamic=True), where linspace's step count would fix it)
        ref_y, ref_x = torch.meshgrid(
            torch.arange(h, dtype=torch.float32, device=device) + 0.5,
            torch.arange(w, dtype=torch.float32, device=device) + 0.5,
            indexing="ij",
        )
        points.append(torch.stack((ref_x.reshape(-1) / w, ref_y.reshape(-1) / h), -1))
    ref = torch.cat(points, 0).to(dtype)
    return ref[None, :, None, :].expand(batch, -1, len(spatial_shapes), -1)


class MSDeformAttnPixelDecoder(nn.Module):
    """
    Args:
        in_channels: channels of res2, res3, res4, res5 (read from the backbone).
        conv_dim: channels of the encoder and FPN.
        mask_dim: channels of the mask features.
        norm_groups: GroupNorm groups of the projections and FPN convs.
        encoder_layers, encoder_heads, encoder_ffn_dim, encoder_points: the deformable encoder.
    """

    def __init__(
        self,
        in_channels: dict[str, int],
        *,
        conv_dim: int = 256,
        mask_dim: int = 256,
        norm_groups: int = 32,
        encoder_layers: int = 6,
        encoder_heads: int = 8,
        encoder_ffn_dim: int = 1024,
        encoder_points: int = 4,
    ):
        super().__init__()
        self.encoder_features = ("res5", "res4", "res3")  # low to high resolution
        self.input_proj = nn.ModuleList()
        for name in self.encoder_features:
            proj = nn.Sequential(nn.Conv2d(in_channels[name], conv_dim, kernel_size=1), nn.GroupNorm(norm_groups, conv_dim))
            nn.init.xavier_uniform_(proj[0].weight, gain=1)
            nn.init.zeros_(proj[0].bias)
            self.input_proj.append(proj)
        self.transformer = DeformableTransformer(
            d_model=conv_dim,
            n_heads=encoder_heads,
            num_layers=encoder_layers,
            d_ffn=encoder_ffn_dim,
            n_levels=len(self.encoder_features),
            n_points=encoder_points,
        )
        self.mask_features = nn.Conv2d(conv_dim, mask_dim, kernel_size=1)
        c2_xavier_fill(self.mask_features)
        # one FPN level: res2 (stride 4) on top of the stride-8 encoder output
        self.adapter_1 = ConvNorm(in_channels["res2"], conv_dim, kernel_size=1, bias=False, norm=nn.GroupNorm(norm_groups, conv_dim))
        self.layer_1 = ConvNorm(
            conv_dim, conv_dim, kernel_size=3, padding=1, bias=False,
            norm=nn.GroupNorm(norm_groups, conv_dim), activation=F.relu,
        )
        c2_xavier_fill(self.adapter_1)
        c2_xavier_fill(self.layer_1)
        self.conv_dim = conv_dim

    def forward(self, features: dict[str, torch.Tensor]) -> PixelDecoderOutput:
        """
        Args:
            features: "res2".."res5" from the backbone, (B, C_i, H/4..H/32, W/4..W/32), any float dtype.
        Returns:
            float32 outputs, computed in float32 with autocast off (see the module's docstring).
        """
        with float32_region(features["res2"].device.type):
            return self._forward(features)

    def _forward(self, features: dict[str, torch.Tensor]) -> PixelDecoderOutput:
        srcs, pos, shapes = [], [], []
        for proj, name in zip(self.input_proj, self.encoder_features):
            x = features[name].float()
            b, _, h, w = x.shape
            srcs.append(proj(x).flatten(2).transpose(1, 2))  # (B, hw, C)
            pos.append(sine_position_embedding(b, h, w, self.conv_dim // 2, device=x.device).flatten(2).transpose(1, 2))
            shapes.append((h, w))
        level_embed = self.transformer.level_embed
        pos = torch.cat([p + level_embed[i].view(1, 1, -1) for i, p in enumerate(pos)], 1)
        memory = self.transformer.encoder(torch.cat(srcs, 1), pos, shapes)
        outs = []
        for level, chunk in enumerate(memory.split([h * w for h, w in shapes], dim=1)):
            h, w = shapes[level]
            outs.append(chunk.transpose(1, 2).reshape(memory.shape[0], -1, h, w))
        res2 = features["res2"].float()
        lateral = self.adapter_1(res2)
        y = lateral + F.interpolate(outs[-1], size=lateral.shape[-2:], mode="bilinear", align_corners=False)
        y = self.layer_1(y)
        return PixelDecoderOutput(mask_features=self.mask_features(y), multi_scale=outs[:3])
