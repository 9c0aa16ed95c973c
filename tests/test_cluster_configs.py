"""Every file in cluster/ is checked: launcher configs against Ray's own schema, KubeRay manifests for the fields
KubeRay requires and for the security rules (token auth, no inline secrets, no public endpoints), and every
command they run against fcclip's real command-line parser."""
import copy
import shlex
from pathlib import Path

import pytest
import yaml

CLUSTER = Path(__file__).parent.parent / "cluster"
LAUNCHER = sorted(CLUSTER.glob("*.yaml"))
MANIFESTS = sorted((CLUSTER / "kuberay").glob("*.yaml"))


def test_there_is_something_to_check():
    assert {p.name for p in LAUNCHER} == {"aws.yaml", "onprem.yaml"}
    assert {p.name for p in MANIFESTS} == {"raycluster.yaml", "rayjob-label.yaml", "rayjob-train.yaml"}


@pytest.mark.parametrize("path", LAUNCHER, ids=lambda p: p.name)
def test_launcher_config_is_valid_for_ray(path):
    from ray.autoscaler._private.util import prepare_config, validate_config

    config = yaml.safe_load(path.read_text())
    validate_config(prepare_config(copy.deepcopy(config)))
    broken = copy.deepcopy(config)
    broken["max_workerz"] = 3  # the schema check bites: an unknown key is refused
    with pytest.raises(Exception):
        validate_config(prepare_config(broken))


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
    assert "fcclip[ray]" in " ".join(config["setup_commands"])


def _manifest(path):
    return yaml.safe_load(path.read_text())


def _pod_specs(doc):
    spec = doc["spec"] if doc["kind"] == "RayCluster" else doc["spec"]["rayClusterSpec"]
    yield "head", spec["headGroupSpec"]
    for group in spec["workerGroupSpecs"]:
        yield group["groupName"], group


@pytest.mark.parametrize("path", MANIFESTS, ids=lambda p: p.name)
def test_kuberay_required_fields(path):
    doc = _manifest(path)
    assert doc["apiVersion"] == "ray.io/v1"
    assert doc["kind"] in ("RayCluster", "RayJob")
    assert doc["metadata"]["name"]
    if doc["kind"] == "RayJob":
        assert doc["spec"]["entrypoint"].strip()
        assert "rayClusterSpec" in doc["spec"] or "clusterSelector" in doc["spec"]
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
def test_kuberay_security(path):
    doc = _manifest(path)
    spec = doc["spec"] if doc["kind"] == "RayCluster" else doc["spec"]["rayClusterSpec"]
    assert spec["headGroupSpec"].get("serviceType", "ClusterIP") == "ClusterIP"
    containers = [c for _, g in _pod_specs(doc) for c in g["template"]["spec"]["containers"]]
    if doc["kind"] == "RayJob":
        containers += doc["spec"]["submitterPodTemplate"]["spec"]["containers"]
    for c in containers:
        env = {e["name"]: e for e in c["env"]}
        assert env["RAY_AUTH_MODE"]["value"] == "token"
        assert "secretKeyRef" in env["RAY_AUTH_TOKEN"]["valueFrom"]
        for e in c["env"]:  # nothing secret inline
            if any(w in e["name"].upper() for w in ("SECRET", "TOKEN", "KEY", "PASSWORD")):
                assert "value" not in e, e["name"]
    assert "AWS_SECRET_ACCESS_KEY:" not in path.read_text()


@pytest.mark.parametrize("path", [p for p in MANIFESTS if p.name.startswith("rayjob")], ids=lambda p: p.name)
def test_rayjob_entrypoints_parse_with_the_real_cli(path):
    from fcclip.cli import build_parser

    argv = shlex.split(_manifest(path)["spec"]["entrypoint"])
    assert argv[0] == "fcclip"
    args = build_parser().parse_args(argv[1:])
    assert args.command in ("label", "train")
    if args.command == "train":
        assert Path(args.config.replace("/opt/fcclip/", "")).name in {p.name for p in (CLUSTER.parent / "configs" / "train").glob("*.yaml")}


def test_dockerfile_installs_the_package_with_ray():
    text = (CLUSTER / "Dockerfile").read_text()
    assert 'pip install ".[ray]"' in text
    assert "FCCLIP_CONFIG_DIR=/opt/fcclip/configs" in text
    assert "COPY configs" in text and "USER ray" in text
