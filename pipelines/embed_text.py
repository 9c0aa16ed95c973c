"""`fcclip embed-text`: a text's CLIP embedding, as a JSON list, for searching stored embeddings with SQL.

    fcclip embed-text "a flooded street" [--model PRESET] [--weights W]

The vector is made as ``fcclip search`` makes its query (``fcclip_pipelines.search.text_embedding``): the model's text tower,
the classification prompt templates. Use the labeling run's model and weights.
"""
from __future__ import annotations

import argparse
import json
import sys
import warnings

import numpy as np

from fcclip.build import build_model
from fcclip.checkpoint import CheckpointError
from fcclip.config import ConfigError
from fcclip.text import encode_names, text_tower_digest


class TextTowerMismatch(ValueError):
    """The model's text tower is not the one a labeling run used."""


class TextError(ValueError):
    """A text that cannot be embedded as given: empty, or too long for the text encoder (which would cut it)."""


def check_text(text: str, model: str) -> None:
    """TextError where ``text`` is empty or one of its prompts (the class-name templates) is longer than the text
    encoder's context: the tokenizer would cut it, and the embedding be of another text."""
    from fcclip.backbone import clip_context_length
    from fcclip.config import load_config
    from fcclip.text import count_tokens
    from fcclip.vocabulary import PROMPT_TEMPLATES

    if not text.strip():
        raise TextError("the text is empty")
    context = clip_context_length(load_config(model).clip)
    longest = max(count_tokens(template.format(text)) for template in PROMPT_TEMPLATES)
    if longest > context:
        raise TextError(f"the text is too long: in its prompts it takes up to {longest} tokens, more than the text "
                        f"encoder's {context}; shorten it")


def text_tower(model: str, weights: str, expect_text_tower: str | None = None):
    """The CLIP backbone of ``model`` with ``weights``, built on the CPU, with its text tower only (the image tower
    and the decoders are dropped once loaded), checked to have the text tower whose digest is ``expect_text_tower``
    (``EmbeddingSpace.text_tower``) when given."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        net = build_model(model, weights=weights, device="cpu")
    backbone = net.backbone
    backbone.clip_model.visual = None  # the image tower is never used here: free it at once
    del net
    if expect_text_tower is not None and text_tower_digest(backbone) != expect_text_tower:
        raise TextTowerMismatch(
            f"the text tower of {model} with weights {weights!r} is not the one that labeled the run; give the "
            "run's --model and --weights"
        )
    return backbone


def text_embedding(text: str, model: str = "fcclip-convnext-large", weights: str = "official",
                   expect_text_tower: str | None = None) -> np.ndarray:
    """(D,) float32: ``text``'s CLIP embedding with the model's text tower, as a class name's (prompt templates)."""

    check_text(text, model)
    backbone = text_tower(model, weights, expect_text_tower)
    return encode_names(backbone, [text])[0].cpu().numpy().astype(np.float32)


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("text", help="the text to embed, e.g. 'a flooded street'")
    p.add_argument("--model", default="fcclip-convnext-large", help="preset or preset YAML (default: %(default)s)")
    p.add_argument("--weights", default="official", help="the labeling run's weights (default: %(default)s)")


def main_args(args: argparse.Namespace) -> int:
    try:
        vector = text_embedding(args.text, args.model, args.weights)
    except (ConfigError, CheckpointError, FileNotFoundError, TextError) as e:
        print(f"fcclip embed-text: error: {' '.join(str(e).split())}", file=sys.stderr)  # one line
        return 2
    print(json.dumps([float(f"{v:.7g}") for v in vector.tolist()]))
    return 0
