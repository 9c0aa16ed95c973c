"""Classification against the text classifier, and FC-CLIP's in/out-of-vocabulary geometric ensemble.

Pure functions on tensors, shared by the transformer decoder (in-vocabulary logits), the out-of-vocabulary branch
and training. They compute in float32 with autocast off, whatever the inputs' dtype: logits of 16-64 (a logit
scale up to 100 times a cosine) would round by 0.06-0.12 in bf16 before the softmax and the ensemble.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .precision import float32_region


def classification_logits(
    embeddings: torch.Tensor,
    text_classifier: torch.Tensor,
    logit_scale: torch.Tensor,
    synonym_class: torch.Tensor,
    num_classes: int,
) -> torch.Tensor:
    """Cosine-similarity logits, one per class: the max over the class's synonyms; void appended last.

    Args:
        embeddings: (B, Q, D) query or mask embeddings (normalised here).
        text_classifier: (S + 1, D) L2-normalised synonym embeddings, the void embedding last.
        logit_scale: scalar log temperature; exp'd and clamped at 100 as in CLIP.
        synonym_class: (S,) int64 class index of each synonym row.
        num_classes: K.
    Returns:
        (B, Q, K + 1) float32.
    """
    with float32_region(embeddings.device.type):
        return _classification_logits(
            embeddings.float(), text_classifier.float(), logit_scale.float(), synonym_class, num_classes
        )


def _classification_logits(embeddings, text_classifier, logit_scale, synonym_class, num_classes):
    x = F.normalize(embeddings, dim=-1)
    scale = torch.clamp(logit_scale.exp(), max=100)
    logits = scale * x @ text_classifier.T  # (B, Q, S + 1)
    synonyms = logits[..., :-1]
    index = synonym_class.to(logits.device).expand(*synonyms.shape[:-1], -1)
    per_class = torch.full(
        (*synonyms.shape[:-1], num_classes), float("-inf"), dtype=logits.dtype, device=logits.device
    ).scatter_reduce(-1, index, synonyms, reduce="amax", include_self=True)
    return torch.cat([per_class, logits[..., -1:]], dim=-1)


@dataclass
class EnsembleOutput:
    in_vocab_probs: torch.Tensor  # (B, Q, K) softmax of the decoder logits without void
    out_vocab_probs: torch.Tensor  # (B, Q, K) softmax of the CLIP logits without void
    void_probs: torch.Tensor  # (B, Q, 1) void probability from the decoder logits (with void)
    probs: torch.Tensor  # (B, Q, K + 1) final class probabilities, void last
    log_probs: torch.Tensor  # (B, Q, K + 1) log(probs + 1e-8): the mask classification for post-processing


def geometric_ensemble(
    in_vocab_logits: torch.Tensor,
    out_vocab_logits: torch.Tensor,
    seen: torch.Tensor,
    alpha: float,
    beta: float,
    valid: torch.Tensor | None = None,
) -> EnsembleOutput:
    """FC-CLIP's ensemble of the in-vocabulary (decoder) and out-of-vocabulary (frozen CLIP) classifiers.

    For class c: log(p_in^(1 - w) * p_out^w), w = alpha if c was seen in training else beta; softmaxed over the K
    classes, scaled by (1 - p_void), with p_void appended.

    Args:
        in_vocab_logits: (B, Q, K + 1) decoder logits, void last.
        out_vocab_logits: (B, Q, K + 1) CLIP logits, void last (its void column is not used).
        seen: (K,) bool, True where the class overlaps the training vocabulary.
        alpha, beta: ensemble weights of the CLIP classifier for seen and unseen classes.
        valid: optional (B, Q) bool; where False the CLIP classifier is ignored (weights 0). The reference uses
            this for ResNet CLIPs, with valid = the mask has at least one pixel on the CLIP feature grid.
    Returns float32 probabilities, computed in float32 with autocast off.
    """
    with float32_region(in_vocab_logits.device.type):
        return _geometric_ensemble(in_vocab_logits.float(), out_vocab_logits.float(), seen, alpha, beta, valid)


def _geometric_ensemble(in_vocab_logits, out_vocab_logits, seen, alpha, beta, valid) -> EnsembleOutput:
    p_in = in_vocab_logits[..., :-1].softmax(-1)
    p_out = out_vocab_logits[..., :-1].softmax(-1)
    seen = seen.to(device=p_in.device, dtype=p_in.dtype)
    weight = seen * alpha + (1 - seen) * beta  # (K,)
    if valid is not None:
        weight = weight * valid.to(p_in.dtype).unsqueeze(-1)  # (B, Q, K)
    # the reference's formula, as written: log(p_in^(1-w) * p_out^w) (not (1-w) log p_in + w log p_out, which differs
    # where a probability underflows to 0)
    logits = (p_in ** (1 - weight) * p_out**weight).log()
    p_void = in_vocab_logits.softmax(-1)[..., -1:]
    probs = torch.cat([logits.softmax(-1) * (1.0 - p_void), p_void], dim=-1)
    return EnsembleOutput(
        in_vocab_probs=p_in,
        out_vocab_probs=p_out,
        void_probs=p_void,
        probs=probs,
        log_probs=torch.log(probs + 1e-8),
    )


@dataclass
class Classification:
    """One vocabulary's classification of per-query embeddings (see :func:`classify_embeddings`)."""

    in_vocab_logits: torch.Tensor  # (B, Q, K + 1) decoder-branch logits, void last
    out_vocab_logits: torch.Tensor  # (B, Q, K + 1) CLIP-branch logits, void last (its void column is not used)
    ensemble: EnsembleOutput


def classify_embeddings(
    in_vocab_embeddings: torch.Tensor,
    out_vocab_embeddings: torch.Tensor,
    text_classifier: torch.Tensor,
    synonym_class: torch.Tensor,
    num_classes: int,
    seen: torch.Tensor,
    *,
    in_vocab_logit_scale: torch.Tensor,
    out_vocab_logit_scale: torch.Tensor,
    alpha: float,
    beta: float,
    valid: torch.Tensor | None = None,
) -> Classification:
    """Everything FC-CLIP decides about a query's class, from its two vocabulary-free embeddings and the text.

    The in-vocabulary branch compares the decoder's class embedding with the text classifier (void row included) at
    the decoder's logit scale; the out-of-vocabulary branch compares the mask-pooled CLIP embedding at CLIP's logit
    scale; both take the max over a class's synonyms; :func:`geometric_ensemble` combines them. ``FCCLIP.inference``
    calls this on the model's own tensors, and ``fcclip.reclassify`` on stored embeddings under a new vocabulary:
    one code path for both.

    Args:
        in_vocab_embeddings, out_vocab_embeddings: (..., Q, D) (normalised here, so stored unit vectors work).
        text_classifier: (S + 1, D) normalised synonym rows, the void embedding last.
        synonym_class, num_classes, seen: as in :class:`fcclip.text.TextClassifier`.
        in_vocab_logit_scale, out_vocab_logit_scale: scalar log temperatures (the decoder's and CLIP's parameters).
        alpha, beta, valid: as in :func:`geometric_ensemble`.
    """
    in_vocab_logits = classification_logits(
        in_vocab_embeddings, text_classifier, in_vocab_logit_scale, synonym_class, num_classes
    )
    out_vocab_logits = classification_logits(
        out_vocab_embeddings, text_classifier, out_vocab_logit_scale, synonym_class, num_classes,
    )
    ens = geometric_ensemble(in_vocab_logits, out_vocab_logits, seen, alpha, beta, valid=valid)
    return Classification(in_vocab_logits, out_vocab_logits, ens)
