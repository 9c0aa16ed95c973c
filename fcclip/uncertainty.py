"""Signals that predict a wrong label, from what the model already computed (pure functions).

Per segment (from the query it came from, ``PanopticOutput.query_index``):

- ``margin``: the ensembled probability of the segment's class minus that of the next best class (void excluded),
  in [0, 1]. A small margin means another class of the vocabulary was almost as likely.
- ``branches_agree``: whether the in-vocabulary (decoder) and out-of-vocabulary (frozen CLIP) classifiers put the
  same class on top. FC-CLIP's geometric ensemble hides their disagreement; a disagreement is a coin toss the
  ensemble settled.
- ``mask_score``: the mean mask probability over the query's own mask (where it is above 0.5), at the decoder's
  stride-4 resolution: Mask2Former's mask quality. A soft, hesitant mask is often a wrong one.
- ``kept_share``: the share of the query's own mask (probability above 0.5) that the segment kept after the
  panoptic fusion gave each pixel to one query; a segment that lost much of its mask to others is suspect.

Per image:

- ``unlabeled_share``: the share of the image's pixels that no segment covers, in [0, 1].
- ``uncertainty``: one number to rank images by (:func:`image_uncertainty`), in [0, 1].

All of them are computed once per image at labeling time from tensors the model has anyway (no extra forward
pass) and stored as columns of the labeling output; ``fcclip relabel`` recomputes the class signals under a new
vocabulary from the stored embeddings (the masks, and so ``mask_score`` and ``kept_share``, do not change).
`benchmarks/review_pick.py` measures how well ``uncertainty`` finds wrong labels.
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Sequence

import numpy as np

if TYPE_CHECKING:  # torch is imported where a function needs it: the labeling's CPU stages use the numpy part only
    import torch

__all__ = ["query_signals", "mask_signals", "segment_doubt", "image_uncertainty", "unlabeled_share"]


def query_signals(
    probs: torch.Tensor, in_vocab_probs: torch.Tensor, out_vocab_probs: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per query: the margin between the best and second-best class after the ensemble, and whether the two
    classifiers agree on the top class.

    Args:
        probs: (..., Q, K + 1) the ensemble's class probabilities, void last (``EnsembleOutput.probs``).
        in_vocab_probs, out_vocab_probs: (..., Q, K) each branch's class probabilities without void.
    Returns:
        margin: (..., Q) float32 in [0, 1] (1 - 0 with a single class: nothing to confuse it with).
        agree: (..., Q) bool.
    """
    classes = probs[..., :-1].float()
    if classes.shape[-1] >= 2:
        top2 = classes.topk(2, dim=-1).values
        margin = top2[..., 0] - top2[..., 1]
    else:
        margin = classes[..., 0]
    agree = in_vocab_probs.argmax(-1) == out_vocab_probs.argmax(-1)
    return margin.clamp(0.0, 1.0), agree


def mask_signals(mask_logits: torch.Tensor, kept_pixels: torch.Tensor, scale: float = 1.0
                 ) -> tuple[torch.Tensor, torch.Tensor]:
    """Per query: its mask score and the share of its own mask its segment kept.

    Args:
        mask_logits: (N, h, w) the queries' mask logits (stride 4, padding cropped off).
        kept_pixels: (N,) the pixels each query's segment holds after the panoptic fusion, at the output size.
        scale: output pixels per (h, w) cell (the ratio of the output's area to h * w).
    Returns:
        mask_score: (N,) float32, the mean probability over the cells where it is above 0.5 (0 when none is).
        kept_share: (N,) float32 in [0, 1], kept pixels over the pixels of the own mask (1 when it has none).
    """
    import torch

    prob = mask_logits.float().sigmoid()
    own = prob > 0.5
    cells = own.flatten(1).sum(-1).float()
    mask_score = (prob * own).flatten(1).sum(-1) / cells.clamp(min=1)
    kept = torch.where(cells > 0, kept_pixels.float() / (cells * scale).clamp(min=1e-6), torch.ones_like(cells))
    return mask_score, kept.clamp(0.0, 1.0)


def segment_doubt(margin: float, agree: bool, mask_score: float | None = None, kept_share: float | None = None,
                  use_agreement: bool = True) -> float:
    """One segment's doubt in [0, 1]: 1 - its confidence, mask_score x kept_share x (1 + margin) / 2 (a missing
    mask signal counts as 1), pushed half-way to 1 when the branches disagree.

    ``use_agreement``: whether the disagreement counts. It does not when the model's ensemble gives the
    out-of-vocabulary branch no weight (alpha = beta = 0, e.g. ``fcclip-tiny``, whose CLIP is random): that branch
    then decides nothing and its vote is noise.
    """
    confidence = (1.0 + float(np.clip(margin, 0.0, 1.0))) / 2
    for v in (mask_score, kept_share):
        if v is not None:
            confidence *= float(np.clip(v, 0.0, 1.0))
    doubt = 1.0 - confidence
    return doubt if agree or not use_agreement else 0.5 * (1.0 + doubt)


def image_uncertainty(doubts: Sequence[float], unlabeled: float) -> float:
    """An image's uncertainty in [0, 1]: the mean of its segments' doubts (:func:`segment_doubt`), with a quarter
    weight for its unlabeled share; 1 for an image without segments (nothing was found: a person should look).

    A segment counts once whatever its size: small segments are wrong at least as often as large ones.
    """
    if len(doubts) == 0:
        return 1.0
    return float(0.75 * (sum(doubts) / len(doubts)) + 0.25 * float(np.clip(unlabeled, 0.0, 1.0)))


def unlabeled_share(areas: Sequence[int], height: int, width: int) -> float:
    """The share of pixels no segment covers, from the segments' areas (panoptic segments do not overlap)."""
    total = int(height) * int(width)
    if total <= 0:
        return 0.0
    return float(np.clip(1.0 - float(sum(int(a) for a in areas)) / total, 0.0, 1.0))
