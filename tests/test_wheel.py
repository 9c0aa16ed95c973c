"""What users install is what is tested: the built wheel, installed into a fresh virtual environment from the package
index with only the dependencies it declares (nothing of this environment's site-packages), run from a folder
outside the repository.

1. The core install (`pip install fcclip`): `models`, `vocabularies`, `synth`, `predict`, `metrics`, `export` and
   `search`'s refusal work as README says; the commands of the Ray extra say in one line what to install.
2. The same environment given the cluster image's dependency list, built exactly as cluster/Dockerfile builds it
   (pyproject.toml's dependencies and its `ray` extra, read by the Dockerfile's own command, then the wheel with
   --no-deps and `pip check`): `fcclip label` of an S3 prefix on the loopback S3 server lists and labels it.

The environment is made with uv (from the `test` extra; the package index as pip is configured here), which
installs PyTorch's wheels in seconds from its cache instead of minutes. uv is given constraints.txt, the versions CI
installs: it pins versions and adds no package, so the test still shows that the declared dependencies suffice, and a
new release on the index cannot turn it red overnight.
"""
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import venv
import zipfile
from pathlib import Path

import pytest

import fcclip
from fcclip._paths import config_dir
from fcclip.datasets.synthetic import write_images

ROOT = Path(__file__).resolve().parent.parent
SOURCES = ("pyproject.toml", "README.md", "fcclip", "pipelines", "configs")  # what cluster/Dockerfile copies
CONSTRAINTS = ["--constraint", str(ROOT / "constraints.txt")]

pytestmark = pytest.mark.skipif(
    shutil.which("uv", path=str(Path(sys.executable).parent)) is None and shutil.which("uv") is None,
    reason="the fresh environment is built with uv: pip install -e '.[test]' installs it",
)


def _uv() -> str:
    return shutil.which("uv", path=str(Path(sys.executable).parent)) or shutil.which("uv")


@pytest.fixture(scope="module")
def wheel(tmp_path_factory):
    """The wheel, built from the files cluster/Dockerfile builds it from (a copy: the checkout stays untouched)."""
    src, out = tmp_path_factory.mktemp("src"), tmp_path_factory.mktemp("dist")
    for name in SOURCES:
        if (ROOT / name).is_dir():
            shutil.copytree(ROOT / name, src / name, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
        else:
            shutil.copy(ROOT / name, src / name)
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "--quiet", "-w", str(out),
         str(src)],
        check=True, timeout=600, cwd=out,
    )
    (path,) = out.glob("fcclip-*.whl")
    return path


def test_the_wheel_holds_the_package_data_and_only_fcclip_names(wheel):
    names = set(zipfile.ZipFile(wheel).namelist())
    configs = config_dir()
    assert configs == ROOT / "configs"  # the checkout's top-level configs/ ...
    for path in sorted(configs.rglob("*")):
        if path.is_file():  # ... is package data of the wheel's fcclip
            assert f"fcclip/configs/{path.relative_to(configs).as_posix()}" in names
    assert "fcclip/configs/models/fcclip-tiny.yaml" in names
    assert "fcclip_pipelines/cli.py" in names and "fcclip_pipelines/show/report.html" in names
    top = {n.split("/")[0] for n in names if not n.split("/")[0].endswith(".dist-info")}
    assert top == {"fcclip", "fcclip_pipelines"}, top
    # every package of the checkout is in the wheel (pyproject.toml lists them by hand)
    for package, installed in (("fcclip", "fcclip"), ("pipelines", "fcclip_pipelines")):
        for init in (ROOT / package).rglob("__init__.py"):
            assert f"{installed}/{init.relative_to(ROOT / package).as_posix()}" in names, init
    entry_points = zipfile.ZipFile(wheel).read(f"fcclip-{fcclip.__version__}.dist-info/entry_points.txt").decode()
    assert "fcclip = fcclip_pipelines.cli:run" in entry_points


@pytest.fixture(scope="module")
def fresh_env(wheel, tmp_path_factory):
    """A new virtual environment holding the wheel and the dependencies it declares, resolved from the package index:
    no site-packages of this environment."""
    env_dir = tmp_path_factory.mktemp("venv")
    venv.EnvBuilder(with_pip=False).create(env_dir)
    python = env_dir / "bin" / "python"
    subprocess.run([_uv(), "pip", "install", "--quiet", *CONSTRAINTS, "--python", str(python), str(wheel)],
                   check=True, timeout=900, env=_env(env_dir))
    return env_dir


def _env(env_dir: Path, **extra) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV", "PYTHONHOME")}
    env["PATH"] = f"{env_dir / 'bin'}{os.pathsep}{env.get('PATH', '')}"
    env.update(extra)
    return env


def _run(env_dir: Path, args: list[str], cwd: Path, timeout: float = 600, **extra):
    return subprocess.run(args, capture_output=True, text=True, timeout=timeout, cwd=cwd, env=_env(env_dir, **extra))


def _distributions(env_dir: Path) -> set[str]:
    out = _run(env_dir, [_uv(), "pip", "list", "--python", str(env_dir / "bin" / "python"), "--format", "json"],
               env_dir).stdout
    return {re.sub(r"[-_.]+", "-", d["name"]).lower() for d in json.loads(out)}


def test_the_core_install_runs_its_commands_outside_the_repository(fresh_env, tmp_path):
    installed = _distributions(fresh_env)
    assert {"torch", "pyarrow", "deltalake"} <= installed  # deltalake: the labeling output's table (export reads it)
    assert not installed & {"ray", "duckdb", "s3fs", "boto3", "pandas", "pytest", "moto"}, installed

    work = tmp_path / "elsewhere"
    work.mkdir()
    python, fcclip_cmd = str(fresh_env / "bin" / "python"), str(fresh_env / "bin" / "fcclip")
    proc = _run(fresh_env, [python, "-c", "import fcclip, fcclip_pipelines.cli, sys; print(fcclip.__file__); "
                            "print(fcclip_pipelines.cli.__file__); print(sys.prefix)"], work)
    assert proc.returncode == 0, proc.stderr
    for line in proc.stdout.split():  # the wheel's copies, not this checkout, and no other environment
        assert Path(line).resolve().is_relative_to(fresh_env.resolve()), line

    for args, expect in ((["models"], "fcclip-tiny"), (["vocabularies"], "coco_panoptic"),
                         (["metrics", "--help"], "panoptic")):
        proc = _run(fresh_env, [fcclip_cmd, *args], work)
        assert proc.returncode == 0 and expect in proc.stdout, proc.stderr

    proc = _run(fresh_env, [fcclip_cmd, "synth", "images", "--out", "images", "--count", "2", "--height", "64",
                            "--width", "80"], work)
    assert proc.returncode == 0, proc.stderr
    proc = _run(fresh_env, [fcclip_cmd, "predict", "images/synth_00000.jpg", "--vocab", "ade20k_150", "--model",
                            "fcclip-tiny", "--weights", "random", "--device", "cpu", "--out", "out"], work)
    assert proc.returncode == 0, proc.stderr
    record = json.loads((work / "out" / "synth_00000.json").read_text())
    assert (record["height"], record["width"]) == (64, 80)
    summary = json.loads((work / "out" / "panoptic.json").read_text())
    assert summary["vocabulary"]["name"] == "ade20k_150" and len(summary["categories"]) == 150
    assert (work / "out" / "synth_00000.png").is_file() and (work / "out" / "synth_00000_overlay.png").is_file()
    assert not (ROOT / "out").exists()

    # the Ray extra's commands say what to install, in one line, and touch nothing
    for args in (["label", "images", "--out", "labels", "--vocab", "cat;"], ["show", "labels", "--out", "r.html"],
                 ["search", "labels", "cat"]):
        proc = _run(fresh_env, [fcclip_cmd, *args], work)
        assert proc.returncode == 2, (args, proc.stderr)
        line, = proc.stderr.strip().splitlines()
        assert f"fcclip {args[0]} needs the Ray extra: pip install 'fcclip[ray]' (missing: " in line, line
    assert not (work / "labels").exists() and not (work / "r.html").exists()


def test_the_cluster_image_dependencies_label_an_s3_prefix(fresh_env, wheel, s3_server, s3_bucket, tmp_path):
    """cluster/Dockerfile's dependency list, made by the Dockerfile's own command from pyproject.toml, is enough for
    `fcclip label s3://...` (listing pages through botocore, reading and writing through s3fs)."""
    (command,) = re.findall(r'^RUN (python -c ".*") > requirements\.txt$', (ROOT / "cluster" / "Dockerfile").read_text(),
                            re.M)
    req_dir = tmp_path / "req"
    req_dir.mkdir()
    shutil.copy(ROOT / "pyproject.toml", req_dir / "pyproject.toml")
    proc = subprocess.run(command.replace("python -c", f"{shlex.quote(sys.executable)} -c", 1) + " > requirements.txt",
                          shell=True, cwd=req_dir, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    python = str(fresh_env / "bin" / "python")
    for args in (["install", "--quiet", *CONSTRAINTS, "-r", str(req_dir / "requirements.txt")],
                 ["install", "--quiet", "--no-deps", "--reinstall", str(wheel)], ["check"]):
        subprocess.run([_uv(), "pip", *args, "--python", python], check=True, timeout=900, env=_env(fresh_env))
    installed = _distributions(fresh_env)
    assert {"ray", "botocore", "s3fs"} <= installed and "boto3" not in installed, installed

    import boto3

    work = tmp_path / "elsewhere"
    images = write_images(work / "images", count=3, size=(48, 64))
    s3 = boto3.client("s3")
    for path in images:
        s3.upload_file(str(path), s3_bucket, f"photos/{path.name}")
    s3.put_object(Bucket=s3_bucket, Key="photos/broken.jpg", Body=b"\xff\xd8\xff\xe0 not a jpeg")

    proc = _run(fresh_env, [str(fresh_env / "bin" / "fcclip"), "label", f"s3://{s3_bucket}/photos/", "--out",
                            f"s3://{s3_bucket}/labels/", "--vocab", "cat; grass [stuff]", "--model", "fcclip-tiny",
                            "--weights", "random", "--num-cpus", "2", "--no-progress", "--summary-json", "summary.json"],
                work, timeout=600, RAY_ADDRESS="")
    assert proc.returncode == 0, proc.stderr[-3000:]
    summary = json.loads((work / "summary.json").read_text())
    assert (summary["ok"], summary["failed"]) == (3, 1), summary
    keys = [o["Key"] for o in s3.list_objects_v2(Bucket=s3_bucket, Prefix="labels/")["Contents"]]
    assert "labels/part-000000.parquet" in keys, keys

