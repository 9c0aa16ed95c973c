"""Synthetic COCO panoptic generator, its reader, LSJ augmentation and batching."""
import argparse
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from scipy import ndimage

from fcclip.datasets.coco_panoptic import CocoPanoptic, filter_empty
from fcclip.datasets.synthetic_panoptic import CATEGORIES, synth_coco_panoptic_main, write_coco_panoptic
from fcclip.masks import mask_to_bbox, rgb2id
from fcclip.training import collate, lsj_augment, make_targets, nearest_indices, normalize_images, train_sample

SIZE = (48, 64)


@pytest.fixture(scope="module")
def synth_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("coco")
    write_coco_panoptic(root, 12, seed=3, size=SIZE)
    return root


# ------------------------------------------------------------------------------------------------------------------
# generator and reader


def test_generator_writes_the_coco_panoptic_layout(synth_root):
    for split, count in (("train2017", 12), ("val2017", 3)):
        data = json.loads((synth_root / "annotations" / f"panoptic_{split}.json").read_text())
        assert set(data) >= {"images", "annotations", "categories"}
        assert data["categories"] == CATEGORIES
        assert len(data["images"]) == len(data["annotations"]) == count
        for image, annotation in zip(data["images"], data["annotations"]):
            assert annotation["image_id"] == image["id"]
            assert Path(annotation["file_name"]).stem == Path(image["file_name"]).stem
            jpg = synth_root / split / image["file_name"]
            png = synth_root / f"panoptic_{split}" / annotation["file_name"]
            assert jpg.suffix == ".jpg" and png.suffix == ".png"
            assert Image.open(jpg).format == "JPEG" and Image.open(png).mode == "RGB"
            assert Image.open(jpg).size == Image.open(png).size == (image["width"], image["height"])
            for segment in annotation["segments_info"]:
                assert set(segment) == {"id", "category_id", "iscrowd", "bbox", "area"}
    ids = [c["id"] for c in CATEGORIES]
    assert ids == sorted(ids) and {c["name"] for c in CATEGORIES} >= {"person", "car", "dog"}


def test_generator_is_deterministic(tmp_path, synth_root):
    write_coco_panoptic(tmp_path / "a", 3, seed=3, size=SIZE, also_val=False)
    write_coco_panoptic(tmp_path / "b", 3, seed=4, size=SIZE, also_val=False)
    for name in ("000000000001.png", "000000000003.png"):
        same = (tmp_path / "a" / "panoptic_train2017" / name).read_bytes()
        assert same == (synth_root / "panoptic_train2017" / name).read_bytes()  # image i depends on (seed, i) only
        assert same != (tmp_path / "b" / "panoptic_train2017" / name).read_bytes()
    assert not (tmp_path / "a" / "val2017").exists()


def test_reader_reads_back_what_the_png_encodes(synth_root):
    ds = CocoPanoptic(synth_root, "train2017")
    assert len(ds) == 12 and ds.num_classes == len(CATEGORIES)
    assert ds.category_index == {c["id"]: i for i, c in enumerate(CATEGORIES)}
    crowds = 0
    for record in ds.records():
        image, masks, classes, iscrowd = ds.load(record)
        assert image.shape == (*SIZE, 3) and image.dtype == np.uint8
        assert masks.shape == (len(record["segments_info"]), *SIZE) and masks.dtype == bool
        assert classes.dtype == np.int64 and iscrowd.dtype == bool
        ids = rgb2id(np.asarray(Image.open(record["panoptic_uri"])))
        for mask, cls, crowd, segment in zip(masks, classes, iscrowd, record["segments_info"]):
            np.testing.assert_array_equal(mask, ids == segment["id"])
            assert mask.sum() == segment["area"] > 0
            assert mask_to_bbox(mask) == segment["bbox"]
            assert CATEGORIES[cls]["id"] == segment["category_id"]
            assert crowd == bool(segment["iscrowd"])
        assert masks.sum(0).max() <= 1  # disjoint
        np.testing.assert_array_equal(masks.any(0), ids != 0)  # everything else is unlabeled
        crowds += int(iscrowd.sum())
    assert crowds > 0  # the fixture's seed makes some crowd segments


def test_vocabulary_and_synonyms(synth_root):
    ds = CocoPanoptic(synth_root, "val2017")
    vocab = ds.vocabulary()
    assert vocab.ids == tuple(c["id"] for c in CATEGORIES)
    assert vocab.labels[3] == "sky-other-merged" and vocab.thing_mask == [True, True, True, False, False, False]
    assert vocab.categories[0].color == (220, 20, 60)
    # the reference's prompt-engineered names for COCO ids
    named = ds.vocabulary(synonyms="coco_panoptic")
    assert named.labels == ("person", "car", "dog", "sky", "pavement", "grass")
    assert "puppy" in named.synonyms[2]


def test_reader_on_an_fsspec_uri(synth_root):
    import fsspec

    fs = fsspec.filesystem("memory")
    for path in synth_root.rglob("*"):
        if path.is_file() and ("val2017" in str(path)):
            fs.pipe(f"/coco-test/{path.relative_to(synth_root).as_posix()}", path.read_bytes())
    remote = CocoPanoptic("memory://coco-test", "val2017")
    local = CocoPanoptic(synth_root, "val2017")
    record = remote.records()[0]
    assert record["image_uri"].startswith("memory://coco-test/val2017/")
    for a, b in zip(remote.load(record), local.load(local.records()[0])):
        np.testing.assert_array_equal(a, b)


def test_crowd_is_dropped_from_training_targets(synth_root):
    ds = CocoPanoptic(synth_root, "train2017")
    record = next(r for r in ds.records() if any(s["iscrowd"] for s in r["segments_info"]))
    image, masks, classes, iscrowd = ds.load(record)
    # scale fixed so that the image fits without a crop: nothing but the crowd can disappear
    sample = train_sample(image, masks, classes, iscrowd, np.random.default_rng(0),
                          image_size=128, min_scale=1.0, max_scale=1.0)
    assert sample["labels"].tolist() == classes[~iscrowd].tolist()
    assert sample["masks"].shape == (int((~iscrowd).sum()), 128, 128)


def test_filter_empty():
    records = [
        {"image_id": 1, "segments_info": [{"id": 5, "category_id": 1, "iscrowd": 0}]},
        {"image_id": 2, "segments_info": []},
        {"image_id": 3, "segments_info": [{"id": 7, "category_id": 1, "iscrowd": 1}]},  # crowd only
        {"image_id": 4, "segments_info": [{"id": 7, "category_id": 1, "iscrowd": 1},
                                          {"id": 8, "category_id": 187, "iscrowd": 0}]},
    ]
    assert [r["image_id"] for r in filter_empty(records)] == [1, 4]


def test_cli_entry_point(tmp_path, capsys):
    args = argparse.Namespace(out=str(tmp_path / "d"), images=2, seed=1, size=[32, 40])
    assert synth_coco_panoptic_main(args) == 0
    assert len(CocoPanoptic(tmp_path / "d", "train2017")) == 2
    assert len(CocoPanoptic(tmp_path / "d", "val2017")) == 1
    assert "train2017: 2 image(s)" in capsys.readouterr().out


# ------------------------------------------------------------------------------------------------------------------
# LSJ


def test_nearest_indices_are_pils_nearest_resize():
    rng = np.random.default_rng(0)
    for _ in range(40):
        h, w = (int(v) for v in rng.integers(1, 300, 2))
        nh, nw = (int(v) for v in rng.integers(1, 700, 2))
        labels = rng.integers(0, 255, (h, w)).astype(np.uint8)
        expected = np.asarray(Image.fromarray(labels).resize((nw, nh), Image.NEAREST))
        np.testing.assert_array_equal(labels[nearest_indices(h, nh)[:, None], nearest_indices(w, nw)], expected)
    assert nearest_indices(10, 25, 5, 7).tolist() == nearest_indices(10, 25)[5:12].tolist()


def _square_scene(h=60, w=90):
    image = np.full((h, w, 3), 90, dtype=np.uint8)
    masks = np.zeros((2, h, w), dtype=bool)
    masks[0, 10:35, 50:80] = True  # a red square on the right
    masks[1, 40:55, 5:20] = True  # a green one on the left
    image[masks[0]] = (230, 20, 20)
    image[masks[1]] = (20, 200, 20)
    return image, masks


@pytest.mark.parametrize("seed", range(6))
def test_lsj_keeps_masks_aligned_with_the_image(seed):
    image, masks = _square_scene()
    for flip_prob in (0.0, 1.0):
        out = lsj_augment(image, masks, np.random.default_rng(seed), image_size=96, min_scale=0.5, max_scale=2.5,
                          flip_prob=flip_prob)
        colours = {0: (230, 20, 20), 1: (20, 200, 20)}
        for k, mask in zip(out.keep, out.masks):
            painted = (np.abs(out.image.astype(int) - colours[int(k)]).max(-1) < 40) & out.valid
            edge = ndimage.binary_dilation(mask, iterations=2) & ~ndimage.binary_erosion(mask, iterations=2)
            assert not (mask ^ painted)[~edge].any()  # away from the edges, mask == where that colour is
            assert (mask & painted).sum() >= 0.5 * mask.sum()
        if flip_prob == 1.0 and 0 in out.keep.tolist():
            # flipped: the red square (right of the input) is now left of the green one when both are kept
            red = out.masks[out.keep.tolist().index(0)]
            if 1 in out.keep.tolist():
                green = out.masks[out.keep.tolist().index(1)]
                assert np.nonzero(red)[1].mean() < np.nonzero(green)[1].mean()


def _reference_lsj(image, masks, seed, s, min_scale, max_scale):
    """detectron2's flip / ResizeScale / FixedSizeCrop on the masks through PIL, from the same draws."""
    rng = np.random.default_rng(seed)
    flip = rng.uniform() < 0.5
    scale = rng.uniform(min_scale, max_scale)
    h, w = masks.shape[1:]
    fit = min(s * scale / h, s * scale / w)
    nh, nw = (int(v) for v in np.round(np.multiply((h, w), fit)))
    u = rng.uniform(0.0, 1.0)
    oy, ox = (int(v) for v in np.round(np.multiply((max(nh - s, 0), max(nw - s, 0)), u)))
    out = np.zeros((len(masks), s, s), dtype=bool)
    for i, m in enumerate(masks):
        pil = Image.fromarray(m.astype(np.uint8) * 255)
        if flip:
            pil = pil.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
        r = np.asarray(pil.resize((nw, nh), Image.NEAREST))[oy: oy + s, ox: ox + s] > 0
        out[i, : r.shape[0], : r.shape[1]] = r
    image_out = np.asarray(Image.fromarray(image[:, ::-1] if flip else image).resize((nw, nh), Image.BILINEAR))
    return out, image_out[oy: oy + s, ox: ox + s]


@pytest.mark.parametrize("overlapping", [False, True])
@pytest.mark.parametrize("seed", range(8))
def test_lsj_equals_the_reference_transforms(seed, overlapping):
    rng = np.random.default_rng(100 + seed)
    h, w = (int(v) for v in rng.integers(20, 90, 2))
    labels = rng.integers(0, 6, (h // 4 + 1, w // 4 + 1)).repeat(4, 0).repeat(4, 1)[:h, :w]
    masks = np.stack([labels == k for k in range(6)])
    if overlapping:  # not a panoptic segmentation: each mask is resampled on its own
        masks = np.concatenate([masks, masks[1:2] | masks[4:5]])
    image = rng.integers(0, 256, (h, w, 3)).astype(np.uint8)
    out = lsj_augment(image, masks, np.random.default_rng(seed), image_size=64, min_scale=0.3, max_scale=2.0)
    expected_masks, expected_window = _reference_lsj(image, masks, seed, 64, 0.3, 2.0)
    kept = [k for k in range(len(masks)) if expected_masks[k].any()]
    assert out.keep.tolist() == kept
    np.testing.assert_array_equal(out.masks, expected_masks[kept])
    ch, cw = expected_window.shape[:2]
    assert np.abs(out.image[:ch, :cw].astype(int) - expected_window).max() <= 1  # PIL box resize: rounding only
    assert (out.image[ch:] == 128).all() and (out.image[:, cw:] == 128).all()
    assert out.valid[:ch, :cw].all() and out.valid.sum() == ch * cw


def test_lsj_shapes_determinism_and_dropped_masks():
    image, masks = _square_scene()
    drops = 0
    for seed in range(20):
        out = lsj_augment(image, masks, np.random.default_rng(seed), image_size=64)
        assert out.image.shape == (64, 64, 3) and out.image.dtype == np.uint8
        assert out.masks.shape == (len(out.keep), 64, 64) and out.masks.dtype == bool
        assert out.valid.shape == (64, 64) and out.keep.dtype == np.int64
        assert all(m.any() for m in out.masks)
        drops += len(masks) - len(out.keep)
        again = lsj_augment(image, masks, np.random.default_rng(seed), image_size=64)
        for a, b in zip(out, again):
            np.testing.assert_array_equal(a, b)
    assert drops > 0  # zoomed-in crops lose a square now and then
    a = lsj_augment(image, masks, np.random.default_rng(0), image_size=64).image
    b = lsj_augment(image, masks, np.random.default_rng(1), image_size=64).image
    assert not np.array_equal(a, b)
    # no masks, extreme aspect ratios
    for shape in ((5, 300), (300, 5), (1, 1)):
        out = lsj_augment(np.zeros((*shape, 3), np.uint8), np.zeros((0, *shape), bool), np.random.default_rng(0),
                          image_size=32)
        assert out.image.shape == (32, 32, 3) and out.masks.shape == (0, 32, 32)
    with pytest.raises(ValueError):
        lsj_augment(image, masks[:, :10], np.random.default_rng(0))


# ------------------------------------------------------------------------------------------------------------------
# targets and batches


def test_make_targets_and_collate():
    targets = make_targets(np.ones((2, 8, 8), dtype=np.uint8), [3, 1])
    assert targets["labels"].dtype == torch.int64 and targets["masks"].dtype == torch.bool
    with pytest.raises(ValueError):
        make_targets(np.ones((2, 8, 8)), [1])
    samples = [
        {"image": np.full((50, 60, 3), 7, np.uint8), "valid": np.ones((50, 60), bool),
         **make_targets(np.ones((2, 50, 60), bool), [0, 1])},
        {"image": np.full((64, 40, 3), 9, np.uint8), **make_targets(np.zeros((0, 64, 40), bool), [])},
    ]
    batch = collate(samples, size_divisibility=32)
    assert batch["images"].shape == (2, 3, 64, 64) and batch["images"].dtype == torch.uint8
    assert batch["image_sizes"] == [(50, 60), (64, 40)]
    assert batch["valid"].shape == (2, 64, 64)
    assert batch["valid"][0].sum() == 50 * 60 and batch["valid"][1].sum() == 64 * 40
    assert batch["images"][0, :, 50:].sum() == 0 and batch["images"][0, :, :50, :60].eq(7).all()
    first, second = batch["targets"]
    assert first["masks"].shape == (2, 64, 64) and first["masks"].sum() == 2 * 50 * 60
    assert second["masks"].shape == (0, 64, 64) and second["labels"].shape == (0,)
    x = normalize_images(batch["images"], batch["image_sizes"], (7.0, 7.0, 7.0), (2.0, 2.0, 2.0))
    assert x.dtype == torch.float32 and x.abs().sum() == x[1].abs().sum() > 0  # image 0 is its mean; padding 0
    assert x[1, :, :, 40:].abs().sum() == 0
    assert collate(samples, size_divisibility=1)["images"].shape == (2, 3, 64, 60)


def test_one_training_step_on_the_synthetic_dataset(synth_root, tiny_model):
    """Reader -> LSJ -> collate -> model -> criterion -> gradients on the head."""
    from fcclip.text import TextClassifierCache, build_text_classifier
    from fcclip.training import build_criterion, outputs_from_model

    ds = CocoPanoptic(synth_root, "train2017")
    vocab = ds.vocabulary(synonyms="coco_panoptic")
    text = build_text_classifier(tiny_model.backbone, vocab, cache=TextClassifierCache(enabled=False))
    rng = np.random.default_rng(0)
    samples = [train_sample(*ds.load(r), rng, image_size=64) for r in filter_empty(ds.records())[:2]]
    batch = collate(samples)
    inf = tiny_model.config.inference
    images = normalize_images(batch["images"], batch["image_sizes"], inf.pixel_mean, inf.pixel_std)
    # the reference's DEC_LAYERS counts the prediction from the learnable queries too
    criterion = build_criterion(vocab.num_classes, num_points=256,
                                dec_layers=tiny_model.sem_seg_head.predictor.num_layers + 1)
    tiny_model.train()
    try:
        out = tiny_model(images, text)
        losses = criterion(outputs_from_model(out), batch["targets"], generator=torch.Generator().manual_seed(0))
        assert set(losses) == set(criterion.weight_dict)
        total = criterion.total(losses)
        assert torch.isfinite(total)
        total.backward()
        assert tiny_model.sem_seg_head.predictor.query_feat.weight.grad is not None
        assert tiny_model.void_embedding.weight.grad is not None
    finally:
        tiny_model.zero_grad(set_to_none=True)
        tiny_model.eval()
