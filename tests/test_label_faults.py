"""`fcclip label` under real faults: a worker that crashes or hangs on one image, an actor killed and a node removed
mid-job on a 3-node cluster, the driver killed mid-job and the job run again, a destination that stops taking
writes, a job stopped by Ctrl-C or SIGTERM.

Faults are real: stand-in stages handed to the job through its Python API (tests/label_job.py) make a Ray worker
``os._exit`` or sleep on one URI, or a model actor never return from a batch; the other faults are SIGKILLs and
``Cluster.remove_node``. Every Ray started here lives under its own
RAY_TMPDIR, so it neither joins nor is joined by another Ray on this machine, and its processes can be found (their
command lines name that folder) and ended without touching anyone else's.
"""
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import pyarrow.parquet as pq
import pytest

pytestmark = pytest.mark.ray

VOCAB = "person; car; dog, puppy; grass, lawn [stuff]; sky [stuff]"
JOB_LIMIT_S = 300  # a stalled job fails the test instead of blocking the run


# ---------------------------------------------------------------------------------------------------- helpers
def _images(folder: Path, count: int, extra: tuple[str, ...] = (), size=(72, 96)) -> list[str]:
    """``count`` synthetic JPEGs plus copies named ``extra``; their URIs (as the job lists them).

    A fault applies to every URI containing its NAME, and tmp_path contains the test's name: fault names carry a
    hyphen, which no test name has."""
    from fcclip.datasets.synthetic import write_images

    paths = write_images(folder, count=count, size=size)
    for i, name in enumerate(extra):
        shutil.copy(paths[i % len(paths)], folder / name)
    return sorted(str(p) for p in folder.iterdir())


def _ray_tmpdir() -> str:
    # short: Ray puts unix sockets below it (108-byte limit), so not under pytest's long tmp_path
    return tempfile.mkdtemp(prefix="fcr", dir="/tmp")


def _ray_pids(ray_tmp: str, session: int | None = None) -> list[int]:
    """Live (non-zombie) processes of the Ray under ``ray_tmp``: those in ``session``, those whose command line or
    environment names ``ray_tmp`` (workers retitle themselves "ray::...", and some agents lose their environment
    that way), and their descendants."""
    procs = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit() or int(entry) == os.getpid():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
            with open(f"/proc/{entry}/cmdline", "rb") as f:
                text = f.read()
            with open(f"/proc/{entry}/environ", "rb") as f:
                text += f.read()
        except OSError:
            continue
        if fields[0] == "Z":
            continue
        named = ray_tmp.encode() in text or (session is not None and int(fields[3]) == session)
        procs[int(entry)] = (int(fields[1]), named)
    found = {pid for pid, (_, named) in procs.items() if named}
    grew = True
    while grew:
        more = {pid for pid, (ppid, _) in procs.items() if ppid in found} - found
        found |= more
        grew = bool(more)
    return sorted(found)


def _remove_tree(path: str) -> None:
    for _ in range(20):  # dying Ray processes may still write logs into it for a moment
        shutil.rmtree(path, ignore_errors=True)
        if not os.path.exists(path):
            return
        time.sleep(0.25)


def _describe(pids: list[int]) -> list[str]:
    """pid, state, process group and command line of each, for a failure message."""
    described = []
    for pid in pids:
        try:
            with open(f"/proc/{pid}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                command = f.read().replace(b"\0", b" ").decode(errors="replace")[:200]
            described.append(f"{pid} state={fields[0]} pgrp={fields[2]} {command}")
        except OSError:
            described.append(f"{pid} (gone)")
    return described


def _end_processes(ray_tmp: str, session: int | None = None, timeout: float = 20) -> list[int]:
    """SIGKILL every process of the Ray living under ``ray_tmp``; returns those that would not die."""
    deadline = time.monotonic() + timeout
    while (pids := _ray_pids(ray_tmp, session)) and time.monotonic() < deadline:
        for pid in pids:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        time.sleep(0.2)
    return _ray_pids(ray_tmp, session)


class Job:
    """``fcclip label ...`` in its own session (process group) and its own RAY_TMPDIR; with ``stand_ins`` (options of
    tests/label_job.py) it runs through that script, which hands stand-in stages to the job."""

    def __init__(self, args: list[str], stand_ins: list[str] | None = None):
        self.ray_tmp = _ray_tmpdir()
        env = dict(os.environ, RAY_TMPDIR=self.ray_tmp)
        env.pop("RAY_ADDRESS", None)
        self.log = open(Path(self.ray_tmp) / "job.log", "w+")
        if stand_ins is None:
            command = [sys.executable, "-m", "fcclip_pipelines", "label", *args]
        else:
            command = [sys.executable, str(Path(__file__).parent / "label_job.py"), *stand_ins, "--", *args]
        self.proc = subprocess.Popen(
            command, env=env, stdout=self.log, stderr=subprocess.STDOUT, start_new_session=True,
            cwd=Path(__file__).parent.parent,
        )

    def wait(self, timeout: float = JOB_LIMIT_S) -> int:
        try:
            return self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            pytest.fail(f"the job did not finish in {timeout} s (stalled?); its log:\n{self.output()[-5000:]}")

    def kill(self) -> None:
        """SIGKILL the driver and its process group (the local Ray it started is in it)."""
        try:
            os.killpg(self.proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        self.proc.wait()

    def output(self) -> str:
        self.log.flush()
        self.log.seek(0)
        return self.log.read()

    def close(self) -> list[int]:
        """End everything that is left; returns the pids that survived (should be none)."""
        if self.proc.poll() is None:
            self.kill()
        try:
            os.killpg(self.proc.pid, signal.SIGKILL)  # anything of the session still there after a clean exit
        except (ProcessLookupError, PermissionError):
            pass
        survivors = _end_processes(self.ray_tmp, session=self.proc.pid)
        self.log.close()
        _remove_tree(self.ray_tmp)
        return survivors


def _finish(job: Job, timeout: float = JOB_LIMIT_S) -> tuple[int, str]:
    """Wait for ``job``, end whatever it left, and check nothing of its Ray survived: its exit status and output."""
    try:
        code = job.wait(timeout)
        output = job.output()
    finally:
        survivors = job.close()
    assert survivors == [], "processes of the job's Ray still alive after it"
    return code, output


def _label_args(source: Path, dest: Path, *more: str) -> list[str]:
    return [str(source), "--out", str(dest), "--vocab", VOCAB, "--model", "fcclip-tiny", "--weights", "random",
            "--num-cpus", "2", "--no-progress", *more]


def _rows(dest: Path) -> list[dict]:
    return [r for p in sorted(dest.rglob("*.parquet")) for r in pq.read_table(p).to_pylist()]


def _assert_exactly_once(rows: list[dict], uris: list[str]) -> dict[str, dict]:
    seen = [r["uri"] for r in rows]
    duplicates = sorted({u for u in seen if seen.count(u) > 1})
    assert not duplicates, f"rows written twice: {duplicates}"
    assert sorted(seen) == sorted(uris), f"missing: {sorted(set(uris) - set(seen))}, extra: {sorted(set(seen) - set(uris))}"
    return {r["uri"]: r for r in rows}


# ---------------------------------------------------------------------------------------------------- tests
@pytest.mark.slow
def test_crashing_hanging_and_stuck_images_become_error_rows(tmp_path):
    """Three bad images in one job (one Ray and model start-up for all three faults):
    - one that kills its worker every time (a decoder segfault): its chunk is run again one image at a time, the
      image alone is retried a bounded number of times, then is an error row;
    - a read/decode that hangs in Python is cut by the per-image time limit (SIGALRM: Ray runs task UDFs in the
      worker's main thread) and is a "timed out" error row, the worker living on;
    - one stuck out of the alarm's reach (native code) is ended by the watchdog at twice the limit and goes the
      crashed-worker way.
    The job finishes and every other image is labeled."""
    uris = _images(tmp_path / "in", 6, extra=("poison-pill.jpg", "slow-poke.jpg", "stuck-decoder.jpg"))
    job = Job(_label_args(tmp_path / "in", tmp_path / "out", "--shard-size", "4", "--batch-size", "2",
                          "--decode-timeout", "1"),
              stand_ins=["--fault", "crash:poison-pill", "--fault", "hang:slow-poke", "--fault", "stall:stuck-decoder"])
    try:
        code = job.wait()
        out = job.output()
    finally:
        survivors = job.close()
    assert survivors == [], "processes of the job's Ray still alive after it"
    assert code == 0, out[-5000:]
    assert "labeled 9 image(s)" in out and "6 ok, 3 failed" in out, out[-3000:]
    assert "re-run one at a time after worker crashes" in out
    rows = _assert_exactly_once(_rows(tmp_path / "out"), uris)
    poison = rows[str(tmp_path / "in" / "poison-pill.jpg")]
    assert poison["status"] == "error" and "worker crashed" in poison["error"], poison["error"]
    assert poison["segments"] == [] and poison["width"] is None
    slow = rows[str(tmp_path / "in" / "slow-poke.jpg")]
    assert slow["status"] == "error" and slow["error"] == "timed out after 1.0 s while reading or decoding"
    stuck = rows[str(tmp_path / "in" / "stuck-decoder.jpg")]
    assert stuck["status"] == "error" and "worker crashed" in stuck["error"], stuck["error"]
    bad = {poison["uri"], slow["uri"], stuck["uri"]}
    assert all(r["status"] == "ok" and r["error"] is None for u, r in rows.items() if u not in bad)


@pytest.mark.slow
def test_actor_killed_and_node_removed_on_a_3_node_cluster(tmp_path, monkeypatch):
    """Head + 2 worker nodes; mid-job one model actor is SIGKILLed (as the OOM killer would) and a worker node is
    removed (all its processes killed). The job completes with exactly one ok row per input."""
    import ray
    from ray._private.state import actors as actor_table  # the GCS's table; ray.util.state needs the dashboard
    from ray.cluster_utils import Cluster

    from fcclip_pipelines.label import LabelConfig, run_label

    uris = _images(tmp_path / "in", 40)
    dest = tmp_path / "out"
    ray_tmp = _ray_tmpdir()
    monkeypatch.setenv("RAY_TMPDIR", ray_tmp)  # the cluster's address file and sessions stay private to this test
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    # if the test fails while the job's thread runs, that thread must not reconnect once the test shuts Ray down
    # (Ray's auto-init on ray.get and co.); it would keep the cluster from shutting down
    monkeypatch.setattr("ray._private.auto_init_hook.enable_auto_connect", False)
    cluster = None
    result: dict = {}
    try:
        cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 2, "include_dashboard": False})
        workers = [cluster.add_node(num_cpus=2) for _ in range(2)]
        cluster.wait_for_nodes()
        ray.init(address=cluster.address, log_to_driver=False)
        cfg = LabelConfig(
            source=str(tmp_path / "in"), dest=str(dest), vocab=VOCAB, model="fcclip-tiny", weights="random",
            batch_size=2, actors=(2, 2), shard_size=4, chunk_size=2,
        )

        def job():
            try:
                result["summary"] = run_label(cfg, progress=False)
            except BaseException as e:  # reported by the test thread
                result["error"] = e

        thread = threading.Thread(target=job, daemon=True)
        thread.start()
        deadline = time.monotonic() + JOB_LIMIT_S
        while not list(dest.glob("*.parquet")) and thread.is_alive() and time.monotonic() < deadline:
            time.sleep(0.1)
        committed_before = len(list(dest.glob("*.parquet")))
        assert thread.is_alive() and 0 < committed_before < 10, f"the faults must land mid-job ({result})"

        # the pool's actors; the second may still be starting (it is placed on a node then, but has no process yet)
        actors = [a for a in actor_table().values() if "ModelActor" in a["ActorClassName"] and a["State"] != "DEAD"]
        actors.sort(key=lambda a: a["State"] != "ALIVE")
        assert actors and actors[0]["State"] == "ALIVE", actors
        os.kill(actors[0]["Pid"], signal.SIGKILL)
        # remove the worker node that holds the other actor if one does, else the first worker node
        by_id = {n.node_id: n for n in workers}
        victim = next((by_id[a["Address"]["NodeID"]] for a in actors[1:] if a["Address"]["NodeID"] in by_id), workers[0])
        cluster.remove_node(victim, allow_graceful=False)
        faults_at = len(list(dest.glob("*.parquet")))

        thread.join(timeout=max(1.0, deadline - time.monotonic()))
        assert not thread.is_alive(), f"the job did not finish in {JOB_LIMIT_S} s"
    finally:
        ray.shutdown()
        try:
            if cluster is not None:
                cluster.shutdown()
        finally:
            survivors = _end_processes(ray_tmp)  # whatever cluster.shutdown left
        _remove_tree(ray_tmp)
    assert survivors == []
    assert "error" not in result, repr(result.get("error"))
    assert faults_at < 10, "the job was over before the faults"
    summary = result["summary"]
    rows = _assert_exactly_once(_rows(dest), uris)
    assert sorted(p.name for p in dest.glob("*.parquet")) == [f"part-{i:06d}.parquet" for i in range(10)]
    bad = {u: r["error"] for u, r in rows.items() if r["status"] != "ok"}
    assert not bad, bad
    assert (summary.images, summary.ok) == (40, 40)


class _Committed:
    def committed(self) -> set[str]:
        """The part files of the table's current version."""
        from fcclip_pipelines.lake import table_files
        from fcclip_pipelines.output import Destination

        return set(table_files(Destination(self.dest)))


class _Local(_Committed):
    """DEST on a local folder, as the driver-kill test inspects it."""

    def __init__(self, root: Path):
        self.root = root
        self.dest = str(root)

    def parts(self) -> dict[str, tuple]:
        return {p.name: (p.read_bytes(), p.stat().st_ino, p.stat().st_mtime_ns) for p in self.root.glob("*.parquet")}

    def all_parquet(self) -> list[str]:
        return [str(p) for p in self.root.rglob("*.parquet")]

    def read_rows(self, path: str) -> int:
        return pq.read_table(path).num_rows

    def read_text(self, relative: str) -> str | None:
        path = self.root / relative
        return path.read_text() if path.exists() else None

    def leftovers(self) -> list[str]:
        return sorted(str(p) for p in (self.root / "_fcclip").rglob("*") if "manifest" not in str(p) and p.is_file())

    def rows(self) -> list[dict]:
        return _rows(self.root)


class _Bucket(_Committed):
    """DEST on the loopback S3 server."""

    def __init__(self, bucket: str):
        import s3fs

        self.fs = s3fs.S3FileSystem()
        self.prefix = f"{bucket}/out"
        self.dest = f"s3://{self.prefix}"

    def _ls(self, pattern: str) -> list[str]:
        self.fs.invalidate_cache()
        return sorted(self.fs.glob(pattern))

    def parts(self) -> dict[str, tuple]:
        found = {}
        for path in self._ls(f"{self.prefix}/*.parquet"):
            info = self.fs.info(path)
            found[path.rsplit("/", 1)[-1]] = (self.fs.cat_file(path), info.get("ETag"), info.get("LastModified"))
        return found

    def all_parquet(self) -> list[str]:
        return self._ls(f"{self.prefix}/**/*.parquet")

    def read_rows(self, path: str) -> int:
        return pq.read_table(path, filesystem=self.fs).num_rows

    def read_text(self, relative: str) -> str | None:
        try:
            return self.fs.cat_file(f"{self.prefix}/{relative}").decode()
        except FileNotFoundError:
            return None

    def leftovers(self) -> list[str]:
        return [p for p in self._ls(f"{self.prefix}/_fcclip/**") if "manifest" not in p and self.fs.isfile(p)]

    def rows(self) -> list[dict]:
        paths = self._ls(f"{self.prefix}/*.parquet")
        return [r for p in paths for r in pq.read_table(p, filesystem=self.fs).to_pylist()]


N_IMAGES = 24  # 12 shards of 2: the kill comes after the first commit, with most shards still to go


@pytest.mark.slow
@pytest.mark.parametrize("storage", ["local", "s3"])
def test_driver_killed_then_rerun_writes_each_image_once(tmp_path, storage, request):
    """SIGKILL the driver (and the local Ray it started) once some shards are committed, run the same command
    again: committed shards are left untouched, the rest are written, every input appears exactly once, and no
    fragment of the killed run is left. While both runs go on, every .parquet under DEST reads back whole, with its
    shard's full row count. On a local folder, and bucket to bucket on the loopback S3 server."""
    if storage == "local":
        uris = _images(tmp_path / "in", N_IMAGES)
        source, out = str(tmp_path / "in"), _Local(tmp_path / "out")
    else:
        import boto3

        bucket = request.getfixturevalue("s3_bucket")
        local = _images(tmp_path / "in", N_IMAGES)
        s3 = boto3.client("s3")
        for path in local:
            s3.upload_file(path, bucket, f"in/{Path(path).name}")
        uris = [f"s3://{bucket}/in/{Path(p).name}" for p in local]
        source, out = f"s3://{bucket}/in/", _Bucket(bucket)
    args = [source, "--out", out.dest, "--vocab", VOCAB, "--model", "fcclip-tiny", "--weights", "random",
            "--num-cpus", "2", "--no-progress", "--shard-size", "2", "--batch-size", "2"]

    checks = {"reads": 0, "problems": []}
    stop = threading.Event()

    def watch():
        """Read every .parquet under DEST, over and over, as a consumer would while the job runs."""
        import json

        sizes = None
        while not stop.is_set():
            if sizes is None and (text := out.read_text("_fcclip/run.json")):
                sizes = json.loads(text).get("shard_sizes")
            for path in out.all_parquet():
                name = path.rsplit("/", 1)[-1]
                try:
                    n = out.read_rows(path)
                except FileNotFoundError:
                    continue
                except Exception as e:
                    checks["problems"].append(f"{name}: {type(e).__name__}: {e}")
                    continue
                top = path.rsplit("/", 1)[0].rstrip("/") == out.dest.replace("s3://", "").rstrip("/")
                shard = int(name.split("-")[1].split(".")[0]) if name.startswith("part-") and top else None
                if shard is None or sizes is None or n != sizes[shard]:
                    checks["problems"].append(f"{path}: {n} rows (manifest: {sizes})")
                checks["reads"] += 1
            time.sleep(0.02)

    watcher = threading.Thread(target=watch, daemon=True)
    watcher.start()
    try:
        first = Job(args)
        try:
            deadline = time.monotonic() + JOB_LIMIT_S
            while not out.committed() and first.proc.poll() is None and time.monotonic() < deadline:
                time.sleep(0.05)
            assert first.proc.poll() is None, f"the first run ended before it was killed:\n{first.output()[-3000:]}"
            first.kill()
            # killing the driver's process group ends the local Ray it started (GCS, raylet, workers); a worker
            # busy in a call (CI saw one live past 10 s) ends when it next finds its raylet gone, and one that was
            # still starting (titled ray::IDLE before it connects) waits out Ray's GCS reconnect timeout, 60 s
            # (gcs_rpc_server_reconnect_timeout_s): CI saw one live past 60 s
            deadline = time.monotonic() + 100
            while (left := _ray_pids(first.ray_tmp, session=first.proc.pid)) and time.monotonic() < deadline:
                time.sleep(0.1)
            described = _describe(left)
        finally:
            survivors = first.close()
        assert left == [], f"processes of the killed run outlived its process group by 100 s: {described}"
        assert survivors == []
        # committed: named in a version of the table (a part file written after the last version is written again)
        before = {name: kept for name, kept in out.parts().items() if name in out.committed()}
        assert 0 < len(before) < N_IMAGES // 2, sorted(before)

        code, output = _finish(Job(args))
    finally:
        stop.set()
        watcher.join()
    assert code == 0, output[-5000:]
    assert f"{len(before)} shard(s) were already committed" in output, output[-3000:]
    assert f"labeled {N_IMAGES - 2 * len(before)} image(s)" in output, output[-3000:]
    assert checks["problems"] == [] and checks["reads"] > 0, checks
    after = out.parts()
    assert sorted(after) == [f"part-{i:06d}.parquet" for i in range(N_IMAGES // 2)]
    for name, kept in before.items():
        assert after[name] == kept, f"{name} was written again"  # same bytes, same object: never replaced
    rows = _assert_exactly_once(out.rows(), uris)
    assert all(r["status"] == "ok" for r in rows.values())
    assert len({r["run_id"] for r in rows.values()}) == 1
    # no fragment of either run is left: the settings and the part files' metadata (lake.table_metadata) only
    assert [f.rsplit("/", 1)[-1] for f in out.leftovers()] == ["run.json", "table.json"]


SIX_SHARDS = ("--shard-size", "4", "--chunk-size", "2", "--batch-size", "2")  # 24 images
SLOW_MODEL = ["--slow-model", "0.25"]  # about 6 s of model time for 24 images: faults come mid-job


def _job_with_a_committed_shard(tmp_path: Path) -> tuple[list[str], "_Local", list[str], Job]:
    """24 images in 6 shards, labeled by a stand-in model of 0.25 s per image: the images' URIs, DEST, the command's
    arguments and the job, still running, once its first part file is there."""
    uris = _images(tmp_path / "in", 24, size=(48, 64))
    args = _label_args(tmp_path / "in", tmp_path / "out", *SIX_SHARDS)
    job = Job(args, stand_ins=SLOW_MODEL)
    try:
        deadline = time.monotonic() + JOB_LIMIT_S
        while not (tmp_path / "out" / "part-000000.parquet").exists():
            assert job.proc.poll() is None, f"the job ended before its first shard:\n{job.output()[-3000:]}"
            assert time.monotonic() < deadline, f"no shard committed in {JOB_LIMIT_S} s:\n{job.output()[-3000:]}"
            time.sleep(0.02)
    except BaseException:
        job.close()
        raise
    return uris, _Local(tmp_path / "out"), args, job


def _rerun_labels_the_rest(args: list[str], dest: "_Local", uris: list[str], committed: int) -> None:
    """The same command again: the ``committed`` shards are skipped, the rest labeled, each image once, all ok."""
    code, output = _finish(Job(args, stand_ins=SLOW_MODEL))
    assert code == 0, output[-5000:]
    assert f"{committed} shard(s) were already committed" in output, output[-3000:]
    rows = _assert_exactly_once(dest.rows(), uris)
    assert all(r["status"] == "ok" for r in rows.values())
    assert sorted(dest.parts()) == [f"part-{i:06d}.parquet" for i in range(6)]


def _one_error(code: int, output: str, survivors: list[int]) -> list[str]:
    """A job that ended on a fault: its Ray's processes gone, status 1, one `fcclip label: error:` line ([it])."""
    assert survivors == []
    assert code == 1, output[-5000:]
    error = [line for line in output.splitlines() if line.startswith("fcclip label: error:")]
    assert len(error) == 1, output[-5000:]
    return error


@pytest.mark.slow
def test_a_destination_that_refuses_writes_ends_the_job_and_a_rerun_goes_on(tmp_path):
    """DEST stops taking writes mid-job (here its fragment folder is replaced by a file, so every write under it fails
    with NotADirectoryError, as a full disk or a revoked permission would fail it): the job does not turn the images
    into error rows, nor retry for ever; it ends within its bounded retries, exit status 1, with one error line that
    names the write that failed, says how many shards are committed and how to go on. What was committed is in the
    table. Once DEST takes writes again, the same command labels the rest, every image exactly once, all ok."""
    uris, dest, args, first = _job_with_a_committed_shard(tmp_path)
    fragments = tmp_path / "out" / "_fcclip" / "fragments"
    try:
        blocker = tmp_path / "blocker"
        blocker.write_text("not a folder")
        while not fragments.is_file():  # a write may create the folder again between the two renames: once more
            if fragments.exists():
                os.rename(fragments, tmp_path / f"moved-{time.monotonic_ns()}")
            try:
                os.rename(blocker, fragments)
            except OSError:
                pass
        code, output = first.wait(), first.output()
    finally:
        survivors = first.close()
    error = _one_error(code, output, survivors)
    assert "Not a directory" in error[0] or "No such file" in error[0], error[0]  # a write, or a commit of its shard
    assert "are committed (they stay); run the same command again" in error[0], error[0]
    committed = dest.committed()
    parts = set(dest.parts())
    assert committed and committed == parts and len(parts) < 6, (sorted(committed), sorted(parts))
    assert f"{len(parts)} of the 6 shards" in error[0], error[0]
    assert all(r["status"] == "ok" for r in dest.rows()), "a refused write became error rows"

    fragments.unlink()  # DEST takes writes again
    _rerun_labels_the_rest(args, dest, uris, len(parts))


@pytest.mark.slow
def test_a_table_that_refuses_commits_ends_the_job_with_status_1_and_a_rerun_goes_on(tmp_path):
    """The table's own commits fail on the driver mid-job (its _delta_log folder replaced by a file, as a deleted bucket
    or a revoked permission fails them): a storage fault, exit status 1 (not 2, a bad command's), one error line that
    names the commit, how many shards are committed and how to go on, no traceback. With the log back, the same
    command labels the rest, every image exactly once."""
    uris, dest, args, first = _job_with_a_committed_shard(tmp_path)
    log, kept = tmp_path / "out" / "_delta_log", tmp_path / "log-kept"
    try:
        while not (log / "00000000000000000000.json").exists():  # the table's first version
            assert first.proc.poll() is None, first.output()[-3000:]
            time.sleep(0.02)
        os.rename(log, kept)
        log.write_text("not a folder")
        code, output = first.wait(), first.output()
    finally:
        survivors = first.close()
    error = _one_error(code, output, survivors)
    assert "Traceback" not in output, output[-5000:]
    # deltalake's OSError of the file in the way, or its TableNotFoundError where it found no log to add to
    assert re.search(r"could not be committed to the table: (OSError|TableNotFoundError): ", error[0]), error[0]
    assert "are committed (they stay); run the same command again" in error[0], error[0]

    log.unlink()
    os.rename(kept, log)  # DEST takes writes again
    committed = dest.committed()
    # those it knows in the table: a commit cut off as it ended may have reached the table without its knowing
    named = re.search(r"(\d) of the 6 shards", error[0])
    assert named and int(named.group(1)) <= len(committed), (sorted(committed), error[0])
    _rerun_labels_the_rest(args, dest, uris, len(committed))


@pytest.mark.slow
@pytest.mark.parametrize("sig", ["SIGINT", "SIGTERM"])
def test_a_stopped_job_keeps_what_is_committed_and_a_rerun_goes_on(tmp_path, sig):
    """Ctrl-C (SIGINT to the terminal's whole process group: the driver and the local Ray it started) or SIGTERM to
    the driver alone (as `ray job stop` or a stopped pod sends it) once a shard is committed: the job stops at the next
    turn of its loop, puts what is committed in the table, says so in one line (no traceback) and exits with 128 + the
    signal. The same command then labels the rest, every image exactly once."""
    import signal as signals

    number = getattr(signals, sig)
    uris, dest, args, first = _job_with_a_committed_shard(tmp_path)
    try:
        if sig == "SIGINT":
            os.killpg(first.proc.pid, number)
        else:
            os.kill(first.proc.pid, number)
        code = first.wait(timeout=60)
        output = first.output()
    finally:
        survivors = first.close()
    assert survivors == []
    assert code == 128 + number, output[-5000:]
    assert "Traceback" not in output, output[-5000:]
    stopped = [line for line in output.splitlines() if line.startswith("fcclip label:")]
    assert len(stopped) == 1 and stopped[0].startswith(f"fcclip label: stopped by {sig}. "), output[-3000:]
    assert "are committed (they stay); run the same command again to label the rest" in stopped[0], stopped[0]
    committed = dest.committed()
    assert "part-000000.parquet" in committed and len(committed) < 6, sorted(committed)
    assert f"{len(committed)} of the 6 shards" in stopped[0], stopped[0]

    _rerun_labels_the_rest(args, dest, uris, len(committed))


@pytest.mark.slow
def test_a_job_stopped_then_compacted_by_another_program_is_labeled_once(tmp_path):
    """SIGTERM once a shard is committed, then another program compacts the table (deltalake's OPTIMIZE: the part
    files rewritten as one file of its own name, without fcclip's metadata): the rerun finds the committed shards in
    the table's log, labels the rest, and the table holds every image once."""
    from deltalake import DeltaTable

    from fcclip_pipelines.output import open_output

    uris, dest, args, first = _job_with_a_committed_shard(tmp_path)
    try:
        deadline = time.monotonic() + JOB_LIMIT_S
        while len(dest.committed()) < 2 and first.proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.05)  # two shards in the table: a compaction leaves a single file as it is
        os.kill(first.proc.pid, signal.SIGTERM)
        code = first.wait(timeout=60)
    finally:
        survivors = first.close()
    assert survivors == [] and code == 128 + signal.SIGTERM, first.output()[-3000:]
    committed = dest.committed()
    assert 2 <= len(committed) < 6, sorted(committed)
    DeltaTable(dest.dest).optimize.compact()
    assert len(dest.committed()) == 1 and not dest.committed() & committed

    code, output = _finish(Job(args, stand_ins=SLOW_MODEL))
    assert code == 0, output[-5000:]
    assert f"{len(committed)} shard(s) were already committed" in output, output[-3000:]
    rows = _assert_exactly_once(open_output(dest.dest).read(columns=["uri", "status"]).to_pylist(), uris)
    assert all(r["status"] == "ok" for r in rows.values())


@pytest.mark.slow
def test_hanging_model_batch_is_abandoned(tmp_path):
    """A model stage that never returns from a batch (a stand-in that really sleeps): past --batch-timeout the actor
    is killed and replaced, the batch's images are run one at a time, and the one that hangs alone becomes an error
    row; every other image is labeled. The limit is per batch: every other batch takes 1.2 s of a 3 s limit, so a
    chunk of three batches (3.6 s in one model call) is not cut short."""
    from PIL import Image

    uris = _images(tmp_path / "in", 5, size=(48, 64))
    Image.new("RGB", (64, 48), (255, 0, 255)).save(tmp_path / "in" / "hung-forward.png")
    uris = sorted(uris + [str(tmp_path / "in" / "hung-forward.png")])
    job = Job(_label_args(tmp_path / "in", tmp_path / "out", "--shard-size", "3", "--batch-size", "1",
                          "--chunk-size", "3", "--batch-timeout", "3"),
              stand_ins=["--hanging-model", "--model-seconds", "1.2"])
    try:
        code = job.wait()
        out = job.output()
    finally:
        survivors = job.close()
    assert survivors == [], "processes of the job's Ray still alive after it"
    assert code == 0, out[-5000:]
    assert "labeled 6 image(s)" in out and "5 ok, 1 failed" in out, out[-3000:]
    assert "re-run one at a time" in out
    # twice: the chunk holding the hung image, then that image alone; never the chunk of three 1.2 s batches
    assert out.count("a model batch ran past 3 s") == 2, out[-3000:]
    rows = _assert_exactly_once(_rows(tmp_path / "out"), uris)
    hung = rows[str(tmp_path / "in" / "hung-forward.png")]
    assert hung["status"] == "error" and hung["error"] == "model timed out after 3 s on this image alone", hung
    assert hung["segments"] == [] and (hung["width"], hung["height"]) == (64, 48)
    for uri, r in rows.items():
        if uri != hung["uri"]:
            assert r["status"] == "ok" and r["model"] == "hanging-stand-in@none", r
            assert [s["area"] for s in r["segments"]] == [r["width"] * r["height"]]


@pytest.mark.slow
def test_progress_on_a_terminal(tmp_path):
    """`fcclip label` under a pseudo-terminal: one line per stage (listing, start-up, labeled with rate and ETA,
    shards committed), none of Ray Data's operator bars nor Ray's start-up warnings."""
    import fcntl
    import pty
    import select
    import struct
    import termios

    _images(tmp_path / "in", 6, size=(48, 64))
    ray_tmp = _ray_tmpdir()
    env = dict(os.environ, RAY_TMPDIR=ray_tmp, TERM="xterm")
    env.pop("RAY_ADDRESS", None)
    master, slave = pty.openpty()
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 40, 150, 0, 0))
    args = [a for a in _label_args(tmp_path / "in", tmp_path / "out", "--shard-size", "2") if a != "--no-progress"]
    proc = subprocess.Popen([sys.executable, "-m", "fcclip_pipelines", "label", *args], stdin=slave, stdout=slave, stderr=slave,
                            env=env, start_new_session=True, cwd=Path(__file__).parent.parent)
    os.close(slave)
    data = b""
    deadline = time.monotonic() + JOB_LIMIT_S
    try:
        while time.monotonic() < deadline:
            ready, _, _ = select.select([master], [], [], 1.0)
            if ready:
                try:
                    chunk = os.read(master, 65536)
                except OSError:  # the terminal's other side closed: the job is over
                    break
                if not chunk:
                    break
                data += chunk
            elif proc.poll() is not None:
                break
        code = proc.wait(timeout=30)
    finally:
        os.close(master)
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        survivors = _end_processes(ray_tmp, session=proc.pid)
        _remove_tree(ray_tmp)
    assert survivors == []
    text = data.decode(errors="replace")
    screen = [line.strip() for part in text.split("\n") for line in part.split("\r") if line.strip()]
    assert code == 0, text[-3000:]
    assert any(line.startswith("listing   6 images in 3 shards") for line in screen), text[-3000:]
    assert any(line.startswith("start-up  Ray and 1 model actor(s) starting ...") for line in screen), text[-3000:]
    assert any(line.startswith("start-up  Ray and 1 model actor(s) ready after") for line in screen), text[-3000:]
    final = [line for line in screen if line.startswith("labeled   6/6 images, ok 6, failed 0,")]
    assert final and "images/s, ETA" in final[-1], text[-3000:]
    assert "committed 3/3 shards" in screen, text[-3000:]
    assert "labeled 6 image(s)" in text
    for noise in ("Tasks: ", "Actors: ", "Token authentication", "new progress UI", "core_worker", "WARNING"):
        assert noise not in text, (noise, text[-3000:])


def _python_with_its_own_ray(args: list[str], ray_tmp: str, meanwhile=None) -> tuple[int, str, list[int]]:
    """``python ARGS`` (from the repository) with RAY_TMPDIR ``ray_tmp`` and no RAY_ADDRESS, to its end (after
    ``meanwhile(process)``, where given): its exit status, its output (stdout and stderr), and the processes of its
    Ray left behind (then ended; the folder removed)."""
    env = dict(os.environ, RAY_TMPDIR=ray_tmp)
    env.pop("RAY_ADDRESS", None)
    proc = subprocess.Popen([sys.executable, *args], env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, start_new_session=True, cwd=Path(__file__).parent.parent)
    try:
        if meanwhile is not None:
            meanwhile(proc)
        out, _ = proc.communicate(timeout=JOB_LIMIT_S)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        survivors = _end_processes(ray_tmp, session=proc.pid)
        _remove_tree(ray_tmp)
    return proc.returncode, out, survivors


@pytest.mark.slow
def test_runtime_starts_a_new_local_ray_despite_a_stale_address(tmp_path):
    """fcclip_pipelines.runtime.init_ray without an address starts a new local Ray even when the machine's Ray address file
    names a cluster (here a dead one), which a bare ray.init() would try to join; the model actor runs on it, asking
    for the GPUs that Ray found on this machine (none)."""
    ray_tmp = _ray_tmpdir()
    os.makedirs(Path(ray_tmp) / "ray", exist_ok=True)
    (Path(ray_tmp) / "ray" / "ray_current_cluster").write_text("127.0.0.1:1\n")
    script = (
        "import sys, ray\n"
        "from fcclip_pipelines import runtime\n"
        "started = runtime.init_ray(num_cpus=1)\n"
        "gpus = runtime.resolve_gpus(None, None)\n"
        "print('default GPUs', gpus, 'torch imported', 'torch' in sys.modules)\n"
        "actor = runtime.start_model_actor(lambda: 'm', gpus=gpus, cpus=0.5)\n"
        "print('ready', ray.get(actor.ready.remote()))\n"
        "info, out = ray.get(list(actor.run.options(num_returns=2).remote(lambda m, x: m + x, '!')))\n"
        "print('result', out, info['total_s'] >= 0)\n"
        "runtime.shutdown_ray(started)\n"
        "print('initialized after shutdown', ray.is_initialized())\n"
    )
    code, out, survivors = _python_with_its_own_ray(["-c", script], ray_tmp)
    assert code == 0, out[-3000:]
    # the machine's GPUs as the local Ray counted them: none here; the driver does not pay torch's import for it
    assert "default GPUs 0.0 torch imported False" in out, out[-3000:]
    assert "ready str" in out and "result m! True" in out and "initialized after shutdown False" in out, out[-3000:]
    assert survivors == []


@pytest.mark.slow
@pytest.mark.skipif(__import__("torch").cuda.is_available(), reason="needs a machine whose PyTorch sees no GPU")
def test_a_gpu_that_pytorch_cannot_use_ends_the_job_instead_of_labeling_on_cpu(tmp_path):
    """A Ray node that offers a GPU (here a local Ray told it has one) whose GPU PyTorch cannot use (no driver, or a
    CPU-only build of PyTorch): the model actor that Ray assigned it refuses to start, and the job ends in one line
    saying what to do, rather than running the model on that node's CPU while holding its GPU (it did, silently)."""
    _images(tmp_path / "in", 2, size=(48, 64))
    script = (
        "import sys, ray\n"
        "ray.init(address='local', num_cpus=2, num_gpus=1, include_dashboard=False, log_to_driver=False)\n"
        "from fcclip_pipelines.cli import main\n"
        "code = main(sys.argv[1:])\n"
        "ray.shutdown()\n"
        "sys.exit(code)\n"
    )
    code, out, survivors = _python_with_its_own_ray(
        ["-c", script, "label", str(tmp_path / "in"), "--out", str(tmp_path / "out"), "--vocab", "cat; dog",
         "--model", "fcclip-tiny", "--weights", "random", "--gpus-per-actor", "1", "--no-progress"], _ray_tmpdir())
    assert code == 1, out[-3000:]
    last = out.strip().splitlines()[-1]
    assert last.startswith("fcclip label: error: the model actor could not start: RuntimeError: Ray assigned GPU 0 "
                           "to this model actor, but PyTorch "), last
    assert "or pass --gpus-per-actor 0 to run on CPU" in last and "Traceback" not in out, out[-3000:]
    assert not list((tmp_path / "out").glob("part-*.parquet"))
    assert survivors == []


@pytest.mark.slow
def test_ctrl_c_on_fcclip_train_is_the_commands_own(tmp_path):
    """SIGINT (Ctrl-C) to `fcclip train` once it has a checkpoint: the command's own stop, as SIGTERM's, one line and
    status 130, its checkpoints kept for --resume (Ray Train's handler, set when it trains in the main thread, aborted
    in its own words and the command ended with status 1)."""
    from fcclip.datasets.synthetic_panoptic import write_coco_panoptic

    import yaml

    from fcclip.config import train_config_path

    write_coco_panoptic(tmp_path / "data", 8, seed=0, size=(96, 128))
    config = yaml.safe_load(train_config_path("fcclip-tiny-synthetic").read_text())
    config.update(checkpoint_every=5, eval_every=0)  # a checkpoint soon
    (tmp_path / "quick.yaml").write_text(yaml.safe_dump(config))
    runs = tmp_path / "runs"

    def interrupt_at_a_checkpoint(proc):
        deadline = time.monotonic() + JOB_LIMIT_S
        while not list(runs.glob("*/checkpoint_*")):
            assert proc.poll() is None and time.monotonic() < deadline, "no checkpoint"
            time.sleep(0.2)
        proc.send_signal(signal.SIGINT)

    code, out, survivors = _python_with_its_own_ray(
        ["-m", "fcclip_pipelines", "train", "--config", str(tmp_path / "quick.yaml"), "--data", str(tmp_path / "data"),
         "--storage", str(runs), "--num-workers", "1", "--gpus-per-worker", "0", "--max-iters", "5000"],
        _ray_tmpdir(), meanwhile=interrupt_at_a_checkpoint)
    assert code == 130, out[-3000:]
    assert out.strip().splitlines()[-1] == "fcclip train: interrupted", out[-3000:]
    assert "Received SIGINT" not in out and "Traceback" not in out, out[-3000:]
    assert list(runs.glob("*/checkpoint_*/model.pth"))  # for --resume
    assert survivors == []
