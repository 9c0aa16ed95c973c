"""`fcclip search` and `fcclip embed-text`: segments of a labeling output ranked by similarity to a text.

    fcclip search DEST "a flooded street" [--top 50] [--out hits.html]
    fcclip embed-text "a flooded street" [--model PRESET] [--weights W]      (the query vector, as JSON)

A segment's score against a text is the cosine similarity of its ``embedding_out`` (the mask-pooled frozen-CLIP
embedding that ``fcclip label --embeddings`` stores) and the text's CLIP embedding, made exactly as a class name's
(the 14 prompt templates, normalised, averaged, normalised again: ``fcclip.text.encode_names``) with the run's text
tower. The part files are read a batch at a time, with only ``uri``, the segments' ``id``, ``label`` and ``score``
and ``embedding_out`` (never the masks); the top N are kept as the batches go by. ``--out`` writes an HTML gallery
of the hits (each image with the hit's mask drawn, through the report's overlay code). The same search as SQL over
the Parquet files with DuckDB is in the README (``array_cosine_similarity``).
"""
from __future__ import annotations

import argparse
import html
import json
import sys
from dataclasses import dataclass

import fsspec
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from fcclip.config import ConfigError

from .arguments import COUNT
from .embed_text import TextError, TextTowerMismatch, text_embedding
from .output import OutputError, PartFile, add_version_argument, open_output
from .show.overlays import overlay, read_rows

_LEAVES = ("id", "label", "score")
_BATCH_ROWS = 1024


class SearchError(ValueError):
    """DEST cannot be searched (one line a user can act on)."""


@dataclass
class Hit:
    similarity: float
    uri: str
    segment_id: int
    label: str
    score: float
    file: str  # the part file (URL) and row that hold the segment
    row: int


def search_segments(dest: str, query: np.ndarray, top: int = 50, version: int | None = None) -> list[Hit]:
    """The ``top`` segments of DEST (``version`` of its table; default the current one) most similar (cosine) to
    ``query`` (D,), best first (ties: file, row, order)."""
    try:
        output = open_output(dest, version)
    except OutputError as e:
        raise SearchError(str(e)) from None
    if "embedding_out" not in output.columns:
        raise SearchError(f"{dest}: search needs a run labeled with --embeddings (no column 'embedding_out')")
    q = np.asarray(query, np.float32).ravel()
    q = q / max(float(np.linalg.norm(q)), 1e-12)
    best: list[Hit] = []
    for url, path in zip(output.urls, output.files):
        with output.fs.open(path, "rb") as f:
            parquet = PartFile(f)
            leaves = [parquet.schema.column(i).path for i in range(len(parquet.schema))]
            wanted = ["uri"] + [p for p in leaves if p.startswith("segments.") and p.rsplit(".", 1)[-1] in _LEAVES]
            wanted += [p for p in leaves if p.startswith("embedding_out.")]
            offset = 0
            for batch in parquet.iter_batches(batch_size=_BATCH_ROWS, columns=wanted):
                best = _top(best + _batch_hits(batch, q, url, offset, top), top)
                offset += batch.num_rows
    return best


def _batch_hits(batch: pa.RecordBatch, q: np.ndarray, url: str, offset: int, top: int) -> list[Hit]:
    """The ``top`` best segments of one batch."""
    embeddings = pc.list_flatten(batch.column("embedding_out"))
    if len(embeddings) == 0:
        return []
    vectors = embeddings.flatten().to_numpy(zero_copy_only=False).astype(np.float32).reshape(len(embeddings), -1)
    if vectors.shape[1] != q.size:
        raise SearchError(f"the query has {q.size} values, the stored embeddings {vectors.shape[1]}")
    norms = np.maximum(np.linalg.norm(vectors, axis=1), 1e-12)
    similarity = vectors @ q / norms
    order = np.argsort(-similarity, kind="stable")[:top]
    lengths = pc.list_value_length(batch.column("embedding_out")).fill_null(0).to_numpy(zero_copy_only=False)
    row_of = np.repeat(np.arange(batch.num_rows), lengths)
    segments = pc.list_flatten(batch.column("segments"))
    uris = batch.column("uri")
    return [
        Hit(float(similarity[k]), uris[int(row_of[k])].as_py(), int(segments.field("id")[k].as_py()),
            segments.field("label")[k].as_py(), float(segments.field("score")[k].as_py()), url,
            offset + int(row_of[k]))
        for k in order.tolist()
    ]


def _top(hits: list[Hit], top: int) -> list[Hit]:
    return sorted(hits, key=lambda h: -h.similarity)[:top]  # stable: earlier files and rows first on ties


def search_dest(dest: str, text: str, top: int = 50, model: str | None = None,
                weights: str | None = None, version: int | None = None) -> list[Hit]:
    """Segments of DEST ranked by similarity to ``text`` (embedded with the run's model unless given)."""

    try:
        output = open_output(dest, version)
    except OutputError as e:
        raise SearchError(str(e)) from None
    values = {k: output.metadata_values(k) for k in ("model", "weights", "embeddings")}
    if not values["embeddings"]:
        raise SearchError(f"{dest}: search needs a run labeled with --embeddings (no fcclip.embeddings metadata)")
    space = json.loads(values["embeddings"][0])
    query = text_embedding(text, model or values["model"][0], weights or values["weights"][0],
                           expect_text_tower=space["text_tower"])
    return search_segments(dest, query, top, version)


def gallery_html(dest: str, query: str, hits: list[Hit], *, image_width: int = 480, version: int | None = None) -> str:
    """A self-contained HTML page: each hit's image with the hit's mask drawn (the report's overlay code)."""
    output = open_output(dest, version)
    colors = output.colors()
    records: dict[tuple[str, int], dict] = {}
    for url in sorted({h.file for h in hits}):
        for row, record in read_rows(output, url, sorted({h.row for h in hits if h.file == url})).items():
            records[(url, row)] = record
    e = lambda v: html.escape(str(v), quote=True)  # noqa: E731
    figures = []
    for rank, h in enumerate(hits, 1):
        record = records[(h.file, h.row)]
        segments = [s for s in record.get("segments") or [] if s["id"] == h.segment_id]
        try:
            src = overlay(record, segments, colors, image_width, int(image_width * 1.5))
            body = f'<img src="{src}" alt="{e(h.uri)}">'
        except Exception as err:  # one unreadable image is a placeholder, never a failed page
            body = f'<div class="placeholder">cannot show this image: {e(type(err).__name__)}: {e(err)}</div>'
        figures.append(
            f'<figure data-rank="{rank}" data-uri="{e(h.uri)}" data-segment="{h.segment_id}" '
            f'data-similarity="{h.similarity:.6f}">{body}<figcaption>#{rank} · similarity {h.similarity:.3f}<br>'
            f"{e(h.uri)} · segment {h.segment_id}: {e(h.label)} ({h.score:.2f})</figcaption></figure>"
        )
    return (
        "<!doctype html><html><head><meta charset=\"utf-8\"><title>fcclip search</title><style>"
        "body{font-family:sans-serif;margin:1.5em}.gallery{display:flex;flex-wrap:wrap;gap:12px}"
        "figure{margin:0;max-width:" + str(image_width) + "px}figcaption{font-size:12px;word-break:break-all}"
        ".placeholder{background:#eee;padding:2em}</style></head><body>"
        f"<h1>{e(query)}</h1><p>{len(hits)} segments of {e(dest)}, most similar first</p>"
        f'<div class="gallery">{"".join(figures)}</div></body></html>'
    )


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("dest", metavar="DEST", help="a labeling output made with fcclip label --embeddings")
    p.add_argument("text", help="what to look for, e.g. 'a flooded street'")
    add_version_argument(p)
    p.add_argument("--top", type=COUNT, default=50, help="segments listed (default: %(default)s)")
    p.add_argument("--out", default=None, metavar="HITS.html", help="also write an HTML gallery of the hits")
    p.add_argument("--model", default=None, help="default: DEST's model")
    p.add_argument("--weights", default=None, help="default: DEST's weights")


def main_args(args: argparse.Namespace) -> int:
    if args.top < 1:
        print("fcclip search: error: --top must be >= 1", file=sys.stderr)
        return 2
    try:
        hits = search_dest(args.dest, args.text, args.top, args.model, args.weights, version=args.version)
    except (SearchError, TextTowerMismatch, TextError, ConfigError, FileNotFoundError) as e:
        print(f"fcclip search: error: {e}", file=sys.stderr)
        return 2
    print("similarity\turi\tsegment\tlabel\tscore")
    for h in hits:
        print(f"{h.similarity:.4f}\t{h.uri}\t{h.segment_id}\t{h.label}\t{h.score:.3f}")
    if args.out:
        with fsspec.open(args.out, "w", encoding="utf-8") as f:
            f.write(gallery_html(args.dest, args.text, hits, version=args.version))
        print(f"{len(hits)} hits -> {args.out}")
    return 0

