"""FCCLIP: frozen CLIP backbone + pixel decoder + masked-attention decoder, and the open-vocabulary ensemble.

State-dict keys are those of the released checkpoints: ``backbone.clip_model.*``, ``sem_seg_head.pixel_decoder.*``,
``sem_seg_head.predictor.*`` and ``void_embedding.weight``.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import nn

from .backbone import CLIPBackbone, build_clip_model
from .config import ModelConfig
from .ensemble import EnsembleOutput, classify_embeddings
from .pixel_decoder import MSDeformAttnPixelDecoder
from .transformer_decoder import DecoderOutput, MultiScaleMaskedTransformerDecoder

if TYPE_CHECKING:
    from .text import TextClassifier


class SemSegHead(nn.Module):
    """Container that gives the pixel decoder and the transformer decoder their reference key prefixes."""

    def __init__(self, pixel_decoder: nn.Module, predictor: nn.Module):
        super().__init__()
        self.pixel_decoder = pixel_decoder
        self.predictor = predictor


@dataclass
class FCCLIPOutput:
    """Raw outputs of one forward pass (B images, Q queries, K classes).

    class_logits: (B, Q, K + 1) in-vocabulary logits from the decoder, void last.
    mask_logits: (B, Q, H/4, W/4) mask logits on the padded input's stride-4 grid.
    aux: earlier decoder heads' (class_logits, mask_logits), for deep supervision (empty with ``aux=False``).
    features: the backbone features ("res2".."res5", "clip_vis_dense").
    class_embeddings: (B, Q, D) the decoder's class embeddings (not normalised), from which ``class_logits`` come.
    """

    class_logits: torch.Tensor
    mask_logits: torch.Tensor
    aux: list[tuple[torch.Tensor, torch.Tensor]]
    features: dict[str, torch.Tensor]
    class_embeddings: torch.Tensor | None = None


@dataclass
class InferenceOutput:
    """Open-vocabulary predictions before post-processing.

    class_logits: (B, Q, K + 1) the ensembled class logits, void last: log-probabilities, ``log(p + 1e-8)`` (the
        reference's ``mask_cls``); post-processing takes these.
    mask_logits: (B, Q, H/4, W/4).
    out_vocab_logits: (B, Q, K + 1) CLIP's logits of the mask-pooled embeddings.
    ensemble: the ensemble's intermediate probabilities.
    raw: the forward outputs (``raw.class_logits`` are the decoder's in-vocabulary logits, before the ensemble).
    in_vocab_embeddings: (B, Q, D) float32, L2-normalised: each query's class embedding from the decoder (the
        in-vocabulary branch compares it with the text classifier).
    out_vocab_embeddings: (B, Q, D) float32, L2-normalised: each query's mask-pooled frozen-CLIP embedding (the
        out-of-vocabulary branch).
    valid: (B, Q) bool, where the ensemble uses the out-of-vocabulary branch (all True unless the config's
        ``ensemble_on_valid_mask``, set for ResNet CLIPs: then the mask has a pixel on the CLIP feature grid).
    These three do not depend on the vocabulary: with the text classifier of any vocabulary,
    :func:`fcclip.ensemble.classify_embeddings` gives that vocabulary's ``class_logits`` (``fcclip.reclassify``).
    """

    class_logits: torch.Tensor
    mask_logits: torch.Tensor
    out_vocab_logits: torch.Tensor
    ensemble: EnsembleOutput
    raw: FCCLIPOutput
    in_vocab_embeddings: torch.Tensor | None = None
    out_vocab_embeddings: torch.Tensor | None = None
    valid: torch.Tensor | None = None


class FCCLIP(nn.Module):
    """The FC-CLIP model.

    Args:
        backbone: the frozen CLIP.
        sem_seg_head: pixel decoder + transformer decoder.
        config: the model config (inference settings are read from it).
    """

    def __init__(self, backbone: CLIPBackbone, sem_seg_head: SemSegHead, config: ModelConfig):
        super().__init__()
        self.backbone = backbone
        self.sem_seg_head = sem_seg_head
        self.void_embedding = nn.Embedding(1, backbone.embed_dim)
        self.config = config
        inf = config.inference
        self.register_buffer("pixel_mean", torch.tensor(inf.pixel_mean, dtype=torch.float32).view(-1, 1, 1), False)
        self.register_buffer("pixel_std", torch.tensor(inf.pixel_std, dtype=torch.float32).view(-1, 1, 1), False)

    @property
    def device(self) -> torch.device:
        return self.pixel_mean.device

    def classifier_with_void(self, text: TextClassifier) -> torch.Tensor:
        """(S + 1, D): the synonym rows and the normalised void embedding."""
        void = F.normalize(self.void_embedding.weight, dim=-1)
        return torch.cat([text.embeddings.to(void.dtype), void], dim=0)

    def normalize(self, images: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) RGB in 0..255 -> normalised with CLIP's mean and std."""
        return (images - self.pixel_mean) / self.pixel_std

    def forward(self, images: torch.Tensor, text: TextClassifier, aux: bool = True) -> FCCLIPOutput:
        """
        Args:
            images: (B, 3, H, W) normalised images, H and W multiples of 32 (pad with zeros after normalising).
            text: the vocabulary's text classifier.
            aux: also return the earlier decoder heads' outputs (training needs them; inference does not, and
                skips their stride-4 masks and class heads).
        """
        features = self.backbone(images)
        classifier = self.classifier_with_void(text)
        pd = self.sem_seg_head.pixel_decoder(features)
        out: DecoderOutput = self.sem_seg_head.predictor(
            pd.multi_scale, pd.mask_features, classifier, text.synonym_class, text.num_classes, aux=aux
        )
        return FCCLIPOutput(out.class_logits, out.mask_logits, out.aux, features, out.class_embeddings)

    def compile_parts(self, **options) -> FCCLIP:
        """Compile the backbone, the pixel decoder and the transformer decoder with ``torch.compile`` (in place).

        Each part is compiled with ``nn.Module.compile(**options)`` (e.g. ``mode="max-autotune"``, ``dynamic=True``),
        so state-dict keys do not change. The first call at each new input size compiles (tens of seconds to
        minutes); results equal the eager model's up to float rounding. Returns the model.
        """
        self.backbone.compile(**options)
        self.sem_seg_head.pixel_decoder.compile(**options)
        self.sem_seg_head.predictor.compile(**options)
        return self

    @torch.no_grad()
    def inference(self, images: torch.Tensor, text: TextClassifier) -> InferenceOutput:
        """Forward pass plus the out-of-vocabulary branch and the geometric ensemble (eval mode).

        The earlier decoder heads are not computed (``raw.aux`` is empty): call :meth:`forward` for them.
        """
        raw = self.forward(images, text, aux=False)
        inf = self.config.inference
        dense = raw.features["clip_vis_dense"]
        masks_small = F.interpolate(raw.mask_logits, size=dense.shape[-2:], mode="bilinear", align_corners=False)
        pooled = self.backbone.pooled_embeddings(dense, masks_small.to(dense.dtype))
        classifier = self.classifier_with_void(text)
        valid = (masks_small > 0).flatten(2).any(-1) if inf.ensemble_on_valid_mask else None
        cls = classify_embeddings(
            raw.class_embeddings, pooled, classifier, text.synonym_class, text.num_classes, text.seen,
            in_vocab_logit_scale=self.sem_seg_head.predictor.logit_scale,
            out_vocab_logit_scale=self.backbone.logit_scale, alpha=inf.alpha, beta=inf.beta, valid=valid,
        )
        ens = cls.ensemble
        if valid is None:
            valid = torch.ones(pooled.shape[:-1], dtype=torch.bool, device=pooled.device)
        return InferenceOutput(
            ens.log_probs, raw.mask_logits, cls.out_vocab_logits, ens, raw,
            in_vocab_embeddings=F.normalize(raw.class_embeddings.float(), dim=-1),
            out_vocab_embeddings=F.normalize(pooled.float(), dim=-1),
            valid=valid,
        )


def build_fcclip(config: ModelConfig, clip_pretrained: bool = False) -> FCCLIP:
    """Construct the model from its config (weights: CLIP's from open_clip when ``clip_pretrained``, else random)."""
    backbone = CLIPBackbone(build_clip_model(config.clip, pretrained=clip_pretrained))
    h = config.head
    pixel_decoder = MSDeformAttnPixelDecoder(
        backbone.channels,
        conv_dim=h.conv_dim,
        mask_dim=h.mask_dim,
        norm_groups=h.norm_groups,
        encoder_layers=h.encoder_layers,
        encoder_heads=h.encoder_heads,
        encoder_ffn_dim=h.encoder_ffn_dim,
        encoder_points=h.encoder_points,
    )
    predictor = MultiScaleMaskedTransformerDecoder(
        embed_dim=backbone.embed_dim,
        hidden_dim=h.hidden_dim,
        num_queries=h.num_queries,
        nheads=h.decoder_heads,
        dim_feedforward=h.decoder_ffn_dim,
        num_layers=h.decoder_layers,
        mask_dim=h.mask_dim,
        pre_norm=h.pre_norm,
    )
    return FCCLIP(backbone, SemSegHead(pixel_decoder, predictor), config)
