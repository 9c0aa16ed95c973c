"""`fcclip train --data DEST --mix coco=ROOT:SHARE` on a local Ray: both sources opened into one training vocabulary,
and bad ``--mix`` specs refused before Ray Train starts; `fcclip eval --data` of the labeling model against its own
labels. A two-worker run with --mix (one worker killed mid-run) is
tests/test_train.py::test_killed_worker_resumes_from_the_latest_checkpoint."""
import re

import pytest

from fcclip_pipelines.cli import main

try:  # imported before any capsys: Ray's log handler keeps the stderr it finds at import
    import ray.train  # noqa: F401
except ImportError:
    pass

# the labeling run's classes: "puppy" is COCO's dog by its synonym, "lawn, grass" COCO's grass; kite and water are
# the run's own
LABEL_VOCABULARY = "puppy; kite; lawn, grass [stuff]; water [stuff]"




@pytest.fixture(scope="module")
def coco(tmp_path_factory):
    """8 synthetic COCO-panoptic training images, 128 x 160 (categories person, car, dog, sky, pavement, grass)."""
    from fcclip.datasets.synthetic_panoptic import write_coco_panoptic

    root = tmp_path_factory.mktemp("coco")
    write_coco_panoptic(root, 8, seed=0, size=(128, 160), also_val=False)
    return str(root)


@pytest.fixture(scope="module")
def labels(ray_local, tmp_path_factory):
    """A labeling output (`fcclip label`, fcclip-tiny with random weights) of 8 other synthetic images."""
    from fcclip.datasets.synthetic_panoptic import write_coco_panoptic

    images = tmp_path_factory.mktemp("unlabeled")
    write_coco_panoptic(images, 8, seed=1, size=(128, 160), also_val=False)
    dest = str(tmp_path_factory.mktemp("labels") / "out")
    assert main(["label", str(images / "train2017"), "--out", dest, "--vocab", LABEL_VOCABULARY, "--model",
                 "fcclip-tiny", "--weights", "random", "--short-edge", "0", "--shard-size", "4",
                 "--no-progress"]) == 0
    return dest


@pytest.mark.ray
def test_sources_open_into_one_vocabulary_either_way(coco, labels):
    from fcclip.datasets.labels import LabelSelection
    from fcclip_pipelines.train_data import MixSpec, open_training_sources

    run = {c.label: c.id for c in open_training_sources(labels, split="train2017", synonyms=None).vocabulary
           .categories}
    union, (pseudo, gt) = open_training_sources(labels, MixSpec("coco", coco, 0.5), split="train2017",
                                                synonyms="coco_panoptic")
    assert union.labels == ("puppy", "kite", "lawn", "water", "person", "car", "sky", "pavement")
    assert union.categories[0].names == ("puppy", "dog", "dogs", "puppies")  # COCO's synonyms join the match
    assert (pseudo.kind, pseudo.share, gt.kind, gt.share) == ("labels", 0.5, "coco", 0.5)
    assert pseudo.class_index == {run["puppy"]: 0, run["kite"]: 1, run["lawn"]: 2, run["water"]: 3}
    assert gt.class_index == {18: 0, 193: 2, 1: 4, 3: 5, 187: 6, 191: 7}  # dog -> puppy, grass -> lawn

    # the other way round: COCO's classes first; the pseudo-label options still go to the labeling output
    union, (gt, pseudo) = open_training_sources(coco, MixSpec("labels", labels, 0.3), split="train2017",
                                                synonyms="coco_panoptic", selection=LabelSelection(drop=("water",)))
    assert union.labels == ("person", "car", "dog", "sky", "pavement", "grass", "kite")
    assert (gt.share, pseudo.share) == (pytest.approx(0.7), 0.3)
    assert gt.class_index == {1: 0, 3: 1, 18: 2, 187: 3, 191: 4, 193: 5}
    assert pseudo.class_index == {run["puppy"]: 2, run["kite"]: 6, run["lawn"]: 5}  # water dropped


@pytest.mark.ray
def test_bad_mix_specs_are_refused_before_training(coco, labels, tmp_path, capsys):
    args = ["train", "--config", "fcclip-tiny-synthetic", "--storage", str(tmp_path / "runs")]
    for data, mix, message in [
        (labels, f"coco={coco}:1.5", "the share must be between 0 and 1"),
        (labels, f"imagenet={coco}:0.5", "unknown source kind 'imagenet'"),
        (labels, f"coco={tmp_path / 'nowhere'}:0.5", f"--mix coco={tmp_path / 'nowhere'}: .* is neither a COCO"),
        (labels, f"coco={labels}:0.5", "not a COCO panoptic tree \\(it is a labeling output\\)"),
        (labels, f"labels={labels}:0.5", "is a labeling output too; mix a COCO panoptic tree with a labeling output"),
        (coco, f"coco={coco}:0.5", "is a COCO panoptic tree too"),
    ]:
        assert main([*args, "--data", data, "--mix", mix]) == 2, mix
        err = capsys.readouterr().err
        assert err.startswith("fcclip train: error: --mix") and re.search(message, err), err
    assert not (tmp_path / "runs").exists()


@pytest.mark.ray
def test_eval_of_the_labeling_model_against_its_own_labels_is_perfect(labels, tmp_path, capsys):
    """`fcclip eval --data DEST` takes the pseudo-labels as ground truth: the model and weights that wrote them, at
    the same test size, agree with them exactly (PQ 1.0 on every image)."""
    import json

    out = tmp_path / "self.json"
    assert main(["eval", "--model", "fcclip-tiny", "--weights", "random", "--data", labels, "--short-edge", "0",
                 "--out", str(out), "--no-progress"]) == 0
    capsys.readouterr()
    result = json.loads(out.read_text())
    assert result["images"] == 8 and result["failed"] == 0
    panoptic = result["panoptic"]["All"]
    assert panoptic["n"] > 0 and panoptic["pq"] == pytest.approx(1.0, abs=1e-9)
