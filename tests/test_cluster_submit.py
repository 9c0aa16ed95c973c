"""A real Ray head (`ray start --head` on loopback, token auth, metrics served for Prometheus): `fcclip submit` of
`fcclip label` against the S3 server, and what a labeling job shows on the head's metrics endpoint and in a real
Prometheus scraping it."""
import json
import os
import re
import secrets
import shutil
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path
from types import SimpleNamespace

import promql_parser
import pytest
import yaml

from tests.catalogue import good_images
from tests.fake_cluster import kill_processes_with_token, stop_ray_start
from tests.monitoring import MONITORING, dashboard, write_rules
from tests.servers import free_port, wait_until_served

pytestmark = [pytest.mark.ray, pytest.mark.slow]
BIN = Path(sys.executable).parent
ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture
def ray_head(s3_server, tmp_path):
    """A one-node Ray cluster started with `ray start --head`, its dashboard/Job API on loopback only, its metrics
    served for Prometheus on a port of their own (reported every half second, not every ten)."""
    port, dash, metrics, agent, client = free_port(), free_port(), free_port(), free_port(), free_port()
    # token authentication on, with a token of our own (as the cluster configs in cluster/ do)
    token = secrets.token_hex(32)
    env = dict(os.environ, RAY_USAGE_STATS_ENABLED="0", RAY_AUTH_MODE="token", RAY_AUTH_TOKEN=token,
               PATH=f"{BIN}:{os.environ.get('PATH', '')}")  # the node's environment has fcclip installed
    env.pop("RAY_ADDRESS", None)
    temp = Path("/tmp") / f"rt{os.getpid()}"  # short: Ray's socket paths must stay under 107 bytes
    proc = subprocess.Popen(
        [str(BIN / "ray"), "start", "--head", "--block", f"--port={port}", "--node-ip-address=127.0.0.1",
         "--dashboard-host=127.0.0.1", f"--dashboard-port={dash}", "--num-cpus=2", "--include-dashboard=true",
         f"--metrics-export-port={metrics}", '--system-config={"metrics_report_interval_ms": 500}',
         f"--temp-dir={temp}",
         # the job agent and the Ray Client server have fixed default ports (52365, 10001), which another Ray on the
         # machine may hold (the suite runs two test files at a time): the job agent would never be ready
         f"--dashboard-agent-listen-port={agent}", f"--ray-client-server-port={client}"],
        env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True,
    )
    address = f"http://127.0.0.1:{dash}"
    try:
        # the Job API starts with the dashboard's modules, the metrics endpoint with the node
        def output() -> str:  # `ray start`'s, once it has exited (reading the pipe before would block)
            return proc.stdout.read() if proc.poll() is not None else ""

        jobs = urllib.request.Request(f"{address}/api/jobs/", headers={"Authorization": f"Bearer {token}"})
        wait_until_served(jobs, proc, 120, output)
        wait_until_served(f"http://127.0.0.1:{metrics}/metrics", proc, 120, output)
        yield SimpleNamespace(address=address, token=token, gcs=f"127.0.0.1:{port}",
                              metrics=f"http://127.0.0.1:{metrics}/metrics")
    finally:
        stop_ray_start(proc)
        kill_processes_with_token(token)  # its workers, each in a process group of its own
        shutil.rmtree(temp, ignore_errors=True)


def test_submit_label_job(ray_head, s3_bucket, capsys, tmp_path):
    gcs, (ray_head, token) = ray_head.gcs, (ray_head.address, ray_head.token)
    import boto3
    import s3fs
    import pyarrow.parquet as pq

    s3 = boto3.client("s3")
    images = good_images(4)
    for key, data in images.items():
        s3.put_object(Bucket=s3_bucket, Key=f"in/{key}", Body=data)
    env = dict(os.environ, RAY_AUTH_MODE="token", RAY_AUTH_TOKEN=token)
    # without the token the Job API refuses the submission
    refused = subprocess.run(
        [str(BIN / "fcclip"), "submit", "--address", ray_head, "--", "fcclip", "models"],
        env={k: v for k, v in env.items() if not k.startswith("RAY_AUTH")} | {"HOME": "/nonexistent"},
        capture_output=True, text=True, timeout=120,
    )
    assert refused.returncode == 2, refused.stderr
    assert refused.stderr.strip().splitlines() == [
        "fcclip submit: error: Authentication required: Unauthorized: Missing authentication token: the cluster has "
        "token authentication on; put its token in RAY_AUTH_TOKEN (or ~/.ray/auth_token) and set RAY_AUTH_MODE=token"]
    # nor does the cluster take a driver without it: one line that names the address and the token
    (tmp_path / "in").mkdir()
    (tmp_path / "in" / "a.jpg").write_bytes(next(iter(images.values())))
    joined = subprocess.run(
        [str(BIN / "fcclip"), "label", str(tmp_path / "in"), "--out", str(tmp_path / "out"), "--vocab", "cat; dog",
         "--model", "fcclip-tiny", "--weights", "random", "--address", gcs, "--no-progress"],
        env={k: v for k, v in env.items() if not k.startswith("RAY_AUTH")} | {"HOME": "/nonexistent"},
        capture_output=True, text=True, timeout=300,
    )
    errors = [line for line in joined.stderr.splitlines() if line.startswith("fcclip label: error: ")]
    assert joined.returncode == 1 and "Traceback" not in joined.stderr, joined.stderr[-3000:]
    assert len(errors) == 1 and errors[0].startswith(f"fcclip label: error: cannot join the Ray cluster at {gcs}: ")
    assert "RAY_AUTH_MODE=token" in errors[0], errors[0]
    proc = subprocess.run(
        [str(BIN / "fcclip"), "submit", "--address", ray_head, "--",
         "fcclip", "label", f"s3://{s3_bucket}/in/", "--out", f"s3://{s3_bucket}/out", "--vocab", "cat; dog; sky [stuff]",
         "--model", "fcclip-tiny", "--weights", "random", "--shard-size", "2", "--no-progress",
         "--gpus-per-actor", "0"],  # a CPU-only cluster says so: on a cluster the actors ask for a GPU by default
        env=env, capture_output=True, text=True, timeout=600,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "SUCCEEDED" in proc.stdout
    assert "labeled 4 image(s)" in proc.stdout  # the job's own summary, streamed back
    fs = s3fs.S3FileSystem()
    rows = [r for p in fs.glob(f"{s3_bucket}/out/*.parquet") for r in pq.read_table(p, filesystem=fs).to_pylist()]
    assert sorted(r["uri"] for r in rows) == sorted(f"s3://{s3_bucket}/in/{k}" for k in images)
    assert all(r["status"] == "ok" for r in rows)
    # a failing job gives a non-zero exit code
    proc = subprocess.run(
        [str(BIN / "fcclip"), "submit", "--address", ray_head, "--", "fcclip", "label", "/nonexistent/folder",
         "--out", "/tmp/never", "--vocab", "cat;", "--model", "fcclip-tiny", "--weights", "random"],
        env=env, capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode == 1 and "FAILED" in proc.stdout


def test_submit_refusals_and_ctrl_c_are_one_line(ray_head):
    """A submission id already used, and an address where no Job API answers: one line each, nothing submitted.
    Ctrl-C while following a job stops the following, not the job, and says how to follow or stop it."""
    ray_head, token = ray_head.address, ray_head.token
    env = dict(os.environ, RAY_AUTH_MODE="token", RAY_AUTH_TOKEN=token)
    submit = [str(BIN / "fcclip"), "submit", "--address", ray_head]
    first = subprocess.run([*submit, "--submission-id", "nightly-1", "--no-wait", "--", "true"], env=env,
                           capture_output=True, text=True, timeout=120)
    assert first.returncode == 0 and "submitted job nightly-1" in first.stdout, first.stderr
    again = subprocess.run([*submit, "--submission-id", "nightly-1", "--no-wait", "--", "true"], env=env,
                           capture_output=True, text=True, timeout=120)
    assert again.returncode == 2, again.stderr
    assert again.stderr.strip().splitlines() == [
        f"fcclip submit: error: the Job API at {ray_head} refused the job: ValueError: Job with submission_id "
        "nightly-1 already exists. Please use a different submission_id (HTTP 400); nothing was submitted"], again.stderr

    nowhere = subprocess.run([str(BIN / "fcclip"), "submit", "--address", f"http://127.0.0.1:{free_port()}", "--",
                              "true"], env=env, capture_output=True, text=True, timeout=120)
    assert nowhere.returncode == 1, nowhere.stderr
    lines = nowhere.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("fcclip submit: error: Failed to connect to Ray"), nowhere.stderr

    job = [sys.executable, "-c", "import time; print('job started', flush=True); time.sleep(120)"]
    # SIGINT at its default, as from a terminal (a suite run in the background passes it on ignored)
    proc = subprocess.Popen([*submit, "--submission-id", "followed", "--", *job], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, start_new_session=True,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    try:
        for line in proc.stdout:
            if "job started" in line:
                break
        proc.send_signal(signal.SIGINT)  # as Ctrl-C in the terminal sends it
        _, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    try:
        assert proc.returncode == 130, err
        assert "Traceback" not in err, err
        assert err.strip().splitlines()[-1].startswith(
            "fcclip submit: stopped following job followed; it goes on running on the cluster"), err
        # Ray's own client, in a process of its own: Ray reads the token settings once per process
        status = subprocess.run([str(BIN / "ray"), "job", "status", "followed", "--address", ray_head], env=env,
                                capture_output=True, text=True, timeout=120)
        assert "RUNNING" in status.stdout, status.stdout + status.stderr
    finally:
        subprocess.run([str(BIN / "ray"), "job", "stop", "followed", "--address", ray_head, "--no-wait"], env=env,
                       capture_output=True, timeout=120)


def _label_scraped(ray_head, stand_ins: list[str], label_args: list[str], every: float):
    """`fcclip label` with stand-in stages (tests/label_job.py) on the head, its metrics endpoint scraped every
    ``every`` seconds while it runs: (exit status, output, [(time, _scrape's dict)])."""
    env = dict(os.environ, RAY_AUTH_MODE="token", RAY_AUTH_TOKEN=ray_head.token)
    proc = subprocess.Popen(
        [sys.executable, str(Path(__file__).parent / "label_job.py"), *stand_ins, "--", *label_args,
         "--vocab", "thing;", "--address", ray_head.gcs, "--gpus-per-actor", "0", "--no-progress"],
        env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )
    scrapes = []
    try:
        while proc.poll() is None:
            scrapes.append((time.monotonic(), _scrape(ray_head.metrics)))
            time.sleep(every)
        return proc.returncode, proc.stdout.read(), scrapes
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def _scrape(url: str) -> dict:
    """The fcclip series a node's metrics agent serves: {(name, status/state/reason tag or ""): value}, of one DEST."""
    from prometheus_client.parser import text_string_to_metric_families

    with urllib.request.urlopen(url, timeout=5) as r:
        text = r.read().decode()
    found = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name.startswith("ray_fcclip_label_"):
                tags = sample.labels
                key = (sample.name, tags.get("status") or tags.get("state") or tags.get("reason") or "")
                found[key] = found.get(key, 0) + sample.value
                found["dest"] = tags["dest"]
    return found


def test_label_job_metrics_reach_prometheus(ray_head, tmp_path):
    """`fcclip label` on a cluster whose head serves metrics: the node's Prometheus endpoint shows, while the job
    runs, its model actors and the images it has left, and after it the images written (ok and error rows), the
    segments, the committed part files and the model actors replaced for a batch that hung."""
    from PIL import Image

    src = tmp_path / "in"
    src.mkdir()
    for key, data in good_images(5).items():
        (src / Path(key).name).write_bytes(data)
    Image.new("RGB", (64, 48), (255, 0, 255)).save(src / "hung-forward.png")  # the stand-in model hangs on it
    (src / "truncated.jpg").write_bytes(next(iter(good_images(1).values()))[:200])  # a real corrupt file
    dest = tmp_path / "out"
    code, out, scrapes = _label_scraped(
        ray_head, ["--hanging-model", "--model-seconds", "0.7"],
        [str(src), "--out", str(dest), "--shard-size", "3", "--chunk-size", "3", "--batch-size", "1",
         "--batch-timeout", "3"], every=0.25)
    during = [found for _, found in scrapes]
    assert code == 0, out[-3000:]
    assert "5 ok, 2 failed" in out, out[-3000:]
    after = _scrape(ray_head.metrics)
    assert after["dest"] == str(dest)
    assert after[("ray_fcclip_label_images_total", "ok")] == 5
    assert after[("ray_fcclip_label_images_total", "failed")] == 2  # the corrupt file, the image the model hung on
    assert after[("ray_fcclip_label_segments_total", "")] == 5  # the stand-in gives one segment an image
    assert after[("ray_fcclip_label_shards_committed_total", "")] == 3
    # the hung chunk's actor, then the hung image's alone (as test_label_faults counts the warnings)
    assert after[("ray_fcclip_label_model_actors_replaced_total", "timed_out")] == 2
    assert after[("ray_fcclip_label_images_left", "")] == 0
    assert after[("ray_fcclip_label_model_actors", "ready")] == 0
    assert after[("ray_fcclip_label_chunks_waiting", "")] == 0
    # while it ran: a model actor up, and images left that were neither all of them nor none
    assert max(d.get(("ray_fcclip_label_model_actors", "ready"), 0) for d in during) >= 1
    assert {d.get(("ray_fcclip_label_images_left", "")) for d in during} & set(range(1, 7)), during[-3:]
    # the Grafana dashboard's queries, the alerts' and the README's: PromQL that parses, naming only series the job
    # served
    served = {key[0] for key in after if isinstance(key, tuple)}
    assert len(served) == 7, served
    for query in _promql_of_monitoring_and_readme():
        promql_parser.parse(query.replace("$__rate_interval", "1m").replace("$dest", ".*"))
        named = set(re.findall(r"ray_fcclip_label_\w+", query))
        assert named and named <= served, (query, named - served)
    readme_names = set(re.findall(r"ray_fcclip_label_\w+", (ROOT / "README.md").read_text()))
    assert readme_names == served, readme_names ^ served  # the README's table lists what is served


def _promql_of_monitoring_and_readme() -> list[str]:
    """The queries of cluster/monitoring/ (the Grafana dashboard, the alerts) and of README's "Watching a run"."""
    board = dashboard()
    queries = [t["expr"] for p in board["panels"] for t in p["targets"]]
    variable = re.fullmatch(r"label_values\((\w+), dest\)", board["templating"]["list"][1]["definition"])
    queries.append(f"group by (dest) ({variable.group(1)})")  # what Grafana asks for the DEST menu
    text = (ROOT / "README.md").read_text()
    section = text[text.index("Watching a run from Prometheus") : text.index("Expected speed:")]
    readme = [q for q in re.findall(r"`([^`]+)`", section) if "(ray_fcclip_label_" in q or "(rate(" in q]
    rules = yaml.safe_load((MONITORING / "prometheus-rules.yaml").read_text())
    alerts = [r["expr"] for group in rules["spec"]["groups"] for r in group["rules"]]
    assert len(readme) >= 3 and len(queries) >= 10 and len(alerts) >= 3, (readme, queries, alerts)
    return queries + alerts + readme


def test_label_job_gauges_stay_while_nothing_is_written(ray_head, tmp_path):
    """Ray's agent drops a gauge that is not set again for about 20 s: through a model batch of 24 s, in which no
    row is written, the job's images left and its ready actor stay on the endpoint, scrape after scrape."""
    src = tmp_path / "in"
    src.mkdir()
    (src / "slow.jpg").write_bytes(next(iter(good_images(1).values())))
    code, out, scrapes = _label_scraped(ray_head, ["--slow-model", "24"], [str(src), "--out", str(tmp_path / "out")],
                                        every=1.0)
    assert code == 0 and "1 ok, 0 failed" in out, out[-3000:]
    # (time, images left, ready actors) per scrape, from the first that has the job's gauges
    seen = [(t, found.get(("ray_fcclip_label_images_left", "")), found.get(("ray_fcclip_label_model_actors", "ready")))
            for t, found in scrapes]
    seen = seen[next(i for i, s in enumerate(seen) if s[1] is not None):]
    busy = [s for s in seen if s[1] == 1 and s[2] == 1]  # the model working on the image, nothing written yet
    assert busy and busy[-1][0] - busy[0][0] >= 20, seen
    gaps = [s for s in seen if busy[0][0] <= s[0] <= busy[-1][0] and s not in busy]
    assert not gaps, gaps  # no scrape in between without them


PROMETHEUS = shutil.which("prometheus")


@pytest.mark.skipif(PROMETHEUS is None, reason="Prometheus not installed; on Debian: apt-get download prometheus && "
                    "dpkg -x prometheus_*.deb x && install x/usr/bin/prometheus /usr/local/bin/ (.ci/run does this)")
def test_prometheus_scrapes_a_label_job(ray_head, tmp_path):
    """A real Prometheus, scraping the head every second with cluster/monitoring/'s alerts loaded, while a job labels
    3 images, a corrupt file and an image its model hangs on, one image a chunk: it holds the job's counts, has data
    for every dashboard panel, and evaluates the alerts without error."""
    rules = write_rules(tmp_path / "fcclip.rules.yaml")
    config = tmp_path / "prometheus.yml"
    config.write_text(yaml.safe_dump({
        "global": {"scrape_interval": "1s", "evaluation_interval": "1s"}, "rule_files": [str(rules)],
        "scrape_configs": [{"job_name": "ray-head",
                            "static_configs": [{"targets": [ray_head.metrics.split("/")[2]]}]}],
    }))
    port = free_port()
    api = f"http://127.0.0.1:{port}/api/v1"
    server = subprocess.Popen(
        [PROMETHEUS, f"--config.file={config}", f"--storage.tsdb.path={tmp_path / 'tsdb'}",
         f"--web.listen-address=127.0.0.1:{port}"], stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT)

    def query(q: str) -> list:
        url = f"{api}/query?" + urllib.parse.urlencode({"query": q})
        try:
            with urllib.request.urlopen(url, timeout=10) as r:
                answer = json.load(r)
        except urllib.error.HTTPError as e:
            raise AssertionError(f"Prometheus refused {q}: {e.read().decode()[:500]}") from None
        assert answer["status"] == "success", (q, answer)
        return answer["data"]["result"]

    try:
        wait_until_served(f"http://127.0.0.1:{port}/-/ready", server, 60, every=0.5)
        src = tmp_path / "in"
        src.mkdir()
        for key, data in good_images(3).items():
            (src / Path(key).name).write_bytes(data)
        (src / "truncated.jpg").write_bytes(next(iter(good_images(1).values()))[:200])
        from PIL import Image

        Image.new("RGB", (64, 48), (255, 0, 255)).save(src / "hung-forward.png")
        dest = str(tmp_path / "out")
        code, out, _ = _label_scraped(
            ray_head, ["--hanging-model", "--model-seconds", "1.5"],
            [src.as_posix(), "--out", dest, "--chunk-size", "1", "--batch-size", "1", "--shard-size", "3",
             "--batch-timeout", "3"], every=1.0)
        assert code == 0 and "3 ok, 2 failed" in out, out[-3000:]
        selector = f'{{dest="{dest}"}}'
        deadline = time.monotonic() + 30  # scrapes after the job's end: a counter's rate needs two samples or more
        while True:
            counts = {r["metric"]["status"]: float(r["value"][1])
                      for r in query(f"sum by (status) (max_over_time(ray_fcclip_label_images_total{selector}[10m]))")}
            samples = query(f'count_over_time(ray_fcclip_label_images_total{{dest="{dest}",status="ok"}}[10m])')
            if (counts == {"ok": 3, "failed": 2} and samples and float(samples[0]["value"][1]) >= 5
                    or time.monotonic() > deadline):
                break
            time.sleep(1)
        assert counts == {"ok": 3, "failed": 2}
        shards = query(f"max_over_time(ray_fcclip_label_shards_committed_total{selector}[10m])")
        assert float(shards[0]["value"][1]) == 2
        replaced = query(f"max_over_time(ray_fcclip_label_model_actors_replaced_total{selector}[10m])")
        # the hung image's chunk is that image alone: one time-out, then its error row
        assert [(r["metric"]["reason"], float(r["value"][1])) for r in replaced] == [("timed_out", 1)]
        # while it ran: a ready actor and images left, as Prometheus recorded them
        assert float(query(f'max_over_time(ray_fcclip_label_model_actors{{dest="{dest}",state="ready"}}[10m])')[0]
                     ["value"][1]) == 1
        assert float(query(f"max_over_time(ray_fcclip_label_images_left{selector}[10m])")[0]["value"][1]) >= 3
        # every dashboard panel has data for this DEST (a rate over the minute the job ran in)
        for panel in dashboard()["panels"]:
            # Grafana fills $dest with the DEST as a regular expression (its special characters escaped), inside a
            # PromQL string (where a backslash is escaped again)
            pattern = re.escape(dest).replace("\\", "\\\\")
            expr = panel["targets"][0]["expr"].replace("$dest", pattern).replace("$__rate_interval", "1m")
            assert query(f"last_over_time(({expr})[2m:1s])"), panel["title"]
        with urllib.request.urlopen(f"{api}/rules", timeout=10) as r:
            groups = json.load(r)["data"]["groups"]
        assert [(rule["name"], rule["health"]) for g in groups for rule in g["rules"]] == [
            ("FcclipLabelStalled", "ok"), ("FcclipLabelErrorRows", "ok"), ("FcclipLabelActorsReplaced", "ok")]
    finally:
        server.terminate()
        try:
            server.wait(timeout=10)
        except subprocess.TimeoutExpired:
            server.kill()
            server.wait()
