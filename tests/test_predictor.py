"""Predictor on real-world-odd inputs, result structure, and batching."""
import io
import warnings

import numpy as np
import pytest
from PIL import Image

from fcclip import Predictor
from fcclip.datasets.synthetic import synthetic_image
from fcclip.images import ImageDecodeError
from fcclip.masks import decode_rle, encode_rle
from fcclip.predictor import resized_shape

VOCAB = "cat; dog, puppy; grass [stuff]; sky [stuff]"


def _check(pred, h, w, predictor):
    assert (pred.height, pred.width) == (h, w)
    pan = pred.panoptic
    assert pan.segment_map.shape == (h, w) and pan.segment_map.dtype == np.int32
    ids = set(np.unique(pan.segment_map)) - {0}
    assert ids == {s["id"] for s in pan.segments if s["area"] > 0}
    for s in pan.segments:
        mask = pan.segment_map == s["id"]
        assert s["area"] == mask.sum()
        assert s["label"] == predictor.vocabulary.labels[s["class_index"]]
        assert s["category_id"] == predictor.vocabulary.ids[s["class_index"]]
        assert s["is_thing"] == predictor.vocabulary.thing_mask[s["class_index"]]
        assert 0.0 <= s["score"] <= 1.0
        if s["area"]:
            ys, xs = np.nonzero(mask)
            assert s["bbox"] == [xs.min(), ys.min(), xs.max() - xs.min() + 1, ys.max() - ys.min() + 1]
    assert pred.semantic.class_map.shape == (h, w)
    assert pred.semantic.class_map.max() < len(predictor.vocabulary)
    inst = pred.instances
    assert inst.masks.shape[1:] == (h, w)
    assert np.all(np.diff(inst.scores) <= 0)
    assert all(predictor.vocabulary.thing_mask[c] for c in inst.classes)


def test_resize_rule():
    assert resized_shape(480, 640, 800, 1333) == (800, 1067)
    assert resized_shape(100, 1000, 800, 1333) == (133, 1333)
    assert resized_shape(190, 250, None, 1333) == (190, 250)


def test_synthetic_image(tiny_predictor):
    img = synthetic_image(0, 120, 160)
    pred = tiny_predictor(img)
    _check(pred, 120, 160, tiny_predictor)
    assert len(pred.panoptic.segments) >= 1  # the deterministic random weights give non-degenerate masks


@pytest.mark.parametrize(
    "make",
    [
        lambda: Image.fromarray(synthetic_image(1, 50, 70)).convert("L"),
        lambda: Image.fromarray(synthetic_image(2, 50, 70)).convert("RGBA"),
        lambda: Image.fromarray(synthetic_image(3, 50, 70)).convert("P"),
        lambda: Image.fromarray(synthetic_image(4, 50, 70)).convert("CMYK"),
        lambda: Image.new("RGB", (1, 1), (200, 10, 10)),
        lambda: Image.fromarray(synthetic_image(5, 8, 700)),  # very wide
        lambda: Image.fromarray(synthetic_image(6, 700, 9)),  # very tall
    ],
    ids=["grayscale", "rgba", "palette", "cmyk", "1x1", "wide", "tall"],
)
def test_odd_images(tiny_predictor, make):
    img = make()
    pred = tiny_predictor(img)
    _check(pred, img.height, img.width, tiny_predictor)


def test_inputs_of_every_kind_agree(tiny_predictor, tmp_path):
    arr = synthetic_image(7, 64, 80)
    path = tmp_path / "x.png"
    Image.fromarray(arr).save(path)
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="PNG")
    results = [tiny_predictor(x).panoptic.segment_map for x in (arr, Image.fromarray(arr), str(path), path, buf.getvalue())]
    for r in results[1:]:
        np.testing.assert_array_equal(r, results[0])


def test_exif_orientation_gives_the_rotated_size(tiny_predictor, tmp_path):
    img = Image.fromarray(synthetic_image(8, 40, 90))
    exif = img.getexif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise on display
    path = tmp_path / "rotated.jpg"
    img.save(path, exif=exif)
    pred = tiny_predictor(str(path))
    assert (pred.height, pred.width) == (90, 40)


def test_bad_input_raises_a_clear_error(tiny_predictor, tmp_path):
    path = tmp_path / "broken.jpg"
    buf = io.BytesIO()
    Image.fromarray(synthetic_image(9, 64, 64)).save(buf, format="JPEG")
    path.write_bytes(buf.getvalue()[:200])
    with pytest.raises(ImageDecodeError):
        tiny_predictor(str(path))
    with pytest.raises(ImageDecodeError):
        tiny_predictor(b"")


def test_batch_equals_one_by_one(tiny_predictor):
    """Images of several sizes in one batch (zero padding to the largest would change the smaller's results): each
    gets the results it gets alone; infer() refuses images of different padded sizes."""
    imgs = [synthetic_image(s, h, w) for s, (h, w) in zip((10, 11, 12, 13), [(64, 96), (64, 96), (120, 70), (64, 80)])]
    batch = tiny_predictor.predict_batch(imgs)
    for img, b in zip(imgs, batch):
        one = tiny_predictor(img)
        assert (one.panoptic.segment_map == b.panoptic.segment_map).mean() > 0.998  # batched kernels round apart
        assert [s["label"] for s in one.panoptic.segments] == [s["label"] for s in b.panoptic.segments]
        np.testing.assert_allclose(one.instances.scores, b.instances.scores, atol=1e-5)
    with pytest.raises(ValueError, match="one padded size"):
        tiny_predictor.infer([imgs[0], imgs[2]])


@pytest.mark.parametrize("chunk_values", [1, 3 * 96 * 128])
def test_postprocess_in_chunks_of_queries_agrees(tiny_predictor, monkeypatch, chunk_values):
    """Upsampling a few queries at a time (bounded memory) gives the results of one pass over all of them."""
    import fcclip.predictor as predictor_mod

    img = synthetic_image(12, 96, 128)
    whole = tiny_predictor(img)
    monkeypatch.setattr(predictor_mod, "CHUNK_VALUES", chunk_values)
    chunked = tiny_predictor(img)
    np.testing.assert_array_equal(whole.panoptic.segment_map, chunked.panoptic.segment_map)
    assert whole.panoptic.segments == chunked.panoptic.segments
    np.testing.assert_array_equal(whole.semantic.class_map, chunked.semantic.class_map)
    np.testing.assert_array_equal(whole.instances.scores, chunked.instances.scores)
    np.testing.assert_array_equal(whole.instances.classes, chunked.instances.classes)
    np.testing.assert_array_equal(whole.instances.masks, chunked.instances.masks)


@pytest.mark.parametrize("tasks", [("panoptic",), ("instance",), ("semantic",), ("panoptic", "instance")])
def test_each_task_alone_gives_what_all_tasks_give(tiny_model, tasks):
    """A task alone upsamples only the queries it reads (panoptic: the kept ones): same results."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        every = Predictor(tiny_model, VOCAB, short_edge=None)
        some = Predictor(tiny_model, VOCAB, short_edge=None, tasks=tasks)
    img = synthetic_image(15, 80, 112)
    a, b = every(img), some(img)
    if "panoptic" in tasks:
        np.testing.assert_array_equal(a.panoptic.segment_map, b.panoptic.segment_map)
        assert a.panoptic.segments == b.panoptic.segments
    else:
        assert b.panoptic is None
    if "instance" in tasks:
        np.testing.assert_array_equal(a.instances.masks, b.instances.masks)
        np.testing.assert_array_equal(a.instances.scores, b.instances.scores)
        assert a.instances.labels == b.instances.labels
    else:
        assert b.instances is None
    if "semantic" in tasks:
        np.testing.assert_array_equal(a.semantic.class_map, b.semantic.class_map)
    else:
        assert b.semantic is None


def test_keep_own_size_and_custom_short_edge(tiny_model):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        p = Predictor(tiny_model, "cat; dog", short_edge=None, tasks=("panoptic",))
    pred = p(synthetic_image(13, 70, 50))
    assert pred.semantic is None and pred.instances is None
    assert pred.panoptic.segment_map.shape == (70, 50)


def test_rle_of_segments_round_trips(tiny_predictor):
    pred = tiny_predictor(synthetic_image(14, 64, 64))
    for s in pred.panoptic.segments:
        mask = pred.panoptic.segment_map == s["id"]
        np.testing.assert_array_equal(decode_rle(encode_rle(mask)), mask)
