"""Metrics: panoptic quality, semantic mIoU, mask AP, and the `fcclip metrics` command, on hand-built cases."""
from __future__ import annotations

import argparse
import json

import numpy as np
import pytest
from PIL import Image

from fcclip.masks import encode_rle, id2rgb
from fcclip.metrics import (
    InstanceAccumulator,
    PanopticAccumulator,
    SemanticAccumulator,
    pq_compute,
    semantic_compute,
)
from fcclip.metrics.cli import add_arguments, main, main_args

CATEGORIES = [
    {"id": 1, "name": "cat", "isthing": 1},
    {"id": 2, "name": "dog", "isthing": 1},
    {"id": 3, "name": "grass", "isthing": 0},
    {"id": 4, "name": "sky", "isthing": 0},
]


def _pq(gt_map, gt_segments, pred_map, pred_segments, categories=CATEGORIES):
    acc = PanopticAccumulator(categories)
    acc.update(np.asarray(gt_map), gt_segments, np.asarray(pred_map), pred_segments)
    return acc.result()


def _seg(sid, category, iscrowd=0):
    return {"id": sid, "category_id": category, "iscrowd": iscrowd}


def _scene():
    """8 x 8: a cat (id 5, 2 x 3 = 6 px), a dog (id 9, 3 x 3 = 9 px), grass (id 2) everywhere else but a void strip."""
    gt = np.full((8, 8), 2, dtype=np.int32)
    gt[0, :] = 0  # void row
    gt[1:3, 1:4] = 5
    gt[4:7, 4:7] = 9
    return gt, [_seg(5, 1), _seg(9, 2), _seg(2, 3)]


# ------------------------------------------------------------------------------------------------ panoptic
def test_perfect_prediction():
    gt, segments = _scene()
    r = _pq(gt, segments, gt, [dict(s, score=0.9) for s in segments])
    for group, n in (("All", 3), ("Things", 2), ("Stuff", 1)):
        assert (r[group]["pq"], r[group]["sq"], r[group]["rq"], r[group]["n"]) == (1.0, 1.0, 1.0, n)
    assert r["per_class"][1] == {"pq": 1.0, "sq": 1.0, "rq": 1.0, "tp": 1, "fp": 0, "fn": 0, "iou": 1.0}
    assert r["per_class"][4]["pq"] is None  # sky: nowhere, left out of the averages


def test_prediction_over_void_is_left_out_of_the_union():
    gt, segments = _scene()
    pred = gt.copy()
    pred[0, :] = 2  # grass predicted over the void row: still a perfect match
    r = _pq(gt, segments, pred, segments)
    assert r["All"]["pq"] == 1.0
    assert r["per_class"][3]["iou"] == 1.0


def test_one_missed_segment():
    gt, segments = _scene()
    pred = gt.copy()
    pred[pred == 9] = 0  # the dog is not predicted
    r = _pq(gt, segments, pred, [s for s in segments if s["id"] != 9])
    # dog: TP 0, FN 1 -> PQ = SQ = RQ = 0; cat and grass perfect
    assert r["per_class"][2] == {"pq": 0.0, "sq": 0.0, "rq": 0.0, "tp": 0, "fp": 0, "fn": 1, "iou": 0.0}
    assert r["All"] == {"pq": pytest.approx(2 / 3), "sq": pytest.approx(2 / 3), "rq": pytest.approx(2 / 3), "n": 3}
    assert r["Things"] == {"pq": 0.5, "sq": 0.5, "rq": 0.5, "n": 2}
    assert r["Stuff"] == {"pq": 1.0, "sq": 1.0, "rq": 1.0, "n": 1}


def test_two_instances_one_missed():
    gt = np.zeros((4, 10), dtype=np.int32)
    gt[:, 0:4] = 1
    gt[:, 6:10] = 2
    pred = np.zeros_like(gt)
    pred[:, 0:3] = 7  # IoU 12 / 16 = 0.75 with cat 1; cat 2 missed
    r = _pq(gt, [_seg(1, 1), _seg(2, 1)], pred, [_seg(7, 1)])
    c = r["per_class"][1]
    assert (c["tp"], c["fp"], c["fn"]) == (1, 0, 1)
    assert c["iou"] == 0.75
    assert c["pq"] == 0.75 / 1.5 and c["sq"] == 0.75 and c["rq"] == 1 / 1.5
    assert r["All"]["n"] == 1 and r["All"]["pq"] == 0.5


@pytest.mark.parametrize("width, matched", [(50, False), (51, True)])
def test_iou_exactly_half_is_not_a_match(width, matched):
    gt = np.zeros((1, 120), dtype=np.int32)
    gt[0, :100] = 1
    pred = np.zeros_like(gt)
    pred[0, :width] = 3  # IoU = width / 100
    r = _pq(gt, [_seg(1, 1)], pred, [_seg(3, 1)])["per_class"][1]
    if matched:
        assert (r["tp"], r["fp"], r["fn"]) == (1, 0, 0) and r["iou"] == 0.51
    else:
        assert (r["tp"], r["fp"], r["fn"]) == (0, 1, 1) and r["iou"] == 0.0


def _crowd_scene():
    """1 x 20: a crowd of cats (id 1, px 0-9), a crowd of dogs (id 2, px 10-15), void (px 16-19)."""
    gt = np.zeros((1, 20), dtype=np.int32)
    gt[0, :10] = 1
    gt[0, 10:16] = 2
    return gt, [_seg(1, 1, iscrowd=1), _seg(2, 2, iscrowd=1)]


@pytest.mark.parametrize(
    "pixels, category, fp",
    [
        (slice(0, 10), 1, 0),  # all over the crowd of its class: ignored
        (slice(3, 12), 1, 0),  # 7 of 9 px over the crowd of its class: ignored
        (slice(5, 15), 1, 1),  # 5 of 10 px: exactly half is not more than half, a false positive
        (slice(0, 10), 2, 1),  # over a crowd of another class: a false positive
        (slice(14, 20), 1, 0),  # 4 of 6 px over void: ignored
        (slice(8, 20), 1, 1),  # 2 px crowd of its class + 4 px void = 6 of 12 (the dogs' 6 px do not count): FP
    ],
)
def test_crowd_and_void(pixels, category, fp):
    gt, segments = _crowd_scene()
    pred = np.zeros_like(gt)
    pred[0, pixels] = 4
    r = _pq(gt, segments, pred, [_seg(4, category)])
    stat = r["per_class"][category]
    assert (stat["tp"], stat["fp"], stat["fn"]) == (0, fp, 0)  # crowds are never false negatives
    assert r["All"]["n"] == fp


def test_void_and_crowd_add_up():
    gt, segments = _crowd_scene()
    pred = np.zeros_like(gt)
    pred[0, 7:20] = 4  # 13 px: 3 over the cat crowd, 6 over the dog crowd, 4 over void
    assert _pq(gt, segments, pred, [_seg(4, 2)])["per_class"][2]["fp"] == 0  # as dog: 6 + 4 of 13 ignored
    assert _pq(gt, segments, pred, [_seg(4, 1)])["per_class"][1]["fp"] == 0  # as cat: 3 + 4 of 13 ignored
    pred[0, 7:9] = 0  # 11 px: 1 cat crowd, 6 dog crowd, 4 void
    assert _pq(gt, segments, pred, [_seg(4, 1)])["per_class"][1]["fp"] == 1  # as cat: 1 + 4 of 11


def test_unknown_ground_truth_category_is_void():
    gt = np.zeros((1, 10), dtype=np.int32)
    gt[0, :] = 1
    gt[0, 8:] = 3  # id 3 is not in segments_info: void too
    pred = np.full_like(gt, 2)
    r = _pq(gt, [_seg(1, 99)], pred, [_seg(2, 1)])  # category 99 is not evaluated
    assert r["per_class"][1]["fp"] == 0 and r["All"]["n"] == 0 and r["All"]["pq"] is None


def test_empty_category_is_not_counted():
    gt, segments = _scene()
    r = _pq(gt, segments, gt, segments)
    assert r["All"]["n"] == 3 and r["Stuff"]["n"] == 1
    assert r["per_class"][4] == {"pq": None, "sq": None, "rq": None, "tp": 0, "fp": 0, "fn": 0, "iou": 0.0}
    only_sky = [dict(CATEGORIES[3])]
    empty = PanopticAccumulator(only_sky).result()
    assert empty["All"] == {"pq": None, "sq": None, "rq": None, "n": 0}


def test_things_and_stuff_split():
    gt, segments = _scene()  # grass: 64 - 8 void - 6 cat - 9 dog = 41 px, 8 of them on the bottom row
    pred = gt.copy()
    pred[7, :] = 8  # sky over the bottom row: a sky FP (not mostly void); grass matched with IoU 33 / 41
    categories = [dict(c, isthing=bool(c["isthing"])) for c in CATEGORIES]  # bools work as well as 0/1
    r = _pq(gt, segments, pred, segments + [_seg(8, 4)], categories)
    grass_iou = 33 / 41
    assert r["per_class"][3]["iou"] == grass_iou
    assert r["per_class"][4] == {"pq": 0.0, "sq": 0.0, "rq": 0.0, "tp": 0, "fp": 1, "fn": 0, "iou": 0.0}
    assert r["Things"] == {"pq": 1.0, "sq": 1.0, "rq": 1.0, "n": 2}
    assert r["Stuff"]["n"] == 2
    assert r["Stuff"]["pq"] == pytest.approx(grass_iou / 2)
    assert r["Stuff"]["sq"] == pytest.approx(grass_iou / 2)  # sky: FP only, SQ 0 and averaged (as the COCO API)
    assert r["Stuff"]["rq"] == pytest.approx(0.5)
    assert r["All"]["pq"] == pytest.approx((2 + grass_iou) / 4) and r["All"]["n"] == 4


def _random_image(rng, categories=CATEGORIES, size=24):
    """A random partition into segments, with void, crowds, and a perturbed prediction (its ids random)."""
    yy, xx = np.mgrid[:size, :size]

    def cells(n):
        pts = rng.integers(0, size, size=(n, 2))
        return ((yy[None] - pts[:, :1, None]) ** 2 + (xx[None] - pts[:, 1:, None]) ** 2).argmin(0)

    cell = cells(int(rng.integers(2, 9)))
    ids = rng.choice(np.arange(1, 5000), size=cell.max() + 1, replace=False)
    ids[rng.random(ids.size) < 0.15] = 0
    gt = ids[cell]
    category_ids = [c["id"] for c in categories]
    gt_segments, crowded = [], set()
    for sid in np.unique(gt[gt > 0]).tolist():
        c = int(rng.choice(category_ids))
        crowd = int(c in (1, 2) and c not in crowded and rng.random() < 0.2)
        crowded |= {c} if crowd else set()
        gt_segments.append(_seg(sid, c, crowd))
    shifted = np.roll(cell, tuple(rng.integers(-3, 4, size=2)), axis=(0, 1))
    shifted = np.where(rng.random(cell.shape) < 0.05, rng.integers(0, cell.max() + 1, cell.shape), shifted)
    pids = rng.choice(np.arange(1, 5000), size=cell.max() + 1, replace=False)
    pids[rng.random(pids.size) < 0.1] = 0
    pred = pids[shifted]
    gt_category = {s["id"]: s["category_id"] for s in gt_segments}
    pred_segments = []
    for pid in np.unique(pred[pred > 0]).tolist():
        under, counts = np.unique(gt[pred == pid], return_counts=True)
        c = gt_category.get(int(under[counts.argmax()]), int(rng.choice(category_ids)))
        if rng.random() < 0.15:
            c = int(rng.choice(category_ids))
        pred_segments.append(_seg(pid, c))
    return gt, gt_segments, pred, pred_segments


def _relabel(ids, segments, rng):
    old = sorted(s["id"] for s in segments)
    new = rng.choice(np.arange(1, 1 << 24), size=len(old), replace=False)
    lut = dict(zip(old, new.tolist()))
    relabeled = np.zeros(ids.shape, dtype=np.int64)
    for o, n in lut.items():
        relabeled[ids == o] = n
    return relabeled, [dict(s, id=lut[s["id"]]) for s in reversed(segments)]


def test_segment_id_permutation_invariance():
    rng = np.random.default_rng(1)
    images = [_random_image(rng) for _ in range(12)]
    a, b = PanopticAccumulator(CATEGORIES), PanopticAccumulator(CATEGORIES)
    for gt, gs, pred, ps in images:
        a.update(gt, gs, pred, ps)
        b.update(*_relabel(gt, gs, rng), *_relabel(pred, ps, rng))
    assert a.result() == b.result()
    assert a.result()["All"]["n"] > 0


def test_sharded_equals_one_shot():
    rng = np.random.default_rng(2)
    images = [_random_image(rng) for _ in range(30)]
    whole = PanopticAccumulator(CATEGORIES)
    for image in images:
        whole.update(*image)
    merged = PanopticAccumulator(CATEGORIES)
    for shard in (images[:1], images[1:13], images[13:14], images[14:]):
        part = PanopticAccumulator(CATEGORIES)
        for image in shard[::-1]:
            part.update(*image)
        state = json.loads(json.dumps(part.state_dict()))  # as a Ray worker would send it
        merged.merge(PanopticAccumulator.from_state_dict(state))
    assert merged.num_images == whole.num_images == 30
    assert merged.result() == whole.result()  # exactly, every number
    assert json.loads(json.dumps(whole.state_dict())) == whole.state_dict()


def test_matches_reference_values():
    # golden numbers: cocodataset/panopticapi's pq_compute on these 20 images written as PNG + JSON
    expected = {
        "All": (0.29202528237605396, 0.6980062754674453, 0.4221560846560847, 4),
        "Things": (0.3395712698028595, 0.6859582795557337, 0.49074074074074076, 2),
        "Stuff": (0.24447929494924847, 0.7100542713791567, 0.35357142857142854, 2),
    }
    rng = np.random.default_rng(0)
    acc = PanopticAccumulator(CATEGORIES)
    for _ in range(20):
        acc.update(*_random_image(rng))
    r = acc.result()
    for group, (pq, sq, rq, n) in expected.items():
        assert r[group]["n"] == n
        assert (r[group]["pq"], r[group]["sq"], r[group]["rq"]) == pytest.approx((pq, sq, rq), abs=1e-12)


def test_prediction_format_errors():
    gt, segments = _scene()
    acc = PanopticAccumulator(CATEGORIES)
    with pytest.raises(ValueError, match=r"\[9\] are in the map"):
        acc.update(gt, segments, gt, [s for s in segments if s["id"] != 9], image_id="x")
    with pytest.raises(ValueError, match="have no pixel"):
        acc.update(gt, segments, gt, segments + [_seg(77, 1)])
    with pytest.raises(ValueError, match="unknown category_id 42"):
        acc.update(gt, segments, gt, [_seg(5, 42), _seg(9, 2), _seg(2, 3)])
    with pytest.raises(ValueError, match="differ in shape"):
        acc.update(gt, segments, gt[:4], segments)
    with pytest.raises(ValueError, match="different categories"):
        acc.merge(PanopticAccumulator(CATEGORIES[:2]))
    assert acc.num_images == 0


# ------------------------------------------------------------------------------------------------ semantic
def test_semantic_hand_computed():
    gt = np.array([[0, 0, 1, 1], [2, 2, 2, 255]])
    pred = np.array([[0, 1, 1, 1], [2, 0, 2, 2]])
    acc = SemanticAccumulator(3)
    acc.update(gt, pred)
    np.testing.assert_array_equal(acc.confusion, [[1, 1, 0, 0], [0, 2, 0, 0], [1, 0, 2, 0]])
    r = acc.result()
    assert r["per_class"] == {
        0: {"iou": pytest.approx(1 / 3), "acc": 0.5},
        1: {"iou": pytest.approx(2 / 3), "acc": 1.0},
        2: {"iou": pytest.approx(2 / 3), "acc": pytest.approx(2 / 3)},
    }
    assert r["mIoU"] == pytest.approx(5 / 9)
    assert r["fwIoU"] == pytest.approx((2 / 3 + 4 / 3 + 2) / 7)
    assert r["pACC"] == pytest.approx(5 / 7)
    assert r["mACC"] == pytest.approx((1 / 2 + 1 + 2 / 3) / 3)
    assert r["n"] == 3


def test_semantic_ignore_and_absent_classes():
    gt = np.array([[0, 0, 1, 1], [2, 2, 2, 255]])
    pred = np.array([[0, 1, 1, 1], [2, 0, 2, 2]])
    acc = SemanticAccumulator(5)  # classes 3 and 4 appear nowhere
    acc.update(gt, pred)
    r = acc.result()
    assert r["mIoU"] == pytest.approx(5 / 9) and r["n"] == 3
    assert r["per_class"][3] == {"iou": None, "acc": None}
    # the ignored pixel's prediction (2) counts nowhere: changing it changes nothing
    acc2 = SemanticAccumulator(5)
    acc2.update(gt, np.where(gt == 255, 4, pred))
    assert acc2.result() == r
    # no ignore label: 255 in the ground truth is an error
    with pytest.raises(ValueError, match=r"\[255\]"):
        SemanticAccumulator(5, ignore_index=None).update(gt, pred)


def test_semantic_predicted_only_class_and_unlabeled_prediction():
    acc = SemanticAccumulator(4)
    acc.update(np.array([[0, 0, 0, 0]]), np.array([[0, 0, 3, 255]]))
    r = acc.result()
    # class 3 is predicted but never in the ground truth: left out of the means (detectron2); 255 is just wrong
    assert r["per_class"][3] == {"iou": None, "acc": None}
    assert r["per_class"][0] == {"iou": 0.5, "acc": 0.5}
    assert (r["mIoU"], r["fwIoU"], r["mACC"], r["pACC"], r["n"]) == (0.5, 0.5, 0.5, 0.5, 1)


def _detectron2_formula(gt, pred, k, ignore=255):
    """detectron2 SemSegEvaluator's arithmetic, written out independently (predictions in [0, K))."""
    conf = np.zeros((k + 1, k + 1), dtype=np.int64)  # [pred, gt]
    for g, p in zip(gt, pred):
        g = np.where(g == ignore, k, g)
        conf += np.bincount((k + 1) * p.ravel() + g.ravel(), minlength=conf.size).reshape(conf.shape)
    tp = conf.diagonal()[:-1].astype(float)
    pos_gt = conf[:-1, :-1].sum(0).astype(float)
    pos_pred = conf[:-1, :-1].sum(1).astype(float)
    valid = pos_gt > 0
    iou = tp[valid] / (pos_gt + pos_pred - tp)[valid]
    return {
        "mIoU": iou.mean(),
        "fwIoU": (iou * pos_gt[valid] / pos_gt.sum()).sum(),
        "mACC": (tp[valid] / pos_gt[valid]).mean(),
        "pACC": tp.sum() / pos_gt.sum(),
    }


def test_semantic_sharded_equals_one_shot_and_detectron2():
    rng = np.random.default_rng(3)
    k = 6
    gts = [rng.choice([0, 1, 2, 3, 255], size=(16, 20), p=[0.4, 0.3, 0.1, 0.1, 0.1]) for _ in range(9)]
    preds = [np.where(rng.random(g.shape) < 0.7, np.where(g == 255, 0, g), rng.integers(0, k, g.shape)) for g in gts]
    whole = SemanticAccumulator(k)
    for g, p in zip(gts, preds):
        whole.update(g, p)
    merged = SemanticAccumulator(k)
    for lo, hi in ((0, 4), (4, 5), (5, 9)):
        part = SemanticAccumulator(k)
        for g, p in zip(gts[lo:hi], preds[lo:hi]):
            part.update(g, p)
        merged.merge(SemanticAccumulator.from_state_dict(json.loads(json.dumps(part.state_dict()))))
    np.testing.assert_array_equal(merged.confusion, whole.confusion)
    assert merged.result() == whole.result()
    r = whole.result()
    for key, value in _detectron2_formula(gts, preds, k).items():
        assert r[key] == pytest.approx(value, abs=1e-12)


# ------------------------------------------------------------------------------------------------ mask AP
def _box(h0, h1, w0, w1, size=(64, 64)):
    m = np.zeros(size, dtype=bool)
    m[h0:h1, w0:w1] = True
    return m


def _instance_scene():
    """128 x 128: a small (100 px), a medium (1600 px) and a large (11000 px) instance."""
    size = (128, 128)
    gt_masks = np.stack([_box(0, 10, 0, 10, size), _box(10, 50, 80, 120, size), _box(20, 120, 0, 110, size)])
    return gt_masks, [1, 1, 2]


def test_ap_perfect():
    masks, categories = _instance_scene()
    acc = InstanceAccumulator([{"id": 1, "name": "cat"}, {"id": 2, "name": "dog"}])
    acc.update("a", masks, categories, masks, categories, [0.9, 0.8, 0.7])
    r = acc.result()
    assert [r[k] for k in ("AP", "AP50", "AP75", "APs", "APm", "APl")] == pytest.approx([1.0] * 6)
    acc = InstanceAccumulator()
    acc.update("a", masks[:1], categories[:1], masks[:1], categories[:1], [0.9])
    assert acc.result()["APl"] is None  # no large ground truth: COCOeval's -1
    assert r["per_class"] == {1: pytest.approx(1.0), 2: pytest.approx(1.0)}


def test_ap_wrong_class():
    acc = InstanceAccumulator([{"id": 1}, {"id": 2}])
    m = _box(0, 20, 0, 20)[None]
    acc.update(0, m, [1], m, [2], [0.9])
    r = acc.result()
    assert r["per_class"] == {1: 0.0, 2: None}  # class 2 has no ground truth: undefined, not averaged
    assert r["AP"] == 0.0


def test_ap_known_small_cases():
    a, b = _box(0, 10, 0, 10), _box(30, 40, 30, 40)
    # one ground truth; a confident false positive then the true positive: precision 1/2 at every recall
    acc = InstanceAccumulator()
    acc.update(0, a[None], [1], np.stack([b, a]), [1, 1], [0.9, 0.5])
    assert acc.result()["AP"] == pytest.approx(0.5)
    # two ground truths; TP, FP, TP: precision 1 up to recall 0.5 (51 of 101 points), then 2/3
    acc = InstanceAccumulator()
    acc.update(0, np.stack([a, b]), [1, 1], np.stack([a, _box(50, 60, 50, 60), b]), [1, 1, 1], [0.9, 0.8, 0.7])
    assert acc.result()["AP"] == pytest.approx((51 + 50 * 2 / 3) / 101)
    # IoU 0.62 matches at thresholds 0.50, 0.55, 0.60 only: AP = 3 / 10
    partial = np.zeros_like(a)
    partial.reshape(-1)[np.flatnonzero(a.reshape(-1))[:62]] = True
    acc = InstanceAccumulator()
    acc.update(0, a[None], [1], partial[None], [1], [0.9])
    r = acc.result()
    assert (r["AP"], r["AP50"], r["AP75"]) == pytest.approx((0.3, 1.0, 0.0))


def test_ap_crowd_and_no_prediction():
    a, crowd = _box(0, 10, 0, 10), _box(20, 50, 20, 50)
    acc = InstanceAccumulator()
    # a confident prediction over a crowd region is ignored, not a false positive
    acc.update(0, np.stack([a, crowd]), [1, 1], np.stack([crowd, a]), [1, 1], [0.99, 0.5], gt_iscrowd=[0, 1])
    assert acc.result()["AP"] == pytest.approx(1.0)
    empty = InstanceAccumulator()
    empty.update(0, a[None], [1], np.zeros((0, 64, 64), bool), [], [])
    assert empty.result()["AP"] == 0.0
    assert InstanceAccumulator().result()["AP"] is None


def test_ap_rle_inputs_and_sharding():
    rng = np.random.default_rng(4)
    images = []
    for i in range(6):
        masks = np.stack([_box(*sorted(rng.integers(0, 64, 2)), *sorted(rng.integers(0, 64, 2))) for _ in range(4)])
        masks[:, 0, 0] = True  # never empty
        categories = rng.integers(1, 4, 4).tolist()
        noisy = masks ^ (rng.random(masks.shape) < 0.05)
        images.append((f"img{i}", masks, categories, noisy, rng.integers(1, 4, 4).tolist(), rng.random(4).tolist()))
    whole = InstanceAccumulator()
    for image_id, gm, gc, pm, pc, ps in images:
        whole.update(image_id, gm, gc, [encode_rle(m) for m in pm], pc, ps)  # predictions as RLE dicts
    merged = InstanceAccumulator()
    for shard in (images[4:], images[:1], images[1:4]):
        part = InstanceAccumulator()
        for image in shard:
            part.update(*image)
        merged.merge(InstanceAccumulator.from_state_dict(json.loads(json.dumps(part.state_dict()))))
    assert merged.num_images == 6
    r = whole.result()
    assert merged.result() == r
    assert 0.0 < r["AP"] < 1.0
    with pytest.raises(ValueError, match="already added"):
        merged.update("img0", *images[0][1:])


# ------------------------------------------------------------------------------------------------ files, CLI
def _write_panoptic_tree(root, images):
    """COCO panoptic PNG + JSON for ground truth and predictions; `images` as in `_random_image`."""
    gt_anns, pred_anns = [], []
    for folder in ("gt", "pred"):
        (root / folder).mkdir(parents=True, exist_ok=True)
    for i, (gt, gs, pred, ps) in enumerate(images):
        name = f"{i:06d}.png"
        Image.fromarray(id2rgb(gt)).save(root / "gt" / name)
        Image.fromarray(id2rgb(pred)).save(root / "pred" / name)
        gt_anns.append({"image_id": i, "file_name": name, "segments_info": gs})
        pred_anns.append({"image_id": i, "file_name": name, "segments_info": ps})
    (root / "gt.json").write_text(json.dumps({"annotations": gt_anns, "categories": CATEGORIES}))
    (root / "pred.json").write_text(json.dumps({"annotations": pred_anns[::-1]}))  # order does not matter
    return [str(root / p) for p in ("gt.json", "gt", "pred.json", "pred")]


def test_pq_compute_on_disk(tmp_path):
    rng = np.random.default_rng(5)
    images = [_random_image(rng) for _ in range(6)]
    gt_json, gt_dir, pred_json, pred_dir = _write_panoptic_tree(tmp_path, images)
    acc = PanopticAccumulator(CATEGORIES)
    for image in images:
        acc.update(*image)
    expected = acc.result()
    assert pq_compute(gt_json, gt_dir, pred_json, pred_dir) == expected
    assert pq_compute(gt_json, gt_dir, pred_json, pred_dir, workers=2) == expected


def test_pq_compute_missing_prediction(tmp_path):
    gt, segments = _scene()
    gt_json, gt_dir, pred_json, pred_dir = _write_panoptic_tree(tmp_path, [(gt, segments, gt, segments)] * 2)
    pred = json.loads((tmp_path / "pred.json").read_text())
    pred["annotations"] = [a for a in pred["annotations"] if a["image_id"] != 1]
    (tmp_path / "pred.json").write_text(json.dumps(pred))
    with pytest.raises(ValueError, match=r"no prediction for the image with id 1 \(000001.png\)"):
        pq_compute(gt_json, gt_dir, pred_json, pred_dir)
    # ids of their own (fcclip predict's: the file's stem) are matched by the PNG's name
    pred["annotations"] = [{**a, "image_id": a["file_name"][:-4]} for a in json.loads(
        (tmp_path / "pred.json").read_text())["annotations"]] + [{"image_id": "000001", "file_name": "000001.png",
                                                                 "segments_info": segments}]
    (tmp_path / "pred.json").write_text(json.dumps(pred))
    assert pq_compute(gt_json, gt_dir, pred_json, pred_dir)["All"]["pq"] == pytest.approx(1.0)


def test_cli_panoptic(tmp_path, capsys):
    gt, segments = _scene()
    pred = gt.copy()
    pred[pred == 9] = 0
    gt_json, gt_dir, pred_json, pred_dir = _write_panoptic_tree(
        tmp_path, [(gt, segments, pred, [s for s in segments if s["id"] != 9])]
    )
    out = tmp_path / "out" / "pq.json"
    argv = ["panoptic", "--gt-json", gt_json, "--gt-dir", gt_dir, "--pred-json", pred_json, "--pred-dir", pred_dir]
    assert main(argv + ["--out", str(out)]) == 0
    text = capsys.readouterr().out
    assert "All" in text and "Things" in text and "66.7" in text and " 50.0 " in text
    result = json.loads(out.read_text())
    assert result["Things"]["pq"] == 0.5 and result["per_class"]["2"]["fn"] == 1
    assert main(argv[:-2] + ["--pred-dir", str(tmp_path / "nowhere")]) == 2
    assert "no folder" in capsys.readouterr().err


def _write_labels(folder, maps):
    folder.mkdir(parents=True, exist_ok=True)
    for i, m in enumerate(maps):
        Image.fromarray(np.asarray(m, dtype=np.uint8)).save(folder / f"{i}.png")


def test_semantic_compute_and_cli(tmp_path, capsys):
    gt = np.array([[0, 0, 1, 1], [2, 2, 2, 255]])
    pred = np.array([[0, 1, 1, 1], [2, 0, 2, 2]])
    _write_labels(tmp_path / "gt", [gt, gt])
    _write_labels(tmp_path / "pred", [pred, pred])
    r = semantic_compute(tmp_path / "gt", tmp_path / "pred", num_classes=3)
    assert r["mIoU"] == pytest.approx(5 / 9) and r["pACC"] == pytest.approx(5 / 7)

    # as a subcommand of the `fcclip` command: add_arguments fills its parser, main_args runs it
    parser = argparse.ArgumentParser(prog="fcclip")
    add_arguments(parser.add_subparsers(dest="command", required=True).add_parser("metrics"))
    out = tmp_path / "miou.json"
    args = parser.parse_args(
        ["metrics", "semantic", "--gt-dir", str(tmp_path / "gt"), "--pred-dir", str(tmp_path / "pred"),
         "--num-classes", "3", "--out", str(out)]
    )
    assert main_args(args) == 0
    assert "55.6" in capsys.readouterr().out
    assert json.loads(out.read_text())["mIoU"] == pytest.approx(5 / 9)

    (tmp_path / "pred" / "1.png").unlink()
    assert main(["semantic", "--gt-dir", str(tmp_path / "gt"), "--pred-dir", str(tmp_path / "pred"),
                 "--num-classes", "3"]) == 2
    assert "1.png" in capsys.readouterr().err
