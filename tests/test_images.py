"""fcclip.images: every input kind and image mode decodes to the RGB a user expects; broken inputs fail clearly.

Every test image is built here, in memory or in tmp_path.
"""
from __future__ import annotations

import functools
import http.server
import io
import struct
import threading
import time
import warnings
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageFile

from fcclip.images import DEFAULT_MAX_PIXELS, ImageDecodeError, decode_image_bytes, load_image

RED, GREEN, BLUE, WHITE = (255, 0, 0), (0, 255, 0), (0, 0, 255), (255, 255, 255)


def encode(image: Image.Image, fmt: str = "PNG", **kwargs) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, fmt, **kwargs)
    return buffer.getvalue()


def png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def raw_png(width: int, height: int, bit_depth: int, color_type: int, rows: list[bytes]) -> bytes:
    """A PNG written by hand (for layouts Pillow cannot write, such as 16-bit RGB)."""
    header = struct.pack(">IIBBBBB", width, height, bit_depth, color_type, 0, 0, 0)
    pixels = zlib.compress(b"".join(b"\x00" + row for row in rows))
    return b"\x89PNG\r\n\x1a\n" + png_chunk(b"IHDR", header) + png_chunk(b"IDAT", pixels) + png_chunk(b"IEND", b"")


def with_declared_size(png: bytes, width: int, height: int) -> bytes:
    """A real PNG whose IHDR now declares `width` x `height` (CRC fixed), its pixel data left as it was."""
    assert png[12:16] == b"IHDR"
    ihdr = png[16:29]
    ihdr = struct.pack(">II", width, height) + ihdr[8:]
    return png[:16] + ihdr + struct.pack(">I", zlib.crc32(b"IHDR" + ihdr)) + png[33:]


def check_rgb(array: np.ndarray, height: int, width: int) -> None:
    assert array.shape == (height, width, 3)
    assert array.dtype == np.uint8
    assert array.flags.c_contiguous


@pytest.fixture
def rgb_image() -> Image.Image:
    """8 x 6 (W x H): left half red, right half blue, one green pixel at (row 1, col 2)."""
    image = Image.new("RGB", (8, 6), RED)
    image.paste(BLUE, (4, 0, 8, 6))
    image.putpixel((2, 1), GREEN)
    return image


def expected_rgb() -> np.ndarray:
    out = np.zeros((6, 8, 3), np.uint8)
    out[:, :4] = RED
    out[:, 4:] = BLUE
    out[1, 2] = GREEN
    return out


# --------------------------------------------------------------------------------------------- input kinds


def test_path_str_pathlike_and_file_uri(tmp_path: Path, rgb_image: Image.Image) -> None:
    path = tmp_path / "image.png"
    rgb_image.save(path)
    for source in (str(path), path, path.as_uri()):
        array = load_image(source)
        check_rgb(array, 6, 8)
        np.testing.assert_array_equal(array, expected_rgb())


def test_bytes_bytearray_memoryview(rgb_image: Image.Image) -> None:
    data = encode(rgb_image)
    for source in (data, bytearray(data), memoryview(data)):
        np.testing.assert_array_equal(load_image(source), expected_rgb())
    np.testing.assert_array_equal(decode_image_bytes(data), expected_rgb())


def test_memory_uri(rgb_image: Image.Image) -> None:
    import fsspec

    fs = fsspec.filesystem("memory")
    fs.pipe("/fcclip-test/image.png", encode(rgb_image))
    try:
        np.testing.assert_array_equal(load_image("memory://fcclip-test/image.png"), expected_rgb())
        with pytest.raises(FileNotFoundError):
            load_image("memory://fcclip-test/missing.png")
    finally:
        fs.rm("/fcclip-test", recursive=True)


def test_http_uri_from_a_local_server(tmp_path: Path, rgb_image: Image.Image) -> None:
    pytest.importorskip("aiohttp")
    rgb_image.save(tmp_path / "image.png")
    handler = functools.partial(QuietHandler, directory=str(tmp_path))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        url = f"http://127.0.0.1:{server.server_address[1]}/image.png"
        np.testing.assert_array_equal(load_image(url), expected_rgb())
    finally:
        server.shutdown()
        server.server_close()


class QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args) -> None:
        pass


def test_pil_image_input_is_not_modified(rgb_image: Image.Image) -> None:
    array = load_image(rgb_image)
    np.testing.assert_array_equal(array, expected_rgb())
    array[:] = 0
    assert rgb_image.getpixel((0, 0)) == RED


def test_missing_path_and_unsupported_type(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError):
        load_image(tmp_path / "missing.jpg")
    with pytest.raises(FileNotFoundError):
        load_image(str(tmp_path / "missing.jpg"))
    with pytest.raises(TypeError, match="int"):
        load_image(42)  # type: ignore[arg-type]


# --------------------------------------------------------------------------------------------- modes


def test_grayscale_and_bilevel() -> None:
    grey = Image.fromarray(np.array([[0, 100, 255]], np.uint8))
    assert grey.mode == "L"
    array = load_image(encode(grey))
    check_rgb(array, 1, 3)
    np.testing.assert_array_equal(array[0], [[0, 0, 0], [100, 100, 100], [255, 255, 255]])

    bilevel = Image.new("1", (2, 1), 0)
    bilevel.putpixel((1, 0), 1)
    np.testing.assert_array_equal(load_image(encode(bilevel))[0], [[0, 0, 0], [255, 255, 255]])


def palette_image(transparent_index: int | None) -> Image.Image:
    image = Image.new("P", (3, 1))
    image.putpalette([*RED, *GREEN, *BLUE] + [0] * (256 - 3) * 3)
    for x in range(3):
        image.putpixel((x, 0), x)
    if transparent_index is not None:
        image.info["transparency"] = transparent_index
    return image


def test_palette_without_and_with_transparency() -> None:
    np.testing.assert_array_equal(load_image(encode(palette_image(None)))[0], [RED, GREEN, BLUE])
    data = encode(palette_image(1))
    assert Image.open(io.BytesIO(data)).mode == "P"
    # The transparent entry is composited over white.
    np.testing.assert_array_equal(load_image(data)[0], [RED, WHITE, BLUE])


def test_rgba_is_composited_over_white() -> None:
    rgba = np.array([[[255, 0, 0, 255], [0, 255, 0, 0], [0, 0, 0, 128], [200, 100, 50, 51]]], np.uint8)
    image = Image.fromarray(rgba, "RGBA")
    expected = [RED, WHITE, [127, 127, 127], [
        round((200 * 51 + 255 * 204) / 255), round((100 * 51 + 255 * 204) / 255), round((50 * 51 + 255 * 204) / 255)
    ]]
    np.testing.assert_array_equal(load_image(encode(image))[0], expected)
    np.testing.assert_array_equal(load_image(rgba)[0], expected)  # the same rule for arrays


def test_grey_with_alpha() -> None:
    image = Image.new("LA", (2, 1), (0, 255))
    image.putpixel((1, 0), (0, 0))
    np.testing.assert_array_equal(load_image(encode(image))[0], [[0, 0, 0], WHITE])
    pa = palette_image(None).convert("PA")
    pa.putpixel((0, 0), (0, 0))  # palette index 0 (red), alpha 0
    np.testing.assert_array_equal(load_image(pa)[0], [WHITE, GREEN, BLUE])


def test_cmyk_jpeg() -> None:
    data = encode(Image.new("CMYK", (16, 16), (0, 255, 255, 0)), "JPEG", quality=95)  # pure red in CMYK
    assert Image.open(io.BytesIO(data)).mode == "CMYK"
    array = load_image(data)
    check_rgb(array, 16, 16)
    assert np.abs(array.astype(int) - RED).max() <= 3


def test_ycbcr() -> None:
    array = load_image(Image.new("YCbCr", (2, 2), (128, 128, 128)))
    np.testing.assert_array_equal(array, np.full((2, 2, 3), 128, np.uint8))


def test_16bit_grey_png_is_rescaled_not_clipped() -> None:
    values = np.array([[0, 257, 300, 32768, 65535]], np.uint16)
    data = encode(Image.fromarray(values))
    assert Image.open(io.BytesIO(data)).mode == "I;16"
    array = load_image(data)
    np.testing.assert_array_equal(array[0, :, 0], [0, 1, 1, 128, 255])
    np.testing.assert_array_equal(array[..., 0], array[..., 2])


def test_16bit_big_endian_pil_image() -> None:
    image = Image.frombytes("I;16B", (2, 1), np.array([32768, 65535], ">u2").tobytes())
    np.testing.assert_array_equal(load_image(image)[0, :, 0], [128, 255])


def test_16bit_rgb_png() -> None:
    # Pillow 13 opens a 16-bit RGB PNG as 8-bit RGB (keeping the high byte); we take what it gives.
    pixels = np.array([[[65535, 32768, 0], [257, 1000, 65534]]], ">u2")
    data = raw_png(2, 1, 16, 2, [pixels[0].tobytes()])
    array = load_image(data)
    check_rgb(array, 1, 2)
    np.testing.assert_array_equal(array[0, 0], [255, 128, 0])
    assert np.abs(array[0, 1].astype(int) - [1, 4, 255]).max() <= 1  # high byte or rounded: within 1


def test_32bit_integer_mode() -> None:
    small = Image.fromarray(np.array([[0, 32768, 65535]], np.int32))
    assert small.mode == "I"
    np.testing.assert_array_equal(load_image(small)[0, :, 0], [0, 128, 255])  # treated as 16-bit
    large = Image.fromarray(np.array([[0, 100_000, 200_000]], np.int32))
    np.testing.assert_array_equal(load_image(large)[0, :, 0], [0, 128, 255])  # scaled by the max
    tiff = encode(small, "TIFF")
    np.testing.assert_array_equal(load_image(tiff)[0, :, 0], [0, 128, 255])


def test_float_mode() -> None:
    unit = Image.fromarray(np.array([[0.0, 0.5, 1.0]], np.float32))
    assert unit.mode == "F"
    np.testing.assert_array_equal(load_image(unit)[0, :, 0], [0, 128, 255])
    byte_range = Image.fromarray(np.array([[0.0, 127.6, 300.0, -5.0]], np.float32))
    np.testing.assert_array_equal(load_image(byte_range)[0, :, 0], [0, 128, 255, 0])


def test_exif_orientation_is_applied() -> None:
    # Stored 32 x 16 (W x H), red marker in the top-left corner. Orientation 6: rotate 90 degrees clockwise to
    # display, so the image becomes 16 x 32 and the marker moves to the top-right corner.
    image = Image.new("RGB", (32, 16), BLUE)
    image.paste(RED, (0, 0, 8, 8))
    exif = image.getexif()
    exif[0x0112] = 6
    data = encode(image, "JPEG", exif=exif, quality=95)
    assert Image.open(io.BytesIO(data)).size == (32, 16)
    array = load_image(data)
    check_rgb(array, 32, 16)
    near = lambda value, colour: np.abs(value.astype(int) - colour).max() <= 8  # noqa: E731 (JPEG)
    assert near(array[2, 13], RED)
    assert near(array[2, 2], BLUE)
    assert near(array[29, 2], BLUE)
    assert near(array[29, 13], BLUE)


@pytest.mark.parametrize("fmt", ["GIF", "WEBP", "PNG"])
def test_animated_image_gives_its_first_frame(fmt: str) -> None:
    first, second = Image.new("RGB", (4, 4), RED), Image.new("RGB", (4, 4), BLUE)
    data = encode(first, fmt, save_all=True, append_images=[second], duration=100, loop=0, lossless=True)
    assert getattr(Image.open(io.BytesIO(data)), "n_frames", 1) == 2
    np.testing.assert_array_equal(load_image(data), np.full((4, 4, 3), RED, np.uint8))


def test_one_pixel_image(tmp_path: Path) -> None:
    path = tmp_path / "one.png"
    Image.new("RGB", (1, 1), GREEN).save(path)
    np.testing.assert_array_equal(load_image(path), [[GREEN]])


# --------------------------------------------------------------------------------------------- broken inputs


def noise(height: int = 64, width: int = 64) -> Image.Image:
    return Image.fromarray(np.random.default_rng(0).integers(0, 256, (height, width, 3), dtype=np.uint8))


@pytest.mark.parametrize("fmt", ["JPEG", "PNG"])
def test_truncated_file(tmp_path: Path, fmt: str) -> None:
    data = encode(noise(), fmt)
    path = tmp_path / f"cut.{fmt.lower()}"
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(ImageDecodeError, match="truncated") as info:
        load_image(path)
    assert str(path) in str(info.value)
    with pytest.raises(ImageDecodeError, match="truncated"):
        decode_image_bytes(data[: len(data) // 2])
    assert ImageFile.LOAD_TRUNCATED_IMAGES is False


def test_empty_and_non_image_inputs(tmp_path: Path) -> None:
    empty = tmp_path / "empty.jpg"
    empty.write_bytes(b"")
    text = tmp_path / "notes.png"
    text.write_text("this is not an image\n")
    with pytest.raises(ImageDecodeError, match="empty.jpg: empty input"):  # a path says what its bytes say
        load_image(empty)
    with pytest.raises(ImageDecodeError, match="empty input"):
        load_image(b"")
    with pytest.raises(ImageDecodeError, match="not an image") as info:
        load_image(text)
    assert "notes.png" in str(info.value)
    assert isinstance(info.value, ValueError)


def test_huge_declared_size_is_refused_without_decoding() -> None:
    bomb = with_declared_size(encode(Image.new("RGB", (4, 4))), 100_000, 100_000)
    with pytest.raises(Image.DecompressionBombError):  # the header really declares 1e10 pixels
        Image.open(io.BytesIO(bomb))
    limit = Image.MAX_IMAGE_PIXELS
    for max_pixels in (DEFAULT_MAX_PIXELS, None, 10**12):
        start = time.perf_counter()
        with pytest.raises(ImageDecodeError) as info:
            load_image(bomb, max_pixels=max_pixels)
        assert time.perf_counter() - start < 1.0  # 30 GB of pixels were never allocated
        assert "10000000000" in str(info.value) and "MAX_IMAGE_PIXELS" in str(info.value)
    assert Image.MAX_IMAGE_PIXELS == limit  # the global setting is left alone


def test_our_pixel_limit_is_checked_before_decoding() -> None:
    # Declared 9000 x 9000 (below Pillow's warning limit) with the pixel data of a 4 x 4 image: decoding would fail
    # as truncated, so a size error proves the check ran on the header alone.
    fake = with_declared_size(encode(Image.new("RGB", (4, 4))), 9000, 9000)
    with pytest.raises(ImageDecodeError, match=r"9000 x 9000 = 81,000,000 pixels.*1,000,000"):
        load_image(fake, max_pixels=1_000_000)
    small_fake = with_declared_size(encode(Image.new("RGB", (4, 4))), 1000, 1000)
    with pytest.raises(ImageDecodeError, match="truncated|cannot decode"):  # within the limit: decoding is tried
        load_image(small_fake, max_pixels=None)
    real = encode(noise(100, 100))
    with pytest.raises(ImageDecodeError, match=r"100 x 100 = 10,000 pixels.*5,000"):
        load_image(real, max_pixels=5_000)
    assert load_image(real, max_pixels=10_000).shape == (100, 100, 3)


def test_pillow_bomb_warning_raised_as_error_becomes_decode_error() -> None:
    fake = with_declared_size(encode(Image.new("RGB", (4, 4))), 10_000, 10_000)  # 1e8 > Pillow's 89,478,485
    with warnings.catch_warnings():
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        with pytest.raises(ImageDecodeError, match="MAX_IMAGE_PIXELS"):
            load_image(fake, max_pixels=None)


# --------------------------------------------------------------------------------------------- arrays


def test_arrays_of_each_layout_and_dtype() -> None:
    grey = np.array([[0, 128, 255]], np.uint8)
    expected = np.repeat(grey[..., None], 3, axis=2)
    np.testing.assert_array_equal(load_image(grey), expected)
    np.testing.assert_array_equal(load_image(grey[..., None]), expected)
    np.testing.assert_array_equal(load_image(np.array([[0, 32768, 65535]], np.uint16)), expected)
    np.testing.assert_array_equal(load_image(np.array([[0.0, 128 / 255, 1.0]], np.float32)), expected)
    np.testing.assert_array_equal(load_image(np.array([[0.0, 128 / 255, 1.0]], np.float64)), expected)
    np.testing.assert_array_equal(load_image(np.array([[False, True]])), [[[0, 0, 0], WHITE]])
    rgb = expected_rgb()
    out = load_image(rgb)
    np.testing.assert_array_equal(out, rgb)
    out[0, 0] = 0
    assert tuple(rgb[0, 0]) == RED  # never a view of the input
    strided = np.asfortranarray(rgb)[:, ::2]
    check_rgb(load_image(strided), 6, 4)


@pytest.mark.parametrize(
    "array, message",
    [
        (np.zeros((4, 4), np.int32), "dtype int32"),
        (np.zeros((4, 4, 3), np.int64), "dtype int64"),
        (np.zeros((4, 4, 2), np.uint8), "shape"),
        (np.zeros((2, 4, 4, 3), np.uint8), "shape"),
        (np.zeros((0, 4, 3), np.uint8), "empty"),
        (np.full((2, 2), 1.5, np.float32), r"\[0, 1\]"),
        (np.full((2, 2), -0.1, np.float32), r"\[0, 1\]"),
        (np.full((2, 2), np.nan, np.float32), "NaN"),
    ],
)
def test_bad_arrays(array: np.ndarray, message: str) -> None:
    with pytest.raises(ImageDecodeError, match=message):
        load_image(array)


def test_array_pixel_limit() -> None:
    with pytest.raises(ImageDecodeError, match="max_pixels"):
        load_image(np.zeros((10, 10, 3), np.uint8), max_pixels=99)
