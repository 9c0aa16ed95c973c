"""``fcclip review``: people in the loop. Pick the images whose labels are most likely wrong, send them to Label
Studio with the model's masks as pre-annotations, bring the corrections back as a labeling output.

    fcclip review pick DEST --count N --by uncertainty|random|class=NAME [--exclude PATH ...] [--out PICKS] [--seed S]
    fcclip review push PICKS --label-studio URL --project NAME [--document-root DIR] [--url-expiry SECONDS]
    fcclip review pull --label-studio URL --project NAME --out REVIEWED
    fcclip review merge DEST REVIEWED --out MERGED

``pick`` streams over DEST's part files one batch at a time, reading only ``uri``, ``image_id``, ``status``,
``uncertainty``, the version columns (and the segments' labels for ``class=NAME``), and keeps the best N in a heap:
its memory depends on N, not on the number of rows. The order is a function of the rows alone (ties and ``random``
are broken by a hash of the image id and ``--seed``), not of how they are split into files. ``--exclude`` leaves out
the images of earlier pick lists or of a reviewed output as they were then, so that a pick made every night sends
people new images, and an image whose content changed since (labeled again by an incremental run) can be picked
again.

PICKS is one small Parquet file: ``rank``, ``uri``, ``image_id``, ``score`` (the ranking key), ``why`` (one line),
and the version of the image picked (the row's source columns, width and height), with DEST, the rule and DEST's
vocabulary in its key-value metadata (``fcclip.review``), so ``push`` finds the masks.

The Label Studio side (``push``, ``pull``) is in :mod:`pipelines.label_studio`; ``merge`` applies the rule by which
reviewed rows replace the pseudo-labels of the same images (:func:`merge`).
"""
from __future__ import annotations

import argparse
import hashlib
import heapq
import io
import json
import logging
import sys
from dataclasses import dataclass
from typing import Sequence

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from .arguments import COUNT

__all__ = ["pick", "read_picks", "merge", "add_arguments", "main_args"]

logger = logging.getLogger("fcclip.review")

PICKS_KEY = b"fcclip.review"
PICKS_SCHEMA = pa.schema([
    pa.field("rank", pa.int32(), nullable=False),
    pa.field("uri", pa.string(), nullable=False),
    pa.field("image_id", pa.string(), nullable=False),
    pa.field("score", pa.float32()),
    pa.field("why", pa.string()),
    # which version of the image was picked (pipelines.output.VERSION_KEYS): a later pick leaves it out while it is
    # unchanged, and picks it again once an incremental run labeled its new content
    pa.field("source_etag", pa.string()),
    pa.field("source_size", pa.int64()),
    pa.field("source_mtime", pa.timestamp("us", tz="UTC")),
    pa.field("width", pa.int32()),
    pa.field("height", pa.int32()),
])
BATCH_ROWS = 4096


class ReviewError(ValueError):
    """A review command cannot go on; the message is one line a user can act on."""


@dataclass(frozen=True)
class Picks:
    """A pick list: its rows (PICKS_SCHEMA) and where they came from."""

    table: pa.Table
    dest: str
    by: str
    vocabulary: dict
    excluded: int = 0  # images left out because an --exclude list held them (ok rows of DEST only)
    exclude: tuple[str, ...] = ()  # those lists


def _tiebreak(image_id: str, seed: int) -> int:
    """A 64-bit number fixed by the image and the seed: the random order, and the order among equal keys."""
    return int.from_bytes(hashlib.sha256(f"{seed}:{image_id}".encode()).digest()[:8], "big")


def parse_by(by: str) -> tuple[str, str | None]:
    """``uncertainty`` | ``random`` | ``class=NAME`` -> (kind, NAME or None)."""
    if by in ("uncertainty", "random"):
        return by, None
    if by.startswith("class=") and by[len("class="):].strip():
        return "class", by[len("class="):].strip()
    raise ReviewError(f"--by {by!r}: expected uncertainty, random or class=NAME")


def pick(dest: str, count: int, by: str = "uncertainty", *, seed: int = 0, exclude: Sequence[str] = (),
         out: str | None = None) -> Picks:
    """The ``count`` images of DEST most worth a person's time under rule ``by`` (module docstring), leaving out
    those of the ``exclude`` lists (see :func:`excluded_images`; ``out``, the pick list about to be written, is never
    one of them, so that running the same pick again gives the same list).

    uncertainty: the largest ``uncertainty`` (fcclip.uncertainty.image_uncertainty) first.
    random: a seeded random sample (the smallest hashes of seed and image id).
    class=NAME: images with a segment of class NAME (any of its names), the most uncertain first.
    Error rows are never picked (there is nothing to review). Raises ReviewError (one line) when DEST cannot be
    ranked that way.
    """
    from fcclip.vocabulary import Vocabulary

    from .output import VERSION_KEYS, PartFile, open_output, same_version

    if count < 1:
        raise ReviewError("--count must be >= 1")
    kind, name = parse_by(by)
    output = open_output(dest)
    vocabulary = Vocabulary.from_dict(output.vocabulary)
    label = None
    if kind == "class":
        matches = [c.names[0] for c in vocabulary.categories if name in c.names]
        if not matches:
            raise ReviewError(f"--by class={name}: no class of that name in DEST's vocabulary {vocabulary.name!r}")
        label = matches[0]
    if kind in ("uncertainty", "class") and "uncertainty" not in output.columns:
        raise ReviewError(f"{dest} has no uncertainty column: label it again with this version, or relabel it "
                          "(fcclip relabel) when it was labeled with --embeddings")

    skip = excluded_images(exclude, out)
    excluded = 0
    columns = ["uri", "image_id", "status"] + (["uncertainty"] if kind != "random" else [])
    heap: list[tuple] = []  # the best `count` so far, worst on top: (key, tiebreak, uri, image_id, score, why, version)
    for path in output.files:
        with output.fs.open(path, "rb") as f:
            parquet = PartFile(f)
            versions = [k for k in VERSION_KEYS if k in parquet.schema_arrow.names]
            wanted = columns + versions
            if label is not None:
                wanted.append(next(parquet.schema.column(i).path for i in range(len(parquet.schema))
                                   if parquet.schema.column(i).path.startswith("segments.")
                                   and parquet.schema.column(i).path.endswith(".label")))
            for batch in parquet.iter_batches(batch_size=BATCH_ROWS, columns=wanted):
                # the version columns are made Python values only where needed: row by row for the rows the heap
                # takes, the whole batch at once where an --exclude list holds one of its images
                data = {name: batch.column(name).to_pylist() for name in batch.schema.names if name not in versions}
                lazy: dict = {}

                def version(i: int, batch=batch, lazy=lazy) -> tuple:
                    if "rows" in lazy:
                        return lazy["rows"][i]
                    if "arrays" not in lazy:
                        lazy["arrays"] = _version_arrays(batch)
                    return tuple(a[i].as_py() if a is not None else None for a in lazy["arrays"])

                def held(i: int, image_id: str, batch=batch, lazy=lazy) -> bool:
                    if "rows" not in lazy:
                        lazy["rows"] = _versions(batch)
                    mine = dict(zip(VERSION_KEYS, lazy["rows"][i]))
                    return any(same_version(dict(zip(VERSION_KEYS, v)), mine) for v in skip[image_id])

                for i, (uri, image_id, status) in enumerate(zip(data["uri"], data["image_id"], data["status"])):
                    if status != "ok":
                        continue
                    if image_id in skip and held(i, image_id):
                        excluded += 1
                        continue
                    tie = _tiebreak(image_id, seed)
                    if kind == "random":
                        key, score, why = -tie, None, f"random sample (seed {seed})"
                    else:
                        score = data["uncertainty"][i]
                        if score is None:
                            continue
                        if label is not None:
                            n = sum(1 for s in data["segments"][i] or [] if s["label"] == label)
                            if n == 0:
                                continue
                            why = f"{n} {label} segment{'s' if n > 1 else ''}, uncertainty {score:.3f}"
                        else:
                            why = f"uncertainty {score:.3f}"
                        key = score
                    if len(heap) < count:
                        heapq.heappush(heap, (key, -tie, uri, image_id, score, why, version(i)))
                    elif (key, -tie) > heap[0][:2]:
                        heapq.heapreplace(heap, (key, -tie, uri, image_id, score, why, version(i)))
    best = sorted(heap, reverse=True)
    table = pa.Table.from_pydict({
        "rank": list(range(1, len(best) + 1)),
        "uri": [b[2] for b in best],
        "image_id": [b[3] for b in best],
        "score": [b[4] for b in best],
        "why": [b[5] for b in best],
        **{k: [b[6][j] for b in best] for j, k in enumerate(VERSION_KEYS)},
    }, schema=PICKS_SCHEMA)
    return Picks(table, dest, by, output.vocabulary, excluded, tuple(exclude))


def excluded_images(paths: Sequence[str], out: str | None = None) -> dict[str, list[tuple]]:
    """The images held by ``paths`` (``--exclude``), as image id -> the versions held (tuples of
    :data:`pipelines.output.VERSION_KEYS`; all None where a list does not say, which matches any version): each a pick
    list (a ``.parquet`` file), a folder or prefix of pick lists (earlier nights' ``--out``), or a labeling output
    (``fcclip review pull``'s REVIEWED, say: its table's current files). A folder that does not exist yet holds none
    (the first night of ``--exclude picks/ --out picks/DATE.parquet``); a file that does not exist is an error.
    ``out`` is left out of a folder's lists."""
    import fsspec

    from .output import VERSION_KEYS, NotALabelingOutput, PartFile, open_output

    ids: dict[str, list[tuple]] = {}
    out_path = fsspec.core.url_to_fs(out)[1].rstrip("/") if out else None
    for path in paths:
        fs, root = fsspec.core.url_to_fs(path)
        root = root.rstrip("/")
        is_file = fs.isfile(root)
        if is_file or root.endswith(".parquet"):
            if not is_file:
                raise ReviewError(f"--exclude {path}: no such file")
            files = [] if root == out_path else [root]
        elif not fs.exists(root):
            logger.info("--exclude %s: no such folder yet, nothing to leave out", path)
            continue
        else:
            try:
                output = open_output(path)
            except NotALabelingOutput:  # a folder of pick lists
                files = sorted(f for f in fs.glob(f"{root}/*.parquet") if f.rstrip("/") != out_path)
            else:
                fs, files = output.fs, output.files
        for file in files:
            with fs.open(file, "rb") as f:
                parquet = PartFile(f)
                if "image_id" not in parquet.schema_arrow.names:
                    raise ReviewError(f"--exclude {path}: {file} has no image_id column (neither a pick list nor a "
                                      "labeling output)")
                versions = [k for k in VERSION_KEYS if k in parquet.schema_arrow.names]
                for batch in parquet.iter_batches(batch_size=65536, columns=["image_id"] + versions):
                    for image, version in zip(batch.column("image_id").to_pylist(), _versions(batch)):
                        ids.setdefault(image, []).append(version)
    return ids


def _version_arrays(batch: pa.RecordBatch) -> list:
    """The batch's version columns (:data:`pipelines.output.VERSION_KEYS`; None where it lacks one), the modification
    time as microseconds (int64: Python datetimes are slow to make)."""
    from .output import VERSION_KEYS

    arrays = []
    for k in VERSION_KEYS:
        index = batch.schema.get_field_index(k)
        column = batch.column(index) if index >= 0 else None
        if column is not None and pa.types.is_timestamp(column.type):
            column = column.cast(pa.timestamp("us", tz="UTC")).cast(pa.int64())
        arrays.append(column)
    return arrays


def _versions(batch: pa.RecordBatch) -> list[tuple]:
    """Each row's version, as :func:`_version_arrays` gives them."""
    return list(zip(*(a.to_pylist() if a is not None else [None] * batch.num_rows for a in _version_arrays(batch))))


def write_picks(picks: Picks, out: str) -> None:
    import fsspec

    meta = {PICKS_KEY: json.dumps({"dest": picks.dest, "by": picks.by, "vocabulary": picks.vocabulary,
                                   "exclude": list(picks.exclude)}).encode()}
    buf = io.BytesIO()
    pq.write_table(picks.table.replace_schema_metadata(meta), buf)
    with fsspec.open(out, "wb") as f:
        f.write(buf.getvalue())


def read_picks(path: str) -> Picks:
    import fsspec

    try:
        with fsspec.open(path, "rb") as f:
            table = pq.read_table(f)
    except (OSError, pa.ArrowException) as e:
        raise ReviewError(f"{path}: cannot read a pick list ({' '.join(str(e).split())})") from None
    meta = (table.schema.metadata or {}).get(PICKS_KEY)
    if meta is None:
        raise ReviewError(f"{path} is not a pick list of fcclip review pick (no fcclip.review metadata)")
    info = json.loads(meta)
    table = pa.Table.from_arrays(  # a list written before picks recorded versions has no version columns
        [table.column(f.name) if f.name in table.column_names else pa.nulls(table.num_rows, f.type)
         for f in PICKS_SCHEMA], schema=PICKS_SCHEMA)
    return Picks(table, info["dest"], info["by"], info["vocabulary"],
                 exclude=tuple(info.get("exclude", ())))


# ---------------------------------------------------------------------------------------------------------- merge
def merge(dest: str, reviewed: str, out: str) -> dict:
    """The rule by which reviewed rows replace pseudo-labels: MERGED holds every row of DEST, in DEST's part files
    and order, except that a row whose ``image_id`` has a reviewed row of the same version of the image
    (:func:`pipelines.output.same_version`) is that reviewed row (its ``source`` says ``human-reviewed``; the other
    rows' says ``model``, or what it said where DEST is a merged output itself: an earlier review merged in keeps its
    reviewer and time). A review of an image whose content changed after it was pushed (DEST labeled it again) is
    *stale*: DEST's row stays, and the counts name it; so does a review older than the review DEST holds of the image
    (``superseded``: DEST may be a merged output itself). Reviews of images DEST does not hold are counted
    (``not_in_dest``); where that is every review, REVIEWED was picked from another table: ReviewError, nothing
    written. DEST's embedding columns are not carried (reviewed rows have none). Both must have the same vocabulary.
    DEST is streamed a part file at a time; the reviewed rows (a human's work: thousands, not millions) are held in
    memory. MERGED is a Delta table as DEST is: its part files are committed as version 0 once all are written.
    Returns the counts (``rows``, ``replaced``, ``not_in_dest``) and the URIs of the ``stale`` and ``superseded``
    reviews."""
    from . import lake
    from .output import Destination, open_output

    base, done = open_output(dest), open_output(reviewed)
    if base.vocabulary != done.vocabulary:
        raise ReviewError(f"{reviewed} was reviewed under another vocabulary than {dest}'s")
    from .output import REVIEW_FIELDS

    if done.files and not {f.name for f in REVIEW_FIELDS} <= set(done.columns):
        raise ReviewError(f"{reviewed} is not an output of fcclip review pull (no {REVIEW_FIELDS[0].name} column)")
    target = Destination(out)
    with lake.WriterLock(target):  # one writer at a time; refused, it leaves nothing (the lock removes what it made)
        for path in _unfinished_merge(target, dest, reviewed):  # ours to replace, under the lock
            target.fs.rm(path)
        return _write_merged(base, done, target, dest, reviewed)


def _unfinished_merge(target, dest: str, reviewed: str) -> list[str]:
    """The part files in MERGED of a merge of the same DEST and REVIEWED that stopped before its commit: the merge is
    written again from the start, and they go. Anything else in MERGED is refused untouched."""
    from . import lake

    try:
        return lake.unfinished_parts(target, "merged_from", _merged_from(dest, reviewed),
                                     "merge of the same outputs")
    except lake.FolderTaken as e:
        raise ReviewError(str(e)) from None


def _merged_from(dest: str, reviewed: str) -> dict:
    """What a merged output records of its inputs: one spelling of each (a rerun may type them otherwise)."""
    from .output import location_key

    return {"labels": location_key(dest), "reviewed": location_key(reviewed)}


def _write_merged(base, done, target, dest: str, reviewed: str) -> dict:
    from . import lake
    from .output import (REVIEWED_SCHEMA, SOURCE_COLUMNS, VERSION_KEYS, Destination, PartFile, TableMetadata,
                         new_run_id, part_name, same_version, write_part)

    schema = REVIEWED_SCHEMA
    rows: dict[str, dict] = {}
    for path in done.files:
        with done.fs.open(path, "rb") as f:
            parquet = PartFile(f)  # pulled before reviews recorded their image's version: no source columns
            names = [n for n in schema.names if n in parquet.schema_arrow.names]
            for r in parquet.read(columns=names).to_pylist():
                if _newer(r, rows.get(r["image_id"])):  # REVIEWED holds one review per image; be it more, the newest
                    rows[r["image_id"]] = r
    reviews = list(rows.values())
    reviewed_ids = pa.array(list(rows), pa.string())
    reviewed_rows = pa.Table.from_pylist(reviews, schema=schema)  # row i: reviewed_ids[i]'s
    counts = {"rows": 0, "replaced": 0, "stale": [], "superseded": [], "not_in_dest": 0}
    matched = np.zeros(len(reviews), bool)
    run_id, merged_from = new_run_id(), _merged_from(dest, reviewed)
    table_metadata = TableMetadata(Destination(dest))
    for shard, path in enumerate(base.files):
        with base.fs.open(path, "rb") as f:
            parquet = PartFile(f)
            footer = table_metadata(parquet.schema_arrow.metadata or {})
            meta = {k.decode()[len("fcclip."):]: json.loads(v) for k, v in footer.items()
                    if k.startswith(b"fcclip.") and k != b"fcclip.embeddings"}
            # DEST may be a merged output itself (an earlier review merged in): its rows keep their source
            names = [n for n in schema.names if n in parquet.schema_arrow.names]
            tables = []
            for batch in parquet.iter_batches(batch_size=BATCH_ROWS, columns=names):
                counts["rows"] += batch.num_rows
                carried = _carried(batch, schema)
                at = pc.fill_null(pc.index_in(batch.column("image_id"), value_set=reviewed_ids), -1).to_numpy()
                hits = np.flatnonzero(at >= 0)
                pieces, start = [], 0
                for hit in hits.tolist():  # a reviewed image's row takes the place of its pseudo-labels
                    review = reviews[int(at[hit])]
                    matched[int(at[hit])] = True
                    if not same_version(review, carried.select(VERSION_KEYS).slice(hit, 1).to_pylist()[0]):
                        counts["stale"].append(review["uri"])  # its image changed after it was reviewed
                        continue
                    held = carried.select(["source", "reviewed_at"]).slice(hit, 1).to_pylist()[0]
                    if held["source"] == "human-reviewed" and _newer(held, review):
                        counts["superseded"].append(review["uri"])  # DEST holds a newer review of it: that stays
                        continue
                    row = reviewed_rows.slice(int(at[hit]), 1)
                    for name in SOURCE_COLUMNS:  # the same version: DEST's, also where the review did not record it
                        row = row.set_column(row.schema.get_field_index(name), name,
                                             carried.column(name).slice(hit, 1))
                    pieces += [carried.slice(start, hit - start), row]
                    start = hit + 1
                    counts["replaced"] += 1
                tables += [*pieces, carried.slice(start)]
        table = pa.concat_tables(tables) if tables else schema.empty_table()
        meta.update(run_id=run_id, merged_from=merged_from)
        write_part(target, shard, table, meta)
    counts["not_in_dest"] = int(len(reviews) - matched.sum())
    if reviews and not matched.any():  # nothing to merge: REVIEWED was picked from another table
        for shard in range(len(base.files)):
            target.fs.rm(target.path(part_name(shard)))
        raise ReviewError(f"none of the {len(reviews)} image(s) reviewed in {reviewed} is in {dest}: merge the "
                          "reviews into the table they were picked from (nothing was written)")
    if base.files:
        lake.commit_version(target, [part_name(shard) for shard in range(len(base.files))], info={
            "run_id": run_id, "operation": "review merge", "merged_from": merged_from,
            "rows_replaced": counts["replaced"], "stale_reviews": len(counts["stale"])})
    return counts


def _listed(uris: list[str], shown: int = 10) -> str:
    return ", ".join(uris[:shown]) + (f" and {len(uris) - shown} more" if len(uris) > shown else "")


def _newer(review: dict, than: dict | None) -> bool:
    """Whether ``review`` was made after ``than`` (by ``reviewed_at``; one without a time is the older)."""
    if than is None:
        return True
    a, b = review.get("reviewed_at"), than.get("reviewed_at")
    return a is not None and (b is None or a > b)


def _carried(batch: pa.RecordBatch, schema: pa.Schema) -> pa.Table:
    """A batch of DEST as MERGED's rows before any review replaces one, column by column: a column DEST lacks is
    null, a ``source`` DEST lacks (or leaves null) is ``model`` (DEST may be a merged output itself)."""
    columns = []
    for field in schema:
        if field.name in batch.schema.names:
            column = batch.column(field.name)
            column = (pc.fill_null(column, "model") if field.name == "source" else column).cast(field.type)
        elif field.name == "source":
            column = pa.array(["model"] * batch.num_rows, pa.string())
        else:
            column = pa.nulls(batch.num_rows, field.type)
        columns.append(column)
    return pa.Table.from_arrays(columns, schema=schema)


# ------------------------------------------------------------------------------------------------------------ CLI
def add_arguments(p: argparse.ArgumentParser) -> None:
    sub = p.add_subparsers(dest="review_command", required=True, metavar="STEP")
    q = sub.add_parser("pick", help="the N images most worth a person's time, as a small Parquet list")
    q.add_argument("dest", metavar="DEST", help="a labeling output")
    q.add_argument("--count", type=COUNT, required=True, help="how many images")
    q.add_argument("--by", default="uncertainty", help="uncertainty (default), random, or class=NAME")
    q.add_argument("--exclude", action="append", default=[], metavar="PATH",
                   help="leave out the images PATH holds: a pick list, a folder of them (earlier nights' picks; "
                        "one that does not exist yet holds none), or a labeling output such as REVIEWED; repeatable")
    q.add_argument("--out", default=None, metavar="PICKS", help="write the list here (a .parquet file)")
    q.add_argument("--seed", type=int, default=0, help="for random picks and ties (default: %(default)s)")

    from . import label_studio

    label_studio.add_push_arguments(sub.add_parser(
        "push", help="a Label Studio project with the picked images and the model's masks as pre-annotations"))
    label_studio.add_pull_arguments(sub.add_parser(
        "pull", help="the submitted annotations of a Label Studio project, as a labeling output"))
    m = sub.add_parser("merge", help="a labeling output whose reviewed images replace their pseudo-labels")
    m.add_argument("dest", metavar="DEST", help="the labeling output")
    m.add_argument("reviewed", metavar="REVIEWED", help="fcclip review pull's output")
    m.add_argument("--out", required=True, metavar="MERGED",
                   help="a new folder: the merged labeling output (DEST stays as it is)")


def main_args(args: argparse.Namespace) -> int:
    from . import label_studio, lake
    from .output import OutputError

    try:
        if args.review_command == "pick":
            picks = pick(args.dest, args.count, args.by, seed=args.seed, exclude=args.exclude, out=args.out)
            for r in picks.table.to_pylist():
                print(f"{r['rank']:>5}  {r['image_id']}  {r['uri']}  ({r['why']})")
            print(f"{picks.table.num_rows} image(s) picked by {picks.by} from {args.dest}"
                  + (f" ({picks.excluded} left out by --exclude)" if args.exclude else "")
                  + (f"; list in {args.out}" if args.out else ""))
            if args.out:
                write_picks(picks, args.out)
            return 0
        if args.review_command == "merge":
            counts = merge(args.dest, args.reviewed, args.out)
            print(f"{counts['rows']} rows, {counts['replaced']} replaced by reviewed rows; written to {args.out}")
            if counts["superseded"]:
                print(f"{len(counts['superseded'])} review(s) left out: DEST holds a newer review of the image, "
                      f"which stays: {_listed(counts['superseded'])}", file=sys.stderr)
            if counts["not_in_dest"]:
                print(f"{counts['not_in_dest']} reviewed image(s) are not in {args.dest} (not merged)", file=sys.stderr)
            if counts["stale"]:
                print(f"{len(counts['stale'])} review(s) left out: their image changed after it was reviewed, and "
                      f"its new labels are kept (pick and push it again to review them): {_listed(counts['stale'])}",
                      file=sys.stderr)
            return 0
        return label_studio.main_args(args)
    except (ReviewError, OutputError, label_studio.LabelStudioError, lake.DestinationBusy) as e:
        print(f"fcclip review {args.review_command}: error: {e}", file=sys.stderr)
        return 2
