"""Benchmark readers: a tiny tree in each dataset's on-disk layout, read back with known content."""
import json
import os
from pathlib import Path

import fsspec
import numpy as np
import pytest
from PIL import Image

from fcclip.datasets.benchmarks import (
    BENCHMARKS,
    BenchmarkDataset,
    EvalRecord,
    benchmark_vocabulary,
    list_benchmarks,
    open_benchmark,
)
from fcclip.masks import id2rgb
from fcclip.metrics.panoptic import PanopticAccumulator

H, W = 6, 8
IGNORE = 255


# ------------------------------------------------------------------------------------------------------------------
# writers


def write_image(path: Path, seed: int = 0) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    pixels = np.random.default_rng(seed).integers(0, 256, (H, W, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(path)


def write_label(path: Path, values: np.ndarray, palette: bool = False) -> None:
    """uint8 -> 8-bit PNG ('L', or 'P' with a palette as Mapillary's and VOC's), uint16 -> 16-bit TIFF."""
    path.parent.mkdir(parents=True, exist_ok=True)
    if palette:
        image = Image.frombytes("P", (values.shape[1], values.shape[0]), values.astype(np.uint8).tobytes())
        image.putpalette([v for i in range(256) for v in (i, 255 - i, (7 * i) % 256)])
    else:
        image = Image.fromarray(values)
    image.save(path)


def label_map(*values: int, dtype=np.uint8) -> np.ndarray:
    """(H, W) map in vertical bands of `values`, left to right."""
    out = np.zeros((H, W), dtype=dtype)
    for i, band in enumerate(np.array_split(np.arange(W), len(values))):
        out[:, band] = values[i]
    return out


def panoptic_ids() -> np.ndarray:
    """Segment 1 on the left half, 2 top right, 3 bottom right but its last column, void in that column."""
    ids = np.zeros((H, W), dtype=np.int64)
    ids[:, : W // 2] = 1
    ids[: H // 2, W // 2:] = 2
    ids[H // 2:, W // 2: W - 1] = 3
    return ids * 1000 + 7  # ids need not be small


def write_panoptic(png: Path, ids: np.ndarray) -> None:
    png.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(id2rgb(ids)).save(png)


def categories_of(vocabulary: str) -> list[dict]:
    return [{"id": c.id, "name": c.label, "isthing": int(c.is_thing), "color": list(c.color)}
            for c in benchmark_vocabulary(vocabulary).categories]


def panoptic_json(path: Path, vocabulary: str, images: list[dict], annotations: list[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"images": images, "annotations": annotations, "categories": categories_of(vocabulary)}))


def segments(stuff: int, thing: int, crowd_thing: int) -> list[dict]:
    """Segments of `panoptic_ids()`: 1 stuff, 2 thing, 3 crowd thing."""
    return [
        {"id": 1007, "category_id": stuff, "iscrowd": 0, "area": 24, "bbox": [0, 0, 4, 6]},
        {"id": 2007, "category_id": thing, "iscrowd": 0, "area": 12, "bbox": [4, 0, 4, 3]},
        {"id": 3007, "category_id": crowd_thing, "iscrowd": 1, "area": 9, "bbox": [4, 3, 3, 3]},
    ]


# ------------------------------------------------------------------------------------------------------------------
# one tree per benchmark, under a $DETECTRON2_DATASETS-style root; each returns what the reader should give

COCO_STUFF, COCO_THING = 184, 1  # "tree-merged" (stuff), "person"


def make_coco(root: Path, semseg: bool = False) -> dict:
    coco = root / "coco"
    images, annotations = [], []
    for i, image_id in enumerate((139, 285)):
        stem = f"{image_id:012d}"
        write_image(coco / "val2017" / f"{stem}.jpg", i)
        write_panoptic(coco / "panoptic_val2017" / f"{stem}.png", panoptic_ids())
        images.append({"id": image_id, "file_name": f"{stem}.jpg", "height": H, "width": W})
        annotations.append({"image_id": image_id, "file_name": f"{stem}.png",
                            "segments_info": segments(COCO_STUFF, COCO_THING, COCO_THING)})
        if semseg:  # deliberately not what the PNG says, to show the file is read
            write_label(coco / "panoptic_semseg_val2017" / f"{stem}.png", label_map(5, 132, 255))
    panoptic_json(coco / "annotations" / "panoptic_val2017.json", "coco_panoptic", images, annotations)
    vocabulary = benchmark_vocabulary("coco_panoptic")
    stuff, thing = vocabulary.ids.index(COCO_STUFF), vocabulary.ids.index(COCO_THING)
    expected = np.full((H, W), IGNORE)
    expected[:, : W // 2] = stuff
    expected[: H // 2, W // 2:] = thing
    expected[H // 2:, W // 2: W - 1] = thing  # crowd pixels keep their class, as the reference's conversion
    return {"ids": ["139", "285"], "semantic": label_map(5, 132, 255) if semseg else expected}


def make_ade150(root: Path) -> dict:
    ade = root / "ADEChallengeData2016"
    images, annotations = [], []
    for i in (1, 2):
        stem = f"ADE_val_{i:08d}"
        write_image(ade / "images" / "validation" / f"{stem}.jpg", i)
        write_panoptic(ade / "ade20k_panoptic_val" / f"{stem}.png", panoptic_ids())
        write_label(ade / "annotations_detectron2" / "validation" / f"{stem}.png", label_map(0, 149, 255))
        images.append({"id": stem, "file_name": f"{stem}.jpg", "height": H, "width": W})
        annotations.append({"image_id": stem, "file_name": f"{stem}.png", "segments_info": segments(0, 12, 12)})
    panoptic_json(ade / "ade20k_panoptic_val.json", "ade20k_150", images, annotations)
    return {"ids": ["ADE_val_00000001", "ADE_val_00000002"], "semantic": label_map(0, 149, 255)}


CITY_IDS = ["frankfurt_000000_000294", "munster_000173_000019"]


def make_cityscapes(root: Path, train_ids: bool = True) -> dict:
    city = root / "cityscapes"
    images, annotations = [], []
    for i, image_id in enumerate(CITY_IDS):
        town = image_id.split("_")[0]
        write_image(city / "leftImg8bit" / "val" / town / f"{image_id}_leftImg8bit.png", i)
        png = f"{image_id}_gtFine_panoptic.png"
        write_panoptic(city / "gtFine" / "cityscapes_panoptic_val" / png, panoptic_ids())
        gt = city / "gtFine" / "val" / town
        if train_ids:
            write_label(gt / f"{image_id}_gtFine_labelTrainIds.png", label_map(0, 18, 255))
        # label ids: 7 road, 33 bicycle, 0 unlabeled, 6 ground (not evaluated)
        write_label(gt / f"{image_id}_gtFine_labelIds.png", label_map(7, 33, 0, 6))
        images.append({"id": image_id, "file_name": f"{image_id}_leftImg8bit.png", "height": H, "width": W})
        annotations.append({"image_id": image_id, "file_name": png, "segments_info": segments(7, 26, 26)})
    panoptic_json(city / "gtFine" / "cityscapes_panoptic_val.json", "cityscapes", images, annotations)
    semantic = label_map(0, 18, 255) if train_ids else label_map(0, 18, 255, 255)
    return {"ids": CITY_IDS, "semantic": semantic}


def make_mapillary(root: Path) -> dict:
    val = root / "mapillary_vistas" / "validation"
    images, annotations = [], []
    for i, stem in enumerate(("--0Y8Lq9pVxW", "_1Gn_xkw7sa_")):
        write_image(val / "images" / f"{stem}.jpg", i)
        write_panoptic(val / "panoptic" / f"{stem}.png", panoptic_ids())
        write_label(val / "labels" / f"{stem}.png", label_map(0, 64, 65), palette=True)  # 65: unlabeled
        images.append({"id": stem, "file_name": f"{stem}.jpg", "height": H, "width": W})
        annotations.append({"image_id": stem, "file_name": f"{stem}.png", "segments_info": segments(28, 20, 20)})
    panoptic_json(val / "panoptic" / "panoptic_2018.json", "mapillary_vistas", images, annotations)
    return {"ids": ["--0Y8Lq9pVxW", "_1Gn_xkw7sa_"], "semantic": label_map(0, 64, 255)}


def make_semantic(root: Path, folder: str, images: str, labels: str, ext: str, values: tuple,
                  expected: tuple, dtype=np.uint8, stems=("a_0001", "b_0002")) -> dict:
    base = root / folder
    for i, stem in enumerate(stems):
        write_image(base / images / f"{stem}.jpg", i)
        write_label(base / labels / f"{stem}{ext}", label_map(*values, dtype=dtype), palette=ext == ".png" and i == 1)
    write_image(base / images / "z_no_label.jpg")  # left out: no label map
    write_label(base / labels / f"y_no_image{ext}", label_map(*values, dtype=dtype))  # left out: no image
    return {"ids": list(stems), "semantic": label_map(*expected, dtype=np.int64)}


MAKERS = {
    "coco_panoptic": make_coco,
    "ade20k_150": make_ade150,
    "cityscapes": make_cityscapes,
    "mapillary_vistas": make_mapillary,
    "ade20k_847": lambda r: make_semantic(
        r, "ADE20K_2021_17_01", "images_detectron2/validation", "annotations_detectron2/validation", ".tif",
        (0, 846, 65535), (0, 846, 65535), np.uint16, ("ADE_frame_00000007", "ADE_val_00000001")),
    "pascal_ctx_59": lambda r: make_semantic(
        r, "pascal_ctx_d2", "images/validation", "annotations_ctx59/validation", ".png",
        (0, 58, 255), (0, 58, 255), stems=("2008_000002", "2008_000010")),
    "pascal_ctx_459": lambda r: make_semantic(
        r, "pascal_ctx_d2", "images/validation", "annotations_ctx459/validation", ".tif",
        (0, 300, 458, 65535), (0, 300, 458, 65535), np.uint16, ("2008_000002", "2008_000010")),
    "pascal_voc_20": lambda r: make_semantic(
        r, "pascal_voc_d2", "images/validation", "annotations_pascal20/validation", ".png",
        (0, 19, 255), (0, 19, 255), stems=("2007_000033", "2007_000042")),
    "pascal_voc_21": lambda r: make_semantic(
        r, "pascal_voc_d2", "images/validation", "annotations_pascal21/validation", ".png",
        (0, 20, 255), (0, 20, 255), stems=("2007_000033", "2007_000042")),
}

SIZES = {"coco_panoptic": 133, "ade20k_150": 150, "cityscapes": 19, "mapillary_vistas": 65, "ade20k_847": 847,
         "pascal_ctx_59": 59, "pascal_ctx_459": 459, "pascal_voc_20": 20, "pascal_voc_21": 21}
PANOPTIC = {"coco_panoptic", "ade20k_150", "cityscapes", "mapillary_vistas"}


# ------------------------------------------------------------------------------------------------------------------
# specs


def test_specs_follow_the_paper_and_the_reference_eval_configs():
    assert list_benchmarks() == list(SIZES)
    for name, spec in BENCHMARKS.items():
        assert spec.name == name
        assert len(benchmark_vocabulary(name)) == SIZES[name]
        if name in ("cityscapes", "mapillary_vistas"):
            assert (spec.short_edge, spec.max_size) == (1024, 2560)
        else:
            assert (spec.short_edge, spec.max_size) == (800, 1333)
        if name in ("coco_panoptic", "ade20k_150", "cityscapes"):
            assert spec.tasks == ("panoptic", "instance", "semantic")
        elif name == "mapillary_vistas":
            assert spec.tasks == ("panoptic", "semantic")
        else:
            assert spec.tasks == ("semantic",)
        # the ignore label is never a class index
        assert spec.ignore_label >= SIZES[name]
    assert BENCHMARKS["ade20k_847"].ignore_label == BENCHMARKS["pascal_ctx_459"].ignore_label == 65535


def test_pascal_voc_20_is_voc_21_without_background():
    v20, v21 = benchmark_vocabulary("pascal_voc_20"), benchmark_vocabulary("pascal_voc_21")
    assert v20.name == "pascal_voc_20" and v20.categories == v21.categories[1:]
    assert v21.labels[0] == "background" and v20.labels[0] == "aeroplane"


# ------------------------------------------------------------------------------------------------------------------
# every benchmark in its layout


@pytest.mark.parametrize("name", list(SIZES))
def test_reader_in_the_reference_layout(tmp_path, name):
    expected = MAKERS[name](tmp_path)
    dataset = open_benchmark(name, tmp_path)
    assert isinstance(dataset, BenchmarkDataset) and dataset.spec is BENCHMARKS[name]
    assert len(dataset.vocabulary()) == SIZES[name]
    records = dataset.records()
    assert [r.image_id for r in records] == expected["ids"]
    assert len(dataset) == 2
    for record in records:
        assert isinstance(record, EvalRecord)
        assert os.path.isfile(record.image_uri)
        assert dataset.load_image(record).shape == (H, W, 3)
        semantic = dataset.load_semantic(record)
        assert semantic.dtype == np.int64 and semantic.shape == (H, W)
        np.testing.assert_array_equal(semantic, expected["semantic"])
        labeled = semantic[semantic != dataset.spec.ignore_label]
        assert labeled.min() >= 0 and labeled.max() < SIZES[name]
        if name in PANOPTIC:
            assert os.path.isfile(record.panoptic_uri)
            assert (record.height, record.width) == (H, W)
            ids, segs = dataset.load_panoptic(record)
            np.testing.assert_array_equal(ids, panoptic_ids())
            assert [s["id"] for s in segs] == [1007, 2007, 3007]
            assert [s["iscrowd"] for s in segs] == [0, 0, 1]
            assert [s["isthing"] for s in segs] == [False, True, True]
            vocabulary_ids = set(dataset.vocabulary().ids)
            assert all(s["category_id"] in vocabulary_ids for s in segs)  # dataset ids, not contiguous indices
        else:
            assert record.panoptic_uri is None and record.segments_info is None
            with pytest.raises(ValueError, match="no panoptic"):
                dataset.load_panoptic(record)
    if name in PANOPTIC:
        categories = dataset.panoptic_categories()
        assert [c["id"] for c in categories] == list(dataset.vocabulary().ids)
        assert all(set(c) == {"id", "isthing", "name"} for c in categories)
        accumulator = PanopticAccumulator(categories)  # ground truth against itself: PQ 1 on the non-crowd classes
        for record in records:
            ids, segs = dataset.load_panoptic(record)
            keep = [s for s in segs if not s["iscrowd"]]
            pred = np.where(np.isin(ids, [s["id"] for s in keep]), ids, 0)
            accumulator.update(ids, segs, pred, keep, image_id=record.image_id)
        assert accumulator.result()["All"]["pq"] == pytest.approx(1.0)


def test_coco_reads_panoptic_semseg_when_present(tmp_path):
    expected = make_coco(tmp_path, semseg=True)
    dataset = open_benchmark("coco_panoptic", tmp_path)
    record = dataset.records()[0]
    assert record.semantic_uri.endswith(os.path.join("panoptic_semseg_val2017", "000000000139.png"))
    np.testing.assert_array_equal(dataset.load_semantic(record), expected["semantic"])
    assert dataset.instances_uri.endswith(os.path.join("annotations", "instances_val2017.json"))


def test_coco_without_semseg_derives_it(tmp_path):
    make_coco(tmp_path)
    dataset = open_benchmark("coco_panoptic", tmp_path / "coco")  # the dataset folder itself also works
    assert all(r.semantic_uri is None for r in dataset.records())
    assert dataset.root == str(tmp_path / "coco")


def test_cityscapes_paths_and_label_ids_fallback(tmp_path):
    expected = make_cityscapes(tmp_path, train_ids=False)
    dataset = open_benchmark("cityscapes", tmp_path)
    record = dataset.records()[0]
    city = tmp_path / "cityscapes"
    assert record.image_uri == str(city / "leftImg8bit" / "val" / "frankfurt" /
                                   "frankfurt_000000_000294_leftImg8bit.png")
    assert record.semantic_uri == str(city / "gtFine" / "val" / "frankfurt" /
                                      "frankfurt_000000_000294_gtFine_labelTrainIds.png")
    assert record.extra["instance_ids_uri"].endswith("frankfurt_000000_000294_gtFine_instanceIds.png")
    np.testing.assert_array_equal(dataset.load_semantic(record), expected["semantic"])


def test_ade847_also_found_where_its_prepare_script_writes(tmp_path):
    make_semantic(tmp_path / "ade", "ADE20K_2021_17_01", "images_detectron2/validation",
                  "annotations_detectron2/validation", ".tif", (1, 2), (1, 2), np.uint16)
    dataset = open_benchmark("ade20k_847", tmp_path)
    assert dataset.root == str(tmp_path / "ade" / "ADE20K_2021_17_01")
    assert len(dataset.records()) == 2


# ------------------------------------------------------------------------------------------------------------------
# errors


def test_unexpected_label_values_are_errors(tmp_path):
    make_semantic(tmp_path, "pascal_ctx_d2", "images/validation", "annotations_ctx59/validation", ".png",
                  (0, 59), (0, 59))  # 59 is past the 59 classes and is not the unlabeled value
    dataset = open_benchmark("pascal_ctx_59", tmp_path)
    with pytest.raises(ValueError, match=r"unexpected label values \[59\]"):
        dataset.load_semantic(dataset.records()[0])
    make_mapillary(tmp_path)
    dataset = open_benchmark("mapillary_vistas", tmp_path)
    record = dataset.records()[0]
    write_label(Path(record.semantic_uri), label_map(3, 66), palette=True)
    with pytest.raises(ValueError, match=r"unexpected label values \[66\]"):
        dataset.load_semantic(record)


def test_missing_dataset_and_unknown_names(tmp_path):
    with pytest.raises(KeyError, match="unknown benchmark"):
        open_benchmark("ade20k_151", tmp_path)
    with pytest.raises(FileNotFoundError, match="ADEChallengeData2016"):
        open_benchmark("ade20k_150", tmp_path)


def test_panoptic_categories_must_match_the_vocabulary(tmp_path):
    make_ade150(tmp_path)
    path = tmp_path / "ADEChallengeData2016" / "ade20k_panoptic_val.json"
    data = json.loads(path.read_text())
    data["categories"] = data["categories"][:-1]
    path.write_text(json.dumps(data))
    # a category the file does not list is scored from the vocabulary (no ground truth: predictions are FPs)
    cats = {c["id"]: c for c in open_benchmark("ade20k_150", tmp_path).panoptic_categories()}
    assert len(cats) == 150 and cats[149]["name"] == "flag"
    data = json.loads(path.read_text())
    data["categories"] += [{"id": 149, "name": "flag", "isthing": 1}, {"id": 150, "name": "extra", "isthing": 0}]
    path.write_text(json.dumps(data))
    assert len(open_benchmark("ade20k_150", tmp_path).panoptic_categories()) == 151  # extra ids are harmless
    data["annotations"][0]["segments_info"][0]["category_id"] = 150
    path.write_text(json.dumps(data))
    with pytest.raises(ValueError, match="category 150, not in the ade20k_150 vocabulary"):
        open_benchmark("ade20k_150", tmp_path)


# ------------------------------------------------------------------------------------------------------------------
# fsspec roots


@pytest.mark.parametrize("name", ["ade20k_150", "pascal_voc_21"])
def test_fsspec_root(tmp_path, name):
    expected = MAKERS[name](tmp_path)
    fs = fsspec.filesystem("memory")
    base = f"/bench-{name}"
    try:
        for path in tmp_path.rglob("*"):
            if path.is_file():
                fs.pipe(f"{base}/{path.relative_to(tmp_path).as_posix()}", path.read_bytes())
        dataset = open_benchmark(name, f"memory://{base}")
        records = dataset.records()
        assert [r.image_id for r in records] == expected["ids"]
        assert records[0].image_uri.startswith("memory://")
        assert dataset.load_image(records[0]).shape == (H, W, 3)
        np.testing.assert_array_equal(dataset.load_semantic(records[1]), expected["semantic"])
        if name in PANOPTIC:
            np.testing.assert_array_equal(dataset.load_panoptic(records[1])[0], panoptic_ids())
    finally:
        fs.rm(base, recursive=True)
