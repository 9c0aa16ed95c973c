"""FC-CLIP open-vocabulary panoptic segmentation in pure PyTorch.

    import fcclip
    model = fcclip.build_model("fcclip-convnext-large")
    predictor = fcclip.Predictor(model, vocabulary="ade20k_150")
    result = predictor(image)

Names are imported on first use, so ``import fcclip.vocabulary`` (say) does not load the model stack.

Glossary (one name per concept, in the code, the docstrings and the README):

    class_logits   (Q, K + 1) per-query class scores, void last; after the ensemble, log-probabilities
    mask_logits    (Q, h, w) per-query mask logits (before the sigmoid), at stride 4 unless said otherwise
    segment_map    (H, W) int32 panoptic segment id per pixel, 0 = no segment (the reference's panoptic_seg)
    segments       one dict per segment id of a segment_map: id, label, category_id, class_index, is_thing, score,
                   area, bbox [x, y, w, h]
    category_id    the vocabulary's id of a class (COCO's 1..200 ids for COCO, the position + 1 otherwise); never an
                   index
    class_index    the position of a class in the vocabulary, 0..K-1 (rows of the text embeddings)
    is_thing       a class of countable objects (instances) rather than stuff (COCO JSON files spell it isthing)
    query          one of the transformer decoder's Q object queries (250 for the released models)

Spelling: label, labeled, labeling, unlabeled, relabel (American, one l), everywhere.

The labeling pipeline (fcclip_pipelines, the repository's pipelines/):

    labeling output  what `fcclip label` writes to DEST: Parquet part files of one row per image; its schema, metadata
                   keys, writing and reading live in one module, fcclip_pipelines.output
    reader         a callable URI -> bytes (default: fsspec); run inside the decoder
    decoder        the ReadDecode stage: reads (through the reader), decodes and resizes a chunk's images on CPU
    model_stage    the object that turns decoded images into segment maps and segments (FCCLIPSegmenter, or a stand-in
                   in tests and benchmarks); built once per model actor by make_model_stage, a zero-argument callable
                   (FCCLIPSegmenter.builder(spec))
    run_metadata   what a model stage adds to a run's file metadata (the embedding space with --embeddings)
    EMBEDDING_COLUMNS  the per-segment embedding columns of a run with --embeddings (fcclip_pipelines.output)
    table          DEST as a Delta Lake table: its log (DEST/_delta_log) names the part files of each version
                   (fcclip_pipelines.lake)
    version        one commit of the table's log: the part files of one or more committed shards added (and, for an
                   increment's changed objects, the files holding their old rows replaced)
    increment      the shards a rerun adds to a complete run: the URIs SOURCE lists and the table lacks (new) or holds
                   for an object that changed since (changed)
    SOURCE_COLUMNS source_etag, source_size, source_mtime: what the listing said of each row's object
"""
from __future__ import annotations

import importlib

__version__ = "0.1.0"

_EXPORTS = {
    "build_model": "fcclip.build",
    "Predictor": "fcclip.predictor",
    "Prediction": "fcclip.predictor",
    "ModelConfig": "fcclip.config",
    "list_models": "fcclip.config",
    "load_config": "fcclip.config",
    "Vocabulary": "fcclip.vocabulary",
    "list_vocabularies": "fcclip.vocabulary",
    "load_vocabulary": "fcclip.vocabulary",
    "load_image": "fcclip.images",
}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name in _EXPORTS:
        value = getattr(importlib.import_module(_EXPORTS[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'fcclip' has no attribute {name!r}")


def __dir__():
    return sorted(list(globals()) + __all__)
