"""A panoptic overlay a person can look at: coloured segments, their boundaries and labels over the image."""
from __future__ import annotations

import colorsys
from collections.abc import Sequence
from functools import lru_cache

import numpy as np
from PIL import Image, ImageDraw, ImageFont
from scipy import ndimage

__all__ = ["draw_panoptic"]


@lru_cache(maxsize=16)
def _font(size: int) -> ImageFont.ImageFont | ImageFont.FreeTypeFont:
    try:
        return ImageFont.load_default(size=size)
    except (TypeError, OSError):  # Pillow < 10.1, or built without FreeType: fixed-size bitmap font
        return ImageFont.load_default()


def _fallback_color(segment_id: int) -> tuple[int, int, int]:
    """A stable, saturated colour for a segment that brings none."""
    hue = (segment_id * 0.618033988749895) % 1.0
    r, g, b = colorsys.hsv_to_rgb(hue, 0.65, 0.95)
    return int(r * 255), int(g * 255), int(b * 255)


def _label_text(segment: dict) -> str:
    text = str(segment.get("label", segment["id"]))
    score = segment.get("score")
    if score is not None:
        text = f"{text} {float(score):.2f}"
    return text


def _label_anchor(mask: np.ndarray) -> tuple[int, int]:
    """(row, col) of the mask pixel farthest from the mask's edge (the image border counts as edge)."""
    rows = np.flatnonzero(mask.any(axis=1))
    cols = np.flatnonzero(mask.any(axis=0))
    r0, r1, c0, c1 = rows[0], rows[-1] + 1, cols[0], cols[-1] + 1
    crop = np.pad(mask[r0:r1, c0:c1], 1)
    distance = ndimage.distance_transform_edt(crop)
    r, c = np.unravel_index(int(np.argmax(distance)), distance.shape)
    return int(r0 + r - 1), int(c0 + c - 1)


def draw_panoptic(
    image: np.ndarray,
    segment_map: np.ndarray,
    segments: Sequence[dict],
    *,
    alpha: float = 0.5,
) -> Image.Image:
    """Overlay a panoptic segmentation on its image.

    Each segment's colour is blended over its pixels (`alpha` = weight of the colour), a thin dark line marks
    the segment's boundary (drawn on the segment's own pixels), and its label ("dog 0.87" when the segment has a
    score) is written on a small box of the segment's colour at the segment's most interior pixel. Pixels of no
    listed segment are left as they are, except under label boxes. Segments absent from the map are skipped.

    Args:
        image: (H, W, 3) uint8 RGB (an (H, W) grey image is accepted).
        segment_map: (H, W) int segment id per pixel.
        segments: dicts with `id` (int), `label` (str), `color` ((r, g, b), 0..255) and optionally `score`
            (float); other keys are ignored.
        alpha: opacity of the segment colours, in [0, 1].

    Returns:
        An RGB PIL image of size (W, H).
    """
    image = np.asarray(image)
    if image.ndim == 2:
        image = np.repeat(image[..., None], 3, axis=-1)
    if image.ndim != 3 or image.shape[-1] != 3:
        raise ValueError(f"image must be (H, W, 3), got shape {image.shape}")
    segment_map = np.asarray(segment_map)
    if segment_map.shape != image.shape[:2]:
        raise ValueError(f"segment_map shape {segment_map.shape} does not match the image's {image.shape[:2]}")
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha must be in [0, 1], got {alpha}")
    image = image.astype(np.uint8, copy=False)
    height, width = segment_map.shape

    present = set(np.unique(segment_map).tolist())
    drawn, seen = [], set()
    for segment in segments:  # the first entry of an id wins
        segment_id = int(segment["id"])
        if segment_id in present and segment_id not in seen:
            drawn.append(segment)
            seen.add(segment_id)
    if not drawn:
        return Image.fromarray(image.copy(), mode="RGB")

    ids = np.array([int(s["id"]) for s in drawn], dtype=np.int64)
    colors = np.array(
        [s["color"] if s.get("color") is not None else _fallback_color(int(s["id"])) for s in drawn],
        dtype=np.float32,
    ).reshape(-1, 3).round().clip(0, 255)

    # Which drawn segment each pixel belongs to (-1 for none), by sorted lookup (ids may be up to 2^24).
    order = np.argsort(ids, kind="stable")
    sorted_ids = ids[order]
    position = np.searchsorted(sorted_ids, segment_map).clip(0, len(ids) - 1)
    owner = np.where(sorted_ids[position] == segment_map, order[position], -1)
    covered = owner >= 0

    out = image.astype(np.float32)
    out[covered] = (1.0 - alpha) * out[covered] + alpha * colors[owner[covered]]

    # Boundaries: segment pixels with a 4-neighbour of another id; a little thicker on large images.
    edge = np.zeros((height, width), dtype=bool)
    vertical = segment_map[1:, :] != segment_map[:-1, :]
    horizontal = segment_map[:, 1:] != segment_map[:, :-1]
    edge[1:, :] |= vertical
    edge[:-1, :] |= vertical
    edge[:, 1:] |= horizontal
    edge[:, :-1] |= horizontal
    thickness = 1 + min(height, width) // 600
    if thickness > 1:
        edge = ndimage.binary_dilation(edge, iterations=thickness - 1)
    edge &= covered
    out[edge] = 0.35 * colors[owner[edge]]

    result = Image.fromarray(out.round().clip(0, 255).astype(np.uint8), mode="RGB")
    _draw_labels(result, owner, drawn, colors)
    return result


def _draw_labels(canvas: Image.Image, owner: np.ndarray, segments: list[dict], colors: np.ndarray) -> None:
    """Write each segment's label; `owner` (H, W) is the index into `segments` of each pixel's segment, or -1."""
    width, height = canvas.size
    font = _font(int(np.clip(round(min(height, width) / 40), 9, 40)))
    draw = ImageDraw.Draw(canvas)
    pad = max(1, round(getattr(font, "size", 10) / 6))
    # Large segments first, so the labels of small ones are drawn on top.
    areas = np.bincount(owner[owner >= 0], minlength=len(segments))
    for index in sorted(range(len(segments)), key=lambda i: -areas[i]):
        segment = segments[index]
        text = _label_text(segment)
        left, top, right, bottom = draw.textbbox((0, 0), text, font=font)
        box_w, box_h = right - left + 2 * pad, bottom - top + 2 * pad
        if box_w > width or box_h > height:
            continue  # the image is too small for a readable label
        row, col = _label_anchor(owner == index)
        x0 = int(np.clip(col - box_w // 2, 0, width - box_w))
        y0 = int(np.clip(row - box_h // 2, 0, height - box_h))
        fill = tuple(int(v) for v in colors[index])
        luminance = 0.299 * fill[0] + 0.587 * fill[1] + 0.114 * fill[2]
        text_color = (0, 0, 0) if luminance > 140 else (255, 255, 255)
        draw.rectangle((x0, y0, x0 + box_w - 1, y0 + box_h - 1), fill=fill, outline=(0, 0, 0))
        draw.text((x0 + pad - left, y0 + pad - top), text, font=font, fill=text_color)
