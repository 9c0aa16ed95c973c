"""The report page: ``report.html`` (a ``string.Template`` shipped with this package) filled with one HTML
fragment per section, each built by its own function from the ``Report`` and the gallery's ``Figure``s.

The page needs nothing but itself: overlays are data URIs, charts are inline SVG drawn here, CSS is inline, no
JavaScript. The key numbers carry stable ids and data attributes (``<span id="count-images" data-value=...>``,
``<td data-metric="segments" data-label="dog">``) so that a program can read the page back.
"""
from __future__ import annotations

import html
import json
from collections.abc import Sequence
from importlib import resources
from string import Template
from typing import Any

import numpy as np

from .overlays import Figure
from .scan import ClassStats, Report

__all__ = ["plural", "render_html", "svg_class_bars", "svg_histogram"]

CHART_CLASSES = 40
"""Classes drawn in the per-class bar chart (the table lists them all)."""


def _template() -> Template:
    return Template(resources.files(__package__).joinpath("report.html").read_text(encoding="utf-8"))


def _e(value: Any) -> str:
    return html.escape(str(value), quote=True)


def _n(value: int) -> str:
    return f"{value:,}"


def plural(n: int, word: str, words: str | None = None) -> str:
    """``1 segment``, ``2 segments``, ``1,024 images`` (``words`` for an irregular plural)."""
    return f"{_n(n)} {word if n == 1 else (words or word + 's')}"


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


# ------------------------------------------------------------------------------------------------ charts
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
        parts.append(
            f'<g data-label="{_e(c.label)}" data-segments="{c.segments}" data-images="{c.images}">'
            f'<text x="{label_w - 6}" y="{y + 12}" text-anchor="end" class="label">{_e(c.label)}</text>'
            f'<rect x="{x_seg}" y="{y + 2}" width="{ws:.1f}" height="{row - 5}" '
            f'fill="{_rgb(colors.get(c.category_id))}"/>'
            f'<text x="{x_seg + ws + 4:.1f}" y="{y + 12}" class="value">{_n(c.segments)}</text>'
            f'<rect x="{x_img}" y="{y + 2}" width="{wi:.1f}" height="{row - 5}" fill="#8c96a3"/>'
            f'<text x="{x_img + wi + 4:.1f}" y="{y + 12}" class="value">{_n(c.images)}</text></g>'
        )
    parts.append("</svg>")
    return "".join(parts)


def svg_histogram(counts: np.ndarray, *, name: str, color: str = "#3b6ea8", width: int = 560, height: int = 180) -> str:
    """A score histogram over [0, 1] (one bar per bin of ``counts``) with its axes, as inline SVG."""
    left, bottom, top, right = 46, 22, 8, 8
    plot_w, plot_h = width - left - right, height - top - bottom
    y_max = _nice_max(int(counts.max(initial=0)))
    bin_w = plot_w / len(counts)
    parts = [
        f'<svg class="chart histogram" data-histogram="{_e(name)}" data-count="{int(counts.sum())}" width="{width}" '
        f'height="{height}" viewBox="0 0 {width} {height}" role="img" aria-label="score histogram: {_e(name)}">',
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


# ------------------------------------------------------------------------------------------------ sections
def _cards(report: Report) -> str:
    cards = []
    for key, value, extra in (
        ("images", report.images, ""), ("ok", report.ok, ""), ("error", report.error, " err"),
        ("segments", report.segments, ""), ("files", len(report.files), ""), ("sampled", len(report.sample), ""),
    ):
        cards.append(f'<div class="card{extra}"><span class="v" id="count-{key}" data-value="{value}">{_n(value)}'
                     f'</span><span class="k">{key}</span></div>')
    return "\n".join(cards)


def _thresholds(report: Report) -> list[str]:
    out, files = [], len(report.files)
    for text, n in sorted(report.output.metadata.get("thresholds", {}).items()):
        try:
            items = json.loads(text)
            shown = ", ".join(f"{k} = {v}" for k, v in sorted(items.items())) if isinstance(items, dict) else text
        except ValueError:
            shown = text
        out.append(shown + (f"  ({n} of {plural(files, 'file')})" if n != files else ""))
    return out


def _run_table(report: Report) -> str:
    """The run: id, model, weights, vocabulary, thresholds, what was sampled."""
    output = report.output
    values = {name: sorted(report.run_values.get(name, {})) for name in ("run_id", "model", "vocabulary")}
    categories = output.categories()
    things = sum(1 for c in categories if c.get("isthing", 1))
    vocabulary = values["vocabulary"] + [
        f"{output.vocabulary.get('name', '?')}: {plural(len(categories), 'class', 'classes')} ({things} things)"
    ]
    rows = [
        ("run id", values["run_id"], "meta-run-id"),
        ("model", values["model"] or output.metadata_values("model"), "meta-model"),
        ("weights", output.metadata_values("weights"), "meta-weights"),
        ("vocabulary", vocabulary, "meta-vocabulary"),
        ("thresholds", _thresholds(report), "meta-thresholds"),
        ("sample", [f"{len(report.sample)} of {plural(report.ok, 'ok image')}, seed {report.seed}"], "meta-sample"),
    ]
    out = ['<table class="meta" id="run">']
    for name, items, row_id in rows:
        cell = "<br>".join(_e(v) for v in items) if items else '<span class="note">none</span>'
        out.append(f'<tr id="{row_id}"><td>{_e(name)}</td><td>{cell}</td></tr>')
    out.append("</table>")
    return "\n".join(out)


def _figure(fig: Figure) -> str:
    size = f"{fig.width} × {fig.height}" if fig.width and fig.height else "size unknown"
    attrs = f'data-uri="{_e(fig.uri)}" data-segments="{fig.segments}"'
    if fig.data_uri:
        body = f'<img class="overlay" src="{fig.data_uri}" alt="{_e(fig.uri)}">'
    else:
        body = f'<div class="placeholder" data-reason="{_e(fig.reason)}">cannot show this image: {_e(fig.reason)}</div>'
        attrs += ' data-error="1"'
    noun = "segment" if fig.segments == 1 else "segments"
    return (f'<figure class="sample" {attrs}>{body}<figcaption>{_e(fig.uri)}<br>'
            f'<b data-metric="sample-segments">{fig.segments}</b> {noun} · {size}</figcaption></figure>')


def _gallery(figures: list[Figure]) -> str:
    if not figures:
        return '<p class="note">No ok images to show.</p>'
    return '<div class="gallery" id="gallery">\n' + "\n".join(_figure(f) for f in figures) + "\n</div>"


def _class_table(classes: list[ClassStats], colors: dict) -> str:
    out = ['<table id="class-table"><tr><th>class</th><th class="num">category id</th><th class="num">segments</th>'
           '<th class="num">images</th><th class="num">mean score</th></tr>']
    for c in classes:
        label = _e(c.label)
        cid = "" if c.category_id is None else str(c.category_id)
        out.append(
            f'<tr data-label="{label}"><td><span class="swatch" style="background:{_rgb(colors.get(c.category_id))}">'
            f'</span>{label}</td><td class="num">{cid}</td>'
            f'<td class="num" data-metric="segments" data-label="{label}" data-value="{c.segments}">'
            f"{_n(c.segments)}</td>"
            f'<td class="num" data-metric="images" data-label="{label}" data-value="{c.images}">{_n(c.images)}</td>'
            f'<td class="num" data-metric="mean-score" data-label="{label}" data-value="{c.mean_score:.6f}">'
            f"{c.mean_score:.3f}</td></tr>"
        )
    out.append("</table>")
    return "\n".join(out)


def _classes(report: Report) -> str:
    """The per-class bar chart (the CHART_CLASSES largest) and the table of every class."""
    if not report.classes:
        return '<p class="note">No segments.</p>'
    colors = report.output.colors()
    shown = report.classes[:CHART_CLASSES]
    out = []
    if len(report.classes) > len(shown):
        out.append(f'<p class="note">The {len(shown)} classes with the most segments; the table lists all.</p>')
    out.append(svg_class_bars(shown, colors))
    out.append(_class_table(report.classes, colors))
    return "\n".join(out)


def _scores(report: Report, top_classes: int) -> str:
    """The histogram of all scores, then one per class for the top_classes largest classes."""
    if not report.segments:
        return '<p class="note">No segments.</p>'
    colors = report.output.colors()
    out = [f'<div class="hists"><figure style="grid-column:1/-1"><figcaption>all segments '
           f'({_n(report.segments)})</figcaption>'
           f'{svg_histogram(report.score_histogram, name="all", width=760, height=200)}</figure>']
    for c in report.classes[:top_classes]:
        color = _rgb(colors.get(c.category_id))
        chart = svg_histogram(c.histogram, name=c.label, color=color, width=320, height=140)
        out.append(f'<figure><figcaption><span class="swatch" style="background:{color}"></span>'
                   f"{_e(c.label)} ({_n(c.segments)})</figcaption>{chart}</figure>")
    out.append("</div>")
    return "\n".join(out)


def _error_list(report: Report) -> str:
    """The error rows grouped by reason (with an example each), then the first of them one by one."""
    if not report.error:
        return '<p class="note">No errors.</p>'
    out = ['<table class="wide" id="error-reasons"><colgroup><col style="width:7em"><col><col></colgroup>'
           '<tr><th class="num">images</th><th>reason</th><th>example</th></tr>']
    reasons = list(report.error_reasons)
    more, more_rows = report.other_reasons
    if more:
        reasons.append((f"({plural(more, 'more reason')})", more_rows, ""))
    for reason, count, example in reasons:
        out.append(f'<tr><td class="num" data-metric="errors" data-reason="{_e(reason)}" data-value="{count}">'
                   f'{_n(count)}</td><td class="msg">{_e(reason)}</td><td class="msg">{_e(example)}</td></tr>')
    out.append("</table>")
    listed = len(report.error_rows)
    note = f"the first {listed} of {_n(report.error)}" if listed < report.error else f"all {listed}"
    out.append(f'<p class="note">Failed images: {note}.</p>')
    out.append('<table class="wide" id="error-rows"><tr><th>uri</th><th>error</th></tr>')
    for uri, message in report.error_rows:
        out.append(f'<tr data-uri="{_e(uri)}"><td class="uri">{_e(uri)}</td><td class="msg">{_e(message)}</td></tr>')
    out.append("</table>")
    return "\n".join(out)


def render_html(report: Report, figures: list[Figure], *, top_classes: int = 8) -> str:
    """The report page (a complete, self-contained HTML document)."""
    return _template().substitute(
        dest=_e(report.dest),
        cards=_cards(report),
        run=_run_table(report),
        sampled=plural(len(figures), "image"),
        gallery=_gallery(figures),
        classes_seen=_n(len(report.classes)),
        classes=_classes(report),
        scores=_scores(report, top_classes),
        errors=_n(report.error),
        error_list=_error_list(report),
        files=plural(len(report.files), "Parquet file"),
    )

