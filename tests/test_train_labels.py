"""Training on pseudo-labels without Ray: the training vocabulary of a labeling run (class map, keep, drop), a row's
targets with low-score segments as ignore regions, ignore regions through LSJ and packing, and the criterion that
leaves them out of the mask losses."""
import numpy as np
import pytest
import torch

from fcclip.datasets.labels import LabelSelection, parse_class_map, row_targets, training_classes
from fcclip.masks import encode_rle
from fcclip.training.criterion import build_criterion
from fcclip.training.data import collate, pack_sample, train_sample, unpack_sample
from fcclip.training.ignore import IgnoreRegionCriterion, build_ignore_criterion

RUN_VOCABULARY = {
    "name": "run",
    "categories": [
        {"id": 1, "names": ["person", "human"], "isthing": 1, "color": [220, 20, 60]},
        {"id": 3, "names": ["car"], "isthing": 1, "color": [0, 0, 142]},
        {"id": 18, "names": ["dog", "puppy"], "isthing": 1, "color": [0, 226, 252]},
        {"id": 187, "names": ["sky"], "isthing": 0, "color": [70, 130, 180]},
        {"id": 193, "names": ["grass"], "isthing": 0, "color": [152, 251, 152]},
    ],
}


def _names(vocabulary):
    return [(c.id, list(c.names), bool(c.is_thing)) for c in vocabulary.categories]


def test_training_classes_default_is_the_run_vocabulary():
    vocabulary, index = training_classes(RUN_VOCABULARY)
    assert _names(vocabulary) == [(1, ["person", "human"], True), (3, ["car"], True), (18, ["dog", "puppy"], True),
                                  (187, ["sky"], False), (193, ["grass"], False)]
    assert index == {1: 0, 3: 1, 18: 2, 187: 3, 193: 4}


def test_class_map_merges_renames_keeps_and_drops():
    # dog merged into the existing person class (by a synonym), car renamed, grass dropped
    sel = LabelSelection(class_map=parse_class_map(["puppy=person", "3=vehicle"]), drop=("grass",))
    vocabulary, index = training_classes(RUN_VOCABULARY, sel)
    assert _names(vocabulary) == [(1, ["person", "human"], True), (3, ["vehicle"], True), (187, ["sky"], False)]
    assert index == {1: 0, 18: 0, 3: 1, 187: 2}
    # two classes onto one new name: one class, with the first one's id
    vocabulary, index = training_classes(RUN_VOCABULARY, LabelSelection(class_map=(("person", "animal"),
                                                                                  ("dog", "animal"))))
    assert _names(vocabulary)[0] == (1, ["animal"], True) and index[1] == index[18] == 0
    # keep: only those (after the map)
    vocabulary, index = training_classes(RUN_VOCABULARY, LabelSelection(keep=("sky", "car")))
    assert [c.names[0] for c in vocabulary.categories] == ["car", "sky"] and index == {3: 0, 187: 1}


def test_class_map_errors_name_the_class():
    with pytest.raises(ValueError, match="no class 'cat'.*person, car, dog, sky, grass"):
        training_classes(RUN_VOCABULARY, LabelSelection(class_map=(("cat", "dog"),)))
    with pytest.raises(ValueError, match="--keep: no training class 'dog'"):  # renamed away by the map
        training_classes(RUN_VOCABULARY, LabelSelection(class_map=(("dog", "canine"),), keep=("dog",)))
    with pytest.raises(ValueError, match="merges things and stuff"):
        training_classes(RUN_VOCABULARY, LabelSelection(class_map=(("sky", "car"),)))
    with pytest.raises(ValueError, match="leave no class"):
        training_classes(RUN_VOCABULARY, LabelSelection(drop=("person", "car", "dog", "sky", "grass")))
    with pytest.raises(ValueError, match="expected OLD=NEW"):
        parse_class_map(["dog"])
    assert parse_class_map(["a=b, c = d", "e=f"]) == (("a", "b"), ("c", "d"), ("e", "f"))


def _segment(sid, category_id, mask, score):
    return {"id": sid, "category_id": category_id, "score": score, "rle": encode_rle(mask)}


def test_row_targets_low_scores_become_ignore_and_dropped_classes_background():
    h, w = 6, 8
    sky = np.zeros((h, w), bool)
    sky[:2] = True
    dog = np.zeros((h, w), bool)
    dog[3:5, 1:3] = True
    car = np.zeros((h, w), bool)
    car[3:6, 5:8] = True
    grass = np.zeros((h, w), bool)
    grass[2] = True
    segments = [_segment(1, 187, sky, 0.9), _segment(2, 18, dog, 0.3), _segment(3, 3, car, 0.8),
                _segment(4, 193, grass, 0.95)]
    _, index = training_classes(RUN_VOCABULARY, LabelSelection(drop=("grass",)))
    masks, classes, ignore = row_targets(segments, h, w, index, min_score=0.5)
    assert classes.tolist() == [3, 1]  # sky, car; the dog scored 0.3; grass is dropped
    assert np.array_equal(masks[0], sky) and np.array_equal(masks[1], car)
    assert np.array_equal(ignore, dog)  # the dog's pixels: ignored, not background; grass pixels: background
    masks, classes, ignore = row_targets(segments, h, w, index)  # min_score 0: every segment a target
    assert classes.tolist() == [3, 2, 1] and not ignore.any()
    with pytest.raises(ValueError, match="segment 1's mask is 8 x 6, the image 9 x 6"):
        row_targets(segments, h, w + 1, index)


def test_ignore_region_goes_through_lsj_with_the_masks_and_packs():
    rng = np.random.default_rng(0)
    h, w = 40, 50
    image = rng.integers(0, 255, (h, w, 3), dtype=np.uint8)
    ids = np.zeros((h, w), np.int64)
    ids[:, :20] = 1
    ids[:, 20:35] = 2
    ids[:, 35:] = 3
    masks = np.stack([ids == 1, ids == 3])
    ignore = ids == 2
    lsj = {"image_size": 32, "min_scale": 0.5, "max_scale": 1.5}
    plain = train_sample(image, np.stack([ids == 1, ids == 2, ids == 3]), np.array([0, 1, 2]), None,
                         np.random.default_rng(7), **lsj)
    sample = train_sample(image, masks, np.array([0, 2]), None, np.random.default_rng(7), ignore=ignore, **lsj)
    # the same draws: the ignore region is exactly where segment 2 went; the targets are the other two
    by_label = dict(zip(plain["labels"].tolist(), plain["masks"]))
    assert np.array_equal(sample["ignore"], by_label.get(1, torch.zeros(32, 32, dtype=torch.bool)).numpy())
    assert sample["labels"].tolist() == [k for k in plain["labels"].tolist() if k != 1]
    for k, m in zip(sample["labels"].tolist(), sample["masks"]):
        assert torch.equal(m, by_label[k])
    assert np.array_equal(sample["image"], plain["image"])

    back = unpack_sample(pack_sample(sample))
    assert torch.equal(back["masks"], sample["masks"]) and torch.equal(back["labels"], sample["labels"])
    assert np.array_equal(back["ignore"], sample["ignore"]) and np.array_equal(back["valid"], sample["valid"])
    batch = collate([back, {k: v for k, v in back.items() if k != "ignore"}])
    assert torch.equal(batch["targets"][0]["ignore"], torch.as_tensor(sample["ignore"]))
    assert not batch["targets"][1]["ignore"].any()
    assert "ignore" not in collate([{k: v for k, v in back.items() if k != "ignore"}])["targets"][0]


def _outputs(q=1, k=2, size=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    return {"pred_logits": torch.randn(1, q, k + 1, generator=g),
            "pred_masks": torch.randn(1, q, size, size, generator=g) * 3}


def test_criterion_leaves_the_ignore_region_out_of_the_mask_losses():
    size = 16
    target_mask = torch.zeros(size, size, dtype=torch.bool)
    target_mask[:, :8] = True
    ignore = torch.zeros(size, size, dtype=torch.bool)
    ignore[:, 8:] = True
    # uniform points (no importance sampling), so that the points do not depend on the predictions
    criterion = build_ignore_criterion(2, num_points=256, dec_layers=1, importance_sample_ratio=0.0,
                                       oversample_ratio=1.0)
    assert isinstance(criterion, IgnoreRegionCriterion)

    def losses(outputs, with_ignore):
        target = {"labels": torch.tensor([1]), "masks": target_mask[None]}
        if with_ignore is not None:
            target["ignore"] = with_ignore
        return criterion(outputs, [target], num_masks=1.0, generator=torch.Generator().manual_seed(1))

    # without ignore pixels: exactly the reference criterion's losses
    outputs = _outputs()
    reference = build_criterion(2, num_points=256, dec_layers=1, importance_sample_ratio=0.0, oversample_ratio=1.0)(
        outputs, [{"labels": torch.tensor([1]), "masks": target_mask[None]}], num_masks=1.0,
        generator=torch.Generator().manual_seed(1))
    for key, value in losses(outputs, torch.zeros(size, size, dtype=torch.bool)).items():
        assert torch.equal(value, reference[key]), key

    # with the right half ignored, whatever the predictions do there changes no mask loss (columns >= 9: a point
    # just left of the border interpolates column 8)...
    a, b = _outputs(), _outputs()
    b["pred_masks"][..., 9:] = -a["pred_masks"][..., 9:] + 5.0
    la, lb = losses(a, ignore), losses(b, ignore)
    for key in ("loss_mask", "loss_dice"):
        assert la[key] == pytest.approx(float(lb[key]), abs=1e-6), key
    # ... while without the ignore region it does
    assert losses(a, None)["loss_mask"] != pytest.approx(float(losses(b, None)["loss_mask"]), abs=1e-3)
    # a prediction that is right on the left half and confidently wrong on the ignored right half costs a fraction
    # of what it costs without the ignore region (what remains comes from the sampling's blur at the borders)
    c = {"pred_logits": a["pred_logits"], "pred_masks": torch.full((1, 1, size, size), 10.0)}
    with_ignore, without = losses(c, ignore), losses(c, None)
    for key in ("loss_mask", "loss_dice"):
        assert float(with_ignore[key]) < 0.2 * float(without[key]), (key, with_ignore[key], without[key])
