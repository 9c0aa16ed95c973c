"""Mask encodings: COCO RLE, boxes, panoptic PNG colours."""
from __future__ import annotations

import json

import numpy as np
import pycocotools.mask as mask_utils
import pytest
import torch

from fcclip.masks import decode_rle, encode_rle, id2rgb, mask_to_bbox, rgb2id


def _random_masks():
    rng = np.random.default_rng(0)
    yield np.zeros((5, 7), dtype=bool)
    yield np.ones((5, 7), dtype=bool)
    yield np.zeros((1, 1), dtype=bool)
    yield np.ones((1, 1), dtype=bool)
    yield rng.random((1, 13)) > 0.5
    yield rng.random((13, 1)) > 0.5
    yield rng.random((48, 64)) > 0.7
    disc = np.hypot(*np.mgrid[-20:20, -30:30]) < 12
    yield disc


@pytest.mark.filterwarnings("ignore:__array__ implementation doesn't accept a copy keyword")
@pytest.mark.parametrize("mask", list(_random_masks()), ids=lambda m: f"{m.shape}-{int(m.sum())}")
def test_rle_round_trip(mask):
    rle = encode_rle(mask)
    assert rle["size"] == list(mask.shape)
    assert isinstance(rle["counts"], str)
    json.dumps(rle)  # serialisable as is
    decoded = decode_rle(rle)
    assert decoded.dtype == bool and decoded.shape == mask.shape
    np.testing.assert_array_equal(decoded, mask)
    # pycocotools reads it back (counts as bytes), and agrees on the area
    coco = {"size": rle["size"], "counts": rle["counts"].encode("ascii")}
    assert int(mask_utils.area(coco)) == int(mask.sum())
    np.testing.assert_array_equal(mask_utils.decode(coco).astype(bool), mask)


def test_rle_is_fortran_order_and_accepts_tensors():
    mask = np.zeros((2, 3), dtype=bool)
    mask[0, 1] = True  # column-major position 2
    rle = encode_rle(torch.from_numpy(mask))
    expected = mask_utils.encode(np.asfortranarray(mask.astype(np.uint8)))
    assert rle["counts"] == expected["counts"].decode("ascii")
    # uncompressed counts: 2 zeros, 1 one, 3 zeros (column-major)
    np.testing.assert_array_equal(decode_rle({"size": [2, 3], "counts": [2, 1, 3]}), mask)
    # bytes counts, and a non-contiguous / non-bool input
    np.testing.assert_array_equal(decode_rle({"size": [2, 3], "counts": rle["counts"].encode()}), mask)
    np.testing.assert_array_equal(decode_rle(encode_rle(mask.astype(np.uint8).T.T * 255)), mask)


def test_encode_rejects_non_2d():
    with pytest.raises(ValueError):
        encode_rle(np.zeros((2, 2, 2), dtype=bool))


def test_mask_to_bbox():
    mask = np.zeros((10, 20), dtype=bool)
    assert mask_to_bbox(mask) == [0.0, 0.0, 0.0, 0.0]
    mask[3, 5] = True
    assert mask_to_bbox(mask) == [5.0, 3.0, 1.0, 1.0]
    mask[7, 12] = True
    assert mask_to_bbox(mask) == [5.0, 3.0, 8.0, 5.0]
    assert mask_to_bbox(np.ones((10, 20), dtype=bool)) == [0.0, 0.0, 20.0, 10.0]
    assert mask_to_bbox(np.ones((1, 1), dtype=bool)) == [0.0, 0.0, 1.0, 1.0]
    assert mask_to_bbox(np.zeros((1, 1), dtype=bool)) == [0.0, 0.0, 0.0, 0.0]
    assert mask_to_bbox(torch.from_numpy(mask)) == [5.0, 3.0, 8.0, 5.0]
    # agrees with pycocotools' own box of the RLE
    for m in _random_masks():
        if m.any():
            coco = mask_utils.encode(np.asfortranarray(m.astype(np.uint8)))
            assert mask_to_bbox(m) == [float(v) for v in mask_utils.toBbox(coco)]


def test_id2rgb_rgb2id_round_trip():
    ids = np.array([[0, 1, 255, 256], [65535, 65536, 2**24 - 2, 2**24 - 1]], dtype=np.int64)
    rgb = id2rgb(ids)
    assert rgb.dtype == np.uint8 and rgb.shape == (2, 4, 3)
    assert rgb[0, 1].tolist() == [1, 0, 0]
    assert rgb[0, 3].tolist() == [0, 1, 0]
    assert rgb[1, 1].tolist() == [0, 0, 1]
    assert rgb[1, 3].tolist() == [255, 255, 255]
    np.testing.assert_array_equal(rgb2id(rgb), ids)
    rng = np.random.default_rng(0)
    many = rng.integers(0, 2**24, size=(64, 64))
    np.testing.assert_array_equal(rgb2id(id2rgb(many)), many)
    np.testing.assert_array_equal(rgb2id(id2rgb(np.zeros((1, 1), dtype=np.int32))), [[0]])
    assert id2rgb(np.zeros((0, 3), dtype=np.int32)).shape == (0, 3, 3)


def test_id2rgb_rejects_out_of_range():
    with pytest.raises(ValueError):
        id2rgb(np.array([[2**24]]))
    with pytest.raises(ValueError):
        id2rgb(np.array([[-1]]))


@pytest.mark.parametrize("offset", [0, 5000])  # small ids (index by id) and large ones (index by rank)
def test_segment_bboxes_equal_one_mask_at_a_time(offset):
    from fcclip.masks import segment_bboxes

    rng = np.random.default_rng(0)
    segment_map = rng.integers(0, 4, size=(37, 53))
    segment_map[segment_map > 0] += offset
    segment_map[3, 7] = offset + 9  # a one-pixel segment
    ids = [offset + 1, offset + 2, offset + 3, offset + 9, offset + 42]  # 42: absent
    boxes = segment_bboxes(segment_map, ids)
    assert boxes == [mask_to_bbox(segment_map == i) for i in ids]
    assert boxes[3] == [7.0, 3.0, 1.0, 1.0] and boxes[4] == [0.0, 0.0, 0.0, 0.0]
    assert segment_bboxes(segment_map, []) == []
    with pytest.raises(ValueError, match="segment map"):
        segment_bboxes(segment_map[0], [1])
