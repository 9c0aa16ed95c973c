"""Post-processing: the reference's planted-structure fixture, and hand-built cases with known answers."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pycocotools.mask as mask_utils
import pytest
import torch

from fcclip.postprocess import (
    InstanceOutput,
    PanopticOutput,
    PixelVotes,
    finish_panoptic,
    instance_inference,
    instance_mask_scores,
    panoptic_inference,
    rank_instances,
    select_instance_candidates,
    select_panoptic_queries,
    semantic_inference,
    semantic_scores,
)

FIXTURE = Path(__file__).parent / "fixtures" / "parity"
HIGH, LOW = 12.0, -12.0  # mask logits: sigmoid ~ 1 and ~ 0


@pytest.fixture(scope="module")
def reference():
    arrays = np.load(FIXTURE / "postprocess.npz")
    meta = json.loads((FIXTURE / "postprocess.json").read_text())
    return {k: arrays[k] for k in arrays.files}, meta


def _case_ids(meta_path=FIXTURE / "postprocess.json"):
    return [c["name"] for c in json.loads(meta_path.read_text())["cases"]]


def _inputs(arrays, meta, index):
    case = meta["cases"][index]
    class_logits = torch.from_numpy(arrays[f"{case['inputs']}_mask_cls"])
    mask_logits = torch.from_numpy(arrays[f"{case['inputs']}_mask_pred"])
    thing = [bool(c["isthing"]) for c in meta["vocabulary"]["classes"]]
    return case, class_logits, mask_logits, thing


def _logits(probs_rows: list[list[float]]) -> torch.Tensor:
    """Class logits whose softmax is exactly the given rows (up to float rounding)."""
    return torch.tensor(probs_rows, dtype=torch.float32).log()


# --------------------------------------------------------------------------------------------- reference fixture


@pytest.mark.parametrize("index", range(4), ids=_case_ids())
def test_fixture_semantic(reference, index):
    arrays, meta = reference
    _, class_logits, mask_logits, _ = _inputs(arrays, meta, index)
    sem_seg = semantic_inference(class_logits, mask_logits)
    expected = arrays[f"case{index}_sem_seg"]
    assert sem_seg.shape == expected.shape and sem_seg.dtype == torch.float32
    np.testing.assert_allclose(sem_seg.numpy(), expected, rtol=0, atol=1e-5)
    np.testing.assert_array_equal(sem_seg.argmax(0).numpy(), arrays[f"case{index}_sem_seg_argmax"])


@pytest.mark.parametrize("index", range(4), ids=_case_ids())
def test_fixture_panoptic(reference, index):
    arrays, meta = reference
    case, class_logits, mask_logits, thing = _inputs(arrays, meta, index)
    out = panoptic_inference(
        class_logits,
        mask_logits,
        thing,
        object_mask_threshold=case["object_mask_threshold"],
        overlap_threshold=meta["thresholds"]["overlap_threshold"],
    )
    expected_map = arrays[f"case{index}_panoptic_seg"]
    assert out.segment_map.dtype == torch.int32
    np.testing.assert_array_equal(out.segment_map.numpy(), expected_map)
    assert [(s["id"], s["class_index"], s["is_thing"]) for s in out.segments] == [
        (s["id"], s["category_id"], s["isthing"]) for s in case["segments_info"]
    ]
    probs = class_logits.softmax(-1)
    for segment in out.segments:
        assert segment["area"] == int((expected_map == segment["id"]).sum())
        # the score is the top probability of a query of that class
        top, label = probs.max(-1)
        candidates = top[label == segment["class_index"]]
        assert torch.isclose(candidates, torch.tensor(segment["score"])).any()


@pytest.mark.parametrize("index", range(4), ids=_case_ids())
def test_fixture_instances(reference, index):
    arrays, meta = reference
    case, class_logits, mask_logits, thing = _inputs(arrays, meta, index)
    out = instance_inference(class_logits, mask_logits, thing, topk=meta["thresholds"]["test_topk_per_image"])
    expected = case["instances"]
    assert len(out) == len(expected) == len(arrays[f"case{index}_instance_scores"])
    np.testing.assert_array_equal(out.classes.numpy(), arrays[f"case{index}_instance_classes"])
    assert out.classes.tolist() == [i["category_id"] for i in expected]  # the reference's file names a class index so
    np.testing.assert_allclose(out.scores.numpy(), arrays[f"case{index}_instance_scores"], rtol=0, atol=1e-5)
    for mask, query, instance in zip(out.masks.numpy(), out.query_index.tolist(), expected):
        rle = mask_utils.encode(np.asfortranarray(mask.astype(np.uint8)))
        assert rle["counts"].decode("ascii") == instance["mask_rle"]["counts"]
        assert list(rle["size"]) == instance["mask_rle"]["size"]
        assert int(mask.sum()) == instance["area"]
        np.testing.assert_array_equal(mask, mask_logits[query].numpy() > 0)


@pytest.mark.parametrize("chunk", [1, 2, 5])
@pytest.mark.parametrize("index", range(4), ids=_case_ids())
def test_fixture_panoptic_fed_in_chunks(reference, index, chunk):
    """Only the kept queries' masks, fed a few at a time, give the reference's map and segments."""
    arrays, meta = reference
    case, class_logits, mask_logits, thing = _inputs(arrays, meta, index)
    queries = select_panoptic_queries(class_logits, case["object_mask_threshold"])
    votes = PixelVotes(queries.scores, mask_logits.shape[-2:])
    for start in range(0, len(queries), chunk):
        votes.add(mask_logits[queries.index[start : start + chunk]].sigmoid())
    out = finish_panoptic(queries, votes, thing, meta["thresholds"]["overlap_threshold"])
    np.testing.assert_array_equal(out.segment_map.numpy(), arrays[f"case{index}_panoptic_seg"])
    assert [(s["id"], s["class_index"], s["is_thing"]) for s in out.segments] == [
        (s["id"], s["category_id"], s["isthing"]) for s in case["segments_info"]
    ]


def test_pixel_votes_refuse_too_many_or_too_few_masks():
    votes = PixelVotes(torch.tensor([0.9, 0.8]), (2, 2))
    votes.add(torch.rand(1, 2, 2))
    with pytest.raises(ValueError, match="only 1 were fed"):
        votes.areas()
    with pytest.raises(ValueError, match="only 2 were kept"):
        votes.add(torch.rand(2, 2, 2))


@pytest.mark.parametrize("index", range(4), ids=_case_ids())
def test_fixture_instances_from_distinct_queries(reference, index):
    """Candidates sharing a query reuse its mask: the parts give instance_inference's result exactly."""
    arrays, meta = reference
    case, class_logits, mask_logits, thing = _inputs(arrays, meta, index)
    topk = meta["thresholds"]["test_topk_per_image"]
    candidates = select_instance_candidates(class_logits, thing, topk=topk)
    queries, position = candidates.queries()
    assert queries.tolist() == sorted(set(candidates.query_index.tolist()))
    masks, mask_score = instance_mask_scores(mask_logits[queries])
    out = rank_instances(candidates, masks[position], mask_score[position])
    whole = instance_inference(class_logits, mask_logits, thing, topk=topk)
    torch.testing.assert_close(out.scores, whole.scores, atol=0, rtol=0)
    assert out.classes.tolist() == whole.classes.tolist() == arrays[f"case{index}_instance_classes"].tolist()
    assert torch.equal(out.masks, whole.masks)


def test_semantic_scores_add_up_over_chunks_of_queries(reference):
    arrays, meta = reference
    _, class_logits, mask_logits, _ = _inputs(arrays, meta, 0)
    probs = class_logits.softmax(-1)[:, :-1]
    parts = [semantic_scores(probs[i : i + 3], mask_logits[i : i + 3].sigmoid()) for i in range(0, len(probs), 3)]
    torch.testing.assert_close(sum(parts), semantic_inference(class_logits, mask_logits), atol=1e-5, rtol=0)


# --------------------------------------------------------------------------------------------- hand-built cases


def test_semantic_by_hand():
    class_logits = _logits([[0.5, 0.25, 0.25], [0.1, 0.6, 0.3]])
    mask_logits = torch.tensor([[[HIGH, LOW]], [[0.0, HIGH]]])  # (2, 1, 2)
    sem = semantic_inference(class_logits, mask_logits)
    assert sem.shape == (2, 1, 2)
    # pixel 0: q0 sigmoid 1, q1 sigmoid 0.5; pixel 1: q0 0, q1 1
    expected = torch.tensor([[[0.5 + 0.1 * 0.5, 0.1]], [[0.25 + 0.6 * 0.5, 0.6]]])
    torch.testing.assert_close(sem, expected, atol=1e-4, rtol=0)


def test_panoptic_two_queries_by_hand():
    # K = 2: class 0 thing, class 1 stuff. 2 x 4 image.
    # q0 (thing, p = 0.9) covers columns 0..1, q1 (stuff, p = 0.6) covers columns 1..3.
    # column 1 is claimed by both: 0.9 * 1 > 0.6 * 1, so q0 wins it.
    class_logits = _logits([[0.9, 0.05, 0.05], [0.2, 0.6, 0.2]])
    q0 = torch.tensor([[HIGH, HIGH, LOW, LOW]] * 2)
    q1 = torch.tensor([[LOW, HIGH, HIGH, HIGH]] * 2)
    # q1 wins 4 of its 6 pixels: 0.67 < 0.8 would drop it, so use a lower threshold to keep it
    out = panoptic_inference(class_logits, torch.stack([q0, q1]), [True, False], overlap_threshold=0.5)
    expected = torch.tensor([[1, 1, 2, 2]] * 2, dtype=torch.int32)
    torch.testing.assert_close(out.segment_map, expected)
    assert [(s["id"], s["class_index"], s["is_thing"], s["area"]) for s in out.segments] == [
        (1, 0, True, 4),
        (2, 1, False, 4),
    ]
    assert out.segments[0]["score"] == pytest.approx(0.9, abs=1e-6)
    assert out.segments[1]["score"] == pytest.approx(0.6, abs=1e-6)

    # at the default 0.8 threshold q1 (4 / 6) is dropped; its pixels stay 0
    out = panoptic_inference(class_logits, torch.stack([q0, q1]), [True, False])
    torch.testing.assert_close(out.segment_map, torch.tensor([[1, 1, 0, 0]] * 2, dtype=torch.int32))
    assert [s["id"] for s in out.segments] == [1]


@pytest.mark.parametrize(("covered", "kept"), [(2, True), (3, False)])
def test_panoptic_overlap_threshold_boundary(covered, kept):
    # q0 (p 0.5) owns 10 pixels; q1 (p 0.9) claims `covered` of them. q0 keeps 8/10 = 0.8 (kept, >=) or 7/10 (dropped).
    q0 = torch.full((1, 10), HIGH)
    q1 = torch.full((1, 10), LOW)
    q1[0, :covered] = HIGH
    class_logits = _logits([[0.5, 0.25, 0.25], [0.05, 0.9, 0.05]])
    out = panoptic_inference(class_logits, torch.stack([q0, q1]), [True, True], overlap_threshold=0.8)
    categories = [s["class_index"] for s in out.segments]
    assert (0 in categories) is kept
    assert 1 in categories
    if kept:
        assert out.segments[0] == {"id": 1, "class_index": 0, "is_thing": True, "score": pytest.approx(0.5), "area": 8}


def test_panoptic_stuff_merge():
    # two queries of the same stuff class on disjoint halves -> one segment; a thing in between gets its own id
    class_logits = _logits([[0.05, 0.7, 0.25], [0.8, 0.1, 0.1], [0.1, 0.85, 0.05]])
    left = torch.tensor([[HIGH, HIGH, LOW, LOW, LOW, LOW]])
    middle = torch.tensor([[LOW, LOW, HIGH, HIGH, LOW, LOW]])
    right = torch.tensor([[LOW, LOW, LOW, LOW, HIGH, HIGH]])
    out = panoptic_inference(class_logits, torch.stack([left, middle, right]), [True, False])
    torch.testing.assert_close(out.segment_map, torch.tensor([[1, 1, 2, 2, 1, 1]], dtype=torch.int32))
    assert len(out.segments) == 2
    stuff, thing = out.segments
    assert (stuff["id"], stuff["class_index"], stuff["is_thing"], stuff["area"]) == (1, 1, False, 4)
    assert stuff["score"] == pytest.approx(0.85)  # the max over the merged queries
    assert (thing["id"], thing["class_index"], thing["is_thing"], thing["area"]) == (2, 0, True, 2)


def test_panoptic_two_things_same_class_stay_apart():
    class_logits = _logits([[0.9, 0.1], [0.8, 0.2]])  # K = 1, a single thing class
    a = torch.tensor([[HIGH, HIGH, LOW, LOW]])
    b = torch.tensor([[LOW, LOW, HIGH, HIGH]])
    out = panoptic_inference(class_logits, torch.stack([a, b]), [True])
    torch.testing.assert_close(out.segment_map, torch.tensor([[1, 1, 2, 2]], dtype=torch.int32))
    assert [s["class_index"] for s in out.segments] == [0, 0]


def test_panoptic_mask_area_not_intersected_with_confident_pixels():
    # Reference quirk: a query also wins pixels where its own sigmoid < 0.5 (everyone is low there); those count in
    # mask_area for the overlap test but are not painted. q0 (p 0.5) is confident on pixels 0..9, q1 (p 0.9) takes
    # 0..3, and q0 wins the two low pixels 10..11: mask_area (6 + 2) / original_area 10 = 0.8 passes, whereas the
    # confident pixels alone (6 / 10) would fail.
    class_logits = _logits([[0.5, 0.25, 0.25], [0.05, 0.9, 0.05]])
    q0 = torch.tensor([[HIGH] * 10 + [-3.0, -3.0]])
    q1 = torch.tensor([[HIGH] * 4 + [LOW] * 6 + [-6.0, -6.0]])
    out = panoptic_inference(class_logits, torch.stack([q0, q1]), [True, True])
    expected = torch.tensor([[2] * 4 + [1] * 6 + [0, 0]], dtype=torch.int32)
    torch.testing.assert_close(out.segment_map, expected)
    assert [(s["id"], s["class_index"], s["area"]) for s in out.segments] == [(1, 0, 6), (2, 1, 4)]


def test_panoptic_skips_empty_and_void_and_low_score():
    class_logits = _logits(
        [
            [0.1, 0.1, 0.8],  # void
            [0.7, 0.2, 0.1],  # empty mask
            [0.4, 0.35, 0.25],  # top probability 0.4
        ]
    )
    masks = torch.stack(
        [torch.full((2, 2), HIGH), torch.full((2, 2), LOW), torch.tensor([[HIGH, HIGH], [HIGH, HIGH]])]
    )
    out = panoptic_inference(class_logits, masks, [True, False])
    assert [s["class_index"] for s in out.segments] == [0]
    assert int(out.segment_map.sum()) == 4
    # strictly greater than object_mask_threshold: 0.4 is dropped at 0.4 and kept just below it
    assert panoptic_inference(class_logits, masks, [True, False], object_mask_threshold=0.45).segments == []
    assert len(panoptic_inference(class_logits, masks, [True, False], object_mask_threshold=0.39).segments) == 1


def test_panoptic_all_void():
    class_logits = _logits([[0.1, 0.1, 0.8], [0.2, 0.2, 0.6]])
    out = panoptic_inference(class_logits, torch.full((2, 3, 4), HIGH), torch.tensor([True, False]))
    assert isinstance(out, PanopticOutput)
    assert out.segments == []
    assert out.segment_map.shape == (3, 4) and out.segment_map.dtype == torch.int32
    assert not out.segment_map.any()


def test_instance_by_hand():
    # K = 2 (thing, stuff), Q = 2, 1 x 4 image
    class_logits = _logits([[0.6, 0.3, 0.1], [0.2, 0.7, 0.1]])
    q0 = torch.tensor([[2.0, 0.0, -1.0, -5.0]])  # only pixel 0 is > 0
    q1 = torch.tensor([[1.0, 1.0, 1.0, 1.0]])
    mask_logits = torch.stack([q0, q1])
    out = instance_inference(class_logits, mask_logits, [True, False])
    assert isinstance(out, InstanceOutput)
    s2, s1 = torch.sigmoid(torch.tensor(2.0)).item(), torch.sigmoid(torch.tensor(1.0)).item()
    expected = sorted([(0.6 * s2 / (1 + 1e-6), 0, 0), (0.2 * s1 * 4 / (4 + 1e-6), 0, 1)], reverse=True)
    torch.testing.assert_close(out.scores, torch.tensor([e[0] for e in expected]), atol=1e-6, rtol=0)
    assert out.classes.tolist() == [e[1] for e in expected]
    assert out.query_index.tolist() == [e[2] for e in expected]
    assert out.classes.dtype == torch.int64 and out.query_index.dtype == torch.int64
    assert out.masks.dtype == torch.bool
    torch.testing.assert_close(out.masks[0], q0 > 0)

    everything = instance_inference(class_logits, mask_logits, [True, False], things_only=False)
    assert len(everything) == 4
    assert sorted(zip(everything.query_index.tolist(), everything.classes.tolist())) == [(0, 0), (0, 1), (1, 0), (1, 1)]
    assert torch.all(everything.scores[:-1] >= everything.scores[1:])

    top1 = instance_inference(class_logits, mask_logits, [True, False], topk=1, things_only=False)
    assert (top1.query_index.item(), top1.classes.item()) == (1, 1)  # the largest probability, 0.7


# --------------------------------------------------------------------------------------------- edge cases


@pytest.mark.parametrize("shape", [(0, 5, 7), (3, 1, 1), (3, 1, 9), (3, 9, 1)])
@pytest.mark.parametrize("num_classes", [1, 4])
def test_edge_shapes(shape, num_classes):
    generator = torch.Generator().manual_seed(0)
    q, h, w = shape
    class_logits = torch.randn(q, num_classes + 1, generator=generator) * 3
    mask_logits = torch.randn(q, h, w, generator=generator) * 5
    thing = [i % 2 == 0 for i in range(num_classes)]

    assert semantic_inference(class_logits, mask_logits).shape == (num_classes, h, w)
    pan = panoptic_inference(class_logits, mask_logits, thing)
    assert pan.segment_map.shape == (h, w)
    assert sum(s["area"] for s in pan.segments) == int((pan.segment_map > 0).sum())
    inst = instance_inference(class_logits, mask_logits, thing, topk=1000)
    assert inst.masks.shape[1:] == (h, w)
    assert len(inst) == inst.classes.numel() == inst.query_index.numel() == inst.masks.shape[0]
    assert len(inst) <= q * num_classes
    assert all(thing[c] for c in inst.classes.tolist())


def test_topk_larger_and_zero():
    class_logits = torch.randn(3, 3)
    mask_logits = torch.randn(3, 4, 4)
    assert len(instance_inference(class_logits, mask_logits, [True, True], topk=100)) == 6
    assert len(instance_inference(class_logits, mask_logits, [True, True], topk=0)) == 0


def test_thing_mask_length_checked():
    with pytest.raises(ValueError, match="thing_mask"):
        panoptic_inference(torch.randn(2, 4), torch.randn(2, 3, 3), [True, False])
    with pytest.raises(ValueError, match="thing_mask"):
        instance_inference(torch.randn(2, 4), torch.randn(2, 3, 3), [True])
    with pytest.raises(ValueError, match="mask_logits"):
        semantic_inference(torch.randn(2, 4), torch.randn(3, 3, 3))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_inputs_computed_in_float32(reference, dtype):
    arrays, meta = reference
    case, class_logits, mask_logits, thing = _inputs(arrays, meta, 0)
    class_logits_h, mask_logits_h = class_logits.to(dtype), mask_logits.to(dtype)
    expected_sem = semantic_inference(class_logits_h.float(), mask_logits_h.float())
    sem = semantic_inference(class_logits_h, mask_logits_h)
    assert sem.dtype == torch.float32
    torch.testing.assert_close(sem, expected_sem)
    pan = panoptic_inference(class_logits_h, mask_logits_h, thing)
    pan_ref = panoptic_inference(class_logits_h.float(), mask_logits_h.float(), thing)
    torch.testing.assert_close(pan.segment_map, pan_ref.segment_map)
    inst = instance_inference(class_logits_h, mask_logits_h, thing)
    assert inst.scores.dtype == torch.float32


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("index", range(4), ids=_case_ids())
def test_fixture_on_cuda(reference, index):
    arrays, meta = reference
    case, class_logits, mask_logits, thing = _inputs(arrays, meta, index)
    cuda_cls, cuda_pred = class_logits.cuda(), mask_logits.cuda()
    sem_seg = semantic_inference(cuda_cls, cuda_pred).cpu()
    torch.testing.assert_close(sem_seg, torch.from_numpy(arrays[f"case{index}_sem_seg"]), atol=1e-5, rtol=0)
    pan = panoptic_inference(
        cuda_cls, cuda_pred, torch.tensor(thing).cuda(), object_mask_threshold=case["object_mask_threshold"]
    )
    assert pan.segment_map.is_cuda
    np.testing.assert_array_equal(pan.segment_map.cpu().numpy(), arrays[f"case{index}_panoptic_seg"])
    assert [(s["id"], s["class_index"], s["is_thing"]) for s in pan.segments] == [
        (s["id"], s["category_id"], s["isthing"]) for s in case["segments_info"]
    ]
    inst = instance_inference(cuda_cls, cuda_pred, thing)
    assert inst.scores.is_cuda and inst.masks.is_cuda
    np.testing.assert_allclose(inst.scores.cpu().numpy(), arrays[f"case{index}_instance_scores"], rtol=0, atol=1e-5)
    # exact ties (empty masks, score 0) may come in another order than torch's CPU topk gives; the rest must match
    positive = inst.scores.cpu().numpy() > 0
    np.testing.assert_array_equal(
        inst.classes.cpu().numpy()[positive], arrays[f"case{index}_instance_classes"][positive]
    )
