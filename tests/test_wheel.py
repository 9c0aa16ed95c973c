"""The built wheel works on its own: installed into a fresh virtual environment and run from a folder outside the
repository, it lists its model presets and vocabularies and segments an image (package data included).

The fresh environment reuses this environment's installed dependencies (a .pth file adds our site-packages after
its own), but not this checkout: the test checks that the `fcclip` and `pipelines` it imports are the wheel's.
"""
import json
import os
import shutil
import subprocess
import sys
import sysconfig
import venv
import zipfile
from pathlib import Path

import pytest

import fcclip
from fcclip._paths import config_dir
from fcclip.datasets.synthetic import write_images

ROOT = Path(__file__).resolve().parent.parent

pytestmark = pytest.mark.skipif(
    subprocess.run([sys.executable, "-c", "import setuptools"], capture_output=True).returncode != 0,
    reason="building the wheel needs setuptools (pip install -e '.[test]' installs it)",
)


@pytest.fixture(scope="module")
def wheel(tmp_path_factory):
    """The wheel, built from the files cluster/Dockerfile builds it from (a copy: the checkout stays untouched)."""
    src, out = tmp_path_factory.mktemp("src"), tmp_path_factory.mktemp("dist")
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, src / name)
    for name in ("fcclip", "pipelines"):
        shutil.copytree(ROOT / name, src / name, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "--quiet", "-w", str(out),
         str(src)],
        check=True, timeout=600, cwd=out,
    )
    (path,) = out.glob("fcclip-*.whl")
    return path


def test_the_wheel_holds_the_package_data(wheel):
    names = set(zipfile.ZipFile(wheel).namelist())
    configs = config_dir()
    for path in sorted(configs.rglob("*")):
        if path.is_file():
            assert f"fcclip/configs/{path.relative_to(configs).as_posix()}" in names
    assert "fcclip/configs/models/fcclip-tiny.yaml" in names
    assert "fcclip/configs/train/fcclip-tiny-synthetic.yaml" in names
    assert "fcclip/configs/vocabularies/ade20k_150.json" in names
    assert "pipelines/cli.py" in names
    assert not [n for n in names if n.startswith(("tests/", "cluster/", "benchmarks/"))]
    assert f"fcclip-{fcclip.__version__}.dist-info/entry_points.txt" in names
    entry_points = zipfile.ZipFile(wheel).read(f"fcclip-{fcclip.__version__}.dist-info/entry_points.txt").decode()
    assert "fcclip = fcclip_pipelines.cli:main" in entry_points


@pytest.fixture(scope="module")
def installed(wheel, tmp_path_factory):
    """A fresh venv with the wheel installed (no pip inside: this environment's pip installs into it)."""
    env_dir = tmp_path_factory.mktemp("venv")
    venv.EnvBuilder(with_pip=False).create(env_dir)
    python = env_dir / "bin" / "python"
    site = Path(subprocess.check_output(
        [str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"], text=True).strip())
    # dependencies from this environment, after the venv's own site-packages (so the wheel's fcclip comes first)
    (site / "zz_test_dependencies.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    subprocess.run(
        [sys.executable, "-m", "pip", "--python", str(python), "install", "--no-deps", "--no-index", "--quiet",
         str(wheel)],
        check=True, timeout=600,
    )
    return env_dir


def _run(installed, args, cwd):
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    env["PATH"] = f"{installed / 'bin'}{os.pathsep}{env.get('PATH', '')}"
    return subprocess.run(args, capture_output=True, text=True, timeout=600, cwd=cwd, env=env)


def test_the_installed_wheel_runs_outside_the_repository(installed, tmp_path):
    work = tmp_path / "elsewhere"
    work.mkdir()
    proc = _run(installed, [str(installed / "bin" / "python"), "-c",
                            "import fcclip, fcclip_pipelines.cli; print(fcclip.__file__); print(fcclip_pipelines.cli.__file__)"],
                work)
    assert proc.returncode == 0, proc.stderr
    for line in proc.stdout.split():  # the wheel's copies, not this checkout
        assert Path(line).resolve().is_relative_to(installed.resolve()), line

    fcclip_cmd = str(installed / "bin" / "fcclip")
    proc = _run(installed, [fcclip_cmd, "models"], work)
    assert proc.returncode == 0, proc.stderr
    assert "fcclip-convnext-large" in proc.stdout and "fcclip-tiny" in proc.stdout
    proc = _run(installed, [fcclip_cmd, "vocabularies"], work)
    assert proc.returncode == 0, proc.stderr
    assert "ade20k_150" in proc.stdout and "coco_panoptic" in proc.stdout

    (image,) = write_images(work / "images", count=1, size=(64, 80))
    proc = _run(installed, [fcclip_cmd, "predict", str(image.relative_to(work)), "--vocab", "ade20k_150",
                            "--model", "fcclip-tiny", "--weights", "random", "--device", "cpu", "--out", "out"],
                work)
    assert proc.returncode == 0, proc.stderr
    record = json.loads((work / "out" / f"{image.stem}.json").read_text())
    assert (record["height"], record["width"]) == (64, 80)
    summary = json.loads((work / "out" / "panoptic.json").read_text())
    assert summary["vocabulary"]["name"] == "ade20k_150" and len(summary["categories"]) == 150
    assert not (ROOT / "out").exists()
