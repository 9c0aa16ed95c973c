"""A small synthetic dataset in the exact COCO panoptic layout, generated from a seed (no downloads).

Each image has stuff (sky above a horizon; grass, pavement or both below) and 1-4 things (person: tall ellipse,
car: wide rectangle, dog: wide ellipse), each class with its own colour and texture so that a model can learn them
in a few hundred steps; things occlude each other. Some images have a thin unlabeled band at the horizon (id 0,
as COCO's void) and a small crowd segment (a group of little people, ``iscrowd: 1``). Categories are real COCO
panoptic ids, names and colours, so a model trained here uses COCO's class indices for those classes.

Written with `write_coco_panoptic` (or ``fcclip synth coco-panoptic``); read with
`fcclip.datasets.coco_panoptic.CocoPanoptic`. Image i of a split depends only on (seed, split, i).
"""
from __future__ import annotations

import argparse
import json
import sys
import zlib
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from fcclip.masks import id2rgb, mask_to_bbox

__all__ = ["CATEGORIES", "add_arguments", "synth_coco_panoptic_main", "synthetic_panoptic_image",
           "write_coco_panoptic"]

CATEGORIES: list[dict[str, Any]] = [
    {"id": 1, "name": "person", "isthing": 1, "color": [220, 20, 60], "supercategory": "person"},
    {"id": 3, "name": "car", "isthing": 1, "color": [0, 0, 142], "supercategory": "vehicle"},
    {"id": 18, "name": "dog", "isthing": 1, "color": [0, 226, 252], "supercategory": "animal"},
    {"id": 187, "name": "sky-other-merged", "isthing": 0, "color": [70, 130, 180], "supercategory": "sky"},
    {"id": 191, "name": "pavement-merged", "isthing": 0, "color": [96, 96, 96], "supercategory": "ground"},
    {"id": 193, "name": "grass-merged", "isthing": 0, "color": [152, 251, 152], "supercategory": "plant"},
]
"""COCO panoptic categories (ids, names, colours as in COCO) used by the generator, in contiguous order."""

_PERSON, _CAR, _DOG, _SKY, _PAVEMENT, _GRASS = (1, 3, 18, 187, 191, 193)
# Appearance of each class: mean RGB (distinct from each other and from the stuff).
_APPEARANCE = {
    _PERSON: (200, 40, 50),
    _CAR: (30, 40, 150),
    _DOG: (150, 100, 40),
    _SKY: (120, 170, 230),
    _PAVEMENT: (110, 110, 110),
    _GRASS: (60, 150, 50),
}
_MIN_THING_AREA = 24  # pixels; smaller visible remains of an occluded thing become unlabeled


def synthetic_panoptic_image(rng: np.random.Generator, height: int = 256, width: int = 320
                             ) -> tuple[np.ndarray, np.ndarray, list[dict[str, Any]]]:
    """One synthetic image with its panoptic annotation.

    Returns:
        image: (H, W, 3) uint8.
        ids: (H, W) int64 segment ids (0: unlabeled).
        segments_info: COCO's per-segment dicts: ``id``, ``category_id``, ``iscrowd``, ``bbox`` [x, y, w, h],
            ``area``.
    """
    h, w = height, width
    yy, xx = np.mgrid[0:h, 0:w]
    index = np.zeros((h, w), dtype=np.int32)  # segment index + 1, 0 = unlabeled
    segments: list[dict[str, Any]] = []  # {"category_id", "iscrowd"} in index order

    def add(category_id: int, mask: np.ndarray, iscrowd: int = 0) -> None:
        segments.append({"category_id": category_id, "iscrowd": iscrowd})
        index[mask] = len(segments)

    # Stuff: sky above the horizon, grass and/or pavement below.
    horizon = int(h * rng.uniform(0.35, 0.65))
    add(_SKY, yy < horizon)
    ground = rng.choice([_GRASS, _PAVEMENT, -1])  # -1: both, split at a random column
    if ground == -1:
        split = int(w * rng.uniform(0.3, 0.7))
        left, right = (_GRASS, _PAVEMENT) if rng.uniform() < 0.5 else (_PAVEMENT, _GRASS)
        add(left, (yy >= horizon) & (xx < split))
        add(right, (yy >= horizon) & (xx >= split))
    else:
        add(int(ground), yy >= horizon)
    if rng.uniform() < 0.5:
        index[max(horizon - 1, 0): horizon + 1] = 0  # an unlabeled band

    # Things, later ones in front.
    side = min(h, w)
    for _ in range(int(rng.integers(1, 5))):
        category_id = int(rng.choice([_PERSON, _CAR, _DOG]))
        cy, cx = rng.uniform(0.15, 0.9) * h, rng.uniform(0.05, 0.95) * w
        size = rng.uniform(0.08, 0.22) * side
        if category_id == _PERSON:
            mask = ((xx - cx) / (0.45 * size)) ** 2 + ((yy - cy) / (1.1 * size)) ** 2 <= 1
        elif category_id == _DOG:
            mask = ((xx - cx) / (1.0 * size)) ** 2 + ((yy - cy) / (0.55 * size)) ** 2 <= 1
        else:
            mask = (np.abs(xx - cx) <= 1.2 * size) & (np.abs(yy - cy) <= 0.5 * size)
        add(category_id, mask)

    # Sometimes a small crowd: a few little people, annotated as one crowd segment.
    if rng.uniform() < 0.35:
        cy, cx = rng.uniform(0.2, 0.8) * h, rng.uniform(0.1, 0.9) * w
        r = 0.025 * side
        crowd = np.zeros((h, w), dtype=bool)
        for k in range(int(rng.integers(3, 6))):
            px = cx + (k - 2) * 2.2 * r
            crowd |= ((xx - px) / r) ** 2 + ((yy - cy) / (2.2 * r)) ** 2 <= 1
        add(_PERSON, crowd, iscrowd=1)

    # Segments that ended up (nearly) hidden become unlabeled; fresh, unique random ids as COCO's.
    image = np.zeros((h, w, 3), dtype=np.float64)
    ids = np.zeros((h, w), dtype=np.int64)
    segments_info = []
    used: set[int] = set()
    for k, segment in enumerate(segments, start=1):
        mask = index == k
        area = int(mask.sum())
        if area == 0 or (segment["category_id"] in (_PERSON, _CAR, _DOG) and area < _MIN_THING_AREA
                         and not segment["iscrowd"]):
            continue
        segment_id = int(rng.integers(1, 1 << 24))
        while segment_id in used:
            segment_id = int(rng.integers(1, 1 << 24))
        used.add(segment_id)
        ids[mask] = segment_id
        image[mask] = _texture(rng, segment["category_id"], yy[mask], xx[mask], h, w)
        segments_info.append({
            "id": segment_id,
            "category_id": segment["category_id"],
            "iscrowd": segment["iscrowd"],
            "bbox": [int(v) for v in mask_to_bbox(mask)],
            "area": area,
        })
    void = ids == 0
    image[void] = 20 + rng.normal(0, 4, (int(void.sum()), 3))
    return np.clip(np.rint(image), 0, 255).astype(np.uint8), ids, segments_info


def _texture(rng: np.random.Generator, category_id: int, y: np.ndarray, x: np.ndarray, h: int, w: int
             ) -> np.ndarray:
    """(P, 3) colours of one segment's pixels: its class's colour, jittered per segment, with a class texture."""
    base = np.asarray(_APPEARANCE[category_id], dtype=np.float64) + rng.uniform(-15, 15, 3)
    shade = np.zeros(y.shape)
    if category_id == _SKY:
        shade = 30 * (y / h - 0.5)  # brighter towards the horizon
    elif category_id == _GRASS:
        shade = 12 * np.sin(x / rng.uniform(2, 4) + y / 3.0)
    elif category_id == _PAVEMENT:
        shade = 10 * ((x // 16 + y // 16) % 2)  # slabs
    elif category_id == _CAR:
        shade = -20 * ((y % 12) < 3)  # windows band
    else:  # person, dog: soft vertical shading
        shade = 15 * np.cos(x / 9.0)
    colour = base[None, :] + shade[:, None] + rng.normal(0, 5, (len(y), 3))
    return colour


def write_coco_panoptic(
    root: str | Path,
    num_images: int,
    seed: int = 0,
    size: tuple[int, int] = (256, 320),
    split: str = "train2017",
    also_val: bool = True,
    *,
    num_val: int | None = None,
    val_split: str = "val2017",
) -> dict[str, Path]:
    """Write a synthetic dataset in the COCO panoptic layout.

    ::

        root/annotations/panoptic_{split}.json, root/panoptic_{split}/NNNNNNNNNNNN.png, root/{split}/NNNNNNNNNNNN.jpg

    Args:
        root: the dataset root (created).
        num_images: images of `split`.
        seed: everything is determined by it.
        size: (H, W) of every image.
        split: the training split's name.
        also_val: also write `val_split` with `num_val` images (default: a quarter of `num_images`, at least 1).
    Returns:
        split name -> its annotation JSON path.
    """
    root = Path(root)
    splits = {split: num_images}
    if also_val:
        splits[val_split] = max(1, num_images // 4) if num_val is None else num_val
    written = {}
    for split_number, (name, count) in enumerate(splits.items()):
        written[name] = _write_split(root, name, count, seed, size, first_id=1 + 1_000_000 * split_number)
    return written


def _write_split(root: Path, split: str, count: int, seed: int, size: tuple[int, int], first_id: int) -> Path:
    image_dir, png_dir, ann_dir = root / split, root / f"panoptic_{split}", root / "annotations"
    for d in (image_dir, png_dir, ann_dir):
        d.mkdir(parents=True, exist_ok=True)
    height, width = (int(v) for v in size)
    images, annotations = [], []
    split_key = zlib.crc32(split.encode())
    for i in range(count):
        rng = np.random.default_rng([seed, split_key, i])
        image, ids, segments_info = synthetic_panoptic_image(rng, height, width)
        image_id = first_id + i
        stem = f"{image_id:012d}"
        Image.fromarray(image).save(image_dir / f"{stem}.jpg", quality=92)
        Image.fromarray(id2rgb(ids)).save(png_dir / f"{stem}.png")
        images.append({"id": image_id, "file_name": f"{stem}.jpg", "height": height, "width": width})
        annotations.append({"image_id": image_id, "file_name": f"{stem}.png", "segments_info": segments_info})
    data = {
        "info": {"description": "fcclip synthetic COCO panoptic", "version": "1.0"},
        "licenses": [],
        "images": images,
        "annotations": annotations,
        "categories": CATEGORIES,
    }
    path = ann_dir / f"panoptic_{split}.json"
    path.write_text(json.dumps(data))
    return path


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The flags of ``fcclip synth coco-panoptic``."""
    parser.add_argument("--out", required=True, help="dataset root (COCO panoptic layout)")
    parser.add_argument("--images", type=int, default=16, help="training images; val2017 gets a quarter (>= 1)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--size", type=int, nargs=2, default=(256, 320), metavar=("H", "W"), help="image size")


def synth_coco_panoptic_main(args: argparse.Namespace) -> int:
    """``fcclip synth coco-panoptic --out ROOT --images N [--seed S] [--size H W]``."""
    if args.images < 1:
        print("--images must be at least 1", file=sys.stderr)
        return 2
    size = tuple(args.size) if getattr(args, "size", None) else (256, 320)
    written = write_coco_panoptic(args.out, args.images, seed=getattr(args, "seed", 0), size=size)
    for split, path in written.items():
        n = len(json.loads(path.read_text())["images"])
        print(f"{split}: {n} image(s), annotations {path}")
    return 0
