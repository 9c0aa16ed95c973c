"""A labeling output as a reader finds it: DEST's part files, checked to be fcclip's, and the run's metadata.

``fcclip show`` and ``fcclip export`` both start here. A folder is a labeling output when it holds at least one
``*.parquet`` file and every one of them has the columns of ``pipelines.sink.SCHEMA`` that a reader needs and the
run's vocabulary in its key-value metadata (``fcclip.vocabulary``). Anything else is refused with one line that
says what was found, before any row is read: an empty or missing folder, someone else's Parquet files, or a mix of
both (where a glob would return rows of either).
"""
from __future__ import annotations

import json
from collections import Counter
from dataclasses import dataclass, field

import fsspec
import numpy as np
import pyarrow.parquet as pq

from fcclip.masks import decode_rle

__all__ = ["LabelingOutput", "NotALabelingOutput", "OutputError", "open_output", "segment_map"]

REQUIRED_COLUMNS = ("uri", "image_id", "width", "height", "status", "error", "segments")
"""Columns every part file has (``pipelines.sink.SCHEMA``); the run columns (``run_id``, ``model``, ...) may not."""
VOCABULARY_KEY = b"fcclip.vocabulary"
_SHOWN_FILES = 3


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
    """

    dest: str
    fs: fsspec.AbstractFileSystem
    files: list[str]
    urls: list[str]
    columns: list[str]
    vocabulary: dict
    metadata: dict[str, Counter] = field(default_factory=dict)

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


def open_output(dest: str) -> LabelingOutput:
    """List and check DEST's part files (``DEST/*.parquet``), reading only their footers.

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
    found = fs.glob(f"{root}/*.parquet", detail=True)
    files = sorted(p for p, info in found.items() if info.get("type", "file") == "file")
    if not files:
        raise NotALabelingOutput(f"{dest} is not a labeling output: it holds no part file (*.parquet)")

    foreign: list[tuple[str, str]] = []
    columns: set[str] | None = None
    metadata: dict[str, Counter] = {}
    vocabularies: Counter = Counter()
    for path in files:
        names, meta, unreadable = _read_footer(fs, path)
        if unreadable:
            raise OutputError(f"{dest}: cannot read {path.rsplit('/', 1)[-1]} as Parquet ({unreadable})")
        missing = [c for c in REQUIRED_COLUMNS if c not in names]
        if missing or VOCABULARY_KEY not in meta:
            foreign.append((path, f"no column {missing[0]!r}" if missing else "no fcclip.vocabulary metadata"))
            continue
        columns = set(names) if columns is None else columns & set(names)
        for raw_key, raw_value in meta.items():
            key = raw_key.decode("utf-8", "replace")
            if key.startswith("fcclip."):
                metadata.setdefault(key[len("fcclip."):], Counter())[raw_value.decode("utf-8", "replace")] += 1
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
                          vocabulary=vocabulary, metadata=metadata)


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
