"""``fcclip metrics``: evaluate predictions on disk.

    fcclip metrics panoptic --gt-json J --gt-dir D --pred-json J --pred-dir D [--workers N] [--out FILE]
    fcclip metrics semantic --gt-dir D --pred-dir D --num-classes K [--ignore 255] [--out FILE]

A subcommand module of the ``fcclip`` command: `add_arguments(parser)` fills the ``metrics`` parser and
`main_args(args)` runs it; `main(argv)` takes what follows ``fcclip metrics`` (``python -m fcclip.metrics.cli``).
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any, Sequence

from .panoptic import pq_compute
from .semantic import semantic_compute

__all__ = ["add_arguments", "build_parser", "main", "main_args"]


def _pct(x: float | None) -> str:
    return "-" if x is None else f"{100 * x:.1f}"


def format_panoptic(result: dict) -> str:
    """PQ / SQ / RQ (percent) and the number of categories counted, for All, Things and Stuff."""
    lines = [f"{'':10s}| {'PQ':>6s} {'SQ':>6s} {'RQ':>6s} {'N':>5s}", "-" * 10 + "+" + "-" * 28]
    for name in ("All", "Things", "Stuff"):
        r = result[name]
        lines.append(f"{name:10s}| {_pct(r['pq']):>6s} {_pct(r['sq']):>6s} {_pct(r['rq']):>6s} {r['n']:5d}")
    return "\n".join(lines)


def format_semantic(result: dict) -> str:
    """mIoU / fwIoU / mACC / pACC (percent) and the number of classes averaged."""
    names = ("mIoU", "fwIoU", "mACC", "pACC")
    head = " ".join(f"{n:>6s}" for n in names) + f" {'N':>5s}"
    row = " ".join(f"{_pct(result[n]):>6s}" for n in names) + f" {result['n']:5d}"
    return f"{head}\n{row}"


def _write(result: dict, out: str | None) -> None:
    if out:
        path = Path(out)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(result, indent=1, allow_nan=False) + "\n")
        print(f"results written to {path}")


def cmd_panoptic(args: argparse.Namespace) -> int:
    result = pq_compute(args.gt_json, args.gt_dir, args.pred_json, args.pred_dir, workers=args.workers)
    print(format_panoptic(result))
    _write(result, args.out)
    return 0


def cmd_semantic(args: argparse.Namespace) -> int:
    ignore = None if args.ignore < 0 else args.ignore
    result = semantic_compute(args.gt_dir, args.pred_dir, args.num_classes, ignore)
    print(format_semantic(result))
    _write(result, args.out)
    return 0


def _run(func: Any, args: argparse.Namespace) -> int:
    try:
        return int(func(args) or 0)
    except (ValueError, FileNotFoundError) as e:
        print(f"fcclip metrics: error: {e}", file=sys.stderr)
    except KeyError as e:
        print(f"fcclip metrics: error: malformed input, missing key {e}", file=sys.stderr)
    return 2


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Fill the ``metrics`` parser: its ``panoptic`` and ``semantic`` subcommands."""
    sub = parser.add_subparsers(dest="metric", required=True)

    p = sub.add_parser("panoptic", help="PQ / SQ / RQ of COCO-panoptic predictions (PNG + JSON)")
    p.add_argument("--gt-json", required=True, help="ground-truth JSON (annotations and categories)")
    p.add_argument("--gt-dir", required=True, help="folder of ground-truth PNGs")
    p.add_argument("--pred-json", required=True, help="predictions JSON (annotations)")
    p.add_argument("--pred-dir", required=True, help="folder of predicted PNGs")
    p.add_argument("--workers", type=int, default=1, help="threads (default: %(default)s)")
    p.add_argument("--out", default=None, help="write the results as JSON here")
    p.set_defaults(metric_func=cmd_panoptic)

    p = sub.add_parser("semantic", help="mIoU / fwIoU / mACC / pACC of PNG label maps matched by file name")
    p.add_argument("--gt-dir", required=True, help="folder of ground-truth label PNGs")
    p.add_argument("--pred-dir", required=True, help="folder of predicted label PNGs (same file names)")
    p.add_argument("--num-classes", type=int, required=True, help="K: labels are 0..K-1")
    p.add_argument("--ignore", type=int, default=255, help="ground-truth label to skip, -1 for none (default: 255)")
    p.add_argument("--out", default=None, help="write the results as JSON here")
    p.set_defaults(metric_func=cmd_semantic)


def main_args(args: argparse.Namespace) -> int:
    """Run the metric ``add_arguments`` parsed; the exit status (2 on bad input, with the reason on stderr)."""
    return _run(args.metric_func, args)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="fcclip metrics", description="evaluate predictions on disk")
    add_arguments(parser)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """``fcclip metrics`` on `argv` (what follows ``metrics``); returns the exit status."""
    return main_args(build_parser().parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
