"""Mixing training sources without Ray: the union of two vocabularies and each source's class indices in it, samples
drawn by share, the ``--mix`` syntax."""
import itertools
import math

import numpy as np
import pytest
import torch

from fcclip.training.data import collate_batches
from fcclip.training.mix import MixedSamples, union_vocabulary
from fcclip.vocabulary import Vocabulary
from fcclip_pipelines.train_data import MixSpec, parse_mix

LABELS = Vocabulary.from_dict({"name": "run", "categories": [
    {"id": 1, "names": ["dog", "puppy"], "isthing": 1, "color": [1, 1, 1]},
    {"id": 2, "names": ["lawn"], "isthing": 0},
    {"id": 3, "names": ["kite"], "isthing": 1},
    {"id": 4, "names": ["man"], "isthing": 1},
]})
COCO = Vocabulary.from_dict({"name": "coco_panoptic", "categories": [
    {"id": 1, "names": ["person", "man", "woman"], "isthing": 1, "color": [2, 2, 2]},
    {"id": 18, "names": ["dog"], "isthing": 1},
    {"id": 3, "names": ["car"], "isthing": 1},
    {"id": 193, "names": ["grass", "lawn"], "isthing": 0},
    {"id": 187, "names": ["sky"], "isthing": 0},
]})


def _table(vocabulary):
    return [(c.id, list(c.names), c.is_thing) for c in vocabulary.categories]


def test_union_matches_classes_by_any_shared_name_and_the_first_source_wins():
    union, (labels_index, coco_index) = union_vocabulary([LABELS, COCO])
    assert _table(union) == [
        (1, ["dog", "puppy"], True),  # the labels' dog: its id, first name and colour; no new name from COCO
        (2, ["lawn", "grass"], False),  # matched by COCO's synonym "lawn"; COCO's "grass" becomes a synonym
        (3, ["kite"], True),
        (4, ["man", "person", "woman"], True),  # COCO's person matched by its synonym "man"
        (5, ["car"], True),  # COCO's car: id 3 is the kite's, so the next id above the largest
        (187, ["sky"], False),  # COCO's sky keeps its id
    ]
    assert union.categories[0].color == (1, 1, 1)
    assert labels_index == [0, 1, 2, 3]  # the first source's classes keep their indices
    assert coco_index == [3, 0, 4, 1, 5]  # person -> man, dog -> dog, car, grass -> lawn, sky

    # the other way round, COCO's classes win
    union, (coco_index, labels_index) = union_vocabulary([COCO, LABELS])
    assert union.labels == ("person", "dog", "car", "grass", "sky", "kite")
    assert coco_index == [0, 1, 2, 3, 4] and labels_index == [1, 3, 5, 0]
    assert union.categories[5].id == 194  # the kite's id 3 is COCO's car's
    assert union.categories[0].names == ("person", "man", "woman")


def test_union_merges_several_classes_into_one_and_keeps_a_source_own_duplicates():
    other = Vocabulary.from_dict({"name": "other", "categories": [
        {"id": 7, "names": ["pup"], "isthing": 1}, {"id": 8, "names": ["puppy", "pup"], "isthing": 1},
        {"id": 9, "names": ["hound", "dog"], "isthing": 1},
    ]})
    union, (_, index) = union_vocabulary([LABELS, other])
    assert index == [4, 0, 0]
    assert _table(union)[0] == (1, ["dog", "puppy", "pup", "hound"], True)
    assert _table(union)[4] == (7, ["pup"], True)  # "pup" matched nothing of the first source: a class of its own
    # a name in two classes of one source (ADE20K-847 has such) is no match between them
    same = Vocabulary.from_dict({"name": "dup", "categories": [{"id": 1, "names": ["rug"]}, {"id": 2,
                                                                                             "names": ["rug", "mat"]}]})
    union, (index,) = union_vocabulary([same])
    assert len(union) == 2 and index == [0, 1]


def test_union_refuses_ambiguous_and_thing_stuff_matches():
    both = Vocabulary.from_dict({"name": "both", "categories": [{"id": 5, "names": ["kite", "lawn"], "isthing": 1}]})
    with pytest.raises(ValueError, match="both's class 'kite' shares names with several classes of run: 'lawn', "
                                         "'kite'; rename it"):
        union_vocabulary([LABELS, both])
    stuff_dog = Vocabulary.from_dict({"name": "odd", "categories": [{"id": 5, "names": ["puppy"], "isthing": 0}]})
    with pytest.raises(ValueError, match="odd's class 'puppy' is stuff but matches run's class 'dog', which is a "
                                         "thing"):
        union_vocabulary([LABELS, stuff_dog])


def _stream(name):
    return ({"source": name, "n": n} for n in itertools.count())


def test_mixed_samples_follow_the_share_within_binomial_tolerance_and_the_seed():
    n, p = 4000, 0.3
    mixed = MixedSamples({"labels": _stream("labels"), "coco": _stream("coco")}, {"labels": 1 - p, "coco": p},
                         seed=[0, 1, 0])
    drawn = [next(mixed) for _ in range(n)]
    coco = sum(d["source"] == "coco" for d in drawn)
    assert abs(coco - n * p) < 4 * math.sqrt(n * p * (1 - p)), coco
    assert mixed.counts == {"labels": n - coco, "coco": coco}
    # each source's samples come in its own order, none skipped
    assert [d["n"] for d in drawn if d["source"] == "coco"] == list(range(coco))

    def sources(seed):
        m = MixedSamples({"a": _stream("a"), "b": _stream("b")}, {"a": 0.5, "b": 0.5}, seed=seed)
        return [next(m)["source"] for _ in range(200)]

    assert sources([0, 1, 0]) == sources([0, 1, 0])
    assert sources([0, 1, 0]) != sources([0, 1, 20])  # another start iteration (after a restart): other draws


def test_mixed_samples_refuse_bad_shares():
    with pytest.raises(ValueError, match="add up to 1"):
        MixedSamples({"a": _stream("a"), "b": _stream("b")}, {"a": 0.5, "b": 0.6}, seed=0)
    with pytest.raises(ValueError, match="positive"):
        MixedSamples({"a": _stream("a"), "b": _stream("b")}, {"a": 1.0, "b": 0.0}, seed=0)
    with pytest.raises(ValueError, match="name different sources"):
        MixedSamples({"a": _stream("a")}, {"b": 1.0}, seed=0)


def test_collate_batches_of_a_mixed_stream():
    def samples(label):
        while True:
            yield {"image": np.zeros((32, 32, 3), np.uint8), "labels": torch.tensor([label]),
                   "masks": torch.ones(1, 32, 32, dtype=torch.bool)}

    mixed = MixedSamples({"a": samples(0), "b": samples(1)}, {"a": 0.5, "b": 0.5}, seed=3)
    batches = list(itertools.islice(collate_batches(mixed, 4), 5))
    assert [b["images"].shape for b in batches] == [(4, 3, 32, 32)] * 5
    labels = [int(t["labels"][0]) for b in batches for t in b["targets"]]
    assert sum(mixed.counts.values()) == 20 and labels.count(1) == mixed.counts["b"]
    assert list(collate_batches(iter([{"image": np.zeros((8, 8, 3), np.uint8), "labels": [0],
                                       "masks": np.ones((1, 8, 8), bool)}]), 2)) == []  # an incomplete batch


def test_mix_spec_syntax_and_errors():
    assert parse_mix("coco=data/coco:0.5") == MixSpec("coco", "data/coco", 0.5)
    assert parse_mix("labels=s3://bucket/labels/:0.25") == MixSpec("labels", "s3://bucket/labels/", 0.25)
    for spec, message in [
        ("coco:0.5", "expected KIND=URI:SHARE"),
        ("coco=data/coco", "expected KIND=URI:SHARE"),
        ("ade=data/ade:0.5", "unknown source kind 'ade' \\(one of coco, labels\\)"),
        ("coco=:0.5", "no URI"),
        ("coco=data:half", "'half' is not a number"),
        ("coco=data:1", "between 0 and 1"),
        ("coco=data:0", "between 0 and 1"),
        ("coco=data:-0.2", "between 0 and 1"),
    ]:
        with pytest.raises(ValueError, match=message):
            parse_mix(spec)
