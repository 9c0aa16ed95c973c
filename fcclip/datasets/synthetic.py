"""Synthetic images: shapes on textured backgrounds, generated from a seed (no downloads, any size)."""
from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw


def _background(rng: np.random.Generator, height: int, width: int) -> np.ndarray:
    """A two-region background (sky-like gradient over a ground texture), as float RGB."""
    y = np.linspace(0, 1, height)[:, None, None]
    top = rng.uniform(60, 230, 3)
    bottom = rng.uniform(20, 200, 3)
    img = top * (1 - y) + bottom * y
    img = np.broadcast_to(img, (height, width, 3)).copy()
    horizon = int(height * rng.uniform(0.4, 0.7))
    ground = rng.uniform(30, 180, 3)
    stripes = 12 * np.sin(np.arange(width) / rng.uniform(3, 9))[None, :, None]
    img[horizon:] = ground + stripes + rng.normal(0, 8, (height - horizon, width, 3))
    return img


def synthetic_image(seed: int, height: int = 240, width: int = 320) -> np.ndarray:
    """(H, W, 3) uint8: a background plus a few ellipses, rectangles and triangles in random colours."""
    rng = np.random.default_rng(seed)
    img = Image.fromarray(np.clip(_background(rng, height, width), 0, 255).astype(np.uint8))
    draw = ImageDraw.Draw(img)
    for _ in range(int(rng.integers(2, 6))):
        color = tuple(int(c) for c in rng.integers(0, 256, 3))
        cx, cy = rng.uniform(0, width), rng.uniform(0, height)
        r = rng.uniform(0.05, 0.25) * min(height, width)
        kind = rng.integers(0, 3)
        if kind == 0:
            draw.ellipse([cx - r, cy - r * 0.7, cx + r, cy + r * 0.7], fill=color)
        elif kind == 1:
            draw.rectangle([cx - r, cy - r, cx + r * 0.6, cy + r * 1.2], fill=color)
        else:
            draw.polygon([(cx, cy - r), (cx - r, cy + r), (cx + r, cy + r)], fill=color)
    return np.asarray(img)


def write_images(out: str | Path, count: int = 4, size: tuple[int, int] = (240, 320), seed: int = 0) -> list[Path]:
    """Write ``count`` synthetic JPEGs ``synth_00000.jpg``... into ``out``; returns their paths."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    paths = []
    for i in range(count):
        path = out / f"synth_{i:05d}.jpg"
        Image.fromarray(synthetic_image(seed + i, *size)).save(path, quality=92)
        paths.append(path)
    return paths
