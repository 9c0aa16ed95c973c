"""SOURCE -> a stream of image URIs -> the run's sharded manifest under DEST/_fcclip/manifest.

SOURCE is one of:
- a manifest file (local or remote): ``.parquet`` or ``.csv`` with a ``uri`` column, or ``.txt`` / ``.lst`` with one
  URI a line; read in batches, never whole into memory. Relative entries are taken relative to the manifest's folder.
- a glob (``/data/**/*.jpg``, ``s3://bucket/photos/*.png``);
- a folder or an object-store prefix (``/data/photos``, ``s3://bucket/photos/``, ``gs://...``): every file below it
  with an image extension (``--extensions``); S3 prefixes are listed page by page;
- an S3 Inventory report's data file (``.parquet`` or ``.csv`` with a header, ``.csv.gz``): ``bucket`` and ``key``
  columns, and where present ``size``, ``last_modified_date`` and ``e_tag`` (the report's own column names), so that a
  lake of a billion objects is listed from yesterday's report instead of hours of LIST requests. Keys are taken as
  written (URL-decoded when the report says so in its ``manifest.json``: pass that file as SOURCE).

With each URI its object's ETag, size and modification time are listed where the source gives them (an S3 LIST, a
local folder, an inventory report; a plain manifest gives none): :func:`iter_source_entries`. They are stored per row
(``source_etag``, ``source_size``, ``source_mtime``) and let a later run tell a changed object from an unchanged one
(pipelines/lake.py).
"""
from __future__ import annotations

import csv
import datetime
import json
import io
import logging
import os
import posixpath
from typing import Callable, Iterator, NamedTuple
from urllib.parse import unquote_plus

import fsspec
import pyarrow as pa
import pyarrow.parquet as pq

from .output import META_DIR, Destination, manifest_name, stat_version, version_of

logger = logging.getLogger(__name__)

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".tif", ".tiff", ".gif", ".jfif", ".ppm", ".pgm")
MANIFEST_EXTENSIONS = (".parquet", ".csv", ".txt", ".lst", ".csv.gz", "manifest.json")
MTIME = pa.timestamp("us", tz="UTC")


class Entry(NamedTuple):
    """One listed object: its URI, whether it is selected (an image extension), and what the listing says of it."""

    uri: str
    selected: bool
    etag: str | None = None
    size: int | None = None
    mtime: datetime.datetime | None = None


class SourceError(ValueError):
    """SOURCE cannot be read."""


def _join(base: str, entry: str) -> str:
    if "://" in entry or entry.startswith("/"):
        return entry
    return posixpath.join(base, entry) if "://" in base else os.path.normpath(os.path.join(base, entry))


UNREADABLE = (pa.ArrowException, UnicodeDecodeError, csv.Error, json.JSONDecodeError)  # a corrupt or foreign file


def _unreadable(uri: str, e: Exception) -> SourceError:
    """SourceError for a manifest that is not what its extension says (one of UNREADABLE)."""
    if isinstance(e, UnicodeDecodeError):
        what = "not UTF-8 text"
    elif isinstance(e, pa.ArrowException):
        what = "not a readable Parquet file"
    else:
        what = "cannot be parsed"
    first_line = (str(e).strip().splitlines() or [type(e).__name__])[0]
    return SourceError(f"manifest {uri}: {what} ({first_line})")


def _protocol_prefix(uri: str) -> str:
    return uri.split("://", 1)[0] + "://" if "://" in uri else ""


def iter_manifest(uri: str, batch_rows: int = 65536) -> Iterator[str]:
    """URIs of a manifest file, streamed; relative entries are relative to the manifest's folder (absolute local paths
    for a local manifest)."""
    base = uri.rsplit("/", 1)[0] if "://" in uri else os.path.dirname(os.path.abspath(uri))
    try:
        yield from _iter_manifest(uri, base, batch_rows)
    except UNREADABLE as e:
        raise _unreadable(uri, e) from None


def _iter_manifest(uri: str, base: str, batch_rows: int) -> Iterator[str]:
    lower = uri.lower()
    with fsspec.open(uri, "rb") as f:
        if lower.endswith(".parquet"):
            pf = pq.ParquetFile(f)
            if "uri" not in pf.schema_arrow.names:
                raise SourceError(f"manifest {uri}: no 'uri' column (columns: {pf.schema_arrow.names})")
            for batch in pf.iter_batches(batch_size=batch_rows, columns=["uri"]):
                for value in batch.column(0).to_pylist():
                    if value:
                        yield _join(base, value.strip())
        elif lower.endswith(".csv"):
            reader = csv.DictReader(io.TextIOWrapper(f, encoding="utf-8", newline=""))
            if not reader.fieldnames or "uri" not in reader.fieldnames:
                raise SourceError(f"manifest {uri}: no 'uri' column in the CSV header ({reader.fieldnames})")
            for record in reader:
                value = (record.get("uri") or "").strip()
                if value:
                    yield _join(base, value)
        else:
            for line in io.TextIOWrapper(f, encoding="utf-8"):
                line = line.strip()
                if line and not line.startswith("#"):
                    yield _join(base, line)


def s3_client():
    """A botocore S3 client, configured as the AWS tools are (environment, profile, ``AWS_ENDPOINT_URL``).

    botocore, not boto3: botocore comes with s3fs (through aiobotocore, which pins its release), while a boto3 of
    the user's own would have to match that pin."""
    import botocore.session

    return botocore.session.get_session().create_client("s3")


def _iter_s3_prefix(uri: str) -> Iterator[tuple[str, str | None, int | None, datetime.datetime | None]]:
    bucket, _, prefix = uri[len("s3://") :].partition("/")
    if prefix and not prefix.endswith("/"):
        prefix += "/"
    from botocore.exceptions import ClientError

    paginator = s3_client().get_paginator("list_objects_v2")
    try:
        for page in paginator.paginate(Bucket=bucket, Prefix=prefix):
            for obj in page.get("Contents", []):
                yield f"s3://{bucket}/{obj['Key']}", obj.get("ETag"), obj.get("Size"), obj.get("LastModified")
    except ClientError as e:  # a typo'd bucket is the command's mistake (status 2), not the storage refusing us
        if e.response.get("Error", {}).get("Code") != "NoSuchBucket":
            raise
        raise SourceError(f"{uri}: no such bucket ({bucket})") from None


def _iter_local_folder(root: str) -> Iterator[tuple[str, str | None, int | None, datetime.datetime | None]]:
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames.sort()
        for name in sorted(filenames):
            path = os.path.join(dirpath, name)
            yield (path, None, *_stat(path))


def _stat(path: str) -> tuple[int | None, datetime.datetime | None]:
    try:
        version = stat_version(os.stat(path))
    except OSError:
        return None, None
    return version["source_size"], version["source_mtime"]


def _from_info(info: dict) -> tuple[str | None, int | None, datetime.datetime | None]:
    """ETag, size and modification time from an fsspec listing's entry (names differ between filesystems)."""
    version = version_of(info)
    return version["source_etag"], version["source_size"], version["source_mtime"]


def iter_source(source: str, extensions: tuple[str, ...] = IMAGE_EXTENSIONS) -> Iterator[tuple[str, bool]]:
    """(uri, selected) for every entry of SOURCE; ``selected`` is False for listed files without an image
    extension (counted and reported, not labeled). Manifest entries are always selected."""
    for entry in iter_source_entries(source, extensions):
        yield entry.uri, entry.selected


def iter_source_entries(source: str, extensions: tuple[str, ...] = IMAGE_EXTENSIONS) -> Iterator[Entry]:
    """Every entry of SOURCE with what its listing says (:class:`Entry`); as :func:`iter_source`."""
    extensions = tuple(e.lower() for e in extensions)
    fs, path = fsspec.core.url_to_fs(source)
    if "://" not in source or source.startswith("file://"):  # `..` collapsed: an image's URI is one string however
        path = os.path.normpath(path)  # SOURCE was typed (fsspec makes a relative path absolute, `..` and all)
    prefix = _protocol_prefix(source)
    if source.lower().endswith(MANIFEST_EXTENSIONS) and fs.isfile(path):
        try:
            inventory = _inventory_columns(source)
            if inventory is not None:
                yield from iter_inventory(source, inventory)
                return
        except UNREADABLE as e:
            raise _unreadable(source, e) from None
        for uri in iter_manifest(source):
            yield Entry(uri, True)
        return
    if any(ch in source for ch in "*?["):
        found = fs.glob(path, detail=True)
        entries = ((prefix + p if prefix else p, *_from_info(found[p])) for p in sorted(found)
                   if found[p].get("type") != "directory")
    elif source.startswith("s3://"):
        entries = _iter_s3_prefix(source)
    elif "://" not in source or source.startswith("file://"):
        if not os.path.isdir(path):
            if os.path.isfile(path):
                raise SourceError(
                    f"{source}: a single file that is not a manifest ({', '.join(MANIFEST_EXTENSIONS)}); pass its "
                    "folder, a glob, or a manifest"
                )
            raise SourceError(f"{source}: no such folder, manifest or glob")
        entries = _iter_local_folder(path)
    else:
        if not fs.exists(path):
            raise SourceError(f"{source}: nothing found there")
        found = fs.find(path, detail=True)
        entries = ((prefix + p, *_from_info(found[p])) for p in sorted(found))
    for uri, etag, size, mtime in entries:
        name = uri.rsplit("/", 1)[-1]
        if name.startswith("."):
            continue
        yield Entry(uri, name.lower().endswith(extensions), etag, size, mtime)


# ---------------------------------------------------------------------------------------------------- S3 Inventory
_INVENTORY_NAMES = {"bucket": "bucket", "key": "key", "size": "size", "lastmodifieddate": "last_modified_date",
                    "etag": "e_tag"}


def _inventory_columns(source: str) -> dict | None:
    """{"format", "files", "columns", "encoded"} when SOURCE is an S3 Inventory report (its manifest.json, or a data
    file with ``bucket`` and ``key`` columns); else None (a plain manifest)."""
    lower = source.lower()
    if lower.endswith("manifest.json"):
        with fsspec.open(source, "rb") as f:
            manifest = json.load(f)
        bucket = manifest["destinationBucket"].rsplit(":", 1)[-1]
        schema = manifest.get("fileSchema", "")
        fmt = manifest.get("fileFormat", "CSV").lower()
        files = [f"s3://{bucket}/{f['key']}" for f in manifest.get("files", [])]
        if fmt == "csv":
            columns = [_INVENTORY_NAMES.get(c.strip().lower(), c.strip().lower()) for c in schema.split(",")]
        else:
            columns = None  # Parquet and ORC files name their columns
        if fmt not in ("csv", "parquet"):
            raise SourceError(f"{source}: S3 Inventory in {fmt.upper()}; CSV or Parquet are read")
        return {"format": fmt, "files": files, "columns": columns, "encoded": fmt == "csv"}
    if lower.endswith(".parquet"):
        with fsspec.open(source, "rb") as f:
            names = [n.lower() for n in pq.ParquetFile(f).schema_arrow.names]
        return {"format": "parquet", "files": [source], "columns": None, "encoded": False} \
            if "bucket" in names and "key" in names and "uri" not in names else None
    if lower.endswith((".csv", ".csv.gz")):
        with fsspec.open(source, "rt", compression="infer", encoding="utf-8", newline="") as f:
            header = [c.strip().lower() for c in next(csv.reader(f), [])]
        if "bucket" in header and "key" in header and "uri" not in header:
            return {"format": "csv", "files": [source], "columns": None, "encoded": False}
    return None


def iter_inventory(source: str, inventory: dict, batch_rows: int = 65536) -> Iterator[Entry]:
    """The objects of an S3 Inventory report, streamed (see the module docstring)."""
    for uri in inventory["files"]:
        if inventory["format"] == "parquet":
            with fsspec.open(uri, "rb") as f:
                pf = pq.ParquetFile(f)
                lower = {n.lower(): n for n in pf.schema_arrow.names}
                wanted = [lower[c] for c in ("bucket", "key", "size", "last_modified_date", "e_tag") if c in lower]
                for batch in pf.iter_batches(batch_size=batch_rows, columns=wanted):
                    cols = {name.lower(): batch.column(name).to_pylist() for name in wanted}
                    for i in range(batch.num_rows):
                        yield _inventory_entry(cols, i, inventory["encoded"])
        else:
            with fsspec.open(uri, "rt", compression="infer", encoding="utf-8", newline="") as f:
                if inventory["columns"] is None:
                    reader = csv.DictReader(f)
                    reader.fieldnames = [c.strip().lower() for c in reader.fieldnames or []]
                else:
                    reader = csv.DictReader(f, fieldnames=inventory["columns"])
                for record in reader:
                    yield _inventory_entry({k: [v] for k, v in record.items()}, 0, inventory["encoded"])


def _inventory_entry(cols: dict, i: int, encoded: bool) -> Entry:
    key = cols["key"][i]
    if encoded:
        key = unquote_plus(key)
    size = cols.get("size", [None])[i]
    mtime = cols.get("last_modified_date", [None])[i]
    if isinstance(mtime, str) and mtime:
        mtime = datetime.datetime.fromisoformat(mtime.replace("Z", "+00:00"))
    if isinstance(mtime, datetime.datetime) and mtime.tzinfo is None:
        mtime = mtime.replace(tzinfo=datetime.timezone.utc)
    etag = cols.get("e_tag", [None])[i] or None
    if etag and not etag.startswith('"'):
        etag = f'"{etag}"'  # as a LIST gives it
    return Entry(f"s3://{cols['bucket'][i]}/{key}", True, etag, int(size) if size not in (None, "") else None,
                 mtime or None)


# ---------------------------------------------------------------------------------------------------- the listing
LISTING_SCHEMA = pa.schema([("uri", pa.string()), ("etag", pa.string()), ("size", pa.int64()), ("mtime", MTIME),
                            ("ord", pa.int64())])


def list_to_parquet(source: str, work: str, extensions: tuple[str, ...] = IMAGE_EXTENSIONS,
                    on_listed: Callable[[int], None] | None = None, file_rows: int = 1 << 20) -> dict:
    """Stream SOURCE's selected entries into Parquet files under ``work/listing`` (``LISTING_SCHEMA``; ``ord`` the
    listing order), ``file_rows`` rows each: memory is one file's rows. Returns ``{"listed", "skipped"}``."""
    os.makedirs(f"{work}/listing", exist_ok=True)
    cols: dict[str, list] = {n: [] for n in LISTING_SCHEMA.names}
    listed = skipped = files = 0

    def flush():
        nonlocal files
        pq.write_table(pa.table(cols, schema=LISTING_SCHEMA), f"{work}/listing/{files:06d}.parquet")
        files += 1
        if on_listed is not None:
            on_listed(len(cols["uri"]))
        for v in cols.values():
            v.clear()

    for entry in iter_source_entries(source, extensions):
        if not entry.selected:
            skipped += 1
            continue
        cols["uri"].append(entry.uri)
        cols["etag"].append(entry.etag)
        cols["size"].append(entry.size)
        cols["mtime"].append(entry.mtime)
        cols["ord"].append(listed)
        listed += 1
        if len(cols["uri"]) >= file_rows:
            flush()
    if cols["uri"] or not files:
        flush()
    return {"listed": listed, "skipped": skipped}


MANIFEST_SCHEMA = pa.schema([("uri", pa.string()), ("etag", pa.string()), ("size", pa.int64()), ("mtime", MTIME)])


def write_manifest_shard(dest: Destination, shard: int, table: pa.Table) -> None:
    """Write one manifest shard: ``row`` (its place in the shard), ``uri``, the listed ``etag``, ``size`` and
    ``mtime``, and ``replaces`` (the part file holding the URI's old row, for a changed object) where given."""
    table = table.select([n for n in ("uri", "etag", "size", "mtime", "replaces") if n in table.column_names])
    table = table.add_column(0, "row", pa.array(range(table.num_rows), pa.int32()))
    out = io.BytesIO()
    pq.write_table(table, out, compression="zstd")
    dest.write_bytes(f"{META_DIR}/manifest/{manifest_name(shard)}", out.getvalue())


def read_manifest_shard(dest: Destination, shard: int) -> list[str]:
    data = dest.read_bytes(f"{META_DIR}/manifest/{manifest_name(shard)}")
    table = pq.read_table(io.BytesIO(data))
    return table.column("uri").to_pylist()
