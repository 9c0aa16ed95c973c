"""Decoding any image input to an (H, W, 3) uint8 RGB array, the way a user expects to see the image.

- EXIF orientation is applied, so height and width are those of the image as displayed.
- Every mode becomes RGB: grey and palette images are expanded; 16-bit images are rescaled (x / 257, rounded), not
  clipped; CMYK and YCbCr are converted; transparent pixels are composited over white (as a viewer shows them on
  a white page, and so that fully transparent regions, whose colour is arbitrary, read as plain background).
- Animated GIF / WebP / APNG: the first frame.
- Decompression bombs: an image whose header declares more than `max_pixels` pixels is refused before any pixel
  data is decoded. Pillow's own limit (`PIL.Image.MAX_IMAGE_PIXELS`, a process-wide setting that belongs to the
  application) is left alone and still applies: past twice that limit Pillow refuses the image itself, which is
  reported as an `ImageDecodeError` too.
- Truncated or corrupt files raise `ImageDecodeError`; `PIL.ImageFile.LOAD_TRUNCATED_IMAGES` is not touched.

And the sizes the model sees: `resized_shape` / `resize_image` (the test-time resize), `padded_size` (the zero padding
to the model's size divisibility) and `batch_groups` (batches of images of one padded size: padding changes the
results of the image it pads, so only images of one padded size share a forward pass).
"""
from __future__ import annotations

import io
import os
import re
import struct
from typing import IO, Union

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

__all__ = [
    "DEFAULT_MAX_PIXELS", "ImageDecodeError", "ImageSource", "decode_image_bytes", "load_image", "resize_image", "resized_shape",
]

DEFAULT_MAX_PIXELS = 178_956_970
"""Largest width * height decoded by default: Pillow's default hard limit (2 * 89,478,485), about 13,377 x 13,377
pixels or 537 MB as RGB uint8. Larger images are refused unless the caller raises `max_pixels` (and, past Pillow's
limit, `PIL.Image.MAX_IMAGE_PIXELS`)."""

ImageSource = Union[str, "os.PathLike[str]", bytes, bytearray, memoryview, Image.Image, np.ndarray]

_URI = re.compile(r"^([A-Za-z][A-Za-z0-9+.\-]*)://")
_SIXTEEN_BIT_MODES = ("I;16", "I;16L", "I;16B", "I;16N")
# Anything Pillow raises while identifying or decoding a broken file.
_DECODE_ERRORS = (OSError, SyntaxError, ValueError, EOFError, IndexError, TypeError, KeyError, struct.error)


class ImageDecodeError(ValueError):
    """The input is not an image that can be decoded (not an image, truncated, too large, unsupported)."""


def uri_protocol(source: str) -> str | None:
    """The protocol of a URI string that `load_image` opens with fsspec (``s3`` for ``s3://b/k.jpg``); None for a
    local path."""
    m = _URI.match(source)
    return m.group(1).lower() if m else None


def load_image(source: ImageSource, *, max_pixels: int | None = DEFAULT_MAX_PIXELS) -> np.ndarray:
    """Decode `source` to an RGB image.

    Args:
        source: a local path (str or os.PathLike); an fsspec URI string (``s3://``, ``gs://``, ``http(s)://``,
            ``file://``, ``memory://``, ...); encoded bytes (bytes, bytearray, memoryview); a PIL image (its current
            frame, EXIF orientation applied); or a numpy array: (H, W) or (H, W, 1) grey, (H, W, 3) RGB or
            (H, W, 4) RGBA, of dtype uint8, uint16 (rescaled by x / 257), bool, or float in [0, 1].
        max_pixels: refuse images with more than this many pixels (width * height), checked from the header before
            decoding; None for no limit of our own (Pillow's still applies).

    Returns:
        (H, W, 3) uint8 RGB, C-contiguous, never a view of the input.

    Raises:
        ImageDecodeError: not an image, truncated, too large, or an unsupported array.
        FileNotFoundError: a path or URI that does not exist.
    """
    if isinstance(source, np.ndarray):
        return _from_array(source, max_pixels)
    if isinstance(source, Image.Image):
        return _decode_opened(source, "PIL image", max_pixels)
    if isinstance(source, (bytes, bytearray, memoryview)):
        return decode_image_bytes(source, max_pixels=max_pixels)
    if isinstance(source, (str, os.PathLike)):
        path = os.fspath(source)
        if isinstance(path, bytes):
            path = os.fsdecode(path)
        if _URI.match(path):
            import fsspec

            with fsspec.open(path, "rb") as f:
                data = f.read()
            return decode_image_bytes(data, max_pixels=max_pixels, name=path)
        with open(path, "rb") as f:
            if os.fstat(f.fileno()).st_size == 0:  # as decode_image_bytes says it (Pillow: "not an image")
                raise ImageDecodeError(f"{path}: empty input (0 bytes)")
            return _decode_file(f, path, max_pixels)
    raise TypeError(f"cannot load an image from {type(source).__name__}; see load_image's docstring")


def decode_image_bytes(
    data: bytes | bytearray | memoryview, *, max_pixels: int | None = DEFAULT_MAX_PIXELS, name: str | None = None
) -> np.ndarray:
    """Decode an encoded image (JPEG, PNG, WebP, GIF, TIFF, BMP, ...) to (H, W, 3) uint8 RGB.

    `name` (e.g. the file it came from) only appears in error messages. See `load_image` for the behaviour.
    """
    if len(data) == 0:
        raise ImageDecodeError(f"{name or 'image bytes'}: empty input (0 bytes)")
    what = name if name is not None else f"image bytes ({len(data)} bytes)"
    return _decode_file(io.BytesIO(data), what, max_pixels)


def _decode_file(fp: IO[bytes], what: str, max_pixels: int | None) -> np.ndarray:
    try:
        image = Image.open(fp)  # reads the header only
    except UnidentifiedImageError:
        raise ImageDecodeError(f"{what}: not an image, or a format Pillow cannot read") from None
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise _bomb_error(what, exc, max_pixels) from None
    except _DECODE_ERRORS as exc:
        raise ImageDecodeError(f"{what}: cannot read the image header: {exc}") from None
    with image:
        return _decode_opened(image, what, max_pixels)


def _decode_opened(image: Image.Image, what: str, max_pixels: int | None) -> np.ndarray:
    """Check the size, decode the pixels (of the current frame), orient, convert to RGB."""
    width, height = image.size
    if width <= 0 or height <= 0:
        raise ImageDecodeError(f"{what}: empty image ({width} x {height})")
    if max_pixels is not None and width * height > max_pixels:
        raise ImageDecodeError(
            f"{what}: image is {width} x {height} = {width * height:,} pixels, more than the limit of "
            f"{max_pixels:,} (max_pixels); refusing to decode it (possible decompression bomb)"
        )
    try:
        image.load()
        image = ImageOps.exif_transpose(image)
        return _to_rgb(image)
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise _bomb_error(what, exc, max_pixels) from None
    except _DECODE_ERRORS as exc:
        raise ImageDecodeError(f"{what}: cannot decode the image ({image.format or 'unknown format'}, "
                               f"{width} x {height}, mode {image.mode}): {exc}") from None


def _bomb_error(what: str, exc: Exception, max_pixels: int | None) -> ImageDecodeError:
    return ImageDecodeError(
        f"{what}: refused by Pillow's size limit (PIL.Image.MAX_IMAGE_PIXELS = {_count(Image.MAX_IMAGE_PIXELS)}; "
        f"max_pixels = {_count(max_pixels)}): {exc}"
    )


def _count(value: int | None) -> str:
    return "None" if value is None else f"{value:,}"


def _to_rgb(image: Image.Image) -> np.ndarray:
    """A loaded PIL image of any mode -> (H, W, 3) uint8 RGB."""
    mode = image.mode
    if mode in _SIXTEEN_BIT_MODES:
        return _grey_to_rgb(_rescale_16bit(np.asarray(image)))
    if mode == "I":  # 32-bit signed
        values = np.asarray(image).astype(np.int64)
        if values.min() >= 0 and values.max() <= 65535:
            return _grey_to_rgb(_rescale_16bit(values))
        top = max(int(values.max()), 1)
        scaled = np.clip(values, 0, None) * 255.0 / top
        return _grey_to_rgb(np.rint(scaled).astype(np.uint8))
    if mode == "F":  # 32-bit float: 0..1 if it fits there, else 0..255
        values = np.nan_to_num(np.asarray(image, dtype=np.float64), nan=0.0, posinf=255.0, neginf=0.0)
        if values.max() <= 1.0:
            values = values * 255.0
        return _grey_to_rgb(np.rint(np.clip(values, 0.0, 255.0)).astype(np.uint8))
    if mode in ("RGBA", "LA", "PA", "RGBa", "La") or image.has_transparency_data:
        return _over_white(np.asarray(image.convert("RGBA")))
    if mode == "RGB":
        return np.array(image, dtype=np.uint8)  # a copy, C-contiguous
    # 1, L, P, CMYK, YCbCr, RGBX, HSV, LAB, ...: Pillow's own conversions (a mode it cannot convert raises
    # ValueError, reported by the caller).
    return np.array(image.convert("RGB"), dtype=np.uint8)


def _from_array(array: np.ndarray, max_pixels: int | None) -> np.ndarray:
    """A numpy image -> (H, W, 3) uint8 RGB (always a new array)."""
    shape = array.shape
    if array.ndim == 3 and shape[2] in (1, 3, 4):
        channels = shape[2]
    elif array.ndim == 2:
        channels = 1
    else:
        raise ImageDecodeError(f"array of shape {shape}: expected (H, W), (H, W, 1), (H, W, 3) or (H, W, 4)")
    height, width = shape[:2]
    if height == 0 or width == 0:
        raise ImageDecodeError(f"array of shape {shape}: empty image")
    if max_pixels is not None and height * width > max_pixels:
        raise ImageDecodeError(
            f"array of shape {shape}: {width} x {height} = {width * height:,} pixels, more than the limit of "
            f"{max_pixels:,} (max_pixels)"
        )
    dtype = array.dtype
    if dtype == np.uint8:
        values = array
    elif dtype == np.uint16:
        values = _rescale_16bit(array)
    elif dtype == np.bool_:
        values = array.astype(np.uint8) * np.uint8(255)
    elif np.issubdtype(dtype, np.floating):
        if not np.isfinite(array).all():
            raise ImageDecodeError(f"float array of shape {shape}: contains NaN or inf")
        low, high = float(array.min()), float(array.max())
        if low < 0.0 or high > 1.0:
            raise ImageDecodeError(f"float array of shape {shape}: values must be in [0, 1], got [{low}, {high}]")
        values = np.rint(array.astype(np.float64) * 255.0).astype(np.uint8)
    else:
        raise ImageDecodeError(f"array of dtype {dtype}: expected uint8, uint16, bool or float in [0, 1]")
    values = values.reshape(height, width, channels)
    if channels == 1:
        return _grey_to_rgb(values[..., 0])
    if channels == 4:
        return _over_white(values)
    return np.array(values, dtype=np.uint8, order="C")  # a copy, never a view of the caller's array


def _rescale_16bit(values: np.ndarray) -> np.ndarray:
    """0..65535 -> 0..255 by round(x / 257) (65535 -> 255, 32768 -> 128), in integers."""
    return ((values.astype(np.uint32) + 128) // 257).astype(np.uint8)


def _grey_to_rgb(grey: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(np.repeat(grey[..., None], 3, axis=2), dtype=np.uint8)


def _over_white(rgba: np.ndarray) -> np.ndarray:
    """(H, W, 4) uint8 -> (H, W, 3) uint8, composited over white: round((rgb * a + 255 * (255 - a)) / 255)."""
    rgb = rgba[..., :3].astype(np.uint32)
    alpha = rgba[..., 3:4].astype(np.uint32)
    out = (rgb * alpha + 255 * (255 - alpha) + 127) // 255
    return np.ascontiguousarray(out, dtype=np.uint8)


def resized_shape(height: int, width: int, short_edge: int | None, max_size: int) -> tuple[int, int]:
    """The reference's ResizeShortestEdge: (new_h, new_w)."""
    if short_edge is None:
        return height, width
    scale = short_edge / min(height, width)
    new_h, new_w = height * scale, width * scale
    if max(new_h, new_w) > max_size:
        scale = max_size / max(new_h, new_w)
        new_h, new_w = new_h * scale, new_w * scale
    return max(1, int(new_h + 0.5)), max(1, int(new_w + 0.5))


def padded_size(size: tuple[int, int], divisibility: int) -> tuple[int, int]:
    """(h, w) rounded up to multiples of ``divisibility``: the size an image of that size is fed to the model at."""
    return -(-int(size[0]) // divisibility) * divisibility, -(-int(size[1]) // divisibility) * divisibility


def batch_groups(keys, batch_size: int | None = None) -> list[list[int]]:
    """The positions of ``keys`` in groups of one key (in the order each key first appears, positions ascending),
    each cut into batches of at most ``batch_size`` (one batch per group without)."""
    groups: dict = {}
    for i, key in enumerate(keys):
        groups.setdefault(key, []).append(i)
    step = max(1, batch_size or len(keys))
    return [group[k : k + step] for group in groups.values() for k in range(0, len(group), step)]


def resize_image(image: np.ndarray, short_edge: int | None, max_size: int) -> np.ndarray:
    """(H, W, 3) uint8 -> resized (bilinear, with PIL as the reference) uint8."""
    h, w = image.shape[:2]
    new_h, new_w = resized_shape(h, w, short_edge, max_size)
    if (new_h, new_w) == (h, w):
        return image
    return np.asarray(Image.fromarray(image).resize((new_w, new_h), Image.BILINEAR))
