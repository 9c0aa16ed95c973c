"""Training on several sources at once: one training vocabulary for all of them, and samples drawn by share.

``fcclip train --data DEST --mix coco=ROOT:0.5`` trains on pseudo-labels and COCO panoptic together. Each source has
its own vocabulary (the labeling run's, the COCO tree's categories); the model learns one:

- `union_vocabulary`: the classes of the first vocabulary (the ``--data`` source's), in its order, then each class
  of the next ones that is not already there. A class is already there when one of its names (label or synonym) is
  exactly a name of a union class coming from an earlier source; it then trains as that union class, whose id,
  first name, colour and thing/stuff come from the earlier source (the first source wins) and which gains the
  later class's other names as synonyms. Exact names, as `fcclip.vocabulary.seen_mask` compares them. An added
  class keeps its id unless the union already uses it (then it takes the next id above the largest). A class that
  shares names with two union classes, or that would merge a thing with a stuff class, is an error: rename it first
  (``--class-map`` for pseudo-labels).
- `MixedSamples`: one stream of training samples from several, each draw taking the next sample of a source chosen
  at random with the source's share as its probability (a seeded generator, so a run draws the same sequence of
  sources each time). A batch then holds each source's share in expectation, whatever the sources' sizes: a small
  source is repeated, a large one is not read to its end.
"""
from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from typing import Any, NamedTuple

import numpy as np

from fcclip.vocabulary import Vocabulary

__all__ = ["MixedSamples", "UnionVocabulary", "union_vocabulary"]


class UnionVocabulary(NamedTuple):
    """vocabulary: the training vocabulary; index[s][k]: the union class index of class k of source s."""

    vocabulary: Vocabulary
    index: list[list[int]]


def union_vocabulary(vocabularies: Sequence[Vocabulary], name: str = "mix") -> UnionVocabulary:
    """The union of the sources' vocabularies, classes matched by name (module docstring).

    Raises:
        ValueError: a class shares names with more than one class of the earlier sources, or merges a thing class
            with a stuff class; the message names both sides.
    """
    entries: list[dict[str, Any]] = []
    sources: list[str] = []  # the vocabulary each entry came from, for error messages
    index: list[list[int]] = []
    for vocabulary in vocabularies:
        by_name = {n: k for k, entry in enumerate(entries) for n in entry["names"]}  # earlier sources only
        mapping = []
        for c in vocabulary.categories:
            matches = sorted({by_name[n] for n in c.names if n in by_name})
            if len(matches) > 1:
                raise ValueError(f"{vocabulary.name}'s class {c.label!r} shares names with several classes of "
                                 f"{', '.join(sorted({sources[k] for k in matches}))}: "
                                 f"{', '.join(repr(entries[k]['names'][0]) for k in matches)}; rename it")
            if matches:
                k = matches[0]
                if bool(entries[k]["isthing"]) != c.is_thing:
                    kinds = ("stuff", "a thing") if c.is_thing else ("a thing", "stuff")
                    raise ValueError(f"{vocabulary.name}'s class {c.label!r} is {kinds[1]} but matches "
                                     f"{sources[k]}'s class {entries[k]['names'][0]!r}, which is {kinds[0]}: "
                                     "rename one of them")
                entries[k]["names"] += [n for n in c.names if n not in entries[k]["names"]]
            else:
                k = len(entries)
                used = {e["id"] for e in entries}
                entries.append({"id": c.id if c.id not in used else max(used) + 1, "names": list(c.names),
                                "isthing": int(c.is_thing), "color": list(c.color)})
                sources.append(vocabulary.name)
            mapping.append(k)
        index.append(mapping)
    return UnionVocabulary(Vocabulary.from_dict({"name": name, "categories": entries}), index)


class MixedSamples:
    """An iterator over samples drawn from several iterators by share (module docstring).

    Args:
        streams: source name -> an iterator of samples (endless, or at least as long as the run needs).
        shares: source name -> its share of the draws, > 0; the shares add up to 1.
        seed: seeds the draws (e.g. the run's seed, the worker's rank and the iteration it starts at).
    Attributes:
        counts: source name -> samples drawn from it so far.
    Raises:
        ValueError: the names differ, a share is not positive, or the shares do not add up to 1.
    """

    def __init__(self, streams: Mapping[str, Iterator], shares: Mapping[str, float], seed: int | Sequence[int]):
        if set(streams) != set(shares):
            raise ValueError(f"streams {sorted(streams)} and shares {sorted(shares)} name different sources")
        if any(not share > 0 for share in shares.values()) or not np.isclose(sum(shares.values()), 1.0):
            raise ValueError(f"shares must be positive and add up to 1, got {dict(shares)}")
        self.names = list(streams)
        self._streams = [streams[n] for n in self.names]
        self._p = np.asarray([shares[n] for n in self.names], dtype=np.float64)
        self._p /= self._p.sum()
        self._rng = np.random.default_rng(seed)
        self.counts = {n: 0 for n in self.names}

    def __iter__(self) -> MixedSamples:
        return self

    def __next__(self) -> Any:
        k = int(self._rng.choice(len(self._p), p=self._p))
        sample = next(self._streams[k])
        self.counts[self.names[k]] += 1
        return sample
