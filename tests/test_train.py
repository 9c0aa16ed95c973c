"""`fcclip train` (pipelines/train.py): schedule, weight decay and config units; a two-worker Ray Train run on CPU
(gloo) with checkpoints on a loopback S3 server, on a labeling output read from S3 mixed with a COCO tree, one worker
killed mid-run, its final checkpoint predicting; what --data is, and how a labeling output's rows are read. That
training learns (PQ on held-out images far above the untrained model's), a stopped run resumed with --resume, and
periodic validation PQ are in tests/test_pseudo_label_loop.py; a resume with other settings is refused in
tests/test_train_resume.py."""
import math
import os
import signal
import threading
import time
import warnings

import pytest
import torch
import yaml

from fcclip.config import ConfigError, list_train_configs, train_config_path
from fcclip_pipelines.cli import main
from fcclip_pipelines.train import (
    DataConfig,
    SolverConfig,
    TrainConfig,
    load_train_config,
    lr_factor,
    param_groups,
)

try:  # imported before any capsys: Ray's log handler keeps the stderr it finds at import
    import ray.train  # noqa: F401
except ImportError:
    pass

PAPER = "fcclip-convnext-large-coco"  # packaged training configs, by name
TINY = str(train_config_path("fcclip-tiny-synthetic"))  # ... and by path


# ---------------------------------------------------------------------------------------------------- units
def test_lr_factor_warmup_then_steps():
    solver = SolverConfig(lr=1.0, warmup_iters=4, warmup_factor=0.1, steps=(10, 20), gamma=0.1)
    # linear warmup from warmup_factor (detectron2's WarmupMultiStepLR, "linear"), then x gamma at each step
    expected = {0: 0.1, 1: 0.325, 2: 0.55, 3: 0.775, 4: 1.0, 9: 1.0, 10: 0.1, 19: 0.1, 20: 0.01, 10_000: 0.01}
    for iteration, factor in expected.items():
        assert lr_factor(iteration, solver) == pytest.approx(factor, rel=1e-12), iteration
    # a step inside the warmup multiplies the warmup factor
    assert lr_factor(2, SolverConfig(warmup_iters=4, warmup_factor=0.1, steps=(1,), gamma=0.5)) == pytest.approx(0.275)


def test_lr_schedule_of_the_paper():
    solver = load_train_config(PAPER).solver
    # warmup_factor 1.0: the 10 warmup iterations keep the base rate, as in the reference
    assert [lr_factor(i, solver) for i in (0, 5, 10, 327_777)] == [1.0, 1.0, 1.0, 1.0]
    assert lr_factor(327_778, solver) == pytest.approx(0.1)
    assert lr_factor(355_091, solver) == pytest.approx(0.1)
    assert lr_factor(355_092, solver) == pytest.approx(0.01)
    assert lr_factor(368_749, solver) == pytest.approx(0.01)


def test_lr_schedule_drives_the_optimizer():
    """The training loop's LambdaLR: after k optimizer steps the rate is lr * lr_factor(k); a reloaded scheduler
    (and optimizer) continues where it stopped."""
    solver = SolverConfig(lr=0.5, warmup_iters=3, warmup_factor=0.2, steps=(5,), gamma=0.1)

    def make():
        p = torch.nn.Parameter(torch.zeros(2))
        opt = torch.optim.AdamW([{"params": [p], "lr": solver.lr, "weight_decay": 0.0}], lr=solver.lr)
        return p, opt, torch.optim.lr_scheduler.LambdaLR(opt, lambda it: lr_factor(it, solver))

    p, opt, sched = make()
    seen = [opt.param_groups[0]["lr"]]
    for _ in range(4):
        p.grad = torch.ones(2)
        opt.step()
        sched.step()
        seen.append(opt.param_groups[0]["lr"])
    assert seen == pytest.approx([solver.lr * lr_factor(k, solver) for k in range(5)])
    _, opt2, sched2 = make()
    opt2.load_state_dict(opt.state_dict())
    sched2.load_state_dict(sched.state_dict())
    assert sched2.last_epoch == 4
    for k in range(5, 8):
        opt2.step()
        sched2.step()
        assert opt2.param_groups[0]["lr"] == pytest.approx(solver.lr * lr_factor(k, solver))


def _decay(groups) -> dict[int, float]:
    """id(parameter) -> its weight decay."""
    return {id(p): g["weight_decay"] for g in groups for p in g["params"]}


def test_weight_decay_groups_on_a_hand_built_module():
    class Net(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.linear = torch.nn.Linear(4, 4)
            self.conv = torch.nn.Conv2d(4, 4, 1)
            self.ln = torch.nn.LayerNorm(4)
            self.gn = torch.nn.GroupNorm(2, 4)
            self.bn = torch.nn.BatchNorm2d(4)
            self.embed = torch.nn.Embedding(3, 4)
            self.free = torch.nn.Parameter(torch.zeros(4))  # a bare parameter: decayed, as the reference does
            self.frozen = torch.nn.Linear(4, 4).requires_grad_(False)
            self.shared = self.linear  # the same module twice: its parameters once

    net = Net()
    groups = param_groups(net, SolverConfig(lr=0.1, weight_decay=0.05, weight_decay_norm=0.0, weight_decay_embed=0.0))
    decay = _decay(groups)
    assert [(g["lr"], g["weight_decay"]) for g in groups] == [(0.1, 0.05), (0.1, 0.0)]  # one per (lr, decay)
    assert len(decay) == sum(len(g["params"]) for g in groups)  # every parameter once
    names = {id(p): n for n, p in net.named_parameters()}
    by_name = {names[k]: v for k, v in decay.items()}
    assert by_name == {
        "free": 0.05,
        "linear.weight": 0.05, "linear.bias": 0.05, "conv.weight": 0.05, "conv.bias": 0.05,
        "ln.weight": 0.0, "ln.bias": 0.0, "gn.weight": 0.0, "gn.bias": 0.0, "bn.weight": 0.0, "bn.bias": 0.0,
        "embed.weight": 0.0,
    }
    # the norm and embedding rates are their own settings
    groups = param_groups(net, SolverConfig(weight_decay=0.05, weight_decay_norm=0.01, weight_decay_embed=0.02))
    by_name = {names[k]: v for k, v in _decay(groups).items()}
    assert by_name["ln.weight"] == 0.01 and by_name["embed.weight"] == 0.02 and by_name["conv.weight"] == 0.05


def test_weight_decay_groups_on_the_tiny_model(tiny_model):
    groups = param_groups(tiny_model, SolverConfig())
    trainable = {id(p) for p in tiny_model.parameters() if p.requires_grad}
    decay = _decay(groups)
    assert set(decay) == trainable and sum(len(g["params"]) for g in groups) == len(trainable)
    assert len(groups) == 2  # (lr, 0.05) and (lr, 0): not one per tensor
    assert not any(id(p) in trainable for p in tiny_model.backbone.parameters())  # the CLIP is frozen
    norm_types = (torch.nn.LayerNorm, torch.nn.GroupNorm, torch.nn.BatchNorm2d)
    kinds = {"norm": set(), "embedding": set(), "other": set()}
    for module in tiny_model.modules():
        kind = ("norm" if isinstance(module, norm_types) else
                "embedding" if isinstance(module, torch.nn.Embedding) else "other")
        for p in module.parameters(recurse=False):
            if id(p) in trainable:
                kinds[kind].add(decay[id(p)])
    # decoder query_feat / query_embed / level_embed and the void embedding are nn.Embedding tables
    assert kinds == {"norm": {0.0}, "embedding": {0.0}, "other": {0.05}}


def _write(path, data):
    path.write_text(yaml.safe_dump(data))
    return str(path)


def test_config_keys_are_strict(tmp_path, capsys):
    base = yaml.safe_load(open(TINY))
    cfg = load_train_config(_write(tmp_path / "ok.yaml", base))
    assert isinstance(cfg, TrainConfig) and cfg.solver.steps == (150,) and isinstance(cfg.data, DataConfig)

    with pytest.raises(ValueError, match=r"unknown key\(s\) \['checkpoint_evry'\]"):
        load_train_config(_write(tmp_path / "top.yaml", {**base, "checkpoint_evry": 5}))
    with pytest.raises(ValueError, match=r"solver: unknown key\(s\) \['lrr'\]"):
        load_train_config(_write(tmp_path / "solver.yaml", {**base, "solver": {**base["solver"], "lrr": 1}}))
    with pytest.raises(ValueError, match=r"data: unknown key\(s\) \['crop'\]"):
        load_train_config(_write(tmp_path / "data.yaml", {**base, "data": {"crop": 64}}))
    with pytest.raises(ValueError, match="loss: expected a mapping"):
        load_train_config(_write(tmp_path / "loss.yaml", {**base, "loss": [1, 2]}))
    with pytest.raises(ValueError, match="'model' is required"):
        load_train_config(_write(tmp_path / "nomodel.yaml", {k: v for k, v in base.items() if k != "model"}))

    # the command refuses it before starting anything
    bad = _write(tmp_path / "bad.yaml", {**base, "solver": {**base["solver"], "lrr": 1}})
    code = main(["train", "--config", bad, "--data", str(tmp_path), "--storage", str(tmp_path / "runs")])
    assert code == 2
    err = capsys.readouterr().err
    assert "fcclip train: error:" in err and "['lrr']" in err
    assert not (tmp_path / "runs").exists()


def test_packaged_configs_by_name_or_path(tmp_path, capsys):
    assert {"fcclip-convnext-large-coco", "fcclip-tiny-synthetic"} <= set(list_train_configs())
    by_name, by_path = load_train_config("fcclip-tiny-synthetic"), load_train_config(TINY)
    assert by_name == by_path and by_name.name == "fcclip-tiny-synthetic" and by_name.model == "fcclip-tiny"
    with pytest.raises(ConfigError, match="unknown training config 'fcclip-tiny-synthtic'.*fcclip-tiny-synthetic"):
        load_train_config("fcclip-tiny-synthtic")
    with pytest.raises(FileNotFoundError, match="nowhere.yaml"):
        load_train_config(str(tmp_path / "nowhere.yaml"))
    # the command says so before starting anything
    code = main(["train", "--config", "fcclip-tiny-synthtic", "--data", str(tmp_path), "--storage",
                 str(tmp_path / "runs")])
    assert code == 2 and "unknown training config" in capsys.readouterr().err
    assert not (tmp_path / "runs").exists()


def test_paper_config_is_the_reference_recipe():
    from fcclip.config import load_config

    cfg = load_train_config(PAPER)
    assert cfg.model == "fcclip-convnext-large" and cfg.weights == "clip"
    s = cfg.solver
    assert (s.batch_size, s.lr, s.weight_decay, s.max_iters) == (16, 1e-4, 0.05, 368_750)
    assert s.steps == (327_778, 355_092) and s.gamma == 0.1
    assert (s.warmup_iters, s.warmup_factor) == (10, 1.0)
    assert s.clip_grad == 0.01 and s.amp is True
    assert (s.weight_decay_norm, s.weight_decay_embed) == (0.0, 0.0)
    d = cfg.data
    assert (d.image_size, d.min_scale, d.max_scale, d.split, d.synonyms) == (1024, 0.1, 2.0, "train2017", "coco_panoptic")
    lo = cfg.loss
    assert (lo.class_weight, lo.mask_weight, lo.dice_weight, lo.no_object_weight) == (2.0, 5.0, 5.0, 0.1)
    assert (lo.num_points, lo.oversample_ratio, lo.importance_sample_ratio) == (12544, 3.0, 0.75)
    # 250 queries and the decoder's size come from the model preset
    head = load_config(cfg.model).head
    assert head.num_queries == 250 and head.decoder_layers == 9 and head.hidden_dim == 256
    # the dataclass defaults are the paper's too (the YAML only spells them out)
    assert s == SolverConfig() and lo == type(lo)()


# ---------------------------------------------------------------------------------------------------- Ray Train
@pytest.fixture(scope="module")
def ray_local(s3_server):
    """A local Ray of 2 CPUs; started after the S3 server so that its workers inherit AWS_ENDPOINT_URL."""
    import ray

    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield ray
    ray.shutdown()


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    """8 synthetic COCO-panoptic training images, 128 x 160."""
    from fcclip.datasets.synthetic_panoptic import write_coco_panoptic

    root = tmp_path_factory.mktemp("synthetic")
    write_coco_panoptic(root, 8, seed=0, size=(128, 160))
    return str(root)


@pytest.fixture(scope="module")
def labels(ray_local, dataset, tmp_path_factory):
    """A real labeling output on the loopback S3 (`fcclip label`, fcclip-tiny with random weights) of the 8 training
    images plus one truncated JPEG, which becomes an error row: (its s3:// URI, the truncated file's path)."""
    import shutil
    from pathlib import Path

    import boto3

    from fcclip.datasets.coco_panoptic import CocoPanoptic

    images = tmp_path_factory.mktemp("label-source")
    for path in (Path(dataset) / "train2017").glob("*.jpg"):
        shutil.copy(path, images / path.name)
    first = sorted(images.glob("*.jpg"))[0]
    broken = images / "broken.jpg"
    broken.write_bytes(first.read_bytes()[:200])  # a real truncated JPEG
    vocab = tmp_path_factory.mktemp("vocab") / "vocabulary.json"
    import json

    vocab.write_text(json.dumps(CocoPanoptic(dataset).vocabulary(synonyms="coco_panoptic").to_dict()))
    boto3.client("s3").create_bucket(Bucket="train-labels")
    dest = "s3://train-labels/labels"
    assert main(["label", str(images), "--out", dest, "--vocab", str(vocab), "--model", "fcclip-tiny", "--weights",
                 "random", "--short-edge", "0", "--shard-size", "4", "--no-progress"]) == 0
    return dest, str(broken)


def test_data_kind_is_detected(dataset, tmp_path, capsys):
    from fcclip_pipelines.train_data import open_training_data

    coco = open_training_data(dataset, split="train2017", synonyms="coco_panoptic")
    assert coco.kind == "coco" and [c.id for c in coco.vocabulary.categories] == [1, 3, 18, 187, 191, 193]
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "a.txt").write_text("x")
    with pytest.raises(ValueError, match=r"neither a COCO panoptic tree \(no .*panoptic_train2017.json\) nor a "
                                         r"labeling output \(.*holds no part file"):
        open_training_data(str(tmp_path / "other"), split="train2017", synonyms=None)
    # the command says so in one line, before starting Ray
    code = main(["train", "--config", "fcclip-tiny-synthetic", "--data", str(tmp_path / "other"), "--storage",
                 str(tmp_path / "runs")])
    assert code == 2
    err = capsys.readouterr().err
    assert err.startswith("fcclip train: error:") and "nor a labeling output" in err and len(err.splitlines()) == 1
    assert not (tmp_path / "runs").exists()
    # pseudo-label options on COCO data are refused
    from fcclip.datasets.labels import LabelSelection

    with pytest.raises(ValueError, match="apply to labeling outputs only"):
        open_training_data(dataset, split="train2017", synonyms=None, selection=LabelSelection(min_score=0.5))


@pytest.mark.ray
def test_labeling_output_rows_become_samples(labels):
    """The Ray Data stage that reads a part file: only ok rows, masks from the RLEs, the run's vocabulary."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from fcclip.datasets.labels import LabelSelection
    from fcclip_pipelines.train_data import open_training_data, read_samples

    dest, broken = labels
    data = open_training_data(dest, split="train2017", synonyms=None, selection=LabelSelection(class_map=(("18", "1"),)))
    assert data.kind == "labels"  # the run's vocabulary, the dog (id 18) merged into the person (id 1)
    assert [c.id for c in data.vocabulary.categories] == [1, 3, 187, 191, 193]
    assert data.class_index == {1: 0, 18: 0, 3: 1, 187: 2, 191: 3, 193: 4}

    fs, files = data.output.fs, data.output.files
    rows = [r for f in files for r in pq.read_table(fs.open(f, "rb"), columns=["uri", "status"]).to_pylist()]
    assert len(rows) == 9 and [r["uri"] for r in rows if r["status"] == "error"] == [broken]
    blocks = list(read_samples(pa.table({"path": files}), fs=fs, rows_per_block=3, class_index=data.class_index,
                               min_score=0.0, seed=0, lsj={"image_size": 64, "min_scale": 0.5, "max_scale": 1.5}))
    assert sum(len(b["image"]) for b in blocks) == 8  # the 8 readable images, once each; the error row skipped
    for b in blocks:
        assert b["image"].shape[1:] == (64, 64, 3) and b["segments"].shape[1:] == (64, 64)
        for segments, classes in zip(b["segments"], b["labels"]):
            assert segments.max() <= len(classes) and all((segments == k + 1).any() for k in range(len(classes)))
            assert all(0 <= c < len(data.vocabulary) for c in classes)


@pytest.mark.ray
def test_rows_of_images_replaced_since_labeling_are_skipped(ray_local, s3_bucket, tmp_path, caplog):
    """An image replaced in place after it was labeled (the same pixel size: its masks would fit) is not trained on
    with the old image's masks: its row is skipped with a warning, by ETag on S3 and by size and modification time
    for a local file (a rerun's rule)."""
    import json
    import logging

    import boto3
    import pyarrow as pa

    from fcclip.datasets.synthetic import write_images
    from fcclip_pipelines.train_data import open_training_data, read_samples

    local = write_images(tmp_path / "local", count=3, size=(48, 64), seed=0)
    s3 = boto3.client("s3")
    for path in write_images(tmp_path / "up", count=3, size=(48, 64), seed=5):
        s3.upload_file(str(path), s3_bucket, f"photos/{path.name}")
    outputs = {"local": str(tmp_path / "labels-local"), "s3": str(tmp_path / "labels-s3")}
    for source, dest in ((str(tmp_path / "local"), outputs["local"]), (f"s3://{s3_bucket}/photos/", outputs["s3"])):
        assert main(["label", source, "--out", dest, "--vocab", "cat; dog; sky [stuff]", "--model", "fcclip-tiny",
                     "--weights", "random", "--short-edge", "0", "--no-progress"]) == 0

    def samples(dest):
        data = open_training_data(dest, split="train2017", synonyms=None)
        blocks = read_samples(pa.table({"path": data.output.files}), fs=data.output.fs, rows_per_block=4,
                              class_index=data.class_index, min_score=0.0, seed=0,
                              lsj={"image_size": 32, "min_scale": 1.0, "max_scale": 1.0})
        return sum(len(b["image"]) for b in blocks)

    assert samples(outputs["local"]) == samples(outputs["s3"]) == 3
    other = write_images(tmp_path / "other", count=1, size=(48, 64), seed=99)[0]  # another picture, same size
    local[0].write_bytes(other.read_bytes())
    s3.upload_file(str(other), s3_bucket, "photos/synth_00000.jpg")
    caplog.set_level(logging.WARNING, logger="fcclip.train")
    assert samples(outputs["local"]) == samples(outputs["s3"]) == 2
    changed = [r.getMessage() for r in caplog.records if "changed after it was labeled" in r.getMessage()]
    assert len(changed) == 2, caplog.text
    assert changed[0].startswith(f"skipping {local[0]}: ") and "bytes, modified 20" in changed[0]
    assert changed[1].startswith(f"skipping s3://{s3_bucket}/photos/synth_00000.jpg: ") and "(ETag" in changed[1]
    # `fcclip eval --data` does not compare a prediction on the new picture with the old one's labels either: the
    # image is a failed one (exit status 1), the others are evaluated
    out = tmp_path / "eval.json"
    assert main(["eval", "--model", "fcclip-tiny", "--weights", "random", "--data", outputs["s3"], "--short-edge", "0",
                 "--out", str(out), "--no-progress"]) == 1
    result = json.loads(out.read_text())
    assert result["images"] == 3 and result["failed"] == 1, result
    assert "synth_00000.jpg: ImageChanged: it changed after it was labeled (ETag" in result["errors"][0]
    assert result["panoptic"]["All"]["pq"] == pytest.approx(1.0, abs=1e-9)  # the two others, by their own model


def _config(tmp_path, name, **overrides):
    """A training config YAML: the tiny synthetic recipe with `overrides` (nested dicts merge)."""
    data = yaml.safe_load(open(TINY))
    for key, value in overrides.items():
        if isinstance(value, dict):
            data[key] = {**data.get(key, {}), **value}
        else:
            data[key] = value
    data["name"] = name
    return _write(tmp_path / f"{name}.yaml", data)


def _result(uri):
    import ray.train

    return ray.train.Result.from_path(uri)


def _state(checkpoint_uri):
    """state.pt next to a model.pth URI."""
    import fsspec

    with fsspec.open(checkpoint_uri.rsplit("/", 1)[0] + "/state.pt", "rb") as f:
        return torch.load(f, map_location="cpu", weights_only=True)


def _final(stdout):
    lines = [line for line in stdout.splitlines() if line.startswith("final checkpoint: ")]
    assert len(lines) == 1, stdout
    return lines[0].split(": ", 1)[1].strip()


def _train_workers():
    """PIDs of the Ray Train workers of this process's own local Ray (its raylet is our child): /proc only, so
    other Ray instances on the machine are never touched."""
    me = os.getpid()
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/cmdline", "rb") as f:
                if not f.read().startswith(b"ray::RayTrainWorker"):
                    continue
            pid = int(entry)
            while pid > 1 and pid != me:
                with open(f"/proc/{pid}/stat") as f:
                    pid = int(f.read().rsplit(")", 1)[1].split()[1])
        except (FileNotFoundError, ProcessLookupError, ValueError):
            continue
        if pid == me:
            found.append(int(entry))
    return sorted(found)


@pytest.mark.ray
@pytest.mark.slow
def test_killed_worker_resumes_from_the_latest_checkpoint(ray_local, s3_bucket, dataset, labels, tmp_path, capsys,
                                                          caplog):
    """`fcclip train --data DEST --mix coco=ROOT:0.5` on two workers (DDP over gloo), DEST a labeling output
    streamed from S3 through Ray Data, checkpoints on S3; one worker is SIGKILLed after the first checkpoint. The
    restarted worker group gets fresh dataset shards and goes on from the latest checkpoint; the final checkpoint,
    read from S3, predicts with the union vocabulary. The COCO tree's samples come from the workers' own loaders
    (a COCO-only run would repeat them at the suite's time budget)."""
    import logging
    import re

    import fcclip
    from fcclip.datasets.coco_panoptic import CocoPanoptic
    from fcclip_pipelines.train_data import MixSpec, open_training_sources

    max_iters = 15
    path = _config(tmp_path, "kill", checkpoint_every=5, keep_checkpoints=20, log_every=5, max_failures=2,
                   solver={"lr": 0.001, "steps": [12], "warmup_iters": 8, "warmup_factor": 0.1})
    config = load_train_config(path)
    storage = f"s3://{s3_bucket}/runs"
    caplog.set_level(logging.INFO, logger="fcclip.train")
    outcome = {}

    def fit():
        try:
            outcome["code"] = main(["train", "--config", path, "--data", labels[0], "--mix", f"coco={dataset}:0.5",
                                    "--storage", storage, "--num-workers", "2", "--cpus-per-worker", "0.5",
                                    "--max-iters", str(max_iters)])
        except BaseException as e:  # noqa: BLE001 - reported by the test below
            outcome["error"] = e

    thread = threading.Thread(target=fit, daemon=True)
    thread.start()

    # wait until Ray Train has registered a checkpoint (the run's snapshot lists it), then SIGKILL one worker
    registered, deadline = None, time.monotonic() + 300
    while registered is None and thread.is_alive() and time.monotonic() < deadline:
        time.sleep(0.5)
        try:
            result = _result(f"{storage}/kill")
        except Exception:  # noqa: BLE001 - not written yet
            continue
        if result.checkpoint is not None:
            registered = result.metrics_dataframe["iteration"].tolist()
    assert registered, f"no checkpoint before the run ended: {outcome}"
    workers = _train_workers()
    assert len(workers) == 2, workers
    victim = workers[-1]
    os.kill(victim, signal.SIGKILL)

    thread.join(timeout=480)
    assert not thread.is_alive(), "training did not finish after the worker was killed"
    captured = capsys.readouterr()
    assert "error" not in outcome, outcome.get("error")
    assert outcome["code"] == 0, captured.err[-3000:]
    assert not os.path.exists(f"/proc/{victim}")
    assert registered[-1] < max_iters, "the kill came after the last checkpoint: nothing was resumed"
    final = _final(captured.out)
    assert final.startswith(f"{storage}/kill/checkpoint_") and final.endswith("/model.pth")
    assert f"trained to iteration {max_iters}" in captured.out
    assert ("training vocabulary: 6 classes (the union of 6 of the labeling output and 6 of the COCO panoptic "
            "tree); samples: 50% labels, 50% coco") in caplog.text

    frame = _result(f"{storage}/kill").metrics_dataframe
    iterations = frame["iteration"].tolist()
    starts = frame["start_iteration"].tolist()
    print(f"killed worker {victim} with checkpoints {registered} registered; checkpoints {iterations}, "
          f"started at {starts}")
    # no iteration was reported twice, so the restart did not begin again at 0; it began at a checkpoint at or
    # after the latest one registered when the worker died
    assert iterations == sorted(set(iterations)) and iterations[-1] == max_iters, iterations
    assert starts[0] == 0
    restart = max(starts)
    assert restart >= registered[-1] and restart in iterations, (starts, registered)
    assert all(s == 0 for i, s in zip(iterations, starts) if i <= restart)
    assert all(s == restart for i, s in zip(iterations, starts) if i > restart)
    # the learning rate follows the schedule of the global iteration on both sides of the restart (warmup to 8,
    # step at 12); a restarted schedule would be in warmup again after the restart
    assert frame["lr"].tolist() == pytest.approx([1e-3 * lr_factor(i, config.solver) for i in iterations])
    assert all(math.isfinite(v) for v in frame.select_dtypes("number").to_numpy().ravel())
    assert frame["samples_per_s"].gt(0).all() and frame["data_wait_share"].between(0, 1).all()
    # both sources were read; each worker group counts its own draws: 2 samples per iteration for each worker.
    # The two workers must draw from the labeling output at the same steps, or Ray Train's split of it blocks one of
    # them while the other waits in the all-reduce (the run would hang)
    drawn = (frame["samples_from_labels"] + frame["samples_from_coco"]).tolist()
    assert drawn == [2 * (i - s) for i, s in zip(iterations, starts)], drawn
    assert frame["samples_from_coco"].iloc[-1] > 0 and frame["samples_from_labels"].iloc[-1] > 0
    printed = re.search(r"samples drawn by worker 0 since it started: labels (\d+) \(\d+%\), coco (\d+) \(\d+%\)",
                        captured.out)
    assert printed, captured.out
    n_labels, n_coco = int(printed[1]), int(printed[2])
    total = 2 * (max_iters - restart)
    # about half from each source (a seeded draw per sample: within 4 standard deviations of the binomial)
    assert n_labels + n_coco == total and abs(n_coco - total / 2) < 4 * math.sqrt(total * 0.25), captured.out

    state = _state(final)
    assert state["iteration"] == max_iters and state["scheduler"]["last_epoch"] == max_iters
    # the final checkpoint's TensorBoard logs hold both worker groups' event files (history kept over the restart)
    import fsspec

    fs, tb = fsspec.core.url_to_fs(final.rsplit("/", 1)[0] + "/tensorboard")
    try:
        import tensorboardX  # noqa: F401
    except ImportError:
        pass
    else:
        assert len([p for p in fs.ls(tb) if "tfevents" in p]) == 2, fs.ls(tb)

    # the checkpoint's class head is the union's (6 classes + no-object), and it predicts, read from S3, with the
    # union vocabulary
    with fsspec.open(final, "rb") as f:
        assert torch.load(f, map_location="cpu", weights_only=True)["model"]["criterion.empty_weight"].shape == (7,)
    union = open_training_sources(labels[0], MixSpec("coco", dataset, 0.5), split="train2017",
                                  synonyms="coco_panoptic")[0]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = fcclip.build_model("fcclip-tiny", weights=final, device="cpu")
    assert model.weights_id.startswith("sha256:")
    record = CocoPanoptic(dataset).records()[0]
    pred = fcclip.Predictor(model, union, short_edge=None)(record["image_uri"]).panoptic
    assert pred.segment_map.shape == (128, 160)
    assert {s["category_id"] for s in pred.segments} <= {c.id for c in union.categories}


def test_ranks_on_one_node_read_an_s3_checkpoint_each_from_their_own_folder(s3_bucket, tmp_path):
    """Two ranks of one node resume from one checkpoint on S3 at the same time. With Ray's
    ``Checkpoint.as_directory`` they share one download folder and the second downloads again into it, over the files
    the first is reading (the killed-worker test above failed so: "...not saved properly..."). `checkpoint_files`
    gives each reader a folder of its own: the first's files stay as they were while the second reads, and are
    removed when the first is done; a checkpoint on a local file system is read in place."""
    import fsspec
    import ray.train

    from fcclip_pipelines.train import checkpoint_files

    local = tmp_path / "checkpoint"
    local.mkdir()
    torch.save({"model": {"w": torch.arange(100_000, dtype=torch.float32)}}, local / "model.pth")
    uri = f"s3://{s3_bucket}/runs/checkpoint_0"
    fs, path = fsspec.core.url_to_fs(uri)
    fs.put(str(local) + "/", path, recursive=True)
    checkpoint = ray.train.Checkpoint(uri)

    with checkpoint_files(checkpoint) as first:
        model = os.path.join(first, "model.pth")
        before = os.stat(model)
        with open(model, "rb") as reading:  # the first rank has its file open when the second one starts
            with checkpoint_files(checkpoint) as second:
                after = os.stat(model)
                assert (after.st_ino, after.st_mtime_ns, after.st_size) == (before.st_ino, before.st_mtime_ns,
                                                                           before.st_size)
                assert torch.load(os.path.join(second, "model.pth"), weights_only=True)["model"]["w"][-1] == 99_999
            assert second != first and os.path.exists(model)
            assert torch.equal(torch.load(reading, weights_only=True)["model"]["w"], torch.arange(100_000.0))
        assert not os.path.exists(second)
    assert not os.path.exists(first)

    with checkpoint_files(ray.train.Checkpoint(str(local))) as here:
        assert here == str(local)
    assert (local / "model.pth").exists()
