"""``fcclip export``: a labeling output in the formats other tools train on.

    fcclip export DEST --format coco-panoptic|coco-instances|coco-semantic --out DIR [--batch-rows N]

What DIR holds, per format:

    coco-panoptic   DIR/panoptic.json     COCO panoptic: images, annotations (segments_info), categories
                    DIR/panoptic/ID.png   segment ids as RGB (id = R + 256 G + 256^2 B)
    coco-instances  DIR/instances.json    COCO instances: the thing segments, their RLEs as stored (compressed)
    coco-semantic   DIR/semantic.json     the class list (index, category id, name), the ignore value, the images
                    DIR/semantic/ID.png   the class index of each pixel (8-bit; 16-bit beyond 255 classes), the
                                          ignore value (255, or 65535) where no segment is

Categories come from the run's vocabulary (the ``fcclip.vocabulary`` key-value metadata of the part files): COCO
``category_id`` is the vocabulary's id, a semantic PNG holds the class index (the position in the vocabulary).
An image's COCO ``id`` is its row's ``image_id`` (16 hex digits of the URI's SHA-256) as an integer, the top bit
cleared (``coco_image_id``: below 2^63, for readers that hold ids as int64): the same image has the same id in every
export, of any version or run, so two exports pair their images by id as COCO's tools do. ``file_name`` is the
image's URI, and each PNG is named after the row's ``image_id``. Error rows are skipped and counted.

Memory stays bounded: the part files are read one after the other in batches of ``--batch-rows`` rows, one image's
masks are decoded at a time, and the JSON's ``images`` and ``annotations`` arrays are written to temporary files as
they grow and joined into the final JSON at the end. The JSON is written last: a DIR without it is an export that
did not finish, and the same command redoes it; a finished export is never overwritten.
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
import sys
import tempfile
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import fsspec
import numpy as np
import pyarrow as pa
from PIL import Image
from scipy import ndimage

from fcclip.masks import id2rgb
from fcclip_pipelines.arguments import COUNT
from fcclip_pipelines.output import (LabelingOutput, OutputError, PartFile, add_version_argument, open_output,
                                     segment_map)

logger = logging.getLogger("fcclip.export")

__all__ = ["FORMATS", "ExportSummary", "add_arguments", "export", "main", "main_args"]

FORMATS = ("coco-panoptic", "coco-instances", "coco-semantic")
_COLUMNS = ["uri", "image_id", "width", "height", "status", "segments"]
_JSON_NAME = {"coco-panoptic": "panoptic.json", "coco-instances": "instances.json", "coco-semantic": "semantic.json"}
_PNG_DIR = {"coco-panoptic": "panoptic", "coco-semantic": "semantic"}


class ExportError(ValueError):
    """The export cannot start (the message is one line a user can act on)."""


@dataclass
class ExportSummary:
    """What an export wrote and what it skipped."""

    images: int = 0  # ok rows exported
    segments: int = 0  # segments (annotations for coco-instances) written
    error_rows: int = 0  # rows with a status other than ok, skipped
    skipped_segments: int = 0  # segments left out: no category of the vocabulary, or no pixel
    stuff_segments: int = 0  # stuff segments, which coco-instances leaves out
    json_path: str = ""


# ------------------------------------------------------------------------------------------------ reading
def _rows(output: LabelingOutput, batch_rows: int) -> Iterator[dict]:
    """Every row of the output, part file by part file, ``batch_rows`` at a time (masks as stored)."""
    for path, url in zip(output.files, output.urls):
        try:
            with output.fs.open(path, "rb") as f:
                for batch in PartFile(f).iter_batches(batch_size=batch_rows, columns=_COLUMNS):
                    yield from batch.to_pylist()
        except (OSError, pa.ArrowException) as e:
            raise OutputError(f"cannot read {url}: {' '.join(str(e).split())}") from e


def _categories(output: LabelingOutput) -> list[dict]:
    """COCO categories from the run's vocabulary: id, name (the first synonym), isthing, color, supercategory."""
    out = []
    for c in output.categories():
        names = c.get("names") or [str(c["id"])]
        isthing = int(bool(c.get("isthing", 1)))
        entry = {"id": int(c["id"]), "name": names[0], "supercategory": "thing" if isthing else "stuff",
                 "isthing": isthing}
        if c.get("color") is not None:
            entry["color"] = [int(v) for v in c["color"]]
        if len(names) > 1:
            entry["synonyms"] = list(names[1:])
        out.append(entry)
    return out


# ------------------------------------------------------------------------------------------------ writing
class _JsonWriter:
    """One JSON object whose ``images`` and ``annotations`` arrays are streamed to temporary files and joined at
    the end (``finish``), so neither array is ever held in memory."""

    def __init__(self, tmp: str, head: dict):
        self.head = head
        self.arrays = {name: open(os.path.join(tmp, name), "w", encoding="utf-8") for name in ("images", "annotations")}
        self.count = dict.fromkeys(self.arrays, 0)

    def add(self, array: str, item: dict) -> None:
        f = self.arrays[array]
        f.write(("," if self.count[array] else "") + "\n" + json.dumps(item, separators=(",", ":")))
        self.count[array] += 1

    def finish(self, fs: fsspec.AbstractFileSystem, path: str) -> None:
        """Write the whole object to ``path``: to a temporary name first, renamed into place when complete."""
        for f in self.arrays.values():
            f.close()
        partial = f"{path}.inprogress"
        with fs.open(partial, "w", encoding="utf-8") as out:
            out.write(json.dumps(self.head, separators=(",", ":"))[:-1])  # without the closing brace
            for name, f in self.arrays.items():
                out.write(f',\n"{name}":[')
                with open(f.name, encoding="utf-8") as part:
                    shutil.copyfileobj(part, out)
                out.write("\n]")
            out.write("}\n")
        fs.mv(partial, path)


def _write_png(fs: fsspec.AbstractFileSystem, path: str, array: np.ndarray) -> None:
    with fs.open(path, "wb") as f:
        Image.fromarray(array).save(f, format="PNG")  # (H, W, 3) uint8: RGB; (H, W) uint8: L; uint16: I;16


def coco_image_id(image_id: str) -> int:
    """A row's ``image_id`` (16 hex digits) as a COCO image id: that integer, the top bit cleared."""
    return int(image_id, 16) & ((1 << 63) - 1)


def _image_entry(number: int, row: dict) -> dict:
    return {"id": number, "file_name": row["uri"], "width": int(row["width"]), "height": int(row["height"]),
            "fcclip_image_id": row["image_id"]}


def _painted(row: dict, known: set[int], summary: ExportSummary) -> tuple[np.ndarray, list[dict]]:
    """(H, W) segment ids of a row's segments of known categories, and those segments with the area and box they
    have on the map (a segment covered by later ones, or of an unknown category, is left out and counted)."""
    segments = [s for s in row["segments"] or [] if s.get("category_id") in known]
    ids = segment_map(segments, int(row["height"]), int(row["width"]))
    present = np.unique(ids)
    present = present[present != 0]
    compact = np.searchsorted(present, ids) + 1  # 1..k on segment pixels, for find_objects
    compact[ids == 0] = 0
    boxes = ndimage.find_objects(compact, max_label=len(present))
    areas = np.bincount(compact.ravel(), minlength=len(present) + 1)
    kept = []
    for s in segments:
        k = int(np.searchsorted(present, s["id"]))
        if k >= len(present) or present[k] != s["id"] or any(t["id"] == s["id"] for t in kept):
            continue
        rows, cols = boxes[k]
        kept.append(dict(s, area=int(areas[k + 1]),
                         bbox=[cols.start, rows.start, cols.stop - cols.start, rows.stop - rows.start]))
    summary.skipped_segments += len(row["segments"] or []) - len(kept)
    return ids, kept


class _Panoptic:
    """coco-panoptic: a PNG of segment ids per image, its segments_info in the JSON."""

    def __init__(self, fs, root: str, categories: list[dict]):
        self.fs, self.dir = fs, f"{root}/{_PNG_DIR['coco-panoptic']}"
        fs.makedirs(self.dir, exist_ok=True)
        self.known = {c["id"] for c in categories}

    def add(self, writer: _JsonWriter, number: int, row: dict, summary: ExportSummary) -> None:
        ids, segments = _painted(row, self.known, summary)
        name = f"{row['image_id']}.png"
        _write_png(self.fs, f"{self.dir}/{name}", id2rgb(ids))
        info = [{"id": int(s["id"]), "category_id": int(s["category_id"]), "iscrowd": 0, "bbox": s["bbox"],
                 "area": s["area"], "score": s.get("score")} for s in segments]
        writer.add("annotations", {"image_id": number, "file_name": name, "segments_info": info})
        summary.segments += len(info)


class _Instances:
    """coco-instances: one annotation per thing segment, its RLE as stored."""

    def __init__(self, fs, root: str, categories: list[dict]):
        self.things = {c["id"] for c in categories if c["isthing"]}
        self.stuff = {c["id"] for c in categories if not c["isthing"]}
        self.next_id = 1

    def add(self, writer: _JsonWriter, number: int, row: dict, summary: ExportSummary) -> None:
        for s in row["segments"] or []:
            if s.get("category_id") in self.stuff:
                summary.stuff_segments += 1
                continue
            if s.get("category_id") not in self.things or not s.get("area"):
                summary.skipped_segments += 1
                continue
            writer.add("annotations", {
                "id": self.next_id, "image_id": number, "category_id": int(s["category_id"]),
                "segmentation": {"size": [int(v) for v in s["rle"]["size"]], "counts": s["rle"]["counts"]},
                "area": int(s["area"]), "bbox": [float(v) for v in s["bbox"]], "iscrowd": 0, "score": s.get("score"),
            })
            self.next_id += 1
            summary.segments += 1


class _Semantic:
    """coco-semantic: a PNG of class indices per image (``ignore`` where no segment is)."""

    def __init__(self, fs, root: str, categories: list[dict]):
        self.fs, self.dir = fs, f"{root}/{_PNG_DIR['coco-semantic']}"
        fs.makedirs(self.dir, exist_ok=True)
        self.index = {c["id"]: i for i, c in enumerate(categories)}
        self.dtype = np.uint8 if len(categories) <= 255 else np.uint16
        self.ignore = int(np.iinfo(self.dtype).max)

    def add(self, writer: _JsonWriter, number: int, row: dict, summary: ExportSummary) -> None:
        ids, segments = _painted(row, set(self.index), summary)
        lut = np.full(int(ids.max(initial=0)) + 1, self.ignore, dtype=self.dtype)
        for s in segments:
            lut[int(s["id"])] = self.index[int(s["category_id"])]
        name = f"{row['image_id']}.png"
        _write_png(self.fs, f"{self.dir}/{name}", lut[ids])
        writer.add("annotations", {"image_id": number, "file_name": name})
        summary.segments += len(segments)


_WRITERS = {"coco-panoptic": _Panoptic, "coco-instances": _Instances, "coco-semantic": _Semantic}


def _head(output: LabelingOutput, fmt: str, categories: list[dict], target) -> dict:
    info = {"description": f"fcclip labels of {output.dest}", "format": fmt,
            "vocabulary": output.vocabulary.get("name")}
    for name in ("run_id", "model", "weights"):
        values = output.metadata_values(name)
        info[name] = values[0] if len(values) == 1 else values
    if fmt == "coco-instances":
        categories = [c for c in categories if c["isthing"]]
    head = {"info": info, "licenses": [], "categories": categories}
    if fmt == "coco-semantic":
        head["classes"] = [{"index": i, "id": c["id"], "name": c["name"], "isthing": c["isthing"]}
                           for i, c in enumerate(categories)]
        head["ignore_index"] = target.ignore
    return head


def export(dest: str, fmt: str, out: str, *, batch_rows: int = 64, version: int | None = None) -> ExportSummary:
    """Export the labeling output DEST to ``out`` in format ``fmt`` (see the module docstring).

    Raises:
        OutputError: DEST is not a labeling output (NotALabelingOutput), or a part file cannot be read (then the
            JSON is not written: the export is unfinished).
        ExportError: an unknown format, or ``out`` already holds a finished export of this format.
    """
    if fmt not in FORMATS:
        raise ExportError(f"unknown format {fmt!r}; choose one of {', '.join(FORMATS)}")
    output = open_output(dest, version)
    fs, root = fsspec.core.url_to_fs(out)
    root = root.rstrip("/") or root
    json_path = f"{root}/{_JSON_NAME[fmt]}"
    if fs.exists(json_path):
        raise ExportError(f"{out} already holds a finished {fmt} export ({_JSON_NAME[fmt]}); choose another --out")
    fs.makedirs(root, exist_ok=True)
    categories = _categories(output)
    target = _WRITERS[fmt](fs, root, categories)
    summary = ExportSummary(json_path=fs.unstrip_protocol(json_path) if "://" in out else json_path)
    with tempfile.TemporaryDirectory(prefix="fcclip-export-") as tmp:
        writer = _JsonWriter(tmp, _head(output, fmt, categories, target))
        for row in _rows(output, batch_rows):
            if row["status"] != "ok":
                summary.error_rows += 1
                continue
            summary.images += 1
            number = coco_image_id(row["image_id"])
            writer.add("images", _image_entry(number, row))
            try:
                target.add(writer, number, row, summary)
            except ValueError as e:  # a mask that does not fit its image: the output was not written by fcclip
                raise OutputError(f"the row of {row['uri']} cannot be exported: {e}") from e
        writer.finish(fs, json_path)
    return summary


# ------------------------------------------------------------------------------------------------ command line
def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("dest", metavar="DEST", help="a labeling output: local folder or object-store prefix (*.parquet)")
    add_version_argument(p)
    p.add_argument("--format", required=True, choices=FORMATS, help="what to write")
    p.add_argument("--out", required=True, metavar="DIR", help="the folder to write into (a path or a URI)")
    p.add_argument("--batch-rows", type=COUNT, default=64, metavar="N",
                   help="rows read at a time; bounds the memory (default: %(default)s)")


def main_args(args: argparse.Namespace) -> int:
    if args.batch_rows < 1:
        print("fcclip export: error: --batch-rows must be >= 1", file=sys.stderr)
        return 2
    try:
        summary = export(args.dest, args.format, args.out, batch_rows=args.batch_rows, version=args.version)
    except (OutputError, ExportError) as e:
        print(f"fcclip export: error: {e}", file=sys.stderr)
        return 2
    noun = "annotation" if args.format == "coco-instances" else "segment"
    print(f"exported {summary.images} image(s) and {summary.segments} {noun}(s) as {args.format} -> "
          f"{summary.json_path}; skipped {summary.error_rows} error row(s)")
    if summary.stuff_segments:
        print(f"{summary.stuff_segments} stuff segment(s) are not instances (they are in coco-panoptic/-semantic)")
    if summary.skipped_segments:
        print(f"{summary.skipped_segments} segment(s) without a category of the vocabulary, or without a pixel, "
              "were left out")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="fcclip export", description="a labeling output as COCO files")
    add_arguments(parser)
    return main_args(parser.parse_args(argv))
