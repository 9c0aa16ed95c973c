"""A user's mistake (a broken model YAML or vocabulary, a corrupt manifest, unusable weights, a device, a number or
an --out that cannot be used) ends the command with one line that names it and exit status 2, never a traceback."""
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml

from fcclip.config import ConfigError, config_dir, list_models, load_config
from fcclip.datasets.synthetic import write_images
from fcclip_pipelines.cli import main

FCCLIP = str(Path(sys.executable).with_name("fcclip"))
TINY = ["--model", "fcclip-tiny", "--weights", "random"]


def _run(argv, capsys) -> tuple[int, str]:
    """fcclip's exit status (an argparse error's too) and the error line it printed (the only one)."""
    try:
        code = main(argv)
    except SystemExit as e:  # argparse: usage, then one "error:" line
        code = e.code
    err = capsys.readouterr().err
    assert "Traceback" not in err, err
    errors = [line for line in err.splitlines() if line.startswith("fcclip") and " error: " in line]
    assert len(errors) == 1 and err.strip().splitlines()[-1] == errors[0], err  # nothing after it: one line
    return code, errors[0]


@pytest.fixture(scope="module")
def image(tmp_path_factory) -> str:
    return str(write_images(tmp_path_factory.mktemp("images"), count=1, size=(48, 64))[0])


def _predict(image, out, *more):
    return ["predict", image, "--vocab", "cat; dog", "--out", str(out), *TINY, *more]


def _tiny_yaml(path: Path, section: str, key: str, value) -> str:
    data = yaml.safe_load((config_dir() / "models" / "fcclip-tiny.yaml").read_text())
    data[section][key] = value
    path.write_text(yaml.safe_dump(data))
    return str(path)


# ---------------------------------------------------------------------------------------------------- model YAML
@pytest.mark.parametrize("content, problem", [(b"a: [\n", "invalid YAML"), (b"\xff\xfe", "not a UTF-8 text file")],
                         ids=["malformed", "not-utf8"])
def test_a_model_yaml_that_cannot_be_read(tmp_path, image, capsys, content, problem):
    (tmp_path / "m.yaml").write_bytes(content)
    code, line = _run(_predict(image, tmp_path / "out", "--model", str(tmp_path / "m.yaml")), capsys)
    assert code == 2 and "m.yaml" in line and problem in line, line


@pytest.mark.parametrize("section, key, value, problem", [
    ("head", "num_queries", "twenty", "head.num_queries: expected an int, got 'twenty'"),
    ("head", "num_queries", -1, "head.num_queries: must be a positive integer, got -1"),
    ("head", "num_queries", 2.5, "head.num_queries: expected an int"),
    ("head", "pre_norm", "no", "head.pre_norm: expected a bool"),
    ("inference", "max_size", 0, "inference.max_size: must be a positive integer"),
    ("inference", "alpha", "high", "inference.alpha: expected a float"),
    ("inference", "pixel_mean", [1, "a", 3], "inference.pixel_mean: expected 3 numbers"),
    ("clip", "model_name", 5, "clip.model_name: expected a str"),
])
def test_a_model_value_of_the_wrong_type_or_sign_is_named(tmp_path, image, capsys, section, key, value, problem):
    model = _tiny_yaml(tmp_path / "m.yaml", section, key, value)
    code, line = _run(_predict(image, tmp_path / "out", "--model", model), capsys)
    assert code == 2 and "m.yaml" in line and problem in line, line


def test_typed_values_that_fit_are_taken(tmp_path):
    """An int for a float is a float, and so is a string YAML 1.1 did not read as a number (1e-4); null where the
    field allows it; the packaged presets pass the checks."""
    config = load_config(_tiny_yaml(tmp_path / "a.yaml", "inference", "alpha", 1))
    assert config.inference.alpha == 1.0 and isinstance(config.inference.alpha, float)
    assert load_config(_tiny_yaml(tmp_path / "d.yaml", "inference", "alpha", "4e-1")).inference.alpha == 0.4
    assert load_config(_tiny_yaml(tmp_path / "b.yaml", "inference", "short_edge", None)).inference.short_edge is None
    for name in list_models():
        load_config(name)
    with pytest.raises(ConfigError, match="inference.short_edge: must be a positive integer"):
        load_config(_tiny_yaml(tmp_path / "c.yaml", "inference", "short_edge", 0))


# ---------------------------------------------------------------------------------------------------- vocabulary
@pytest.mark.parametrize("name, content, problem", [("v.txt", b"\xff\xfe\x00bad", "not a UTF-8 text file"),
                                                    ("v.yaml", b"name: [\n", "invalid YAML")],
                         ids=["not-utf8", "bad-yaml"])
def test_a_vocabulary_file_that_cannot_be_read(tmp_path, image, capsys, name, content, problem):
    (tmp_path / name).write_bytes(content)
    argv = ["predict", image, "--vocab", str(tmp_path / name), "--out", str(tmp_path / "out"), *TINY]
    code, line = _run(argv, capsys)
    assert code == 2 and name in line and problem in line, line


# ---------------------------------------------------------------------------------------------------- manifests
@pytest.mark.parametrize("name, content, problem", [
    ("m.parquet", b"junk\n", "not a readable Parquet file"),
    ("m.txt", b"\xff\xfe\x00bad\n", "not UTF-8 text"),
    ("m.csv", b"uri\n\xff\xfe\n", "not UTF-8 text"),
], ids=["parquet", "txt", "csv"])
def test_a_corrupt_manifest_is_named(tmp_path, capsys, name, content, problem):
    """The listing fails before Ray starts."""
    (tmp_path / name).write_bytes(content)
    argv = ["label", str(tmp_path / name), "--out", str(tmp_path / "d"), "--vocab", "cat; dog", *TINY,
            "--no-progress", "--num-cpus", "2"]
    code, line = _run(argv, capsys)
    assert code == 2 and f"manifest {tmp_path / name}: {problem}" in line, line


def test_relative_manifest_entries_are_relative_to_the_manifest(tmp_path, monkeypatch):
    """A local manifest's relative entries become absolute paths: an image named both ways is listed once."""
    from fcclip.vocabulary import load_vocabulary
    from fcclip_pipelines.label import LabelConfig, prepare_run
    from fcclip_pipelines.output import Destination
    from fcclip_pipelines.sources import iter_manifest, read_manifest_shard

    first, second = write_images(tmp_path / "good", count=2, size=(48, 64))
    (tmp_path / "m.txt").write_text(f"{first}\ngood/{first.name}\n./good/../good/{second.name}\n")
    monkeypatch.chdir(tmp_path)
    assert list(iter_manifest("m.txt")) == [str(first), str(first), str(second)]
    monkeypatch.chdir(tmp_path / "good")  # the manifest's folder, not the working directory, is the base
    assert list(iter_manifest("../m.txt")) == [str(first), str(first), str(second)]

    dest = Destination(str(tmp_path / "d"))
    run = prepare_run(LabelConfig(source="../m.txt", dest=dest.uri, vocab="cat; dog", model="fcclip-tiny"), dest,
                      load_config("fcclip-tiny"), load_vocabulary("cat; dog"))
    assert run["num_images"] == 2 and run["duplicate_uris"] == 1, run
    uris = [u for shard in range(len(run["shard_sizes"])) for u in read_manifest_shard(dest, shard)]
    assert sorted(uris) == [str(first), str(second)]


# ---------------------------------------------------------------------------------------------------- weights, device
def test_weights_that_are_not_a_checkpoint(tmp_path, capsys):
    weights = tmp_path / "bad.pth"
    weights.write_bytes(np.random.default_rng(0).bytes(1024))
    code, line = _run(["embed-text", "a cat", "--model", "fcclip-tiny", "--weights", str(weights)], capsys)
    assert code == 2 and f"{weights}: cannot be read" in line, line


@pytest.mark.parametrize("text, problem", [("  ", "the text is empty"),
                                           ("word " * 80, "the text is too long: in its prompts it takes up to")])
def test_a_text_that_cannot_be_embedded_as_given_is_refused(text, problem, capsys):
    """An empty text, or one the text encoder would cut (its prompts past 77 tokens): the embedding would be of another
    text; refused in one line before the model is loaded (search embeds its text the same way)."""
    code, line = _run(["embed-text", text, "--model", "fcclip-tiny", "--weights", "random"], capsys)
    assert code == 2 and problem in line, line


@pytest.mark.parametrize("device", ["nonsense", "cuda:99"])
def test_a_device_that_cannot_be_used(tmp_path, image, capsys, device):
    code, line = _run(_predict(image, tmp_path / "out", "--device", device), capsys)
    assert code == 2 and line.startswith(f"fcclip predict: error: --device {device}: "), line
    assert not (tmp_path / "out").exists()


def test_a_device_that_cannot_be_used_from_the_shell(tmp_path, image):
    """The process itself: status 2, one line on stderr."""
    done = subprocess.run([FCCLIP, *_predict(image, tmp_path / "out", "--device", "nonsense")], capture_output=True,
                          text=True, timeout=300, env={**os.environ, "PYTHONWARNINGS": "ignore"})
    assert done.returncode == 2, done.stderr
    assert done.stderr.strip().splitlines() == [done.stderr.strip()], done.stderr
    assert done.stderr.startswith("fcclip predict: error: --device nonsense: "), done.stderr


@pytest.mark.parametrize("option, value, problem", [
    ("--min-score", "2", "argument --min-score: takes a number from 0 to 1, got '2'"),
    ("--min-score", "nan", "argument --min-score: takes a finite number, got 'nan'"),
    ("--short-edge", "-5", "argument --short-edge: must be at least 0, got '-5'"),
    ("--max-size", "-1", "argument --max-size: must be at least 1, got '-1'"),
])
def test_predict_refuses_numbers_out_of_range(tmp_path, image, capsys, option, value, problem):
    code, line = _run(_predict(image, tmp_path / "out", option, value), capsys)
    assert code == 2 and line.endswith(problem), line


# ---------------------------------------------------------------------------------------------------- synth
@pytest.mark.parametrize("argv, problem", [
    (["images", "--count", "1", "--height", "0"], "argument --height: must be at least 1, got '0'"),
    (["images", "--count", "1", "--width", "-5"], "argument --width: must be at least 1, got '-5'"),
    (["images", "--count", "-1"], "argument --count: must be at least 1, got '-1'"),
    (["coco-panoptic", "--images", "1", "--size", "0", "0"], "argument --size: must be at least 1, got '0'"),
], ids=["height", "width", "count", "size"])
def test_synth_refuses_sizes_and_counts_below_one(tmp_path, capsys, argv, problem):
    code, line = _run(["synth", *argv, "--out", str(tmp_path / "s")], capsys)
    assert code == 2 and line.endswith(problem), line
    assert not (tmp_path / "s").exists()


# ---------------------------------------------------------------------------------------------------- --out, inputs
@pytest.mark.parametrize("command", ["predict", "synth"])
def test_an_out_that_is_a_file(tmp_path, image, capsys, command):
    (tmp_path / "afile").write_text("")
    argv = _predict(image, tmp_path / "afile") if command == "predict" else \
        ["synth", "images", "--count", "1", "--out", str(tmp_path / "afile")]
    code, line = _run(argv, capsys)
    assert code == 2 and line == f"fcclip {command}: error: --out {tmp_path / 'afile'} is a file, not a folder", line


def test_predict_names_an_unreadable_input_once(tmp_path, image, capsys):
    zero = tmp_path / "odd" / "zero.jpg"
    zero.parent.mkdir()
    zero.write_bytes(b"")
    assert main(["predict", str(zero), image, "--vocab", "cat; dog", "--out", str(tmp_path / "out"), *TINY]) == 1
    err = capsys.readouterr().err
    errors = [line for line in err.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and errors[0].count(str(zero)) == 1 and errors[0].startswith(f"error: {zero}: "), err
    assert (tmp_path / "out" / "panoptic.json").is_file()


def test_predict_refuses_an_unknown_protocol_before_any_image(tmp_path, image, capsys):
    """A typo in a URI's scheme ends the command in one line before the model loads, not after the images before it
    were written (a partial output and a traceback-free but late stop)."""
    code, line = _run(["predict", image, "s3x://bucket/a.jpg", "--vocab", "cat; dog", "--out", str(tmp_path / "out"),
                       *TINY], capsys)
    assert code == 2 and line == "fcclip predict: error: Protocol not known: s3x", line
    assert not (tmp_path / "out").exists()


def test_an_address_with_no_cluster_behind_it_is_one_line_before_any_listing(tmp_path, image, capsys):
    """--address where no Ray answers (a closed port: `ray.init` would wait without end) or the dashboard's HTTP
    address (`ray.init` raised a traceback): one line, exit status 1, before SOURCE is listed (DEST untouched)."""
    import socket

    import ray

    assert not ray.is_initialized()  # the check is for a process that joins a cluster
    with socket.socket() as s:  # a port nothing listens on
        s.bind(("127.0.0.1", 0))
        closed = f"127.0.0.1:{s.getsockname()[1]}"
    folder, dest = str(Path(image).parent), tmp_path / "out"
    label = ["label", folder, "--out", str(dest), "--vocab", "cat; dog", *TINY]
    code, line = _run([*label, "--address", closed], capsys)
    assert code == 1 and line.startswith(f"fcclip label: error: cannot reach the Ray cluster at {closed}: "), line
    assert "Check the address (the head's GCS, HOST:6379 by default)" in line, line
    code, line = _run([*label, "--address", "http://127.0.0.1:8265"], capsys)
    assert code == 1 and "http://127.0.0.1:8265 is the address of a cluster's dashboard / Job API" in line, line
    assert "fcclip submit --address http://127.0.0.1:8265 -- fcclip" in line, line
    assert not dest.exists()


def test_a_source_without_images_is_refused_and_nothing_is_written(tmp_path, capsys):
    """An empty folder or a typo'd prefix on a first run: one line, exit status 2, DEST not created (nor the parents
    made for it); it reported "output: DEST (a Delta table)" of nothing, which show and export then refused."""
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "notes.txt").write_text("not an image")
    dest = tmp_path / "new" / "sub" / "labels"
    label = ["label", str(tmp_path / "empty"), "--out", str(dest), "--vocab", "cat; dog", *TINY]
    code, line = _run(label, capsys)
    assert code == 2, line
    assert line == (f"fcclip label: error: {tmp_path / 'empty'}: no images there (1 file(s) without an image "
                    "extension: .jpg, .jpeg, .png, .webp, .bmp, .tif, .tiff, .gif, .jfif, .ppm, .pgm); nothing was "
                    "written"), line
    assert not (tmp_path / "new").exists()


@pytest.mark.parametrize("weights, problem", [
    (None, "fcclip-tiny's preset has no checkpoint to download: pass --weights PATH_OR_URI (a checkpoint you "
           "trained) or --weights random for a smoke run"),
    ("nope.pth", "--weights nope.pth: no such checkpoint file"),
])
def test_weights_that_cannot_be_loaded_are_refused_before_ray(tmp_path, image, capsys, weights, problem):
    """label and eval check --weights before the listing, Ray and a model actor: one line, exit 2, nothing written
    (label ended after Ray and the actor's start with status 1; eval printed Ray Data's actors' tracebacks)."""
    import ray

    assert not ray.is_initialized()
    folder, dest = str(Path(image).parent), tmp_path / "out"
    chosen = ["--model", "fcclip-tiny", *(["--weights", weights] if weights else [])]
    code, line = _run(["label", folder, "--out", str(dest), "--vocab", "cat; dog", *chosen], capsys)
    assert (code, line) == (2, f"fcclip label: error: {problem}")
    assert not dest.exists() and not ray.is_initialized()
    code, line = _run(["eval", *chosen, "--data", str(tmp_path)], capsys)
    assert (code, line) == (2, f"fcclip eval: error: {problem}")
