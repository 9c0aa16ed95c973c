"""Command-line values checked before anything is read or started: number arguments with their ranges
(``type=number(int, minimum=1)`` refuses ``--shard-size 0`` as argparse refuses a word where a number goes: one line,
exit status 2), and a local ``--out`` that a file is in the way of."""
from __future__ import annotations

import argparse
import math
from pathlib import Path
from typing import Callable


def number(kind: type = float, minimum: float | None = None, maximum: float | None = None,
           above: float | None = None) -> Callable[[str], float]:
    """An argparse ``type``: a finite ``kind`` (int or float) at least ``minimum``, at most ``maximum`` and greater
    than ``above``, where given."""
    def parse(text: str):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"takes {'a whole number' if kind is int else 'a number'}, got {text!r}") \
                from None
        if not math.isfinite(value):
            raise argparse.ArgumentTypeError(f"takes a finite number, got {text!r}")
        if minimum is not None and maximum is not None and not minimum <= value <= maximum:
            raise argparse.ArgumentTypeError(f"takes a number from {minimum:g} to {maximum:g}, got {text!r}")
        if minimum is not None and value < minimum:
            raise argparse.ArgumentTypeError(f"must be at least {minimum:g}, got {text!r}")
        if maximum is not None and value > maximum:
            raise argparse.ArgumentTypeError(f"must be at most {maximum:g}, got {text!r}")
        if above is not None and value <= above:
            raise argparse.ArgumentTypeError(f"must be more than {above:g}, got {text!r}")
        return value

    parse.__name__ = kind.__name__  # argparse names the type in its own messages
    return parse


COUNT = number(int, minimum=1)  # images, shards, actors, CPUs: one or more
SCORE = number(float, minimum=0.0, maximum=1.0)  # a score threshold or a fraction
SECONDS = number(float, above=0.0)  # a time limit


def file_in_the_way(out: str) -> str | None:
    """Why a local ``--out`` folder cannot be made, in one line (it, or a folder above it, is a file), or None."""
    for path in (Path(out), *Path(out).absolute().parents):
        if path.exists() and not path.is_dir():
            return f"--out {out}{'' if path == Path(out) else f': {path}'} is a file, not a folder"
    return None
