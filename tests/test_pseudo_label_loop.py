"""The data-engine loop at tiny scale: a teacher trained on synthetic COCO panoptic labels a second, unlabeled
synthetic set (`fcclip label`); a student trained only on those pseudo-labels (`fcclip train --data DEST`, through
Ray Data) segments the held-out validation set nearly as well as the teacher; `fcclip eval --data DEST` measures
its agreement with the pseudo-labels. The teacher's training is stopped half-way and resumed (`--resume`), with
periodic validation PQ."""
import json
import os
import warnings

import numpy as np
import pytest
import torch
import yaml

import fcclip
from fcclip.config import train_config_path
from fcclip_pipelines.cli import main

try:  # imported before any capsys: Ray's log handler keeps the stderr it finds at import
    import ray.train  # noqa: F401
except ImportError:
    pass

# The recipe: 4 crops of 128 px per iteration, lr 1e-3; the teacher trains TEACHER_ITERATIONS on 64 ground-truth
# images, the student STUDENT_ITERATIONS on the UNLABELED images the teacher labeled. fcclip-tiny predicts with the
# in-vocabulary classifier alone (its preset's ensemble weights are 0: its random CLIP knows nothing). Measured on
# 2026-12-02, val PQ on 16 held-out images, student / teacher: see README.md, "Train on your pseudo-labels".
TEACHER_ITERATIONS, STUDENT_ITERATIONS = 200, 200
RECIPE = {
    "weights": "random", "keep_checkpoints": 2, "log_every": 50,
    "data": {"image_size": 128, "min_scale": 0.8, "max_scale": 1.2, "loader_workers": 0},
    "solver": {"batch_size": 4, "lr": 0.001, "warmup_iters": 10, "warmup_factor": 1.0, "clip_grad": 1.0},
    "loss": {"num_points": 1024},
}
GROUND_TRUTH, UNLABELED, VAL = 64, 128, 16
STUDENT_SHARE = 0.8  # the student's val PQ is at least this share of the teacher's (issue 14)


def _config(tmp_path, name, iterations, **fields):
    data = yaml.safe_load(open(train_config_path("fcclip-tiny-synthetic")))
    for key, value in {**RECIPE, **fields}.items():
        data[key] = {**data.get(key, {}), **value} if isinstance(value, dict) else value
    data["name"] = name
    data["solver"].update(max_iters=iterations, steps=[iterations * 4 // 5])
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(data))
    return str(path)


def _final(stdout):
    lines = [line for line in stdout.splitlines() if line.startswith("final checkpoint: ")]
    assert len(lines) == 1, stdout
    return lines[0].split(": ", 1)[1].strip()


def _val_pq(weights, root):
    """PQ of fcclip-tiny with these weights on the held-out synthetic val split (its own ground truth)."""
    from PIL import Image

    from fcclip.datasets.coco_panoptic import CocoPanoptic
    from fcclip.masks import rgb2id
    from fcclip.metrics.panoptic import PanopticAccumulator

    ds = CocoPanoptic(root, "val2017")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = fcclip.build_model("fcclip-tiny", weights=weights, device="cpu")
    predictor = fcclip.Predictor(model, ds.vocabulary(synonyms="coco_panoptic"), short_edge=None,
                                 tasks=("panoptic",))
    acc = PanopticAccumulator(ds.categories)
    for record in ds.records():
        pred = predictor(record["image_uri"]).panoptic
        gt = rgb2id(np.asarray(Image.open(record["panoptic_uri"]).convert("RGB")))
        acc.update(gt, record["segments_info"], pred.segment_map, pred.segments, image_id=record["image_id"])
    return acc.result()["All"]["pq"] or 0.0


@pytest.mark.ray
@pytest.mark.slow
@pytest.mark.loop
def test_student_on_pseudo_labels_nearly_matches_its_teacher(ray_local, tmp_path, capsys):
    import ray.train

    from fcclip.datasets.coco_panoptic import CocoPanoptic
    from fcclip.datasets.synthetic_panoptic import write_coco_panoptic
    from fcclip_pipelines.train import load_train_config, lr_factor, validation_pq

    labeled, unlabeled = tmp_path / "labeled", tmp_path / "unlabeled"
    write_coco_panoptic(labeled, GROUND_TRUTH, seed=0, size=(128, 160), num_val=VAL)  # teacher's train + held-out val
    write_coco_panoptic(unlabeled, UNLABELED, seed=1, size=(128, 160), also_val=False)  # only its images are used
    vocab = tmp_path / "vocabulary.json"
    vocab.write_text(json.dumps(CocoPanoptic(labeled).vocabulary(synonyms="coco_panoptic").to_dict()))

    # 1. the teacher, on ground truth, with periodic validation PQ at its checkpoints (eval_every). It is stopped
    #    half-way and resumed, as a preempted job would be; the same command without --resume is refused
    half = TEACHER_ITERATIONS // 2
    teacher_config = _config(tmp_path, "teacher", TEACHER_ITERATIONS, checkpoint_every=half, eval_every=half,
                             eval_images=VAL)
    runs = tmp_path / "runs"
    # --data relative to the current folder, as a user types it: the workers run in other folders
    args = ["train", "--config", teacher_config, "--data", os.path.relpath(labeled), "--storage", str(runs),
            "--num-workers", "1", "--cpus-per-worker", "2"]
    assert main([*args, "--max-iters", str(half)]) == 0
    stopped = _final(capsys.readouterr().out)
    assert torch.load(stopped.rsplit("/", 1)[0] + "/state.pt", weights_only=True)["iteration"] == half
    assert main(args) == 2
    err = capsys.readouterr().err
    assert f"{runs / 'teacher'} already holds a training run" in err and "--resume" in err
    assert ray.train.Result.from_path(str(runs / "teacher")).metrics_dataframe["iteration"].tolist() == [half]
    assert main([*args, "--resume"]) == 0
    out = capsys.readouterr().out
    teacher = _final(out)
    assert teacher != stopped and f"trained to iteration {TEACHER_ITERATIONS}" in out

    # 2. it labels the unlabeled images (nothing of their annotation is read)
    dest = tmp_path / "pseudo"
    assert main(["label", str(unlabeled / "train2017"), "--out", str(dest), "--vocab", str(vocab),
                 "--model", "fcclip-tiny", "--weights", teacher, "--short-edge", "0", "--shard-size", "32",
                 "--no-progress"]) == 0
    capsys.readouterr()

    # 3. the student, on the pseudo-labels only
    student_config = _config(tmp_path, "student", STUDENT_ITERATIONS, checkpoint_every=STUDENT_ITERATIONS,
                             eval_every=0)
    assert main(["train", "--config", student_config, "--data", str(dest), "--storage", str(runs),
                 "--num-workers", "1", "--cpus-per-worker", "1"]) == 0
    student = _final(capsys.readouterr().out)

    teacher_pq, student_pq = _val_pq(teacher, str(labeled)), _val_pq(student, str(labeled))

    # 4. the student's agreement with the pseudo-labels it learned from (the labeling model's own agreement, 1.0, is
    #    checked in tests/test_train_mix.py)
    out = tmp_path / "student.json"
    assert main(["eval", "--model", "fcclip-tiny", "--weights", student, "--data", str(dest), "--short-edge", "0",
                 "--out", str(out), "--no-progress"]) == 0
    result = json.loads(out.read_text())
    assert result["images"] == UNLABELED and result["failed"] == 0
    agreement = result["panoptic"]["All"]["pq"]
    capsys.readouterr()
    print(f"val PQ: teacher {teacher_pq:.3f}, student {student_pq:.3f} ({student_pq / max(teacher_pq, 1e-9):.2f}x); "
          f"the student's PQ against the pseudo-labels: {agreement:.3f}")
    assert teacher_pq > 0.5, "the teacher did not learn the synthetic set"
    assert _val_pq("random", str(labeled)) < 0.05  # what training started from
    assert student_pq >= STUDENT_SHARE * teacher_pq
    assert 0.3 < agreement < 1.0

    # the teacher's run: one report per checkpoint, the second after the resume, which went on from the first
    # checkpoint with the learning-rate schedule of the global iteration (a restarted schedule would still be before
    # its step); validation PQ at both, the last one equal to its checkpoint's PQ computed afresh (training's
    # validation predicts at the model's test size, here 256 px, not at the images' own)
    cfg = load_train_config(teacher_config)
    history = ray.train.Result.from_path(str(runs / "teacher")).metrics_dataframe
    assert history["iteration"].tolist() == [half, TEACHER_ITERATIONS]
    assert history["start_iteration"].tolist() == [0, half]
    assert history["lr"].tolist() == pytest.approx([cfg.solver.lr * lr_factor(i, cfg.solver)
                                                    for i in (half, TEACHER_ITERATIONS)])
    assert history["lr"].iloc[1] < history["lr"].iloc[0]
    state = torch.load(teacher.rsplit("/", 1)[0] + "/state.pt", map_location="cpu", weights_only=True)
    assert state["iteration"] == TEACHER_ITERATIONS and state["scheduler"]["last_epoch"] == TEACHER_ITERATIONS
    assert history["val_pq"].notna().all() and history["val_pq"].iloc[0] < history["val_pq"].iloc[1]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = fcclip.build_model("fcclip-tiny", weights=teacher, device="cpu")
    vocabulary = CocoPanoptic(str(labeled), cfg.data.split).vocabulary(synonyms=cfg.data.synonyms)
    assert validation_pq(model, str(labeled), cfg, vocabulary) == pytest.approx(history["val_pq"].iloc[1], abs=1e-9)
