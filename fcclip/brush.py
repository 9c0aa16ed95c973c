"""Label Studio's brush-mask RLE, encoded and decoded (pure functions, numpy only).

Label Studio stores a brush mask as the RGBA pixels of an (H, W) canvas, row by row (4 values per pixel, 8-bit),
run-length packed into a bit stream (most significant bit first):

    header   32 bits  N, the number of values (4 * H * W)
              5 bits  word size - 1 (8-bit values: 7)
          4 x 4 bits  the four run-length field sizes, each - 1 (bits used for a chunk's length)
    chunks   1 bit    1: a repeat chunk (one value repeated), 0: a literal chunk (that many values follow)
             2 bits   which of the four length-field sizes this chunk uses
             S bits   the chunk's length - 1 (S = the chosen size)
             then     one word (repeat) or `length` words (literal)
    the stream is padded with zero bits to a whole byte.

A mask is its alpha channel: a pixel is in the mask when its alpha is at least 128 (the editor's anti-aliased
strokes leave a few partial values; our own encoder writes 255 in all four channels of a masked pixel and 0
elsewhere, which is what Label Studio's own exporters read back). :func:`encode` and :func:`decode` round-trip any
(H, W) boolean mask exactly, empty and full masks and odd sizes included.
"""
from __future__ import annotations

import numpy as np

__all__ = ["encode", "decode", "decode_values"]

_WORD = 8
_SIZES = (3, 6, 11, 16)  # bits of a chunk's length field: up to 8, 64, 2048 and 65536 values per chunk


def encode(mask: np.ndarray) -> list[int]:
    """(H, W) mask (any dtype, nonzero = in) -> Label Studio's ``rle`` list of byte values."""
    mask = np.asarray(mask)
    if mask.ndim != 2:
        raise ValueError(f"a brush mask is (H, W), got shape {mask.shape}")
    pixels = np.where(mask.astype(bool), 255, 0).astype(np.uint8)
    values = np.repeat(pixels.ravel(order="C"), 4)  # RGBA, every channel the same
    n = int(values.size)
    if n >= 2**32:
        raise ValueError("a brush mask holds fewer than 2**32 values")

    fields: list[tuple[int, int]] = [(n, 32), (_WORD - 1, 5)] + [(s - 1, 4) for s in _SIZES]
    if n:
        starts = np.concatenate([[0], np.flatnonzero(values[1:] != values[:-1]) + 1])
        lengths = np.diff(np.append(starts, n))
        for value, length in zip(values[starts].tolist(), lengths.tolist()):
            while length > 0:  # every run as repeat chunks, split at the largest chunk length
                take = min(length, 1 << _SIZES[-1])
                which = next(k for k, s in enumerate(_SIZES) if take <= (1 << s))
                fields += [(1, 1), (which, 2), (take - 1, _SIZES[which]), (value, _WORD)]
                length -= take
    bits = "".join(format(v, f"0{w}b") for v, w in fields)
    bits += "0" * (-len(bits) % 8)
    return np.packbits(np.frombuffer(bits.encode("ascii"), np.uint8) - ord("0")).tolist()


class _Bits:
    """Reads unsigned fields from a bit string, most significant bit first."""

    def __init__(self, data: bytes):
        self.bits = "".join(format(b, "08b") for b in data)
        self.pos = 0

    def read(self, width: int) -> int:
        if self.pos + width > len(self.bits):
            raise ValueError("brush RLE ends in the middle of a field")
        value = int(self.bits[self.pos : self.pos + width], 2) if width else 0
        self.pos += width
        return value


def decode_values(rle) -> np.ndarray:
    """Label Studio's ``rle`` (a list of byte values, or bytes) -> the N values it packs, uint8 (uint16/32 for wider
    words)."""
    data = bytes(bytearray(int(v) & 0xFF for v in rle)) if not isinstance(rle, (bytes, bytearray)) else bytes(rle)
    stream = _Bits(data)
    n = stream.read(32)
    word = stream.read(5) + 1
    sizes = [stream.read(4) + 1 for _ in range(4)]
    values: list[int] = []
    counts: list[int] = []
    i = 0
    while i < n:
        repeat = stream.read(1)
        length = stream.read(sizes[stream.read(2)]) + 1
        length = min(length, n - i)
        if repeat:
            values.append(stream.read(word))
            counts.append(length)
        else:
            for _ in range(length):
                values.append(stream.read(word))
                counts.append(1)
        i += length
    dtype = np.uint8 if word <= 8 else np.uint16 if word <= 16 else np.uint32
    return np.repeat(np.asarray(values, dtype=dtype), np.asarray(counts, dtype=np.int64))


def decode(rle, height: int, width: int) -> np.ndarray:
    """Label Studio's ``rle`` of an (``height``, ``width``) image -> (H, W) bool mask (alpha >= 128)."""
    values = decode_values(rle)
    if values.size != 4 * height * width:
        raise ValueError(f"brush RLE holds {values.size} values, a {height}x{width} RGBA image has {4 * height * width}")
    return values.reshape(height, width, 4)[..., 3] >= 128
