"""The labeling output's format, owned here: its schema, its metadata keys, writing it and reading it back.

Every command that writes a labeling output (``fcclip label``, ``fcclip relabel``) writes it through this module,
and every command that reads one (``show``, ``export``, ``search``, ``relabel``, ``train --data``, ``eval --data``)
opens it with :func:`open_output`.

Schema: :data:`SCHEMA` (one row per input image, ``segments`` a list of :data:`SEGMENT` structs with COCO RLE masks),
plus :data:`EMBEDDING_COLUMNS` when a run stores embeddings (:func:`output_schema`). Each part file's key-value
metadata holds ``fcclip.<key>`` = JSON for the run's vocabulary, thresholds, run id, model and weights
(:data:`METADATA_PREFIX`, :data:`VOCABULARY_KEY`).

Layout of DEST (a Delta table, pipelines/lake.py):

    DEST/part-000000.parquet ...        one file per shard of the manifest, complete when it exists, in the table
                                        once a version of DEST/_delta_log names it
    DEST/part-000003-r000042.parquet    shard 3's rows without those shard 42 replaced (an increment, lake.py)
    DEST/_delta_log/                    the table's log: which part files make each version (written by the driver)
    DEST/_fcclip/lock.json              the one writer's lock (lake.WriterLock)
    DEST/_fcclip/run.json               the run's settings (model, weights, vocabulary, thresholds, shard size),
                                        written once the manifest is complete (a manifest without it is not trusted)
    DEST/_fcclip/table.json             the part files' fcclip.* metadata, for the table's files that another
                                        program rewrote (a compaction, a DELETE: lake.commit_version)
    DEST/_fcclip/manifest/shard-000000.manifest   the URIs of each shard (Parquet data, not a .parquet name)
    DEST/_fcclip/fragments/shard-000000/rows-*.arrow   rows of a shard not yet committed (Arrow IPC)
    DEST/_fcclip/tmp/                   local files being written (renamed into place when complete)

Who writes what: Ray workers encode each chunk of a shard's rows and write it as a fragment with a name no other
write uses; when the driver has seen fragments covering every row of a shard, it starts one commit task, which
reads them, keeps each row once, writes the shard's part file and deletes the shard's fragment folder. The driver
itself reads and writes no rows: it schedules tasks and keeps per chunk the rows covered and the fragment's name.

Why a reader never sees a partial file or a row twice:
- every input URI belongs to exactly one shard, fixed when the manifest is written (before any labeling);
- a shard's rows are written as ONE file named after the shard, and only once all of its rows are present (the
  commit checks that its fragments cover rows 0..n-1 and takes each row once, so a fragment written twice by a
  retried task adds nothing);
- the file appears atomically: on a local or mounted filesystem it is written under DEST/_fcclip/tmp and renamed
  (``os.replace``) into place; on object storage it is uploaded as a single object, which becomes visible only when
  the upload completes;
- writing a shard again (a retried commit, a resumed run) replaces the file with the same rows: never a second copy;
- fragments of a killed run are never read by a later run (it commits only the fragments it wrote itself); they are
  deleted with their shard's folder when that shard is committed, and whatever is left when a run completes.
Until an increment replaces rows, nothing else directly under DEST ends in ``.parquet``, so ``DEST/*.parquet`` is the
committed output (plus, at most, part files written just before a kill and named in no version yet: they hold a
shard's complete rows, which the rerun writes again); the table's current version is exactly it, always.

Reading: a folder is a labeling output when it holds at least one ``*.parquet`` file and every one of them has the
columns a reader needs (:data:`REQUIRED_COLUMNS`) and the run's vocabulary in its key-value metadata. Anything else
is refused with one line that says what was found, before any row is read: an empty or missing folder, someone
else's Parquet files, or a mix of both (where a glob would return rows of either).
"""
from __future__ import annotations

import datetime
import io
import json
import os
import re
import uuid
from collections import Counter
from dataclasses import dataclass, field
from typing import Any, Iterable, Iterator, Mapping

import fsspec
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from fsspec.implementations.local import LocalFileSystem

from fcclip._paths import new_file
from fcclip.images import decode_image_bytes
from fcclip.masks import decode_rle

META_DIR = "_fcclip"
METADATA_PREFIX = "fcclip."
"""Prefix of the run's keys in each part file's key-value metadata (``fcclip.vocabulary``, ``fcclip.run_id``, ...)."""
VOCABULARY_KEY = b"fcclip.vocabulary"
REQUIRED_COLUMNS = ("uri", "image_id", "width", "height", "status", "error", "segments")
"""Columns every part file has (:data:`SCHEMA`); the run columns (``run_id``, ``model``, ...) may not."""
_SHOWN_FILES = 3
PART_RE = re.compile(r"part-(\d+)\.parquet$")
REWRITE_RE = re.compile(r"part-(\d+)-r(\d+)\.parquet$")
DELTA_LOG = "_delta_log"

RLE = pa.struct([pa.field("size", pa.list_(pa.int32())), pa.field("counts", pa.string())])
SEGMENT = pa.struct(
    [
        pa.field("id", pa.int32()),
        pa.field("label", pa.string()),
        pa.field("category_id", pa.int32()),
        pa.field("is_thing", pa.bool_()),
        pa.field("score", pa.float32()),
        pa.field("area", pa.int64()),
        pa.field("bbox", pa.list_(pa.float32())),
        pa.field("rle", RLE),
    ]
)
SCHEMA = pa.schema(
    [
        pa.field("uri", pa.string(), nullable=False),
        pa.field("image_id", pa.string(), nullable=False),
        pa.field("width", pa.int32()),
        pa.field("height", pa.int32()),
        pa.field("status", pa.string(), nullable=False),
        pa.field("error", pa.string()),
        pa.field("segments", pa.list_(SEGMENT)),
        pa.field("model", pa.string()),
        pa.field("vocabulary", pa.string()),
        pa.field("run_id", pa.string()),
        # fcclip.uncertainty: per segment (lists parallel to `segments`) and per image; null from model stages
        # that do not give them
        pa.field("margin", pa.list_(pa.float32())),
        pa.field("branches_agree", pa.list_(pa.bool_())),
        pa.field("mask_score", pa.list_(pa.float32())),
        pa.field("kept_share", pa.list_(pa.float32())),
        pa.field("unlabeled_share", pa.float32()),
        pa.field("uncertainty", pa.float32()),
    ]
)

UNCERTAINTY_COLUMNS = ("margin", "branches_agree", "mask_score", "kept_share", "unlabeled_share", "uncertainty")
"""fcclip.uncertainty's signals: `margin`, `branches_agree`, `mask_score` and `kept_share` per segment (lists
parallel to `segments`), `unlabeled_share` and `uncertainty` per image."""

REVIEW_FIELDS = [
    pa.field("source", pa.string()),  # "human-reviewed" (fcclip review pull) or "model" (fcclip review merge)
    pa.field("reviewed_by", pa.string()),  # the annotator's e-mail
    pa.field("reviewed_at", pa.timestamp("us", tz="UTC")),
]
"""The columns a reviewed output (``fcclip review pull``) and a merged one (``fcclip review merge``) add to SCHEMA."""


EMBEDDING_COLUMNS = ("query_index", "embedding_in", "embedding_out", "embedding_valid")
"""The columns ``fcclip label --embeddings`` adds, each a list parallel to ``segments`` (one item per segment)."""


SOURCE_COLUMNS = ("source_etag", "source_size", "source_mtime")
"""What SOURCE's listing said of each row's object when it was labeled (null where the listing does not say: a plain
manifest): its ETag, size in bytes and modification time. A later run labels the object again when they differ
(pipelines/lake.py). Added to the rows when their shard is committed, from the shard's manifest."""
SOURCE_FIELDS = [
    pa.field("source_etag", pa.string()),
    pa.field("source_size", pa.int64()),
    pa.field("source_mtime", pa.timestamp("us", tz="UTC")),
]

REVIEWED_SCHEMA = pa.schema(list(SCHEMA) + SOURCE_FIELDS + REVIEW_FIELDS)
"""The rows of ``fcclip review pull`` and ``fcclip review merge``: a reviewed row records which version of its image
was reviewed (the source columns of the row pushed for review), so a review is never applied to the image's later
content (:func:`same_version`)."""

VERSION_KEYS = SOURCE_COLUMNS + ("width", "height")
"""What tells two versions of an image at one URI apart: :func:`same_version`."""


def _instant(value: Any) -> datetime.datetime | None:
    if isinstance(value, str):
        value = datetime.datetime.fromisoformat(value)
    if isinstance(value, datetime.datetime) and value.tzinfo is None:
        value = value.replace(tzinfo=datetime.timezone.utc)
    return value


def same_version(a: Mapping[str, Any], b: Mapping[str, Any]) -> bool:
    """Whether rows ``a`` and ``b`` of one image (or a row and what a review recorded of the row it reviewed:
    :data:`VERSION_KEYS`, ``source_mtime`` as a timestamp or ISO string) are of the same content, by the rule a rerun
    uses to find changed objects (pipelines/lake.py ``_CHANGED``): the same ETag where both have one, else the same
    size and modification time where both have a size; and the same width and height where both have them. Where
    neither says (a plain manifest's rows), the same."""
    if a.get("source_etag") is not None and b.get("source_etag") is not None:
        if a["source_etag"] != b["source_etag"]:
            return False
    elif a.get("source_size") is not None and b.get("source_size") is not None:
        if a["source_size"] != b["source_size"] or _instant(a.get("source_mtime")) != _instant(b.get("source_mtime")):
            return False
    return all(a.get(k) is None or b.get(k) is None or a[k] == b[k] for k in ("width", "height"))


class ImageChanged(ValueError):
    """An output row's image is not the object that was labeled: it was replaced since
    (:func:`changed_since_labeled`)."""


def read_labeled_image(row: Mapping[str, Any]) -> np.ndarray:
    """The decoded image of an output row, checked to be the object that was labeled, by the rule a rerun uses to
    find changed objects (:func:`changed_since_labeled`): the ETag the store returns with the object where the row
    has one (object stores), else the file's size and modification time. A replaced image of the same pixel size
    would otherwise be trained on with the old image's masks.

    Raises:
        ImageChanged: the object changed after it was labeled (the next ``fcclip label`` run labels it again).
        ImageDecodeError, OSError: it cannot be read or decoded.
    """
    uri = row["uri"]
    if "://" in uri:
        with fsspec.open(uri, "rb") as f:
            now = version_of(getattr(f, "details", None) or {})
            data = f.read()
    else:
        with open(uri, "rb") as f:
            now = stat_version(os.fstat(f.fileno()))
            data = f.read()
    why = changed_since_labeled(row, now)
    if why:
        raise ImageChanged(f"{why}; the next fcclip label run labels it again")
    return decode_image_bytes(data, name=uri)


def version_of(info: Mapping[str, Any]) -> dict:
    """:data:`SOURCE_COLUMNS` of an object from its fsspec metadata (``fs.info``, an open file's ``details``, a
    listing's entry: the names differ between stores)."""
    etag = info.get("ETag") or info.get("etag") or info.get("md5Hash")
    mtime = info.get("LastModified") or info.get("updated") or info.get("mtime") or info.get("last_modified")
    if isinstance(mtime, (int, float)):
        mtime = datetime.datetime.fromtimestamp(mtime, datetime.timezone.utc)
    elif isinstance(mtime, str):
        try:
            mtime = datetime.datetime.fromisoformat(mtime.replace("Z", "+00:00"))
        except ValueError:
            mtime = None
    size = info.get("size")
    return {"source_etag": etag, "source_size": int(size) if size is not None else None,
            "source_mtime": mtime if isinstance(mtime, datetime.datetime) else None}


def stat_version(st: os.stat_result) -> dict:
    """:data:`SOURCE_COLUMNS` of a local file from its stat, as a listing of its folder records them."""
    seconds, ns = divmod(st.st_mtime_ns, 1_000_000_000)
    mtime = datetime.datetime.fromtimestamp(seconds, datetime.timezone.utc).replace(microsecond=ns // 1000)
    return {"source_etag": None, "source_size": st.st_size, "source_mtime": mtime}


def changed_since_labeled(row: Mapping[str, Any], now: Mapping[str, Any]) -> str | None:
    """Why the object of an output row, as it is ``now`` (:data:`SOURCE_COLUMNS`), is not the one labeled, by
    :func:`same_version` (a rerun's rule); None where it is, or where the row cannot tell (a plain manifest's)."""
    labeled = {k: row.get(k) for k in SOURCE_COLUMNS}
    if same_version(labeled, now):
        return None
    if labeled["source_etag"] is not None and now.get("source_etag") is not None:
        return f"it changed after it was labeled (ETag {now['source_etag']}, labeled {labeled['source_etag']})"

    def described(v: Mapping[str, Any]) -> str:
        when = _instant(v.get("source_mtime"))
        return f"{v.get('source_size')} bytes, modified {when.isoformat() if when else 'at an unknown time'}"

    return f"it changed after it was labeled ({described(now)}; labeled: {described(labeled)})"


def object_now(uri: str) -> dict | None:
    """:data:`SOURCE_COLUMNS` of the object at ``uri`` as it is now, from its metadata alone (a HEAD, a stat); None
    where it is gone."""
    try:
        if "://" not in uri:
            return stat_version(os.stat(uri))
        fs, path = fsspec.core.url_to_fs(uri)
        return version_of(fs.info(path))
    except FileNotFoundError:
        return None


def embedding_fields(dim: int) -> list[pa.Field]:
    """The embedding columns for D = ``dim``: per segment its query, the decoder's class embedding (``embedding_in``)
    and the mask-pooled CLIP embedding (``embedding_out``), both L2-normalised, float16, fixed size D; and ``valid``."""
    vector = pa.list_(pa.float16(), dim)
    return [
        pa.field("query_index", pa.list_(pa.int32())),
        pa.field("embedding_in", pa.list_(vector)),
        pa.field("embedding_out", pa.list_(vector)),
        pa.field("embedding_valid", pa.list_(pa.bool_())),
    ]


def output_schema(embedding_dim: int | None = None) -> pa.Schema:
    """SCHEMA, plus the embedding columns when ``embedding_dim`` is given."""
    return pa.schema(list(SCHEMA) + embedding_fields(embedding_dim)) if embedding_dim else SCHEMA


def part_schema(embedding_dim: int | None = None) -> pa.Schema:
    """A part file's schema: the encoded rows' (:func:`output_schema`), then :data:`SOURCE_FIELDS` (added when the
    shard is committed)."""
    return pa.schema(list(output_schema(embedding_dim)) + SOURCE_FIELDS)


def part_name(shard: int) -> str:
    return f"part-{shard:06d}.parquet"


def manifest_name(shard: int) -> str:
    return f"shard-{shard:06d}.manifest"


def location_key(uri: str) -> str:
    """One spelling of a place given on the command line, to compare the places two runs were given: a local path
    absolute and normalised (``photos``, ``./photos/`` and ``/data/photos`` typed in /data are one), a URI without
    its trailing slashes (``s3://b/photos/`` is ``s3://b/photos``, which fcclip lists as the same prefix). What a
    run's settings record as its SOURCE (relabel's: its DEST) and a merge as its inputs."""
    if "://" not in uri or uri.startswith("file://"):
        return os.path.abspath(os.path.expanduser(uri[len("file://"):] if uri.startswith("file://") else uri))
    return uri.rstrip("/") or uri


def weights_key(weights: str) -> str:
    """``--weights`` as a run records it: a local checkpoint file absolute (``model.pth`` typed in /data is
    /data/model.pth: relabel and search, which load the run's weights, may run from anywhere); a mode (official,
    clip, random), a URI, or a path that is not there (refused later, as given) unchanged."""
    if "://" in weights or not os.path.exists(os.path.expanduser(weights)):
        return weights
    return os.path.abspath(os.path.expanduser(weights))


class Destination:
    """DEST on any fsspec filesystem. Holds no filesystem object when pickled (credentials stay out of Ray)."""

    def __init__(self, uri: str):
        # a local path absolute: Ray's workers, which write into it, need not share the driver's working directory
        self.uri = location_key(uri)

    def __getstate__(self):
        return {"uri": self.uri}

    def __setstate__(self, state):
        self.uri = state["uri"]

    @property
    def fs(self) -> fsspec.AbstractFileSystem:
        fs, _ = fsspec.core.url_to_fs(self.uri)
        return fs

    @property
    def root(self) -> str:
        _, root = fsspec.core.url_to_fs(self.uri)
        return root.rstrip("/")

    def path(self, *parts: str) -> str:
        return "/".join([self.root, *parts])

    @property
    def is_local(self) -> bool:
        return isinstance(self.fs, LocalFileSystem)

    # ------------------------------------------------------------------ atomic writes
    def write_bytes(self, relative: str, data: bytes) -> None:
        """Write ``DEST/relative`` so that it appears complete or not at all."""
        fs, target = self.fs, self.path(relative)
        if self.is_local:
            tmp_dir = self.path(META_DIR, "tmp")
            os.makedirs(tmp_dir, exist_ok=True)
            os.makedirs(os.path.dirname(target), exist_ok=True)
            fd, tmp = new_file(tmp_dir, ".inprogress")  # the umask's permissions, not mkstemp's 0o600
            try:
                with os.fdopen(fd, "wb") as f:
                    f.write(data)
                    f.flush()
                    os.fsync(f.fileno())
                os.replace(tmp, target)
            except BaseException:
                if os.path.exists(tmp):
                    os.unlink(tmp)
                raise
        else:
            fs.pipe_file(target, data)  # one object, visible only once the upload completes

    def read_bytes(self, relative: str) -> bytes:
        return self.fs.cat_file(self.path(relative))

    def exists(self, relative: str) -> bool:
        return self.fs.exists(self.path(relative))

    # ------------------------------------------------------------------ what DEST holds
    def placement_problem(self) -> str | None:
        """Why an output cannot go here, in one line, or None: DEST is a file, lies below one, or lies inside a table or
        a run's output (whose readers, ``read_parquet('OUT/**/*.parquet')``, Spark, pyarrow's dataset of the folder,
        would take DEST's part files for its rows). Listings only: two per folder above DEST."""
        fs, root = self.fs, self.root
        fs.invalidate_cache(root)
        if fs.isfile(root):
            return f"{self.uri} is a file, not a folder or prefix"
        parts = root.split("/")
        for end in range(len(parts) - 1, 0, -1):
            above = "/".join(parts[:end])
            if not above.strip("/"):
                break
            shown = fs.unstrip_protocol(above) if _has_protocol(self.uri) else above
            if fs.isfile(above):
                return f"{self.uri} is below {shown}, a file, not a folder"
            if fs.exists(f"{above}/{DELTA_LOG}") or fs.exists(f"{above}/{META_DIR}/run.json"):
                return (f"{self.uri} is inside the output {shown}, whose readers would take its part files for rows of "
                        f"their own: choose a folder outside it")
        return None

    def survey(self) -> "Survey":
        """What DEST holds, from listings only (no file is read but ``_fcclip/run.json``).

        fcclip's files are ``_fcclip/`` and, when a run's settings are there, the part files of that run's shards;
        everything else (another program's ``part-000000.parquet`` in a DEST without a run included) is foreign.
        """
        fs = self.fs
        fs.invalidate_cache(self.root)
        try:
            if not fs.isdir(self.root):
                if fs.exists(self.root):
                    raise NotADirectoryError(f"{self.uri} is a file, not a folder or prefix")
                return Survey(None, {}, [])
            entries = fs.ls(self.root, detail=True)
        except FileNotFoundError:
            return Survey(None, {}, [])
        run = self.read_run() if any(e["name"].rstrip("/").rsplit("/", 1)[-1] == META_DIR for e in entries) else None
        shards = len(run.get("shard_sizes") or []) if run and run.get("manifest_complete") else 0
        parts: dict[int, str] = {}
        foreign: list[str] = []
        rewrites: list[str] = []
        for entry in entries:
            path = entry["name"].rstrip("/")
            if path == self.root:
                continue  # an object store's marker of the prefix itself
            name = path.rsplit("/", 1)[-1]
            if name in (META_DIR, DELTA_LOG):
                continue
            if REWRITE_RE.fullmatch(name) and int(REWRITE_RE.fullmatch(name).group(1)) < shards:
                rewrites.append(path)
                continue
            m = PART_RE.fullmatch(name)
            if m and int(m.group(1)) < shards and entry.get("type") != "directory":
                parts[int(m.group(1))] = path
            else:
                foreign.append(name + ("/" if entry.get("type") == "directory" else ""))
        return Survey(run, parts, sorted(foreign), rewrites)

    def remove_own_files(self, survey: "Survey") -> None:
        """Remove what fcclip wrote (the table's log, the run's part files, then ``_fcclip/`` but the lock), nothing
        else. The order keeps a removal cut short consistent: the log goes first (a table naming files that are gone
        would not read; part files without it are adopted again); part files go while run.json still names them as
        the run's; run.json goes before the manifest it describes (a manifest without run.json is never trusted)."""
        fs = self.fs
        log = self.path(DELTA_LOG)  # first: a table naming files that are gone would not read
        rewritten = []  # the table's files another program wrote (a compaction's): the run's rows, under other names
        if fs.exists(log):
            from . import lake

            own = {p.rstrip("/").rsplit("/", 1)[-1] for p in [*survey.parts.values(), *survey.rewrites]}
            rewritten = [self.path(n) for n in lake.table_files(self) if n not in own and "/" not in n]
            fs.rm(log, recursive=True)
        for path in [*survey.parts.values(), *survey.rewrites, *rewritten]:
            fs.rm_file(path)
        run_json = self.path(META_DIR, "run.json")
        if fs.exists(run_json):
            fs.rm_file(run_json)
        fs.invalidate_cache(self.path(META_DIR))
        try:
            children = fs.ls(self.path(META_DIR), detail=False)
        except FileNotFoundError:
            children = []
        for child in children:  # all but the lock of the run doing this (pipelines/lake.py)
            if child.rstrip("/").rsplit("/", 1)[-1] != "lock.json":
                fs.rm(child, recursive=True)
        fs.invalidate_cache(self.root)

    def clear_manifest(self) -> None:
        """Remove the shards of an earlier, unfinished listing (they are trusted only once run.json names them)."""
        target = self.path(META_DIR, "manifest")
        fs = self.fs
        if fs.exists(target):
            fs.rm(target, recursive=True)
            fs.invalidate_cache(target)

    def remove_fragments(self) -> None:
        """Remove what is left under ``_fcclip/fragments`` and ``_fcclip/tmp`` once every shard is committed (orphans
        of a killed run; a commit removes its own shard's fragments)."""
        fs = self.fs
        for relative in (FRAGMENTS, f"{META_DIR}/tmp"):
            target = self.path(relative)
            try:
                if fs.exists(target):
                    fs.rm(target, recursive=True)
            except FileNotFoundError:
                pass

    # ------------------------------------------------------------------ run settings
    def read_run(self) -> dict | None:
        try:
            return json.loads(self.read_bytes(f"{META_DIR}/run.json"))
        except FileNotFoundError:
            return None

    def write_run(self, run: dict) -> None:
        self.write_bytes(f"{META_DIR}/run.json", json.dumps(run, indent=1, sort_keys=True).encode())


@dataclass
class Survey:
    run: dict | None  # run.json's content, None when DEST holds no run's settings
    parts: dict[int, str]  # committed part files of that run: {shard: path}
    foreign: list[str]  # names directly under DEST that fcclip did not write (folders end in '/')
    rewrites: list[str] = field(default_factory=list)  # part files rewritten by an increment (pipelines/lake.py)


def new_run_id() -> str:
    return uuid.uuid4().hex[:16]


def rows_to_table(rows: Iterable[dict]) -> pa.Table:
    """Rows as Python dicts (segments as lists of dicts) -> a table with the output schema (tests, small tools)."""
    return pa.Table.from_pylist(list(rows), schema=SCHEMA)


def encode_part(rows: list[dict], file_metadata: dict[str, Any]) -> bytes:
    """The Parquet bytes of a part file holding ``rows`` (Python dicts)."""
    return encode_table(rows_to_table(rows), file_metadata)


# ---------------------------------------------------------------------------------------------------- fragments
FRAGMENTS = f"{META_DIR}/fragments"


def fragment_dir(shard: int) -> str:
    return f"{FRAGMENTS}/shard-{shard:06d}"


class DestinationWriteError(RuntimeError):
    """DEST did not take a write (disk full, no permission, a bucket gone, a folder where a file should be): a fault
    of the destination, not of the rows, so it ends the job rather than the rows becoming error rows."""


def write_fragment(dest: Destination, shard: int, table: pa.Table) -> str:
    """Write one chunk's rows (the output schema plus ``row``) as an Arrow IPC file under the shard's fragment folder,
    with a name no other write uses; returns its path relative to DEST. Never ends in ``.parquet``. A write that DEST
    refuses raises :class:`DestinationWriteError`."""
    sink = pa.BufferOutputStream()
    with pa.ipc.new_file(sink, table.schema) as writer:
        writer.write_table(table)
    first = int(table.column("row")[0].as_py()) if table.num_rows else 0
    name = f"{fragment_dir(shard)}/rows-{first:06d}-{uuid.uuid4().hex[:12]}.arrow"
    data = sink.getvalue().to_pybytes()
    try:
        dest.write_bytes(name, data)
    except Exception as e:
        raise DestinationWriteError(f"cannot write {dest.uri}/{name}: {type(e).__name__}: {e}") from e
    return name


def commit_shard(dest: Destination, shard: int, fragments: list[str], expected_rows: int,
                 file_metadata: dict[str, Any]) -> int:
    """Compose a shard's fragments into its part file, then delete the shard's fragment folder (with any orphans of an
    earlier, killed run). Each row is taken once (a fragment written twice by a retried task repeats rows: the first
    copy stands), in row order. Returns the number of rows."""
    tables = []
    for name in fragments:
        with pa.ipc.open_file(pa.BufferReader(dest.read_bytes(name))) as reader:
            tables.append(reader.read_all())
    table = pa.concat_tables(tables) if tables else SCHEMA.empty_table().append_column("row", pa.array([], pa.int32()))
    rows = table.column("row").to_numpy()
    order = np.argsort(rows, kind="stable")
    keep = order[np.concatenate([[True], np.diff(rows[order]) != 0])] if len(order) else order
    table = table.take(pa.array(keep))
    got = table.column("row").to_pylist()
    if got != list(range(expected_rows)):
        missing = sorted(set(range(expected_rows)) - set(got))
        raise RuntimeError(f"shard {shard}: the fragments do not cover its rows (missing {missing[:10]})")
    table = with_source_columns(dest, shard, table)
    write_part(dest, shard, table.drop_columns(["row"]), file_metadata)
    target = dest.path(fragment_dir(shard))
    fs = dest.fs
    try:
        fs.rm(target, recursive=True)
    except FileNotFoundError:
        pass
    return table.num_rows


def with_source_columns(dest: Destination, shard: int, table: pa.Table) -> pa.Table:
    """The shard's rows (in row order, with ``row``) with :data:`SOURCE_COLUMNS` from its manifest appended."""
    manifest = pq.read_table(io.BytesIO(dest.read_bytes(f"{META_DIR}/manifest/{manifest_name(shard)}")))
    if manifest.column("uri").to_pylist() != table.column("uri").to_pylist():
        raise RuntimeError(f"shard {shard}: its rows are not its manifest's URIs")
    for fld, name in zip(SOURCE_FIELDS, ("etag", "size", "mtime")):
        column = (manifest.column(name).cast(fld.type) if name in manifest.column_names
                  else pa.nulls(len(manifest), fld.type))
        table = table.append_column(fld, column)
    return table


def write_part(dest: Destination, shard: int, table: pa.Table, file_metadata: dict[str, Any]) -> None:
    """Write a shard's part file, atomically (the one way a part file comes into being; see the module docstring)."""
    dest.write_bytes(part_name(shard), encode_table(table, file_metadata))


def encode_table(table: pa.Table, file_metadata: dict[str, Any]) -> bytes:
    """The Parquet bytes of one shard, with the run's vocabulary and thresholds in the file's key-value metadata."""
    meta = dict(table.schema.metadata or {})
    meta.update({f"{METADATA_PREFIX}{k}".encode(): json.dumps(v, sort_keys=True).encode() for k, v in file_metadata.items()})
    table = table.replace_schema_metadata(meta)
    buf = io.BytesIO()
    pq.write_table(table, buf, compression="zstd")
    return buf.getvalue()


# --- reading a labeling output -------------------------------------------------------------------------------

class OutputError(ValueError):
    """A labeling output cannot be read; the message is one line a user can act on."""


class NotALabelingOutput(OutputError):
    """DEST is not (only) a labeling output."""


@dataclass
class LabelingOutput:
    """DEST's committed part files and what their footers say.

    Attributes:
        dest: DEST as given.
        fs: its filesystem.
        files: the part files (filesystem paths, sorted).
        urls: the same as URLs an fsspec-aware reader opens (``s3://bucket/...`` on object storage).
        columns: the top-level columns all files share.
        metadata: ``fcclip.*`` key (without the prefix) -> {value as JSON text: number of files}.
        vocabulary: the run's vocabulary (``fcclip.vocabulary``), as ``Vocabulary.to_dict`` writes it.
        version: the version of DEST's Delta table the files are of (the one asked for, or the current one when
            it was read); None when DEST is not a table (part files only).
    """

    dest: str
    fs: fsspec.AbstractFileSystem
    files: list[str]
    urls: list[str]
    columns: list[str]
    vocabulary: dict
    metadata: dict[str, Counter] = field(default_factory=dict)
    version: int | None = None

    def read(self, columns: list[str] | None = None) -> pa.Table:
        """The rows of these part files (the table's version that was opened) as one Arrow table: ``columns`` (default
        all), a column an older file lacks read as null. Read file by file, on this thread only, through ``fs``:
        where Arrow's own threads read through a file or filesystem written in Python (deltalake's
        ``to_pyarrow_table``, a dataset over s3fs, a threaded read of an fsspec file), they may drop their last
        reference to it as the interpreter exits, and Python 3.11 then aborts the process ("terminate called
        without an active exception", exit status 134) after the script's work is done."""
        tables = []
        for path in self.files:
            with self.fs.open(path, "rb") as f:
                parquet = PartFile(f, pre_buffer=False)
                names = parquet.schema_arrow.names
                wanted = None if columns is None else [c for c in columns if c in names]
                tables.append(parquet.read(columns=wanted, use_threads=False))
        table = pa.concat_tables(tables, promote_options="default")
        if columns is None:
            return table
        missing = [c for c in columns if c not in table.column_names]
        if missing:
            raise KeyError(f"{self.dest}: no part file has the column {missing[0]!r} (columns: {self.columns})")
        return table.select(columns)

    def arrow_schema(self, columns: list[str]) -> pa.Schema:
        """The Arrow schema of ``columns`` (all files share them) with plain types, read from one footer: what a
        reader of all the files (Ray Data's ``read_parquet(..., schema=)``) casts every file to, so that a file
        another program rewrote with view types (delta-rs' DELETE) unifies with the others."""
        with self.fs.open(self.files[0], "rb") as f:
            schema = PartFile(f).schema_arrow
        return pa.schema([schema.field(c) for c in columns])

    def categories(self) -> list[dict]:
        """The vocabulary's categories: ``[{"id", "names", "isthing", "color", ...}]``, in class-index order."""
        return list(self.vocabulary.get("categories", []))

    def colors(self) -> dict[int, tuple[int, int, int]]:
        """Category id -> colour."""
        out = {}
        for c in self.categories():
            if c.get("color") is not None and c.get("id") is not None:
                out[int(c["id"])] = tuple(int(v) for v in c["color"])
        return out

    def metadata_values(self, name: str) -> list[str]:
        """The distinct values of ``fcclip.NAME`` as text (strings unquoted, anything else as JSON), sorted."""
        out = []
        for text in sorted(self.metadata.get(name, Counter())):
            try:
                value = json.loads(text)
            except ValueError:
                value = text
            out.append(value if isinstance(value, str) else json.dumps(value, sort_keys=True))
        return out


def _plain_type(t: pa.DataType) -> pa.DataType:
    if pa.types.is_string_view(t) or pa.types.is_large_string(t):
        return pa.string()
    if pa.types.is_binary_view(t) or pa.types.is_large_binary(t):
        return pa.binary()
    if pa.types.is_fixed_size_list(t):
        return pa.list_(pa.field(t.value_field.name, _plain_type(t.value_type), t.value_field.nullable), t.list_size)
    if pa.types.is_list(t) or pa.types.is_large_list(t) or pa.types.is_list_view(t) or pa.types.is_large_list_view(t):
        return pa.list_(pa.field(t.value_field.name, _plain_type(t.value_type), t.value_field.nullable))
    if pa.types.is_struct(t):
        return pa.struct([pa.field(f.name, _plain_type(f.type), f.nullable, f.metadata) for f in t])
    return t


def plain_schema(schema: pa.Schema) -> pa.Schema:
    """``schema`` with Arrow's plain string, binary and list types in place of view and large ones."""
    return pa.schema([pa.field(f.name, _plain_type(f.type), f.nullable, f.metadata) for f in schema],
                     metadata=schema.metadata)


def plain_types(data):
    """A table or record batch of part files with Arrow's plain string, binary and list types: a file another
    program rewrote (delta-rs' DELETE) may hold view or large types, which do not concatenate with fcclip's and
    which some of pyarrow's compute functions (``is_in``, ``take``) do not take."""
    schema = plain_schema(data.schema)
    return data if schema.equals(data.schema) else data.cast(schema)


class PartFile(pq.ParquetFile):
    """A part file of a labeling output, read as fcclip wrote it whoever wrote it last: every read (``read``,
    ``read_row_group(s)``, ``iter_batches``) and ``schema_arrow`` come with plain types (`plain_types`). Open every
    part file with it: delta-rs' DELETE rewrites a file with ``string_view`` columns."""

    @property
    def schema_arrow(self) -> pa.Schema:
        return plain_schema(super().schema_arrow)

    def read(self, *args, **kwargs) -> pa.Table:
        return plain_types(super().read(*args, **kwargs))

    def read_row_group(self, *args, **kwargs) -> pa.Table:
        return plain_types(super().read_row_group(*args, **kwargs))

    def read_row_groups(self, *args, **kwargs) -> pa.Table:
        return plain_types(super().read_row_groups(*args, **kwargs))

    def iter_batches(self, *args, **kwargs) -> Iterator[pa.RecordBatch]:
        return map(plain_types, super().iter_batches(*args, **kwargs))


def _short(paths: list[str]) -> str:
    names = [p.rsplit("/", 1)[-1] for p in paths[:_SHOWN_FILES]]
    more = f" and {len(paths) - _SHOWN_FILES} more" if len(paths) > _SHOWN_FILES else ""
    return ", ".join(names) + more


def _plural(n: int, word: str) -> str:
    return f"{n} {word}" if n == 1 else f"{n} {word}s"


def _read_footer(fs: fsspec.AbstractFileSystem, path: str) -> tuple[list[str] | None, dict[bytes, bytes], str]:
    """(column names, key-value metadata, why not readable, as one line) of one Parquet file; reads only its
    footer."""
    try:
        with fs.open(path, "rb") as f:
            schema = pq.read_schema(f)
    except Exception as e:  # not Parquet at all, truncated, unreadable: the caller names the file
        return None, {}, " ".join(f"{type(e).__name__}: {e}".split())
    return list(schema.names), dict(schema.metadata or {}), ""


def open_output(dest: str, version: int | None = None) -> LabelingOutput:
    """List and check DEST's part files, reading only their footers: those of the table's current version (or of
    ``version``) when DEST is a Delta table (``DEST/_delta_log``), else ``DEST/*.parquet``.

    Raises:
        NotALabelingOutput: DEST is missing, holds no ``*.parquet`` file, or holds one that fcclip did not write
            (without the output's columns or without ``fcclip.vocabulary`` metadata).
        OutputError: a ``*.parquet`` file cannot be read as Parquet (named in the message).
    """
    fs, root = fsspec.core.url_to_fs(dest)
    root = root.rstrip("/")
    if not fs.isdir(root):
        what = "a file" if fs.exists(root) else "no such folder"
        raise NotALabelingOutput(f"{dest} is not a labeling output: {what}")
    from . import lake  # lake builds on this module

    table = Destination(dest)
    in_table = lake.has_table(table)
    if in_table:
        try:
            version, names = lake.versioned_files(table, version)
            files = [table.path(name) for name in names]
        except Exception as e:  # a version the log does not have (vacuumed, or not yet written)
            which = "the current version" if version is None else f"version {version}"
            raise OutputError(f"{dest}: cannot read {which} of its table ({' '.join(str(e).split())[:200]})") from None
        if not files:
            raise NotALabelingOutput(f"{dest} is not a labeling output: its table's version holds no part file")
    elif version is not None:
        raise OutputError(f"{dest} is not a Delta table (no _delta_log): it has no version {version}")
    else:
        found = fs.glob(f"{root}/*.parquet", detail=True)
        files = sorted(p for p, info in found.items() if info.get("type", "file") == "file")
        if not files:
            raise NotALabelingOutput(f"{dest} is not a labeling output: it holds no part file (*.parquet)")

    foreign: list[tuple[str, str]] = []
    table_metadata = TableMetadata(table)  # read where a file of the table lacks fcclip keys
    columns: set[str] | None = None
    metadata: dict[str, Counter] = {}
    vocabularies: Counter = Counter()
    for path in files:
        names, meta, unreadable = _read_footer(fs, path)
        if unreadable:
            name = path.rsplit('/', 1)[-1]
            if in_table and unreadable.startswith("FileNotFoundError"):  # removed by a vacuum, or by hand
                raise OutputError(f"{dest}: cannot read version {version} of its table: its part file {name} is gone "
                                  "(a vacuum removes the files only past versions refer to)")
            raise OutputError(f"{dest}: cannot read {name} as Parquet ({unreadable})")
        missing = [c for c in REQUIRED_COLUMNS if c not in names]
        if in_table and not missing:
            meta = table_metadata(meta)
        if missing or VOCABULARY_KEY not in meta:
            foreign.append((path, f"no column {missing[0]!r}" if missing else "no fcclip.vocabulary metadata"))
            continue
        columns = set(names) if columns is None else columns & set(names)
        for raw_key, raw_value in meta.items():
            key = raw_key.decode("utf-8", "replace")
            if key.startswith(METADATA_PREFIX):
                metadata.setdefault(key[len(METADATA_PREFIX):], Counter())[raw_value.decode("utf-8", "replace")] += 1
        vocabularies[meta[VOCABULARY_KEY]] += 1

    if foreign:
        paths = [p for p, _ in foreign]
        if len(foreign) == len(files):
            raise NotALabelingOutput(
                f"{dest} is not a labeling output: {_plural(len(files), 'Parquet file')} but none written by "
                f"fcclip label ({_short(paths)}: {foreign[0][1]})"
            )
        raise NotALabelingOutput(
            f"{dest} mixes a labeling output with {_plural(len(foreign), 'Parquet file')} that fcclip label did not "
            f"write ({_short(paths)}: {foreign[0][1]}); move them out, or point at a folder of one run"
        )
    if len(vocabularies) > 1:
        raise NotALabelingOutput(
            f"{dest} holds part files of {len(vocabularies)} runs with different vocabularies; point at one run"
        )
    try:
        vocabulary = json.loads(next(iter(vocabularies)))
    except ValueError as e:
        raise NotALabelingOutput(f"{dest}: the fcclip.vocabulary metadata is not JSON ({e})") from None
    if not isinstance(vocabulary, dict) or not isinstance(vocabulary.get("categories"), list):
        raise NotALabelingOutput(f"{dest}: the fcclip.vocabulary metadata has no list of categories")
    urls = [fs.unstrip_protocol(p) if _has_protocol(dest) else p for p in files]
    return LabelingOutput(dest=dest, fs=fs, files=files, urls=urls, columns=sorted(columns or ()),
                          vocabulary=vocabulary, metadata=metadata, version=version)


class TableMetadata:
    """The key-value metadata of a table's part files, as a reader sees them: a file without fcclip's keys (another
    program rewrote it: a compaction, a DELETE) takes those the table's files were added with
    (``_fcclip/table.json``, read once, at the first such file)."""

    def __init__(self, dest: "Destination"):
        self.dest = dest
        self._recorded: dict[bytes, bytes] | None = None

    def __call__(self, footer: dict[bytes, bytes]) -> dict[bytes, bytes]:
        if VOCABULARY_KEY in footer:
            return footer
        if self._recorded is None:
            from . import lake

            self._recorded = {k.encode(): v.encode() for k, v in lake.table_metadata(self.dest).items()}
        return {**footer, **self._recorded}


def add_version_argument(p, what: str = "DEST") -> None:
    """``--version N``: the commands that read a labeling output read version N of its table (default: current)."""
    p.add_argument("--version", type=int, default=None, metavar="N",
                   help=f"read version N of {what}'s table (DEST/_delta_log; default: the current version)")


def _has_protocol(dest: str) -> bool:
    return "://" in dest and not dest.startswith("file://")


def segment_map(segments: list[dict], height: int, width: int) -> np.ndarray:
    """(H, W) int32 segment ids of one output row, painted from its segments' RLEs (0 where none; in id order, so a
    later id paints over an earlier one should masks overlap). Raises ValueError if a mask is not (height, width)."""
    out = np.zeros((height, width), dtype=np.int32)
    for s in sorted(segments, key=lambda s: s["id"]):
        size = [int(v) for v in s["rle"]["size"]]
        if size != [height, width]:
            raise ValueError(f"segment {s['id']}'s mask is {size[1]} x {size[0]}, the image {width} x {height}")
        out[decode_rle(s["rle"])] = int(s["id"])
    return out
