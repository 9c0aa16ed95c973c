"""`fcclip train --data DEST --mix coco=ROOT:SHARE` on a local Ray: both sources opened into one training vocabulary,
bad ``--mix`` specs refused before Ray Train starts, and a tiny run on two workers with checkpoints on a loopback S3
server that draws from both sources and ends with a checkpoint whose class head is the union's."""
import math
import re
from pathlib import Path

import pytest
import torch
import yaml

from fcclip.config import train_config_path
from pipelines.cli import main

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

    images = tmp_path_factory.mktemp("unlabelled")
    write_coco_panoptic(images, 8, seed=1, size=(128, 160), also_val=False)
    dest = str(tmp_path_factory.mktemp("labels") / "out")
    assert main(["label", str(images / "train2017"), "--out", dest, "--vocab", LABEL_VOCABULARY, "--model",
                 "fcclip-tiny", "--weights", "random", "--short-edge", "0", "--shard-size", "4",
                 "--no-progress"]) == 0
    return dest


@pytest.mark.ray
def test_sources_open_into_one_vocabulary_either_way(coco, labels):
    from fcclip.datasets.labels import LabelSelection
    from pipelines.train_data import MixSpec, open_training_sources

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


def _config(tmp_path):
    data = yaml.safe_load(open(train_config_path("fcclip-tiny-synthetic")))
    data.update(name="mix", checkpoint_every=10, log_every=10, keep_checkpoints=2, eval_every=0)
    path = tmp_path / "mix.yaml"
    path.write_text(yaml.safe_dump(data))
    return str(path)


@pytest.mark.ray
@pytest.mark.slow
def test_train_on_pseudo_labels_mixed_with_coco(coco, labels, s3_bucket, tmp_path, capsys, caplog):
    """Two workers (DDP over gloo), checkpoints on the loopback S3 server, samples from both sources; the final
    checkpoint, read from S3, predicts with the union vocabulary."""
    import logging
    import warnings

    import fsspec

    import fcclip
    from pipelines.train import load_train_config, lr_factor
    from pipelines.train_data import MixSpec, open_training_sources

    storage = f"s3://{s3_bucket}/runs"
    config = _config(tmp_path)
    caplog.set_level(logging.INFO, logger="fcclip.train")
    code = main(["train", "--config", config, "--data", labels, "--mix", f"coco={coco}:0.5",
                 "--storage", storage, "--num-workers", "2", "--cpus-per-worker", "0.5", "--max-iters", "20"])
    captured = capsys.readouterr()
    assert code == 0, captured.err[-3000:]
    assert ("training vocabulary: 8 classes (the union of 4 of the labeling output and 6 of the COCO panoptic "
            "tree); samples: 50% labels, 50% coco") in caplog.text
    finals = [line for line in captured.out.splitlines() if line.startswith("final checkpoint: ")]
    assert len(finals) == 1, captured.out
    final = finals[0].split(": ", 1)[1]
    assert final.startswith(f"{storage}/mix/checkpoint_") and final.endswith("/model.pth")
    assert "trained to iteration 20" in captured.out

    # both sources were read: worker 0's counts, 20 iterations x 2 samples (half the global batch), about half each.
    # Two workers: they must draw from the labeling output at the same steps, or Ray Train's split of it blocks one
    # of them while the other waits in the all-reduce (the run would hang)
    drawn = re.search(r"samples drawn by worker 0 since it started: labels (\d+) \(\d+%\), coco (\d+) \(\d+%\)",
                      captured.out)
    assert drawn, captured.out
    n_labels, n_coco = int(drawn[1]), int(drawn[2])
    assert n_labels + n_coco == 40 and abs(n_coco - 20) < 4 * math.sqrt(40 * 0.25), (n_labels, n_coco)
    frame = ray.train.Result.from_path(f"{storage}/mix").metrics_dataframe
    assert frame["iteration"].tolist() == [10, 20] and frame["start_iteration"].tolist() == [0, 0]
    assert (frame["samples_from_labels"] + frame["samples_from_coco"]).tolist() == [20, 40]
    assert all(math.isfinite(v) for v in frame.select_dtypes("number").to_numpy().ravel())
    solver = load_train_config(config).solver
    assert frame["lr"].tolist() == pytest.approx([solver.lr * lr_factor(i, solver) for i in (10, 20)])
    assert frame["samples_per_s"].gt(0).all() and frame["data_wait_share"].between(0, 1).all()

    # the checkpoint: the training state at iteration 20, and a class head that follows the union vocabulary
    with fsspec.open(final.rsplit("/", 1)[0] + "/state.pt", "rb") as f:
        state = torch.load(f, map_location="cpu", weights_only=True)
    assert state["iteration"] == 20 and state["scheduler"]["last_epoch"] == 20
    with fsspec.open(final, "rb") as f:
        weights = torch.load(f, map_location="cpu", weights_only=True)["model"]
    assert weights["criterion.empty_weight"].shape == (9,)  # 8 classes + no-object

    # ... which predicts, its s3:// URI as the weights, with that vocabulary
    union = open_training_sources(labels, MixSpec("coco", coco, 0.5), split="train2017",
                                  synonyms="coco_panoptic")[0]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = fcclip.build_model("fcclip-tiny", weights=final, device="cpu")
    assert model.weights_id.startswith("sha256:")
    image = sorted((Path(coco) / "train2017").glob("*.jpg"))[0]
    pred = fcclip.Predictor(model, union, short_edge=None)(str(image)).panoptic
    assert pred.segment_map.shape == (128, 160)
    assert {s["category_id"] for s in pred.segments} <= {c.id for c in union.categories}
