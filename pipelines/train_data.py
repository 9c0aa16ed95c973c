"""What ``fcclip train --data`` reads: a COCO panoptic tree, or a labeling output streamed through Ray Data.

`open_training_data` looks at ``--data`` and says which it is (`TrainingData`): a COCO panoptic layout (it has
``annotations/panoptic_{split}.json``) or a labeling output (``*.parquet`` part files with fcclip's columns and
``fcclip.vocabulary`` metadata, see `pipelines.show.output`). Anything else is refused with one line naming both.

A labeling output is never listed row by row, by the driver or by a worker. `label_dataset` builds a Ray Data
pipeline that Ray Train splits across its workers (``ray.train.get_dataset_shard("train")``):

    the part files, in a seeded random order (`label_dataset`)
      -> `read_samples` on CPU tasks: a part file read a few rows at a time, only the columns uri, status and
         segments, only the rows with status "ok"; then `DecodeSamples`: image read from its URI and decoded,
         masks decoded from the RLEs, classes mapped and low-score segments made ignore regions
         (`fcclip.datasets.labels`), large-scale jitter (`fcclip.training.data.train_sample`), packed into
         fixed-shape arrays (`pack_sample`)
      -> each worker's shard (Ray Train's streaming split), batched, shuffled in a local buffer, prefetched
         (`stream_batches`)

Each pass over the rows is one epoch; `stream_batches` starts the next one when a pass ends, so a training run of
any length reads the output as many times as it needs, and the augmentation draws new crops each time.
"""
from __future__ import annotations

import logging
import math
import os
from collections.abc import Iterator
from dataclasses import dataclass

import fsspec
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import ray.data

from fcclip.datasets.coco_panoptic import CocoPanoptic, join_uri
from fcclip.datasets.labels import LabelSelection, TrainingClasses, row_targets, training_classes
from fcclip.images import load_image
from fcclip.training.data import collate, pack_sample, train_sample, unpack_sample
from fcclip.vocabulary import Vocabulary
from pipelines.show.output import LabelingOutput, OutputError, open_output

logger = logging.getLogger("fcclip.train")

__all__ = ["DecodeSamples", "TrainingData", "label_dataset", "open_training_data", "read_samples", "stream_batches"]

_COLUMNS = ["uri", "status", "segments"]


@dataclass
class TrainingData:
    """``--data`` as training sees it.

    kind: ``"coco"`` or ``"labels"``; vocabulary: the training vocabulary; output: the labeling output (labels
    only); classes: the run's category id -> training class index (labels only).
    """

    uri: str
    kind: str
    vocabulary: Vocabulary
    output: LabelingOutput | None = None
    class_index: dict[int, int] | None = None


def open_training_data(uri: str, *, split: str, synonyms: str | None,
                       selection: LabelSelection = LabelSelection()) -> TrainingData:
    """Detect and open ``--data`` (reads the COCO JSON, or only the part files' footers).

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
        return TrainingData(uri, "coco", CocoPanoptic(uri, split).vocabulary(synonyms=synonyms))
    try:
        output = open_output(uri)
    except OutputError as e:
        raise ValueError(f"{uri} is neither a COCO panoptic tree (no {coco_json}) nor a labeling output ({e})"
                         ) from None
    classes: TrainingClasses = training_classes(output.vocabulary, selection)
    return TrainingData(uri, "labels", classes.vocabulary, output=output, class_index=classes.class_index)


class DecodeSamples:
    """Ray Data stage: a batch of output rows (pyarrow) -> packed, augmented training samples (numpy).

    A row whose image cannot be read, or whose masks do not fit it, is skipped with a warning (the labeling run
    read it once; it may have moved since): training goes on.
    """

    def __init__(self, class_index: dict[int, int], min_score: float, lsj: dict, seed: int):
        self.class_index = {int(k): int(v) for k, v in class_index.items()}
        self.min_score = float(min_score)
        self.lsj = dict(lsj)
        # each batch draws its own crops (an epoch repeats the rows, not the augmentation)
        self.rng = np.random.default_rng([seed, int.from_bytes(os.urandom(8), "little")])

    def __call__(self, batch: pa.Table) -> dict[str, np.ndarray]:
        packed = []
        for row in batch.select(["uri", "segments"]).to_pylist():
            try:
                image = load_image(row["uri"])
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
            for batch in pq.ParquetFile(f).iter_batches(batch_size=rows_per_block, columns=_COLUMNS):
                ok = batch.filter(pc.equal(batch.column("status"), "ok"))
                if ok.num_rows:
                    yield samples(pa.Table.from_batches([ok]))


def stream_batches(shard, batch_size: int, *, shuffle_buffer: int = 64, prefetch: int = 4) -> Iterator[dict]:
    """Endless `collate`d batches of ``batch_size`` samples from a worker's dataset shard, one epoch after another.

    Raises ValueError when a whole pass yields no batch (no ok row, or fewer samples than a worker's batch).
    """
    while True:
        count = 0
        for batch in shard.iter_batches(batch_size=batch_size, batch_format="numpy", drop_last=True,
                                        local_shuffle_buffer_size=shuffle_buffer, prefetch_batches=prefetch):
            count += 1
            yield collate([unpack_sample({k: batch[k][i] for k in ("image", "valid", "segments", "labels")})
                           for i in range(len(batch["image"]))])
        if not count:
            raise ValueError(f"the labeling output gave this worker fewer than {batch_size} samples to train on "
                             "(no rows with status ok, or every image unreadable)")
