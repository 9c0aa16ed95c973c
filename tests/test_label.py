"""`fcclip label` end to end: object storage on loopback (moto), a local Ray, Parquet read back as users read it."""
import json
import os

import numpy as np
import pyarrow.parquet as pq
import pytest
from pycocotools import mask as mask_util

from fcclip_pipelines.cli import main
from fcclip_pipelines.stages import image_id
from tests.catalogue import bad_inputs, good_images

pytestmark = pytest.mark.ray

VOCAB = "person; car; dog, puppy; grass, lawn [stuff]; sky [stuff]"


@pytest.fixture(scope="module")
def ray_local():
    import ray

    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield ray
    ray.shutdown()


def _upload(bucket, files):
    import boto3

    s3 = boto3.client("s3")
    for key, data in files.items():
        s3.put_object(Bucket=bucket, Key=f"in/{key}", Body=data)


def _read_all(bucket, prefix="out"):
    import s3fs

    fs = s3fs.S3FileSystem()
    paths = sorted(fs.glob(f"{bucket}/{prefix}/**/*.parquet"))
    tables = [pq.read_table(p, filesystem=fs) for p in paths]
    return paths, tables, fs


def test_label_bucket_to_bucket(s3_server, s3_bucket, ray_local, capsys):
    good = good_images(5)
    bad = bad_inputs()
    _upload(s3_bucket, {**good, **{k: v[0] for k, v in bad.items()}})
    code = main(
        ["label", f"s3://{s3_bucket}/in/", "--out", f"s3://{s3_bucket}/out", "--vocab", VOCAB,
         "--model", "fcclip-tiny", "--weights", "random", "--shard-size", "4", "--batch-size", "2", "--no-progress"]
    )
    out = capsys.readouterr().out
    assert code == 0, out
    assert "15 image(s)" in out and "11 ok, 4 failed" in out
    # the reasons, without what is particular to each image (its size, the decoder's details)
    reasons = sorted(line.split(" x ", 1)[1] for line in out.splitlines() if line.strip().startswith("1 x "))
    assert reasons == ["ImageDecodeError: cannot read the image header", "ImageDecodeError: empty input",
                       "ImageDecodeError: not an image, or a format Pillow cannot read",
                       "ImageDecodeError: refused by Pillow's size limit"], out

    paths, tables, fs = _read_all(s3_bucket)
    assert [p.rsplit("/", 1)[-1] for p in paths] == [f"part-{i:06d}.parquet" for i in range(4)]
    rows = [r for t in tables for r in t.to_pylist()]
    expected = {f"s3://{s3_bucket}/in/{k}": "ok" for k in good} | {f"s3://{s3_bucket}/in/{k}": s for k, (_, s) in bad.items()}
    assert sorted(r["uri"] for r in rows) == sorted(expected)  # every input exactly once
    for r in rows:
        assert r["status"] == expected[r["uri"]], (r["uri"], r["error"])
        assert r["image_id"] == image_id(r["uri"])
        assert r["model"] == "fcclip-tiny@random" and r["run_id"]
        if r["status"] == "error":
            assert r["error"] and r["segments"] == []
            continue
        assert r["error"] is None
        for s in r["segments"]:
            rle = {"size": s["rle"]["size"], "counts": s["rle"]["counts"].encode()}
            mask = mask_util.decode(rle).astype(bool)
            assert mask.shape == (r["height"], r["width"])
            assert mask.sum() == s["area"] > 0
            ys, xs = np.nonzero(mask)
            assert s["bbox"] == [xs.min(), ys.min(), xs.max() - xs.min() + 1, ys.max() - ys.min() + 1]
            assert s["label"] in ("person", "car", "dog", "grass", "sky")
    sizes = {r["uri"].rsplit("/", 1)[-1]: (r["width"], r["height"]) for r in rows}
    assert sizes["tiny_1x1.png"] == (1, 1) and sizes["animated.gif"] == (50, 40)
    errors = {r["uri"].rsplit("/", 1)[-1]: r["error"] for r in rows if r["status"] == "error"}
    assert "pixels" in errors["bomb.png"] or "limit" in errors["bomb.png"]

    # the vocabulary and thresholds travel in the file metadata
    meta = pq.read_metadata(paths[0], filesystem=fs).metadata
    assert [c["names"][0] for c in json.loads(meta[b"fcclip.vocabulary"])["categories"]] == [
        "person", "car", "dog", "grass", "sky"]
    assert json.loads(meta[b"fcclip.thresholds"])["overlap_threshold"] == 0.8
    # credentials appear nowhere in what was written
    for key in fs.find(f"{s3_bucket}/out"):
        assert s3_server["AWS_SECRET_ACCESS_KEY"].encode() not in fs.cat_file(key)
    assert s3_server["AWS_SECRET_ACCESS_KEY"] not in out


def test_read_with_duckdb_and_pandas(s3_server, s3_bucket, ray_local, capsys):
    import duckdb
    import pandas as pd
    import s3fs

    _upload(s3_bucket, good_images(3))
    assert main(["label", f"s3://{s3_bucket}/in/", "--out", f"s3://{s3_bucket}/out", "--vocab", VOCAB,
                 "--model", "fcclip-tiny", "--weights", "random", "--no-progress"]) == 0
    con = duckdb.connect()
    con.register_filesystem(s3fs.S3FileSystem())
    n, ok, segs = con.execute(
        f"select count(*), count(*) filter (where status = 'ok'), sum(len(segments)) "
        f"from read_parquet('s3://{s3_bucket}/out/*.parquet')"
    ).fetchone()
    assert (n, ok) == (3, 3)
    labels = con.execute(
        f"select s.label, count(*) from (select unnest(segments) as s from read_parquet('s3://{s3_bucket}/out/*.parquet')) group by 1"
    ).fetchall()
    assert sum(c for _, c in labels) == segs
    df = pd.read_parquet(f"s3://{s3_bucket}/out/", storage_options={})
    assert len(df) == 3 and set(df.columns) >= {"uri", "image_id", "width", "height", "status", "segments"}


def test_resume_skips_committed_shards_and_rejects_other_settings(tmp_path, ray_local, capsys):
    from fcclip.datasets.synthetic import write_images

    write_images(tmp_path / "in", count=6, size=(48, 64))
    args = ["label", str(tmp_path / "in"), "--out", str(tmp_path / "out"), "--vocab", VOCAB,
            "--model", "fcclip-tiny", "--weights", "random", "--shard-size", "2", "--no-progress"]
    assert main(args) == 0
    first = {p.name: p.read_bytes() for p in (tmp_path / "out").glob("*.parquet")}
    assert sorted(first) == ["part-000000.parquet", "part-000001.parquet", "part-000002.parquet"]
    # a run killed after writing a shard's part file, before naming it in the table's log: the last version is
    # undone (its log entry removed), and its part file removed too
    log = sorted((tmp_path / "out" / "_delta_log").glob("*.json"))
    last = [json.loads(line) for line in log[-1].read_text().splitlines()]
    added = [a["add"]["path"] for a in last if "add" in a]
    assert added
    log[-1].unlink()
    for name in added:
        (tmp_path / "out" / name).unlink()
    run_json = tmp_path / "out" / "_fcclip" / "run.json"  # and its run not seen complete, as a killed run leaves it
    run = json.loads(run_json.read_text())
    run["increments"][-1].pop("complete")
    run_json.write_text(json.dumps(run))
    capsys.readouterr()
    assert main(args) == 0
    out = capsys.readouterr().out
    assert f"labeled {2 * len(added)} image(s)" in out, out
    assert len(added) == 3 or f"{3 - len(added)} shard(s) were already committed" in out, out
    again = {p.name: p.read_bytes() for p in (tmp_path / "out").glob("*.parquet")}
    assert sorted(again) == sorted(first)
    untouched = sorted(set(first) - set(added))
    assert [again[n] for n in untouched] == [first[n] for n in untouched]
    import pandas as pd

    df = pd.read_parquet(tmp_path / "out")
    assert len(df) == 6 and df["uri"].is_unique and df["run_id"].nunique() == 1
    # a complete run is a no-op
    assert main(args) == 0
    assert "labeled 0 image(s)" in capsys.readouterr().out
    # other settings into the same DEST are refused while it holds committed shards ...
    assert main(args[:-1] + ["--min-score", "0.5", "--no-progress"]) == 2
    assert "other settings" in capsys.readouterr().err
    assert sorted(p.name for p in (tmp_path / "out").glob("*.parquet")) == sorted(first)
    # ... unless --overwrite: the earlier run's files go, and the new run writes every shard
    (tmp_path / "out" / "mine.txt").write_text("kept")
    run_id = df["run_id"].iloc[0]
    assert main(args[:-1] + ["--min-score", "0.5", "--no-progress", "--overwrite"]) == 0
    assert "labeled 6 image(s)" in capsys.readouterr().out
    assert (tmp_path / "out" / "mine.txt").read_text() == "kept"
    df = pd.read_parquet([str(p) for p in sorted((tmp_path / "out").glob("*.parquet"))])
    assert len(df) == 6 and df["run_id"].nunique() == 1 and df["run_id"].iloc[0] != run_id
    assert json.loads((tmp_path / "out" / "_fcclip" / "run.json").read_text())["settings"]["min_score"] == 0.5


def _local_args(source, dest, *more):
    return ["label", str(source), "--out", str(dest), "--vocab", VOCAB, "--model", "fcclip-tiny", "--weights",
            "random", "--no-progress", *more]


def test_a_typo_in_source_does_not_block_its_fix(tmp_path, ray_local, capsys):
    """A listing that fails leaves no settings in DEST; settings of a run with no committed shard give way."""
    from fcclip.datasets.synthetic import write_images

    write_images(tmp_path / "in", count=2, size=(48, 64))
    dest = tmp_path / "o1"
    assert main(_local_args(tmp_path / "nope", dest)) == 2
    assert "no such folder" in capsys.readouterr().err
    assert not (dest / "_fcclip" / "run.json").exists()
    assert main(_local_args(tmp_path / "in", dest)) == 0, capsys.readouterr().err
    assert "labeled 2 image(s)" in capsys.readouterr().out
    assert json.loads((dest / "_fcclip" / "run.json").read_text())["settings"]["source"] == str(tmp_path / "in")

    # a run whose manifest is complete but which committed nothing (stopped before its first shard) gives way too
    from fcclip.config import load_config
    from fcclip.vocabulary import load_vocabulary
    from fcclip_pipelines.label import LabelConfig, prepare_run
    from fcclip_pipelines.output import Destination

    other = tmp_path / "o2"
    cfg = LabelConfig(source=str(tmp_path / "nope"), dest=str(other), vocab=VOCAB, model="fcclip-tiny")
    write_images(tmp_path / "nope", count=1, size=(48, 64), seed=3)  # listed; none of its shards committed
    prepare_run(cfg, Destination(str(other)), load_config("fcclip-tiny"), load_vocabulary(VOCAB))
    assert json.loads((other / "_fcclip" / "run.json").read_text())["settings"]["source"] == str(tmp_path / "nope")
    assert main(_local_args(tmp_path / "in", other)) == 0, capsys.readouterr().err
    assert "labeled 2 image(s)" in capsys.readouterr().out
    assert len(pq.read_table(other).to_pylist()) == 2


def test_weights_that_are_not_a_checkpoint_end_the_job_in_one_line(tmp_path, ray_local, capsys, caplog, monkeypatch):
    """A model stage that cannot be built (here: a weights file of random bytes) fails again in every actor: the
    second failure ends the job with the exception's type and message, one line, not an actor's traceback each;
    fixed, the same command labels."""
    from fcclip.datasets.synthetic import write_images

    write_images(tmp_path / "in", count=2, size=(48, 64))
    weights = tmp_path / "model.pth"
    weights.write_bytes(np.random.default_rng(0).bytes(1024))
    dest = tmp_path / "out"
    args = [a if a != "random" else str(weights) for a in _local_args(tmp_path / "in", dest)]
    assert main(args) == 1
    err = capsys.readouterr().err
    last = err.strip().splitlines()[-1]
    assert last.startswith("fcclip label: error: the model actor could not start: CheckpointError: ") and \
        f"{weights}: cannot be read" in last, err
    assert "Traceback" not in err, err
    failed = [r.getMessage() for r in caplog.records if "failed to start" in r.getMessage()]
    assert len(failed) == 1 and "(CheckpointError: " in failed[0], failed

    # a real checkpoint there: the same command labels; each version's commit info names the model as the rows do
    import warnings

    from deltalake import DeltaTable

    from fcclip import build_model
    from fcclip.checkpoint import save_checkpoint

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        save_checkpoint(build_model("fcclip-tiny", weights="random", device="cpu"), weights)
    assert main(args) == 0, capsys.readouterr().err
    assert "labeled 2 image(s)" in capsys.readouterr().out
    models = {r["model"] for r in pq.read_table(dest, columns=["model"]).to_pylist()}
    assert len(models) == 1 and next(iter(models)).startswith("fcclip-tiny@sha256:")
    history = DeltaTable(str(dest)).history()
    assert [h["fcclip.model_id"] for h in history] == [*models]
    assert history[0]["fcclip.model"] == f"fcclip-tiny@{weights}"  # as given

    # typed relative to the working directory, the checkpoint is recorded absolute: fcclip search (and relabel), which
    # load the run's weights, work from any directory (they failed with "checkpoint not found: model.pth")
    monkeypatch.chdir(tmp_path)
    relative = [a if a != "random" else "model.pth" for a in _local_args("in", "out2", "--embeddings")]
    assert main(relative) == 0, capsys.readouterr().err
    run = json.loads((tmp_path / "out2" / "_fcclip" / "run.json").read_text())
    assert run["settings"]["weights"] == str(weights)
    monkeypatch.chdir(tmp_path / "in")
    capsys.readouterr()
    assert main(["search", "../out2", "a cat", "--top", "1"]) == 0, capsys.readouterr().err


def test_the_nightly_rerun_asks_for_gpus_only_when_there_is_something_to_label(tmp_path, ray_local, capsys):
    """The same command every night (cluster/kuberay/raycronjob-label.yaml): with nothing new it lists SOURCE and
    ends without asking for a GPU, so an autoscaler starts no GPU node for it; with something new it asks. This
    Ray has no GPU, which stands for a GPU node type not started yet: a request is not granted within --gpu-wait.
    The run that was refused left its listing; the next one finishes it and then lists SOURCE again."""
    from fcclip.datasets.synthetic import write_images

    folder, dest = tmp_path / "in", tmp_path / "out"
    write_images(folder, count=2, size=(48, 64))
    assert main(_local_args(folder, dest, "--gpus-per-actor", "0")) == 0
    nightly = _local_args(folder, dest, "--gpus-per-actor", "1", "--gpu-wait", "3")
    capsys.readouterr()
    assert main(nightly) == 0  # nothing new: no GPU asked for (one asked for would not be granted)
    captured = capsys.readouterr()
    assert "listed again: 0 new, 0 changed, 2 unchanged" in captured.out, captured.out + captured.err
    assert "GPU" not in captured.err, captured.err

    write_images(tmp_path / "late", count=1, size=(48, 64), seed=7)[0].rename(folder / "late.jpg")
    assert main(nightly) == 1  # something new: the GPU is asked for
    err = capsys.readouterr().err
    assert "did not grant 1 x {GPU: 1, CPU: 1} within 3 s" in err, err
    assert len(pq.read_table(dest).to_pylist()) == 2

    write_images(tmp_path / "later", count=1, size=(48, 64), seed=8)[0].rename(folder / "later.jpg")
    assert main(_local_args(folder, dest, "--gpus-per-actor", "0")) == 0
    out = capsys.readouterr().out
    assert "first finished an unfinished run (1 new, 0 changed, 2 unchanged): 1 image(s), 1 ok" in out, out
    assert "listed again: 1 new, 0 changed, 3 unchanged" in out and "labeled 2 image(s)" in out, out
    rows = pq.read_table(dest).to_pylist()
    assert sorted(r["uri"] for r in rows) == sorted(str(p) for p in folder.iterdir())


def test_a_stop_while_waiting_for_gpus_is_one_line_and_the_listing_is_kept(tmp_path):
    """SIGTERM (`ray job stop`, a pod stopped) while the job waits for GPUs that are not there: the wait ends within a
    second, one line, exit 128 + 15, the lock released and its local Ray stopped; the listing stays, and the next
    run labels it, then lists again and labels what arrived meanwhile, both passes on the one local Ray it starts."""
    import signal
    import subprocess
    import sys
    import time

    from fcclip.datasets.synthetic import write_images

    write_images(tmp_path / "in", count=2, size=(48, 64))
    dest = tmp_path / "out"
    argv = _local_args(tmp_path / "in", dest, "--gpus-per-actor", "1", "--gpu-wait", "120", "--num-cpus", "1")
    proc = subprocess.Popen([sys.executable, "-m", "fcclip_pipelines", *argv], stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, start_new_session=True)
    try:
        lines = []
        for line in proc.stdout:  # the request is made (and cannot be granted: this Ray has no GPU)
            lines.append(line)
            if "model actors: 1 x 1 GPU" in line:
                break
        time.sleep(8)  # Ray's autoscaler says after ~6 s that no node type fits: its event lines stay off (no -v)
        asked = time.monotonic()
        proc.send_signal(signal.SIGTERM)
        rest = proc.stdout.read()
        code = proc.wait(timeout=60)
        took = time.monotonic() - asked
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    err = "".join(lines) + rest
    assert code == 128 + signal.SIGTERM, err
    assert took < 30, took  # not the 120 s of --gpu-wait
    stopped = [line for line in err.splitlines() if line.startswith("fcclip label:")]
    assert stopped == ["fcclip label: stopped by SIGTERM while waiting for GPUs; nothing was labeled in this run"], err
    assert "Traceback" not in err and "SIGTERM received" not in err and "(autoscaler" not in err, err
    assert not (dest / "_fcclip" / "lock.json").exists()
    assert (dest / "_fcclip" / "run.json").exists()  # the listing is kept

    # an image arrives meanwhile: the next run finishes the listing, lists again and labels it, on one local Ray
    # (a process of its own: this module's other tests keep a Ray running in the test process)
    write_images(tmp_path / "late", count=1, size=(48, 64), seed=7)[0].rename(tmp_path / "in" / "late.jpg")
    again = subprocess.run([sys.executable, "-m", "fcclip_pipelines", "label", "-v",
                            *_local_args(tmp_path / "in", dest, "--gpus-per-actor", "0")[1:]],
                           capture_output=True, text=True, timeout=300)
    assert again.returncode == 0, again.stderr[-3000:]
    assert "first finished an unfinished run (the first listing): 2 image(s), 2 ok" in again.stdout, again.stdout
    assert "listed again: 1 new, 0 changed, 2 unchanged" in again.stdout, again.stdout
    assert "labeled 3 image(s)" in again.stdout, again.stdout
    assert again.stderr.count("Started a local Ray instance") == 1, again.stderr[-3000:]  # once for both passes
    starting = [line.split("fcclip.label: ")[-1] for line in again.stderr.splitlines() if line.endswith(" starting")]
    assert starting == ["Ray and 1 model actor(s) starting", "1 model actor(s) starting"], again.stderr[-3000:]
    assert len(pq.read_table(dest).to_pylist()) == 3


def test_sigterm_while_ray_starts_is_one_line(tmp_path):
    """SIGTERM as the job starts its local Ray (`ray.init` sets a handler of its own first thing, which exited with
    status 15 and no line): exit 128 + 15, one line, the lock released."""
    import signal
    import subprocess
    import sys
    import time

    from fcclip.datasets.synthetic import write_images

    write_images(tmp_path / "in", count=2, size=(48, 64))
    dest = tmp_path / "out"
    argv = _local_args(tmp_path / "in", dest, "--gpus-per-actor", "0", "--num-cpus", "1")
    proc = subprocess.Popen([sys.executable, "-m", "fcclip_pipelines", *argv], stderr=subprocess.PIPE, text=True,
                            start_new_session=True)
    try:
        lines = []
        for line in proc.stderr:
            lines.append(line)
            if "Ray and 1 model actor(s) starting" in line:  # ray.init is next: seconds on this machine
                break
        time.sleep(0.2)
        proc.send_signal(signal.SIGTERM)
        err = "".join(lines) + proc.stderr.read()
        code = proc.wait(timeout=60)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    assert code == 128 + signal.SIGTERM, err
    assert [line for line in err.splitlines() if line.startswith("fcclip label:")] == [
        "fcclip label: stopped by SIGTERM"], err
    assert not (dest / "_fcclip" / "lock.json").exists()


def test_foreign_files_in_dest_are_refused_untouched(tmp_path, capsys):
    import pyarrow as pa

    from fcclip.datasets.synthetic import write_images

    write_images(tmp_path / "in", count=2, size=(48, 64))
    dest = tmp_path / "theirs"
    dest.mkdir()
    pq.write_table(pa.table({"x": [1, 2]}), dest / "part-000000.parquet")
    before = (dest / "part-000000.parquet").read_bytes(), (dest / "part-000000.parquet").stat().st_mtime_ns
    for extra in ([], ["--overwrite"]):  # a file with an output's name is never replaced
        assert main(_local_args(tmp_path / "in", dest, *extra)) == 2
        err = capsys.readouterr().err
        assert "fcclip did not write" in err and "'part-000000.parquet'" in err, err
        assert "Traceback" not in err
    assert sorted(p.name for p in dest.iterdir()) == ["part-000000.parquet"]  # nothing written, nothing removed
    assert ((dest / "part-000000.parquet").read_bytes(), (dest / "part-000000.parquet").stat().st_mtime_ns) == before

    notes = tmp_path / "notes"
    notes.mkdir()
    (notes / "README.txt").write_text("mine")
    assert main(_local_args(tmp_path / "in", notes)) == 2
    err = capsys.readouterr().err
    assert "'README.txt'" in err and "--overwrite" in err
    assert sorted(p.name for p in notes.iterdir()) == ["README.txt"]


def test_a_class_name_too_long_for_the_text_encoder_is_refused_before_anything_runs(tmp_path, capsys):
    """A name that makes a prompt longer than the text encoder's context would fail in every model actor: the driver
    counts its tokens (only for names long enough to need it) and says so in one line, status 2, nothing written."""
    from fcclip.datasets.synthetic import write_images

    write_images(tmp_path / "in", count=2, size=(48, 64))
    args = _local_args(tmp_path / "in", tmp_path / "out")
    args[args.index("--vocab") + 1] = "word " * 70 + "; dog"
    assert main(args) == 2
    err = capsys.readouterr().err
    assert "class at index 0" in err and "more than the text encoder's context length 77" in err, err
    assert len(err.strip().splitlines()) == 1 and not (tmp_path / "out").exists()  # before DEST is listed or written


def test_dest_inside_an_output_or_a_file_is_refused(tmp_path, capsys):
    """An output inside another (a table, or a run's folder) would read as rows of the outer one to readers of its
    folder; DEST that is a file, or below one, is no folder: each one line, status 2, nothing written."""
    from deltalake import write_deltalake
    import pyarrow as pa

    from fcclip.datasets.synthetic import write_images

    write_images(tmp_path / "in", count=2, size=(48, 64))
    table = tmp_path / "table"
    write_deltalake(str(table), pa.table({"x": [1]}))
    run = tmp_path / "run"
    (run / "_fcclip").mkdir(parents=True)
    (run / "_fcclip" / "run.json").write_text("{}")
    (tmp_path / "file").write_text("x")
    for dest, said in [(table / "sub", f"inside the output {table}"), (run / "a" / "b", f"inside the output {run}"),
                       (tmp_path / "file", "is a file, not a folder"), (tmp_path / "file" / "sub", "a file, not a")]:
        assert main(_local_args(tmp_path / "in", dest)) == 2
        err = capsys.readouterr().err
        assert said in err and len(err.strip().splitlines()) == 1, err
    assert not (table / "sub").exists() and not (run / "a").exists()


def test_overwrite_writes_beside_foreign_files_and_max_failed_fraction(tmp_path, ray_local, capsys):
    from fcclip.datasets.synthetic import write_images

    write_images(tmp_path / "in", count=3, size=(48, 64))
    (tmp_path / "in" / "broken.jpg").write_bytes(b"not a picture")
    dest = tmp_path / "out"
    dest.mkdir()
    (dest / "README.txt").write_text("mine")
    code = main(_local_args(tmp_path / "in", dest, "--overwrite", "--max-failed-fraction", "0.2"))
    captured = capsys.readouterr()
    assert code == 1, captured.err
    assert "1 of 4 image(s) failed (25.0%), more than --max-failed-fraction 0.2" in captured.err
    assert "3 ok, 1 failed" in captured.out
    assert (dest / "README.txt").read_text() == "mine"
    rows = pq.read_table(dest / "part-000000.parquet").to_pylist()  # committed before the non-zero exit
    assert sorted(r["status"] for r in rows) == ["error", "ok", "ok", "ok"]
    # the run is resumed as any other (the foreign file is not asked about again); here, nothing is left to do
    assert main(_local_args(tmp_path / "in", dest, "--max-failed-fraction", "0.2")) == 0
    assert "labeled 0 image(s)" in capsys.readouterr().out


def test_panoptic_columns_match_pycocotools_per_mask():
    """The single-pass encoder gives, for every segment, what pycocotools gives for its mask alone: the same RLE
    string, area and box; segments absent from the map, maps of one id, 1x1 maps included."""
    from fcclip_pipelines.stages import panoptic_columns

    rng = np.random.default_rng(0)
    maps = [rng.integers(0, 5, size=rng.integers(1, 40, 2)).astype(np.uint8) for _ in range(20)]
    maps += [np.full((7, 3), 2, np.uint8), np.zeros((1, 1), np.uint16), np.arange(12, dtype=np.uint16).reshape(3, 4)]
    for segment_map in maps:
        segments = [{"id": i} for i in (1, 2, 3, 4, 7)]
        cols = panoptic_columns(segment_map, segments)
        assert cols["size"] == segment_map.shape
        for k, s in enumerate(segments):
            mask = segment_map == s["id"]
            ref = mask_util.encode(np.asfortranarray(mask.astype(np.uint8)))
            assert cols["counts"][k] == ref["counts"].decode() and cols["area"][k] == mask.sum()
            ys, xs = np.nonzero(mask)
            box = [xs.min(), ys.min(), xs.max() - xs.min() + 1, ys.max() - ys.min() + 1] if len(xs) else [0, 0, 0, 0]
            assert cols["bbox"][k] == [float(v) for v in box]


def test_stages_run_without_ray(tmp_path):
    """The stages are plain callables: the whole chain on one chunk, in process, to a committed part file."""
    from fcclip.vocabulary import load_vocabulary
    import pyarrow as pa

    from fcclip_pipelines.output import Destination, commit_shard, write_fragment
    from fcclip_pipelines.stages import FCCLIPSegmenter, ModelSpec, ReadDecode, encode_rows, label_images

    files = {**good_images(2), "odd/not_an_image.jpg": b"nope"}
    uris = []
    for name, data in files.items():
        p = tmp_path / name.replace("/", "_")
        p.write_bytes(data)
        uris.append(str(p))
    meta, images = ReadDecode(short_edge=64, max_size=128, max_pixels=10**8)(uris)
    assert [None if im is None else im.shape[:2] for im in images] == [(64, 85), (64, 85), None]
    assert meta["error"][2] and not meta["error"][0] and (meta["height"][0], meta["width"][0]) == (72, 96)
    spec = ModelSpec("fcclip-tiny", "random", load_vocabulary(VOCAB).to_dict(), device="cpu")
    model_stage = FCCLIPSegmenter.builder(spec)()
    labeled = label_images(model_stage, meta, images, batch_size=2)
    assert labeled["model"] == "fcclip-tiny@random" and labeled["maps"][2] is None
    constants = {"vocabulary": "custom@x", "run_id": "r1", "model": "unused"}
    table = encode_rows(uris, [0, 1, 2], meta, labeled, constants)
    rows = table.to_pylist()
    assert [r["status"] for r in rows] == ["ok", "ok", "error"] and [r["row"] for r in rows] == [0, 1, 2]
    assert (rows[0]["width"], rows[0]["height"]) == (96, 72) and rows[2]["width"] is None
    for r, segment_map in zip(rows[:2], labeled["maps"][:2]):
        assert segment_map.shape == (72, 96)
        for s in r["segments"]:
            mask = mask_util.decode({"size": s["rle"]["size"], "counts": s["rle"]["counts"].encode()}).astype(bool)
            assert (mask == (segment_map == s["id"])).all() and mask.sum() == s["area"]
    # two fragments of one shard, one of them written twice (a retried task): the commit takes each row once
    dest = Destination(str(tmp_path / "out"))
    from fcclip_pipelines.sources import write_manifest_shard

    for shard in (0, 1):  # the shards' manifests, as the listing writes them: the commit adds their source columns
        write_manifest_shard(dest, shard, pa.table({"uri": uris, "size": [1, 2, 3]}))
    first = write_fragment(dest, 0, table.slice(0, 2))
    names = [first, write_fragment(dest, 0, table.slice(2, 1)), write_fragment(dest, 0, table.slice(0, 2))]
    assert not any(n.endswith(".parquet") for n in names)
    assert commit_shard(dest, 0, names, 3, {"run_id": "r1"}) == 3
    committed = pq.read_table(tmp_path / "out" / "part-000000.parquet").to_pylist()
    assert [r["uri"] for r in committed] == uris and [r["source_size"] for r in committed] == [1, 2, 3]
    assert [r["source_etag"] for r in committed] == [None] * 3
    assert not (tmp_path / "out" / "_fcclip" / "fragments" / "shard-000000").exists()
    with pytest.raises(RuntimeError, match="do not cover"):
        commit_shard(dest, 1, [write_fragment(dest, 1, table.slice(0, 2))], 3, {})
    assert not (tmp_path / "out" / "part-000001.parquet").exists()


def test_a_model_actor_on_cpu_computes_with_the_cores_of_a_local_ray(ray_local):
    """Ray gives an actor that asked for one CPU one PyTorch thread (OMP_NUM_THREADS=1), and on a machine without a
    GPU the model, the job's one heavy stage, used one core of it. On a local Ray the model actors share its CPUs
    (2 here); on a cluster the threads are the CPUs each actor asks for, as Ray sets them."""
    from fcclip.vocabulary import load_vocabulary
    from fcclip_pipelines import runtime
    from fcclip_pipelines.stages import FCCLIPSegmenter, ModelSpec

    assert runtime.local_cpus(None, None) == runtime.machine_cpus() >= 1  # the local Ray's, as init_ray starts it
    cpus = runtime.local_cpus(None, 2)  # --num-cpus 2, the test Ray's
    assert cpus == 2 and runtime.local_cpus("127.0.0.1:6379", 2) is None
    assert runtime.cpu_model_threads(cpus, 1) == 2
    assert runtime.cpu_model_threads(cpus, 2) == runtime.cpu_model_threads(cpus, 3) == 1
    assert runtime.cpu_model_threads(None, 1) is None  # a cluster: Ray's threads, one per CPU asked for

    def torch_threads(model_stage):  # defined here: pickled by value (the workers cannot import a test module)
        import torch

        return torch.get_num_threads()

    vocabulary = load_vocabulary(VOCAB).to_dict()
    threads = {}
    for asked in (None, 2):
        spec = ModelSpec("fcclip-tiny", "random", vocabulary, threads=asked)
        actor = runtime.start_model_actor(FCCLIPSegmenter.builder(spec), gpus=0, cpus=1)
        try:
            ray_local.get(actor.ready.remote())
            _, threads[asked] = ray_local.get(actor.run.options(num_returns=2).remote(torch_threads))
        finally:
            ray_local.kill(actor)
    assert threads == {None: 1, 2: 2}


def test_model_actors_leave_a_cpu_of_a_local_ray_to_decode(tmp_path, ray_local, capsys, caplog):
    """--actors 2 on a local Ray of 2 CPUs: each actor asking for one held them all, idle, and no image could be
    decoded for them (decode tasks ask for one): the job waited for ever, as a 1-CPU container did with one actor.
    They ask for half a CPU each now and compute with one thread each."""
    import logging
    import threading

    from fcclip.datasets.synthetic import write_images

    write_images(tmp_path / "in", count=4, size=(48, 64))
    result = {}
    with caplog.at_level(logging.INFO, logger="fcclip.label"):
        job = threading.Thread(target=lambda: result.update(
            code=main([*_local_args(tmp_path / "in", tmp_path / "out"), "--actors", "2", "--num-cpus", "2"])),
            daemon=True)
        job.start()
        job.join(timeout=(limit_s := 240))
    assert not job.is_alive(), f"the job waited for a CPU for {limit_s} s"
    assert result == {"code": 0}, capsys.readouterr().err
    assert "model actors: 2 on CPU + 0.5 CPU (1 thread each), float32" in caplog.text, caplog.text
    assert len(pq.read_table(tmp_path / "out").to_pylist()) == 4


def test_an_images_rows_do_not_depend_on_the_images_batched_with_it():
    """Zero padding changes what the model computes for the image it pads: the model stage's calls each hold images
    of one padded size, so each image gets the rows it gets alone (landscape and portrait images in one chunk, as
    an increment or a retry one at a time would regroup them)."""
    from fcclip.vocabulary import load_vocabulary
    from fcclip_pipelines.stages import FCCLIPSegmenter, ModelSpec, label_images

    segmenter = FCCLIPSegmenter(ModelSpec("fcclip-tiny", "random", load_vocabulary(VOCAB).to_dict(), device="cpu"))
    calls = []

    class Recorded:  # the segmenter, its calls' image sizes recorded
        model_id, batch_key = segmenter.model_id, segmenter.batch_key

        def __call__(self, images, sizes):
            calls.append([im.shape[:2] for im in images])
            return segmenter(images, sizes)

    rng = np.random.default_rng(0)
    shapes = [(64, 80), (72, 56), (64, 85), (64, 80), (96, 64), (64, 96)]  # the size divisibility is 32
    images = [rng.integers(0, 255, (*shape, 3), dtype=np.uint8) for shape in shapes]
    meta = {"height": [h for h, _ in shapes], "width": [w for _, w in shapes], "error": [""] * len(shapes)}
    batched = label_images(Recorded(), meta, images, batch_size=4)
    assert sorted(map(sorted, calls)) == [[(64, 80), (64, 80), (64, 85), (64, 96)], [(72, 56), (96, 64)]]
    for i in range(len(images)):
        alone = label_images(segmenter, {k: v[i : i + 1] for k, v in meta.items()}, images[i : i + 1], 1)
        assert (batched["maps"][i] == alone["maps"][0]).mean() > 0.998  # batched kernels round differently
        assert [(s["id"], s["label"]) for s in batched["segments"][i]] == [(s["id"], s["label"]) for s in
                                                                           alone["segments"][0]]
        np.testing.assert_allclose([s["score"] for s in batched["segments"][i]],
                                   [s["score"] for s in alone["segments"][0]], atol=1e-5)


_CPU_STAGES = """
import sys
import numpy as np
import pyarrow as pa
from fcclip_pipelines.output import Destination, commit_shard, write_fragment
from fcclip_pipelines.sources import write_manifest_shard
from fcclip_pipelines.stages import ReadDecode, encode_rows

uris = sys.argv[2:]
meta, images = ReadDecode(short_edge=64, max_size=128, max_pixels=10**8)(uris)
assert meta["error"] == ["", ""], meta
maps = [np.ones((h, w), np.uint8) for h, w in zip(meta["height"], meta["width"])]
segment = {"id": 1, "label": "dog", "category_id": 2, "is_thing": True, "score": 0.8, "margin": 0.3,
           "branches_agree": True, "mask_score": 0.9, "kept_share": 1.0, "doubt": 0.4}
labeled = {"maps": maps, "segments": [[segment], [segment]], "error": ["", ""], "model": "m"}
table = encode_rows(uris, [0, 1], meta, labeled, {"vocabulary": "v", "run_id": "r", "model": "m"})
assert table.column("uncertainty").null_count == 0
dest = Destination(sys.argv[1])
write_manifest_shard(dest, 0, pa.table({"uri": uris, "size": [1, 2]}))
assert commit_shard(dest, 0, [write_fragment(dest, 0, table)], 2, {"run_id": "r"}) == 2
loaded = sorted(m for m in sys.modules if m.split(".")[0] in ("torch", "open_clip", "timm", "ray"))
assert not loaded, loaded
import fcclip_pipelines.engine  # what a Ray worker imports to run the engine's decode, write and commit tasks
loaded = sorted(m for m in sys.modules if m.split(".")[0] in ("torch", "open_clip", "timm"))
assert not loaded, loaded
"""


def test_cpu_stages_do_not_import_torch(tmp_path):
    """Decode, encode and write tasks run on CPU nodes: decoding an image and writing its rows (uncertainty
    columns included) loads neither torch nor open_clip (each would cost every worker process seconds and hundreds
    of MiB)."""
    import subprocess
    import sys

    uris = []
    for name, data in good_images(2).items():
        (tmp_path / name.replace("/", "_")).write_bytes(data)
        uris.append(str(tmp_path / name.replace("/", "_")))
    proc = subprocess.run([sys.executable, "-c", _CPU_STAGES, str(tmp_path / "out"), *uris], capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert (tmp_path / "out" / "part-000000.parquet").exists()


_WATCHDOG = """
import sys, threading, time
from fcclip_pipelines.stages import _Timeout, _time_limit

for _ in range(2000):  # blocks that end in time leave nothing behind for the process's watchdog
    with _time_limit(0.05):
        pass
time.sleep(2.5)  # past twice their limit (and 2 s): still alive
try:
    with _time_limit(0.2):  # in the main thread the alarm cuts a block stuck in Python
        time.sleep(5)
except _Timeout:
    print("alarm", flush=True)

def stuck():  # off the main thread no alarm reaches it: the watchdog ends the process
    with _time_limit(0.5):
        time.sleep(30)

threading.Thread(target=stuck).start()
time.sleep(20)
print("still alive", flush=True)
"""


def test_time_limit_watchdog_ends_a_stuck_process_only():
    """The per-image time limit's watchdog (one thread per process): thousands of blocks that end in time do not
    trip it; a block stuck where the alarm cannot reach ends the process (exit 75) at twice its limit plus 2 s."""
    import subprocess
    import sys

    proc = subprocess.run([sys.executable, "-c", _WATCHDOG], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 75, (proc.returncode, proc.stdout, proc.stderr[-2000:])
    # the alarm cut the first stuck block; the watchdog ended the process before its main thread woke up
    assert proc.stdout.split() == ["alarm"] and "stuck far past the 0.5 s time limit" in proc.stderr


_FIRST_READ = """
import json
import sys
import fsspec
from fcclip_pipelines.stages import ReadDecode

uri, limit = sys.argv[1], float(sys.argv[2])
first, _ = ReadDecode(None, 1333, None, timeout_s=limit)([uri])  # this process's first read, under the limit
then, images = ReadDecode(None, 1333, None, timeout_s=60)([uri])
try:
    with fsspec.open(uri + ".copy", "wb") as f:
        f.write(b"x")
    wrote = "ok"
except Exception as e:
    wrote = f"{type(e).__name__}: {e}"
print(json.dumps([first["error"][0], then["error"][0], images[0] is not None, wrote]))
"""


def test_a_time_limit_on_a_workers_first_read_leaves_it_working(s3_server, s3_bucket):
    """A worker's first S3 read imports s3fs (aiobotocore, aiohttp: tenths of a second). A --decode-timeout whose
    alarm fired inside those imports left aiohttp half-imported, and every later read and write of that worker failed
    ("AttributeError: module aiohttp has no attribute http_exceptions"; `fcclip label s3://... --decode-timeout 0.2`
    ended with its writes refused). Limits from 0.02 s to 0.4 s, each in a fresh process: the first read is in time
    or timed out, and the next read and a write of that process work."""
    import subprocess
    import sys

    data = next(iter(good_images(1).values()))
    _upload(s3_bucket, {"first.jpg": data})
    uri = f"s3://{s3_bucket}/in/first.jpg"
    for limit in (0.02, 0.05, 0.08, 0.1, 0.12, 0.15, 0.2, 0.25, 0.3, 0.4):
        proc = subprocess.run([sys.executable, "-c", _FIRST_READ, uri, str(limit)], capture_output=True, text=True,
                              timeout=120)
        assert proc.returncode == 0, proc.stderr[-2000:]
        first, then, decoded, wrote = json.loads(proc.stdout.strip().rsplit("\n", 1)[-1])
        assert first in ("", f"timed out after {limit} s while reading or decoding"), (limit, proc.stdout)
        assert (then, decoded, wrote) == ("", True, "ok"), (limit, proc.stdout)


def test_read_patterns_of_each_engine(tmp_path, ray_local, capsys):
    """The README's read patterns, on a local DEST with its _fcclip/ folder: the ones that work return every row
    once, the ones it warns about fail on _fcclip/run.json."""
    import duckdb
    import pandas as pd
    import pyarrow.dataset as pads

    from fcclip.datasets.synthetic import write_images

    write_images(tmp_path / "in", count=3, size=(48, 64))
    dest = tmp_path / "out"
    assert main(_local_args(tmp_path / "in", dest, "--shard-size", "2")) == 0
    assert (dest / "_fcclip" / "run.json").exists()
    uris = sorted(str(p) for p in (tmp_path / "in").iterdir())

    def check(uri_column):
        assert sorted(uri_column) == uris

    con = duckdb.connect()  # its own connection: another test's unfinished result on the default one can't reach it
    check(r[0] for r in con.sql(f"select uri from read_parquet('{dest}/*.parquet')").fetchall())
    check(r[0] for r in con.sql(f"select uri from read_parquet('{dest}/**/*.parquet')").fetchall())
    with pytest.raises(duckdb.Error):
        con.sql(f"select uri from read_parquet('{dest}/**')").fetchall()
    check(pd.read_parquet(dest)["uri"])
    check(pq.read_table(dest).column("uri").to_pylist())
    check(pads.dataset(dest, format="parquet").to_table(columns=["uri"]).column("uri").to_pylist())

    pl = pytest.importorskip("polars")
    check(pl.scan_parquet(f"{dest}/*.parquet").select("uri").collect()["uri"].to_list())
    segments = pl.scan_parquet(f"{dest}/*.parquet").explode("segments").drop_nulls("segments").unnest("segments")
    labels = segments.group_by("label").len()
    assert labels.collect()["len"].sum() == duckdb.connect().sql(
        f"select count(*) from (select unnest(segments) from read_parquet('{dest}/*.parquet'))").fetchall()[0][0]
    with pytest.raises(Exception):
        pl.scan_parquet(dest).collect()


def test_rows_are_written_while_images_are_still_decoded(tmp_path, ray_local, monkeypatch):
    """On a machine with one CPU beside the model actor's, decode and write tasks share it: the first rows are
    written while later images still wait to be decoded, not after the last one (Ray hands a worker that finishes a
    task the owner's next queued task of the same kind, so decodes kept coming ahead of the model would hold the CPU
    to the end, and the model's results would wait in the object store meanwhile)."""
    import functools
    import time

    from ray import cloudpickle

    import fcclip_pipelines.label as label
    import tests.label_job as stand_ins
    from fcclip.datasets.synthetic import write_images

    cloudpickle.register_pickle_by_value(stand_ins)  # the workers cannot import the tests' modules
    written: list[float] = []

    class Recording(label.JobProgress):
        def labeled(self, ok: int, failed: int) -> None:
            super().labeled(ok, failed)
            written.append(time.time())

    monkeypatch.setattr(label, "JobProgress", Recording)
    write_images(tmp_path / "in", count=64, size=(32, 32))
    reads = tmp_path / "reads.log"
    cfg = label.LabelConfig(source=str(tmp_path / "in"), dest=str(tmp_path / "out"), vocab="thing;", model="fcclip-tiny",
                            weights="random", batch_size=4, chunk_size=4, shard_size=64, actors=(1, 1))
    summary = label.run_label(cfg, progress=False, make_model_stage=functools.partial(stand_ins.SlowModel, 0.0),
                              reader=stand_ins.FaultyReader([], str(reads), 0.05))  # one segment per image
    assert summary.ok == 64 and len(written) == 16
    read_at = sorted(float(line.split()[1]) for line in reads.read_text().splitlines())
    assert len(read_at) == 64
    after_first_rows = sum(t > written[0] for t in read_at)
    assert after_first_rows >= 16, f"only {after_first_rows} of 64 images were read after the first rows were written"


def test_without_a_gpu_a_chunk_is_a_few_images_so_that_the_progress_moves(tmp_path, ray_local, monkeypatch):
    """Where the model runs on CPU (seconds an image for the released models), the default chunk is CHUNK_CPU
    images: with 128 the progress stayed at 0 for the first 128 images (20 minutes of ConvNeXt-L on 2 cores). The
    progress moves by each chunk's rows as its write ends; --chunk-size still sets it."""
    import functools

    from ray import cloudpickle

    import fcclip_pipelines.label as label
    import tests.label_job as stand_ins
    from fcclip.datasets.synthetic import write_images

    cloudpickle.register_pickle_by_value(stand_ins)  # the workers cannot import the tests' modules
    steps: list[int] = []

    class Recording(label.JobProgress):
        def labeled(self, ok: int, failed: int) -> None:
            super().labeled(ok, failed)
            steps.append(ok + failed)

    monkeypatch.setattr(label, "JobProgress", Recording)
    write_images(tmp_path / "in", count=40, size=(32, 32))
    for chunk_size, expected in ((None, [8, 16, 16]), (128, [40])):
        steps.clear()
        cfg = label.LabelConfig(source=str(tmp_path / "in"), dest=str(tmp_path / f"out{chunk_size}"), vocab="thing;",
                                model="fcclip-tiny", weights="random", batch_size=4, chunk_size=chunk_size,
                                shard_size=64, actors=(1, 1), num_cpus=2)
        summary = label.run_label(cfg, progress=False, make_model_stage=functools.partial(stand_ins.SlowModel, 0.0))
        assert summary.ok == 40 and sorted(steps) == expected, (chunk_size, steps)
    assert label.CHUNK_CPU == 16 and label.chunk_size_for(0) == 16 and label.chunk_size_for(1) == label.CHUNK_GPU == 128


def test_progress_log_lines_give_the_rate_and_the_time_left(monkeypatch, caplog):
    """Off a terminal (a log file, `ray job logs`) the labeling line comes about once a minute, with the rate since
    the first rows and the time left at that rate."""
    import logging
    from types import SimpleNamespace

    import fcclip_pipelines.progress as progress

    clock = [5000.0]
    monkeypatch.setattr(progress, "time", SimpleNamespace(monotonic=lambda: clock[0]))  # this module's clock only
    bars = progress.JobProgress(enabled=False)
    with caplog.at_level(logging.INFO, logger="fcclip.label"):  # --actors 2-16: 2 start, more with the backlog
        bars.startup_started(2, 16)
    assert "Ray and 2 model actor(s) (up to 16 as the backlog grows) starting" in caplog.text, caplog.text
    bars.labeling_started(12_000, 12, 0)
    with caplog.at_level(logging.INFO, logger="fcclip.label"):
        bars.labeled(120, 8)  # the first rows: logged at once
        clock[0] += 30.0
        bars.labeled(128, 0)  # within the minute: not logged
        clock[0] += 30.0
        bars.labeled(2_432, 11)
        clock[0] += 60.0
        bars.labeled(0, 0)
    lines = [r.getMessage() for r in caplog.records if r.getMessage().startswith("labeled ")]
    # 2,571 images in the 60 s after the first 128: 42.9 images/s; 9,301 left: 217 s; then none in a minute
    assert lines == [
        "labeled 128/12,000 images (8 failed)",
        "labeled 2,699/12,000 images (19 failed), 42.9 images/s, about 00:03:37 left",
        "labeled 2,699/12,000 images (19 failed), 21.4 images/s, about 00:07:14 left",
    ], lines
