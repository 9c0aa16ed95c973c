"""FC-CLIP inside your own Ray Data pipeline: a decode step and a callable class that turn images into rows of the
labeling output's schema (fcclip_pipelines.output.SCHEMA), the rows `fcclip label` writes for the same images.

    import ray
    from fcclip_pipelines.labeler import FCCLIPLabeler, decode_images

    ds = (ray.data.read_parquet("s3://lake/manifest.parquet")                  # your listing, filters and joins
          .filter(expr="camera == 'front'")
          .map_batches(read_uris)                                              # -> "uri", "bytes" (or use
          #   ray.data.read_binary_files(paths, include_paths=True): "path", "bytes")
          .map_batches(decode_images, fn_kwargs={"model": "fcclip-convnext-large"})              # CPU
          .map_batches(FCCLIPLabeler, fn_constructor_kwargs={"vocab": "ade20k_150"},
                       batch_size=4, num_gpus=1,
                       compute=ray.data.ActorPoolStrategy(min_size=1, max_size=8)))              # GPU actors
    ds.write_parquet("s3://lake/labels-front/")

``decode_images`` (CPU, no torch): {"uri" or "path", "bytes"} -> {"uri", "image" (resized (h, w, 3) uint8; a 1x1
placeholder where the file could not be decoded, never a null, which Ray Data could not join to the images of
other blocks), "height", "width" (the original size), "error" ("" or the reason)}, resized to the model's test size.
``FCCLIPLabeler`` (one model per actor, loaded once; its text embeddings computed once): that batch -> a pyarrow
Table of output rows, one per image; an image that cannot be decoded or segmented is an error row, never an
exception. Unlike `fcclip label`, nothing here shards, resumes or commits: Ray Data writes what the pipeline gives
it.
"""
from __future__ import annotations

import numpy as np
import pyarrow as pa

from fcclip.config import load_config
from fcclip.images import DEFAULT_MAX_PIXELS, decode_image_bytes, resize_image
from fcclip.vocabulary import load_vocabulary

from .output import output_schema
from .stages import FCCLIPSegmenter, ModelSpec, encode_rows, label_images

__all__ = ["FCCLIPLabeler", "decode_images"]


def _test_size(model: str, short_edge: int | None, max_size: int | None) -> tuple[int | None, int]:
    """The resize `fcclip label` applies for ``model`` (its preset's test size unless overridden; 0 keeps the size)."""
    inference = load_config(model).inference
    short_edge = inference.short_edge if short_edge is None else short_edge
    return (short_edge if short_edge and short_edge > 0 else None), (inference.max_size if max_size is None
                                                                      else max_size)


_PLACEHOLDER = np.zeros((1, 1, 3), np.uint8)  # the "image" of a row whose decode failed (its "error" says why)


def decode_images(batch: dict, *, model: str = "fcclip-convnext-large", short_edge: int | None = None,
                  max_size: int | None = None, max_pixels: int = DEFAULT_MAX_PIXELS) -> dict:
    """A ``map_batches`` step (CPU): decode each image's bytes as `fcclip label` does (EXIF orientation, RGB) and
    resize it to ``model``'s test size. Needs the columns "bytes" and "uri" (or "path", as
    ``ray.data.read_binary_files(..., include_paths=True)`` names it)."""
    short_edge, max_size = _test_size(model, short_edge, max_size)
    uris = [str(u) for u in (batch["uri"] if "uri" in batch else batch["path"])]
    images, heights, widths, errors = [], [], [], []
    for data in batch["bytes"]:
        image, h, w, err = _PLACEHOLDER, 0, 0, ""
        try:
            decoded = decode_image_bytes(bytes(data), max_pixels=max_pixels)
            h, w = decoded.shape[:2]
            image = np.ascontiguousarray(resize_image(decoded, short_edge, max_size))
        except Exception as e:  # a bad image is an error row, never a failed pipeline
            err = f"{type(e).__name__}: {e}"
        images.append(image)
        heights.append(h)
        widths.append(w)
        errors.append(err)
    out_images = np.empty(len(images), dtype=object)
    out_images[:] = images
    return {"uri": np.array(uris, dtype=object), "image": out_images, "height": np.array(heights, np.int64),
            "width": np.array(widths, np.int64), "error": np.array(errors, dtype=object)}


class FCCLIPLabeler:
    """A Ray Data callable class (an actor): decoded images (``decode_images``'s columns) -> output rows.

    Args:
        vocab: a builtin vocabulary name, a file, or an inline "cat; dog, puppy; grass [stuff]".
        model, weights: as for `fcclip label` (a preset or preset YAML; "official", "random" or a path/URI).
        min_score: segments scoring below it are dropped.
        autocast: "bf16" / "fp16" where the device computes it natively.
        embeddings: also the per-segment embedding columns (``output.EMBEDDING_COLUMNS``).
        run_id: the rows' ``run_id``.
        batch_size: images per forward pass inside one call (Ray Data's own ``batch_size`` sets the call's size).
    The device is the GPU Ray assigned to the actor (``num_gpus=1`` in ``map_batches``), else the CPU.
    """

    def __init__(self, vocab: str, *, model: str = "fcclip-convnext-large", weights: str = "official",
                 min_score: float = 0.0, autocast: str | None = None, embeddings: bool = False,
                 run_id: str = "ray-data", batch_size: int = 4):
        vocabulary = load_vocabulary(vocab)
        config = load_config(model)
        self.model_stage = FCCLIPSegmenter(ModelSpec(model=model, weights=weights, vocabulary=vocabulary.to_dict(),
                                                     min_score=min_score, autocast=autocast, embeddings=embeddings))
        self.batch_size = batch_size
        self.constants = {"vocabulary": f"{vocabulary.name}@{vocabulary.digest[:16]}", "run_id": run_id,
                          "model": f"{config.name}@{weights}"}
        if embeddings:
            from fcclip.backbone import clip_embed_dim

            self.constants["embedding_dim"] = clip_embed_dim(config.clip)

    @property
    def schema(self) -> pa.Schema:
        return output_schema(self.constants.get("embedding_dim"))

    def __call__(self, batch: dict) -> pa.Table:
        uris = [str(u) for u in batch["uri"]]
        meta = {"height": [int(v) for v in batch["height"]], "width": [int(v) for v in batch["width"]],
                "error": [str(e or "") for e in batch["error"]]}
        images = list(batch["image"])
        labeled = label_images(self.model_stage, meta, images, self.batch_size)
        table = encode_rows(uris, list(range(len(uris))), meta, labeled, self.constants)
        return table.drop_columns(["row"])
