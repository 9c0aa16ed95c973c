"""`fcclip export`: a labeling output as COCO panoptic, COCO instances and semantic PNGs, read back by the tools
that train on them (pycocotools, the panoptic API's pq_compute as fcclip/metrics/panoptic.py mirrors it).

Two outputs: one written by a real `fcclip label` run (fcclip-tiny, random weights, a local Ray), and one written
in the documented schema by tests/test_show.py's helpers (things and stuff, error rows, two part files), whose
masks are known.
"""
import argparse
import json
import shutil
import tracemalloc
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
from PIL import Image
from pycocotools.coco import COCO

import fcclip_pipelines.export as export
from fcclip.datasets.synthetic import write_images
from fcclip.masks import decode_rle, encode_rle, mask_to_bbox
from fcclip.metrics.panoptic import load_panoptic_png, pq_compute
from fcclip_pipelines.output import encode_part, segment_map
from tests.test_show import VOCAB, _corrupt_data_pages, _rows, _write_output
from tests.test_show import labels as labels  # noqa: F401  (the hand-written output, a module fixture)

LABEL_VOCAB = "person; car; dog, puppy; grass, lawn [stuff]; sky [stuff]"


@pytest.fixture(scope="module")
def labeled(tmp_path_factory):
    """An output of `fcclip label` on 6 synthetic images and one file that is not an image, in 2 part files."""
    import ray

    import fcclip_pipelines.label as label

    root = tmp_path_factory.mktemp("labeled")
    write_images(root / "in", count=6, size=(96, 128), seed=1)
    (root / "in" / "broken.jpg").write_bytes(b"not an image")
    parser = argparse.ArgumentParser()
    label.add_arguments(parser)
    args = parser.parse_args([
        str(root / "in"), "--out", str(root / "out"), "--vocab", LABEL_VOCAB, "--model", "fcclip-tiny",
        "--weights", "random", "--shard-size", "4", "--no-progress",
    ])
    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        assert label.main_args(args) == 0
    finally:
        ray.shutdown()
    dest = root / "out"
    rows = _parquet_rows(dest)
    assert len(rows) == 7 and sum(r["status"] == "error" for r in rows) == 1
    assert sum(len(r["segments"]) for r in rows) > 0, "the run labeled nothing: nothing to export"
    return {"dest": dest, "rows": rows}


def _export(dest, fmt, out, *extra) -> dict:
    assert export.main([str(dest), "--format", fmt, "--out", str(out), *extra]) == 0
    name = {"coco-panoptic": "panoptic.json", "coco-instances": "instances.json", "coco-semantic": "semantic.json"}
    return json.loads((Path(out) / name[fmt]).read_text())


def _ok_rows(rows) -> list[dict]:
    return [r for r in rows if r["status"] == "ok"]


def _parquet_rows(dest) -> list[dict]:
    """The rows in file order, as the export reads them."""
    return [r for path in sorted(Path(dest).glob("*.parquet")) for r in pq.read_table(path).to_pylist()]


def _vocabulary_categories(dest) -> list[dict]:
    meta = pq.read_schema(sorted(Path(dest).glob("*.parquet"))[0]).metadata
    return json.loads(meta[b"fcclip.vocabulary"])["categories"]


def _check_images(data: dict, dest) -> list[dict]:
    ok = _ok_rows(_parquet_rows(dest))
    assert [(i["id"], i["file_name"], i["width"], i["height"]) for i in data["images"]] == [
        (int(r["image_id"], 16) % 2**63, r["uri"], r["width"], r["height"]) for r in ok]
    return ok


@pytest.mark.ray
def test_panoptic_of_a_label_run(labeled, tmp_path, capsys):
    out = tmp_path / "coco"
    data = _export(labeled["dest"], "coco-panoptic", out)
    printed = capsys.readouterr().out
    assert "exported 6 image(s)" in printed and "skipped 1 error row(s)" in printed
    vocabulary = _vocabulary_categories(labeled["dest"])
    assert [(c["id"], c["name"], c["isthing"]) for c in data["categories"]] == [
        (c["id"], c["names"][0], c["isthing"]) for c in vocabulary]
    ok = _check_images(data, labeled["dest"])
    assert len(data["annotations"]) == len(ok)
    for row, ann, image in zip(ok, data["annotations"], data["images"]):
        assert ann["image_id"] == image["id"] and ann["file_name"] == f"{row['image_id']}.png"
        ids = load_panoptic_png(out / "panoptic" / ann["file_name"])
        np.testing.assert_array_equal(ids, segment_map(list(row["segments"]), row["height"], row["width"]))
        assert [(s["id"], s["category_id"], s["area"]) for s in ann["segments_info"]] == [
            (s["id"], s["category_id"], s["area"]) for s in row["segments"]]
        for s, stored in zip(ann["segments_info"], row["segments"]):
            assert s["bbox"] == [int(v) for v in stored["bbox"]]

    same = pq_compute(out / "panoptic.json", out / "panoptic", out / "panoptic.json", out / "panoptic")
    assert same["All"]["pq"] == 1.0 and same["All"]["n"] > 0

    # a perturbed copy: the first image loses its first segment (a false negative against the export)
    copy = tmp_path / "perturbed"
    shutil.copytree(out, copy)
    perturbed = json.loads((copy / "panoptic.json").read_text())
    first = perturbed["annotations"][0]
    dropped = first["segments_info"].pop(0)
    png = copy / "panoptic" / first["file_name"]
    rgb = np.asarray(Image.open(png).convert("RGB")).copy()
    rgb[load_panoptic_png(png) == dropped["id"]] = 0
    Image.fromarray(rgb).save(png)
    (copy / "panoptic.json").write_text(json.dumps(perturbed))
    worse = pq_compute(out / "panoptic.json", out / "panoptic", copy / "panoptic.json", copy / "panoptic")
    assert 0.0 < worse["All"]["pq"] < 1.0
    assert worse["per_class"][dropped["category_id"]]["fn"] == 1


@pytest.mark.ray
def test_instances_and_semantic_of_a_label_run(labeled, tmp_path):
    data = _export(labeled["dest"], "coco-instances", tmp_path / "inst")
    coco = COCO(str(tmp_path / "inst" / "instances.json"))
    ok = _check_images(data, labeled["dest"])
    things = [(n, s) for n, r in enumerate(ok, start=1) for s in r["segments"] if s["is_thing"]]
    assert len(coco.getAnnIds()) == len(things)
    for ann_id, (image_id, s) in zip(sorted(coco.getAnnIds()), things):
        ann = coco.loadAnns(ann_id)[0]
        assert ann["image_id"] == image_id and ann["category_id"] == s["category_id"]
        assert ann["segmentation"]["counts"] == s["rle"]["counts"]  # the RLE as it is
        np.testing.assert_array_equal(coco.annToMask(ann).astype(bool), decode_rle(s["rle"]))

    semantic = _export(labeled["dest"], "coco-semantic", tmp_path / "sem")
    vocabulary = _vocabulary_categories(labeled["dest"])
    assert [(c["index"], c["id"]) for c in semantic["classes"]] == list(enumerate(c["id"] for c in vocabulary))
    assert semantic["ignore_index"] == 255
    for row, ann in zip(ok, semantic["annotations"]):
        classes = np.asarray(Image.open(tmp_path / "sem" / "semantic" / ann["file_name"]))
        expected = np.full((row["height"], row["width"]), 255, dtype=np.uint8)
        index = {c["id"]: i for i, c in enumerate(vocabulary)}
        for s in row["segments"]:
            expected[decode_rle(s["rle"])] = index[s["category_id"]]
        np.testing.assert_array_equal(classes, expected)


def test_known_output_in_every_format(labels, tmp_path):
    """The hand-written output (things and stuff, 3 error rows over 2 part files) in all three formats."""
    dest = labels["dest"]
    ok = _ok_rows(_parquet_rows(dest))
    panoptic = _export(dest, "coco-panoptic", tmp_path / "p")
    _check_images(panoptic, dest)
    assert sum(len(a["segments_info"]) for a in panoptic["annotations"]) == sum(len(r["segments"]) for r in ok)
    result = pq_compute(tmp_path / "p" / "panoptic.json", tmp_path / "p" / "panoptic",
                        tmp_path / "p" / "panoptic.json", tmp_path / "p" / "panoptic")
    assert result["All"]["pq"] == 1.0 and result["Things"]["n"] == 2 and result["Stuff"]["n"] == 2
    # the same rows in other part files, in another order (another run's, or a compaction's): an image has the same
    # id in both exports, which COCO's tools pair by
    other = tmp_path / "other"
    other.mkdir()
    _write_output(list(reversed(labels["rows"])), lambda name, data: (other / name).write_bytes(data), shard_size=5)
    _export(other, "coco-panoptic", tmp_path / "o")
    result = pq_compute(tmp_path / "p" / "panoptic.json", tmp_path / "p" / "panoptic",
                        tmp_path / "o" / "panoptic.json", tmp_path / "o" / "panoptic")
    assert result["All"]["pq"] == 1.0 and result["All"]["n"] == 4

    instances = _export(dest, "coco-instances", tmp_path / "i")
    assert [c["name"] for c in instances["categories"]] == ["cat", "dog"]  # the things of the vocabulary
    coco = COCO(str(tmp_path / "i" / "instances.json"))
    things = [s for r in ok for s in r["segments"] if s["is_thing"]]
    assert len(coco.getAnnIds()) == len(things) > len(ok)  # a dog in every image, a cat in some
    for ann in coco.loadAnns(coco.getAnnIds()):
        mask = coco.annToMask(ann).astype(bool)
        assert mask.sum() == ann["area"] and mask_to_bbox(mask) == ann["bbox"]

    semantic = _export(dest, "coco-semantic", tmp_path / "s")
    assert [c["name"] for c in semantic["classes"]] == [c.names[0] for c in VOCAB.categories]
    pixels = sum(np.asarray(Image.open(tmp_path / "s" / "semantic" / a["file_name"])).size
                 for a in semantic["annotations"])
    assert pixels == sum(r["width"] * r["height"] for r in ok)


def test_overlapping_and_unknown_segments(tmp_path):
    """Masks that overlap: the later id wins and areas/boxes are counted on the map; a segment of a category the
    vocabulary lacks, or with no pixel left, is left out (and said)."""
    h, w = 20, 30
    a = np.zeros((h, w), bool)
    a[:, :20] = True
    b = np.zeros((h, w), bool)
    b[:, 10:] = True
    hidden = np.zeros((h, w), bool)
    hidden[:5, 12:18] = True  # entirely under b
    segments = [
        {"id": 1, "label": "cat", "category_id": 1, "is_thing": True, "score": 0.9, "area": int(a.sum()),
         "bbox": mask_to_bbox(a), "rle": encode_rle(a)},
        {"id": 3, "label": "sky", "category_id": 4, "is_thing": False, "score": 0.8, "area": int(b.sum()),
         "bbox": mask_to_bbox(b), "rle": encode_rle(b)},
        {"id": 2, "label": "dog", "category_id": 2, "is_thing": True, "score": 0.7, "area": int(hidden.sum()),
         "bbox": mask_to_bbox(hidden), "rle": encode_rle(hidden)},
        {"id": 4, "label": "zebra", "category_id": 99, "is_thing": True, "score": 0.6, "area": 1,
         "bbox": [0.0, 0.0, 1.0, 1.0], "rle": encode_rle(np.eye(h, w, dtype=bool))},
    ]
    row = {"uri": "/x.jpg", "image_id": "0" * 16, "width": w, "height": h, "status": "ok", "error": None,
           "segments": segments, "model": "m", "vocabulary": "v", "run_id": "r"}
    dest = tmp_path / "labels"
    dest.mkdir()
    _write_output([row], lambda name, data: (dest / name).write_bytes(data))
    panoptic = _export(dest, "coco-panoptic", tmp_path / "p")
    info = panoptic["annotations"][0]["segments_info"]
    assert [(s["id"], s["area"], s["bbox"]) for s in info] == [(1, 200, [0, 0, 10, 20]), (3, 400, [10, 0, 20, 20])]
    ids = load_panoptic_png(tmp_path / "p" / "panoptic" / panoptic["annotations"][0]["file_name"])
    assert set(np.unique(ids).tolist()) == {1, 3}
    assert pq_compute(tmp_path / "p" / "panoptic.json", tmp_path / "p" / "panoptic",
                      tmp_path / "p" / "panoptic.json", tmp_path / "p" / "panoptic")["All"]["pq"] == 1.0


def test_semantic_beyond_255_classes(tmp_path):
    """300 classes: 16-bit class indices, 65535 where no segment is."""
    from fcclip.vocabulary import load_vocabulary

    vocabulary = load_vocabulary("; ".join(f"class{i}" for i in range(300)))
    mask = np.zeros((8, 10), bool)
    mask[2:6, 3:9] = True
    last = vocabulary.categories[-1]
    row = {"uri": "/x.jpg", "image_id": "0" * 16, "width": 10, "height": 8, "status": "ok", "error": None,
           "segments": [{"id": 1, "label": "class299", "category_id": last.id, "is_thing": True, "score": 0.9,
                         "area": int(mask.sum()), "bbox": mask_to_bbox(mask), "rle": encode_rle(mask)}]}
    dest = tmp_path / "labels"
    dest.mkdir()
    (dest / "part-000000.parquet").write_bytes(encode_part([row], {"vocabulary": vocabulary.to_dict()}))
    semantic = _export(dest, "coco-semantic", tmp_path / "s")
    assert semantic["ignore_index"] == 65535 and len(semantic["classes"]) == 300
    classes = np.asarray(Image.open(tmp_path / "s" / "semantic" / semantic["annotations"][0]["file_name"]))
    assert classes.dtype == np.uint16
    np.testing.assert_array_equal(classes, np.where(mask, 299, 65535))


def test_mask_of_another_size(tmp_path, capsys):
    """A row whose mask does not fit its image (not fcclip's writing): one line naming the image, no JSON."""
    mask = np.ones((8, 10), bool)
    row = {"uri": "/odd.jpg", "image_id": "1" * 16, "width": 12, "height": 8, "status": "ok", "error": None,
           "segments": [{"id": 1, "label": "cat", "category_id": 1, "is_thing": True, "score": 0.9, "area": 80,
                         "bbox": mask_to_bbox(mask), "rle": encode_rle(mask)}]}
    dest = tmp_path / "labels"
    dest.mkdir()
    _write_output([row], lambda name, data: (dest / name).write_bytes(data))
    assert export.main([str(dest), "--format", "coco-semantic", "--out", str(tmp_path / "s")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["fcclip export: error: the row of /odd.jpg cannot be exported: segment 1's mask is 10 x 8, "
                   "the image 12 x 8"]
    assert not (tmp_path / "s" / "semantic.json").exists()


def test_refusals(labels, tmp_path, capsys):
    # not a labeling output: one line, exit 2, nothing written
    empty = tmp_path / "empty"
    empty.mkdir()
    assert export.main([str(empty), "--format", "coco-panoptic", "--out", str(tmp_path / "x")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "is not a labeling output" in err[0]
    assert not (tmp_path / "x").exists()

    # a finished export is never overwritten; one that stopped halfway (no JSON yet) is redone
    out = tmp_path / "coco"
    first = _export(labels["dest"], "coco-panoptic", out)
    before = (out / "panoptic.json").read_bytes()
    assert export.main([str(labels["dest"]), "--format", "coco-panoptic", "--out", str(out)]) == 2
    assert "already holds a finished coco-panoptic export" in capsys.readouterr().err
    assert (out / "panoptic.json").read_bytes() == before
    (out / "panoptic.json").unlink()
    (out / "panoptic" / first["annotations"][0]["file_name"]).write_bytes(b"half")
    assert _export(labels["dest"], "coco-panoptic", out) == first
    assert load_panoptic_png(out / "panoptic" / first["annotations"][0]["file_name"]).shape == (96, 128)
    with pytest.raises(SystemExit):
        export.main([str(labels["dest"]), "--format", "yolo", "--out", str(tmp_path / "y")])
    assert "invalid choice: 'yolo'" in capsys.readouterr().err

    # a part file whose pages cannot be read: one line naming it, and no JSON (the export is unfinished)
    broken = tmp_path / "broken"
    shutil.copytree(labels["dest"], broken)
    _corrupt_data_pages(broken / "part-000001.parquet")
    assert export.main([str(broken), "--format", "coco-instances", "--out", str(tmp_path / "b")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and f"cannot read {broken / 'part-000001.parquet'}: " in err[0]
    assert not (tmp_path / "b" / "instances.json").exists()


def test_object_storage(s3_server, s3_bucket, tmp_path):
    """DEST and --out in a bucket (moto on loopback)."""
    import fsspec

    fs = fsspec.filesystem("s3")
    paths = write_images(tmp_path / "images", count=3, size=(48, 64), seed=2)
    rows = _rows([str(p) for p in paths], [(48, 64)] * 3, str(tmp_path / "images"))
    _write_output(rows, lambda name, data: fs.pipe_file(f"s3://{s3_bucket}/labels/{name}", data), shard_size=4)
    out = f"s3://{s3_bucket}/coco"
    assert export.main([f"s3://{s3_bucket}/labels", "--format", "coco-panoptic", "--out", out]) == 0
    data = json.loads(fs.cat_file(f"{out}/panoptic.json"))
    assert [i["file_name"] for i in data["images"]] == [str(p) for p in paths]
    assert sorted(p.rsplit("/", 1)[-1] for p in fs.ls(f"{out}/panoptic")) == sorted(
        a["file_name"] for a in data["annotations"])


def _peak_bytes(dest, out, fmt) -> int:
    tracemalloc.start()
    try:
        export.export(str(dest), fmt, str(out), batch_rows=4)
        return tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


def test_memory_does_not_grow_with_the_output(tmp_path):
    """Exporting 8x the images (8x the part files, the same part size) raises the peak of Python memory by less
    than half the JSON of the extra images: the arrays go to disk as they grow, one part file is read at a time.
    (Measured on coco-instances, whose JSON carries the RLEs and outgrows the per-image work; the other formats
    write their JSON through the same writer. Holding the annotations in a list fails this: +8.1 MB for +7.2 MB.)"""
    fmt = "coco-instances"
    rng = np.random.default_rng(0)

    def output(name, images):
        dest = tmp_path / name
        dest.mkdir()
        rows = []
        for i in range(images):
            masks = rng.random((24, 96, 128)) < 0.3  # noisy masks: long RLEs
            segments = [{"id": j + 1, "label": "cat", "category_id": 1, "is_thing": True, "score": 0.5,
                         "area": int(m.sum()), "bbox": mask_to_bbox(m), "rle": encode_rle(m)}
                        for j, m in enumerate(masks)]
            rows.append({"uri": f"/img/{i}.jpg", "image_id": f"{i:016x}", "width": 128, "height": 96,
                         "status": "ok", "error": None, "segments": segments})
        _write_output(rows, lambda part, data: (dest / part).write_bytes(data), shard_size=8)
        return dest

    small, large = output("small", 8), output("large", 64)
    peak_small = _peak_bytes(small, tmp_path / "out-small", fmt)
    peak_large = _peak_bytes(large, tmp_path / "out-large", fmt)
    json_growth = (tmp_path / "out-large" / "instances.json").stat().st_size - (
        tmp_path / "out-small" / "instances.json").stat().st_size
    assert json_growth > 0
    assert peak_large - peak_small < json_growth / 2, (peak_small, peak_large, json_growth)
