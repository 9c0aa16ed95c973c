"""Do uncertainty picks find wrong labels, and do reviewed images help a student? On the synthetic panoptic set.

1. A teacher (fcclip-tiny) is trained on ``--gt-images`` synthetic COCO-panoptic images (``fcclip train``), then
   labels a pool of ``--pool`` other synthetic images whose ground truth we keep (``fcclip label``).
2. Each labeled segment is *wrong* when its best-matching ground-truth segment overlaps it with IoU < 0.5 or has
   another class. ``fcclip review pick --by uncertainty`` picks ``--count`` images; random picks of the same size
   (``--random-seeds`` seeds) are the baseline. Reported: the share of wrong segments among the picked images'
   segments, for each rule, and the ratio.
3. With ``--student``: a reviewer is simulated by the ground truth of the picked images (what a perfect reviewer
   submits in Label Studio, written as ``fcclip review pull`` writes it), ``fcclip review merge`` replaces their
   pseudo-labels, and two students are trained alike (``--student-iterations``), one on the pseudo-labels alone and
   one on the merged output, and, as a control, one with as many random picks reviewed; all are scored (PQ) on the
   held-out val split of the teacher's set.

    .venv/bin/python benchmarks/review_pick.py --out out/review-bench [--student] [--json out/review.json]
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
import warnings
from pathlib import Path

import numpy as np
import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

RECIPE = {  # tests/test_pseudo_label_loop.py's
    "weights": "random", "keep_checkpoints": 1, "log_every": 50, "eval_every": 0,
    "data": {"image_size": 128, "min_scale": 0.8, "max_scale": 1.2, "loader_workers": 0},
    "solver": {"batch_size": 4, "lr": 0.001, "warmup_iters": 10, "warmup_factor": 1.0, "clip_grad": 1.0},
    "loss": {"num_points": 1024},
}
SIZE = (128, 160)


def _config(out: Path, name: str, iterations: int) -> str:
    from fcclip.config import train_config_path

    data = yaml.safe_load(open(train_config_path("fcclip-tiny-synthetic")))
    for key, value in RECIPE.items():
        data[key] = {**data.get(key, {}), **value} if isinstance(value, dict) else value
    data["name"] = name
    data["checkpoint_every"] = iterations
    data["solver"].update(max_iters=iterations, steps=[iterations * 4 // 5])
    path = out / f"{name}.yaml"
    path.write_text(yaml.safe_dump(data))
    return str(path)


def _run(argv: list[str]) -> str:
    """Run an fcclip command in this process; its stdout."""
    import contextlib
    import io

    from fcclip_pipelines.cli import main

    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        code = main(argv)
    if code != 0:
        raise SystemExit(f"fcclip {' '.join(argv)} exited {code}:\n{buf.getvalue()[-2000:]}")
    return buf.getvalue()


def _train(out: Path, name: str, data: str, iterations: int, cpus: int = 2) -> str:
    """Train fcclip-tiny; ``cpus`` per worker (1 on a labeling output: Ray Data's read tasks need the other)."""
    stdout = _run(["train", "--config", _config(out, name, iterations), "--data", data, "--storage",
                   str(out / "runs"), "--num-workers", "1", "--cpus-per-worker", str(cpus)])
    return next(l.split(": ", 1)[1].strip() for l in stdout.splitlines() if l.startswith("final checkpoint: "))


def _ground_truth(pool: Path) -> dict[str, tuple[np.ndarray, list[dict]]]:
    """Absolute image path -> (its ground-truth id map, segments_info)."""
    from PIL import Image

    from fcclip.datasets.coco_panoptic import CocoPanoptic
    from fcclip.masks import rgb2id

    out = {}
    for r in CocoPanoptic(str(pool), "train2017").records():
        out[os.path.abspath(r["image_uri"])] = (rgb2id(np.asarray(Image.open(r["panoptic_uri"]).convert("RGB"))),
                                                r["segments_info"])
    return out


def wrong_segments(row: dict, truth: tuple[np.ndarray, list[dict]]) -> list[bool]:
    """Per labeled segment: IoU < 0.5 with its best-matching ground-truth segment, or another class."""
    from fcclip.masks import decode_rle

    gt_map, infos = truth
    out = []
    for s in row["segments"]:
        mask = decode_rle(s["rle"])
        best, best_cat = 0.0, None
        for info in infos:
            g = gt_map == info["id"]
            inter = np.logical_and(mask, g).sum()
            if inter == 0:
                continue
            iou = inter / np.logical_or(mask, g).sum()
            if iou > best:
                best, best_cat = iou, info["category_id"]
        out.append(best < 0.5 or best_cat != s["category_id"])
    return out


def _share(ids: list[str], wrong: dict[str, list[bool]]) -> float:
    flags = [w for i in ids for w in wrong[i]]
    return sum(flags) / max(len(flags), 1)


def _reviewed_output(dest: Path, ids: list[str], rows: dict, truth: dict, vocabulary) -> None:
    """What a perfect reviewer submits for these images, as `fcclip review pull` writes it."""
    import datetime

    import pyarrow as pa

    from fcclip_pipelines.output import REVIEW_FIELDS, SCHEMA, Destination, write_part
    from fcclip.masks import panoptic_columns

    by_id = {c.id: c for c in vocabulary.categories}
    out = []
    for image_id in ids:
        row = rows[image_id]
        gt_map, infos = truth[os.path.abspath(row["uri"])]
        segs = [{"id": int(i["id"]), "label": by_id[i["category_id"]].names[0], "category_id": int(i["category_id"]),
                 "is_thing": by_id[i["category_id"]].is_thing, "score": 1.0} for i in infos]
        cols = panoptic_columns(gt_map, segs)
        for s, area, bbox, counts in zip(segs, cols["area"], cols["bbox"], cols["counts"]):
            s.update(area=area, bbox=bbox, rle={"size": list(gt_map.shape), "counts": counts})
        out.append({**{k: row[k] for k in ("uri", "image_id", "width", "height", "model")}, "status": "ok",
                    "error": None, "segments": segs, "vocabulary": row["vocabulary"], "run_id": "simulated",
                    "source": "human-reviewed", "reviewed_by": "ground-truth",
                    "reviewed_at": datetime.datetime.now(datetime.timezone.utc)})
    table = pa.Table.from_pylist(out, schema=pa.schema(list(SCHEMA) + REVIEW_FIELDS))
    write_part(Destination(str(dest)), 0, table, {"vocabulary": vocabulary.to_dict(), "run_id": "simulated"})


def _val_pq(weights: str, root: str) -> float:
    import fcclip
    from PIL import Image

    from fcclip.datasets.coco_panoptic import CocoPanoptic
    from fcclip.masks import rgb2id
    from fcclip.metrics.panoptic import PanopticAccumulator

    ds = CocoPanoptic(root, "val2017")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = fcclip.build_model("fcclip-tiny", weights=weights, device="cpu")
    predictor = fcclip.Predictor(model, ds.vocabulary(synonyms="coco_panoptic"), short_edge=None, tasks=("panoptic",))
    acc = PanopticAccumulator(ds.categories)
    for record in ds.records():
        pred = predictor(record["image_uri"]).panoptic
        gt = rgb2id(np.asarray(Image.open(record["panoptic_uri"]).convert("RGB")))
        acc.update(gt, record["segments_info"], pred.segment_map, pred.segments, image_id=record["image_id"])
    return acc.result()["All"]["pq"] or 0.0


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", required=True, help="work folder (kept: a rerun reuses the teacher and labels)")
    p.add_argument("--gt-images", type=int, default=64)
    p.add_argument("--val-images", type=int, default=16)
    p.add_argument("--pool", type=int, default=128)
    p.add_argument("--pool-seed", type=int, default=1, help="the pool's synthetic images (the teacher's are seed 0)")
    p.add_argument("--count", type=int, default=16, help="images picked")
    p.add_argument("--teacher-iterations", type=int, default=150)
    p.add_argument("--random-seeds", type=int, default=200)
    p.add_argument("--student", action="store_true", help="also the reviewed-mix round trip (step 3)")
    p.add_argument("--student-iterations", type=int, default=200)
    p.add_argument("--json", default=None)
    args = p.parse_args(argv)

    import pyarrow.parquet as pq

    from fcclip.datasets.coco_panoptic import CocoPanoptic
    from fcclip.datasets.synthetic_panoptic import write_coco_panoptic
    from fcclip_pipelines import review

    out = Path(args.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    gt_root, pool = out / "gt", out / f"pool-{args.pool_seed}"
    t0 = time.time()
    if not (gt_root / "annotations").exists():
        write_coco_panoptic(gt_root, args.gt_images, seed=0, size=SIZE, num_val=args.val_images)
    if not (pool / "annotations").exists():
        write_coco_panoptic(pool, args.pool, seed=args.pool_seed, size=SIZE, also_val=False)
    vocabulary = CocoPanoptic(str(gt_root)).vocabulary(synonyms="coco_panoptic")
    vocab_path = out / "vocabulary.json"
    vocab_path.write_text(json.dumps(vocabulary.to_dict()))
    teacher_file = out / "teacher.txt"
    if not teacher_file.exists():
        teacher_file.write_text(_train(out, "teacher", str(gt_root), args.teacher_iterations))
    teacher = teacher_file.read_text().strip()
    labels = out / f"labels-{args.pool_seed}"
    if not labels.exists():
        _run(["label", str(pool / "train2017"), "--out", str(labels), "--vocab", str(vocab_path), "--model",
              "fcclip-tiny", "--weights", teacher, "--short-edge", "0", "--shard-size", "32", "--no-progress"])
    setup_s = time.time() - t0

    truth = _ground_truth(pool)
    rows = {r["image_id"]: r for r in pq.read_table(labels).to_pylist() if r["status"] == "ok"}
    wrong = {i: wrong_segments(r, truth[os.path.abspath(r["uri"])]) for i, r in rows.items()}
    overall = _share(list(rows), wrong)
    by_uncertainty = review.pick(str(labels), args.count, "uncertainty").table.column("image_id").to_pylist()
    share_u = _share(by_uncertainty, wrong)
    randoms = [_share(review.pick(str(labels), args.count, "random", seed=s).table.column("image_id").to_pylist(),
                      wrong) for s in range(args.random_seeds)]
    share_r = float(np.mean(randoms))
    report = {
        "images": len(rows), "segments": sum(len(w) for w in wrong.values()),
        "wrong_share_all": overall, "count": args.count, "wrong_share_uncertainty": share_u,
        "wrong_share_random_mean": share_r, "wrong_share_random_p95": float(np.percentile(randoms, 95)),
        "ratio": share_u / max(share_r, 1e-9), "teacher_iterations": args.teacher_iterations, "setup_s": setup_s,
        "pool_seed": args.pool_seed,
    }
    print(f"## review_pick.py (pool seed {args.pool_seed})\n\n{len(rows)} labeled images, {report['segments']} segments, "
          f"{overall:.1%} of them wrong (IoU < 0.5 with ground truth, or another class)\n")
    print("| picks | images | wrong segments among their segments |\n|---|---|---|")
    print(f"| by uncertainty | {args.count} | {share_u:.1%} |")
    print(f"| random ({args.random_seeds} seeds) | {args.count} | {share_r:.1%} mean, {report['wrong_share_random_p95']:.1%}"
          f" 95th percentile |")
    print(f"\nratio uncertainty / random: {report['ratio']:.2f}x")

    if args.student:
        random_ids = review.pick(str(labels), args.count, "random", seed=0).table.column("image_id").to_pylist()
        merged = {}
        for rule, ids in (("uncertainty", by_uncertainty), ("random", random_ids)):
            reviewed, merged[rule] = out / f"reviewed-{rule}-{args.pool_seed}", out / f"merged-{rule}-{args.pool_seed}"
            if not merged[rule].exists():
                _reviewed_output(reviewed, ids, rows, truth, vocabulary)
                review.merge(str(labels), str(reviewed), str(merged[rule]))
        t1 = time.time()
        alone = _train(out, f"student-pseudo-{args.pool_seed}", str(labels), args.student_iterations, cpus=1)
        mixed = _train(out, f"student-reviewed-{args.pool_seed}", str(merged["uncertainty"]), args.student_iterations,
                       cpus=1)
        control = _train(out, f"student-reviewed-random-{args.pool_seed}", str(merged["random"]),
                         args.student_iterations, cpus=1)
        pq_teacher, pq_alone, pq_mixed, pq_control = (_val_pq(w, str(gt_root))
                                                      for w in (teacher, alone, mixed, control))
        report.update(student_iterations=args.student_iterations, pq_teacher=pq_teacher, pq_student_pseudo=pq_alone,
                      pq_student_reviewed=pq_mixed, pq_student_reviewed_random=pq_control,
                      student_s=time.time() - t1)
        print(f"\n| model | val PQ ({args.val_images} held-out images) |\n|---|---|")
        print(f"| teacher ({args.teacher_iterations} it. on {args.gt_images} ground-truth images) | {pq_teacher:.3f} |")
        print(f"| student on the {len(rows)} pseudo-labels alone ({args.student_iterations} it.) | {pq_alone:.3f} |")
        print(f"| student on the same with the {args.count} uncertainty picks reviewed ({args.student_iterations} it.)"
              f" | {pq_mixed:.3f} |")
        print(f"| student on the same with {args.count} random picks reviewed ({args.student_iterations} it.)"
              f" | {pq_control:.3f} |")
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
