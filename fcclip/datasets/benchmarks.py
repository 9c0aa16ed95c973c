"""Readers of the zero-shot benchmarks of FC-CLIP, each in the on-disk layout the reference prepares.

`open_benchmark(name, root)` gives a `BenchmarkDataset`: its `records()` (one light, picklable `EvalRecord` per
validation image) and, per record, `load_image`, `load_panoptic` (segment-id map and segments, dataset category ids)
and `load_semantic` (contiguous class indices, the ignore label elsewhere). `BENCHMARKS` says which metrics each
benchmark reports in the paper and at which resolution the reference tests it.

ROOT is the folder the reference calls ``$DETECTRON2_DATASETS`` (a local path or an fsspec URI) and each dataset sits
in its usual sub-folder (``coco/``, ``ADEChallengeData2016/``, ...); ROOT may also be that dataset folder itself. The
folders tried, in order, are listed below; the first holding the dataset's marker file wins.

COCO panoptic val2017 (``coco/``; PQ, AP, mIoU; 133 classes)::

    annotations/panoptic_val2017.json         COCO panoptic format: images, annotations, categories (dataset ids)
    panoptic_val2017/<stem>.png               segment ids, id = R + 256 G + 256^2 B
    val2017/<stem>.jpg                        the images (named by the PNG's stem, as the reference does)
    panoptic_semseg_val2017/<stem>.png        semantic maps, 0..132 in the vocabulary's order (sorted by id), 255
                                              unlabeled (prepare_coco_semantic_annos_from_panoptic_annos.py)
    annotations/instances_val2017.json        the instance annotations the reference's AP reads (`instances_uri`)

  Without ``panoptic_semseg_val2017/`` the semantic map is derived from the panoptic PNG exactly as that script
  does: every listed segment, crowd included, paints its category's contiguous index; other pixels are 255.

ADE20K-150 (``ADEChallengeData2016/``; PQ, AP, mIoU)::

    ade20k_panoptic_val.json                  made by prepare_ade20k_pan_seg.py: category ids 0..149
    ade20k_panoptic_val/<stem>.png            segment ids
    images/validation/<stem>.jpg
    annotations_detectron2/validation/<stem>.png   prepare_ade20k_sem_seg.py: 0..149, 255 unlabeled
    ade20k_instance_val.json                  for AP (`instances_uri`)

Cityscapes (``cityscapes/``; PQ, AP, mIoU; tested at 1024 / 2560)::

    gtFine/cityscapes_panoptic_val.json       cityscapesScripts createPanopticImgs.py: label ids (7 road, ..., 33)
    gtFine/cityscapes_panoptic_val/<id>_gtFine_panoptic.png
    leftImg8bit/val/<city>/<id>_leftImg8bit.png    <id> = <city>_<seq>_<frame>
    gtFine/val/<city>/<id>_gtFine_labelTrainIds.png  createTrainIdLabelImgs.py: train ids 0..18, 255 unlabeled

  The image of an annotation is found from its image id (the city is the id less its last two fields) rather than
  by listing every city folder, as the reference does; the two agree on the official layout. The reference's
  semantic metric (CityscapesSemSegEvaluator) compares label ids on ``*_gtFine_labelIds.png``, which gives the same
  confusion matrix as train ids; when a ``labelTrainIds`` file is missing, `load_semantic` reads the ``labelIds``
  file and maps label ids to the 19 classes (every other id unlabeled). ``extra`` has ``label_ids_uri`` and
  ``instance_ids_uri`` (the ``*_gtFine_instanceIds.png`` the reference's AP reads).

Mapillary Vistas v1.2 (``mapillary_vistas/``; PQ, mIoU; tested at 1024 / 2560)::

    validation/panoptic/panoptic_2018.json    category ids 1..65
    validation/panoptic/<stem>.png
    validation/images/<stem>.jpg
    validation/labels/<stem>.png              8-bit palette PNG, index 0..64 = contiguous class, 65 = unlabeled

  The reference evaluates these labels with its ignore label 65; here they come back with 255 (`spec.ignore_label`).

ADE20K-847 (``ADE20K_2021_17_01/``, or ``ade/ADE20K_2021_17_01/`` where prepare_ade20k_full_sem_seg.py writes it;
the reference's registration reads the former; mIoU)::

    images_detectron2/validation/<stem>.jpg
    annotations_detectron2/validation/<stem>.tif   16-bit train ids 0..846, 65535 unlabeled

Pascal Context 59 / 459 (``pascal_ctx_d2/``, made by prepare_pascal_ctx_sem_seg.py and
prepare_pascal_ctx_full_sem_seg.py from ``VOCdevkit/VOC2010``; mIoU)::

    images/validation/<stem>.jpg
    annotations_ctx59/validation/<stem>.png    0..58, 255 unlabeled
    annotations_ctx459/validation/<stem>.tif   16-bit 0..458, 65535 unlabeled

Pascal VOC 20 / 21 (``pascal_voc_d2/``, made by prepare_pascal_voc_sem_seg.py from ``VOCdevkit/VOC2012``; mIoU)::

    images/validation/<stem>.jpg
    annotations_pascal21/validation/<stem>.png   0 background, 1..20, 255 boundary (VOC's SegmentationClass)
    annotations_pascal20/validation/<stem>.png   0..19 (background made 255), 255

  The reference's PAS-20 class list is its PAS-21 list without the background class; there is no builtin
  ``pascal_voc_20`` vocabulary file, so `benchmark_vocabulary` builds it that way.

Semantic-only datasets pair images with label maps as detectron2's ``load_sem_seg`` does: by file stem, over the
two folders' listings (not recursive), sorted; images without a label map are left out.

Label maps are converted to contiguous class indices, the positions in the benchmark's vocabulary, which are the
indices the reference's evaluators use: values already contiguous (ADE-150, COCO, Pascal, Mapillary), or train ids
mapped through the vocabulary's ``trainId`` (Cityscapes, ADE-847, where they coincide with the positions). The
dataset's own unlabeled value becomes `BenchmarkSpec.ignore_label`: 255, or 65535 for the benchmarks with more
than 255 classes. Any other value is an error (the reference's evaluator would fail or miscount on it).

Test resolution: the reference's eval configs set ``INPUT.MIN_SIZE_TEST`` / ``MAX_SIZE_TEST`` only for Cityscapes
and Mapillary Vistas (1024 / 2560); the others keep detectron2's defaults, 800 / 1333.
"""
from __future__ import annotations

import io
import json
import os
import posixpath
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from PIL import Image

from fcclip.datasets.coco_panoptic import join_uri
from fcclip.images import load_image
from fcclip.masks import rgb2id
from fcclip.vocabulary import Vocabulary, load_vocabulary

__all__ = [
    "BENCHMARKS",
    "BenchmarkDataset",
    "BenchmarkSpec",
    "EvalRecord",
    "benchmark_vocabulary",
    "list_benchmarks",
    "open_benchmark",
]

_URI = re.compile(r"^[A-Za-z][A-Za-z0-9+.\-]*://")
_TASKS = ("panoptic", "instance", "semantic")


@dataclass(frozen=True)
class BenchmarkSpec:
    """What a benchmark is evaluated on and how.

    Attributes:
        name: the benchmark, e.g. ``"ade20k_150"``.
        vocabulary: its vocabulary (`benchmark_vocabulary(name)`); a builtin name except ``"pascal_voc_20"``.
        tasks: the metrics the paper reports on it, among ``("panoptic", "instance", "semantic")`` (PQ, AP, mIoU).
        short_edge: test-time resize of the short edge (``INPUT.MIN_SIZE_TEST`` of the reference's eval config).
        max_size: the long edge's limit (``INPUT.MAX_SIZE_TEST``).
        ignore_label: the value of unlabeled pixels in `BenchmarkDataset.load_semantic`'s maps.
    """

    name: str
    vocabulary: str
    tasks: tuple[str, ...]
    short_edge: int
    max_size: int
    ignore_label: int = 255

    def __post_init__(self) -> None:
        unknown = [t for t in self.tasks if t not in _TASKS]
        if unknown or not self.tasks:
            raise ValueError(f"{self.name}: tasks must be a non-empty subset of {_TASKS}, got {self.tasks}")


_PQ_AP_MIOU = ("panoptic", "instance", "semantic")
_MIOU = ("semantic",)

BENCHMARKS: dict[str, BenchmarkSpec] = {
    spec.name: spec
    for spec in (
        BenchmarkSpec("coco_panoptic", "coco_panoptic", _PQ_AP_MIOU, 800, 1333),
        BenchmarkSpec("ade20k_150", "ade20k_150", _PQ_AP_MIOU, 800, 1333),
        BenchmarkSpec("cityscapes", "cityscapes", _PQ_AP_MIOU, 1024, 2560),
        BenchmarkSpec("mapillary_vistas", "mapillary_vistas", ("panoptic", "semantic"), 1024, 2560),
        BenchmarkSpec("ade20k_847", "ade20k_847", _MIOU, 800, 1333, ignore_label=65535),
        BenchmarkSpec("pascal_ctx_59", "pascal_ctx_59", _MIOU, 800, 1333),
        BenchmarkSpec("pascal_ctx_459", "pascal_ctx_459", _MIOU, 800, 1333, ignore_label=65535),
        BenchmarkSpec("pascal_voc_20", "pascal_voc_20", _MIOU, 800, 1333),
        BenchmarkSpec("pascal_voc_21", "pascal_voc_21", _MIOU, 800, 1333),
    )
}


def list_benchmarks() -> list[str]:
    """The benchmark names, in the paper's order."""
    return list(BENCHMARKS)


def benchmark_vocabulary(name: str) -> Vocabulary:
    """The vocabulary of benchmark (or vocabulary) `name`; ``"pascal_voc_20"`` is ``pascal_voc_21`` less background."""
    vocabulary = BENCHMARKS[name].vocabulary if name in BENCHMARKS else name
    if vocabulary == "pascal_voc_20":
        full = load_vocabulary("pascal_voc_21")
        if full.categories[0].names[0] != "background":
            raise ValueError("pascal_voc_21's first class is not 'background'; cannot derive pascal_voc_20")
        return Vocabulary(name="pascal_voc_20", categories=full.categories[1:])
    return load_vocabulary(vocabulary)


@dataclass
class EvalRecord:
    """One validation image. Plain, picklable data; URIs are local paths or fsspec URIs.

    Attributes:
        image_id: the dataset's image id, as text.
        image_uri: the image.
        height, width: from the annotation file, None where it has none.
        panoptic_uri: the COCO-panoptic PNG of segment ids, None for semantic-only benchmarks.
        segments_info: the annotation's segments (``id``, ``category_id`` as a dataset id, ``iscrowd``, ...).
        semantic_uri: the semantic label map, None where it is derived from the panoptic PNG (COCO without
            ``panoptic_semseg_val2017``).
        extra: dataset-specific paths (Cityscapes: ``label_ids_uri``, ``instance_ids_uri``).
    """

    image_id: str
    image_uri: str
    height: int | None
    width: int | None
    panoptic_uri: str | None
    segments_info: list | None
    semantic_uri: str | None
    extra: dict = field(default_factory=dict)


# ------------------------------------------------------------------------------------------------------------------
# Files, local or fsspec


def _fs(uri: str):
    import fsspec

    return fsspec.core.url_to_fs(uri)


def _open(uri: str):
    if _URI.match(uri):
        import fsspec

        return fsspec.open(uri, "rb")
    return open(uri, "rb")


def _exists(uri: str) -> bool:
    if _URI.match(uri):
        fs, path = _fs(uri)
        return bool(fs.exists(path))
    return os.path.exists(uri)


def _listdir(uri: str) -> list[str]:
    """File names (no folders) directly inside the folder `uri`."""
    if _URI.match(uri):
        fs, path = _fs(uri)
        if not fs.isdir(path):
            raise FileNotFoundError(uri)
        return sorted(posixpath.basename(e["name"].rstrip("/")) for e in fs.ls(path, detail=True)
                      if e.get("type") != "directory")
    return sorted(e.name for e in os.scandir(uri) if e.is_file())


def _read_json(uri: str) -> dict[str, Any]:
    with _open(uri) as f:
        return json.load(f)


def _read_label_map(uri: str) -> np.ndarray:
    """(H, W) integer values of a single-channel label image (8-bit, palette indices, or 16-bit TIFF/PNG)."""
    with _open(uri) as f:
        data = f.read()
    with Image.open(io.BytesIO(data)) as im:
        if im.mode not in ("L", "P", "I", "I;16", "I;16L", "I;16B", "I;16N"):
            raise ValueError(f"{uri}: a label map must be a single-channel image, got mode {im.mode}")
        values = np.asarray(im)
    if values.ndim != 2:
        raise ValueError(f"{uri}: a label map must be (H, W), got shape {values.shape}")
    return values


def _read_panoptic_png(uri: str) -> np.ndarray:
    with _open(uri) as f:
        data = f.read()
    with Image.open(io.BytesIO(data)) as im:
        return rgb2id(np.asarray(im.convert("RGB")))


def _lookup(raw: np.ndarray, table: np.ndarray, uri: str) -> np.ndarray:
    """`table[raw]`, where -1 entries and values past the table are label values the dataset does not define."""
    raw = raw.astype(np.int64, copy=False)
    if raw.size and (raw.min() < 0 or raw.max() >= len(table)):
        bad = np.unique(raw[(raw < 0) | (raw >= len(table))])
        raise ValueError(f"{uri}: unexpected label values {bad[:10].tolist()}")
    out = table[raw]
    if (out < 0).any():
        raise ValueError(f"{uri}: unexpected label values {np.unique(raw[out < 0])[:10].tolist()}")
    return out


# ------------------------------------------------------------------------------------------------------------------
# Layouts


@dataclass(frozen=True)
class _Layout:
    """Where a benchmark's files are, relative to its dataset folder (paths use ``/``)."""

    folders: tuple[str, ...]           # where the dataset folder may sit under ROOT, in order ("" is ROOT itself)
    marker: str                        # a file or folder that identifies the dataset folder
    image_dir: str
    semantic_dir: str | None
    semantic_void: int                 # the label maps' unlabeled value
    semantic_ext: str = ".png"
    image_ext: str = ".jpg"
    panoptic_json: str | None = None
    panoptic_dir: str | None = None
    instances_json: str | None = None  # COCO-format instances for AP, where the reference reads one
    derive_semantic: bool = False      # semantic maps from the panoptic PNG when `semantic_dir` is absent


_LAYOUTS: dict[str, _Layout] = {
    "coco_panoptic": _Layout(
        ("coco", ""), "annotations/panoptic_val2017.json", "val2017", "panoptic_semseg_val2017", 255,
        panoptic_json="annotations/panoptic_val2017.json", panoptic_dir="panoptic_val2017",
        instances_json="annotations/instances_val2017.json", derive_semantic=True),
    "ade20k_150": _Layout(
        ("ADEChallengeData2016", ""), "ade20k_panoptic_val.json", "images/validation",
        "annotations_detectron2/validation", 255,
        panoptic_json="ade20k_panoptic_val.json", panoptic_dir="ade20k_panoptic_val",
        instances_json="ade20k_instance_val.json"),
    "cityscapes": _Layout(
        ("cityscapes", ""), "gtFine/cityscapes_panoptic_val.json", "leftImg8bit/val", "gtFine/val", 255,
        image_ext=".png", panoptic_json="gtFine/cityscapes_panoptic_val.json",
        panoptic_dir="gtFine/cityscapes_panoptic_val"),
    "mapillary_vistas": _Layout(
        ("mapillary_vistas", ""), "validation/panoptic/panoptic_2018.json", "validation/images",
        "validation/labels", 65,
        panoptic_json="validation/panoptic/panoptic_2018.json", panoptic_dir="validation/panoptic"),
    "ade20k_847": _Layout(
        ("ADE20K_2021_17_01", "ade/ADE20K_2021_17_01", ""), "annotations_detectron2/validation",
        "images_detectron2/validation", "annotations_detectron2/validation", 65535, semantic_ext=".tif"),
    "pascal_ctx_59": _Layout(
        ("pascal_ctx_d2", ""), "annotations_ctx59/validation", "images/validation",
        "annotations_ctx59/validation", 255),
    "pascal_ctx_459": _Layout(
        ("pascal_ctx_d2", ""), "annotations_ctx459/validation", "images/validation",
        "annotations_ctx459/validation", 65535, semantic_ext=".tif"),
    "pascal_voc_20": _Layout(
        ("pascal_voc_d2", ""), "annotations_pascal20/validation", "images/validation",
        "annotations_pascal20/validation", 255),
    "pascal_voc_21": _Layout(
        ("pascal_voc_d2", ""), "annotations_pascal21/validation", "images/validation",
        "annotations_pascal21/validation", 255),
}


def _join(root: str, relative: str) -> str:
    return join_uri(root, *relative.split("/")) if relative else root


def _find_dataset(name: str, root: str, layout: _Layout) -> str:
    tried = []
    for folder in layout.folders:
        candidate = _join(root, folder)
        marker = _join(candidate, layout.marker)
        if _exists(marker):
            return candidate
        tried.append(marker)
    raise FileNotFoundError(f"benchmark {name!r}: no dataset under {root!r}; looked for " + ", ".join(tried))


# ------------------------------------------------------------------------------------------------------------------
# Datasets


class BenchmarkDataset:
    """The validation split of one benchmark. Use `open_benchmark`.

    Attributes:
        spec: the benchmark.
        root: the dataset folder found under the ROOT given to `open_benchmark`.
        instances_uri: COCO-format instance annotations the reference's AP reads (COCO, ADE20K-150), else None.
    """

    def __init__(self, spec: BenchmarkSpec, root: str, layout: _Layout):
        self.spec = spec
        self.root = root
        self._layout = layout
        self._vocabulary = benchmark_vocabulary(spec.name)
        self.instances_uri = _join(root, layout.instances_json) if layout.instances_json else None
        self._semantic_table = self._build_semantic_table()
        self._records: list[EvalRecord] = []

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.spec.name!r}, root={self.root!r}, images={len(self._records)})"

    def __len__(self) -> int:
        return len(self._records)

    def vocabulary(self) -> Vocabulary:
        """The benchmark's classes; a class's position is its contiguous index."""
        return self._vocabulary

    def records(self) -> list[EvalRecord]:
        """One record per evaluated image, in a fixed order."""
        return list(self._records)

    def load_image(self, record: EvalRecord) -> np.ndarray:
        """(H, W, 3) uint8 RGB, EXIF orientation applied (`fcclip.images.load_image`)."""
        return load_image(record.image_uri)

    def load_panoptic(self, record: EvalRecord) -> tuple[np.ndarray, list[dict[str, Any]]]:
        """(H, W) int64 segment ids and the segments (``id``, ``category_id`` as a dataset id, ``iscrowd``, ...).

        Raises:
            ValueError: a semantic-only benchmark.
        """
        raise ValueError(f"{self.spec.name} has no panoptic ground truth (its tasks: {self.spec.tasks})")

    def panoptic_categories(self) -> list[dict[str, Any]]:
        """``[{"id", "isthing", "name"}]`` of the panoptic ground truth, for `PanopticAccumulator`."""
        raise ValueError(f"{self.spec.name} has no panoptic ground truth (its tasks: {self.spec.tasks})")

    def load_semantic(self, record: EvalRecord) -> np.ndarray:
        """(H, W) int64 contiguous class indices in [0, K), `spec.ignore_label` where unlabeled.

        Raises:
            ValueError: the label map holds a value the dataset does not define.
        """
        if record.semantic_uri is None:
            raise ValueError(f"{self.spec.name}: image {record.image_id} has no semantic label map")
        return _lookup(_read_label_map(record.semantic_uri), self._semantic_table, record.semantic_uri)

    def _build_semantic_table(self) -> np.ndarray:
        """raw label value -> contiguous index (or the ignore label); -1 for values the dataset does not define.

        A raw value is a train id where the vocabulary has train ids (Cityscapes, ADE20K-847), else the contiguous
        index itself.
        """
        categories = self._vocabulary.categories
        if all(c.train_id is not None for c in categories):
            pairs = [(c.train_id, index) for index, c in enumerate(categories)]
        else:
            pairs = [(index, index) for index in range(len(categories))]
        void = self._layout.semantic_void
        table = np.full(max(void, *(raw for raw, _ in pairs)) + 1, -1, dtype=np.int64)
        for raw, index in pairs:
            table[raw] = index
        if table[void] != -1:
            raise ValueError(f"{self.spec.name}: unlabeled value {void} is also a class")
        table[void] = self.spec.ignore_label
        return table


class _PanopticBenchmark(BenchmarkDataset):
    """A benchmark with COCO-panoptic-format ground truth (JSON + PNGs) and semantic label maps."""

    def __init__(self, spec: BenchmarkSpec, root: str, layout: _Layout):
        super().__init__(spec, root, layout)
        self.json_uri = _join(root, layout.panoptic_json)
        data = _read_json(self.json_uri)
        for key in ("annotations", "categories"):
            if key not in data:
                raise ValueError(f"{self.json_uri}: not a COCO panoptic file (no {key!r})")
        self._categories = [{"id": int(c["id"]), "isthing": int(bool(c.get("isthing", 0))), "name": c.get("name", "")}
                            for c in data["categories"]]
        self._isthing = {c["id"]: bool(c["isthing"]) for c in self._categories}
        # A file listing only some of the vocabulary's categories (a subset, a synthetic set) is scored over the
        # whole vocabulary: the missing categories have no ground truth, so predicting them is a false positive.
        for category in self._vocabulary.categories:
            if category.id not in self._isthing:
                self._categories.append({"id": category.id, "isthing": int(category.is_thing), "name": category.label})
                self._isthing[category.id] = bool(category.is_thing)
        self._category_index = {category_id: index for index, category_id in enumerate(self._vocabulary.ids)}
        semantic_dir = _join(root, layout.semantic_dir)
        self._semantic_dir: str | None = semantic_dir
        if layout.derive_semantic and not _exists(semantic_dir):
            self._semantic_dir = None
        images = {str(image["id"]): image for image in data.get("images", [])}
        self._records = [self._record(annotation, images.get(str(annotation["image_id"])))
                         for annotation in data["annotations"]]

    def _record(self, annotation: dict[str, Any], image: dict[str, Any] | None) -> EvalRecord:
        image_id = str(annotation["image_id"])
        for segment in annotation["segments_info"]:  # the reference fails on these too
            if segment["category_id"] not in self._category_index:
                raise ValueError(f"{self.json_uri}: image {image_id} has a segment of category "
                                 f"{segment['category_id']}, not in the {self._vocabulary.name} vocabulary")
        png = annotation["file_name"]
        stem = posixpath.splitext(png)[0]
        return EvalRecord(
            image_id=image_id,
            image_uri=self._image_uri(image_id, stem),
            height=image.get("height") if image else None,
            width=image.get("width") if image else None,
            panoptic_uri=_join(self.root, f"{self._layout.panoptic_dir}/{png}"),
            segments_info=annotation["segments_info"],
            semantic_uri=self._semantic_uri(image_id, png),
            extra=self._extra(image_id),
        )

    def _image_uri(self, image_id: str, stem: str) -> str:
        # the reference: the PNG's stem with the image extension, in the image folder
        return _join(self.root, f"{self._layout.image_dir}/{stem}{self._layout.image_ext}")

    def _semantic_uri(self, image_id: str, png: str) -> str | None:
        if self._semantic_dir is None:
            return None
        return join_uri(self._semantic_dir, png)

    def _extra(self, image_id: str) -> dict[str, Any]:
        return {}

    def load_panoptic(self, record: EvalRecord) -> tuple[np.ndarray, list[dict[str, Any]]]:
        """(H, W) int64 segment ids and the segments (``id``, ``category_id`` as a dataset id, ``iscrowd``,
        ``isthing`` from the JSON's categories, and the JSON's other keys). Copies: edit freely."""
        ids = _read_panoptic_png(record.panoptic_uri)
        segments = []
        for segment in record.segments_info or []:
            segment = dict(segment)
            segment["iscrowd"] = int(segment.get("iscrowd", 0))
            segment["isthing"] = self._isthing[segment["category_id"]]
            segments.append(segment)
        return ids, segments

    def panoptic_categories(self) -> list[dict[str, Any]]:
        """The JSON's categories as ``{"id", "isthing", "name"}`` (the reference's PQ reads them from there).

        They include every vocabulary id (checked when the dataset is opened); a category only the JSON lists has
        no segment (checked too) and so never counts in PQ."""
        return [dict(c) for c in self._categories]

    def load_semantic(self, record: EvalRecord) -> np.ndarray:
        if record.semantic_uri is not None:
            return super().load_semantic(record)
        if not self._layout.derive_semantic:
            raise ValueError(f"{self.spec.name}: image {record.image_id} has no semantic label map")
        ids = _read_panoptic_png(record.panoptic_uri)
        out = np.full(ids.shape, self.spec.ignore_label, dtype=np.int64)
        for segment in record.segments_info or []:  # crowd segments too, as the reference's conversion
            out[ids == segment["id"]] = self._category_index[segment["category_id"]]
        return out


class _Cityscapes(_PanopticBenchmark):
    """Images and label maps in per-city folders, named from the image id."""

    @staticmethod
    def _city(image_id: str) -> str:
        parts = image_id.rsplit("_", 2)
        if len(parts) != 3 or not parts[0]:
            raise ValueError(f"not a Cityscapes image id (<city>_<seq>_<frame>): {image_id!r}")
        return parts[0]

    def _image_uri(self, image_id: str, stem: str) -> str:
        return _join(self.root, f"{self._layout.image_dir}/{self._city(image_id)}/{image_id}_leftImg8bit.png")

    def _gt_uri(self, image_id: str, suffix: str) -> str:
        return _join(self.root, f"{self._layout.semantic_dir}/{self._city(image_id)}/{image_id}_gtFine_{suffix}.png")

    def _semantic_uri(self, image_id: str, png: str) -> str:
        return self._gt_uri(image_id, "labelTrainIds")

    def _extra(self, image_id: str) -> dict[str, Any]:
        return {"city": self._city(image_id), "label_ids_uri": self._gt_uri(image_id, "labelIds"),
                "instance_ids_uri": self._gt_uri(image_id, "instanceIds")}

    def load_semantic(self, record: EvalRecord) -> np.ndarray:
        try:
            return super().load_semantic(record)
        except FileNotFoundError:
            label_ids_uri = record.extra.get("label_ids_uri")
            if not label_ids_uri:
                raise
        # label ids: the 19 evaluated classes by their dataset id; every other id is unlabeled
        table = np.full(256, self.spec.ignore_label, dtype=np.int64)
        for index, category in enumerate(self._vocabulary.categories):
            table[category.id] = index
        return _lookup(_read_label_map(label_ids_uri), table, label_ids_uri)


class _SemanticBenchmark(BenchmarkDataset):
    """Images and label maps in two folders, paired by file stem (detectron2's ``load_sem_seg``)."""

    def __init__(self, spec: BenchmarkSpec, root: str, layout: _Layout):
        super().__init__(spec, root, layout)
        image_dir = _join(root, layout.image_dir)
        semantic_dir = _join(root, layout.semantic_dir)
        images = _stems(_listdir(image_dir), layout.image_ext)
        labels = _stems(_listdir(semantic_dir), layout.semantic_ext)
        self._records = [
            EvalRecord(image_id=stem, image_uri=join_uri(image_dir, images[stem]), height=None, width=None,
                       panoptic_uri=None, segments_info=None, semantic_uri=join_uri(semantic_dir, labels[stem]))
            for stem in sorted(images.keys() & labels.keys())
        ]
        if not self._records:
            raise FileNotFoundError(f"benchmark {spec.name!r}: no image in {image_dir} has a label map in "
                                    f"{semantic_dir} ({len(images)} images, {len(labels)} label maps)")


def _stems(names: Sequence[str], ext: str) -> dict[str, str]:
    return {name[: -len(ext)]: name for name in names if name.endswith(ext)}


def open_benchmark(name: str, root: str | os.PathLike[str]) -> BenchmarkDataset:
    """The validation split of benchmark `name` (`list_benchmarks()`) under `root`.

    Args:
        name: e.g. ``"ade20k_150"``.
        root: the folder holding the datasets (``$DETECTRON2_DATASETS``: ``root/ADEChallengeData2016/...``) or the
            dataset's own folder; a local path or an fsspec URI.

    Raises:
        KeyError: an unknown benchmark.
        FileNotFoundError: the dataset is not under `root` (the message lists where it was looked for).
        ValueError: annotation files that do not match the benchmark.
    """
    if name not in BENCHMARKS:
        raise KeyError(f"unknown benchmark {name!r}; choose one of {list_benchmarks()}")
    spec, layout = BENCHMARKS[name], _LAYOUTS[name]
    dataset_root = _find_dataset(name, os.fspath(root), layout)
    if name == "cityscapes":
        return _Cityscapes(spec, dataset_root, layout)
    if layout.panoptic_json is not None:
        return _PanopticBenchmark(spec, dataset_root, layout)
    return _SemanticBenchmark(spec, dataset_root, layout)
