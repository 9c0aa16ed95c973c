"""Mask encodings: COCO run-length encoding, boxes, and the COCO panoptic PNG colour encoding of segment ids."""
from __future__ import annotations

import warnings
from typing import TYPE_CHECKING

import numpy as np
import pycocotools.mask as mask_utils

if TYPE_CHECKING:  # torch is not imported at run time: readers of the output (show, export) do not need it
    from torch import Tensor

__all__ = ["decode_rle", "encode_rle", "id2rgb", "mask_to_bbox", "panoptic_columns", "rgb2id", "segment_bboxes"]


def _as_bool_mask(mask: np.ndarray | Tensor) -> np.ndarray:
    if hasattr(mask, "detach"):  # a torch tensor
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


def segment_bboxes(segment_map: np.ndarray | Tensor, ids: list[int] | np.ndarray) -> list[list[float]]:
    """`[x, y, w, h]` box of each segment id of a segment map, in one pass over the map.

    The same boxes as ``mask_to_bbox(segment_map == i)`` for each ``i`` in ``ids`` (an id absent from the map gets
    ``[0.0, 0.0, 0.0, 0.0]``), without a full-image comparison per segment.

    Args:
        segment_map: (H, W) non-negative integer ids.
        ids: the segment ids wanted.
    """
    if hasattr(segment_map, "detach"):  # a torch tensor
        segment_map = segment_map.detach().cpu().numpy()
    segment_map = np.asarray(segment_map)
    if segment_map.ndim != 2:
        raise ValueError(f"expected an (H, W) segment map, got shape {segment_map.shape}")
    ids = [int(i) for i in ids]
    if not ids:
        return []
    height, width = segment_map.shape
    if segment_map.size == 0:
        return [[0.0, 0.0, 0.0, 0.0] for _ in ids]
    if segment_map.min() < 0:
        raise ValueError("segment ids must be non-negative")
    values = None
    if int(segment_map.max()) < 4096:  # small ids (a predictor's 1..N): index by id directly
        index = segment_map.astype(np.intp, copy=False)
        count = int(segment_map.max()) + 1
    else:  # large ids (COCO panoptic's RGB-encoded ones): index by rank among the ids present
        values, inverse = np.unique(segment_map, return_inverse=True)
        index = inverse.reshape(segment_map.shape)
        count = values.size
    # rows[i, y]: id i occurs in row y; cols[i, x]: id i occurs in column x
    rows = np.zeros((count, height), dtype=bool)
    rows[index, np.arange(height)[:, None]] = True
    cols = np.zeros((count, width), dtype=bool)
    cols[index, np.arange(width)[None, :]] = True
    boxes = []
    for i in ids:
        if values is not None:
            at = int(np.searchsorted(values, i))
            i = at if at < values.size and values[at] == i else -1
        if not 0 <= i < count:
            boxes.append([0.0, 0.0, 0.0, 0.0])
            continue
        r = np.flatnonzero(rows[i])
        if r.size == 0:
            boxes.append([0.0, 0.0, 0.0, 0.0])
            continue
        c = np.flatnonzero(cols[i])
        x0, x1, y0, y1 = int(c[0]), int(c[-1]), int(r[0]), int(r[-1])
        boxes.append([float(x0), float(y0), float(x1 - x0 + 1), float(y1 - y0 + 1)])
    return boxes


def panoptic_columns(segment_map: np.ndarray, segments: list[dict]) -> dict:
    """One panoptic result -> its stored form: per segment COCO RLE (at the map's size), area and box [x, y, w, h].

    Returns {"area": [...], "bbox": [[...]], "size": (H, W), "counts": [str]} in the order of ``segments``. The map
    is run-length encoded once, column-major as COCO RLE wants it, and each segment's runs are taken from that single
    pass (not one full-size mask comparison per segment); pycocotools compresses them and derives areas and boxes.
    The strings are those ``pycocotools.mask.encode`` gives for each segment's mask.
    """
    h, w = (int(v) for v in segment_map.shape)
    if not segments:
        return {"area": [], "bbox": [], "size": (h, w), "counts": []}
    flat = np.asarray(segment_map).ravel(order="F")
    n = flat.size
    starts = np.concatenate([[0], np.flatnonzero(flat[1:] != flat[:-1]) + 1])
    lengths = np.diff(np.append(starts, n))
    values = flat[starts]
    order = np.argsort(values, kind="stable")  # runs grouped by segment id, in position order within each id
    ids = np.array([s["id"] for s in segments], dtype=np.int64)
    first = np.searchsorted(values[order], ids, side="left")
    last = np.searchsorted(values[order], ids, side="right")
    uncompressed = []
    for lo, hi in zip(first, last):
        run = order[lo:hi]
        begin, length = starts[run], lengths[run]
        counts = np.empty(2 * len(run) + 1, dtype=np.int64)
        counts[0:-1:2] = begin - np.concatenate([[0], begin[:-1] + length[:-1]])  # zeros before each run of ones
        counts[1::2] = length
        counts[-1] = n - (begin[-1] + length[-1]) if len(run) else n  # zeros after the last run
        if counts[-1] == 0 and len(run):
            counts = counts[:-1]
        uncompressed.append({"size": [h, w], "counts": counts.tolist()})
    rles = mask_utils.frPyObjects(uncompressed, h, w)
    areas = mask_utils.area(rles)
    boxes = mask_utils.toBbox(rles)
    return {
        "area": [int(a) for a in areas],
        "bbox": [[float(v) for v in box] for box in boxes],
        "size": (h, w),
        "counts": [r["counts"].decode("ascii") for r in rles],
    }


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
