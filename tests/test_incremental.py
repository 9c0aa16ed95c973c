"""A lake that grows: a rerun labels only what is new or changed, each labeling is a version of DEST's Delta table,
and one driver writes into a DEST at a time. Locally and on the loopback S3 server (with an S3 Inventory report as
SOURCE); a driver killed mid-increment; two drivers on one DEST."""
from __future__ import annotations

import io
import json
import logging
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from fcclip_pipelines.cli import main
from fcclip_pipelines.lake import open_table, table_files, table_version
from fcclip_pipelines.output import Destination, open_output

VOCAB = "person; car; dog, puppy; grass, lawn [stuff]; sky [stuff]"
EXAMPLES = Path(__file__).resolve().parents[1] / "examples"
OLD_SIZE, NEW_SIZE = (48, 64), (40, 56)  # (height, width): a replaced image's new content has another size


def _args(source: str, dest: str, *more: str) -> list[str]:
    return ["label", source, "--out", dest, "--vocab", VOCAB, "--model", "fcclip-tiny", "--weights", "random",
            "--shard-size", "4", "--batch-size", "4", "--no-progress", *more]


def _grow(folder: Path, tmp: Path) -> tuple[list[str], list[str]]:
    """Add 10 images (new names) and replace 3 (same names, new content of another size); (added, replaced) names."""
    from fcclip.datasets.synthetic import write_images

    added = []
    for i, path in enumerate(write_images(tmp / "new", count=10, size=OLD_SIZE, seed=100)):
        shutil.move(path, folder / f"added_{i:02d}.jpg")
        added.append(f"added_{i:02d}.jpg")
    replaced = []
    for i, path in enumerate(write_images(tmp / "replacement", count=3, size=NEW_SIZE, seed=200)):
        shutil.copy(path, folder / f"synth_{i:05d}.jpg")
        replaced.append(f"synth_{i:05d}.jpg")
    return added, replaced


def _check_versions(dest: str, before: int, names: list[str], added: list[str], replaced: list[str],
                    prefix: str) -> None:
    """The current version: one row per URI, the replaced ones with their new content's size; version ``before``:
    the 20 old rows as they were."""
    current = open_table(Destination(dest)).to_pyarrow_table(columns=["uri", "width", "height", "status"]).to_pylist()
    uris = [r["uri"] for r in current]
    assert len(uris) == 30 and len(set(uris)) == 30, sorted(uris)
    assert set(uris) == {prefix + n for n in names + added}
    sizes = {r["uri"].rsplit("/", 1)[-1]: (r["height"], r["width"]) for r in current}
    assert all(r["status"] == "ok" for r in current)
    assert {n: sizes[n] for n in replaced} == {n: NEW_SIZE for n in replaced}
    assert {sizes[n] for n in names if n not in replaced} | {sizes[n] for n in added} == {OLD_SIZE}
    old = open_table(Destination(dest), version=before).to_pyarrow_table(columns=["uri", "width", "height"])
    assert sorted(old.column("uri").to_pylist()) == sorted(prefix + n for n in names)
    assert {(r["height"], r["width"]) for r in old.to_pylist()} == {OLD_SIZE}
    # the README's reader: the same rows as deltalake's, for the current version and an earlier one
    def rows(table):
        return sorted(table.to_pylist(), key=lambda r: r["uri"])

    now = open_output(dest).read(columns=["uri", "width", "height", "status"])
    assert rows(now) == rows(pa.Table.from_pylist(current))
    assert rows(open_output(dest, version=before).read(columns=["uri", "width", "height"])) == rows(old)
    with pytest.raises(KeyError, match="widht"):
        open_output(dest).read(columns=["uri", "widht"])


def test_rerun_labels_new_and_changed_images_as_new_versions(s3_server, tmp_path, ray_local, capsys, monkeypatch):
    from fcclip.datasets.synthetic import write_images

    folder, dest = tmp_path / "in", str(tmp_path / "out")
    names = [p.name for p in write_images(folder, count=20, size=OLD_SIZE)]
    assert main(_args(str(folder), dest)) == 0
    capsys.readouterr()
    first = table_version(Destination(dest))
    history = open_table(Destination(dest)).history()
    # each version names the shards it commits (5 shards of 4); together, every shard once
    shards = [s for h in history if "fcclip.shards" in h for s in json.loads(h["fcclip.shards"])]
    assert sorted(shards) == [0, 1, 2, 3, 4] and len(history) == first + 1
    run_id = pq.read_table(f"{dest}/part-000000.parquet")["run_id"][0].as_py()
    assert {h.get("fcclip.run_id") for h in history} == {run_id}
    assert all(h.get("fcclip.vocabulary_digest") and h.get("fcclip.model") == "fcclip-tiny@random" for h in history)

    added, replaced = _grow(folder, tmp_path)
    assert main(_args(str(folder), dest)) == 0
    out = capsys.readouterr().out
    assert "listed again: 10 new, 3 changed, 17 unchanged" in out and "labeled 13 image(s)" in out, out
    _check_versions(dest, first, names, added, replaced, prefix=str(folder) + "/")
    history = open_table(Destination(dest)).history()
    assert sum(int(h.get("fcclip.rows_replaced", 0)) for h in history) == 3
    assert any("-r" in f for f in table_files(Destination(dest)))  # an old part file without its replaced rows
    # the changed rows' shard replaced the old part file in the same version: no version holds a URI twice
    for version in range(first, table_version(Destination(dest)) + 1):
        uris = open_table(Destination(dest), version=version).to_pyarrow_table(columns=["uri"]).column("uri")
        assert len(uris) == len(set(uris.to_pylist())), version

    # nothing changed: nothing labeled, no new version
    version = table_version(Destination(dest))
    assert main(_args(str(folder), dest)) == 0
    out = capsys.readouterr().out
    assert "listed again: 0 new, 0 changed, 30 unchanged" in out and "labeled 0 image(s)" in out, out
    assert table_version(Destination(dest)) == version

    # --no-refresh: a changed object keeps its row
    time.sleep(0.01)
    shutil.copy(folder / "added_00.jpg", folder / "synth_00010.jpg")
    assert main(_args(str(folder), dest, "--no-refresh")) == 0
    out = capsys.readouterr().out
    assert "0 new, 0 changed, 29 unchanged (1 changed kept as labeled, --no-refresh)" in out, out
    assert table_version(Destination(dest)) == version

    # readers of a version other than deltalake's
    import duckdb
    import polars as pl

    assert pl.scan_delta(dest, version=first).select(pl.len()).collect().item() == 20
    assert pl.scan_delta(dest).select(pl.col("uri").n_unique()).collect().item() == 30
    files = open_table(Destination(dest), version=first).file_uris()
    assert duckdb.sql(f"select count(distinct uri) from read_parquet({files})").fetchall()[0][0] == 20
    assert pq.read_table(files, columns=["uri", "status"]).num_rows == 20
    # the demo's DuckDB summary (examples/label_summary.py) counts the current version's rows, not the glob's (36:
    # the replaced rows too)
    assert len(list(Path(dest).glob("*.parquet"))) > len(table_files(Destination(dest)))
    for version, expected in ((None, 30), (first, 20)):
        summary = subprocess.run([sys.executable, str(EXAMPLES / "label_summary.py"), dest,
                                  *([] if version is None else [str(version)])],
                                 capture_output=True, text=True, timeout=120)
        assert summary.returncode == 0, summary.stderr
        assert re.search(rf"│ ok\s+│\s+{expected} │", summary.stdout), summary.stdout
    # and the commands: version `first` as it was, the current one by default
    for version, expected in ((first, 20), (None, 30)):
        out = tmp_path / f"export-{version}"
        more = ["--version", str(version)] if version is not None else []
        assert main(["export", dest, "--format", "coco-instances", "--out", str(out), *more]) == 0
        assert len(json.loads((out / "instances.json").read_text())["images"]) == expected
    assert main(["export", dest, "--format", "coco-instances", "--out", str(tmp_path / "x"), "--version", "99"]) == 2
    assert "version 99" in capsys.readouterr().err
    from fcclip_pipelines.train_data import open_training_data

    past = open_training_data(dest, split="train", synonyms=None, version=first).output
    assert sorted(Path(f).name for f in past.files) == [f"part-{i:06d}.parquet" for i in range(5)]
    current = open_training_data(dest, split="train", synonyms=None).output
    assert len(current.files) > 5 and any("-r" in Path(f).name for f in current.files)  # the rewrite of a shard
    assert (past.version, current.version) == (first, table_version(Destination(dest)))

    # training on the lake: a run records the table version it trains on, and --resume goes on with that version,
    # not the one labeling has made current since (what each start would train on: the files given to its dataset)
    import fcclip_pipelines.train as train
    from fcclip.config import train_config_path
    from ray.train.torch import TorchTrainer

    class Started(Exception):
        pass

    def stop(self):
        raise Started

    trained_on = []

    def spy(data, **kwargs):
        trained_on.append((data.output.version, sorted(Path(f).name for f in data.output.files)))
        return real_dataset(data, **kwargs)

    real_dataset = train.label_dataset
    monkeypatch.setattr(train, "label_dataset", spy)
    monkeypatch.setattr(TorchTrainer, "fit", stop)
    runs = tmp_path / "runs"
    command = ["train", "--config", str(train_config_path("fcclip-tiny-synthetic")), "--data", dest,
               "--storage", str(runs), "--name", "lake"]
    with pytest.raises(Started):
        main([*command, "--version", str(first)])
    with pytest.raises(Started):
        main([*command, "--resume"])
    assert trained_on == [(first, [f"part-{i:06d}.parquet" for i in range(5)])] * 2
    # once the run has a checkpoint, an explicit other version is another training: refused by name
    (runs / "lake" / "checkpoint_000000").mkdir()
    (runs / "lake" / "checkpoint_000000" / "state.pt").write_bytes(b"a checkpoint's file")
    capsys.readouterr()
    latest = table_version(Destination(dest))
    assert main([*command, "--resume", "--version", str(latest)]) == 2
    assert f"was trained with --version {first} (this command says {latest})" in capsys.readouterr().err

    # reclaiming the files only past versions refer to (README): deltalake's vacuum removes the part files that
    # rewrites replaced; the current version, DEST's bookkeeping and the next run are untouched, and a vacuumed
    # version is one line
    from deltalake import DeltaTable

    gone = DeltaTable(dest).vacuum(retention_hours=0, dry_run=False, enforce_retention_duration=False)
    assert gone and not set(gone) & set(table_files(Destination(dest))), gone
    assert not any((Path(dest) / name).exists() for name in gone)
    assert pl.scan_delta(dest).select(pl.col("uri").n_unique()).collect().item() == 30
    assert main(_args(str(folder), dest, "--no-refresh")) == 0
    assert "labeled 0 image(s)" in capsys.readouterr().out
    assert main(["export", dest, "--format", "coco-instances", "--out", str(tmp_path / "old"), "--version",
                 str(first)]) == 2
    assert f"cannot read version {first} of its table: its part file part-000000.parquet is gone" in \
        capsys.readouterr().err


def _inventory(bucket: str, key: str) -> None:
    """An S3 Inventory report's data file (Parquet, the report's column names) of ``bucket/in/``."""
    import boto3

    s3 = boto3.client("s3")
    rows = []
    for page in s3.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix="in/"):
        for obj in page.get("Contents", []):
            rows.append({"bucket": bucket, "key": obj["Key"], "size": obj["Size"],
                         "last_modified_date": obj["LastModified"], "e_tag": obj["ETag"].strip('"')})
    buf = io.BytesIO()
    pq.write_table(pa.Table.from_pylist(rows), buf)
    s3.put_object(Bucket=bucket, Key=key, Body=buf.getvalue())


def test_rerun_on_s3_from_an_inventory_report(s3_server, s3_bucket, tmp_path, ray_local, capsys):
    import boto3

    from fcclip.datasets.synthetic import write_images

    s3 = boto3.client("s3")
    folder = tmp_path / "in"
    names = [p.name for p in write_images(folder, count=20, size=OLD_SIZE)]
    for name in names:
        s3.upload_file(str(folder / name), s3_bucket, f"in/{name}")
    report = f"s3://{s3_bucket}/inventory/data/report.parquet"
    dest = f"s3://{s3_bucket}/labels"
    _inventory(s3_bucket, "inventory/data/report.parquet")
    assert main(_args(report, dest)) == 0
    capsys.readouterr()
    first = table_version(Destination(dest))

    added, replaced = _grow(folder, tmp_path)
    for name in added + replaced:
        s3.upload_file(str(folder / name), s3_bucket, f"in/{name}")
    _inventory(s3_bucket, "inventory/data/report.parquet")  # the next day's report
    assert main(_args(report, dest)) == 0
    out = capsys.readouterr().out
    assert "listed again: 10 new, 3 changed, 17 unchanged" in out and "labeled 13 image(s)" in out, out
    _check_versions(dest, first, names, added, replaced, prefix=f"s3://{s3_bucket}/in/")
    assert main(_args(report, dest)) == 0
    assert "labeled 0 image(s)" in capsys.readouterr().out


def test_rerun_from_a_gcs_bucket(gcs_server, tmp_path, ray_local, capsys):
    """SOURCE on GCS (gs://, through gcsfs; the loopback server): a corrupt object becomes an error row, and a rerun
    labels the new and the overwritten objects (their generation's ETag), once each."""
    import gcsfs

    from fcclip.datasets.synthetic import write_images

    fs = gcsfs.GCSFileSystem(token="anon")
    fs.mkdir("photos")
    folder = tmp_path / "in"
    names = [p.name for p in write_images(folder, count=8, size=OLD_SIZE)]
    for name in names:
        fs.put_file(str(folder / name), f"photos/day1/{name}")
    fs.pipe_file("photos/day1/broken.jpg", b"not an image")
    source, dest = "gs://photos/day1/", str(tmp_path / "labels")
    assert main(_args(source, dest)) == 0
    out = capsys.readouterr().out
    assert "labeled 9 image(s)" in out and "8 ok, 1 failed" in out, out

    new = write_images(tmp_path / "new", count=2, size=NEW_SIZE, seed=500)
    fs.put_file(str(new[0]), "photos/day1/added.jpg")
    fs.put_file(str(new[1]), f"photos/day1/{names[3]}")  # the same name, new content
    assert main(_args(source, dest)) == 0
    out = capsys.readouterr().out
    assert "listed again: 1 new, 1 changed, 8 unchanged" in out and "labeled 2 image(s)" in out, out
    rows = open_output(dest).read(columns=["uri", "height", "width", "status"]).to_pylist()
    assert sorted(r["uri"] for r in rows) == sorted(f"{source}{n}" for n in [*names, "broken.jpg", "added.jpg"])
    sizes = {r["uri"].rsplit("/", 1)[-1]: (r["height"], r["width"]) for r in rows if r["status"] == "ok"}
    assert sizes == {**{n: OLD_SIZE for n in names}, names[3]: NEW_SIZE, "added.jpg": NEW_SIZE}


def test_two_drivers_and_a_driver_killed_mid_increment(s3_server, tmp_path, ray_local, capsys):
    """Driver A labels an increment; driver B, started on the same DEST meanwhile, is refused at once and changes
    nothing. A is killed (SIGKILL, its process group) once a version of the increment is committed, and images
    arrive; the rerun takes over its lock (its process is gone), labels the rest of A's increment and then, in the
    same command, lists SOURCE again and labels the arrivals: every URI exactly once in the current version."""
    from test_label_faults import Job

    from fcclip.datasets.synthetic import write_images

    folder, dest = tmp_path / "in", str(tmp_path / "out")
    write_images(folder, count=4, size=OLD_SIZE)
    args = _args(str(folder), dest, "--shard-size", "2", "--batch-size", "2")
    assert main(args) == 0
    first = table_version(Destination(dest))
    for i, path in enumerate(write_images(tmp_path / "more", count=12, size=OLD_SIZE, seed=50)):
        shutil.move(path, folder / f"more_{i:02d}.jpg")

    a = Job(args[1:] + ["--num-cpus", "2"])
    try:
        deadline = time.monotonic() + 240
        while a.proc.poll() is None and time.monotonic() < deadline:
            if not (Path(dest) / "_fcclip" / "lock.json").exists():
                time.sleep(0.05)
                continue
            capsys.readouterr()
            files = sorted(p.name for p in Path(dest).iterdir())
            assert main(args) == 2  # B: refused at once
            err = capsys.readouterr().err
            assert "being written by another fcclip run" in err, err
            assert sorted(p.name for p in Path(dest).iterdir()) == files
            break
        while (table_version(Destination(dest)) or 0) <= first and a.proc.poll() is None \
                and time.monotonic() < deadline:
            time.sleep(0.05)
        assert a.proc.poll() is None, f"A ended before it was killed:\n{a.output()[-3000:]}"
        a.kill()
    finally:
        a.close()
    killed_at = table_version(Destination(dest))
    assert first < killed_at
    assert (Path(dest) / "_fcclip" / "lock.json").exists()  # a killed driver leaves its lock
    committed = {r["uri"] for r in open_table(Destination(dest)).to_pyarrow_table(columns=["uri"]).to_pylist()}
    for i, path in enumerate(write_images(tmp_path / "late", count=3, size=OLD_SIZE, seed=80)):
        shutil.move(path, folder / f"late_{i}.jpg")  # arrived while A was down

    assert main(args) == 0
    out = capsys.readouterr().out
    rest = 16 - len(committed)
    assert f"labeled {rest + 3} image(s)" in out, out
    assert (f"first finished an unfinished run (12 new, 0 changed, 4 unchanged): {rest} image(s), {rest} ok, 0 failed"
            in out), out
    assert "listed again: 3 new, 0 changed, 16 unchanged" in out, out
    rows = open_table(Destination(dest)).to_pyarrow_table(columns=["uri", "status"]).to_pylist()
    assert sorted(r["uri"] for r in rows) == sorted(str(p) for p in folder.iterdir())  # 19, each once
    assert all(r["status"] == "ok" for r in rows)
    assert not (Path(dest) / "_fcclip" / "lock.json").exists()
    assert len(table_files(Destination(dest))) == 10

    assert main(args) == 0  # complete: a plain rerun lists once and labels nothing
    out = capsys.readouterr().out
    assert "first finished" not in out and "listed again: 0 new, 0 changed, 19 unchanged" in out, out


def _second_driver_is_refused(dest: Destination) -> None:
    """Of two drivers' locks on ``dest``, the second is refused while the first holds it; released, it is gone."""
    from fcclip_pipelines.lake import LOCK, DestinationBusy, WriterLock

    first, second = WriterLock(dest), WriterLock(dest)
    first.acquire()
    try:
        with pytest.raises(DestinationBusy, match="being written by another fcclip run"):
            second.acquire()
    finally:
        first.release()
    assert not dest.exists(LOCK)


def test_the_lock_on_s3_is_taken_once(s3_server, s3_bucket):
    """The lock on object storage: a conditional put (If-None-Match), so of two drivers one gets it; a lock whose
    owner is gone from this host is stale and taken over; a released lock is gone."""
    import json as json_
    import subprocess
    import sys

    import boto3

    from fcclip_pipelines.lake import LOCK, WriterLock

    dest = Destination(f"s3://{s3_bucket}/labels")
    _second_driver_is_refused(dest)
    # a driver killed while holding it: its process is gone
    gone = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    with WriterLock(dest) as lock:
        body = json_.loads(dest.read_bytes(LOCK))
        assert body["token"] == lock.token
        boto3.client("s3").put_object(Bucket=s3_bucket, Key="labels/" + LOCK,
                                      Body=json_.dumps({**body, "token": "dead", "pid": int(gone.stdout)}).encode())
    assert dest.exists(LOCK)  # not ours any more: left in place
    with WriterLock(dest) as lock:  # ... and taken over, its owner being gone
        assert json_.loads(dest.read_bytes(LOCK))["token"] == lock.token
    assert not dest.exists(LOCK)


RACE = """import json, sys, time
from fcclip_pipelines.lake import WriterLock
from fcclip_pipelines.output import Destination
lock = WriterLock(Destination(sys.argv[1]))
time.sleep(max(0.0, float(sys.argv[2]) - time.time()))
print(json.dumps({"created": lock._create(), "token": lock.token}))
"""
"""One driver's try at DEST's lock (argv[1]), made at the moment argv[2] (a time.time())."""


def test_the_lock_on_gcs_is_created_once_of_drivers_at_one_moment(gcs_server, tmp_path):
    """On GCS the lock is an upload with a generation-match precondition (``ifGenerationMatch=0``): of eight drivers
    that try at the same moment, one creates it, and the lock holds that one's token. (Checked, then written, it went
    to several.) A second driver is refused, a released lock is gone."""
    import gcsfs

    from fcclip_pipelines.lake import LOCK

    gcsfs.GCSFileSystem(token="anon").mkdir("lake")
    for attempt in range(2):  # two rounds, each on a new DEST
        dest = Destination(f"gs://lake/labels-{attempt}")
        start = time.time() + 4  # the processes' start-up (imports) is over by then
        procs = [subprocess.Popen([sys.executable, "-c", RACE, dest.uri, str(start)], stdout=subprocess.PIPE,
                                  stderr=subprocess.PIPE, text=True) for _ in range(8)]
        results = []
        for proc in procs:
            out, err = proc.communicate(timeout=120)
            assert proc.returncode == 0, err[-2000:]
            results.append(json.loads(out.strip().splitlines()[-1]))
        winners = [r["token"] for r in results if r["created"]]
        assert len(winners) == 1, results
        assert json.loads(dest.read_bytes(LOCK))["token"] == winners[0]
    dest = Destination("gs://lake/labels")
    _second_driver_is_refused(dest)


def test_a_lock_of_a_killed_process_not_yet_reaped_is_taken_over(tmp_path):
    """A driver killed a moment ago can still be a zombie (ended, its parent has not collected it yet: a shell's
    `timeout -s KILL`, a supervisor between polls). Its process is gone for the lock's purpose: taken over."""
    import signal
    import subprocess
    import sys

    from fcclip_pipelines.lake import LOCK, DestinationBusy, WriterLock

    dest = Destination(str(tmp_path / "labels"))
    code = ("import sys, time\nfrom fcclip_pipelines.lake import WriterLock\nfrom fcclip_pipelines.output import "
            "Destination\nWriterLock(Destination(sys.argv[1])).acquire()\nprint('held', flush=True)\ntime.sleep(600)")
    holder = subprocess.Popen([sys.executable, "-c", code, dest.uri], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(DestinationBusy):  # alive: refused
            WriterLock(dest).acquire()
        holder.send_signal(signal.SIGKILL)
        deadline = time.monotonic() + 30
        zombie = False
        while time.monotonic() < deadline and not zombie:  # wait for it to end, without reaping it
            with open(f"/proc/{holder.pid}/stat") as f:
                zombie = f.read().rpartition(")")[2].split()[0] == "Z"
            time.sleep(0.01)
        assert zombie
        assert dest.exists(LOCK)
        with WriterLock(dest) as lock:  # the zombie's lock is stale
            assert json.loads(dest.read_bytes(LOCK))["token"] == lock.token
        # reaped only now (a process with threads can show Z for its main thread while the others still exit:
        # killed, it runs no more code of its own, and its lock is fair game)
        assert holder.wait(timeout=30) == -signal.SIGKILL
    finally:
        if holder.poll() is None:
            holder.kill()
            holder.wait()


def test_error_rows_of_a_failed_read_are_labeled_again_with_retry_errors(tmp_path, ray_local, capsys):
    """A read that failed once (the object store reset the connection) leaves an error row, and the object has not
    changed since: a plain rerun keeps the row and says how to label it again (an error row whose object changed is
    labeled again, and no longer counted as kept); `--retry-errors` does, replacing the error row in the table's next
    version; then there is nothing more to retry."""
    import argparse

    from fcclip.datasets.synthetic import write_images
    from fcclip_pipelines.label import add_arguments, main_args
    from fcclip_pipelines.stages import read_bytes

    folder, dest = tmp_path / "in", str(tmp_path / "out")
    write_images(folder, count=8, size=OLD_SIZE)
    flaky, replaced = str(folder / "synth_00005.jpg"), str(folder / "synth_00006.jpg")

    def store_that_resets_one_read(uri: str) -> bytes:  # the first run's reader: two reads fail as a network's would
        if uri in (flaky, replaced):
            raise ConnectionResetError(104, "Connection reset by peer")
        return read_bytes(uri)

    parser = argparse.ArgumentParser()
    add_arguments(parser)
    command = _args(str(folder), dest)[1:]
    assert main_args(parser.parse_args(command), reader=store_that_resets_one_read) == 0
    out = capsys.readouterr().out
    assert "6 ok, 2 failed" in out and "ConnectionResetError" in out, out
    status = {r["uri"]: r["status"] for r in open_output(dest).read(columns=["uri", "status"]).to_pylist()}
    assert status[flaky] == status[replaced] == "error" and list(status.values()).count("ok") == 6

    version = table_version(Destination(dest))
    assert main(_args(str(folder), dest)) == 0
    out = capsys.readouterr().out
    assert "listed again: 0 new, 0 changed, 8 unchanged" in out and "labeled 0 image(s)" in out, out
    assert "the table holds 2 error row(s)" in out and "--retry-errors" in out, out
    assert table_version(Destination(dest)) == version

    shutil.copyfile(write_images(tmp_path / "new", count=1, size=NEW_SIZE, seed=300)[0], replaced)
    assert main(_args(str(folder), dest)) == 0
    out = capsys.readouterr().out
    assert "listed again: 0 new, 1 changed, 7 unchanged" in out and "labeled 1 image(s)" in out, out
    assert "the table holds 1 error row(s)" in out, out
    version = table_version(Destination(dest))

    assert main(_args(str(folder), dest, "--retry-errors")) == 0
    out = capsys.readouterr().out
    assert "labeled 1 image(s)" in out and "1 ok, 0 failed" in out, out
    assert "1 error row(s) of unchanged images labeled again (--retry-errors)" in out, out
    rows = open_output(dest).read(columns=["uri", "status", "width", "height"]).to_pylist()
    assert len(rows) == 8 and len({r["uri"] for r in rows}) == 8  # the error row replaced, not added to
    assert all(r["status"] == "ok" for r in rows), rows
    assert next((r["height"], r["width"]) for r in rows if r["uri"] == flaky) == OLD_SIZE
    history = open_table(Destination(dest)).history()
    assert int(history[0]["fcclip.rows_replaced"]) == 1 and table_version(Destination(dest)) > version
    # the rows of the file rewritten around the error row are carried over, not added: the versions add up
    assert int(history[0]["fcclip.rows_added"]) == 1 and int(history[0]["fcclip.files_removed"]) == 1
    assert sum(int(h.get("fcclip.rows_added", 0)) - int(h.get("fcclip.rows_replaced", 0)) for h in history) == 8
    # the version before still holds the error row
    before = {r["uri"]: r["status"] for r in open_output(dest, version=version).read(columns=["uri", "status"]).to_pylist()}
    assert before[flaky] == "error"

    version = table_version(Destination(dest))
    assert main(_args(str(folder), dest, "--retry-errors")) == 0
    out = capsys.readouterr().out
    assert "labeled 0 image(s)" in out and "error row" not in out, out
    assert table_version(Destination(dest)) == version


COMPACT = """import sys
from deltalake import DeltaTable
options = {"AWS_ALLOW_HTTP": "true", "AWS_CONDITIONAL_PUT": "etag"} if sys.argv[1].startswith("s3://") else {}
print(DeltaTable(sys.argv[1], storage_options=options).optimize.compact()["numFilesRemoved"])
"""
"""Another program: deltalake's OPTIMIZE (compaction) of the table at argv[1]; prints the files it removed."""


@pytest.mark.parametrize("where,when", [("s3", "before its commit"), ("local", "inside its commit")])
def test_a_compaction_while_an_increment_commits_keeps_each_image_once(where, when, s3_server, tmp_path, ray_local,
                                                                       capsys, monkeypatch, request):
    """Another program's OPTIMIZE (deltalake's compaction) lands while ``fcclip label`` commits an increment: after
    the part files holding the changed images' old rows were read and rewritten without them, and before the version
    that removes them (or on top of the very version that commit started from). The commit finds the rows again in
    the compacted file: every image once, the changed ones with their new content. (delta-rs alone commits the
    removal of the compacted-away files as a no-op: 20 rows for 12 images.)"""
    import boto3

    from fcclip.datasets.synthetic import write_images
    from fcclip_pipelines import lake

    folder = tmp_path / "in"
    names = [p.name for p in write_images(folder, count=12, size=OLD_SIZE)]
    source, dest = str(folder), str(tmp_path / "out")
    if where == "s3":
        bucket = request.getfixturevalue("s3_bucket")
        source, dest = f"s3://{bucket}/in/", f"s3://{bucket}/labels"
        for name in names:
            boto3.client("s3").upload_file(str(folder / name), bucket, f"in/{name}")
    assert main(_args(source, dest)) == 0
    assert len(table_files(Destination(dest))) == 3
    for i, path in enumerate(write_images(tmp_path / "new", count=2, size=NEW_SIZE, seed=400)):
        name = ("synth_00000.jpg", "synth_00005.jpg")[i]  # rows of part-000000 and part-000001
        shutil.copy(path, folder / name)
        if where == "s3":
            boto3.client("s3").upload_file(str(path), bucket, f"in/{name}")
    compactions = []

    def compact():
        if not compactions:
            done = subprocess.run([sys.executable, "-c", COMPACT, dest], capture_output=True, text=True, check=True)
            compactions.append(int(done.stdout))

    if when == "before its commit":
        commit_version = lake.commit_version

        def compacted_first(dest_, add, remove=(), *more):
            if remove:
                compact()
            return commit_version(dest_, add, remove, *more)

        monkeypatch.setattr(lake, "commit_version", compacted_first)
    else:  # the table the commit is made from is read, then the compaction is committed
        add_new_columns = lake._add_new_columns

        def compacted_then(table, schema, props):
            add_new_columns(table, schema, props)
            if table.version() > 0:
                compact()

        monkeypatch.setattr(lake, "_add_new_columns", compacted_then)
    capsys.readouterr()
    assert main(_args(source, dest)) == 0
    out = capsys.readouterr().out
    assert "listed again: 0 new, 2 changed, 10 unchanged" in out and "labeled 2 image(s)" in out, out
    assert compactions == [3]
    table = open_output(dest).read(columns=["uri", "height", "width"])
    uris = table.column("uri").to_pylist()
    assert len(uris) == len(set(uris)) == 12, sorted(uris)
    sizes = {r["uri"].rsplit("/", 1)[-1]: (r["height"], r["width"]) for r in table.to_pylist()}
    assert sizes == {n: NEW_SIZE if n in ("synth_00000.jpg", "synth_00005.jpg") else OLD_SIZE for n in names}
    files = table_files(Destination(dest))
    assert len(files) == 2 and "part-000003.parquet" in files, files  # the compacted file rewritten, the new shard
    # the rewrites of the files the compaction had removed are in no version, and gone
    listing = Destination(dest).fs.ls(Destination(dest).root, detail=False)
    assert not [p for p in listing if re.search(r"part-00000[01]-r\d+\.parquet$", p)], listing


def test_a_table_that_other_programs_compact_and_delete_from_keeps_each_image_once(tmp_path, ray_local, capsys):
    """Delta maintenance by another program (deltalake's OPTIMIZE, compaction and Z-order, as Spark's; a DELETE)
    rewrites part files under other names and without fcclip's footer metadata. The commands still read DEST, a rerun labels
    nothing again that is labeled, an increment replaces rows wherever they now are (also when the compaction came
    between its listing and its commit), and relabel's outputs resume the same way."""
    from deltalake import DeltaTable

    from fcclip.config import load_config
    from fcclip.datasets.synthetic import write_images
    from fcclip.vocabulary import load_vocabulary
    from fcclip_pipelines.label import LabelConfig, prepare_run

    folder, dest = tmp_path / "in", str(tmp_path / "out")
    names = [p.name for p in write_images(folder, count=12, size=OLD_SIZE)]
    prefix = str(folder) + "/"

    def rows():
        table = open_output(dest).read(columns=["uri", "height", "width", "status"])
        uris = table.column("uri").to_pylist()
        assert len(uris) == len(set(uris)), sorted(uris)  # each image once
        return {r["uri"][len(prefix):]: (r["height"], r["width"]) for r in table.to_pylist()}

    def compact(where, z_order=False):
        table = DeltaTable(where)
        table.optimize.z_order(["uri"]) if z_order else table.optimize.compact()
        files = DeltaTable(where).file_uris()
        assert len(files) == 1 and not (pq.read_metadata(files[0]).metadata or {}).get(b"fcclip.vocabulary")

    def clean_log(where):
        table = DeltaTable(where)
        table.alter.set_table_properties({"delta.logRetentionDuration": "interval 0 seconds"})
        table.create_checkpoint()
        table.cleanup_metadata()
        assert not (Path(where) / "_delta_log" / f"{0:020d}.json").exists()

    assert main(_args(str(folder), dest, "--embeddings")) == 0
    compact(dest)
    # and the log's own clean-up (the commits before a checkpoint, past their retention, removed): the shards the run
    # saw committed are in its run.json, not only in the log
    clean_log(dest)
    assert rows() == {n: OLD_SIZE for n in names}
    capsys.readouterr()
    assert main(["export", dest, "--format", "coco-instances", "--out", str(tmp_path / "export")]) == 0
    assert len(json.loads((tmp_path / "export" / "instances.json").read_text())["images"]) == 12

    assert main(_args(str(folder), dest, "--embeddings")) == 0
    out = capsys.readouterr().out
    assert "listed again: 0 new, 0 changed, 12 unchanged" in out and "labeled 0 image(s)" in out, out

    for i, path in enumerate(write_images(tmp_path / "new", count=3, size=NEW_SIZE, seed=300)):
        shutil.copy(path, folder / (f"synth_{i:05d}.jpg" if i < 2 else "added.jpg"))  # 2 changed, 1 new
    assert main(_args(str(folder), dest, "--embeddings")) == 0
    out = capsys.readouterr().out
    assert "listed again: 1 new, 2 changed, 10 unchanged" in out and "labeled 3 image(s)" in out, out
    expected = {**{n: OLD_SIZE for n in names}, "synth_00000.jpg": NEW_SIZE, "synth_00001.jpg": NEW_SIZE,
                "added.jpg": NEW_SIZE}
    assert rows() == expected

    # the next run's listing made (a driver killed right after it), then the table compacted, then the rerun: the
    # changed image's old row is found in the compacted file and replaced
    shutil.copy(tmp_path / "new" / "synth_00002.jpg", folder / "synth_00005.jpg")
    cfg = LabelConfig(source=str(folder), dest=dest, vocab=VOCAB, model="fcclip-tiny", weights="random",
                      shard_size=4, embeddings=True)
    run = prepare_run(cfg, Destination(dest), load_config("fcclip-tiny"), load_vocabulary(VOCAB))
    assert run["increments"][-1]["changed"] == 1
    compact(dest, z_order=True)
    assert main(_args(str(folder), dest, "--embeddings")) == 0
    assert "labeled 1 image(s)" in capsys.readouterr().out
    assert rows() == {**expected, "synth_00005.jpg": NEW_SIZE}

    # a DELETE of one image's row: the image, still in SOURCE, is labeled again, once
    DeltaTable(dest).delete(f"uri = '{prefix}synth_00007.jpg'")
    assert "synth_00007.jpg" not in rows()
    assert main(_args(str(folder), dest, "--embeddings")) == 0
    out = capsys.readouterr().out
    assert "listed again: 1 new, 0 changed, 12 unchanged" in out and "labeled 1 image(s)" in out, out
    assert rows() == {**expected, "synth_00005.jpg": NEW_SIZE}

    # relabel reads the rewritten files, and its own output, compacted (and its log cleaned up), is resumed without a
    # second copy
    dest2 = str(tmp_path / "relabeled")
    assert main(["relabel", dest, "--vocab", "cat; sky [stuff]", "--out", dest2]) == 0
    compact(dest2)
    clean_log(dest2)
    assert main(["relabel", dest, "--vocab", "cat; sky [stuff]", "--out", dest2]) == 0
    assert "were already committed by an earlier run" in capsys.readouterr().out
    relabeled = open_output(dest2).read(columns=["uri"]).column("uri").to_pylist()
    assert sorted(relabeled) == sorted(prefix + n for n in {**expected, "synth_00005.jpg": 0})


def test_a_rerun_finds_its_run_whatever_the_spelling_of_source_and_dest(tmp_path, ray_local, capsys, monkeypatch):
    """A first run typed by hand (relative paths, a trailing slash) and the nightly one from cron (absolute paths) are
    one run: the rerun labels what changed, not "other settings" refused (whose --overwrite would drop the table's
    history). The same for relabel's DEST, and for a run.json that recorded SOURCE as it was typed."""
    from deltalake import DeltaTable

    from fcclip.datasets.synthetic import write_images

    write_images(tmp_path / "in", count=2, size=OLD_SIZE)
    monkeypatch.chdir(tmp_path)
    assert main(_args("in/", "labels", "--embeddings")) == 0
    assert main(["relabel", "labels", "--vocab", "cat; sky [stuff]", "--out", "rl"]) == 0
    capsys.readouterr()
    assert main(_args(str(tmp_path / "in"), f"{tmp_path}/labels/", "--embeddings")) == 0, capsys.readouterr().err
    assert "listed again: 0 new, 0 changed, 2 unchanged" in capsys.readouterr().out
    (tmp_path / "elsewhere").mkdir()
    monkeypatch.chdir(tmp_path / "elsewhere")  # SOURCE through `..`: the same images, not 2 new ones under ".../../in"
    assert main(_args("../in", "../labels", "--embeddings")) == 0, capsys.readouterr().err
    assert "listed again: 0 new, 0 changed, 2 unchanged" in capsys.readouterr().out
    monkeypatch.chdir(tmp_path)
    assert main(["relabel", f"{tmp_path}/labels/", "--vocab", "cat; sky [stuff]", "--out", str(tmp_path / "rl")]) == 0
    assert "relabeled 0 image(s)" in capsys.readouterr().out
    history = [h for h in DeltaTable(str(tmp_path / "rl")).history() if "fcclip.run_id" in h]
    assert history and all(h.get("fcclip.model") == "fcclip-tiny@random" for h in history), history  # as label's
    run_json = tmp_path / "labels" / "_fcclip" / "run.json"
    run = json.loads(run_json.read_text())
    assert run["settings"]["source"] == str(tmp_path / "in")
    run["settings"]["source"] = "./in/"  # as a release before recorded it: as typed
    run_json.write_text(json.dumps(run))
    assert main(_args(str(tmp_path / "in"), "labels", "--embeddings")) == 0, capsys.readouterr().err
    assert "listed again: 0 new, 0 changed, 2 unchanged" in capsys.readouterr().out
    assert main(_args(str(tmp_path / "labels"), "labels", "--embeddings")) == 2  # another SOURCE is still refused
    assert "other settings (source: " in capsys.readouterr().err


def test_a_file_a_delete_rewrote_reads_as_fcclips_own(tmp_path, ray_local, capsys):
    """delta-rs' DELETE rewrites a part file with string_view columns (nested ones too). Every command that reads
    the table takes it as fcclip's own files, and the next increment replaces a row it holds (label, show, review
    push, eval and train failed on it: pyarrow's is_in / take have no string_view kernel, Ray Data's schema merge
    refused string_view beside string)."""
    from deltalake import DeltaTable

    from fcclip.datasets.synthetic import write_images
    from fcclip_pipelines.label_studio import _picked_rows
    from fcclip_pipelines.train_data import open_training_data, read_samples

    folder, dest = tmp_path / "in", str(tmp_path / "labels")
    write_images(folder, count=4, size=OLD_SIZE)
    assert main(_args(str(folder), dest, "--shard-size", "2", "--embeddings")) == 0
    DeltaTable(dest).delete(f"uri = '{folder}/synth_00000.jpg'")
    output = open_output(dest)
    rewritten = [f for f in output.files if pq.read_schema(f).field("uri").type == pa.string_view()]
    assert len(rewritten) == 1, [pq.read_schema(f) for f in output.files]  # the fault is real
    held = pq.read_table(rewritten[0], columns=["uri", "image_id"]).to_pylist()
    assert [r["uri"] for r in held] == [f"{folder}/synth_00001.jpg"]
    capsys.readouterr()

    assert main(["show", dest, "--out", str(tmp_path / "show.html")]) == 0
    assert "3 images: 3 ok" in capsys.readouterr().out
    assert main(["review", "pick", dest, "--count", "3", "--out", str(tmp_path / "picks.parquet")]) == 0
    picked = _picked_rows(output, [r["image_id"] for r in held])  # what review push sends to Label Studio
    assert [r["uri"] for r in picked] == [held[0]["uri"]] and picked[0]["segments"] is not None
    assert main(["export", dest, "--format", "coco-panoptic", "--out", str(tmp_path / "coco")]) == 0
    assert main(["search", dest, "a dog", "--top", "2"]) == 0
    data = open_training_data(dest, split="train2017", synonyms=None)
    blocks = read_samples(pa.table({"path": data.output.files}), fs=data.output.fs, rows_per_block=4,
                          class_index=data.class_index, min_score=0.0, seed=0,
                          lsj={"image_size": 32, "min_scale": 1.0, "max_scale": 1.0})
    assert sum(len(b["image"]) for b in blocks) == 3
    assert main(["eval", "--model", "fcclip-tiny", "--weights", "random", "--data", dest, "--short-edge", "0",
                 "--out", str(tmp_path / "eval.json"), "--no-progress"]) == 0
    assert json.loads((tmp_path / "eval.json").read_text())["images"] == 3

    # the image whose row the rewritten file holds changes: the increment replaces that row
    shutil.copy(write_images(tmp_path / "new", count=1, size=NEW_SIZE, seed=300)[0], folder / "synth_00001.jpg")
    capsys.readouterr()
    assert main(_args(str(folder), dest, "--shard-size", "2", "--embeddings")) == 0
    out = capsys.readouterr().out
    assert "listed again: 1 new, 1 changed, 2 unchanged" in out, out
    table = open_output(dest).read(columns=["uri", "height", "width"])
    rows = {r["uri"]: (r["height"], r["width"]) for r in table.to_pylist()}
    assert table.num_rows == 4 and rows[f"{folder}/synth_00001.jpg"] == NEW_SIZE, table.to_pylist()


def test_relabel_follows_a_growing_table_and_prune(tmp_path, ray_local, capsys, caplog):
    """`fcclip relabel DEST --out DEST2` run again after DEST grew: DEST2 becomes DEST's new version relabeled (the
    same rows as a relabel of it from scratch), by relabeling only DEST's new files and removing the rows they
    replace and those deleted from DEST (by a DELETE, and by `fcclip label --prune`: an image gone from SOURCE keeps
    its row without it, and loses it with it). A DEST2 written before relabel followed DEST (DEST's version in its
    settings) follows it too; a follow cut short after its plan is finished by the next run, also where another
    program compacted both tables meanwhile."""
    from deltalake import DeltaTable

    from fcclip.datasets.synthetic import write_images
    from fcclip_pipelines import relabel

    folder, dest, dest2 = tmp_path / "in", str(tmp_path / "labels"), tmp_path / "relabeled"
    names = [p.name for p in write_images(folder, count=8, size=OLD_SIZE)]
    new_vocab = ["--vocab", "cat; sky [stuff]"]
    assert main(_args(str(folder), dest, "--embeddings")) == 0
    assert main(["relabel", dest, *new_vocab, "--out", str(dest2)]) == 0
    # as the release before wrote it: DEST's version in the settings, no file map
    run_json = dest2 / "_fcclip" / "run.json"
    run = json.loads(run_json.read_text())
    run["settings"]["source_version"] = run["increments"][0].pop("source_version")
    run["increments"][0].pop("mirror")
    run_json.write_text(json.dumps(run))

    def rows(where):
        table = open_output(str(where)).read(columns=["uri", "width", "height", "segments", "source_size"])
        uris = table.column("uri").to_pylist()
        assert len(uris) == len(set(uris)), sorted(uris)  # each image once
        return {r["uri"]: r for r in table.to_pylist()}

    def from_scratch(name):
        assert main(["relabel", dest, *new_vocab, "--out", str(tmp_path / name)]) == 0
        return rows(tmp_path / name)

    for i, path in enumerate(write_images(tmp_path / "new", count=2, size=NEW_SIZE, seed=300)):
        shutil.copy(path, folder / ("synth_00000.jpg" if i == 0 else "added.jpg"))  # 1 changed, 1 new
    (folder / "synth_00006.jpg").rename(tmp_path / "synth_00006.jpg")  # and 1 gone
    capsys.readouterr()
    assert main(_args(str(folder), dest, "--embeddings")) == 0
    out = capsys.readouterr().out
    assert "listed again: 1 new, 1 changed, 6 unchanged" in out, out
    assert "1 image(s) of the table are gone from SOURCE and keep their rows; --prune removes them" in out
    assert len(rows(dest)) == 9
    shutil.move(str(folder), tmp_path / "moved")  # a SOURCE that lists none of DEST's images: refused, unchanged
    folder.mkdir()
    assert main(_args(str(folder), dest, "--embeddings", "--prune")) == 2
    assert "lists none of the 9 images" in capsys.readouterr().err and len(rows(dest)) == 9
    folder.rmdir()
    shutil.move(tmp_path / "moved", folder)
    caplog.set_level(logging.INFO, logger="fcclip.label")
    assert main(_args(str(folder), dest, "--embeddings", "--prune")) == 0
    out = capsys.readouterr().out
    assert "labeled 0 image(s)" in out and "1 row(s) of images gone from SOURCE removed (--prune)" in out, out
    assert "0 shard(s) to label, 1 row(s) of images gone from SOURCE to remove (--prune)" in caplog.text, caplog.text
    DeltaTable(dest).delete(f"uri = '{folder}/synth_00007.jpg'")
    assert main(["relabel", dest, *new_vocab, "--out", str(dest2)]) == 0
    out = capsys.readouterr().out
    # DEST's new files: shard 2 (the new and the changed image), shard 0 rewritten without the changed image's old
    # row, shard 1 rewritten by the prune and then by the DELETE: of their 7 rows (all of DEST's), DEST2 held 5
    assert "relabeled 2 image(s)" in out and "2 row(s) deleted from DEST removed" in out, out
    assert ("followed DEST from its version 1 to 4: 2 row(s) new or changed in DEST relabeled, 5 held as they are, 2 "
            "row(s) deleted from DEST removed") in out, out
    assert "already committed by an earlier run" not in out, out
    got = rows(dest2)
    assert set(got) == {f"{folder}/{n}" for n in names + ["added.jpg"] if n not in ("synth_00006.jpg",
                                                                                   "synth_00007.jpg")}
    assert (got[f"{folder}/synth_00000.jpg"]["height"], got[f"{folder}/synth_00000.jpg"]["width"]) == NEW_SIZE
    assert got == from_scratch("scratch1")
    # the run killed after the removal's version (the file holding the 2 rows rewritten without them) and before
    # run.json recorded it: the rerun removes nothing more, and commits nothing
    run = json.loads(run_json.read_text())
    for key in ("removed", "complete"):
        run["increments"][-1].pop(key)
    run_json.write_text(json.dumps(run))
    version = table_version(Destination(str(dest2)))
    assert main(["relabel", dest, *new_vocab, "--out", str(dest2)]) == 0
    assert table_version(Destination(str(dest2))) == version and rows(dest2) == got
    # a DELETE of every row of one file of DEST (shard 2's: the new image and the changed one): the file goes and
    # none comes; DEST2 loses those rows all the same
    DeltaTable(dest).delete(f"uri IN ('{folder}/added.jpg', '{folder}/synth_00000.jpg')")
    assert main(["relabel", dest, *new_vocab, "--out", str(dest2), "--summary-json", str(tmp_path / "s.json")]) == 0
    out = capsys.readouterr().out
    assert "relabeled 0 image(s)" in out and "2 row(s) deleted from DEST removed" in out, out
    assert json.loads((tmp_path / "s.json").read_text())["text_seconds"] == 0  # nothing to relabel: no text tower
    got = rows(dest2)
    assert len(got) == 5 and got == from_scratch("scratch-deleted")
    # DEST compacted by another program: its one new file holds rows DEST2 has, and nothing is relabeled
    DeltaTable(dest).optimize.compact()
    assert main(["relabel", dest, *new_vocab, "--out", str(dest2)]) == 0
    out = capsys.readouterr().out
    assert "relabeled 0 image(s)" in out and "0 row(s) new or changed in DEST relabeled, 5 held as they are" in out, out
    assert rows(dest2) == got

    # an image added and labeled (with the 3 deleted above, in SOURCE still: new again), DEST compacted, the next
    # follow planned and the run cut short; DEST2 compacted by another program before the rerun
    shutil.copy(tmp_path / "synth_00006.jpg", folder / "more.jpg")
    assert main(_args(str(folder), dest, "--embeddings")) == 0
    DeltaTable(dest).optimize.compact()
    run = json.loads(run_json.read_text())
    caplog.set_level(logging.INFO, logger="fcclip.relabel")
    relabel._plan_follow(Destination(str(dest2)), run, lambda v: relabel.open_source(dest, v),
                         table_version(Destination(dest)))
    assert "4 row(s) of DEST to relabel (in 1 file(s)), 5 held already, 0 not in DEST's version" in caplog.text, \
        caplog.text
    DeltaTable(str(dest2)).optimize.compact()
    assert main(["relabel", dest, *new_vocab, "--out", str(dest2)]) == 0
    assert "relabeled 4 image(s)" in capsys.readouterr().out  # of DEST's one compacted file, the 4 new images' rows
    assert "relabeling 4 images in 1 shards" in caplog.text and "relabeled 4/4 images (0 failed)" in caplog.text
    got = rows(dest2)
    assert len(got) == 9 and got == from_scratch("scratch2")
    assert main(["relabel", dest, *new_vocab, "--out", str(dest2)]) == 0
    assert "relabeled 0 image(s)" in capsys.readouterr().out

    # every row of DEST deleted: DEST2 follows it to no rows, and a new DEST2 of it starts empty; both follow DEST
    # once it is labeled again
    DeltaTable(dest).delete()
    emptied = table_version(Destination(dest))
    for out_dir, table in ((dest2, "a Delta table"), (tmp_path / "from-empty", "no table yet: DEST has no rows")):
        assert main(["relabel", dest, *new_vocab, "--out", str(out_dir)]) == 0
        out = capsys.readouterr().out
        assert "relabeled 0 image(s)" in out and f"({table}; run " in out, out
    assert table_files(Destination(str(dest2))) == []
    assert main(_args(str(folder), dest, "--embeddings")) == 0
    assert "listed again: 9 new" in capsys.readouterr().out
    for out_dir in (dest2, tmp_path / "from-empty"):
        assert main(["relabel", dest, *new_vocab, "--out", str(out_dir)]) == 0
        assert "relabeled 9 image(s)" in capsys.readouterr().out
    assert rows(dest2) == rows(tmp_path / "from-empty") == from_scratch("scratch3")
    # followed back to DEST's version of no rows: the 9 rows are not in that version (not deleted from DEST)
    assert main(["relabel", dest, "--version", str(emptied), *new_vocab, "--out", str(dest2)]) == 0
    out = capsys.readouterr().out
    assert f"0 held as they are, 9 row(s) not in DEST's version {emptied} removed" in out, out
    assert table_files(Destination(str(dest2))) == []
