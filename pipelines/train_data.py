"""What ``fcclip train --data`` (and ``--mix``) reads: a COCO panoptic tree, or a labeling output streamed through
Ray Data.

`open_training_data` looks at ``--data`` and says which it is (`TrainingData`): a COCO panoptic layout (it has
``annotations/panoptic_{split}.json``) or a labeling output (``*.parquet`` part files with fcclip's columns and
``fcclip.vocabulary`` metadata, see `fcclip_pipelines.output`). Anything else is refused with one line naming both.

``--mix KIND=URI:SHARE`` (`parse_mix`) adds a second source of the other kind: ``--data DEST --mix coco=ROOT:0.5``
or ``--data ROOT --mix labels=DEST:0.3``. SHARE is the share of training samples drawn from it, the ``--data``
source has the rest. `open_training_sources` opens both and maps them into one training vocabulary
(`fcclip.training.mix.union_vocabulary`: the ``--data`` source's classes first, classes matched by name); each
source's `TrainingData.class_index` then maps its category ids to the union's class indices. The pseudo-label
options (``--min-score``, ``--class-map``, ``--keep``, ``--drop``) apply to the labeling output, whichever flag
names it. Each source is read as it is alone (a COCO tree by the training workers' loader processes, a labeling
output through Ray Data); each worker draws from the two by share (`fcclip.training.mix.MixedSamples`).

A labeling output is never listed row by row, by the driver or by a worker. `label_dataset` builds a Ray Data
pipeline that Ray Train splits across its workers (``ray.train.get_dataset_shard("labels")``):

    the part files, in a seeded random order (`label_dataset`)
      -> `read_samples` on CPU tasks: a part file read a few rows at a time, only the columns uri, status,
         segments and the source columns, only the rows with status "ok"; then `DecodeSamples`: image read from its
         URI, checked to be the object labeled (`read_labeled_image`) and decoded, masks decoded from the RLEs,
         classes mapped and low-score segments made ignore regions
         (`fcclip.datasets.labels`), large-scale jitter (`fcclip.training.data.train_sample`), packed into
         fixed-shape arrays (`pack_sample`)
      -> each worker's shard (Ray Train's streaming split), batched, shuffled in a local buffer, prefetched,
         unpacked (`stream_samples`), collated (`stream_batches`)

Each pass over the rows is one epoch; `stream_samples` starts the next one when a pass ends, so a training run of
any length reads the output as many times as it needs, and the augmentation draws new crops each time.
"""
from __future__ import annotations

import dataclasses
import logging
import math
import os
from collections.abc import Iterator
from dataclasses import dataclass
from typing import NamedTuple

import fsspec
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import ray.data

from fcclip.datasets.coco_panoptic import CocoPanoptic, join_uri
from fcclip.datasets.labels import LabelSelection, TrainingClasses, row_targets, training_classes
from fcclip.training.data import collate_batches, pack_sample, train_sample, unpack_sample
from fcclip.training.mix import union_vocabulary
from fcclip.vocabulary import Vocabulary
from fcclip_pipelines.output import LabelingOutput, OutputError, PartFile, open_output, read_labeled_image

logger = logging.getLogger("fcclip.train")

__all__ = [
    "DecodeSamples",
    "MixSpec",
    "TrainingData",
    "TrainingSources",
    "label_dataset",
    "open_training_data",
    "open_training_sources",
    "parse_mix",
    "read_samples",
    "stream_batches",
    "stream_samples",
]

KINDS = {"coco": "COCO panoptic tree", "labels": "labeling output"}  # --data and --mix kinds, as messages name them

_COLUMNS = ["uri", "status", "segments"]
_VERSION_COLUMNS = ["source_etag", "source_size", "source_mtime"]  # where a part file has them: read_labeled_image


@dataclass
class TrainingData:
    """One training source as training sees it.

    kind: ``"coco"`` or ``"labels"``; vocabulary: the source's own training vocabulary (a labeling run's after the
    selection); class_index: the source's category id -> training class index (into ``vocabulary``, or into the
    union vocabulary once `open_training_sources` has mixed it); output: the labeling output (labels only);
    share: the share of training samples drawn from this source.
    """

    uri: str
    kind: str
    vocabulary: Vocabulary
    class_index: dict[int, int]
    output: LabelingOutput | None = None
    share: float = 1.0


class TrainingSources(NamedTuple):
    """vocabulary: the training vocabulary; sources: the ``--data`` source, then the ``--mix`` one if any."""

    vocabulary: Vocabulary
    sources: list[TrainingData]


@dataclass(frozen=True)
class MixSpec:
    """``--mix KIND=URI:SHARE``: a source of `kind` at `uri`, `share` of the training samples."""

    kind: str
    uri: str
    share: float


def parse_mix(spec: str) -> MixSpec:
    """``"coco=ROOT:0.5"`` -> ``MixSpec("coco", "ROOT", 0.5)``. URI may hold colons (``s3://...``): the share is
    what follows the last one.

    Raises:
        ValueError: not KIND=URI:SHARE, an unknown kind, an empty URI, or a share outside (0, 1).
    """
    kind, sep, rest = spec.partition("=")
    uri, colon, share_text = rest.rpartition(":")
    if not sep or not colon:
        raise ValueError(f"--mix {spec!r}: expected KIND=URI:SHARE, e.g. coco=data/coco:0.5")
    if kind not in KINDS:
        raise ValueError(f"--mix {spec!r}: unknown source kind {kind!r} (one of {', '.join(KINDS)})")
    if not uri:
        raise ValueError(f"--mix {spec!r}: no URI before the share")
    try:
        share = float(share_text)
    except ValueError:
        raise ValueError(f"--mix {spec!r}: the share {share_text!r} is not a number") from None
    if not 0 < share < 1:
        raise ValueError(f"--mix {spec!r}: the share must be between 0 and 1 (exclusive), got {share_text}")
    return MixSpec(kind, uri, share)


def open_training_data(uri: str, *, split: str, synonyms: str | None,
                       selection: LabelSelection = LabelSelection(), version: int | None = None) -> TrainingData:
    """Detect and open ``--data`` (reads the COCO JSON, or only the part files' footers; of ``version`` of a labeling
    output's table, default the current one).

    Raises:
        ValueError: ``uri`` is neither (the message says what was looked for), or the selection names unknown
            classes; class-map options given for COCO data.
    """
    coco_json = join_uri(uri, "annotations", f"panoptic_{split}.json")
    fs, path = fsspec.core.url_to_fs(coco_json)
    if fs.exists(path):
        if selection != LabelSelection():
            raise ValueError(f"{uri} is a COCO panoptic tree: --min-score, --class-map, --keep and --drop apply "
                             "to labeling outputs only")
        vocabulary = CocoPanoptic(uri, split).vocabulary(synonyms=synonyms)
        return TrainingData(uri, "coco", vocabulary, {c.id: k for k, c in enumerate(vocabulary.categories)})
    try:
        output = open_output(uri, version)
    except OutputError as e:
        raise ValueError(f"{uri} is neither a COCO panoptic tree (no {coco_json}) nor a labeling output ({e})"
                         ) from None
    classes: TrainingClasses = training_classes(output.vocabulary, selection)
    return TrainingData(uri, "labels", classes.vocabulary, classes.class_index, output=output)


def open_training_sources(uri: str, mix: MixSpec | None = None, *, split: str, synonyms: str | None,
                          selection: LabelSelection = LabelSelection(), version: int | None = None) -> TrainingSources:
    """Open ``--data`` and the ``--mix`` source (module docstring); without `mix`, ``--data`` alone. ``version``: of
    the labeling output's table (default: the current one).

    Raises:
        ValueError: as `open_training_data`; the mix source is not of its stated kind, or of the same kind as
            ``--data``; the vocabularies cannot be joined (`union_vocabulary`).
    """
    if mix is None:
        data = open_training_data(uri, split=split, synonyms=synonyms, selection=selection, version=version)
        return TrainingSources(data.vocabulary, [data])
    # the pseudo-label options go to whichever source is the labeling output
    first = open_training_data(uri, split=split, synonyms=synonyms,
                               selection=selection if mix.kind == "coco" else LabelSelection(),
                               version=version if mix.kind == "coco" else None)
    if first.kind == mix.kind:
        raise ValueError(f"--mix {mix.kind}=...: --data {uri} is a {KINDS[first.kind]} too; mix a COCO "
                         "panoptic tree with a labeling output")
    try:
        second = open_training_data(mix.uri, split=split, synonyms=synonyms,
                                    selection=selection if mix.kind == "labels" else LabelSelection(),
                                    version=version if mix.kind == "labels" else None)
    except ValueError as e:
        raise ValueError(f"--mix {mix.kind}={mix.uri}: {e}") from None
    if second.kind != mix.kind:
        raise ValueError(f"--mix {mix.kind}={mix.uri}: not a {KINDS[mix.kind]} (it is a "
                         f"{KINDS[second.kind]})")
    union = union_vocabulary([first.vocabulary, second.vocabulary],
                             name=f"{first.vocabulary.name}+{second.vocabulary.name}")
    sources = [
        dataclasses.replace(data, share=share,
                            class_index={cid: index[k] for cid, k in data.class_index.items()})
        for data, share, index in zip((first, second), (1 - mix.share, mix.share), union.index)
    ]
    return TrainingSources(union.vocabulary, sources)


class DecodeSamples:
    """Ray Data stage: a batch of output rows (pyarrow) -> packed, augmented training samples (numpy).

    A row whose image cannot be read, was replaced since it was labeled (`read_labeled_image`), or whose masks do
    not fit it, is skipped with a warning (the labeling run read it once; it may have moved or changed since):
    training goes on.
    """

    def __init__(self, class_index: dict[int, int], min_score: float, lsj: dict, seed: int):
        self.class_index = {int(k): int(v) for k, v in class_index.items()}
        self.min_score = float(min_score)
        self.lsj = dict(lsj)
        # each batch draws its own crops (an epoch repeats the rows, not the augmentation)
        self.rng = np.random.default_rng([seed, int.from_bytes(os.urandom(8), "little")])

    def __call__(self, batch: pa.Table) -> dict[str, np.ndarray]:
        packed = []
        columns = ["uri", "segments"] + [c for c in _VERSION_COLUMNS if c in batch.column_names]
        for row in batch.select(columns).to_pylist():
            try:
                image = read_labeled_image(row)
                masks, classes, ignore = row_targets(row["segments"], image.shape[0], image.shape[1],
                                                     self.class_index, self.min_score)
            except (OSError, ValueError) as e:
                logger.warning("skipping %s: %s", row["uri"], e)
                continue
            sample = train_sample(image, masks, classes, None, self.rng, ignore=ignore, **self.lsj)
            packed.append(pack_sample(sample))
        side = int(self.lsj["image_size"])
        if not packed:
            return {"image": np.zeros((0, side, side, 3), np.uint8), "valid": np.zeros((0, side, side), bool),
                    "segments": np.zeros((0, side, side), np.int32), "labels": np.zeros((0,), dtype=object)}
        labels = np.empty(len(packed), dtype=object)
        labels[:] = [p["labels"] for p in packed]
        return {
            "image": np.stack([p["image"] for p in packed]),
            "valid": np.stack([p["valid"] for p in packed]),
            "segments": np.stack([p["segments"] for p in packed]),
            "labels": labels,
        }


def label_dataset(data: TrainingData, *, image_size: int, min_scale: float, max_scale: float, min_score: float,
                  seed: int, rows_per_block: int = 16, min_epoch_rows: int = 2048) -> ray.data.Dataset:
    """The Ray Data pipeline of a labeling output's training samples (module docstring); lazy: nothing is read
    until a worker iterates its shard.

    The dataset's items are the part files (in a seeded random order), never their rows: a CPU task reads one
    part file ``rows_per_block`` rows at a time and yields the decoded samples as it goes (a generator, so Ray
    Data's backpressure holds however large a file is). An output smaller than ``min_epoch_rows`` rows has its
    files listed several times in an epoch, so that starting an epoch (a pause of a second or two) stays rare.
    """
    output = data.output
    files = list(output.files)
    rows = 0
    for path in files:  # footers only, and only until the epoch is known to be long enough
        rows += _num_rows(output.fs, path)
        if rows >= min_epoch_rows:
            break
    passes = 1 if rows >= min_epoch_rows else max(1, math.ceil(min_epoch_rows / max(rows, 1)))
    order = np.random.default_rng(seed).permutation(len(files) * passes)
    items = [{"path": files[i % len(files)]} for i in order]
    ds = ray.data.from_items(items, override_num_blocks=len(items))
    return ds.map_batches(
        read_samples,
        fn_kwargs={"fs": output.fs, "rows_per_block": rows_per_block, "class_index": data.class_index,
                   "min_score": min_score, "seed": seed,
                   "lsj": {"image_size": image_size, "min_scale": min_scale, "max_scale": max_scale}},
        batch_size=1,
        batch_format="pyarrow",
        num_cpus=1,
    )


def _num_rows(fs, path: str) -> int:
    with fs.open(path, "rb") as f:
        return pq.ParquetFile(f).metadata.num_rows


def read_samples(items: pa.Table, *, fs, rows_per_block: int, **decode) -> Iterator[dict[str, np.ndarray]]:
    """Ray Data task: the part files named in ``items`` -> packed training samples, ``rows_per_block`` rows at a
    time. Reads only the columns training needs and keeps only the rows with status ``ok``."""
    samples = DecodeSamples(**decode)
    for path in items.column("path").to_pylist():
        with fs.open(path, "rb") as f:
            parquet = PartFile(f)
            columns = _COLUMNS + [c for c in _VERSION_COLUMNS if c in parquet.schema_arrow.names]
            for batch in parquet.iter_batches(batch_size=rows_per_block, columns=columns):
                ok = batch.filter(pc.equal(batch.column("status"), "ok"))
                if ok.num_rows:
                    yield samples(pa.Table.from_batches([ok]))


def stream_samples(shard, *, read_batch: int = 16, shuffle_buffer: int = 64, prefetch: int = 4) -> Iterator[dict]:
    """Endless training samples (`unpack_sample`d) from a worker's dataset shard, one epoch after another; read
    `read_batch` at a time, shuffled in a local buffer of `shuffle_buffer`, `prefetch` batches ahead.

    Raises ValueError when a whole pass yields no sample (no ok row, or every image unreadable).
    """
    while True:
        count = 0
        for batch in shard.iter_batches(batch_size=read_batch, batch_format="numpy",
                                        local_shuffle_buffer_size=shuffle_buffer, prefetch_batches=prefetch):
            for i in range(len(batch["image"])):
                count += 1
                yield unpack_sample({k: batch[k][i] for k in ("image", "valid", "segments", "labels")})
        if not count:
            raise ValueError("the labeling output gave this worker no sample to train on (no rows with status ok, "
                             "or every image unreadable)")


def stream_batches(shard, batch_size: int, **kwargs) -> Iterator[dict]:
    """Endless `collate`d batches of ``batch_size`` samples from a worker's dataset shard (`stream_samples`,
    which takes the keyword arguments)."""
    return collate_batches(stream_samples(shard, read_batch=batch_size, **kwargs), batch_size)
