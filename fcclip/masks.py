"""Mask encodings: COCO run-length encoding, boxes, and the COCO panoptic PNG colour encoding of segment ids."""
from __future__ import annotations

import warnings

import numpy as np
import pycocotools.mask as mask_utils
from torch import Tensor

__all__ = ["decode_rle", "encode_rle", "id2rgb", "mask_to_bbox", "rgb2id"]


def _as_bool_mask(mask: np.ndarray | Tensor) -> np.ndarray:
    if isinstance(mask, Tensor):
        mask = mask.detach().cpu().numpy()
    mask = np.asarray(mask)
    if mask.ndim != 2:
        raise ValueError(f"expected an (H, W) mask, got shape {mask.shape}")
    return mask.astype(bool, copy=False)


def encode_rle(mask: np.ndarray | Tensor) -> dict:
    """COCO compressed RLE of an (H, W) binary mask.

    Args:
        mask: (H, W) bool (or anything that is non-zero where the mask is), numpy or torch.

    Returns:
        `{"size": [H, W], "counts": str}`, column-major (Fortran order) as COCO stores it, counts as ASCII text
        (JSON-serialisable; `pycocotools.mask.decode`/`area` accept it as is).
    """
    mask = _as_bool_mask(mask)
    rle = mask_utils.encode(np.asfortranarray(mask, dtype=np.uint8))
    return {"size": [int(s) for s in rle["size"]], "counts": rle["counts"].decode("ascii")}


def decode_rle(rle: dict) -> np.ndarray:
    """(H, W) bool mask of a COCO RLE (`counts` as str or bytes, compressed; or uncompressed as a list of ints)."""
    counts = rle["counts"]
    size = [int(s) for s in rle["size"]]
    if isinstance(counts, list):
        rle = mask_utils.frPyObjects({"size": size, "counts": counts}, size[0], size[1])
    elif isinstance(counts, str):
        rle = {"size": size, "counts": counts.encode("ascii")}
    else:
        rle = {"size": size, "counts": counts}
    with warnings.catch_warnings():
        # pycocotools' Cython array wrapper predates numpy 2's `copy` keyword and warns on every decode
        warnings.filterwarnings("ignore", message=".*__array__ implementation doesn't accept a copy keyword")
        return mask_utils.decode(rle).astype(bool)


def mask_to_bbox(mask: np.ndarray | Tensor) -> list[float]:
    """`[x, y, w, h]` box of a binary mask in pixels, COCO convention.

    x, y are the column and row of the top-left mask pixel; w = x_max - x_min + 1, h = y_max - y_min + 1 (a single
    pixel is 1 x 1). An empty mask gives `[0.0, 0.0, 0.0, 0.0]`.
    """
    mask = _as_bool_mask(mask)
    rows = np.flatnonzero(mask.any(axis=1))
    if rows.size == 0:
        return [0.0, 0.0, 0.0, 0.0]
    cols = np.flatnonzero(mask.any(axis=0))
    x0, x1, y0, y1 = int(cols[0]), int(cols[-1]), int(rows[0]), int(rows[-1])
    return [float(x0), float(y0), float(x1 - x0 + 1), float(y1 - y0 + 1)]


def id2rgb(ids: np.ndarray) -> np.ndarray:
    """COCO panoptic PNG colour of segment ids: (H, W) int in [0, 2^24) -> (H, W, 3) uint8, id = R + 256 G + 256^2 B."""
    ids = np.asarray(ids)
    if ids.size and (ids.min() < 0 or ids.max() >= 1 << 24):
        raise ValueError("segment ids must be in [0, 2**24) to fit an RGB PNG")
    ids = ids.astype(np.uint32)
    rgb = np.empty(ids.shape + (3,), dtype=np.uint8)
    for channel in range(3):
        rgb[..., channel] = (ids >> (8 * channel)) & 0xFF
    return rgb


def rgb2id(rgb: np.ndarray) -> np.ndarray:
    """Segment ids of a COCO panoptic PNG: (H, W, 3) uint8 -> (H, W) int64, id = R + 256 G + 256^2 B."""
    rgb = np.asarray(rgb)
    if rgb.ndim < 1 or rgb.shape[-1] != 3:
        raise ValueError(f"expected (..., 3) colours, got shape {rgb.shape}")
    rgb = rgb.astype(np.int64)
    return rgb[..., 0] + (rgb[..., 1] << 8) + (rgb[..., 2] << 16)
