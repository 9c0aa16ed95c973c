"""The gallery: each sampled image read from its URI, its segment map rebuilt from the RLEs, drawn as an overlay.

Only the sampled rows' masks are decoded. An image replaced since it was labeled is not drawn under the old
picture's masks (``output.read_labeled_image``). An image is drawn at its own size, or scaled down to fit the
gallery cell (never up: a small image stays small and sharp). One image that cannot be shown becomes a placeholder
with its reason; the report never fails because of one image.
"""
from __future__ import annotations

import base64
import io
import logging
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
from PIL import Image

from fcclip.visualize import draw_panoptic

from ..output import SOURCE_COLUMNS, PartFile, read_labeled_image, segment_map
from .scan import Report, Sample

logger = logging.getLogger("fcclip.show")

__all__ = ["Figure", "overlay", "overlay_size", "read_rows", "render_samples"]

_SAMPLE_COLUMNS = ("uri", "width", "height", "segments", *SOURCE_COLUMNS)  # (source columns: where a file has them)


@dataclass
class Figure:
    """One gallery entry: an overlay (a data URI) or the reason it could not be drawn."""

    uri: str
    segments: int
    width: int | None
    height: int | None
    data_uri: str | None = None
    reason: str | None = None


def overlay_size(width: int, height: int, max_width: int, max_height: int) -> tuple[int, int]:
    """(width, height) of an overlay: the image's own size, or scaled down (aspect ratio kept) to fit the box."""
    scale = min(1.0, max_width / width, max_height / height)
    if scale == 1.0:
        return width, height
    return max(1, round(width * scale)), max(1, round(height * scale))


def read_rows(output, url: str, rows: list[int]) -> dict[int, dict]:
    """{row: record} of some rows of one part file of ``output`` (a LabelingOutput), reading only the row groups
    that hold them and only the columns an overlay needs."""
    out: dict[int, dict] = {}
    with output.fs.open(output.files[output.urls.index(url)], "rb") as f:
        parquet = PartFile(f)
        sizes = [parquet.metadata.row_group(i).num_rows for i in range(parquet.num_row_groups)]
        starts = np.cumsum([0] + sizes)
        for group in range(parquet.num_row_groups):
            local = sorted({r - int(starts[group]) for r in rows if starts[group] <= r < starts[group + 1]})
            if not local:
                continue
            columns = [c for c in _SAMPLE_COLUMNS if c in parquet.schema_arrow.names]
            table = parquet.read_row_group(group, columns=columns).take(pa.array(local))
            for r, record in zip(local, table.to_pylist()):
                out[r + int(starts[group])] = record
    return out


def render_samples(report: Report, *, max_width: int = 640, max_height: int = 960) -> list[Figure]:
    """Overlays of the sampled images, in the sample's order. Never raises because of one image."""
    colors = report.output.colors()
    by_file: dict[str, list[Sample]] = {}
    for s in report.sample:
        by_file.setdefault(s.file, []).append(s)
    records: dict[tuple[str, int], dict] = {}
    for url, samples in by_file.items():
        for row, record in read_rows(report.output, url, [s.row for s in samples]).items():
            records[(url, row)] = record
    figures = []
    for s in report.sample:
        record = records[(s.file, s.row)]
        segments = record.get("segments") or []
        figure = Figure(uri=record["uri"], segments=len(segments), width=record.get("width"),
                        height=record.get("height"))
        try:
            figure.data_uri = overlay(record, segments, colors, max_width, max_height)
        except Exception as e:  # one unreadable image becomes a placeholder, never a failed report
            figure.reason = f"{type(e).__name__}: {e}"
            logger.warning("cannot show %s: %s", record["uri"], figure.reason)
        figures.append(figure)
    return figures


def overlay(row: dict, segments: list[dict], colors: dict, max_width: int, max_height: int) -> str:
    """The image of an output row (its ``uri``; not drawn where it was replaced since it was labeled:
    ``read_labeled_image``) with ``segments`` (stored rows' segments) drawn over it, as a JPEG data URI."""
    image = read_labeled_image(row)
    height, width = image.shape[:2]
    ids = segment_map(segments, height, width)
    size = overlay_size(width, height, max_width, max_height)
    if size != (width, height):
        image = np.asarray(Image.fromarray(image).resize(size, Image.Resampling.LANCZOS))
        ids = np.asarray(Image.fromarray(ids).resize(size, Image.Resampling.NEAREST))
    drawn = [
        {"id": s["id"], "label": s.get("label"), "score": s.get("score"), "color": colors.get(s.get("category_id"))}
        for s in segments
    ]
    buf = io.BytesIO()
    draw_panoptic(image, ids, drawn).save(buf, format="JPEG", quality=85)
    return "data:image/jpeg;base64," + base64.b64encode(buf.getvalue()).decode("ascii")
