"""`fcclip eval`: the benchmark job end to end, exact sharded metrics, and the glue between readers and metrics."""
import json
from types import SimpleNamespace

import numpy as np
import pytest

from fcclip.datasets.benchmarks import open_benchmark
from fcclip.datasets.synthetic_panoptic import write_coco_panoptic
from fcclip_pipelines.evaluate import jsonable, merge_states, new_accumulators, update


@pytest.fixture(scope="module")
def coco_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("coco")
    write_coco_panoptic(root, 4, seed=3, size=(96, 128), num_val=3)
    return str(root)


def _oracle(dataset, record):
    """A prediction that equals the ground truth."""
    gt_map, segments = dataset.load_panoptic(record)
    vocab = dataset.vocabulary()
    index = {c.id: i for i, c in enumerate(vocab.categories)}
    things = [s for s in segments if vocab.categories[index[s["category_id"]]].is_thing and not s.get("iscrowd")]
    semantic = dataset.load_semantic(record)
    kept = [s for s in segments if not s.get("iscrowd")]
    pred_map = np.where(np.isin(gt_map, [s["id"] for s in kept]), gt_map, 0)
    return SimpleNamespace(
        panoptic=SimpleNamespace(segment_map=pred_map, segments=[
            {"id": s["id"], "category_id": s["category_id"]} for s in kept]),
        instances=SimpleNamespace(
            masks=np.stack([gt_map == s["id"] for s in things]) if things else np.zeros((0, *gt_map.shape), bool),
            category_ids=np.array([s["category_id"] for s in things], dtype=np.int64),
            scores=np.ones(len(things), dtype=np.float32),
        ),
        semantic=SimpleNamespace(class_map=np.where(semantic == 255, 0, semantic)),
    )


def test_perfect_predictions_score_100(coco_root):
    dataset = open_benchmark("coco_panoptic", coco_root)
    acc = new_accumulators(dataset)
    for record in dataset.records():
        update(acc, dataset, record, _oracle(dataset, record))
    results = {k: v.result() for k, v in acc.items()}
    assert results["panoptic"]["All"]["pq"] == pytest.approx(1.0)
    assert results["panoptic"]["All"]["n"] >= 3
    assert results["instance"]["AP"] == pytest.approx(1.0)
    assert results["semantic"]["mIoU"] == pytest.approx(1.0)


@pytest.mark.ray
def test_eval_end_to_end_equals_one_pass(coco_root, tmp_path, capsys, caplog):
    import logging
    import warnings

    import ray

    from fcclip import Predictor, build_model
    from fcclip_pipelines.cli import main

    assert not ray.is_initialized()
    try:  # the command starts a local Ray of its own, and ends it as it returns (not at the interpreter's exit)
        out = tmp_path / "results.json"
        with caplog.at_level(logging.INFO, logger="fcclip.eval"):
            code = main(["eval", "--model", "fcclip-tiny", "--weights", "random", "--dataset", "coco_panoptic",
                         "--data", coco_root, "--batch-size", "1", "--short-edge", "160", "--max-size", "320",
                         "--out", str(out), "--no-progress", "--num-cpus", "2"])
        left_running = ray.is_initialized()
    finally:
        ray.shutdown()
    printed = capsys.readouterr().out
    assert code == 0, printed
    assert not left_running, "fcclip eval left its local Ray running"
    # a local Ray of 2 CPUs: the model actor leaves one to read images, computes with both (runtime.cpu_model_threads)
    assert "model actors: 1 on CPU + 1 CPU (2 threads each)" in caplog.text, caplog.text
    assert "| coco_panoptic |" in printed
    results = json.loads(out.read_text())
    assert results["images"] == 3 and results["failed"] == 0 and results["test_size"] == [160, 320]
    assert set(results["panoptic"]) == {"All", "Things", "Stuff", "per_class"}
    for key in ("pq", "sq", "rq", "n"):
        assert key in results["panoptic"]["All"]

    # the same predictions accumulated in one process, one accumulator: identical figures
    dataset = open_benchmark("coco_panoptic", coco_root)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = build_model("fcclip-tiny", weights="random", device="cpu")
    predictor = Predictor(model, dataset.vocabulary(), short_edge=160, max_size=320, tasks=dataset.spec.tasks)
    acc = new_accumulators(dataset)
    for record in dataset.records():
        update(acc, dataset, record, predictor(dataset.load_image(record)))
    one_pass = json.loads(json.dumps(jsonable({k: v.result() for k, v in acc.items()})))
    for key in ("panoptic", "semantic", "instance"):
        assert results[key] == one_pass[key], key


def test_merging_shards_is_exact(coco_root):
    dataset = open_benchmark("coco_panoptic", coco_root)
    records = dataset.records()
    preds = {r.image_id: _oracle(dataset, r) for r in records}
    for p in preds.values():  # make it imperfect: drop the first segment
        dropped = p.panoptic.segments[0]["id"]
        p.panoptic.segments = p.panoptic.segments[1:]
        p.panoptic.segment_map = np.where(p.panoptic.segment_map == dropped, 0, p.panoptic.segment_map)
    whole = new_accumulators(dataset)
    states = []
    for r in records:
        update(whole, dataset, r, preds[r.image_id])
        one = new_accumulators(dataset)
        update(one, dataset, r, preds[r.image_id])
        states.append(json.loads(json.dumps({k: v.state_dict() for k, v in one.items()})))
    merged = merge_states(dataset, states)
    for k in whole:
        assert merged[k].result() == whole[k].result()
    assert whole["panoptic"].result()["All"]["pq"] < 1.0
