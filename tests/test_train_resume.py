"""`fcclip train --resume` continues a run with the settings it was started with (pipelines/train.py,
`run_settings`): a resume with other data, another vocabulary or another model config is refused in one line before
anything trains, a run from before the settings were recorded resumes as it did, and a run that stopped before its
first checkpoint takes corrected settings. One short run on a loopback S3 server, then resumes of it: the refused
ones end before Ray Train starts, the others are stopped where training would start."""
import json
import os
import shutil

import fsspec
import pytest
import yaml

from fcclip.config import train_config_path
from fcclip_pipelines.cli import main

try:  # imported before any capsys: Ray's log handler keeps the stderr it finds at import
    from ray.train.torch import TorchTrainer
except ImportError:
    pass


def test_the_refusal_names_each_setting_that_differs():
    """The pseudo-label options and --mix of a labeling output (its sources built by hand: no labeling run, no Ray)
    and the model config: each named with the run's value and the command's, the vocabulary by the classes only one
    side has."""
    import dataclasses

    from fcclip.datasets.labels import LabelSelection
    from fcclip.vocabulary import Vocabulary
    from fcclip_pipelines.train import SettingsMismatch, _differences, load_train_config, run_settings
    from fcclip_pipelines.train_data import TrainingData, TrainingSources

    vocabulary = Vocabulary.from_dict({"name": "run", "categories": [
        {"id": 1, "names": ["cat"]}, {"id": 2, "names": ["dog", "puppy"]}, {"id": 3, "names": ["sky"], "isthing": 0}]})
    labels = TrainingData("s3://lake/labels", "labels", vocabulary, {1: 0, 2: 1, 3: 2})
    cfg = load_train_config("fcclip-tiny-synthetic")
    recorded = run_settings(cfg, TrainingSources(vocabulary, [labels]), LabelSelection(min_score=0.5, drop=("car",)))
    assert _differences(recorded, recorded) == []

    fewer = Vocabulary.from_dict({"name": "run", "categories": [{"id": 1, "names": ["cat"]},
                                                                 {"id": 2, "names": ["dog", "puppy"]}]})
    coco = TrainingData("data/coco", "coco", fewer, {}, share=0.3)
    settings = run_settings(
        dataclasses.replace(cfg, solver=dataclasses.replace(cfg.solver, batch_size=8, max_iters=10)),
        TrainingSources(fewer, [dataclasses.replace(labels, share=0.7), coco]),
        LabelSelection(min_score=0.3, class_map=(("puppy", "dog"), ("kitty", "cat")), drop=("car", "sky")),
    )
    assert str(SettingsMismatch("s3://lake/runs/x", _differences(recorded, settings))) == (
        f"s3://lake/runs/x was trained with --mix none (this command says coco={os.path.abspath('data/coco')}:0.3); "
        "--min-score 0.5 (this command says 0.3); --class-map none (this command says puppy=dog kitty=cat); "
        "--drop car (this command says car; sky); a vocabulary of 3 classes with 3 sky [stuff] (this command says "
        "2 classes); the config's solver.batch_size 4 (this command says 8): resume with the run's settings, or "
        "start a new run with --name"
    )  # max_iters is no setting: --resume --max-iters N extends a run


def test_a_labeling_outputs_table_version_is_a_setting():
    """A labeling output's table version is recorded with the run; another one is refused by name; a run recorded
    before versions were resumes unchecked on them."""
    from fcclip.datasets.labels import LabelSelection
    from fcclip.vocabulary import Vocabulary
    from fcclip_pipelines.output import LabelingOutput
    from fcclip_pipelines.train import _differences, load_train_config, run_settings
    from fcclip_pipelines.train_data import TrainingData, TrainingSources

    vocabulary = Vocabulary.from_dict({"name": "run", "categories": [{"id": 1, "names": ["cat"]}]})
    cfg = load_train_config("fcclip-tiny-synthetic")

    def settings(version):
        output = LabelingOutput(dest="s3://lake/labels", fs=None, files=[], urls=[], columns=[],
                                vocabulary=vocabulary.to_dict(), version=version)
        data = TrainingData("s3://lake/labels", "labels", vocabulary, {1: 0}, output=output)
        return run_settings(cfg, TrainingSources(vocabulary, [data]), LabelSelection())

    recorded = settings(3)
    assert recorded["sources"] == [{"kind": "labels", "uri": "s3://lake/labels", "share": 1.0, "version": 3}]
    assert _differences(recorded, settings(3)) == []
    assert _differences(recorded, settings(5)) == [("--version", "3", "5")]
    assert _differences(recorded, settings(None)) == [("--version", "3", "(a folder of part files, no table)")]
    before = {**recorded, "sources": [{k: v for k, v in recorded["sources"][0].items() if k != "version"}]}
    assert _differences(before, settings(5)) == []


@pytest.fixture(scope="module")
def ray_local(s3_server):
    """A local Ray of 2 CPUs; started after the S3 server so that its workers inherit AWS_ENDPOINT_URL."""
    import ray

    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield ray
    ray.shutdown()


def _config(folder, **data):
    """The tiny synthetic recipe as a YAML in `folder`, named "run", checkpointing every 5 iterations, with `data`
    overriding its data fields."""
    config = yaml.safe_load(open(train_config_path("fcclip-tiny-synthetic")))
    config.update(name="run", checkpoint_every=5, log_every=5, eval_every=0)
    config["data"].update(data)
    folder.mkdir(exist_ok=True)
    path = folder / "run.yaml"
    path.write_text(yaml.safe_dump(config))
    return str(path)


def _files(uri):
    """Every file under `uri` with its size and ETag: what a refused command must leave as it was."""
    fs, path = fsspec.core.url_to_fs(uri)
    fs.invalidate_cache()
    return {p: (d["size"], d.get("ETag")) for p, d in fs.find(path, detail=True).items()}


@pytest.mark.ray
@pytest.mark.slow
def test_resume_with_other_settings_is_refused(ray_local, s3_bucket, tmp_path, capsys, monkeypatch):
    from fcclip.datasets.synthetic_panoptic import write_coco_panoptic

    data, copy = tmp_path / "coco", tmp_path / "coco-copy"
    write_coco_panoptic(data, 8, seed=0, size=(128, 160))
    shutil.copytree(data, copy)
    config = _config(tmp_path)
    storage = f"s3://{s3_bucket}/runs"
    run = f"{storage}/run"
    args = ["train", "--config", config, "--data", str(data), "--storage", storage]
    assert main([*args, "--max-iters", "5"]) == 0
    capsys.readouterr()
    with fsspec.open(f"{run}/fcclip_train.json") as f:
        recorded = json.load(f)
    assert recorded["sources"] == [{"kind": "coco", "uri": str(data), "share": 1.0}]
    assert recorded["selection"] == {"min_score": 0.0, "class_map": [], "keep": [], "drop": []}
    assert [c["id"] for c in recorded["vocabulary"]["categories"]] == [1, 3, 18, 187, 191, 193]
    assert recorded["config"] == {"name": "run", "model": "fcclip-tiny", "data.split": "train2017",
                                  "data.image_size": 128, "data.synonyms": "coco_panoptic", "solver.batch_size": 4}
    trained = _files(run)

    def refused(*changed, data_dir=data, config=config):
        assert main(["train", "--config", config, "--data", str(data_dir), "--storage", storage, "--resume",
                     "--max-iters", "10", *changed]) == 2
        err = capsys.readouterr().err
        assert len(err.splitlines()) == 1 and err.startswith(f"fcclip train: error: {run} was trained with ")
        assert err.rstrip().endswith(": resume with the run's settings, or start a new run with --name")
        assert _files(run) == trained  # nothing trained, nothing recorded
        return err

    # the same data in another folder
    assert f"was trained with --data {data} (this command says {copy}):" in refused(data_dir=copy)
    # another crop size
    other = _config(tmp_path / "other", image_size=96)
    err = refused(config=other)
    assert "was trained with the config's data.image_size 128 (this command says 96):" in err
    # the tree's classes changed under the same URI: the class head's would mean other things
    annotations = data / "annotations" / "panoptic_train2017.json"
    original = annotations.read_text()
    tree = json.loads(original)
    for c in [*tree["categories"], *(s for a in tree["annotations"] for s in a["segments_info"])]:
        key = "id" if "name" in c else "category_id"
        c[key] = 20 if c[key] == 18 else c[key]
    annotations.write_text(json.dumps(tree))
    err = refused()
    annotations.write_text(original)
    assert "was trained with a vocabulary of 6 classes with 18 dog" in err
    assert "(this command says 6 classes with 20 " in err
    # several at once: each named
    err = refused(data_dir=copy, config=other)
    assert f"--data {data} (this command says {copy}); the config's data.image_size 128 (this command says 96):" in err

    # what passes the check goes on to train (`fit` stands in: tests/test_train.py resumes a run for real)
    def started(*argv):
        with monkeypatch.context() as m:
            m.setattr(TorchTrainer, "fit", _stop)
            with pytest.raises(_Started):
                main(["train", "--config", config, "--storage", storage, "--resume", *argv])

    # the same settings, another --max-iters, --data as a relative path: the file stays as it was
    monkeypatch.chdir(data.parent)
    started("--data", data.name, "--max-iters", "20")
    assert _files(run) == trained
    # a run that stopped before its first checkpoint trained nothing: its re-run may correct the settings
    early = f"{storage}/early"
    with fsspec.open(f"{early}/fcclip_train.json", "w") as f:
        json.dump({**recorded, "config": {**recorded["config"], "data.image_size": 256}}, f)
    started("--data", str(data), "--name", "early")
    with fsspec.open(f"{early}/fcclip_train.json") as f:
        assert json.load(f) == recorded
    # a run from before the settings were recorded resumes unchecked, and records them from then on
    fsspec.filesystem("s3").rm(f"{run}/fcclip_train.json".removeprefix("s3://"))
    started("--data", str(copy), "--max-iters", "20")
    with fsspec.open(f"{run}/fcclip_train.json") as f:
        assert json.load(f)["sources"][0]["uri"] == str(copy)


class _Started(Exception):
    pass


def _stop(*args, **kwargs):
    raise _Started
