"""fcclip.brush: Label Studio's brush RLE, round trips pixel for pixel, and the stream's layout by hand."""
import numpy as np
import pytest

from fcclip import brush


@pytest.mark.parametrize("shape", [(1, 1), (1, 7), (3, 5), (13, 7), (64, 80), (97, 131)])
@pytest.mark.parametrize("kind", ["empty", "full", "random", "blob", "checker"])
def test_round_trip_is_pixel_exact(shape, kind):
    rng = np.random.default_rng(hash((shape, kind)) % 2**32)
    h, w = shape
    mask = {
        "empty": np.zeros(shape, bool),
        "full": np.ones(shape, bool),
        "random": rng.random(shape) < 0.5,
        "blob": np.hypot(*np.mgrid[:h, :w] - np.array([h / 3, w / 2])[:, None, None]) < max(h, w) / 3,
        "checker": (np.add.outer(np.arange(h), np.arange(w)) % 2).astype(bool),
    }[kind]
    rle = brush.encode(mask)
    assert all(isinstance(v, int) and 0 <= v < 256 for v in rle)
    back = brush.decode(rle, h, w)
    assert back.dtype == bool and back.shape == shape
    np.testing.assert_array_equal(back, mask)


def test_runs_longer_than_a_chunk_are_split():
    mask = np.ones((300, 300), bool)  # 360000 values: more than one 65536-value chunk
    mask[150, 7] = False
    np.testing.assert_array_equal(brush.decode(brush.encode(mask), 300, 300), mask)


def test_stream_layout_by_hand():
    """A 1x2 mask [0, 1]: 8 values (RGBA x 2), runs 0 x4 and 255 x4, each a repeat chunk with the 3-bit size."""
    rle = brush.encode(np.array([[0, 1]]))
    bits = "".join(format(b, "08b") for b in rle)
    header = format(8, "032b") + format(7, "05b") + "".join(format(s - 1, "04b") for s in (3, 6, 11, 16))
    chunk0 = "1" + "00" + format(3, "03b") + format(0, "08b")
    chunk1 = "1" + "00" + format(3, "03b") + format(255, "08b")
    body = header + chunk0 + chunk1
    assert bits == body + "0" * (-len(body) % 8)
    np.testing.assert_array_equal(brush.decode_values(rle), [0, 0, 0, 0, 255, 255, 255, 255])


def test_decodes_literal_chunks_and_partial_alpha():
    """Label Studio's editor also writes literal chunks and anti-aliased alpha; alpha >= 128 is in the mask."""
    values = [10, 20, 30, 200, 0, 0, 0, 127, 0, 0, 0, 128]  # 3 pixels: alpha 200, 127, 128
    body = format(len(values), "032b") + format(7, "05b") + "".join(format(s - 1, "04b") for s in (4, 4, 8, 16))
    body += "0" + "00" + format(len(values) - 1, "04b") + "".join(format(v, "08b") for v in values)
    body += "0" * (-len(body) % 8)
    rle = [int(body[i:i + 8], 2) for i in range(0, len(body), 8)]
    np.testing.assert_array_equal(brush.decode_values(rle), values)
    np.testing.assert_array_equal(brush.decode(rle, 1, 3), [[True, False, True]])


def test_refuses_wrong_sizes_and_truncated_streams():
    rle = brush.encode(np.ones((4, 5), bool))
    with pytest.raises(ValueError, match="holds 80 values"):
        brush.decode(rle, 5, 5)
    with pytest.raises(ValueError, match="ends in the middle"):
        brush.decode(rle[:7], 4, 5)
    with pytest.raises(ValueError, match=r"\(H, W\)"):
        brush.encode(np.ones((2, 2, 2)))
