"""Training samples from a labeling output's rows (``fcclip label``'s Parquet), without Ray or pyarrow.

A labeling output row holds an image's URI and its ``segments`` (``id``, ``category_id``, ``score``, ``rle``, ...; see
README "The output"); the run's vocabulary is in the part files' ``fcclip.vocabulary`` metadata. Two pure steps turn
them into what `fcclip.training.data.train_sample` takes:

- `training_classes`: the training vocabulary from the run's vocabulary and a `LabelSelection` (classes renamed or
  merged with ``class_map``, kept or dropped), and the map from the run's category ids to training class indices;
- `row_targets`: one row's masks and class indices, decoded from the RLEs, and its ignore region: the pixels of
  segments scoring below ``min_score``. An ignore region is not background: the training loss leaves those pixels
  out (`fcclip.training.ignore`), so a segment the teacher was unsure of teaches the student nothing either way.
  Segments of dropped classes are left out of the targets (their pixels are background, as unannotated classes are
  in COCO).
"""
from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, NamedTuple

import numpy as np

from fcclip.masks import decode_rle
from fcclip.vocabulary import Vocabulary

__all__ = ["LabelSelection", "TrainingClasses", "parse_class_map", "row_targets", "training_classes"]


@dataclass(frozen=True)
class LabelSelection:
    """Which pseudo-labels to train on.

    Attributes:
        min_score: segments scoring below it become ignore regions (0: every segment is a target).
        class_map: ``(old, new)`` pairs: the run's class ``old`` (a name, synonym or id) trains as ``new`` (a class
            of the run, named the same way: the two are merged; any other name: the class is renamed).
        keep: when not empty, only these training classes (names after ``class_map``) are kept.
        drop: training classes left out (names after ``class_map``).
    """

    min_score: float = 0.0
    class_map: tuple[tuple[str, str], ...] = ()
    keep: tuple[str, ...] = ()
    drop: tuple[str, ...] = ()


class TrainingClasses(NamedTuple):
    """vocabulary: the training vocabulary; class_index: the run's category id -> training class index (the ids of
    dropped classes are absent)."""

    vocabulary: Vocabulary
    class_index: dict[int, int]


def parse_class_map(specs: Iterable[str]) -> tuple[tuple[str, str], ...]:
    """``["old=new", ...]`` (also ``"a=b, c=d"``) -> ``(("old", "new"), ...)``; ValueError on a malformed entry."""
    out = []
    for spec in specs:
        for item in spec.split(","):
            if not item.strip():
                continue
            old, sep, new = item.partition("=")
            if not sep or not old.strip() or not new.strip():
                raise ValueError(f"--class-map {item.strip()!r}: expected OLD=NEW (class names or ids)")
            out.append((old.strip(), new.strip()))
    return tuple(out)


def training_classes(run_vocabulary: Mapping[str, Any], selection: LabelSelection = LabelSelection(),
                     name: str | None = None) -> TrainingClasses:
    """The training vocabulary of a labeling run (its ``fcclip.vocabulary`` metadata, as ``Vocabulary.to_dict``).

    Classes keep the run's order, ids, names, synonyms and thing/stuff flags. A class mapped onto another existing
    class is merged into it; one mapped onto a new name is renamed (it keeps its id; several classes mapped onto the
    same new name become one class with the first one's id). Raises ValueError naming any class that
    ``class_map``, ``keep`` or ``drop`` refers to and the run does not have, and when nothing is left.
    """
    categories = list(run_vocabulary.get("categories") or [])
    if not categories:
        raise ValueError("the run's vocabulary has no categories")
    by_key: dict[str, dict] = {}
    for c in categories:
        by_key[str(c["id"])] = c
        for n in c.get("names") or []:
            by_key.setdefault(n, c)
    primary = {c["names"][0]: c for c in categories}

    target: dict[int, str] = {}  # source id -> training class name
    for old, new in selection.class_map:
        if old not in by_key:
            raise ValueError(f"--class-map {old}={new}: the run has no class {old!r} "
                             f"(its classes: {', '.join(primary)})")
        # a NEW that names a class of the run (a name, synonym or id) merges into it; any other NEW renames
        target[int(by_key[old]["id"])] = by_key[new]["names"][0] if new in by_key else new

    groups: dict[str, list[dict]] = {}  # training name -> the run's classes it takes, in the run's order
    for c in categories:
        groups.setdefault(target.get(int(c["id"]), c["names"][0]), []).append(c)
    for option, names in (("--keep", selection.keep), ("--drop", selection.drop)):
        unknown = [n for n in names if n not in groups]
        if unknown:
            raise ValueError(f"{option}: no training class {', '.join(map(repr, unknown))} "
                             f"(after --class-map: {', '.join(groups)})")
    kept = [n for n in groups if (not selection.keep or n in selection.keep) and n not in selection.drop]
    if not kept:
        raise ValueError("--keep/--drop leave no class to train")

    entries, class_index = [], {}
    for n in kept:
        members = groups[n]
        base = primary.get(n) if primary.get(n) in members else members[0]
        things = {bool(m.get("isthing", 1)) for m in members}
        if len(things) > 1:
            raise ValueError(f"--class-map merges things and stuff into {n!r} "
                             f"({', '.join(m['names'][0] for m in members)})")
        names = list(base["names"]) if base["names"][0] == n else [n]
        entry = {"id": int(base["id"]), "names": names, "isthing": int(things.pop())}
        if base.get("color") is not None:
            entry["color"] = list(base["color"])
        for m in members:
            class_index[int(m["id"])] = len(entries)
        entries.append(entry)
    vocab_name = name or str(run_vocabulary.get("name") or "labels")
    return TrainingClasses(Vocabulary.from_dict({"name": vocab_name, "categories": entries}), class_index)


def row_targets(segments: Sequence[Mapping[str, Any]] | None, height: int, width: int,
                class_index: Mapping[int, int], min_score: float = 0.0
                ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """One output row's training targets at the image's own size (H, W).

    Args:
        segments: the row's ``segments`` (each with ``category_id``, ``score``, ``rle``).
        class_index: the run's category id -> training class index (`training_classes`); segments of other ids are
            left out (background).
        min_score: segments scoring below it are added to the ignore region instead.
    Returns:
        masks: (N, H, W) bool, one per kept segment; classes: (N,) int64; ignore: (H, W) bool, minus any target pixel.
    Raises:
        ValueError: a mask is not H x W.
    """
    masks, classes = [], []
    ignore = np.zeros((height, width), dtype=bool)
    for s in segments or ():
        size = [int(v) for v in s["rle"]["size"]]
        if size != [height, width]:
            raise ValueError(f"segment {s.get('id')}'s mask is {size[1]} x {size[0]}, the image {width} x {height}")
        score = s.get("score")
        if score is not None and float(score) < min_score:
            ignore |= decode_rle(s["rle"])
            continue
        index = class_index.get(int(s["category_id"]))
        if index is None:
            continue
        masks.append(decode_rle(s["rle"]))
        classes.append(index)
    stacked = np.stack(masks) if masks else np.zeros((0, height, width), dtype=bool)
    if masks:
        ignore &= ~stacked.any(axis=0)
    return stacked, np.asarray(classes, dtype=np.int64), ignore
