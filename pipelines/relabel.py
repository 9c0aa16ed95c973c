"""`fcclip relabel`: a labeling output under a new vocabulary, from its stored embeddings, without images or model.

    fcclip relabel DEST --vocab NEW --out DEST2 [--min-score S] [--address ADDR] [--num-cpus N] [--overwrite]

DEST must be labeled with ``fcclip label --embeddings``: each segment then carries the two embeddings of the query it
came from (``embedding_in``, ``embedding_out``, ``embedding_valid``), and the run's metadata the rest of what FC-CLIP
compares with the text (``fcclip.embeddings``: ``fcclip.reclassify.EmbeddingSpace``). The job:

1. NEW's text classifier is computed once, on the driver, with the run's model's text tower (the model is built
   loaded from the run's preset and weights, its image tower and decoders dropped at once: they never run, and no
   image is read). Its text tower must be the one that labeled DEST (the digest in the metadata).
2. One Ray task per part file of DEST (a local Ray unless ``--address``): the part file is read without its
   ``vocabulary`` and ``run_id`` columns, every segment is re-classified in one matrix product per batch of rows by
   :func:`fcclip.reclassify.reclassify` (the model's own ensemble code), and DEST2's part file of the same number is
   written atomically (``fcclip_pipelines.output.write_part``), so DEST2 is exactly-once and resumable like a labeling
   output: a rerun skips committed part files; other settings are refused unless ``--overwrite``. DEST2 follows
   DEST's table: run again once DEST has a later version, the rows of that version that DEST2 does not hold as they
   are (new, changed, labeled again) are relabeled into DEST2's next shards (an increment of DEST2's run, one shard
   per file of DEST holding any, ``_plan_follow``), each committed in a version that also removes the rows of its
   URIs DEST2 held (``lake.ShardCommitter``, as a labeling increment's), and the rows of URIs DEST no longer holds
   are removed (as ``fcclip label --prune`` removes them). A compaction of DEST relabels nothing.
3. Per segment, under NEW: the class and score are those the model's ensemble gives its query (the top of the
   softmax over the ensembled log-probabilities, void included). A segment whose query would not form a segment
   under NEW (its top class is void, or its score is at most the model's object-mask threshold) or scores below
   ``--min-score`` (default: DEST's) is dropped: its pixels become unlabeled. Stuff segments of one image that NEW
   gives the same class, adjacent or not, are merged into one, as the model merges a stuff class's queries: the
   union of their masks, the largest score, the embeddings of the query with that score (the first on ties), and
   the smallest id of the merged segments; every other segment keeps its id, mask, area and box. Error rows pass
   through unchanged.

How this differs from labeling again with NEW: the masks and which queries became segments stay those of DEST's
vocabulary. Labeling again would drop and keep other queries (the object-mask threshold and the overlap rule run
on each query's top class and score, which depend on the vocabulary), so pixels would be split between queries
differently, and a query that lost its pixels to another under DEST's vocabulary cannot come back here. A segment's
class and score, given its query, are exactly the model's (up to the float16 rounding of the stored embeddings).
"""
from __future__ import annotations

import argparse
import functools
import io
import itertools
import json
import logging
import os
import shutil
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field

import fsspec
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import ray
import torch
from pycocotools import mask as mask_util

from fcclip.config import ConfigError
from fcclip.reclassify import EmbeddingSpace, reclassify
from fcclip.text import TextClassifier, build_text_classifier
from fcclip.vocabulary import Vocabulary, VocabularyError, load_vocabulary

from . import lake, runtime
from .arguments import COUNT, SCORE
from .label import DestinationError, reopen_run
from .progress import JobProgress
from .lake import TABLE_FILE_RE
from .stages import uncertainty_columns
from .output import (
    EMBEDDING_COLUMNS, META_DIR, PART_RE, SEGMENT, Destination, OutputError, add_version_argument, location_key,
    manifest_name, new_run_id, open_output, SOURCE_FIELDS, output_schema, part_name, part_schema, PartFile, write_part,
    weights_key,
)

logger = logging.getLogger("fcclip.relabel")

_SKIPPED_COLUMNS = ("vocabulary", "run_id", "margin", "branches_agree", "unlabeled_share", "uncertainty")  # DEST2's
BATCH_ROWS = 512


class RelabelError(ValueError):
    """DEST cannot be relabeled (the message is one line a user can act on)."""


@dataclass
class RelabelSummary:
    dest: str
    run_id: str
    images: int = 0
    ok: int = 0
    failed: int = 0
    segments_in: int = 0
    segments: int = 0
    dropped: int = 0  # void or below the thresholds under the new vocabulary
    merged: int = 0  # stuff segments merged into another of the same class
    changed: int = 0  # segments whose class changed (by name)
    skipped_shards: int = 0
    source_version: int | None = None  # the version of DEST's table that DEST2 now is relabeled
    followed_from: int | None = None  # the version DEST2 was of before, where this run followed DEST
    deleted: int = 0  # rows deleted from DEST since, removed from DEST2
    held: int = 0  # rows of DEST that DEST2 held already as they are (not relabeled again), where it followed DEST
    seconds: float = 0.0
    text_seconds: float = 0.0  # building the model and encoding the new vocabulary

    @property
    def segments_per_second(self) -> float:
        work = self.seconds - self.text_seconds
        return self.segments_in / work if work > 0 else 0.0


@dataclass
class Source:
    """A labeling output with embeddings, as relabel reads it."""

    dest: str
    files: list[str]  # part files (URLs), by shard
    shards: list[int]
    rows: list[int]
    space: dict  # EmbeddingSpace.to_dict()
    metadata: dict = field(default_factory=dict)  # fcclip.* file metadata (decoded JSON), one value each
    run: dict | None = None  # DEST's run.json


def open_source(dest: str, version: int | None = None) -> Source:
    """DEST's part files and metadata, checked: a complete labeling output with embeddings (footers only); the files
    of ``version`` of its table (default: the current one) when DEST is a table."""
    try:
        output = open_output(dest, version)
    except OutputError as e:
        empty = _empty_version(dest, version)
        if empty is None:
            raise RelabelError(str(e)) from None
        return empty
    missing = [c for c in EMBEDDING_COLUMNS if c not in output.columns]
    if missing or "embeddings" not in output.metadata:
        what = missing[0] if missing else "fcclip.embeddings metadata"
        raise RelabelError(f"{dest}: relabel needs a run labeled with --embeddings (no {what})")
    metadata = {}
    for key, values in output.metadata.items():
        if len(values) > 1:
            raise RelabelError(f"{dest}: its part files disagree on fcclip.{key}; point at the output of one run")
        metadata[key] = json.loads(next(iter(values)))
    shards, rows = [], []
    is_table = lake.has_table(Destination(dest))
    matches = [(TABLE_FILE_RE if is_table else PART_RE).search(path.rsplit("/", 1)[-1]) for path in output.files]
    # a table's files another program wrote (a compaction's, a DELETE's) are numbered after its shards, in name
    # order: the same numbers for the same version of DEST, which a resumed relabel reads (settings' source_version)
    after = itertools.count(max((int(m.group(1)) for m in matches if m), default=-1) + 1)
    for path, m in zip(output.files, matches):
        if not m and not is_table:
            raise RelabelError(f"{dest}: {path.rsplit('/', 1)[-1]} is not a part file's name")
        shards.append(int(m.group(1)) if m else next(after))
        with output.fs.open(path, "rb") as f:
            rows.append(pq.ParquetFile(f).metadata.num_rows)
    run = Destination(dest).read_run()
    if run is not None and not is_table:  # a table's version says which files are its rows
        expected = [i for i, n in enumerate(run.get("shard_sizes") or []) if n > 0]
        if sorted(shards) != expected:
            raise RelabelError(
                f"{dest}: its run is not complete ({len(shards)} of {len(expected)} shards committed); finish it "
                "first (run the same fcclip label command again)"
            )
    return Source(dest, output.urls, shards, rows, metadata["embeddings"], metadata, run)


def _empty_version(dest: str, version: int | None) -> Source | None:
    """A version of DEST's table without rows (every row deleted), with the metadata its files were added with
    (``_fcclip/table.json``); None where DEST is not such a table."""
    table = Destination(dest)
    try:
        if not lake.has_table(table) or lake.versioned_files(table, version)[1]:
            return None
    except Exception:  # a version the log does not have: open_output's message says so
        return None
    metadata = {k[len("fcclip."):]: json.loads(v) for k, v in lake.table_metadata(table).items()
                if k.startswith("fcclip.")}
    if "embeddings" not in metadata:
        return None
    return Source(dest, [], [], [], metadata["embeddings"], metadata, table.read_run())


# -------------------------------------------------------------------------------------------- the work of one file
@dataclass
class NewVocabulary:
    """What each task needs of NEW: plain arrays (shipped once through the object store)."""

    vocabulary: dict  # Vocabulary.to_dict()
    embeddings: np.ndarray  # (S, D) float32 text rows
    synonym_class: np.ndarray  # (S,) int64
    space: dict  # EmbeddingSpace.to_dict()

    @functools.cached_property
    def parsed(self):
        """(EmbeddingSpace, TextClassifier), built once per process that uses them."""
        vocabulary = Vocabulary.from_dict(self.vocabulary)
        seen = torch.zeros(len(vocabulary.categories), dtype=torch.bool)  # unused: reclassify applies the space's rule
        # copies: arrays that come through Ray's object store are read-only
        text = TextClassifier(vocabulary, torch.tensor(self.embeddings), torch.tensor(self.synonym_class), seen)
        return EmbeddingSpace.from_dict(self.space), text

    def text(self):
        return self.parsed[1]


def _vectors(column: pa.ChunkedArray | pa.Array, dim: int) -> np.ndarray:
    """(N, D) float16: the fixed-size vectors of a list<fixed_size_list<float16>> column, flattened over rows."""
    flat = pc.list_flatten(column)
    if isinstance(flat, pa.ChunkedArray):
        flat = flat.combine_chunks()
    values = flat.flatten().to_numpy(zero_copy_only=False)
    return values.reshape(-1, dim)


STATS = ("ok", "failed", "segments_in", "segments", "dropped", "merged", "changed")


def new_stats() -> dict[str, int]:
    """The counts relabel_batch adds to (RelabelSummary's fields of the same names)."""
    return dict.fromkeys(STATS, 0)


def relabel_batch(batch: pa.RecordBatch, new: NewVocabulary, min_score: float, constants: dict,
                  stats: dict) -> pa.Table:
    """One batch of DEST's rows -> the same rows under NEW (module docstring, step 3). ``stats`` is added to."""



    space, text = new.parsed
    vocabulary = text.vocabulary
    schema = output_schema(space.dim)
    table = pa.Table.from_batches([batch])
    lengths = pc.list_value_length(table.column("segments")).fill_null(0).to_numpy(zero_copy_only=False)
    emb_in = _vectors(table.column("embedding_in"), space.dim)
    emb_out = _vectors(table.column("embedding_out"), space.dim)
    valid = pc.list_flatten(table.column("embedding_valid")).to_numpy(zero_copy_only=False).astype(bool)
    if not (len(emb_in) == len(emb_out) == len(valid) == int(lengths.sum())):
        raise ValueError("the embedding columns are not parallel to segments")
    result = reclassify(emb_in, emb_out, valid, text, space)
    segments = table.column("segments").to_pylist()
    is_thing = vocabulary.thing_mask

    new_segments, take, offsets = [], [], [0]
    flat = 0
    for row in segments:
        kept: list[dict] = []
        stuff: dict[int, dict] = {}
        for s in row or []:
            k = flat
            flat += 1
            stats["segments_in"] += 1
            c, score = int(result.classes[k]), float(result.scores[k])
            if not result.kept[k] or score < min_score:
                stats["dropped"] += 1
                continue
            entry = {**s, "label": vocabulary.labels[c], "category_id": int(vocabulary.ids[c]),
                     "is_thing": bool(is_thing[c]), "score": score, "_source": k, "_rles": None}
            if entry["label"] != s["label"]:
                stats["changed"] += 1
            if not entry["is_thing"] and c in stuff:
                merged = stuff[c]
                stats["merged"] += 1
                merged["_rles"] = (merged["_rles"] or [merged["rle"]]) + [s["rle"]]
                merged["id"] = min(merged["id"], s["id"])
                if score > merged["score"]:
                    merged["score"], merged["_source"] = score, k
                continue
            if not entry["is_thing"]:
                stuff[c] = entry
            kept.append(entry)
        for entry in kept:
            if entry["_rles"]:
                rles = [{"size": list(r["size"]), "counts": r["counts"].encode("ascii")} for r in entry["_rles"]]
                union = mask_util.merge(rles, intersect=False)
                entry["rle"] = {"size": list(union["size"]), "counts": union["counts"].decode("ascii")}
                entry["area"] = int(mask_util.area(union))
                entry["bbox"] = [float(v) for v in mask_util.toBbox(union)]
            take.append(entry.pop("_source"))
            entry.pop("_rles")
        new_segments.extend(kept)
        offsets.append(len(new_segments))
        stats["segments"] += len(kept)

    offsets_array = pa.array(offsets, pa.int32())
    index = pa.array(take, pa.int64())
    columns = {name: table.column(name) for name in table.column_names}
    columns["segments"] = pa.ListArray.from_arrays(offsets_array, pa.array(new_segments, SEGMENT))
    for name in ("query_index", "embedding_in", "embedding_out", "embedding_valid"):
        values = pc.list_flatten(table.column(name))
        values = values.combine_chunks() if isinstance(values, pa.ChunkedArray) else values
        target = schema.field(name).type  # a file another program rewrote holds the types of the table's schema
        values = values.cast(target.value_type)  # (float for float16, a list for a fixed-size list)
        columns[name] = pa.ListArray.from_arrays(offsets_array, values.take(index), type=target)
    n = table.num_rows
    columns.update(_uncertainty(result, take, offsets, new_segments, table, space.alpha > 0 or space.beta > 0))
    columns["vocabulary"] = pa.array([constants["vocabulary"]] * n, pa.string())
    columns["run_id"] = pa.array([constants["run_id"]] * n, pa.string())
    status = table.column("status").to_pylist()
    stats["ok"] += status.count("ok")
    stats["failed"] += n - status.count("ok")
    return pa.Table.from_arrays([columns[f.name] for f in schema], schema=schema)


def with_source(table: pa.Table, batch: pa.RecordBatch) -> pa.Table:
    """A relabeled batch with its rows' SOURCE_COLUMNS carried over (one row out per row in, in order)."""
    for fld in SOURCE_FIELDS:
        index = batch.schema.get_field_index(fld.name)
        column = batch.column(index).cast(fld.type) if index >= 0 else pa.nulls(len(batch), fld.type)
        table = table.append_column(fld, column)
    return table
def _uncertainty(result, take: list[int], offsets: list[int], segments: list[dict], table: pa.Table,
                 use_agreement: bool) -> dict:
    """output.UNCERTAINTY_COLUMNS under NEW: each kept segment's margin and agreement from its query's ensemble under
    NEW, the unlabeled share from the kept segments' areas (dropped segments' pixels become unlabeled)."""
    from fcclip.uncertainty import query_signals, segment_doubt

    ens = result.classification.ensemble
    margin, agree = query_signals(ens.probs, ens.in_vocab_probs, ens.out_vocab_probs)
    margin = margin.numpy()[take].astype(np.float32).tolist() if take else []
    agree = agree.numpy()[take].astype(bool).tolist() if take else []
    mask = {}  # the masks do not change: each kept segment keeps its source segment's mask signals (null if none)
    counts = [len(row or []) for row in table.column("segments").to_pylist()]
    for name in ("mask_score", "kept_share"):
        lists = table.column(name).to_pylist() if name in table.column_names else [None] * table.num_rows
        values = [v for row, n in zip(lists, counts) for v in (row if row is not None and len(row) == n else [None] * n)]
        mask[name] = [values[k] for k in take]
    doubts = [segment_doubt(m, a, ms, ks, use_agreement)
              for m, a, ms, ks in zip(margin, agree, mask["mask_score"], mask["kept_share"])]
    return uncertainty_columns(
        offsets, table.column("status").to_pylist(), table.column("width").to_pylist(),
        table.column("height").to_pylist(), [s["area"] for s in segments], margins=margin, agree=agree,
        mask_scores=mask["mask_score"], kept=mask["kept_share"], doubts=doubts)


def relabel_file(url: str, dest_uri: str, shard: int, new: NewVocabulary, min_score: float, constants: dict,
                 file_metadata: dict, rows_only: bool = False) -> dict:
    """Relabel one part file of DEST into DEST2's part file ``shard``; returns the counts. ``rows_only``: only the
    rows of the URIs in the shard's manifest (a follow's)."""
    stats = new_stats()
    dest = Destination(dest_uri)
    wanted = None
    if rows_only:
        manifest = pq.read_table(io.BytesIO(dest.read_bytes(f"{META_DIR}/manifest/{manifest_name(shard)}")))
        wanted = manifest.column("uri").combine_chunks().cast(pa.string())
    fs, path = fsspec.core.url_to_fs(url)
    with fs.open(path, "rb") as f:
        parquet = PartFile(f)
        columns = [c for c in parquet.schema_arrow.names if c not in _SKIPPED_COLUMNS]
        tables = []
        for batch in parquet.iter_batches(batch_size=BATCH_ROWS, columns=columns):
            if wanted is not None:
                batch = batch.filter(pc.is_in(batch.column("uri"), value_set=wanted))
                if not batch.num_rows:
                    continue
            tables.append(with_source(relabel_batch(batch, new, min_score, constants, stats), batch))
    dim = new.embeddings.shape[1]
    table = pa.concat_tables(tables) if tables else part_schema(dim).empty_table()
    write_part(dest, shard, table, file_metadata)
    return stats


# ---------------------------------------------------------------------------------------------------- the job
def _text_classifier(source: Source, vocabulary, model: str | None, weights: str | None) -> NewVocabulary:
    """NEW's text rows from the run's model's text tower (``embed_text.text_tower``: the image tower never runs)."""
    from .embed_text import text_tower  # the driver's: the tasks import this module, and need no model stack

    space = EmbeddingSpace.from_dict(source.space)
    backbone = text_tower(model or source.metadata.get("model"), weights or source.metadata.get("weights"),
                          expect_text_tower=space.text_tower)
    text = build_text_classifier(backbone, vocabulary, train_vocabulary=space.train_vocabulary)
    return NewVocabulary(vocabulary.to_dict(), text.embeddings.float().cpu().numpy(),
                         text.synonym_class.cpu().numpy(), source.space)


def run_relabel(source_dest: str, vocab: str, out: str, *, min_score: float | None = None, model: str | None = None,
                weights: str | None = None, address: str | None = None, num_cpus: int | None = None,
                overwrite: bool = False, verbose: bool = False, version: int | None = None,
                progress: bool = True) -> RelabelSummary:
    """Run (or resume) a relabel job; returns its summary (module docstring). ``version``: of DEST's table (default:
    the current one). DEST2 is a Delta table as a labeling output is: one version per part file written. ``progress``:
    a progress line on a terminal (log lines about once a minute either way)."""
    with lake.WriterLock(Destination(out)):
        return _run_relabel(source_dest, vocab, out, min_score=min_score, model=model, weights=weights,
                            address=address, num_cpus=num_cpus, overwrite=overwrite, verbose=verbose, version=version,
                            progress=progress)


def _run_relabel(source_dest: str, vocab: str, out: str, *, min_score, model, weights, address, num_cpus, overwrite,
                 verbose, version, progress) -> RelabelSummary:
    started = time.time()
    vocabulary = load_vocabulary(vocab)
    dest = Destination(out)
    if dest.uri.rstrip("/") == Destination(source_dest).uri.rstrip("/"):
        raise RelabelError("--out must be another folder than DEST")
    problem = dest.placement_problem()
    if problem:
        raise RelabelError(f"--out: {problem}; nothing was read or written")
    source_table = Destination(source_dest)
    is_table = lake.has_table(source_table)
    target = version if version is not None or not is_table else lake.table_version(source_table)
    opened: dict = {}  # version -> Source: each version of DEST read once (a footer per file)

    def source_at(v: int | None) -> Source:
        if v not in opened:
            opened[v] = open_source(source_dest, v)
        return opened[v]

    source = source_at(target)
    thresholds = dict(source.metadata.get("thresholds") or {})
    min_score = float(thresholds.get("min_score", 0.0) if min_score is None else min_score)
    source_run = source.metadata.get("run_id")
    settings = {
        "kind": "relabel", "source": location_key(source_dest), "source_run": source_run,
        "vocabulary_digest": vocabulary.digest,
        "min_score": min_score, "model": model or source.metadata.get("model"),
        "weights": weights or source.metadata.get("weights"),
    }
    _settings_version_to_increment(dest)
    run = reopen_run(dest, settings, overwrite)
    if run is None:
        sizes = [0] * (max(source.shards) + 1 if source.shards else 0)
        for shard, n in zip(source.shards, source.rows):
            sizes[shard] = n
        run = {
            "run_id": new_run_id(), "settings": settings, "created": time.time(), "manifest_complete": True,
            "vocabulary": vocabulary.to_dict(), "thresholds": {**thresholds, "min_score": min_score},
            "num_images": sum(source.rows), "shard_sizes": sizes, "embeddings": source.space,
            "source_run": {"run_id": source_run, "dest": source_dest,
                           "vocabulary": (source.run or {}).get("vocabulary") or source.metadata.get("vocabulary")},
            "increments": [{"first_shard": 0, "source_version": target, "mirror": _mirror(source)}],
        }
        dest.write_run(run)
    summary = RelabelSummary(dest=out, run_id=run["run_id"])
    if not lake.has_table(dest):  # written before DEST2 was a table, or killed before its first version
        lake.adopt_parts(dest, run, dest.survey().parts)

    job = _Job(dest, run, source_at, vocabulary, summary, model=model, weights=weights, min_score=min_score,
               address=address, num_cpus=num_cpus, verbose=verbose,
               progress=JobProgress(progress, verb="relabeled", activity="relabeling", log=logger))
    try:
        job.finish_increment()  # the latest increment, as planned (a run cut short goes on at its version of DEST)
        increment = lake.latest_increment(run)
        if is_table and increment.get("source_version", target) != target:  # DEST moved on: DEST2 follows it
            summary.followed_from = increment.get("source_version")
            summary.skipped_shards = 0  # the shards of the version followed from are not this run's to skip
            _plan_follow(dest, run, source_at, target)
            job.finish_increment()
    finally:
        job.close()
    if is_table:
        summary.source_version = target
    summary.images = summary.ok + summary.failed
    summary.seconds = time.time() - started
    return summary


def _mirror(source: Source) -> dict[str, int]:
    """{DEST's file name: the DEST2 shard relabeled from it} for the files of a version of DEST."""
    return {url.rsplit("/", 1)[-1]: shard for url, shard in zip(source.files, source.shards)}


def _settings_version_to_increment(dest: Destination) -> None:
    """A DEST2 relabeled before it followed DEST recorded DEST's version in its settings (a later version was another
    run); it is now its increment's, so that the same command follows DEST from there."""
    run = dest.read_run()
    if run and run.get("settings", {}).get("kind") == "relabel" and "source_version" in run["settings"]:
        increments = run.get("increments") or [{"first_shard": 0, "new": run.get("num_images", 0)}]
        increments[-1] = {**increments[-1], "source_version": run["settings"].pop("source_version")}
        run["increments"] = increments
        dest.write_run(run)


def _model(settings: dict) -> str:
    """The model as a version's commit info names it, as fcclip label's do: NAME@WEIGHTS (the weights as given)."""
    weights = settings.get("weights")
    return f"{settings['model']}@{weights}" if weights else str(settings["model"])


class _Job:
    """Relabels the pending shards of DEST2's latest increment: one Ray task per DEST file, each shard committed as
    it completes (a follow's shards by lake.ShardCommitter, which removes the rows they replace)."""

    def __init__(self, dest: Destination, run: dict, source_at, vocabulary, summary: RelabelSummary, *,
                 model, weights, min_score: float, address, num_cpus, verbose, progress: JobProgress):
        self.dest, self.run, self.source_at, self.summary = dest, run, source_at, summary
        self.vocabulary = vocabulary
        self.model, self.weights, self.min_score = model, weights, min_score
        self.address, self.num_cpus, self.verbose = address, num_cpus, verbose
        self.progress = progress
        self.new = None  # NEW's text classifier, made once (the model's text tower) when a shard is to be relabeled
        self.started_ray = None

    def finish_increment(self) -> None:
        dest, run, summary = self.dest, self.run, self.summary
        increment = lake.latest_increment(run)
        if increment.get("complete"):  # seen so by an earlier run (its log may be cleaned up since)
            summary.skipped_shards += sum(1 for n in run["shard_sizes"][increment["first_shard"]:] if n > 0)
            return
        source = self.source_at(increment.get("source_version"))
        first = increment["first_shard"]
        done = lake.committed_shards(dest, run)
        rows_only = "plan" in increment  # a follow's: the rows of each file that DEST2 does not hold (_plan_follow)
        by_name = increment["plan"] if rows_only else increment.get("mirror") or _mirror(source)
        names = {url: url.rsplit("/", 1)[-1] for url in source.files}
        shards = {url: by_name[name] for url, name in names.items() if name in by_name}
        mine = [(url, shard) for url, shard in shards.items() if shard >= first]
        pending = [(url, shard) for url, shard in mine if shard not in done]
        empty = increment.get("drop_shard")  # planned by the release before: an empty part file's version
        if empty is not None and empty not in done:
            pending.append((None, empty))
        skipped = len(mine) - len(pending) + (empty is not None and empty in done)
        summary.skipped_shards += skipped
        if "delete_shard" in increment and "removed" not in increment:  # rows of URIs DEST no longer holds
            increment["removed"] = lake.remove_listed(dest, lake.gone_manifest(first), increment["delete_shard"], {
                "run_id": run["run_id"], "operation": "follow-delete", "model": _model(run["settings"])})
            dest.write_run(run)
        summary.deleted += increment.get("deleted", 0)  # (a follow's increments only)
        summary.held += increment.get("held", 0)
        if pending:
            sizes = run["shard_sizes"]
            self.progress.labeling_started(sum(sizes[shard] for _, shard in pending), len(pending), skipped)
            self._relabel(source, pending, following=first > 0, rows_only=rows_only)
        lake.mark_complete(dest, run)
        dest.remove_fragments()

    def _relabel(self, source: Source, pending: list, following: bool, rows_only: bool) -> None:
        dest, run, summary = self.dest, self.run, self.summary
        if self.new is None:
            t = time.time()
            self.new = _text_classifier(source, self.vocabulary, self.model, self.weights)
            summary.text_seconds += time.time() - t
        file_metadata = {
            "run_id": run["run_id"], "vocabulary": run["vocabulary"], "thresholds": run["thresholds"],
            "model": source.metadata.get("model"), "weights": source.metadata.get("weights"),
            "embeddings": source.space, "source_run": run["source_run"],
        }
        constants = {"vocabulary": f"{self.vocabulary.name}@{self.vocabulary.digest[:16]}", "run_id": run["run_id"]}
        info = {"run_id": run["run_id"], "model": _model(run["settings"]),
                "vocabulary_digest": self.vocabulary.digest, "source_run": run["settings"]["source_run"]}
        if self.started_ray is None:
            self.started_ray = runtime.init_ray(self.address, self.num_cpus, self.verbose)
        committer = lake.ShardCommitter(dest, info) if following else None
        new_ref = ray.put(self.new)
        task = ray.remote(relabel_file).options(num_cpus=1, max_retries=runtime.RETRIES)
        refs = {task.remote(url, dest.uri, shard, new_ref, self.min_score, constants, file_metadata, rows_only): shard
                for url, shard in pending if url is not None}
        for url, shard in pending:
            if url is None:  # an empty shard written when the follow was planned: its version removes deleted rows
                committer(shard)
        while refs:
            ready, _ = ray.wait(list(refs), num_returns=1)
            for ref in ready:
                shard = refs.pop(ref)
                stats = ray.get(ref)
                if committer is not None:  # its version also removes the rows it replaces (lake.ShardCommitter)
                    committer(shard)
                else:
                    lake.commit_version(dest, [part_name(shard)], info={**info, "shard": shard})
                for key, value in stats.items():
                    setattr(summary, key, getattr(summary, key) + value)
                self.progress.labeled(stats["ok"], stats["failed"])
                self.progress.committed()
        if committer is not None:
            committer.flush()

    def close(self) -> None:
        self.progress.close()
        if self.started_ray is not None:
            runtime.shutdown_ray(self.started_ray)


def _plan_follow(dest: Destination, run: dict, source_at, target: int | None) -> None:
    """The next increment of DEST2, to follow DEST from the version its latest increment relabeled to ``target``,
    row by row: a row of DEST's version ``target`` whose image (its URI and object version), status and error DEST2
    holds is left as DEST2 has it; the others (new, changed, labeled again) are relabeled, the rows of each file of
    DEST holding any becoming one shard of DEST2 (only those rows), committed in a version that also removes the
    rows of their URIs DEST2 held (their manifest's ``replaces``, as a labeling increment's); the rows of URIs DEST
    no longer holds (a DELETE, ``fcclip label --prune``) are removed in a version of their own, as ``--prune``
    removes them (:func:`lake.remove_listed`). So a compaction of DEST, or its rewrite of a file around one changed
    row, relabels nothing it holds already. DEST's and DEST2's rows are compared by DuckDB, which spills to a
    temporary folder: the driver holds one file's URIs of DEST at a time. Manifests first, then run.json: a run killed
    in between plans again."""
    after = source_at(target)
    if after.space != run["embeddings"]:
        raise RelabelError(f"{after.dest}'s version {target} holds another run's embeddings than the version DEST2 "
                           "relabeled; relabel it into a new --out, or with --overwrite")
    increment = lake.latest_increment(run)
    first = len(run["shard_sizes"])
    logger.info("comparing the rows of DEST's version %s with DEST2's", target)  # minutes on a large lake in S3
    work = tempfile.mkdtemp(prefix="fcclip-follow-")
    try:
        counts = _diff_tables(Destination(after.dest), [url.rsplit("/", 1)[-1] for url in after.files], dest,
                              lake.table_files(dest) if lake.has_table(dest) else [], work)
        plan, sizes = _write_manifests(dest, f"{work}/todo.parquet", first)
        removal = {}
        if counts["deleted"]:
            removal = {"delete_shard": first + len(plan)}
            sizes.append(0)  # a shard of no rows: its number names the files the removal rewrites
            with open(f"{work}/deleted.parquet", "rb") as f:
                dest.write_bytes(lake.gone_manifest(first), f.read())
    finally:
        shutil.rmtree(work, ignore_errors=True)
    for old in run.get("increments") or []:
        old.pop("mirror", None)  # a follow compares rows: what DEST2 holds says what it is of DEST
    run["shard_sizes"] = run["shard_sizes"] + sizes
    run["increments"] = (run.get("increments") or []) + [{
        "first_shard": first, "source_version": target, "table_version": lake.table_version(dest), "plan": plan,
        "relabel": counts["relabel"], "held": counts["held"], "deleted": counts["deleted"], **removal}]
    dest.write_run(run)
    logger.info("DEST2 follows DEST from version %s to %s: %d row(s) of DEST to relabel (in %d file(s)), %d held "
                "already, %d not in DEST's version %s to remove", increment.get("source_version"), target,
                counts["relabel"], len(plan), counts["held"], counts["deleted"], target)


def _write_manifests(dest: Destination, todo: str, first: int) -> tuple[dict[str, int], list[int]]:
    """DEST2's manifests ``first``, ``first + 1``, ...: one per file of DEST in ``todo`` (``file, uri, replaces``,
    ordered by file), read a batch at a time. Returns ({DEST's file: its shard}, the shards' sizes)."""
    plan: dict[str, int] = {}
    sizes: list[int] = []

    def write(name: str, batches: list) -> None:
        manifest = pa.Table.from_batches(batches).select(["uri", "replaces"])
        buf = io.BytesIO()
        pq.write_table(manifest, buf)
        plan[name] = first + len(plan)
        dest.write_bytes(f"{META_DIR}/manifest/{manifest_name(plan[name])}", buf.getvalue())
        sizes.append(manifest.num_rows)

    name, batches = None, []
    for batch in pq.ParquetFile(todo).iter_batches(batch_size=65536):
        files = batch.column("file")
        for start, end in _runs(files):
            if files[start].as_py() != name:
                if batches:
                    write(name, batches)
                name, batches = files[start].as_py(), []
            batches.append(batch.slice(start, end - start))
    if batches:
        write(name, batches)
    return plan, sizes


def _runs(column: pa.Array) -> list[tuple[int, int]]:
    """[(start, end)] of the runs of equal values of a column (a sorted one's groups)."""
    n = len(column)
    if n == 0:
        return []
    changes = pc.not_equal(column.slice(1), column.slice(0, n - 1)).to_numpy(zero_copy_only=False)
    starts = [0] + [int(i) + 1 for i in np.flatnonzero(changes)]
    return list(zip(starts, starts[1:] + [n]))


def _diff_tables(source: Destination, names: list[str], dest: Destination, dest_names: list[str], work: str,
                 memory_limit: str | None = None) -> dict[str, int]:
    """Compare the rows of DEST's files ``names`` (a version of DEST) with DEST2's files ``dest_names`` (its current
    version), by :data:`lake.ROW_KEYS`: ``work/todo.parquet`` gets DEST's rows that DEST2 does not hold as they are
    (``file`` of DEST, ``uri``, ``replaces``: the file of DEST2 holding the URI's row, if any), ordered by file;
    ``deleted.parquet`` DEST2's rows of URIs DEST does not hold (``uri, replaces``). Returns ``{"relabel", "held",
    "deleted"}``. ``memory_limit``: DuckDB's (default: its own, 80% of RAM; past it, it spills to ``work``)."""
    import duckdb

    con = duckdb.connect()
    os.makedirs(f"{work}/spill", exist_ok=True)
    con.execute(f"SET temp_directory = '{work}/spill'")
    if memory_limit:
        con.execute(f"SET memory_limit = '{memory_limit}'")
    con.execute("SET preserve_insertion_order = false")
    keys = list(lake.ROW_KEYS)
    con.execute(f"CREATE TEMP VIEW a AS {lake.table_scan(con, source, names, keys, fill_missing=True)}")
    con.execute(f"CREATE TEMP VIEW b AS {lake.table_scan(con, dest, dest_names, keys, fill_missing=True)}")
    differs = " OR ".join(f"a.{k} IS DISTINCT FROM b.{k}" for k in keys[1:])
    con.execute(f"""CREATE TEMP TABLE todo AS
        SELECT a.file, a.uri, CASE WHEN b.uri IS NULL THEN NULL ELSE b.file END AS replaces
        FROM a LEFT JOIN b ON a.uri = b.uri WHERE b.uri IS NULL OR {differs}""")
    con.execute(f"COPY (SELECT file, uri, replaces FROM todo ORDER BY file, uri) TO '{work}/todo.parquet' "
                "(FORMAT parquet, COMPRESSION zstd)")
    con.execute(f"""COPY (SELECT b.uri, b.file AS replaces FROM b LEFT JOIN a ON a.uri = b.uri WHERE a.uri IS NULL
                          ORDER BY b.file, b.uri) TO '{work}/deleted.parquet' (FORMAT parquet, COMPRESSION zstd)""")
    relabel = int(con.execute("SELECT count(*) FROM todo").fetchall()[0][0])
    rows = int(con.execute("SELECT count(*) FROM a").fetchall()[0][0])
    deleted = int(con.execute(f"SELECT count(*) FROM read_parquet('{work}/deleted.parquet')").fetchall()[0][0])
    con.close()
    return {"relabel": relabel, "held": rows - relabel, "deleted": deleted}


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("dest", metavar="DEST", help="a labeling output made with fcclip label --embeddings")
    add_version_argument(p)
    p.add_argument("--vocab", required=True, help="the new vocabulary (as fcclip label's --vocab)")
    p.add_argument("--out", required=True, metavar="DEST2", help="output folder or object-store prefix")
    p.add_argument("--min-score", type=SCORE, default=None, help="drop segments scoring below this (default: DEST's)")
    p.add_argument("--model", default=None, help="default: DEST's model")
    p.add_argument("--weights", default=None, help="default: DEST's weights")
    p.add_argument("--address", default=None, help="Ray cluster address (default: $RAY_ADDRESS, else a local Ray)")
    p.add_argument("--num-cpus", type=COUNT, default=None, help="CPUs of the local Ray (default: all)")
    p.add_argument("--overwrite", action="store_true", help="replace an earlier run in DEST2 with other settings")
    p.add_argument("--summary-json", default=None, help="also write the summary as JSON")
    p.add_argument("--no-progress", action="store_true", help="no progress line (log lines only)")


def _gone_from(s: RelabelSummary) -> str:
    """What DEST2's removed rows were, for the summary: deleted from DEST since, or (a follow back to an older
    ``--version``) rows that version of DEST does not hold yet."""
    if s.followed_from is not None and s.source_version is not None and s.source_version < s.followed_from:
        return f"not in DEST's version {s.source_version}"
    return "deleted from DEST"


def main_args(args: argparse.Namespace) -> int:
    from .embed_text import TextTowerMismatch

    try:
        s = run_relabel(args.dest, args.vocab, args.out, min_score=args.min_score, model=args.model,
                        weights=args.weights and weights_key(args.weights), address=args.address, num_cpus=args.num_cpus, overwrite=args.overwrite,
                        verbose=getattr(args, "verbose", False), version=args.version,
                        progress=not args.no_progress)
    except (lake.DestinationBusy, RelabelError, TextTowerMismatch, ConfigError, VocabularyError, DestinationError,
            FileNotFoundError) as e:
        print(f"fcclip relabel: error: {e}", file=sys.stderr)
        return 2
    print(f"relabeled {s.images} image(s) ({s.ok} ok, {s.failed} error rows passed through) in {s.seconds:.1f} s "
          f"({s.text_seconds:.1f} s of it for the model's text tower): {s.segments_in} segments in, {s.segments} out, "
          f"{s.changed} changed class, {s.merged} merged, {s.dropped} dropped; {s.segments_per_second:.3g} segments/s")
    if s.followed_from is not None:
        print(f"followed DEST from its version {s.followed_from} to {s.source_version}: {s.images} row(s) new or "
              f"changed in DEST relabeled, {s.held} held as they are"
              + (f", {s.deleted} row(s) {_gone_from(s)} removed" if s.deleted else ""))
    if s.skipped_shards:
        print(f"{s.skipped_shards} shard(s) were already committed by an earlier run and were skipped")
    what = "a Delta table" if lake.has_table(Destination(s.dest)) else "no table yet: DEST has no rows"
    print(f"output: {s.dest.rstrip('/')} ({what}; run {s.run_id})")
    if args.summary_json:
        with open(args.summary_json, "w") as f:
            json.dump({**asdict(s), "segments_per_second": s.segments_per_second}, f, indent=1)
    return 0
