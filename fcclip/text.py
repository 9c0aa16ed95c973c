"""Vocabulary -> text classifier: prompt templates, CLIP text embeddings, and their cache.

Each synonym of each class is put into the 14 prompt templates of the reference (ViLD's); the CLIP embeddings of the
prompts are L2-normalised, averaged over the templates and normalised again, giving ONE ROW PER SYNONYM. A class's
logit is later the max over its synonym rows. Encoding is the slow part (a large vocabulary takes minutes on a CPU),
so classifiers are cached in memory and on disk, keyed by the text tower's weights, the vocabulary and the templates.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch

from ._paths import cache_dir
from .vocabulary import PROMPT_TEMPLATES, Vocabulary, load_vocabulary, seen_mask, validate_prompt_lengths  # noqa: F401

logger = logging.getLogger(__name__)



@dataclass
class TextClassifier:
    """The classifier of one vocabulary.

    embeddings: (S, D) L2-normalised, one row per synonym, classes in order (void is added by the model).
    synonym_class: (S,) int64, the class index of each row.
    seen: (K,) bool, True where a class shares a synonym with the training vocabulary.
    """

    vocabulary: Vocabulary
    embeddings: torch.Tensor
    synonym_class: torch.Tensor
    seen: torch.Tensor

    @property
    def num_classes(self) -> int:
        return len(self.vocabulary.categories)

    def to(self, device) -> "TextClassifier":
        return TextClassifier(
            self.vocabulary, self.embeddings.to(device), self.synonym_class.to(device), self.seen.to(device)
        )


_tokenizer = None


def tokenizer():
    """open_clip's CLIP BPE tokenizer (shipped with open_clip; nothing downloaded)."""
    global _tokenizer
    if _tokenizer is None:
        import open_clip  # here: what only computes with text rows (fcclip relabel's tasks) need not load open_clip

        _tokenizer = open_clip.SimpleTokenizer()
    return _tokenizer


def count_tokens(text: str) -> int:
    """Tokens of ``text`` including the start and end tokens."""
    return len(tokenizer().encode(text)) + 2


def tokenize(texts: list[str], context_length: int) -> torch.Tensor:
    return tokenizer()(texts, context_length=context_length)


def text_tower_digest(backbone) -> str:
    """sha256 of the text tower's weights (computed once per model and remembered)."""
    cached = getattr(backbone, "_text_digest", None)
    if cached is not None:
        return cached
    h = hashlib.sha256()
    m = backbone.clip_model
    for name, tensor in sorted(m.state_dict().items()):
        if name.startswith("visual.") or name == "logit_scale":
            continue
        h.update(name.encode())
        h.update(tensor.detach().to("cpu", torch.float32).contiguous().numpy().tobytes())
    backbone._text_digest = h.hexdigest()
    return backbone._text_digest


def encode_names(backbone, names: list[str], *, templates=PROMPT_TEMPLATES, batch_size: int = 256) -> torch.Tensor:
    """(N, D) one embedding per name: each name in every template, CLIP-encoded, normalised, averaged over the
    templates and normalised again (a class's synonym rows, or a free-text search query)."""
    prompts = [t.format(name) for name in names for t in templates]
    device = backbone.clip_model.positional_embedding.device
    out = []
    for start in range(0, len(prompts), batch_size):
        tokens = tokenize(prompts[start : start + batch_size], backbone.context_length).to(device)
        out.append(backbone.encode_text(tokens).float())
    emb = torch.cat(out)
    emb = emb / emb.norm(dim=-1, keepdim=True)
    emb = emb.reshape(-1, len(templates), emb.shape[-1]).mean(1)
    return emb / emb.norm(dim=-1, keepdim=True)


def encode_vocabulary(
    backbone, vocabulary: Vocabulary, *, templates=PROMPT_TEMPLATES, batch_size: int = 256
) -> torch.Tensor:
    """(S, D) one normalised, template-averaged embedding per synonym."""
    names = [name for names in vocabulary.synonyms for name in names]
    return encode_names(backbone, names, templates=templates, batch_size=batch_size)


class TextClassifierCache:
    """Text classifiers in memory and on disk (``<cache>/text/<key>.pt``; safe to share between processes)."""

    def __init__(self, directory: str | Path | None = None, enabled: bool = True):
        self.directory = Path(directory) if directory is not None else cache_dir() / "text"
        self.enabled = enabled
        self._memory: dict[str, torch.Tensor] = {}

    def key(self, backbone, vocabulary: Vocabulary, templates) -> str:
        payload = json.dumps(
            {"text": text_tower_digest(backbone), "vocabulary": vocabulary.digest, "templates": list(templates)},
            sort_keys=True,
        )
        return hashlib.sha256(payload.encode()).hexdigest()[:32]

    def get(self, key: str) -> torch.Tensor | None:
        if key in self._memory:
            return self._memory[key]
        if not self.enabled:
            return None
        path = self.directory / f"{key}.pt"
        if path.is_file():
            try:
                emb = torch.load(path, map_location="cpu", weights_only=True)
            except Exception as e:  # a damaged cache file is recomputed, never fatal
                logger.warning("ignoring unreadable text-embedding cache %s: %s", path, e)
                return None
            self._memory[key] = emb
            return emb
        return None

    def put(self, key: str, emb: torch.Tensor) -> None:
        self._memory[key] = emb
        if not self.enabled:
            return
        try:
            self.directory.mkdir(parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(dir=self.directory, suffix=".tmp")
            os.close(fd)
            torch.save(emb.cpu(), tmp)
            os.replace(tmp, self.directory / f"{key}.pt")  # atomic: readers never see a partial file
        except OSError as e:
            logger.warning("could not write the text-embedding cache in %s: %s", self.directory, e)


_default_cache: TextClassifierCache | None = None


def default_cache() -> TextClassifierCache:
    global _default_cache
    if _default_cache is None:
        _default_cache = TextClassifierCache(enabled=os.environ.get("FCCLIP_TEXT_CACHE", "1") != "0")
    return _default_cache


def build_text_classifier(
    backbone,
    vocabulary,
    *,
    train_vocabulary="coco_panoptic",
    templates=PROMPT_TEMPLATES,
    cache: TextClassifierCache | None = None,
) -> TextClassifier:
    """The text classifier of ``vocabulary`` for this backbone's text tower.

    Args:
        backbone: a :class:`fcclip.backbone.CLIPBackbone`.
        vocabulary: anything :func:`fcclip.vocabulary.load_vocabulary` accepts.
        train_vocabulary: the vocabulary the model was trained on; decides seen (alpha) vs unseen (beta) classes.
        cache: where to look for and store embeddings (default: memory + ``$FCCLIP_CACHE/text``).
    """
    vocabulary = load_vocabulary(vocabulary)
    train_vocabulary = load_vocabulary(train_vocabulary)
    validate_prompt_lengths(vocabulary, templates, count_tokens, context_length=backbone.context_length)
    cache = cache if cache is not None else default_cache()
    key = cache.key(backbone, vocabulary, templates)
    emb = cache.get(key)
    if emb is None:
        n = sum(len(s) for s in vocabulary.synonyms)
        logger.info("encoding %d synonyms x %d templates of vocabulary %r", n, len(templates), vocabulary.name)
        emb = encode_vocabulary(backbone, vocabulary, templates=templates)
        cache.put(key, emb.cpu())
    synonym_class = torch.tensor([i for i, names in enumerate(vocabulary.synonyms) for _ in names], dtype=torch.long)
    seen = torch.tensor(seen_mask(vocabulary, train_vocabulary), dtype=torch.bool)
    device = backbone.clip_model.positional_embedding.device
    return TextClassifier(vocabulary, emb.to(device), synonym_class.to(device), seen.to(device))
