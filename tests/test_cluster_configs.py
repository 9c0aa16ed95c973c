"""Every file in cluster/ is checked: launcher configs against Ray's own JSON schema and their setup commands run the
way Ray runs them (`bash -c`), KubeRay manifests for the fields KubeRay requires and the security rules (token auth
through `authOptions`, no inline secrets, no public endpoints), one Ray version everywhere, the Dockerfile's layers,
and every command the manifests run against fcclip's real command-line parser."""
import copy
import json
import re
import shlex
import stat
import subprocess
import sys
import tomllib
from pathlib import Path

import jsonschema
import pytest
import ray.autoscaler
import yaml

from fcclip.config import list_train_configs, train_config_path
from fcclip_pipelines.cli import build_parser

ROOT = Path(__file__).parent.parent
CLUSTER = ROOT / "cluster"
LAUNCHER = sorted(CLUSTER.glob("*.yaml"))
MANIFESTS = sorted((CLUSTER / "kuberay").glob("*.yaml"))
RAY_SCHEMA = json.loads((Path(ray.autoscaler.__file__).parent / "ray-schema.json").read_text())


def _pyproject():
    return tomllib.loads((ROOT / "pyproject.toml").read_text())


def pinned_ray_version() -> str:
    """The one Ray version: pyproject.toml's `ray` extra pins it exactly."""
    (requirement,) = [r for r in _pyproject()["project"]["optional-dependencies"]["ray"] if r.startswith("ray")]
    match = re.fullmatch(r"ray\[[\w,]+\]==(\d+\.\d+\.\d+)", requirement.split(";")[0].strip())
    assert match, f"the ray requirement is not an exact pin: {requirement}"
    return match.group(1)


def test_there_is_something_to_check():
    assert {p.name for p in LAUNCHER} == {"aws.yaml", "onprem.yaml"}
    assert {p.name for p in MANIFESTS} == {"raycluster.yaml", "rayjob-label.yaml", "rayjob-train.yaml",
                                          "raycronjob-label.yaml"}


# ---------------------------------------------------------------------------------------------- launcher configs
@pytest.mark.parametrize("path", LAUNCHER, ids=lambda p: p.name)
def test_launcher_config_is_valid_against_rays_schema(path):
    config = yaml.safe_load(path.read_text())
    jsonschema.validate(config, RAY_SCHEMA)  # what `ray up` checks first, on the file as written
    broken = copy.deepcopy(config)
    broken["min_workers"] = 3  # the check bites: a top-level key Ray does not know is refused
    with pytest.raises(jsonschema.ValidationError, match="min_workers"):
        jsonschema.validate(broken, RAY_SCHEMA)


def _stub(path: Path, body: str) -> None:
    path.write_text("#!/bin/bash\n" + body)
    path.chmod(path.stat().st_mode | stat.S_IXUSR)


def _fake_node(tmp_path: Path) -> tuple[dict, Path, Path]:
    """A node's HOME (the checkout synced to ~/fcclip, a Ray token) and PATH, with python3, pip and aws replaced by
    stubs that record their arguments; a stub pip's install puts stub `ray` and `fcclip` beside it (in the bin/ of the
    Python that installed them, as pip does), and the stub `ray` records, for `ray start`, where the started Ray finds
    `fcclip` on its PATH (a job's entrypoint runs with that environment). Returns (env, HOME, the log)."""
    home, bin_dir, stubs, log = tmp_path / "home", tmp_path / "bin", tmp_path / "stubs", tmp_path / "calls.log"
    (home / "fcclip").mkdir(parents=True)  # where file_mounts put the checkout
    (home / ".ray").mkdir()
    (home / ".ray" / "auth_token").write_text("a-token\n")
    bin_dir.mkdir()
    stubs.mkdir()
    record = f'printf "%s\\0" "$(basename "$0")" "$@" >> {log}; printf "\\n" >> {log}\n'
    install = f'cp {stubs}/ray {stubs}/fcclip "$(dirname "$0")"/\n'
    _stub(stubs / "ray", record + 'if [ "$1" = start ]; then '
          f'echo "fcclip for ray start: $(command -v fcclip)" >> {log}; fi\n')
    _stub(stubs / "fcclip", "")
    _stub(stubs / "pip", record + f'if [ "$1" = install ]; then {install}fi\n')
    _stub(bin_dir / "python3", record + (  # `python3 -m venv DIR` makes DIR/bin/pip; `-m pip install`: as pip does
        f'if [ "$1 $2" = "-m venv" ]; then mkdir -p "$3/bin" && cp {stubs}/pip "$3/bin/"; fi\n'
        f'if [ "$1 $2 $3" = "-m pip install" ]; then {install}fi\n'))
    _stub(bin_dir / "aws", record + "echo secret-token\n")
    return {"HOME": str(home), "PATH": f"{bin_dir}:/usr/bin:/bin"}, home, log


def _calls(log: Path) -> list[list[str]]:
    return [line.split("\0")[:-1] for line in log.read_text().splitlines() if line and "\0" in line]


@pytest.mark.parametrize("path", LAUNCHER, ids=lambda p: p.name)
def test_setup_commands_work_under_bash_c(path, tmp_path):
    """Each setup command run as Ray runs it (`bash -c CMD` on the node), with python3, pip and aws replaced by stubs
    that record their arguments: every path handed to pip exists on the node (a quoted `~` would stay literal)."""
    env, home, log = _fake_node(tmp_path)
    config = yaml.safe_load(path.read_text())
    for command in config["setup_commands"]:
        proc = subprocess.run(["bash", "-c", command], env=env, capture_output=True, text=True, timeout=60)
        assert proc.returncode == 0, (command, proc.stderr)
    calls = _calls(log)
    installs = [c for c in calls if "install" in c]
    targets = [arg for c in installs for arg in c[c.index("install") + 1:] if not arg.startswith("-")]
    assert any(t.endswith("[ray]") for t in targets), calls
    for target in (t for t in targets if "/" in t or "~" in t):  # a path, not a package name
        local = re.sub(r"\[[\w,]+\]$", "", target)
        assert Path(local).is_absolute() and Path(local).exists(), f"pip would not find {target!r}"
    assert (home / ".ray" / "auth_token").read_text().strip() in ("a-token", "secret-token")


@pytest.mark.parametrize("path", LAUNCHER, ids=lambda p: p.name)
def test_the_started_ray_finds_fcclip_for_job_entrypoints(path, tmp_path):
    """After the setup commands, the head's and a worker's start commands (`bash -c`, the node's login PATH): the Ray
    they start has `fcclip` on its PATH, so that `ray job submit -- fcclip label ...` runs (it failed with
    `fcclip: not found` where Ray was started by the environment's path without it on PATH)."""
    env, home, log = _fake_node(tmp_path)
    config = yaml.safe_load(path.read_text())
    for command in config["setup_commands"]:
        assert subprocess.run(["bash", "-c", command], env=env, capture_output=True, timeout=60).returncode == 0
    for command in config["head_start_ray_commands"] + config["worker_start_ray_commands"]:
        proc = subprocess.run(["bash", "-c", command], env={**env, "RAY_HEAD_IP": "10.0.0.10"}, capture_output=True,
                              text=True, timeout=60)
        assert proc.returncode == 0, (command, proc.stderr)
    found = [line for line in log.read_text().splitlines() if line.startswith("fcclip for ray start:")]
    assert len(found) == 2, log.read_text()  # the head's, a worker's
    assert all(line.endswith("/bin/fcclip") for line in found), found


@pytest.mark.parametrize("path", LAUNCHER, ids=lambda p: p.name)
def test_launcher_config_is_secure(path):
    config = yaml.safe_load(path.read_text())
    text = path.read_text()
    starts = config["head_start_ray_commands"] + config["worker_start_ray_commands"]
    for cmd in starts:
        if "ray start" in cmd:
            assert "RAY_AUTH_MODE=token" in cmd, cmd
    head = " ".join(config["head_start_ray_commands"])
    assert "--dashboard-host=127.0.0.1" in head and "0.0.0.0" not in head
    for forbidden in ("AWS_SECRET_ACCESS_KEY", "aws_secret_access_key", "RAY_AUTH_TOKEN="):
        assert forbidden not in text


# ---------------------------------------------------------------------------------------------- KubeRay manifests
def _manifest(path):
    return yaml.safe_load(path.read_text())


def _job_spec(doc):
    """A RayJob's spec; a RayCronJob's RayJob template (KubeRay v1.6: `jobTemplate` is a RayJob spec)."""
    return {"RayJob": lambda: doc["spec"], "RayCronJob": lambda: doc["spec"]["jobTemplate"]}[doc["kind"]]()


def _cluster_spec(doc):
    return doc["spec"] if doc["kind"] == "RayCluster" else _job_spec(doc)["rayClusterSpec"]


def _pod_specs(doc):
    spec = _cluster_spec(doc)
    yield "head", spec["headGroupSpec"]
    for group in spec["workerGroupSpecs"]:
        yield group["groupName"], group


def _containers(doc):
    containers = [c for _, g in _pod_specs(doc) for c in g["template"]["spec"]["containers"]]
    if doc["kind"] != "RayCluster":
        containers += _job_spec(doc)["submitterPodTemplate"]["spec"]["containers"]
    return containers


@pytest.mark.parametrize("path", MANIFESTS, ids=lambda p: p.name)
def test_kuberay_required_fields(path):
    doc = _manifest(path)
    assert doc["apiVersion"] == "ray.io/v1"
    assert doc["kind"] in ("RayCluster", "RayJob", "RayCronJob")
    assert doc["metadata"]["name"]
    if doc["kind"] == "RayCronJob":  # a standard five-field cron schedule, as KubeRay parses it
        fields = doc["spec"]["schedule"].split()
        assert len(fields) == 5 and all(re.fullmatch(r"[\d*,/-]+", f) for f in fields), doc["spec"]["schedule"]
    if doc["kind"] != "RayCluster":
        job = _job_spec(doc)
        assert job["entrypoint"].strip()
        assert "rayClusterSpec" in job or "clusterSelector" in job
        assert job.get("ttlSecondsAfterFinished", 0) >= 0 and job.get("activeDeadlineSeconds", 1) > 0
        assert job.get("shutdownAfterJobFinishes"), "a batch job deletes its cluster when it ends"
    names = set()
    for name, group in _pod_specs(doc):
        assert isinstance(group["rayStartParams"], dict)
        containers = group["template"]["spec"]["containers"]
        assert containers and all(c["name"] and c["image"] for c in containers)
        if name != "head":
            assert name not in names
            names.add(name)
            assert 0 <= group["minReplicas"] <= group["replicas"] <= group["maxReplicas"]
    assert any(
        c["resources"]["limits"].get("nvidia.com/gpu")
        for name, g in _pod_specs(doc) if name != "head" for c in g["template"]["spec"]["containers"]
    ), "no GPU worker group"


@pytest.mark.parametrize("path", MANIFESTS, ids=lambda p: p.name)
def test_kuberay_images_are_named_for_replacement_and_pulled_explicitly(path):
    doc = _manifest(path)
    lines = path.read_text().splitlines()
    for c in _containers(doc):
        assert c["imagePullPolicy"] in ("IfNotPresent", "Always"), c["name"]
        assert not c["image"].endswith(":latest") and "/" in c["image"], c["image"]  # a registry, a fixed tag
        image_lines = [line for line in lines if line.strip().startswith(f"image: {c['image']}")]
        assert image_lines and all("REPLACE" in line for line in image_lines), "the user is told to replace it"


@pytest.mark.parametrize("path", MANIFESTS, ids=lambda p: p.name)
def test_kuberay_security(path):
    doc = _manifest(path)
    spec = _cluster_spec(doc)
    assert spec["headGroupSpec"].get("serviceType", "ClusterIP") == "ClusterIP"
    # token auth the way KubeRay's operator and autoscaler get it too: authOptions with the user's Secret
    assert spec["authOptions"] == {"mode": "token", "secretName": "fcclip-ray-token"}
    for c in _containers(doc):
        for e in c.get("env", []):  # nothing secret inline, and no token of our own beside KubeRay's
            assert e["name"] not in ("RAY_AUTH_TOKEN", "RAY_AUTH_MODE"), e["name"]
            if any(w in e["name"].upper() for w in ("SECRET", "TOKEN", "KEY", "PASSWORD")):
                assert "value" not in e, e["name"]
    assert "AWS_SECRET_ACCESS_KEY:" not in path.read_text()


@pytest.mark.parametrize("path", [p for p in MANIFESTS if p.name.startswith(("rayjob", "raycronjob"))],
                         ids=lambda p: p.name)
def test_rayjob_entrypoints_parse_with_the_real_cli(path):
    argv = shlex.split(_job_spec(_manifest(path))["entrypoint"])
    assert argv[0] == "fcclip"
    args = build_parser().parse_args(argv[1:])
    assert args.command in ("label", "train")
    if args.command == "train":  # a packaged config, found in the installed package
        assert args.config in list_train_configs()
        assert train_config_path(args.config).is_file()


def test_the_nightly_job_starts_nodes_only_for_work_and_ends_before_the_next_night():
    doc = _manifest(CLUSTER / "kuberay" / "raycronjob-label.yaml")
    minute, hour, day, month, weekday = doc["spec"]["schedule"].split()
    assert (day, month, weekday) == ("*", "*", "*") and minute.isdigit() and hour.isdigit()  # once a day
    job = _job_spec(doc)
    assert 0 < job["activeDeadlineSeconds"] < 24 * 3600  # a run never overlaps the next night's for long
    for name, group in _pod_specs(doc):  # a night with nothing to label starts no worker pod
        if name != "head":
            assert group["replicas"] == group["minReplicas"] == 0, name
    args = build_parser().parse_args(shlex.split(job["entrypoint"])[1:])
    # the same command every night: it labels what the table lacks, and asks for GPUs only when there is some
    assert args.command == "label" and not args.overwrite and args.gpus_per_actor == 1
    assert "--retry-errors" not in job["entrypoint"]  # a corrupt file would rewrite a part file every night
    # the same cluster as the one-off job, scheduled
    once = _job_spec(_manifest(CLUSTER / "kuberay" / "rayjob-label.yaml"))
    assert job["entrypoint"] == once["entrypoint"]
    assert _cluster_spec(doc)["headGroupSpec"] == once["rayClusterSpec"]["headGroupSpec"]


# ---------------------------------------------------------------------------------------------- one Ray version
def test_one_ray_version_everywhere():
    version = pinned_ray_version()
    assert version == ray.__version__, "pyproject pins another Ray than the one installed here"
    assert tuple(int(x) for x in version.split(".")) >= (2, 52, 0), "KubeRay's authOptions need Ray 2.52+"
    for path in MANIFESTS:
        assert _cluster_spec(_manifest(path))["rayVersion"] == version, path.name
    # the Dockerfile installs exactly pyproject's requirements: run its extraction step on our pyproject
    requirements = _dockerfile_requirements()
    assert f"ray[default,data,train]=={version}" in requirements
    project = _pyproject()["project"]
    extras = project["optional-dependencies"]
    assert requirements == project["dependencies"] + extras["ray"] + extras["gcs"]  # gs:// buckets on GKE too


# ---------------------------------------------------------------------------------------------- Dockerfile
def _stages():
    """The Dockerfile's stages: [(FROM line, [instructions])]."""
    stages = []
    text = (CLUSTER / "Dockerfile").read_text().replace("\\\n", " ")
    for line in text.splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        if line.startswith("FROM "):
            stages.append((line, []))
        else:
            stages[-1][1].append(line)
    return stages


def _dockerfile_requirements() -> list[str]:
    (from_line, steps), = [s for s in _stages() if s[0].endswith(" AS requirements")]
    (run,) = [s for s in steps if s.startswith("RUN python -c")]
    command = shlex.split(run[len("RUN "):].split(">")[0])
    proc = subprocess.run([sys.executable, *command[1:]], cwd=ROOT, capture_output=True, text=True, check=True)
    return proc.stdout.splitlines()


def test_dockerfile_installs_the_dependencies_then_the_wheel():
    stages = _stages()
    final = stages[-1][1]
    assert not [s for s in final if s.startswith("COPY ") and "--from=" not in s], "the image copies no source"
    deps = next(i for i, s in enumerate(final) if "pip install -r" in s)
    wheel = next(i for i, s in enumerate(final) if "--from=wheel" in s)
    assert deps < wheel, "a code edit would reinstall torch"
    assert "pip install --no-deps /tmp/dist/fcclip-*.whl" in final[wheel + 1]
    assert "USER ray" in final and not any("FCCLIP_CONFIG_DIR" in s for s in final)
    # the wheel stage builds from the package sources only; the requirements stage sees pyproject.toml alone
    (_, req_steps), = [s for s in stages if s[0].endswith(" AS requirements")]
    assert [s for s in req_steps if s.startswith("COPY")] == ["COPY pyproject.toml ."]
    (_, wheel_steps), = [s for s in stages if s[0].endswith(" AS wheel")]
    assert "RUN pip wheel --no-deps --wheel-dir /dist ." in wheel_steps


def test_dockerignore_keeps_the_context_small_but_complete():
    ignored = [line.strip() for line in (ROOT / ".dockerignore").read_text().splitlines()
               if line.strip() and not line.startswith("#")]
    assert {".git", ".venv", "tests"} <= set(ignored)
    copied = [w for _, steps in _stages() for s in steps if s.startswith("COPY ") and "--from=" not in s
              for w in s.split()[1:-1]]
    assert set(copied) == {"pyproject.toml", "README.md", "fcclip", "pipelines", "configs"}
    for path in copied:
        assert path not in ignored and (ROOT / path).exists()


def test_podmonitor_scrapes_the_port_the_heads_serve_metrics_on():
    """cluster/monitoring/podmonitor.yaml picks the Ray heads and scrapes the port named `metrics`: the one the
    RayCluster's head names for 8080, and the launcher configs' heads serve metrics on (KubeRay adds `metrics` to
    the other manifests' heads itself)."""
    monitor = _manifest(CLUSTER / "monitoring" / "podmonitor.yaml")
    assert (monitor["apiVersion"], monitor["kind"]) == ("monitoring.coreos.com/v1", "PodMonitor")
    assert monitor["spec"]["selector"]["matchLabels"] == {"ray.io/node-type": "head"}
    (endpoint,) = monitor["spec"]["podMetricsEndpoints"]
    head = _cluster_spec(_manifest(CLUSTER / "kuberay" / "raycluster.yaml"))["headGroupSpec"]
    ports = {p["name"]: p["containerPort"] for c in head["template"]["spec"]["containers"] for p in c.get("ports", [])}
    assert ports[endpoint["port"]] == 8080
    for path in LAUNCHER:
        head_start = " ".join(yaml.safe_load(path.read_text())["head_start_ray_commands"])
        assert "--metrics-export-port=8080" in head_start, path.name


def test_cluster_submit_py_runs_from_a_checkout_without_the_package_installed(tmp_path):
    """README: `python cluster/submit.py ...` is `fcclip submit` without installing the package. Here Python starts
    without site (no .pth file: the installed package's finder is not there) and finds only the environment's
    libraries on PYTHONPATH; the checkout's pipelines/ folder is the package it installs as."""
    import sysconfig

    env = {"PYTHONPATH": sysconfig.get_paths()["purelib"], "PATH": "/usr/bin:/bin", "HOME": str(tmp_path)}
    script = str(CLUSTER / "submit.py")
    bare = subprocess.run([sys.executable, "-S", "-c", "import fcclip_pipelines"], env=env, capture_output=True,
                          text=True, cwd=tmp_path, timeout=60)
    assert bare.returncode != 0 and "No module named 'fcclip_pipelines'" in bare.stderr, bare.stderr
    shown = subprocess.run([sys.executable, "-S", script, "--help"], env=env, capture_output=True, text=True,
                           cwd=tmp_path, timeout=60)
    assert shown.returncode == 0 and shown.stdout.startswith("usage: cluster/submit.py"), shown.stderr[-2000:]
    refused = subprocess.run([sys.executable, "-S", script, "--address", "http://127.0.0.1:1", "--", "fcclip",
                              "models"], env=env, capture_output=True, text=True, cwd=tmp_path, timeout=120)
    assert refused.returncode == 1, refused.stderr[-2000:]
    assert refused.stderr.startswith("fcclip submit: error: Failed to connect to Ray at address"), refused.stderr
