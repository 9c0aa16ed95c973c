"""The frozen open_clip CLIP: dense multi-scale features, mask-pooled visual head, and the text tower.

One CLIP serves three purposes in FC-CLIP: its visual trunk gives the multi-scale features of the pixel decoder,
its dense last-stage features mask-pooled per predicted mask and passed through CLIP's own visual head give the
out-of-vocabulary class embeddings, and its text tower embeds the class names. The CLIP is never trained.

The module keeps open_clip's model as ``clip_model`` so that state-dict keys are ``clip_model.<open_clip key>``,
exactly as in the released FC-CLIP checkpoints.
"""
from __future__ import annotations

import copy
import logging
import math

import open_clip
import torch
import torch.nn.functional as F
from torch import nn

from .config import ClipConfig

logger = logging.getLogger(__name__)

FEATURE_NAMES = ("res2", "res3", "res4", "res5")
FEATURE_STRIDES = {"res2": 4, "res3": 8, "res4": 16, "res5": 32}


def build_clip_model(config: ClipConfig, pretrained: bool = False) -> nn.Module:
    """Build the open_clip model, with open_clip's pretrained weights when ``pretrained`` (downloads them)."""
    if pretrained:
        if config.model_cfg is not None or not config.pretrained:
            raise ValueError(f"CLIP {config.model_name!r} has no open_clip pretrained tag to load")
        return open_clip.create_model(config.model_name, pretrained=config.pretrained)
    if config.model_cfg is not None:
        cfg = copy.deepcopy(dict(config.model_cfg))
    else:
        cfg = open_clip.get_model_config(config.model_name)
        if cfg is None:
            raise ValueError(f"unknown open_clip model {config.model_name!r}; see open_clip.list_models()")
        cfg = copy.deepcopy(cfg)
    if "timm_model_name" in cfg.get("vision_cfg", {}):
        cfg["vision_cfg"]["timm_model_pretrained"] = False  # never download a timm trunk
    if cfg.pop("custom_text", False) or "hf_model_name" in cfg.get("text_cfg", {}):
        raise ValueError(f"CLIP {config.model_name!r}: only open_clip's built-in text tower is supported")
    cfg.pop("multimodal_cfg", None)
    return open_clip.CLIP(**cfg)


def clip_embed_dim(config: ClipConfig) -> int:
    """D, the width of the CLIP's joint embedding (768 for ConvNeXt-L), read from its config without building it."""
    cfg = config.model_cfg if config.model_cfg is not None else open_clip.get_model_config(config.model_name)
    if cfg is None:
        raise ValueError(f"unknown open_clip model {config.model_name!r}; see open_clip.list_models()")
    return int(cfg["embed_dim"])


def clip_context_length(config: ClipConfig) -> int:
    """The text encoder's context length (77 for the CLIPs FC-CLIP uses), read from its config without building it."""
    cfg = config.model_cfg if config.model_cfg is not None else open_clip.get_model_config(config.model_name)
    if cfg is None:
        raise ValueError(f"unknown open_clip model {config.model_name!r}; see open_clip.list_models()")
    return int((cfg.get("text_cfg") or {}).get("context_length", 77))


class CLIPBackbone(nn.Module):
    """Frozen CLIP with the FC-CLIP feature interface (ConvNeXt and ResNet CLIPs).

    Args:
        clip_model: an open_clip ``CLIP`` whose visual tower is a timm ConvNeXt (``visual.trunk``) or an OpenAI
            ``ModifiedResNet``.
    """

    def __init__(self, clip_model: nn.Module):
        super().__init__()
        self.clip_model = clip_model
        visual = clip_model.visual
        if hasattr(visual, "trunk") and hasattr(visual.trunk, "stages"):
            self.kind = "convnext"
            channels = [_convnext_stage_channels(stage) for stage in visual.trunk.stages]
        elif hasattr(visual, "layer4") and hasattr(visual, "attnpool"):
            self.kind = "resnet"
            channels = [_resnet_layer_channels(getattr(visual, f"layer{i}")) for i in range(1, 5)]
        else:
            raise ValueError(f"unsupported CLIP visual tower {type(visual).__name__}: ConvNeXt or ModifiedResNet")
        self.channels = dict(zip(FEATURE_NAMES, channels))
        self.embed_dim = int(clip_model.text_projection.shape[-1])
        self.context_length = int(clip_model.positional_embedding.shape[0])
        for p in self.parameters():
            p.requires_grad_(False)
        self.eval()
        self.channels_last = False  # see use_channels_last: no faster on the AVX2 CPU it was measured on

    def use_channels_last(self, enabled: bool = True) -> None:
        """Run the ConvNeXt trunk in channels-last memory layout (NHWC), or not.

        timm's ConvNeXt blocks apply LayerNorm and the MLP with channels last: in NCHW every block permutes and
        copies its activations twice, and oneDNN's depthwise 7x7 convolution reorders them. In NHWC those copies go
        away, but on the 2-core AVX2 CPU this was measured on the backbone took the same CPU time either way (its
        time is in the MLPs' matrix products), so it is off by default; on a GPU, where convolutions prefer NHWC,
        try it (values equal up to float rounding). The features come out channels-last; every consumer reads
        them through layout-agnostic ops.
        """
        if self.kind != "convnext":
            return
        fmt = torch.channels_last if enabled else torch.contiguous_format
        for module in self.clip_model.visual.trunk.modules():
            if isinstance(module, nn.Conv2d):
                module.weight.data = module.weight.data.contiguous(memory_format=fmt)
        self.channels_last = enabled

    def train(self, mode: bool = True):
        # frozen: batch-norm statistics (ResNet CLIPs) and dropout stay in inference mode
        return super().train(False)

    # ------------------------------------------------------------------ visual
    def forward(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        """Multi-scale features.

        Args:
            images: (B, 3, H, W) normalised images, H and W multiples of 32.
        Returns:
            dict with "res2".."res5" (B, C_i, H/4..H/32, W/4..W/32) and "clip_vis_dense" (B, C_5, H/32, W/32),
            the last stage as CLIP's visual head expects it.
        """
        with torch.no_grad():
            if self.kind == "convnext":
                return self._features_convnext(images)
            return self._features_resnet(images)

    def _features_convnext(self, x):
        trunk = self.clip_model.visual.trunk
        out = {}
        if self.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        x = trunk.stem(x)
        for i, stage in enumerate(trunk.stages):
            x = stage(x)
            out[FEATURE_NAMES[i]] = x
        out["clip_vis_dense"] = trunk.norm_pre(x)
        return out

    def _features_resnet(self, x):
        v = self.clip_model.visual
        x = v.act1(v.bn1(v.conv1(x)))
        x = v.act2(v.bn2(v.conv2(x)))
        x = v.act3(v.bn3(v.conv3(x)))
        x = v.avgpool(x)
        out = {}
        for i in range(4):
            x = getattr(v, f"layer{i + 1}")(x)
            out[FEATURE_NAMES[i]] = x
        out["clip_vis_dense"] = x
        return out

    def pooled_embeddings(self, dense: torch.Tensor, mask_logits: torch.Tensor) -> torch.Tensor:
        """CLIP image embeddings of each predicted mask: the out-of-vocabulary branch.

        Args:
            dense: (B, C, h, w) the "clip_vis_dense" features.
            mask_logits: (B, Q, h, w) mask logits already resized to the dense grid; a pixel is in the mask when its
                logit is > 0.
        Returns:
            (B, Q, D) un-normalised CLIP embeddings.
        """
        with torch.no_grad():
            if self.kind == "convnext":
                pooled = mask_pool(dense, mask_logits)  # (B, Q, C)
                b, q, c = pooled.shape
                x = pooled.reshape(b * q, c, 1, 1)
                x = self.clip_model.visual.trunk.head(x)
                x = self.clip_model.visual.head(x)
                return x.reshape(b, q, -1)
            return self._masked_attention_pool(dense, mask_logits)

    def _masked_attention_pool(self, x: torch.Tensor, mask_logits: torch.Tensor) -> torch.Tensor:
        """ResNet CLIP: the attention-pool head with each query's attention restricted to its mask.

        The query token is the image mean plus the class position embedding, as in CLIP's attention pool; keys and
        values are the pixels plus the (resized) spatial position embedding. A mask with no pixel would give an
        all-masked softmax (NaN in the reference, where the ensemble then ignores it); here it attends to every
        pixel instead, which gives a finite embedding that the ensemble ignores the same way.
        """
        pool = self.clip_model.visual.attnpool
        b, c, h, w = x.shape
        q_count = mask_logits.shape[1]
        heads = pool.num_heads
        pos = pool.positional_embedding.to(x.dtype)  # (1 + s*s, C)
        side = int(math.isqrt(pos.shape[0] - 1))
        spatial = pos[1:].T.reshape(1, c, side, side)
        spatial = F.interpolate(spatial, size=(h, w), mode="bilinear", align_corners=False)
        spatial = spatial.reshape(c, h * w).T  # (HW, C)
        tokens = x.flatten(2).transpose(1, 2)  # (B, HW, C)
        key_value = tokens + spatial
        query = tokens.mean(1, keepdim=True) + pos[:1]  # (B, 1, C)

        q = pool.q_proj(query)  # (B, 1, C)
        k = pool.k_proj(key_value)  # (B, HW, C)
        v = pool.v_proj(key_value)
        d = c // heads
        q = q.reshape(b, 1, heads, d).transpose(1, 2)  # (B, heads, 1, d)
        k = k.reshape(b, h * w, heads, d).transpose(1, 2)  # (B, heads, HW, d)
        v = v.reshape(b, h * w, heads, d).transpose(1, 2)
        scores = (q @ k.transpose(-1, -2)) / math.sqrt(d)  # (B, heads, 1, HW)
        blocked = (mask_logits > 0).flatten(2).logical_not()  # (B, Q, HW)
        blocked = blocked & ~blocked.all(-1, keepdim=True)
        scores = scores.expand(b, heads, q_count, h * w).masked_fill(blocked[:, None], float("-inf"))
        attn = scores.softmax(-1)
        out = (attn @ v).transpose(1, 2).reshape(b, q_count, c)  # (B, Q, C)
        return pool.c_proj(out)

    # ------------------------------------------------------------------ text
    def encode_text(self, tokens: torch.Tensor) -> torch.Tensor:
        """Un-normalised CLIP text embeddings.

        Args:
            tokens: (N, L) token ids from open_clip's tokenizer (start token, text, end token, zero padding); the end
                token has the largest id of each row.
        Returns:
            (N, D) embeddings at the end token, after ``ln_final`` and ``text_projection``.

        The text tower is causal: the feature at the end token depends only on the tokens before it. The sequence is
        therefore cut after the longest prompt's end token, which gives the same embeddings as the full 77-token
        context for a fraction of the work.
        """
        m = self.clip_model
        with torch.no_grad():
            eot = tokens.argmax(dim=-1)
            length = int(eot.max()) + 1
            tokens = tokens[:, :length]
            cast_dtype = m.transformer.get_cast_dtype()
            x = m.token_embedding(tokens).to(cast_dtype) + m.positional_embedding[:length].to(cast_dtype)
            attn_mask = m.attn_mask[:length, :length] if m.attn_mask is not None else None
            if getattr(m.transformer, "batch_first", True):
                x = m.transformer(x, attn_mask=attn_mask)
            else:
                x = m.transformer(x.transpose(0, 1), attn_mask=attn_mask).transpose(0, 1)
            x = m.ln_final(x)
            x = x[torch.arange(x.shape[0], device=x.device), eot]
            return x @ m.text_projection

    @property
    def logit_scale(self) -> torch.Tensor:
        return self.clip_model.logit_scale


def mask_pool(features: torch.Tensor, mask_logits: torch.Tensor) -> torch.Tensor:
    """Average of ``features`` over each binarised mask (logit > 0).

    Args:
        features: (B, C, H, W).
        mask_logits: (B, Q, H, W), same spatial size as ``features``.
    Returns:
        (B, Q, C): sum over the mask / (pixel count + 1e-8); zero for an empty mask.
    """
    with torch.no_grad():
        mask = (mask_logits > 0).to(features.dtype)
        denom = mask.sum(dim=(-1, -2), keepdim=True) + 1e-8
    return torch.einsum("bchw,bqhw->bqc", features, mask / denom)


def _convnext_stage_channels(stage: nn.Module) -> int:
    blocks = getattr(stage, "blocks", None)
    if blocks is not None and len(blocks) > 0:
        block = blocks[-1]
        for name in ("conv_dw", "conv_dw_proj"):
            conv = getattr(block, name, None)
            if isinstance(conv, nn.Conv2d):
                return conv.out_channels
    convs = [m for m in stage.modules() if isinstance(m, nn.Conv2d)]
    if not convs:
        raise ValueError("cannot read the channel count of a ConvNeXt stage")
    return convs[-1].out_channels


def _resnet_layer_channels(layer: nn.Module) -> int:
    norms = [m for m in layer.modules() if isinstance(m, nn.BatchNorm2d)]
    return norms[-1].num_features
