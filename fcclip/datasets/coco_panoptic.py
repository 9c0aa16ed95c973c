"""Reader of the COCO panoptic layout, the training data of FC-CLIP.

::

    ROOT/annotations/panoptic_{split}.json   images, annotations (segments_info per image), categories
    ROOT/panoptic_{split}/*.png              segment ids, id = R + 256 G + 256^2 B (0: unlabeled)
    ROOT/{split}/*.jpg                       the images

ROOT is a local folder or any fsspec URI (``s3://bucket/coco``, ``memory://...``). Categories keep the JSON's order:
a category's position is its contiguous class index, the index into the model's K classes (the reference does the
same with COCO's list, which is sorted by id).

Crowd segments (``iscrowd: 1``) are returned by `CocoPanoptic.load` with their flag; the reference drops them from
training targets, so their pixels are supervised by nothing but "no object" (see `fcclip.training.data`).
"""
from __future__ import annotations

import io
import json
import os
import posixpath
import re
from collections.abc import Iterable, Sequence
from typing import Any

import numpy as np
from PIL import Image

from fcclip.images import load_image
from fcclip.masks import rgb2id
from fcclip.vocabulary import Vocabulary, load_vocabulary

__all__ = ["CocoPanoptic", "filter_empty", "join_uri", "segments_to_masks"]

_URI = re.compile(r"^[A-Za-z][A-Za-z0-9+.\-]*://")


def join_uri(root: str | os.PathLike[str], *parts: str) -> str:
    """`root` / parts, for local paths (os.path) and fsspec URIs (always ``/``)."""
    root = os.fspath(root)
    if _URI.match(root):
        return posixpath.join(root.rstrip("/"), *parts)
    return os.path.join(root, *parts)


def _open(uri: str, mode: str = "rb"):
    if _URI.match(uri):
        import fsspec

        return fsspec.open(uri, mode)
    return open(uri, mode)


def filter_empty(records: Iterable[dict[str, Any]]) -> list[dict[str, Any]]:
    """The records with at least one non-crowd segment (detectron2's ``FILTER_EMPTY_ANNOTATIONS``)."""
    return [r for r in records if any(not s.get("iscrowd", 0) for s in r["segments_info"])]


class CocoPanoptic:
    """One split of a COCO-panoptic-layout dataset.

    Args:
        root: the dataset root (local path or fsspec URI).
        split: e.g. ``"train2017"`` or ``"val2017"``; names the JSON, the PNG folder and the image folder.

    Attributes:
        categories: the JSON's categories, each ``{"id", "name", "isthing", "color"?, ...}``, in the JSON's order.
        category_index: dataset category id -> contiguous class index.
    """

    def __init__(self, root: str | os.PathLike[str], split: str = "train2017"):
        self.root = os.fspath(root)
        self.split = split
        self.json_uri = join_uri(self.root, "annotations", f"panoptic_{split}.json")
        self.panoptic_dir = join_uri(self.root, f"panoptic_{split}")
        self.image_dir = join_uri(self.root, split)
        with _open(self.json_uri, "rb") as f:
            data = json.load(f)
        for key in ("annotations", "categories"):
            if key not in data:
                raise ValueError(f"{self.json_uri}: not a COCO panoptic file (no {key!r})")
        self.categories: list[dict[str, Any]] = data["categories"]
        self.category_index: dict[int, int] = {}
        for index, category in enumerate(self.categories):
            if category["id"] in self.category_index:
                raise ValueError(f"{self.json_uri}: duplicate category id {category['id']}")
            self.category_index[category["id"]] = index
        images = {image["id"]: image for image in data.get("images", [])}
        self._records = [self._record(annotation, images) for annotation in data["annotations"]]

    def _record(self, annotation: dict[str, Any], images: dict[int, dict[str, Any]]) -> dict[str, Any]:
        image_id = annotation["image_id"]
        image = images.get(image_id)
        if image is not None:
            file_name = image["file_name"]
        else:  # no "images" entry: COCO's convention, the PNG's stem with .jpg (as the reference assumes)
            file_name = posixpath.splitext(annotation["file_name"])[0] + ".jpg"
        for segment in annotation["segments_info"]:
            if segment["category_id"] not in self.category_index:
                raise ValueError(f"{self.json_uri}: image {image_id} has a segment of unknown category "
                                 f"{segment['category_id']}")
        return {
            "image_id": image_id,
            "image_uri": join_uri(self.image_dir, file_name),
            "panoptic_uri": join_uri(self.panoptic_dir, annotation["file_name"]),
            "height": image.get("height") if image else None,
            "width": image.get("width") if image else None,
            "segments_info": annotation["segments_info"],
        }

    def __len__(self) -> int:
        return len(self._records)

    def __getitem__(self, index: int) -> dict[str, Any]:
        return self._records[index]

    def records(self) -> list[dict[str, Any]]:
        """One dict per annotated image: ``image_id``, ``image_uri``, ``panoptic_uri``, ``height``, ``width``
        (None when the JSON has no "images" entry), ``segments_info`` (the JSON's: ``id``, ``category_id``,
        ``iscrowd``, ``bbox``, ``area``). Plain, picklable data."""
        return list(self._records)

    @property
    def num_classes(self) -> int:
        return len(self.categories)

    def vocabulary(self, synonyms: Vocabulary | str | None = None, name: str = "coco_panoptic") -> Vocabulary:
        """The categories as a training vocabulary, in the contiguous order.

        Args:
            synonyms: a vocabulary (or builtin name) whose categories give the names of the categories with the same
                id; other categories keep their JSON name. The reference trains on COCO with prompt-engineered
                names ("sky, clouds" for "sky-other-merged"): pass ``"coco_panoptic"`` to reproduce it.
            name: the vocabulary's name.
        """
        by_id = {}
        if synonyms is not None:
            by_id = {c.id: list(c.names) for c in load_vocabulary(synonyms).categories}
        entries = []
        for c in self.categories:
            entry: dict[str, Any] = {"id": c["id"], "names": by_id.get(c["id"], [c["name"]]),
                                     "isthing": int(bool(c.get("isthing", 1)))}
            if c.get("color") is not None:
                entry["color"] = list(c["color"])
            entries.append(entry)
        return Vocabulary.from_dict({"name": name, "categories": entries})

    def load(self, record: dict[str, Any]) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """Decode one image and its segments.

        Returns:
            image: (H, W, 3) uint8 RGB (EXIF orientation applied, as detectron2's `read_image`).
            masks: (N, H, W) bool, one per entry of ``segments_info`` (in order, crowd included).
            classes: (N,) int64 contiguous class indices.
            iscrowd: (N,) bool.
        Raises:
            ValueError: the image and its panoptic PNG differ in size.
        """
        image = load_image(record["image_uri"])
        with _open(record["panoptic_uri"], "rb") as f:
            png = Image.open(io.BytesIO(f.read()))
            ids = rgb2id(np.asarray(png.convert("RGB")))
        if ids.shape != image.shape[:2]:
            raise ValueError(f"{record['image_uri']} is {image.shape[1]}x{image.shape[0]} but its panoptic PNG "
                             f"{record['panoptic_uri']} is {ids.shape[1]}x{ids.shape[0]}")
        masks, classes, iscrowd = segments_to_masks(ids, record["segments_info"], self.category_index)
        return image, masks, classes, iscrowd


def segments_to_masks(ids: np.ndarray, segments_info: Sequence[dict[str, Any]],
                      category_index: dict[int, int]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Masks of the listed segments from an id map: (H, W) ids -> (N, H, W) bool, (N,) int64 classes, (N,) bool."""
    h, w = ids.shape
    masks = np.zeros((len(segments_info), h, w), dtype=bool)
    for i, segment in enumerate(segments_info):
        np.equal(ids, segment["id"], out=masks[i])
    classes = np.array([category_index[s["category_id"]] for s in segments_info], dtype=np.int64)
    iscrowd = np.array([bool(s.get("iscrowd", 0)) for s in segments_info], dtype=bool)
    return masks, classes, iscrowd
