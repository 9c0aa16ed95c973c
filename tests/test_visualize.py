"""The panoptic overlay: size, colours, untouched background, tiny images, PNG output."""
from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image

from fcclip.visualize import draw_panoptic

RED, BLUE = (255, 0, 0), (0, 0, 255)


def _scene(height=120, width=300):
    """A grey gradient; segment 1 (red) on the left third, segment 2 (blue) on the middle third, the rest none."""
    rng = np.random.default_rng(0)
    image = rng.integers(60, 200, size=(height, width, 3), dtype=np.uint8)
    seg = np.zeros((height, width), dtype=np.int32)
    seg[:, : width // 3] = 1
    seg[:, width // 3 : 2 * width // 3] = 2
    segments = [
        {"id": 1, "label": "dog", "color": RED, "score": 0.87, "isthing": True},
        {"id": 2, "label": "sky", "color": BLUE, "isthing": False},
    ]
    return image, seg, segments


def test_size_blend_and_untouched_background():
    image, seg, segments = _scene()
    out = draw_panoptic(image, seg, segments, alpha=0.5)
    assert isinstance(out, Image.Image)
    assert out.size == (image.shape[1], image.shape[0]) and out.mode == "RGB"
    result = np.asarray(out).astype(np.int32)

    # far from labels (segment centres) and boundaries: the top-left corner of segment 1, the image blended halfway
    corner = (slice(0, 10), slice(0, 10))
    expected = np.round(0.5 * image[corner].astype(np.float32) + 0.5 * np.array(RED, dtype=np.float32))
    np.testing.assert_allclose(result[corner], expected, atol=1)
    before = np.abs(image[corner].astype(np.int32) - np.array(RED)).sum()
    after = np.abs(result[corner] - np.array(RED)).sum()
    assert after < before

    # segment 2 moves towards blue
    patch = (slice(0, 10), slice(110, 120))
    assert np.abs(result[patch] - np.array(BLUE)).sum() < np.abs(image[patch].astype(np.int32) - np.array(BLUE)).sum()

    # the right third is no segment: unchanged away from the boundary column
    np.testing.assert_array_equal(result[:, 210:], image[:, 210:])


def test_boundaries_and_labels_are_drawn():
    image, seg, segments = _scene()
    plain = np.asarray(draw_panoptic(image, seg, []))
    np.testing.assert_array_equal(plain, image)
    result = np.asarray(draw_panoptic(image, seg, segments)).astype(np.int32)
    blended = np.round(0.5 * image[:, :100].astype(np.float32) + 0.5 * np.array(RED, dtype=np.float32))
    # the boundary between segments 1 and 2 (columns 99 | 100) is darker than the blend
    assert result[:10, 99].sum() < blended[:10, 99].sum()
    # the label box sits around the centre of segment 1 and changes pixels there
    assert np.abs(result[50:70, 30:70] - blended[50:70, 30:70]).max() > 50


def test_alpha_extremes():
    image, seg, segments = _scene()
    result = np.asarray(draw_panoptic(image, seg, segments, alpha=1.0))
    np.testing.assert_array_equal(result[:10, :10], np.broadcast_to(np.array(RED, dtype=np.uint8), (10, 10, 3)))
    result = np.asarray(draw_panoptic(image, seg, segments, alpha=0.0))
    np.testing.assert_array_equal(result[:10, :10], image[:10, :10])
    with pytest.raises(ValueError):
        draw_panoptic(image, seg, segments, alpha=1.5)


def test_saves_as_png(tmp_path):
    image, seg, segments = _scene()
    out = draw_panoptic(image, seg, segments)
    path = tmp_path / "overlay.png"
    out.save(path)
    np.testing.assert_array_equal(np.asarray(Image.open(path).convert("RGB")), np.asarray(out))
    buffer = io.BytesIO()
    out.save(buffer, format="PNG")
    assert buffer.getvalue()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.parametrize("shape", [(1, 1), (1, 17), (17, 1), (3, 5), (20, 20)])
def test_tiny_images(shape):
    image = np.full(shape + (3,), 100, dtype=np.uint8)
    seg = np.ones(shape, dtype=np.int64)
    seg.flat[0] = 7
    segments = [
        {"id": 1, "label": "a very long label that does not fit", "color": (0, 255, 0), "score": 0.5},
        {"id": 7, "label": "x", "color": (255, 255, 0)},
        {"id": 99, "label": "absent", "color": (1, 2, 3)},
    ]
    out = draw_panoptic(image, seg, segments)
    assert out.size == (shape[1], shape[0])
    assert np.asarray(out).shape == shape + (3,)


def test_absent_ids_empty_lists_and_big_ids():
    image, seg, _ = _scene(40, 60)
    out = draw_panoptic(image, seg, [{"id": 5, "label": "ghost", "color": RED}])
    np.testing.assert_array_equal(np.asarray(out), image)
    big = np.full((40, 60), 2**24 - 1, dtype=np.int64)
    out = np.asarray(draw_panoptic(image, big, [{"id": 2**24 - 1, "label": "big", "color": BLUE}], alpha=1.0))
    assert (out[0, 0] == np.array(BLUE)).all()
    # grey image, segment without a colour
    out = draw_panoptic(image[..., 0], seg, [{"id": 1, "label": "grey"}])
    assert out.size == (60, 40)


def test_shape_mismatch_is_an_error():
    image, seg, segments = _scene()
    with pytest.raises(ValueError):
        draw_panoptic(image, seg[:-1], segments)
