"""Test inputs: synthetic images plus the bad-input catalogue (each built in memory, no downloads)."""
import io
import struct
import zlib

import numpy as np
from PIL import Image

from fcclip.datasets.synthetic import synthetic_image


def _png(img: Image.Image, **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="PNG", **kw)
    return buf.getvalue()


def _jpeg(img: Image.Image) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="JPEG", quality=90)
    return buf.getvalue()


def _bomb_png(width: int = 100_000, height: int = 100_000) -> bytes:
    """A valid PNG header declaring a huge image (a few bytes of data): decoding it would need 30 GB."""
    data = bytearray(_png(Image.new("L", (8, 8))))
    # IHDR is the first chunk: 8-byte signature, 4-byte length, b"IHDR", then width and height
    struct.pack_into(">II", data, 16, width, height)
    crc = zlib.crc32(bytes(data[12:29])) & 0xFFFFFFFF
    struct.pack_into(">I", data, 29, crc)
    return bytes(data)


def _gif_animation() -> bytes:
    frames = [Image.fromarray(synthetic_image(s, 40, 50)).convert("P") for s in (101, 102)]
    buf = io.BytesIO()
    frames[0].save(buf, format="GIF", save_all=True, append_images=frames[1:], duration=100, loop=0)
    return buf.getvalue()


def good_images(n: int, size=(72, 96)) -> dict[str, bytes]:
    return {f"good/img_{i:03d}.jpg": _jpeg(Image.fromarray(synthetic_image(i, *size))) for i in range(n)}


def bad_inputs() -> dict[str, tuple[bytes, str]]:
    """{name: (bytes, expected status)}: odd-but-valid images are labeled ("ok"), broken ones are error rows."""
    base = Image.fromarray(synthetic_image(50, 60, 80))
    truncated = _jpeg(base)[:300]
    sixteen = Image.fromarray((np.arange(60 * 80, dtype=np.uint16).reshape(60, 80) * 13).astype(np.uint16))
    return {
        "odd/not_an_image.jpg": (b"this is a text file, not a picture\n" * 20, "error"),
        "odd/truncated.jpg": (truncated, "error"),
        "odd/empty.jpg": (b"", "error"),
        "odd/bomb.png": (_bomb_png(), "error"),
        "odd/cmyk.jpg": (_jpeg(base.convert("CMYK")), "ok"),
        "odd/gray16.png": (_png(sixteen), "ok"),
        "odd/palette.png": (_png(base.convert("P")), "ok"),
        "odd/rgba.png": (_png(base.convert("RGBA")), "ok"),
        "odd/animated.gif": (_gif_animation(), "ok"),
        "odd/tiny_1x1.png": (_png(Image.new("RGB", (1, 1), (10, 200, 30))), "ok"),
    }
