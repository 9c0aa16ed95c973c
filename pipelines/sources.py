"""SOURCE -> a stream of image URIs -> the run's sharded manifest under DEST/_fcclip/manifest.

SOURCE is one of:
- a manifest file (local or remote): ``.parquet`` or ``.csv`` with a ``uri`` column, or ``.txt`` / ``.lst`` with one
  URI a line; read in batches, never whole into memory. Relative entries are taken relative to the manifest's folder.
- a glob (``/data/**/*.jpg``, ``s3://bucket/photos/*.png``);
- a folder or an object-store prefix (``/data/photos``, ``s3://bucket/photos/``, ``gs://...``): every file below it
  with an image extension (``--extensions``); S3 prefixes are listed page by page.
"""
from __future__ import annotations

import csv
import hashlib
import io
import logging
import os
import posixpath
from dataclasses import dataclass
from typing import Callable, Iterator

import fsspec
import pyarrow as pa
import pyarrow.parquet as pq

from .output import META_DIR, Destination, manifest_name

logger = logging.getLogger(__name__)

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".tif", ".tiff", ".gif", ".jfif", ".ppm", ".pgm")
MANIFEST_EXTENSIONS = (".parquet", ".csv", ".txt", ".lst")


class SourceError(ValueError):
    """SOURCE cannot be read."""


def _join(base: str, entry: str) -> str:
    if "://" in entry or entry.startswith("/"):
        return entry
    return posixpath.join(base, entry) if "://" in base else os.path.join(base, entry)


def _protocol_prefix(uri: str) -> str:
    return uri.split("://", 1)[0] + "://" if "://" in uri else ""


def iter_manifest(uri: str, batch_rows: int = 65536) -> Iterator[str]:
    """URIs of a manifest file, streamed."""
    base = uri.rsplit("/", 1)[0] if "/" in uri else "."
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


def _iter_s3_prefix(uri: str) -> Iterator[str]:
    import boto3

    bucket, _, prefix = uri[len("s3://") :].partition("/")
    if prefix and not prefix.endswith("/"):
        prefix += "/"
    paginator = boto3.client("s3").get_paginator("list_objects_v2")
    for page in paginator.paginate(Bucket=bucket, Prefix=prefix):
        for obj in page.get("Contents", []):
            yield f"s3://{bucket}/{obj['Key']}"


def _iter_local_folder(root: str) -> Iterator[str]:
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames.sort()
        for name in sorted(filenames):
            yield os.path.join(dirpath, name)


def iter_source(source: str, extensions: tuple[str, ...] = IMAGE_EXTENSIONS) -> Iterator[tuple[str, bool]]:
    """(uri, selected) for every entry of SOURCE; ``selected`` is False for listed files without an image
    extension (counted and reported, not labeled). Manifest entries are always selected."""
    extensions = tuple(e.lower() for e in extensions)
    fs, path = fsspec.core.url_to_fs(source)
    prefix = _protocol_prefix(source)
    if source.lower().endswith(MANIFEST_EXTENSIONS) and fs.isfile(path):
        for uri in iter_manifest(source):
            yield uri, True
        return
    if any(ch in source for ch in "*?["):
        entries = (prefix + p if prefix else p for p in sorted(fs.glob(path)) if not fs.isdir(p))
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
        entries = (prefix + p for p in sorted(fs.find(path)))
    for uri in entries:
        name = uri.rsplit("/", 1)[-1]
        if name.startswith("."):
            continue
        yield uri, name.lower().endswith(extensions)


@dataclass
class ManifestSummary:
    num_images: int
    num_shards: int
    shard_sizes: list[int]
    skipped: int  # listed files without an image extension
    duplicates: int  # URIs listed more than once (labeled once)


def write_manifest(
    source: str,
    dest: Destination,
    shard_size: int,
    extensions: tuple[str, ...] = IMAGE_EXTENSIONS,
    on_listed: Callable[[int], None] | None = None,
) -> ManifestSummary:
    """Stream SOURCE into shards of ``shard_size`` URIs under DEST/_fcclip/manifest (memory: one shard, plus 8 bytes
    per URI to drop duplicates). ``on_listed(n)`` is told of each shard's ``n`` URIs as it is written."""
    if shard_size < 1:
        raise ValueError("shard size must be >= 1")
    seen: set[bytes] = set()
    shard, buffer, sizes = 0, [], []
    skipped = duplicates = 0

    def flush():
        nonlocal shard, buffer
        table = pa.table({"row": pa.array(range(len(buffer)), pa.int32()), "uri": pa.array(buffer, pa.string())})
        out = io.BytesIO()
        pq.write_table(table, out, compression="zstd")
        dest.write_bytes(f"{META_DIR}/manifest/{manifest_name(shard)}", out.getvalue())
        sizes.append(len(buffer))
        if on_listed is not None:
            on_listed(len(buffer))
        shard, buffer = shard + 1, []

    for uri, selected in iter_source(source, extensions):
        if not selected:
            skipped += 1
            continue
        key = hashlib.blake2b(uri.encode(), digest_size=8).digest()
        if key in seen:
            duplicates += 1
            continue
        seen.add(key)
        buffer.append(uri)
        if len(buffer) == shard_size:
            flush()
    if buffer:
        flush()
    return ManifestSummary(sum(sizes), len(sizes), sizes, skipped, duplicates)


def read_manifest_shard(dest: Destination, shard: int) -> list[str]:
    data = dest.read_bytes(f"{META_DIR}/manifest/{manifest_name(shard)}")
    table = pq.read_table(io.BytesIO(data))
    return table.column("uri").to_pylist()
