"""Re-classification: stored per-query embeddings under any vocabulary, with the text tower only.

FC-CLIP decides a query's class from two vectors that do not depend on the vocabulary (``InferenceOutput``'s
``in_vocab_embeddings``, the decoder's class embedding, and ``out_vocab_embeddings``, the mask-pooled frozen-CLIP
embedding, plus the ``valid`` flag) compared with the text embeddings of the class names. :class:`EmbeddingSpace`
holds what that comparison needs beyond the text (the void embedding, both logit scales, alpha/beta, the rule that
makes a class "seen", the text tower's digest); :func:`reclassify` is the comparison, through
:func:`fcclip.ensemble.classify_embeddings`, the function ``FCCLIP.inference`` itself calls. With the embeddings a
labeling run stored (``fcclip label --embeddings``), a new vocabulary is a matrix product away (``fcclip relabel``).

A segment's class and score are then those post-processing gives its query (:func:`fcclip.postprocess.
select_panoptic_queries`): the top of the softmax over the ensembled log-probabilities, void included. Which queries
become segments, and their masks, stay as labeled: see ``fcclip relabel`` for how this differs from labeling again.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from .ensemble import Classification, classify_embeddings
from .text import TextClassifier, text_tower_digest
from .vocabulary import Vocabulary, load_vocabulary

__all__ = ["EmbeddingSpace", "Reclassified", "reclassify"]


@dataclass(frozen=True)
class EmbeddingSpace:
    """What re-classifying a model's stored embeddings needs beyond the new vocabulary's text embeddings.

    model: the model's id (``preset@weights``). dim: D. void_embedding: (D,) the normalised void row.
    in_vocab_logit_scale, out_vocab_logit_scale: the decoder's and CLIP's log temperatures (as stored in the
    weights; exp'd and clamped at 100 when used). alpha, beta: the ensemble weights of seen / unseen classes.
    ensemble_on_valid_mask: whether ``valid`` gates the CLIP branch (ResNet CLIPs). train_vocabulary: its name;
    seen_names: its class names: a class is seen when one of its names is among them (exact string).
    text_tower: sha256 of the text tower's weights (a text tower with other weights gives other text embeddings).
    object_mask_threshold: post-processing drops queries scoring at most this.
    """

    model: str
    dim: int
    void_embedding: tuple[float, ...]
    in_vocab_logit_scale: float
    out_vocab_logit_scale: float
    alpha: float
    beta: float
    ensemble_on_valid_mask: bool
    train_vocabulary: str
    seen_names: tuple[str, ...]
    text_tower: str
    object_mask_threshold: float

    @classmethod
    def from_model(cls, model) -> "EmbeddingSpace":
        """The space of a built :class:`fcclip.model.FCCLIP`."""
        inf = model.config.inference
        void = F.normalize(model.void_embedding.weight.detach().float().cpu(), dim=-1)[0]
        train = load_vocabulary(inf.train_vocabulary)
        return cls(
            model=f"{model.config.name}@{getattr(model, 'weights_id', 'unknown')}",
            dim=int(void.numel()),
            void_embedding=tuple(float(v) for v in void.tolist()),
            in_vocab_logit_scale=float(model.sem_seg_head.predictor.logit_scale.detach().float().cpu()),
            out_vocab_logit_scale=float(model.backbone.logit_scale.detach().float().cpu()),
            alpha=float(inf.alpha),
            beta=float(inf.beta),
            ensemble_on_valid_mask=bool(inf.ensemble_on_valid_mask),
            train_vocabulary=str(inf.train_vocabulary),
            seen_names=tuple(sorted({n for c in train.categories for n in c.names})),
            text_tower=text_tower_digest(model.backbone),
            object_mask_threshold=float(inf.object_mask_threshold),
        )

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready (floats written exactly: float32 values round-trip through JSON's doubles)."""
        d = asdict(self)
        d["void_embedding"] = list(self.void_embedding)
        d["seen_names"] = list(self.seen_names)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "EmbeddingSpace":
        known = {f for f in cls.__dataclass_fields__}
        unknown = set(d) - known
        if unknown:
            raise ValueError(f"unknown embedding-space keys {sorted(unknown)}")
        d = dict(d)
        d["void_embedding"] = tuple(float(v) for v in d["void_embedding"])
        d["seen_names"] = tuple(d["seen_names"])
        return cls(**d)

    def seen(self, vocabulary: Vocabulary) -> torch.Tensor:
        """(K,) bool: the classes of ``vocabulary`` seen in training (:func:`fcclip.vocabulary.seen_mask`'s rule)."""
        names = set(self.seen_names)
        return torch.tensor([any(n in names for n in c.names) for c in vocabulary.categories], dtype=torch.bool)

    def classifier_with_void(self, text: TextClassifier) -> torch.Tensor:
        """(S + 1, D) float32: the text rows and the void row, as ``FCCLIP.classifier_with_void`` builds them."""
        void = torch.tensor(self.void_embedding, dtype=torch.float32).unsqueeze(0)
        return torch.cat([text.embeddings.float().cpu(), void], dim=0)


@dataclass
class Reclassified:
    """N queries under one vocabulary (K classes).

    classes: (N,) int64 top class index, K where it is void. scores: (N,) float32 its probability (the score
    post-processing gives the query). kept: (N,) bool, the query can form a segment (top class not void, score
    above the object-mask threshold). classification: the logits and ensemble of :func:`classify_embeddings`.
    """

    classes: np.ndarray
    scores: np.ndarray
    kept: np.ndarray
    classification: Classification


def reclassify(
    in_vocab_embeddings: np.ndarray | torch.Tensor,
    out_vocab_embeddings: np.ndarray | torch.Tensor,
    valid: np.ndarray | torch.Tensor | None,
    text: TextClassifier,
    space: EmbeddingSpace,
) -> Reclassified:
    """The class and score of each stored query under ``text``'s vocabulary, as the model's ensemble gives them.

    Args:
        in_vocab_embeddings, out_vocab_embeddings: (N, D), any float dtype (float16 as stored is fine).
        valid: (N,) bool, or None (all valid).
        text: the vocabulary's text classifier, from the same text tower (``space.text_tower``); its ``seen`` is
            replaced by the space's rule.
        space: the model's :class:`EmbeddingSpace`.
    """
    in_emb = _float32(in_vocab_embeddings)
    out_emb = _float32(out_vocab_embeddings)
    if in_emb.shape != out_emb.shape or in_emb.dim() != 2 or in_emb.shape[1] != space.dim:
        raise ValueError(
            f"embeddings must both be (N, {space.dim}), got {tuple(in_emb.shape)} and {tuple(out_emb.shape)}"
        )
    gate = None
    if space.ensemble_on_valid_mask and valid is not None:
        gate = torch.from_numpy(np.array(valid, dtype=bool))
    cls = classify_embeddings(
        in_emb, out_emb, space.classifier_with_void(text), text.synonym_class.cpu(), text.num_classes,
        space.seen(text.vocabulary),
        in_vocab_logit_scale=torch.tensor(space.in_vocab_logit_scale, dtype=torch.float32),
        out_vocab_logit_scale=torch.tensor(space.out_vocab_logit_scale, dtype=torch.float32),
        alpha=space.alpha, beta=space.beta, valid=gate,
    )
    # as post-processing scores a query (fcclip.postprocess.select_panoptic_queries)
    scores, classes = F.softmax(cls.ensemble.log_probs.float(), dim=-1).max(-1)
    kept = classes.ne(text.num_classes) & (scores > space.object_mask_threshold)
    return Reclassified(classes.numpy(), scores.numpy().astype(np.float32), kept.numpy(), cls)



def _float32(x: np.ndarray | torch.Tensor) -> torch.Tensor:
    if isinstance(x, torch.Tensor):
        return x.detach().float().cpu()
    return torch.from_numpy(np.array(x, dtype=np.float32))
