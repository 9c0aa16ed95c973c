"""``fcclip show``: a self-contained HTML report of a labeling output (``DEST/*.parquet``, see ``fcclip_pipelines.output``).

    fcclip show DEST --out report.html [--sample N] [--seed S] [--top-classes K] [--image-width PX] [--max-errors N]

Four parts, one module each:

- ``output``: DEST's part files, checked to be a labeling output from their footers alone (anything else is
  refused in one line: ``NotALabelingOutput``);
- ``scan``: the counts, per class and per error reason, and the seeded sample, as DuckDB queries over the part
  files' rows (read once, without the masks);
- ``overlays``: the sampled rows read back and drawn (only their masks are decoded), never scaled up;
- ``page``: the HTML, from the ``report.html`` template, one function per section.
"""
from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

import fsspec

from ..output import LabelingOutput, NotALabelingOutput, OutputError, add_version_argument, open_output
from .overlays import Figure, render_samples
from .page import plural, render_html
from .scan import SCORE_BINS, ClassStats, Report, Sample, scan

__all__ = [
    "SCORE_BINS", "ClassStats", "Figure", "LabelingOutput", "NotALabelingOutput", "OutputError", "Report", "Sample",
    "add_arguments", "build_report", "main", "main_args", "open_output", "render_html", "render_samples", "scan",
]


def build_report(
    dest: str, *, sample: int = 24, seed: int = 0, top_classes: int = 8, image_width: int = 640, max_errors: int = 200,
    version: int | None = None,
) -> tuple[str, Report]:
    """Scan DEST (``version`` of its table; default the current one), draw the sampled images and return (the HTML
    page, the counts)."""
    report = scan(open_output(dest, version), sample=sample, seed=seed, max_errors=max_errors)
    figures = render_samples(report, max_width=image_width, max_height=int(image_width * 1.5))
    return render_html(report, figures, top_classes=top_classes), report


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("dest", metavar="DEST", help="a labeling output: local folder or object-store prefix (*.parquet)")
    add_version_argument(p)
    p.add_argument("--out", required=True, metavar="REPORT.html", help="the HTML file to write (a path or a URI)")
    p.add_argument("--sample", type=int, default=24, metavar="N",
                   help="ok images drawn in the gallery (default: %(default)s)")
    p.add_argument("--seed", type=int, default=0, metavar="S", help="seed of the random sample (default: %(default)s)")
    p.add_argument("--top-classes", type=int, default=8, metavar="K",
                   help="classes with a score histogram (default: %(default)s)")
    p.add_argument("--image-width", type=int, default=640, metavar="PX",
                   help="largest overlay width in pixels; smaller images keep their size (default: %(default)s)")
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
            max_errors=args.max_errors, version=args.version,
        )
    except OutputError as e:
        print(f"fcclip show: error: {e}", file=sys.stderr)
        return 2
    with fsspec.open(args.out, "w", encoding="utf-8") as f:
        f.write(page)
    print(f"{plural(report.images, 'image')}: {report.ok} ok, {report.error} failed, "
          f"{plural(report.segments, 'segment')}; {len(report.sample)} drawn -> {args.out}")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="fcclip show", description="an HTML report of a labeling output")
    add_arguments(parser)
    return main_args(parser.parse_args(argv))

