"""The `fcclip` command (pipelines/cli.py): `fcclip predict` end to end as a user runs it, one protocol for every
subcommand, --version, and what each invocation imports."""
import argparse
import ast
import json
import os
import subprocess
import sys
from importlib import metadata
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import fcclip
from fcclip.datasets.synthetic import write_images
from fcclip.masks import rgb2id
from fcclip_pipelines.cli import COMMANDS, build_parser, load_command, main

ROOT = Path(__file__).resolve().parent.parent


def test_predict_end_to_end(tmp_path, capsys):
    images = write_images(tmp_path / "images", count=2, size=(90, 120))
    broken = tmp_path / "images" / "broken.jpg"
    broken.write_bytes(images[0].read_bytes()[:100])
    out = tmp_path / "out"
    code = main(
        ["predict", *map(str, images), str(broken), "--vocab", "cat; dog, puppy; grass [stuff]",
         "--model", "fcclip-tiny", "--weights", "random", "--device", "cpu", "--out", str(out)]
    )
    assert code == 1  # one input failed ...
    err = capsys.readouterr().err
    assert "broken.jpg" in err
    for path in images:  # ... and the others are all there
        record = json.loads((out / f"{path.stem}.json").read_text())
        assert (record["height"], record["width"]) == (90, 120)
        ids = rgb2id(np.asarray(Image.open(out / record["file_name"]).convert("RGB")))
        assert set(np.unique(ids)) - {0} == {s["id"] for s in record["segments_info"] if s["area"]}
        for s in record["segments_info"]:
            assert (ids == s["id"]).sum() == s["area"]
            assert s["label"] in ("cat", "dog", "grass")
        overlay = Image.open(out / f"{path.stem}_overlay.png")
        assert overlay.size == (120, 90)
    summary = json.loads((out / "panoptic.json").read_text())
    assert len(summary["annotations"]) == 2
    assert [c["name"] for c in summary["categories"]] == ["cat", "dog", "grass"]
    assert summary["weights"] == "random"


def test_bad_vocabulary_is_a_clear_error(tmp_path, capsys):
    images = write_images(tmp_path / "images", count=1, size=(32, 32))
    code = main(["predict", str(images[0]), "--vocab", "cat; cat", "--model", "fcclip-tiny", "--weights", "random",
                 "--out", str(tmp_path / "out")])
    assert code == 2
    err = capsys.readouterr().err
    assert err.startswith("fcclip predict: error:") and "cat" in err
    assert not (tmp_path / "out").exists()  # nothing written for a command that never ran
    # the vocabulary is read before the model is built: its mistake is the one reported, not the weights'
    code = main(["predict", str(images[0]), "--vocab", "cat;;", "--model", "fcclip-tiny",
                 "--weights", str(tmp_path / "missing.pth"), "--out", str(tmp_path / "out")])
    assert code == 2
    err = capsys.readouterr().err
    assert err.startswith("fcclip predict: error: empty class") and "missing.pth" not in err, err


def test_warnings_are_one_line(tmp_path):
    """A warning of a command is one line on stderr ("warning: ..."), not Python's file, line and source line."""
    images = write_images(tmp_path / "images", count=1, size=(32, 32))
    proc = subprocess.run(
        [sys.executable, "-m", "fcclip_pipelines", "predict", str(images[0]), "--vocab", "cat; sky [stuff]",
         "--model", "fcclip-tiny", "--weights", "random", "--device", "cpu", "--out", str(tmp_path / "out")],
        capture_output=True, text=True, timeout=300, cwd=tmp_path,
    )
    assert proc.returncode == 0, proc.stderr
    assert "warning: fcclip-tiny: random weights; masks and labels are meaningless" in proc.stderr.splitlines()[0]
    assert "UserWarning" not in proc.stderr and ".py:" not in proc.stderr, proc.stderr


def test_unknown_model_preset_lists_the_presets(tmp_path, capsys):
    code = main(["predict", "x.jpg", "--vocab", "cat;", "--model", "fcclip-tinny", "--out", str(tmp_path / "o")])
    assert code == 2
    err = capsys.readouterr().err
    assert "unknown model preset 'fcclip-tinny'" in err and "fcclip-tiny" in err


def test_every_subcommand_follows_one_protocol():
    """A module per subcommand with add_arguments(parser) and main_args(args) -> int, whatever layer it is in."""
    assert {"predict", "label", "show", "train", "eval", "metrics", "submit", "synth", "models",
            "vocabularies"} <= set(COMMANDS)
    for name in COMMANDS:
        module = load_command(name)
        assert callable(module.add_arguments) and callable(module.main_args), name
        parser = argparse.ArgumentParser(prog=f"fcclip {name}")
        module.add_arguments(parser)  # fills a parser of its own, registers nothing elsewhere
    # the full parser (every module imported) knows them all
    args = build_parser().parse_args(["metrics", "semantic", "--gt-dir", "g", "--pred-dir", "p", "--num-classes", "3"])
    assert (args.command, args.metric, args.num_classes) == ("metrics", "semantic", 3)
    # every option of every command (and of their own subcommands) says what it does in --help
    undocumented, parsers = [], [("fcclip", build_parser())]
    while parsers:
        prog, parser = parsers.pop()
        for action in parser._actions:
            if isinstance(action, argparse._SubParsersAction):
                parsers += [(f"{prog} {name}", sub) for name, sub in action.choices.items()]
            elif action.option_strings and not action.help:
                undocumented.append(f"{prog} {action.option_strings[-1]}")
    assert not undocumented, undocumented


def test_models_and_vocabularies_list_the_package_data(capsys):
    assert main(["models"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert [line.split()[0] for line in lines] == fcclip.list_models()
    assert any(line.startswith("fcclip-convnext-large ") and "released checkpoint" in line for line in lines)
    assert main(["vocabularies"]) == 0
    out = capsys.readouterr().out
    assert "ade20k_150           150 classes" in out and "coco_panoptic        133 classes, 80 things" in out


def test_version(capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["--version"])
    assert exit_.value.code == 0
    assert capsys.readouterr().out.strip() == f"fcclip {fcclip.__version__}"
    # one version: the package metadata is built from fcclip.__version__
    assert metadata.version("fcclip") == fcclip.__version__


@pytest.mark.parametrize("argv, usage, error", [
    (["label", "in/", "--out", "out", "--vocab", "a; b", "--bacth-size", "2"], "usage: fcclip label ",
     "fcclip label: error: unrecognized arguments: --bacth-size 2 (did you mean --batch-size?)"),
    (["review", "pick", "out", "--count", "5", "--exlude=old.jsonl"], "usage: fcclip review pick ",
     "fcclip review pick: error: unrecognized arguments: --exlude=old.jsonl (did you mean --exclude?)"),
    (["models", "extra"], "usage: fcclip models ", "fcclip models: error: unrecognized arguments: extra"),
])
def test_a_mistyped_option_is_named_by_its_command(argv, usage, error, capsys):
    """A word the command does not take: the usage and error line of that (sub)command, not of `fcclip` itself, and
    the closest option it does take."""
    with pytest.raises(SystemExit) as exit_:
        main(argv)
    assert exit_.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith(usage) and err.splitlines()[-1] == error, err


def _run_python(code: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, cwd=ROOT)


def test_a_mistyped_training_config_is_refused_before_torch_and_ray_load(tmp_path):
    """`fcclip train --config` naming no file and no packaged config: one line, status 2, at once (the training
    module, with PyTorch, Ray Train and open_clip, took 8-14 s to import before the config was looked at)."""
    code = (
        "import sys\n"
        "from fcclip_pipelines.cli import main\n"
        f"missing = {str(tmp_path / 'tiny.yml')!r}\n"
        "assert main(['train', '--config', missing, '--data', 'x', '--storage', 'y']) == 2\n"
        "assert main(['train', '--config', 'fcclip-tiny-synthetc', '--data', 'x', '--storage', 'y']) == 2\n"
        "loaded = [m for m in ('torch', 'ray', 'open_clip', 'fcclip_pipelines.train') if m in sys.modules]\n"
        "assert not loaded, loaded\n"
    )
    proc = _run_python(code)
    assert proc.returncode == 0, proc.stderr
    assert proc.stderr.splitlines() == [
        f"fcclip train: error: config file not found: {tmp_path / 'tiny.yml'}",
        "fcclip train: error: unknown training config 'fcclip-tiny-synthetc': not a file, and not one of "
        "fcclip-convnext-large-coco, fcclip-tiny-synthetic"], proc.stderr


def test_help_and_models_do_not_import_torch():
    code = (
        "import sys\n"
        "from fcclip_pipelines.cli import main\n"
        "try:\n"
        "    main(['--help'])\n"
        "except SystemExit as e:\n"
        "    assert e.code == 0\n"
        "assert 'torch' not in sys.modules, 'fcclip --help imported torch'\n"
        "assert main(['models']) == 0\n"
        "assert 'torch' not in sys.modules, 'fcclip models imported torch'\n"
        "assert 'ray' not in sys.modules, 'ray imported'\n"
    )
    proc = _run_python(code)
    assert proc.returncode == 0, proc.stderr
    assert "COMMAND" in proc.stdout and "predict" in proc.stdout and "fcclip-tiny" in proc.stdout
    # and the check bites: a command that does need torch shows up in it
    proc = _run_python("import sys\nfrom fcclip_pipelines.cli import load_command\nload_command('predict')\n"
                       "assert 'torch' not in sys.modules")
    assert proc.returncode != 0 and "AssertionError" in proc.stderr


def test_import_fcclip_does_not_import_ray():
    proc = _run_python("import sys, fcclip, fcclip.build, fcclip.predictor, fcclip.checkpoint, fcclip.metrics, "
                       "fcclip.training\nassert 'ray' not in sys.modules, 'ray imported'\n"
                       "assert not [m for m in sys.modules if m.startswith('fcclip_pipelines')], 'fcclip_pipelines imported'")
    assert proc.returncode == 0, proc.stderr


def test_fcclip_never_imports_pipelines():
    """The dependency points one way: no module of the library imports the command-line / Ray layer."""
    offenders = []
    for path in sorted((ROOT / "fcclip").rglob("*.py")):
        tree = ast.parse(path.read_text(), str(path))
        for node in ast.walk(tree):
            names = []
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0:
                names = [node.module or ""]
            elif isinstance(node, ast.Constant) and isinstance(node.value, str):
                names = [node.value] if node.value.startswith("fcclip_pipelines.") else []
            offenders += [f"{path.relative_to(ROOT)}:{node.lineno}: {n}" for n in names
                          if n == "fcclip_pipelines" or n.startswith("fcclip_pipelines.")]
    assert not offenders, offenders


def test_a_missing_ray_extra_is_named(tmp_path):
    """Without Ray installed (a real ImportError: the package is made unimportable in that interpreter), the Ray
    subcommands say what to install; the others still work."""
    code = (
        "import sys\n"
        "sys.modules['ray'] = None  # what an environment without the extra looks like to `import ray`\n"
        "from fcclip_pipelines.cli import main\n"
        "assert main(['train', '--config', 'fcclip-tiny-synthetic', '--data', 'd', '--storage', 's']) == 2\n"
        "assert main(['label', 'images/', '--out', 'o', '--vocab', 'cat;']) == 2\n"
        "assert main(['models']) == 0\n"
    )
    proc = _run_python(code)
    assert proc.returncode == 0, proc.stderr
    for name in ("train", "label"):
        assert f"fcclip {name} needs the Ray extra: pip install 'fcclip[ray]' (missing: ray" in proc.stderr
    assert not (ROOT / "o").exists()


def test_module_entry_point(tmp_path):
    proc = subprocess.run(
        [sys.executable, "-m", "fcclip_pipelines", "synth", "images", "--out", str(tmp_path / "s"), "--count", "2"],
        capture_output=True, text=True, timeout=120, cwd=ROOT,
    )
    assert proc.returncode == 0, proc.stderr
    assert sorted(p.name for p in (tmp_path / "s").iterdir()) == ["synth_00000.jpg", "synth_00001.jpg"]


@pytest.mark.parametrize("argv", [
    ["label", "s3://lake/photos/", "--out", "s3://lake/labels/", "--vocab", "cat;", "--no-progress"],
    ["show", "s3://lake/labels/", "--out", "report.html"],
])
def test_unreachable_storage_is_one_line_not_a_traceback(argv, monkeypatch, tmp_path, capsys):
    import socket

    s3fs = pytest.importorskip("s3fs")
    with socket.socket() as s:  # a port nothing listens on: connections are refused
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    monkeypatch.setenv("AWS_ENDPOINT_URL", f"http://127.0.0.1:{port}")
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "k")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "s")
    monkeypatch.setenv("AWS_MAX_ATTEMPTS", "1")
    monkeypatch.chdir(tmp_path)
    # fsspec caches filesystems by their arguments, not the environment: start without one, leave none behind
    s3fs.S3FileSystem.clear_instance_cache()
    try:
        assert main(argv) == 1
    finally:
        s3fs.S3FileSystem.clear_instance_cache()
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith(f"fcclip {argv[0]}: error: storage: ") and f"127.0.0.1:{port}" in err[-1], err
    assert not any("Traceback" in line for line in err)


def test_ctrl_c_is_one_line_not_a_traceback(tmp_path):
    """A command blocked on a read (its input image is a named pipe that never gets data) gets SIGINT, as Ctrl-C
    sends it: one line, exit status 130, no traceback. (`fcclip label` stopped mid-run: test_label_faults.)"""
    import errno
    import os
    import signal
    import time

    fifo = tmp_path / "photo.jpg"
    os.mkfifo(fifo)
    argv = ["predict", str(fifo), "--model", "fcclip-tiny", "--weights", "random", "--vocab", "cat; dog", "--out",
            str(tmp_path / "out")]
    # as from a terminal: SIGINT not ignored (a suite started in the background, `make test &`, passes SIG_IGN on,
    # and Python then leaves Ctrl-C ignored)
    proc = subprocess.Popen([sys.executable, "-m", "fcclip_pipelines", *argv], cwd=ROOT,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    writer = None
    try:
        deadline = time.monotonic() + 120
        while writer is None:  # the write end opens without blocking once the command has the pipe open to read
            assert proc.poll() is None and time.monotonic() < deadline, proc.communicate(timeout=5)
            try:
                writer = os.open(fifo, os.O_WRONLY | os.O_NONBLOCK)  # held open: the command's read waits for data
            except OSError as e:
                if e.errno != errno.ENXIO:
                    raise
                time.sleep(0.05)
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
        if writer is not None:
            os.close(writer)
    assert proc.returncode == 130, err
    assert "Traceback" not in err, err
    assert err.strip().splitlines()[-1] == "fcclip predict: interrupted", err


def test_sigterm_to_a_ray_job_is_one_line_and_its_local_ray_stops(tmp_path):
    """SIGTERM (`ray job stop`, a pod stopped) to a command that started a local Ray, here `fcclip train` waiting for
    a GPU this Ray lacks: exit 128 + 15 and one line, where Ray's own handler printed a C++ stack dump, aborted (exit
    134) and left the local Ray it had started running. (`fcclip label` has its own stop handling: test_label.)"""
    import os
    import signal
    import time

    from fcclip.datasets.synthetic_panoptic import write_coco_panoptic
    from tests.test_label_faults import _end_processes, _ray_pids, _ray_tmpdir, _remove_tree

    write_coco_panoptic(tmp_path / "coco", 2, size=(64, 80))
    ray_tmp = _ray_tmpdir()
    argv = ["train", "--config", "fcclip-tiny-synthetic", "--data", str(tmp_path / "coco"), "--storage",
            str(tmp_path / "runs"), "--num-workers", "1", "--gpus-per-worker", "1", "--gpu-wait", "300",
            "--max-iters", "1", "--num-cpus", "1"]
    proc = subprocess.Popen([sys.executable, "-m", "fcclip_pipelines", *argv], cwd=ROOT, stderr=subprocess.PIPE,
                            text=True, start_new_session=True, env={**os.environ, "RAY_TMPDIR": ray_tmp})
    try:
        lines = []
        for line in proc.stderr:  # asked for, not grantable: the job waits
            lines.append(line)
            if "training workers: 1 x 1 GPU" in line:
                break
        time.sleep(2)
        proc.send_signal(signal.SIGTERM)
        err = "".join(lines) + proc.stderr.read()
        code = proc.wait(timeout=120)
        deadline = time.monotonic() + 30  # the Ray processes it started go with it
        while time.monotonic() < deadline and _ray_pids(ray_tmp):
            time.sleep(0.5)
        left = _ray_pids(ray_tmp)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        _end_processes(ray_tmp)
        _remove_tree(ray_tmp)
    assert code == 128 + signal.SIGTERM, err
    assert err.strip().splitlines()[-1] == "fcclip train: stopped by SIGTERM", err
    assert "Traceback" not in err and "SIGTERM received" not in err, err
    assert not left, left


def test_local_training_log_holds_no_state_api_warnings(tmp_path):
    """`fcclip train` on a local Ray, as a user runs it: Ray Train asks Ray's State API every second whether the run's
    controller lives, and a local Ray without its dashboard has no State API: half the log's lines were that
    warning. The local Ray now has its dashboard. Another local Ray runs beside it (a second fcclip command on the
    same laptop): Ray Train's placement-group cleaner, which looks its cluster up from inside a worker, found both
    and died with a traceback in the log ("Found multiple active Ray instances")."""
    from fcclip.datasets.synthetic_panoptic import write_coco_panoptic

    write_coco_panoptic(tmp_path / "coco", 2, size=(64, 80))
    argv = ["train", "--config", "fcclip-tiny-synthetic", "--data", str(tmp_path / "coco"), "--storage",
            str(tmp_path / "runs"), "--num-workers", "1", "--gpus-per-worker", "0", "--max-iters", "30",
            "--num-cpus", "2"]
    beside = subprocess.Popen(
        [sys.executable, "-c", "import ray, time; ray.init(address='local', num_cpus=1, include_dashboard=False); "
         "print('up', flush=True); time.sleep(600)"],
        stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, start_new_session=True)
    try:
        assert beside.stdout.readline().strip() == "up"
        proc = subprocess.run([sys.executable, "-m", "fcclip_pipelines", *argv], cwd=ROOT, capture_output=True,
                              text=True, timeout=600)
    finally:
        beside.terminate()  # its Ray shuts down on the way out
        beside.wait(timeout=60)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "trained to iteration 30" in proc.stdout and "final checkpoint:" in proc.stdout, proc.stdout
    assert "Failed to query Ray Train Controller" not in proc.stderr, proc.stderr[-3000:]
    assert "multiple active Ray instances" not in proc.stderr and "Traceback" not in proc.stderr, proc.stderr[-3000:]


def test_a_uri_whose_file_system_is_missing_or_unknown_is_one_line(tmp_path, capsys):
    """`gs://` without gcsfs (or any protocol whose fsspec package is not installed), and a protocol fsspec does not
    know: one line naming what to install, exit status 2, nothing written, for a source and for a destination."""
    import importlib.util

    from fsspec.registry import known_implementations

    missing = next(p for p, impl in sorted(known_implementations.items())  # abfs, where adlfs is not installed
                   if p in ("abfs", "gs", "oci") and importlib.util.find_spec(impl["class"].split(".")[0]) is None)
    write_images(tmp_path / "in", count=1, size=(32, 40))
    common = ["--vocab", "cat;", "--model", "fcclip-tiny", "--weights", "random", "--no-progress"]
    for argv, expected in [
        (["label", f"{missing}://bucket/photos/", "--out", str(tmp_path / "out"), *common], "install"),
        (["label", str(tmp_path / "in"), "--out", f"{missing}://bucket/labels", *common], "install"),
        (["label", "nosuch://bucket/photos/", "--out", str(tmp_path / "out"), *common], "protocol not known: nosuch"),
        (["export", f"{missing}://bucket/labels", "--format", "coco-panoptic", "--out", str(tmp_path / "coco")],
         "install"),
    ]:
        assert main(argv) == 2, argv
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith(f"fcclip {argv[0]}: error: ") and expected in err[0].lower(), err
    assert not (tmp_path / "out").exists() and not (tmp_path / "coco").exists()


LABEL = ["label", "SRC", "--out", "OUT", "--vocab", "cat"]


@pytest.mark.parametrize("argv, message", [
    ([*LABEL, "--shard-size", "0"], "--shard-size: must be at least 1, got '0'"),
    ([*LABEL, "--shard-size", "-3"], "--shard-size: must be at least 1"),
    ([*LABEL, "--decode-timeout", "-1"], "--decode-timeout: must be more than 0"),
    ([*LABEL, "--batch-timeout", "-5"], "--batch-timeout: must be at least 0"),
    ([*LABEL, "--gpus-per-actor", "-1"], "--gpus-per-actor: must be at least 0"),
    ([*LABEL, "--num-cpus", "0"], "--num-cpus: must be at least 1"),
    ([*LABEL, "--min-score", "2"], "--min-score: takes a number from 0 to 1"),
    ([*LABEL, "--min-score", "nan"], "--min-score: takes a finite number"),
    ([*LABEL, "--batch-size", "0"], "--batch-size: must be at least 1"),
    ([*LABEL, "--chunk-size", "1.5"], "--chunk-size: takes a whole number"),
    (["relabel", "SRC", "--out", "OUT", "--vocab", "cat", "--min-score", "-0.1"], "--min-score: takes a number from 0"),
    (["eval", "--model", "m", "--data", "SRC", "--batch-size", "0"], "--batch-size: must be at least 1"),
    (["train", "--config", "c", "--data", "SRC", "--storage", "S", "--num-workers", "0"], "--num-workers: must be at"),
    (["review", "pick", "SRC", "--count", "0"], "--count: must be at least 1"),
])
def test_numbers_out_of_range_are_refused_before_anything_runs(argv, message, tmp_path, capsys, monkeypatch):
    """A number a command cannot use (a shard of 0 images, a negative time limit, a score above 1) is refused as
    argparse refuses a word: status 2, the argument named, nothing read or written."""
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit) as exit_:
        main(argv)
    assert exit_.value.code == 2
    err = capsys.readouterr().err
    assert f"error: argument {message}" in err and "Traceback" not in err, err
    assert list(tmp_path.iterdir()) == []


def test_a_job_started_with_sigint_ignored_keeps_ignoring_it():
    """A shell starts a background job (`fcclip label ... &`) with SIGINT ignored, so that a Ctrl-C at the terminal
    is not for it: the job's stop handler leaves an ignored signal ignored (SIGTERM, not ignored, still stops it)."""
    import os
    import signal
    import time

    from fcclip_pipelines.runtime import StopSignals

    before = signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        with StopSignals("the test") as stop:
            assert signal.getsignal(signal.SIGINT) is signal.SIG_IGN
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(0.05)
            assert stop.received is None
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(0.05)
            assert stop.received is signal.SIGTERM
        assert signal.getsignal(signal.SIGINT) is signal.SIG_IGN
    finally:
        signal.signal(signal.SIGINT, before)


def test_this_machines_gpu_is_found_without_torch(tmp_path, monkeypatch):
    """The local default for --gpus-per-actor / --gpus-per-worker: the GPUs the NVIDIA driver lists (read from the
    machine, not from what a Ray cluster holds at that moment), none where CUDA_VISIBLE_DEVICES hides them."""
    from fcclip_pipelines import runtime

    gpus = tmp_path / "gpus"
    gpus.mkdir()
    monkeypatch.setattr(runtime, "NVIDIA_GPUS", str(gpus))
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    assert runtime.default_gpus(None) == (1.0 if os.path.exists("/dev/kfd") and runtime.machine_has_gpu() else 0.0)
    (gpus / "0000:01:00.0").mkdir()
    assert runtime.default_gpus(None) == 1.0 and runtime.default_gpus("10.0.0.1:6379") == 1.0
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")
    assert runtime.default_gpus(None) == 0.0
