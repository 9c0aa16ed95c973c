"""Deterministic "random" weights that depend only on each parameter's name and shape (``weights="random"``).

This is the project's weight rule of the parity fixture (tests/fixtures/deterministic_fill.py, rule version 2): a
random model built with it gives non-degenerate masks and segments, so smoke runs show something to look at.


Two implementations whose state-dict keys agree get identical weights from `fill_(model)`, without a stored
checkpoint. Only parameters are filled; buffers keep the values their modules compute.

Every value comes from `torch.randn(shape, generator=torch.Generator().manual_seed(zlib.crc32(key.encode())))`
(called once per key), transformed by the first rule that applies:
  1. one element:            4.6052 (= ln 100) if the key ends in "logit_scale", else 0.5
  2. 2-D embedding tables:   N(0, 1) as drawn. A table is a 2-D parameter whose key, without a trailing ".weight",
                             ends in "embedding", "embed" or "query_feat" (token/positional/void embeddings,
                             query_feat, query_embed, level_embed)
  3. biases (key ends in ".bias" or "_bias"): 0.02 * N, except the last layer of the mask-embedding MLP
                             ("mask_embed.layers.2.bias"): 5.0 * N
  4. other 1-D: layer scales (key ends in "gamma") 0.1 + 0.02 * N; everything else (norm weights) 1 + 0.1 * N
  5. everything else:        gain * N / sqrt(fan_in), fan_in = numel // shape[0], with gain from GAINS (first match,
                             by substring and suffix of the key; 1.0 if none matches)
Version 2. The gains keep per-query identity through the decoder's residual layers (small residual branches), make
the random CLIP text tower give distinguishable class embeddings (embedding tables at unit scale, sharper
attention), and the large mask-embedding bias makes per-query masks small and distinct, so that random weights
give non-degenerate masks, classes and panoptic segments.
"""
import math
import zlib

import torch

RESIDUAL_OUT = ("out_proj.weight", "c_proj.weight", "linear2.weight", "output_proj.weight")
GAINS = (  # (substring of the key, key suffixes, gain)
    ("clip_model.transformer.", ("in_proj_weight",), 3.0),  # CLIP text tower attention: sharper
    ("predictor.", RESIDUAL_OUT, 0.1),  # transformer decoder residual branches
    ("", RESIDUAL_OUT, 0.3),  # all other residual output projections (text tower, pixel decoder)
)
TABLE_SUFFIXES = ("embedding", "embed", "query_feat")


def value_for(key: str, shape: torch.Size) -> torch.Tensor:
    g = torch.Generator().manual_seed(zlib.crc32(key.encode()))
    numel = math.prod(shape) if len(shape) else 1
    if numel == 1:
        return torch.full(shape, 4.6052 if key.endswith("logit_scale") else 0.5)
    name = key[: -len(".weight")] if key.endswith(".weight") else key
    if len(shape) == 2 and name.endswith(TABLE_SUFFIXES):
        return torch.randn(shape, generator=g)
    if key.endswith(".bias") or key.endswith("_bias"):
        scale = 5.0 if key.endswith("mask_embed.layers.2.bias") else 0.02
        return scale * torch.randn(shape, generator=g)
    if len(shape) == 1:
        # norm weights centred at 1; layer scales (gamma) small
        if key.endswith("gamma"):
            return 0.1 + 0.02 * torch.randn(shape, generator=g)
        return 1.0 + 0.1 * torch.randn(shape, generator=g)
    fan_in = numel // shape[0]
    gain = next((gn for sub, suffixes, gn in GAINS if sub in key and key.endswith(suffixes)), 1.0)
    return gain * torch.randn(shape, generator=g) / math.sqrt(fan_in)


@torch.no_grad()
def fill_(model: torch.nn.Module) -> torch.nn.Module:
    for key, p in model.named_parameters():
        p.copy_(value_for(key, p.shape).to(p.dtype))
    return model
