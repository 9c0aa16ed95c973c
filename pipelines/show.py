"""``fcclip show``: a self-contained HTML report of a labeling output (``DEST/*.parquet``, see ``pipelines.sink``).

    fcclip show DEST --out report.html [--sample N] [--seed S] [--top-classes K] [--image-width PX] [--max-errors N]

The page needs nothing but itself: overlays are base64 data URIs, charts are inline SVG drawn here, the CSS is
inline and there is no JavaScript. Every number in it is read from the Parquet files, and the key ones carry
stable ids and data attributes (``<span id="count-images">``, ``<td data-metric="segments" data-label="dog">``) so a
program can read the page back.

Two passes over DEST, one Parquet file at a time and in record batches (nothing holds the whole output):

1. ``scan``: the columns a count needs (``uri``, ``status``, ``error``, ``run_id``, ``model``, ``vocabulary``) and
   only the ``label``, ``score`` and ``category_id`` leaves of ``segments`` (never the masks) -> counts per status,
   per class (segments, images, score histogram) and per error reason, with pyarrow compute and numpy; plus a
   seeded random sample of ``N`` ok images: each ok row gets a key hashed from the seed and its ``image_id``, and
   the ``N`` smallest keys win, so the sample does not depend on file order, batch sizes or the number of files.
2. ``render_samples``: the row groups holding the sampled rows, all columns; only those rows' masks are decoded.
   Each sampled image is read from its URI (object storage included), its segment map is rebuilt from the RLEs
   and drawn with ``fcclip.visualize.draw_panoptic``. An image that cannot be shown becomes a placeholder with the
   reason; the report never fails because of one image.
"""
from __future__ import annotations

import argparse
import base64
import hashlib
import heapq
import html
import io
import json
import logging
import re
import sys
from collections import Counter
from dataclasses import dataclass, field
from typing import Any, Sequence

import fsspec
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq


logger = logging.getLogger("fcclip.show")

__all__ = ["Report", "Sample", "add_arguments", "build_report", "main", "main_args", "render_html", "scan"]

SCORE_BINS = 20
"""Score histograms: equal bins over [0, 1] (a score outside it counts in the first or last bin)."""
CHART_CLASSES = 40
"""Classes drawn in the per-class bar chart (the table lists them all)."""
BATCH_ROWS = 65_536
MAX_REASONS = 10_000
"""Distinct error reasons kept; the failures of any further reason are counted together as OTHER_REASONS."""
OTHER_REASONS = "(other reasons)"
SHOWN_REASONS = 100
_HEX16 = re.compile(r"^[0-9a-f]{16}$")
_NUMBER = re.compile(r"\d+(?:\.\d+)?")
_U64 = np.uint64
_MASK64 = (1 << 64) - 1


# --------------------------------------------------------------------------------------------------- aggregation
@dataclass
class ClassStats:
    label: str
    category_id: int | None = None
    segments: int = 0
    images: int = 0
    score_sum: float = 0.0
    histogram: np.ndarray = field(default_factory=lambda: np.zeros(SCORE_BINS, dtype=np.int64))


@dataclass
class Sample:
    """One sampled ok row: where it is (file, row in file) and its sampling key."""

    key: int
    uri: str
    file: int
    row: int


@dataclass
class Report:
    """What the page shows; every number comes from the Parquet files under ``dest``."""

    dest: str
    files: list[str] = field(default_factory=list)
    images: int = 0
    ok: int = 0
    error: int = 0
    segments: int = 0
    run_ids: Counter = field(default_factory=Counter)  # value -> rows
    models: Counter = field(default_factory=Counter)
    vocabularies: Counter = field(default_factory=Counter)
    metadata: dict[str, Counter] = field(default_factory=dict)  # "thresholds" -> {JSON text: files}
    vocabulary: dict | None = None  # the fcclip.vocabulary metadata of the first file that has it
    classes: dict[str, ClassStats] = field(default_factory=dict)
    score_histogram: np.ndarray = field(default_factory=lambda: np.zeros(SCORE_BINS, dtype=np.int64))
    error_reasons: Counter = field(default_factory=Counter)  # normalised reason -> rows
    error_examples: dict[str, str] = field(default_factory=dict)  # reason -> the first full message
    error_rows: list[tuple[str, str]] = field(default_factory=list)  # (uri, error), the first max_errors
    sample: list[Sample] = field(default_factory=list)
    sample_size: int = 0
    seed: int = 0

    def colors(self) -> dict[int, tuple[int, int, int]]:
        """Category id -> colour, from the vocabulary metadata."""
        out = {}
        for c in (self.vocabulary or {}).get("categories", []):
            if c.get("color") is not None and c.get("id") is not None:
                out[int(c["id"])] = tuple(int(v) for v in c["color"])
        return out


def list_parts(dest: str) -> tuple[fsspec.AbstractFileSystem, list[str]]:
    """The filesystem of DEST and its committed part files, ``DEST/*.parquet``, sorted."""
    fs, root = fsspec.core.url_to_fs(dest)
    root = root.rstrip("/")
    found = fs.glob(f"{root}/*.parquet", detail=True)
    paths = sorted(p for p, info in found.items() if info.get("type", "file") == "file")
    return fs, paths


def error_reason(uri: str, message: str) -> str:
    """The message with the image's URI (or path) and the numbers taken out, so that alike failures group."""
    text = message or "(no reason given)"
    for form in sorted({uri, uri.split("://", 1)[-1]} - {""}, key=len, reverse=True):
        text = text.replace(form, "<uri>")
    return _NUMBER.sub("#", text)[:300]


def _splitmix64(x: np.ndarray) -> np.ndarray:
    with np.errstate(over="ignore"):
        x = x + _U64(0x9E3779B97F4A7C15)
        x = (x ^ (x >> _U64(30))) * _U64(0xBF58476D1CE4E5B9)
        x = (x ^ (x >> _U64(27))) * _U64(0x94D049BB133111EB)
        return x ^ (x >> _U64(31))


def _sample_keys(image_ids: pa.Array, uris: pa.Array, seed: int) -> np.ndarray:
    """(n,) uint64 sampling keys: a seeded hash of each row's image_id (vectorised when the ids are the usual
    16 hex digits, else per row from the URI)."""
    ids = image_ids.cast(pa.string())
    if len(ids) and ids.null_count == 0 and pc.all(pc.match_substring_regex(ids, _HEX16.pattern)).as_py():
        fixed = ids.cast(pa.binary(16))
        raw = np.frombuffer(fixed.buffers()[1], dtype=np.uint8)
        raw = raw[fixed.offset * 16:(fixed.offset + len(fixed)) * 16].reshape(-1, 16).astype(np.uint64)
        nibbles = np.where(raw <= ord("9"), raw - ord("0"), raw - (ord("a") - 10))
        value = np.zeros(len(fixed), dtype=np.uint64)
        for i in range(16):
            value = (value << _U64(4)) | nibbles[:, i]
        seed_mix = _splitmix64(np.array([seed & _MASK64], dtype=np.uint64))[0]
        return _splitmix64(value ^ seed_mix)
    keys = [
        int.from_bytes(hashlib.blake2b(f"{seed}\0{u}".encode(), digest_size=8).digest(), "big")
        for u in uris.to_pylist()
    ]
    return np.array(keys, dtype=np.uint64)


def _segment_columns(schema: pq.ParquetSchema) -> dict[str, str]:
    """Parquet leaf paths of the segment fields a count needs: {'label': 'segments.list.element.label', ...}."""
    out = {}
    for i in range(len(schema)):
        parts = schema.column(i).path.split(".")
        if len(parts) == 4 and parts[0] == "segments" and parts[3] in ("label", "score", "category_id"):
            out[parts[3]] = schema.column(i).path
    return out


def scan(dest: str, *, sample: int = 24, seed: int = 0, max_errors: int = 200) -> Report:
    """Aggregate DEST's Parquet files (pass 1, see the module docstring). Raises FileNotFoundError if none."""
    fs, paths = list_parts(dest)
    if not paths:
        raise FileNotFoundError(f"no labeling output in {dest}: no {dest.rstrip('/')}/*.parquet")
    report = Report(dest=dest, files=paths, sample_size=sample, seed=seed)
    best: list[tuple[int, str, int, int]] = []  # a max-heap by key, as (-key, uri, file, row), negated uri order
    for file_index, path in enumerate(paths):
        with fs.open(path, "rb") as f:
            parquet = pq.ParquetFile(f)
            _read_metadata(report, parquet.schema_arrow.metadata or {})
            seg_cols = _segment_columns(parquet.schema)
            present = set(parquet.schema_arrow.names)
            wanted = ("uri", "image_id", "status", "error", "run_id", "model", "vocabulary")
            columns = [c for c in wanted if c in present]
            columns += list(seg_cols.values())
            offset = 0
            for batch in parquet.iter_batches(batch_size=BATCH_ROWS, columns=columns):
                _scan_batch(report, batch, file_index, offset, best, max_errors)
                offset += batch.num_rows
    report.sample = sorted(
        (Sample(key=-negkey, uri=str(uri), file=file, row=row) for negkey, uri, file, row in best),
        key=lambda s: (s.uri, s.key),
    )
    return report


def _read_metadata(report: Report, meta: dict[bytes, bytes]) -> None:
    for raw_key, raw_value in meta.items():
        key = raw_key.decode("utf-8", "replace")
        if not key.startswith("fcclip."):
            continue
        name = key[len("fcclip."):]
        text = raw_value.decode("utf-8", "replace")
        if name == "vocabulary" and report.vocabulary is None:
            try:
                report.vocabulary = json.loads(text)
            except ValueError:
                pass
        report.metadata.setdefault(name, Counter())[text] += 1


def _scan_batch(report: Report, batch: pa.RecordBatch, file_index: int, offset: int, best: list, max_errors: int):
    n = batch.num_rows
    report.images += n
    status = batch.column("status")
    is_ok = pc.fill_null(pc.equal(status, "ok"), False)
    ok = int(pc.sum(is_ok).as_py() or 0)
    report.ok += ok
    report.error += n - ok
    for name, counter in (("run_id", report.run_ids), ("model", report.models), ("vocabulary", report.vocabularies)):
        if name in batch.schema.names:
            for item in pc.value_counts(batch.column(name)).to_pylist():
                if item["values"] is not None:
                    counter[item["values"]] += item["counts"]

    uris = batch.column("uri")
    if n - ok:  # error rows (anything not ok): reasons, and the first max_errors rows
        not_ok = pc.invert(is_ok)
        bad_uris = pc.filter(uris, not_ok).to_pylist()
        messages = (pc.filter(batch.column("error"), not_ok).to_pylist() if "error" in batch.schema.names
                    else [None] * len(bad_uris))
        for uri, message in zip(bad_uris, messages):
            message = message or "(no reason given)"
            reason = error_reason(uri, message)
            if reason not in report.error_reasons and len(report.error_reasons) >= MAX_REASONS:
                reason = OTHER_REASONS
            report.error_reasons[reason] += 1
            report.error_examples.setdefault(reason, message)
            if len(report.error_rows) < max_errors:
                report.error_rows.append((uri, message))

    if ok and report.sample_size > 0:
        rows = np.flatnonzero(is_ok.to_numpy(zero_copy_only=False))
        ok_uris = pc.take(uris, pa.array(rows))
        ids = pc.take(batch.column("image_id"), pa.array(rows)) if "image_id" in batch.schema.names else ok_uris
        keys = _sample_keys(ids, ok_uris, report.seed)
        k = report.sample_size
        if len(keys) > k:  # only the batch's k smallest can enter the sample
            keep = np.argpartition(keys, k - 1)[:k]
        else:
            keep = np.arange(len(keys))
        uri_list = ok_uris.to_pylist()
        for i in keep:
            entry = (-int(keys[i]), _Reversed(uri_list[i]), file_index, offset + int(rows[i]))
            if len(best) < k:
                heapq.heappush(best, entry)
            elif entry > best[0]:
                heapq.heapreplace(best, entry)

    if "segments" in batch.schema.names:
        _count_segments(report, batch.column("segments"))


class _Reversed(str):
    """A string that sorts backwards: in the max-heap of (-key, uri), the larger URI of two equal keys goes first."""

    def __lt__(self, other):
        return str.__gt__(self, other)

    def __gt__(self, other):
        return str.__lt__(self, other)


def _count_segments(report: Report, segments: pa.Array) -> None:
    flat = pc.list_flatten(segments)
    if len(flat) == 0:
        return
    report.segments += len(flat)
    names = [f.name for f in flat.type]
    if "label" in names:
        labels = pc.fill_null(flat.field("label"), "(no label)")
    else:
        labels = pa.array(["(no label)"] * len(flat))
    scores = (pc.fill_null(flat.field("score"), 0.0).to_numpy(zero_copy_only=False).astype(np.float64)
              if "score" in names else np.zeros(len(flat)))
    scores = np.nan_to_num(scores, nan=0.0, posinf=1.0, neginf=0.0)
    bins = np.clip(np.floor(scores * SCORE_BINS), 0, SCORE_BINS - 1).astype(np.int64)
    report.score_histogram += np.bincount(bins, minlength=SCORE_BINS)

    encoded = pc.dictionary_encode(labels)
    codes = encoded.indices.to_numpy(zero_copy_only=False).astype(np.int64)
    values = encoded.dictionary.to_pylist()
    k = len(values)
    parents = pc.list_parent_indices(segments).to_numpy(zero_copy_only=False).astype(np.int64)
    seg_counts = np.bincount(codes, minlength=k)
    image_counts = np.bincount(np.unique(parents * k + codes) % k, minlength=k)
    score_sums = np.bincount(codes, weights=scores, minlength=k)
    histograms = np.zeros((k, SCORE_BINS), dtype=np.int64)
    np.add.at(histograms, (codes, bins), 1)
    category_ids = flat.field("category_id").to_numpy(zero_copy_only=False) if "category_id" in names else None
    first = np.zeros(k, dtype=np.int64)
    present, first_index = np.unique(codes, return_index=True)  # the first segment of each label
    first[present] = first_index
    for code, label in enumerate(values):
        stats = report.classes.get(label)
        if stats is None:
            stats = report.classes[label] = ClassStats(label=label)
        if stats.category_id is None and category_ids is not None:
            cid = category_ids[first[code]]
            stats.category_id = None if cid is None or (isinstance(cid, float) and np.isnan(cid)) else int(cid)
        stats.segments += int(seg_counts[code])
        stats.images += int(image_counts[code])
        stats.score_sum += float(score_sums[code])
        stats.histogram += histograms[code]


# --------------------------------------------------------------------------------------------------- the sample
@dataclass
class Figure:
    """One gallery entry: an overlay (data URI) or the reason it could not be drawn."""

    uri: str
    segments: int
    width: int | None
    height: int | None
    data_uri: str | None = None
    reason: str | None = None


def _read_sampled_rows(fs, path: str, rows: list[int]) -> list[dict]:
    """The given rows of one part file (all columns), reading only the row groups that hold them."""
    out = {}
    with fs.open(path, "rb") as f:
        parquet = pq.ParquetFile(f)
        starts = np.cumsum([0] + [parquet.metadata.row_group(i).num_rows for i in range(parquet.num_row_groups)])
        wanted = sorted(set(rows))
        for group in range(parquet.num_row_groups):
            local = [r - int(starts[group]) for r in wanted if starts[group] <= r < starts[group + 1]]
            if not local:
                continue
            columns = [c for c in ("uri", "width", "height", "segments") if c in parquet.schema_arrow.names]
            table = parquet.read_row_group(group, columns=columns).take(pa.array(local))
            for r, record in zip(local, table.to_pylist()):
                out[r + int(starts[group])] = record
    return [out[r] for r in rows]


def render_samples(report: Report, *, max_width: int = 640, max_height: int = 960) -> list[Figure]:
    """Overlays of the sampled images (pass 2), each scaled to `max_width` wide (at most `max_height` tall).
    Never raises because of one image."""
    fs, _ = fsspec.core.url_to_fs(report.dest)
    colors = report.colors()
    by_file: dict[int, list[Sample]] = {}
    for s in report.sample:
        by_file.setdefault(s.file, []).append(s)
    records: dict[tuple[int, int], dict] = {}
    for file_index, samples in by_file.items():
        rows = [s.row for s in samples]
        for s, record in zip(samples, _read_sampled_rows(fs, report.files[file_index], rows)):
            records[(s.file, s.row)] = record
    figures = []
    for s in report.sample:
        record = records[(s.file, s.row)]
        segments = record.get("segments") or []
        figure = Figure(uri=record["uri"], segments=len(segments), width=record.get("width"),
                        height=record.get("height"))
        try:
            figure.data_uri = _overlay(record, segments, colors, max_width, max_height)
        except Exception as e:  # one unreadable image becomes a placeholder, never a failed report
            figure.reason = f"{type(e).__name__}: {e}"
            logger.warning("cannot show %s: %s", record["uri"], figure.reason)
        figures.append(figure)
    return figures


def _overlay(record: dict, segments: list[dict], colors: dict, max_width: int, max_height: int) -> str:
    from PIL import Image

    from fcclip.images import load_image
    from fcclip.masks import decode_rle
    from fcclip.visualize import draw_panoptic

    image = load_image(record["uri"])
    height, width = image.shape[:2]
    for s in segments:
        size = [int(v) for v in s["rle"]["size"]]
        if size != [height, width]:
            raise ValueError(f"the image is {width} x {height} now, its masks are {size[1]} x {size[0]}")
    segment_map = np.zeros((height, width), dtype=np.int32)
    for s in sorted(segments, key=lambda s: s["id"]):  # in id order: a later id paints over an earlier one
        segment_map[decode_rle(s["rle"])] = int(s["id"])
    # Every overlay is drawn at the gallery's width (large images scaled down, small ones up, the aspect ratio
    # kept), so that draw_panoptic's labels, sized from the picture, read alike in every cell.
    scale = min(max_width / width, max_height / height)
    if scale != 1.0:
        size = (max(1, round(width * scale)), max(1, round(height * scale)))
        resample = Image.Resampling.LANCZOS if scale < 1.0 else Image.Resampling.BICUBIC
        image = np.asarray(Image.fromarray(image).resize(size, resample))
        segment_map = np.asarray(Image.fromarray(segment_map).resize(size, Image.Resampling.NEAREST))
    drawn = [
        {"id": s["id"], "label": s.get("label"), "score": s.get("score"), "color": colors.get(s.get("category_id"))}
        for s in segments
    ]
    overlay = draw_panoptic(image, segment_map, drawn)
    buf = io.BytesIO()
    overlay.save(buf, format="JPEG", quality=85)
    return "data:image/jpeg;base64," + base64.b64encode(buf.getvalue()).decode("ascii")


# --------------------------------------------------------------------------------------------------- the page
def _e(value: Any) -> str:
    return html.escape(str(value), quote=True)


def _n(value: int) -> str:
    return f"{value:,}"


def _rgb(color: Sequence[int] | None) -> str:
    if color is None:
        return "#7a8fa6"
    return "rgb({},{},{})".format(*[int(c) for c in color])


def _nice_max(value: int) -> int:
    """A round axis maximum >= value (1, 2, 5 x 10^k)."""
    if value <= 1:
        return 1
    magnitude = 10 ** (len(str(int(value))) - 1)
    for step in (1, 2, 5, 10):
        if step * magnitude >= value:
            return step * magnitude
    return 10 * magnitude


def svg_class_bars(classes: list[ClassStats], colors: dict) -> str:
    """Horizontal bars: segments per class (class colour) and images per class (grey), side by side."""
    row, label_w, bar_w, gap, top = 18, 180, 300, 70, 22
    height = top + row * len(classes) + 6
    width = label_w + 2 * (bar_w + gap)
    seg_max = _nice_max(max((c.segments for c in classes), default=1))
    img_max = _nice_max(max((c.images for c in classes), default=1))
    x_seg, x_img = label_w, label_w + bar_w + gap
    parts = [
        f'<svg class="chart" id="chart-classes" width="{width}" '
        f'height="{height}" viewBox="0 0 {width} {height}" role="img" aria-label="segments and images per class">',
        f'<text x="{x_seg}" y="14" class="axis">segments (axis 0–{_n(seg_max)})</text>',
        f'<text x="{x_img}" y="14" class="axis">images (axis 0–{_n(img_max)})</text>',
    ]
    for i, c in enumerate(classes):
        y = top + i * row
        ws = bar_w * c.segments / seg_max
        wi = bar_w * c.images / img_max
        fill = _rgb(colors.get(c.category_id))
        parts.append(
            f'<g data-label="{_e(c.label)}" data-segments="{c.segments}" data-images="{c.images}">'
            f'<text x="{label_w - 6}" y="{y + 12}" text-anchor="end" class="label">{_e(c.label)}</text>'
            f'<rect x="{x_seg}" y="{y + 2}" width="{ws:.1f}" height="{row - 5}" fill="{fill}"/>'
            f'<text x="{x_seg + ws + 4:.1f}" y="{y + 12}" class="value">{_n(c.segments)}</text>'
            f'<rect x="{x_img}" y="{y + 2}" width="{wi:.1f}" height="{row - 5}" fill="#8c96a3"/>'
            f'<text x="{x_img + wi + 4:.1f}" y="{y + 12}" class="value">{_n(c.images)}</text></g>'
        )
    parts.append("</svg>")
    return "".join(parts)


def svg_histogram(counts: np.ndarray, *, name: str, color: str = "#3b6ea8", width: int = 560, height: int = 180) -> str:
    """A score histogram over [0, 1] (SCORE_BINS bins) with its axes, as inline SVG."""
    left, bottom, top, right = 46, 22, 8, 8
    plot_w, plot_h = width - left - right, height - top - bottom
    y_max = _nice_max(int(counts.max(initial=0)))
    total = int(counts.sum())
    bin_w = plot_w / len(counts)
    parts = [
        f'<svg class="chart histogram" data-histogram="{_e(name)}" '
        f'data-count="{total}" width="{width}" height="{height}" viewBox="0 0 {width} {height}" role="img" '
        f'aria-label="score histogram: {_e(name)}">',
        f'<line x1="{left}" y1="{top + plot_h}" x2="{left + plot_w}" y2="{top + plot_h}" class="axisline"/>',
        f'<line x1="{left}" y1="{top}" x2="{left}" y2="{top + plot_h}" class="axisline"/>',
        f'<text x="{left - 4}" y="{top + 9}" text-anchor="end" class="axis">{_n(y_max)}</text>',
        f'<text x="{left - 4}" y="{top + plot_h}" text-anchor="end" class="axis">0</text>',
    ]
    for tick in (0.0, 0.25, 0.5, 0.75, 1.0):
        x = left + plot_w * tick
        parts.append(f'<text x="{x:.1f}" y="{height - 6}" text-anchor="middle" class="axis">{tick:g}</text>')
    for i, count in enumerate(counts.tolist()):
        h = plot_h * count / y_max
        lo = i / len(counts)
        parts.append(
            f'<rect x="{left + i * bin_w + 0.5:.1f}" y="{top + plot_h - h:.1f}" width="{max(bin_w - 1, 0.5):.1f}" '
            f'height="{h:.1f}" fill="{color}" data-bin="{lo:g}" data-count="{count}">'
            f"<title>{lo:g}–{lo + 1 / len(counts):g}: {_n(count)}</title></rect>"
        )
    parts.append("</svg>")
    return "".join(parts)


_CSS = """
body{font:14px/1.45 system-ui,-apple-system,"Segoe UI",Roboto,"DejaVu Sans",sans-serif;margin:0;color:#1d2430;
  background:#f4f6f8}
main{max-width:1400px;margin:0 auto;padding:20px 28px 60px}
h1{font-size:22px;margin:4px 0 2px}
h2{font-size:18px;margin:30px 0 10px;border-bottom:1px solid #d5dbe2;padding-bottom:4px}
.sub{color:#5b6675;word-break:break-all}
.cards{display:flex;flex-wrap:wrap;gap:12px;margin:16px 0}
.card{background:#fff;border:1px solid #d5dbe2;border-radius:6px;padding:10px 16px;min-width:120px}
.card .v{font-size:24px;font-weight:600;display:block}
.card .k{color:#5b6675;font-size:12px;text-transform:uppercase}
.card.err .v{color:#b3261e}
table{border-collapse:collapse;background:#fff;border:1px solid #d5dbe2;margin:6px 0}
th,td{padding:4px 10px;border-bottom:1px solid #e6eaee;text-align:left;vertical-align:top}
th{background:#eef1f4;font-weight:600}
td.num,th.num{text-align:right;font-variant-numeric:tabular-nums}
table.meta td:first-child{color:#5b6675;white-space:nowrap}
td.uri,td.msg{word-break:break-all;max-width:720px}
.swatch{display:inline-block;width:12px;height:12px;border-radius:2px;margin-right:6px;vertical-align:-1px;
  border:1px solid #0003}
.gallery{display:grid;grid-template-columns:repeat(auto-fill,minmax(460px,1fr));gap:14px}
.gallery figure{margin:0;background:#fff;border:1px solid #d5dbe2;border-radius:6px;overflow:hidden}
.gallery img{display:block;width:100%;max-width:640px;height:auto;margin:0 auto}
.gallery figcaption{padding:6px 9px;font-size:12px;word-break:break-all;color:#39424e}
.placeholder{display:flex;align-items:center;justify-content:center;min-height:200px;padding:16px;
  background:repeating-linear-gradient(45deg,#eceff2,#eceff2 10px,#e2e6ea 10px,#e2e6ea 20px);color:#8a1c17;
  font-size:13px;word-break:break-word;text-align:center}
.hists{display:grid;grid-template-columns:repeat(auto-fill,minmax(300px,1fr));gap:12px}
.hists figure{margin:0;background:#fff;border:1px solid #d5dbe2;border-radius:6px;padding:6px}
.hists figcaption{font-size:12px;color:#39424e;padding:0 4px 4px}
svg.chart{background:#fff;max-width:100%;height:auto}
svg.chart text{font:11px system-ui,"DejaVu Sans",sans-serif;fill:#1d2430}
svg.chart text.axis{fill:#5b6675}
svg.chart .axisline{stroke:#9aa4b0;stroke-width:1}
.note{color:#5b6675;font-size:12px}
"""


def render_html(report: Report, figures: list[Figure], *, top_classes: int = 8) -> str:
    """The report page (a complete, self-contained HTML document)."""
    colors = report.colors()
    classes = sorted(report.classes.values(), key=lambda c: (-c.segments, c.label))
    vocab = report.vocabulary or {}
    out: list[str] = [
        "<!DOCTYPE html>",
        '<html lang="en"><head><meta charset="utf-8">',
        f"<title>fcclip labels: {_e(report.dest)}</title>",
        f"<style>{_CSS}</style></head><body><main>",
        "<h1>FC-CLIP labeling report</h1>",
        f'<div class="sub" id="dest">{_e(report.dest)}</div>',
        '<div class="cards">',
    ]
    for key, value, extra in (
        ("images", report.images, ""), ("ok", report.ok, ""), ("error", report.error, " err"),
        ("segments", report.segments, ""), ("files", len(report.files), ""), ("sampled", len(report.sample), ""),
    ):
        out.append(f'<div class="card{extra}"><span class="v" id="count-{key}" '
                   f'data-value="{value}">{_n(value)}</span><span class="k">{key}</span></div>')
    out.append("</div>")

    # ---- header: the run
    out.append('<table class="meta" id="run">')

    def meta_row(name: str, values: list[str], row_id: str) -> None:
        cell = "<br>".join(_e(v) for v in values) if values else '<span class="note">none</span>'
        out.append(f'<tr id="{row_id}"><td>{_e(name)}</td><td>{cell}</td></tr>')

    meta_row("run id", sorted(report.run_ids), "meta-run-id")
    meta_row("model", sorted(report.models) or _json_values(report, "model"), "meta-model")
    meta_row("weights", _json_values(report, "weights"), "meta-weights")
    vocab_names = sorted(report.vocabularies)
    if vocab:
        vocab_names.append(f"{vocab.get('name', '?')}: {len(vocab.get('categories', []))} classes "
                           f"({sum(1 for c in vocab.get('categories', []) if c.get('isthing', 1))} things)")
    meta_row("vocabulary", vocab_names, "meta-vocabulary")
    thresholds = []
    for text, files in sorted(report.metadata.get("thresholds", Counter()).items()):
        try:
            items = json.loads(text)
            shown = ", ".join(f"{k} = {v}" for k, v in sorted(items.items())) if isinstance(items, dict) else text
        except ValueError:
            shown = text
        thresholds.append(shown + (f"  ({files} of {len(report.files)} files)" if files != len(report.files) else ""))
    meta_row("thresholds", thresholds, "meta-thresholds")
    meta_row("sample", [f"{len(report.sample)} of {_n(report.ok)} ok images, seed {report.seed}"], "meta-sample")
    out.append("</table>")

    # ---- gallery
    out.append(f'<h2 id="gallery-title">Sample ({len(figures)} images)</h2>')
    if figures:
        out.append('<div class="gallery" id="gallery">')
        for fig in figures:
            size = f"{fig.width} × {fig.height}" if fig.width and fig.height else "size unknown"
            attrs = f'data-uri="{_e(fig.uri)}" data-segments="{fig.segments}"'
            if fig.data_uri:
                body = f'<img class="overlay" src="{fig.data_uri}" alt="{_e(fig.uri)}">'
            else:
                body = (f'<div class="placeholder" data-reason="{_e(fig.reason)}">cannot show this image: '
                        f"{_e(fig.reason)}</div>")
                attrs += ' data-error="1"'
            out.append(
                f'<figure class="sample" {attrs}>{body}<figcaption>{_e(fig.uri)}<br>'
                f'<b data-metric="sample-segments">{fig.segments}</b> segments · {size}</figcaption></figure>'
            )
        out.append("</div>")
    else:
        out.append('<p class="note">No ok images to show.</p>')

    # ---- classes
    out.append(f'<h2 id="classes-title">Classes ({len(classes)} seen)</h2>')
    if classes:
        shown = classes[:CHART_CLASSES]
        if len(classes) > len(shown):
            out.append(f'<p class="note">The {len(shown)} classes with the most segments; the table lists all.</p>')
        out.append(svg_class_bars(shown, colors))
        out.append('<table id="class-table"><tr><th>class</th><th class="num">category id</th>'
                   '<th class="num">segments</th><th class="num">images</th><th class="num">mean score</th></tr>')
        for c in classes:
            mean = c.score_sum / c.segments if c.segments else 0.0
            cid = "" if c.category_id is None else str(c.category_id)
            out.append(
                f'<tr data-label="{_e(c.label)}"><td><span class="swatch" style="background:'
                f'{_rgb(colors.get(c.category_id))}"></span>{_e(c.label)}</td><td class="num">{cid}</td>'
                f'<td class="num" data-metric="segments" data-label="{_e(c.label)}" data-value="{c.segments}">'
                f"{_n(c.segments)}</td>"
                f'<td class="num" data-metric="images" data-label="{_e(c.label)}" data-value="{c.images}">'
                f"{_n(c.images)}</td>"
                f'<td class="num" data-metric="mean-score" data-label="{_e(c.label)}" data-value="{mean:.6f}">'
                f"{mean:.3f}</td></tr>"
            )
        out.append("</table>")
    else:
        out.append('<p class="note">No segments.</p>')

    # ---- scores
    out.append('<h2 id="scores-title">Scores</h2>')
    if report.segments:
        out.append(f'<div class="hists"><figure style="grid-column:1/-1"><figcaption>all segments '
                   f'({_n(report.segments)})</figcaption>'
                   f'{svg_histogram(report.score_histogram, name="all", width=760, height=200)}</figure>')
        for c in classes[:top_classes]:
            color = _rgb(colors.get(c.category_id))
            chart = svg_histogram(c.histogram, name=c.label, color=color, width=320, height=140)
            out.append(f'<figure><figcaption><span class="swatch" style="background:{color}"></span>'
                       f"{_e(c.label)} ({_n(c.segments)})</figcaption>{chart}</figure>")
        out.append("</div>")
    else:
        out.append('<p class="note">No segments.</p>')

    # ---- errors
    out.append(f'<h2 id="errors-title">Errors ({_n(report.error)})</h2>')
    if report.error:
        out.append('<table id="error-reasons"><tr><th class="num">images</th><th>reason</th><th>example</th></tr>')
        reasons = sorted(report.error_reasons.items(), key=lambda kv: (-kv[1], kv[0]))
        if len(reasons) > SHOWN_REASONS:
            rest = reasons[SHOWN_REASONS - 1:]
            reasons = reasons[:SHOWN_REASONS - 1] + [(f"({len(rest)} more reasons)", sum(n for _, n in rest))]
        for reason, count in reasons:
            out.append(f'<tr><td class="num" data-metric="errors" data-reason="{_e(reason)}" data-value="{count}">'
                       f'{_n(count)}</td><td class="msg">{_e(reason)}</td>'
                       f'<td class="msg">{_e(report.error_examples.get(reason, ""))}</td></tr>')
        out.append("</table>")
        listed = len(report.error_rows)
        note = f"the first {listed} of {_n(report.error)}" if listed < report.error else f"all {listed}"
        out.append(f'<p class="note">Failed images: {note}.</p>')
        out.append('<table id="error-rows"><tr><th>uri</th><th>error</th></tr>')
        for uri, message in report.error_rows:
            out.append(f'<tr data-uri="{_e(uri)}"><td class="uri">{_e(uri)}</td>'
                       f'<td class="msg">{_e(message)}</td></tr>')
        out.append("</table>")
    else:
        out.append('<p class="note">No errors.</p>')

    out.append(f'<p class="note">{len(report.files)} Parquet file(s) read by <code>fcclip show</code>.</p>')
    out.append("</main></body></html>")
    return "\n".join(out)


def _json_values(report: Report, name: str) -> list[str]:
    values = []
    for text in sorted(report.metadata.get(name, Counter())):
        try:
            value = json.loads(text)
        except ValueError:
            value = text
        values.append(value if isinstance(value, str) else json.dumps(value))
    return values


def build_report(
    dest: str, *, sample: int = 24, seed: int = 0, top_classes: int = 8, image_width: int = 640, max_errors: int = 200
) -> tuple[str, Report]:
    """Scan DEST, draw the sampled images and return (the HTML page, the aggregates)."""
    report = scan(dest, sample=sample, seed=seed, max_errors=max_errors)
    figures = render_samples(report, max_width=image_width, max_height=int(image_width * 1.5))
    return render_html(report, figures, top_classes=top_classes), report


# --------------------------------------------------------------------------------------------------- command line
def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("dest", metavar="DEST", help="a labeling output: local folder or object-store prefix (*.parquet)")
    p.add_argument("--out", required=True, metavar="REPORT.html", help="the HTML file to write (a path or a URI)")
    p.add_argument("--sample", type=int, default=24, metavar="N",
                   help="ok images drawn in the gallery (default: %(default)s)")
    p.add_argument("--seed", type=int, default=0, metavar="S", help="seed of the random sample (default: %(default)s)")
    p.add_argument("--top-classes", type=int, default=8, metavar="K",
                   help="classes with a score histogram (default: %(default)s)")
    p.add_argument("--image-width", type=int, default=640, metavar="PX",
                   help="overlay width in pixels (default: %(default)s)")
    p.add_argument("--max-errors", type=int, default=200, metavar="N",
                   help="failed images listed (default: %(default)s)")

def main_args(args: argparse.Namespace) -> int:
    if args.sample < 0 or args.top_classes < 0 or args.image_width < 16 or args.max_errors < 0:
        print("fcclip show: error: --sample, --top-classes and --max-errors must be >= 0, --image-width >= 16",
              file=sys.stderr)
        return 2
    try:
        page, report = build_report(
            args.dest, sample=args.sample, seed=args.seed, top_classes=args.top_classes, image_width=args.image_width,
            max_errors=args.max_errors,
        )
    except FileNotFoundError as e:
        print(f"fcclip show: error: {e}", file=sys.stderr)
        return 2
    with fsspec.open(args.out, "w", encoding="utf-8") as f:
        f.write(page)
    print(f"{report.images} image(s): {report.ok} ok, {report.error} failed, {report.segments} segments; "
          f"{len(report.sample)} drawn -> {args.out}")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="fcclip show", description="an HTML report of a labeling output")
    add_arguments(parser)
    return main_args(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
