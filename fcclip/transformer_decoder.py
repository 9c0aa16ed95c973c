"""Mask2Former's masked-attention transformer decoder with FC-CLIP's class head.

Queries cross-attend to one feature scale per layer (stride 32, 16, 8, repeating), only inside the mask the previous
prediction head produced; then self-attend and pass an FFN. Prediction heads run on the learnable queries before the
first layer and after every layer. FC-CLIP's class head: the mask-pooled pixel features, projected, plus the query,
through an MLP into CLIP's embedding space, classified against the text classifier with the decoder's own logit scale.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from .backbone import mask_pool
from .ensemble import classification_logits
from .layers import MLP, sine_position_embedding


@dataclass
class DecoderOutput:
    class_logits: torch.Tensor  # (B, Q, K + 1) in-vocabulary logits, void last
    mask_logits: torch.Tensor  # (B, Q, H/4, W/4)
    aux: list[tuple[torch.Tensor, torch.Tensor]]  # (class_logits, mask_logits) of the earlier heads, first to last
    # (empty when the decoder ran with aux=False)
    class_embeddings: torch.Tensor | None = None  # (B, Q, D) the last head's class embeddings (not normalised), which
    # class_logits compares with the text classifier


class SelfAttentionLayer(nn.Module):
    def __init__(self, d_model: int, nhead: int, pre_norm: bool = False):
        super().__init__()
        self.self_attn = nn.MultiheadAttention(d_model, nhead)
        self.norm = nn.LayerNorm(d_model)
        self.pre_norm = pre_norm
        _xavier(self)

    def forward(self, tgt, query_pos):
        if self.pre_norm:
            t = self.norm(tgt)
            q = t + query_pos
            return tgt + self.self_attn(q, q, value=t, need_weights=False)[0]
        q = tgt + query_pos
        return self.norm(tgt + self.self_attn(q, q, value=tgt, need_weights=False)[0])


class CrossAttentionLayer(nn.Module):
    def __init__(self, d_model: int, nhead: int, pre_norm: bool = False):
        super().__init__()
        self.multihead_attn = nn.MultiheadAttention(d_model, nhead)
        self.norm = nn.LayerNorm(d_model)
        self.pre_norm = pre_norm
        _xavier(self)

    def forward(self, tgt, memory, attn_mask, pos, query_pos):
        t = self.norm(tgt) if self.pre_norm else tgt
        out = self.multihead_attn(
            query=t + query_pos, key=memory + pos, value=memory, attn_mask=attn_mask, need_weights=False
        )[0]
        return tgt + out if self.pre_norm else self.norm(tgt + out)


class FFNLayer(nn.Module):
    def __init__(self, d_model: int, dim_feedforward: int, pre_norm: bool = False):
        super().__init__()
        self.linear1 = nn.Linear(d_model, dim_feedforward)
        self.linear2 = nn.Linear(dim_feedforward, d_model)
        self.norm = nn.LayerNorm(d_model)
        self.pre_norm = pre_norm
        _xavier(self)

    def forward(self, tgt):
        if self.pre_norm:
            return tgt + self.linear2(F.relu(self.linear1(self.norm(tgt))))
        return self.norm(tgt + self.linear2(F.relu(self.linear1(tgt))))


def _xavier(module: nn.Module) -> None:
    for p in module.parameters():
        if p.dim() > 1:
            nn.init.xavier_uniform_(p)


class MultiScaleMaskedTransformerDecoder(nn.Module):
    """
    Args:
        embed_dim: CLIP embedding width (the class head's output).
        hidden_dim: query and feature channels (the pixel decoder's conv_dim).
        num_queries: object queries.
        nheads: attention heads.
        dim_feedforward: FFN width.
        num_layers: decoder layers (the reference's DEC_LAYERS minus one).
        mask_dim: channels of the mask features.
        pre_norm: pre-LayerNorm layers (False in FC-CLIP).
    """

    num_feature_levels = 3

    def __init__(
        self,
        *,
        embed_dim: int,
        hidden_dim: int = 256,
        num_queries: int = 250,
        nheads: int = 8,
        dim_feedforward: int = 2048,
        num_layers: int = 9,
        mask_dim: int = 256,
        pre_norm: bool = False,
    ):
        super().__init__()
        self.num_heads = nheads
        self.num_layers = num_layers
        self.hidden_dim = hidden_dim
        self.transformer_self_attention_layers = nn.ModuleList(
            SelfAttentionLayer(hidden_dim, nheads, pre_norm) for _ in range(num_layers)
        )
        self.transformer_cross_attention_layers = nn.ModuleList(
            CrossAttentionLayer(hidden_dim, nheads, pre_norm) for _ in range(num_layers)
        )
        self.transformer_ffn_layers = nn.ModuleList(
            FFNLayer(hidden_dim, dim_feedforward, pre_norm) for _ in range(num_layers)
        )
        self.decoder_norm = nn.LayerNorm(hidden_dim)
        self.num_queries = num_queries
        self.query_feat = nn.Embedding(num_queries, hidden_dim)
        self.query_embed = nn.Embedding(num_queries, hidden_dim)
        self.level_embed = nn.Embedding(self.num_feature_levels, hidden_dim)
        self.mask_embed = MLP(hidden_dim, hidden_dim, mask_dim, 3)
        self._mask_pooling_proj = nn.Sequential(nn.LayerNorm(hidden_dim), nn.Linear(hidden_dim, hidden_dim))
        self.class_embed = MLP(hidden_dim, hidden_dim, embed_dim, 3)
        self.logit_scale = nn.Parameter(torch.ones([]) * np.log(1 / 0.07))

    def forward(
        self,
        multi_scale: list[torch.Tensor],
        mask_features: torch.Tensor,
        text_classifier: torch.Tensor,
        synonym_class: torch.Tensor,
        num_classes: int,
        aux: bool = True,
    ) -> DecoderOutput:
        """
        Args:
            multi_scale: 3 x (B, C, h_l, w_l) from the pixel decoder, strides 32, 16, 8.
            mask_features: (B, mask_dim, H/4, W/4).
            text_classifier: (S + 1, D) L2-normalised rows, one per synonym, void last.
            synonym_class: (S,) the class index of each synonym row.
            num_classes: K.
            aux: compute the earlier heads' class and mask logits (deep supervision). Without them (inference),
                an earlier head only computes the next layer's attention mask, at that layer's resolution: the
                mask features are resized to it first, which equals resizing the mask logits (bilinear resizing
                is linear and acts per channel) up to float rounding, and skips the stride-4 mask logits and the
                class head of 9 of the 10 heads.
        """
        srcs, pos, sizes = [], [], []
        for i, x in enumerate(multi_scale):
            b, _, h, w = x.shape
            sizes.append((h, w))
            pos.append(sine_position_embedding(b, h, w, self.hidden_dim // 2, device=x.device).to(x.dtype).flatten(2).permute(2, 0, 1))
            srcs.append((x.flatten(2) + self.level_embed.weight[i][None, :, None]).permute(2, 0, 1))  # (hw, B, C)
        bs = srcs[0].shape[1]
        query_embed = self.query_embed.weight.unsqueeze(1).repeat(1, bs, 1)  # (Q, B, C)
        output = self.query_feat.weight.unsqueeze(1).repeat(1, bs, 1)

        heads = lambda out, size: self._prediction_heads(  # noqa: E731
            out, mask_features, size, text_classifier, synonym_class, num_classes
        )
        small_features: dict[tuple[int, int], torch.Tensor] = {}

        def attention_mask_only(out, size):
            if size not in small_features:
                small_features[size] = F.interpolate(mask_features, size=size, mode="bilinear", align_corners=False)
            return self._attention_mask(out, small_features[size])

        predictions = []
        class_embed = None
        if aux:
            class_logits, mask_logits, attn_mask, class_embed = heads(output, sizes[0])
            predictions.append((class_logits, mask_logits))
        else:
            attn_mask = attention_mask_only(output, sizes[0])
        for i in range(self.num_layers):
            level = i % self.num_feature_levels
            # a query whose mask covers nothing attends everywhere
            attn_mask = attn_mask & ~attn_mask.all(-1, keepdim=True)
            attn_mask = attn_mask.repeat_interleave(self.num_heads, dim=0)  # (B*heads, Q, hw)
            output = self.transformer_cross_attention_layers[i](output, srcs[level], attn_mask, pos[level], query_embed)
            output = self.transformer_self_attention_layers[i](output, query_embed)
            output = self.transformer_ffn_layers[i](output)
            next_size = sizes[(i + 1) % self.num_feature_levels]
            if aux or i == self.num_layers - 1:
                class_logits, mask_logits, attn_mask, class_embed = heads(output, next_size)
                predictions.append((class_logits, mask_logits))
            else:
                attn_mask = attention_mask_only(output, next_size)
        return DecoderOutput(
            class_logits=predictions[-1][0], mask_logits=predictions[-1][1], aux=predictions[:-1],
            class_embeddings=class_embed,
        )

    def _attention_mask(self, output, small_mask_features):
        """(B, Q, h*w) True = blocked: the head's mask at the attention resolution, from resized mask features."""
        mask_embed = self.mask_embed(self.decoder_norm(output).transpose(0, 1))
        attn = torch.einsum("bqc,bchw->bqhw", mask_embed, small_mask_features)
        return (attn.sigmoid().flatten(2) < 0.5).detach()

    def _prediction_heads(self, output, mask_features, attn_size, text_classifier, synonym_class, num_classes):
        decoder_output = self.decoder_norm(output).transpose(0, 1)  # (B, Q, C)
        mask_embed = self.mask_embed(decoder_output)
        mask_logits = torch.einsum("bqc,bchw->bqhw", mask_embed, mask_features)
        pooled = self._mask_pooling_proj(mask_pool(mask_features, mask_logits.detach()))
        class_embed = self.class_embed(pooled + decoder_output)
        class_logits = classification_logits(class_embed, text_classifier, self.logit_scale, synonym_class, num_classes)
        attn = F.interpolate(mask_logits, size=attn_size, mode="bilinear", align_corners=False)
        # True = blocked: outside the predicted mask (sigmoid < 0.5)
        attn_mask = (attn.sigmoid().flatten(2) < 0.5).detach()  # (B, Q, hw)
        return class_logits, mask_logits, attn_mask, class_embed
