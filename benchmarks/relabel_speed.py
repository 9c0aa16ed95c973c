"""`fcclip relabel` speed next to labeling the same images again, and the bytes embeddings add per image.

    python benchmarks/relabel_speed.py --model fcclip-tiny --size 640 --images 4
    python benchmarks/relabel_speed.py --model fcclip-convnext-large --size 640 --images 2 --repeat 200

1. Labeling: the model stage of `fcclip label --embeddings` (``fcclip_pipelines.stages.FCCLIPSegmenter``: resize already
   done, forward, panoptic post-processing, embeddings picked) over N synthetic images, one at a time, after one
   warm-up image: seconds per image. This is a lower bound of what labeling again costs (no decoding, no I/O, no
   RLE encoding, no Ray).
2. The rows those images become (``fcclip_pipelines.stages.encode_rows``), written as a part file is (Parquet, zstd): bytes
   per image with the embedding columns and without them (the column chunks' compressed sizes: a part file's footer
   and its ``fcclip.embeddings`` metadata come once per file and are given apart), and the same rows with random
   unit vectors of D = 768 in place of the model's (what the embeddings of ConvNeXt-L cost, whatever the model run).
3. Relabel: the new vocabulary's text classifier (the model's text tower, timed on its own: once per job), then
   ``fcclip_pipelines.relabel.relabel_batch`` (the work of a relabel task: re-classification, merges, the new rows) over
   the rows repeated ``--repeat`` times: segments/s and seconds per image. Reading and writing the part files is not
   included (see the README of benchmarks for the end-to-end command).

Weights are the deterministic random ones: segment counts differ from a trained model's (relabel's cost grows with
the segments per image, labeling's does not).
"""
from __future__ import annotations

import argparse
import io
import json
import platform
import sys
import time
import warnings
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

VOCAB = "person; car; dog, puppy; grass, lawn [stuff]; sky [stuff]; road, street [stuff]; building [stuff]"
NEW = "pedestrian; taxi; police car; scooter; dog; lawn [stuff]; flooded street [stuff]; sky [stuff]"


def column_bytes(parquet: bytes) -> dict[str, int]:
    """Compressed bytes of each top-level column in a Parquet file (footer and metadata not included)."""
    import pyarrow.parquet as pq

    md = pq.ParquetFile(io.BytesIO(parquet)).metadata
    sizes: dict[str, int] = {}
    for g in range(md.num_row_groups):
        for c in range(md.num_columns):
            column = md.row_group(g).column(c)
            top = column.path_in_schema.split(".", 1)[0]
            sizes[top] = sizes.get(top, 0) + column.total_compressed_size
    return sizes


def with_random_vectors(table, dim: int):
    """``table`` with its embedding columns replaced by random unit vectors of ``dim`` values (float16)."""
    import numpy as np
    import pyarrow as pa
    import pyarrow.compute as pc

    rng = np.random.default_rng(0)
    lengths = pc.list_value_length(table.column("segments")).fill_null(0).to_numpy(zero_copy_only=False)
    offsets = pa.array(np.concatenate([[0], np.cumsum(lengths)]).astype(np.int32))
    for name in ("embedding_in", "embedding_out"):
        v = rng.normal(size=(int(lengths.sum()), dim)).astype(np.float32)
        v = (v / np.linalg.norm(v, axis=1, keepdims=True)).astype(np.float16)
        vectors = pa.FixedSizeListArray.from_arrays(pa.array(v.ravel(), pa.float16()), dim)
        column = pa.ListArray.from_arrays(offsets, vectors)
        table = table.set_column(table.column_names.index(name), pa.field(name, column.type), column)
    return table


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    p.add_argument("--model", default="fcclip-tiny")
    p.add_argument("--size", type=int, default=640, help="square synthetic images of this side")
    p.add_argument("--images", type=int, default=4)
    p.add_argument("--repeat", type=int, default=50, help="relabel the rows this many times over (timing)")
    p.add_argument("--vocab", default=VOCAB)
    p.add_argument("--new-vocab", default=NEW)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--json", default=None)
    args = p.parse_args(argv)

    import os

    os.environ.setdefault("FCCLIP_TEXT_CACHE", "0")
    import pyarrow as pa
    import pyarrow.parquet as pq
    import torch

    from fcclip.datasets.synthetic import synthetic_image
    from fcclip.text import build_text_classifier
    from fcclip.vocabulary import load_vocabulary
    from fcclip_pipelines.relabel import NewVocabulary, new_stats, relabel_batch
    from fcclip_pipelines.output import EMBEDDING_COLUMNS, encode_table
    from fcclip_pipelines.stages import FCCLIPSegmenter, ModelSpec, encode_rows, label_images

    if args.threads:
        torch.set_num_threads(args.threads)
    vocabulary = load_vocabulary(args.vocab)
    t = time.perf_counter()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model_stage = FCCLIPSegmenter(ModelSpec(args.model, "random", vocabulary.to_dict(), device="cpu",
                                              embeddings=True))
    build_s = time.perf_counter() - t
    images = [synthetic_image(i, args.size, args.size) for i in range(args.images + 1)]
    model_stage([images[0]], [images[0].shape[:2]])  # warm-up
    images = images[1:]
    meta = {"height": [args.size] * args.images, "width": [args.size] * args.images, "error": [""] * args.images}
    t = time.perf_counter()
    labeled = label_images(model_stage, meta, images, batch_size=1)
    label_s = (time.perf_counter() - t) / args.images

    space = model_stage.run_metadata["embeddings"]
    dim = space["dim"]
    uris = [f"synthetic/{i:06d}.jpg" for i in range(args.images)]
    constants = {"vocabulary": "bench@0", "run_id": "bench", "model": model_stage.model_id, "embedding_dim": dim}
    table = encode_rows(uris, list(range(args.images)), meta, labeled, constants).drop_columns(["row"])
    segments = sum(len(s) for s in labeled["segments"])
    sizes = column_bytes(encode_table(table, {}))
    with_bytes = sum(sizes.values())
    without_bytes = sum(v for k, v in sizes.items() if k not in EMBEDDING_COLUMNS)
    metadata_bytes = len(json.dumps(space, sort_keys=True))
    bytes_768 = sum(column_bytes(encode_table(with_random_vectors(table, 768), {})).values())

    new_vocabulary = load_vocabulary(args.new_vocab)
    t = time.perf_counter()
    text = build_text_classifier(model_stage.model.backbone, new_vocabulary,
                                 train_vocabulary=model_stage.model.config.inference.train_vocabulary)
    text_s = time.perf_counter() - t
    new = NewVocabulary(new_vocabulary.to_dict(), text.embeddings.float().numpy(), text.synonym_class.numpy(), space)
    big = pa.concat_tables([table] * args.repeat).combine_chunks()
    # as a relabel task reads it back: from Parquet, without the columns it replaces
    buf = io.BytesIO()
    pq.write_table(big, buf)
    batches = pq.ParquetFile(io.BytesIO(buf.getvalue())).iter_batches(
        batch_size=512, columns=[c for c in big.column_names if c not in ("vocabulary", "run_id")])
    batches = list(batches)
    stats = new_stats()
    t = time.perf_counter()
    for batch in batches:
        relabel_batch(batch, new, 0.0, {"vocabulary": "new@0", "run_id": "bench2"}, stats)
    relabel_total = time.perf_counter() - t
    n_rows = args.images * args.repeat
    relabel_s = relabel_total / n_rows
    figures = {
        "model": args.model, "size": args.size, "images": args.images, "repeat": args.repeat,
        "segments_per_image": segments / args.images, "embedding_dim": dim,
        "model_build_s": build_s, "label_s_per_image": label_s, "label_images_per_s": 1 / label_s,
        "relabel_s_per_image": relabel_s, "relabel_segments_per_s": stats["segments_in"] / relabel_total,
        "speedup": label_s / relabel_s, "text_tower_s": text_s, "new_classes": len(new_vocabulary),
        "bytes_per_image_with_embeddings": with_bytes / args.images,
        "bytes_per_image_without": without_bytes / args.images,
        "bytes_per_image_with_768": bytes_768 / args.images, "embeddings_metadata_bytes_per_file": metadata_bytes,
        "relabel_stats": stats, "cpu": platform.processor() or platform.machine(), "threads": torch.get_num_threads(),
    }
    f = figures
    print(f"## relabel vs labeling again: {args.model}, {args.size} x {args.size}, {args.images} images "
          f"({f['segments_per_image']:.1f} segments/image), {torch.get_num_threads()} threads\n")
    print("| | per image | throughput |")
    print("|---|---|---|")
    print(f"| labeling (model stage: forward + panoptic + embeddings) | {label_s:.3f} s | {1 / label_s:.2f} images/s |")
    print(f"| relabel (re-classification, merges, rows; x{args.repeat}) | {relabel_s * 1e3:.3f} ms | "
          f"{f['relabel_segments_per_s']:.0f} segments/s, {1 / relabel_s:.0f} images/s |")
    print(f"\nrelabel takes {f['speedup']:.0f}x fewer seconds per image than labeling again; the new vocabulary's "
          f"text classifier ({len(new_vocabulary)} classes) took {text_s:.2f} s once (model built in {build_s:.1f} s).")
    print(f"\nbytes per image in a part file (zstd column chunks): {f['bytes_per_image_without']:.0f} without "
          f"embeddings, {f['bytes_per_image_with_embeddings']:.0f} with (D = {dim}, float16), "
          f"{f['bytes_per_image_with_768']:.0f} with random unit vectors of D = 768; plus "
          f"{metadata_bytes} bytes of fcclip.embeddings metadata per part file")
    if args.json:
        Path(args.json).write_text(json.dumps(figures, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
