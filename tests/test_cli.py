"""`fcclip predict` end to end, as a user runs it."""
import json
import subprocess
import sys

import numpy as np
from PIL import Image

from fcclip.cli import main
from fcclip.datasets.synthetic import write_images
from fcclip.masks import rgb2id


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
    assert "cat" in capsys.readouterr().err


def test_module_entry_point(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "fcclip", "models"], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "fcclip-convnext-large" in proc.stdout and "fcclip-tiny" in proc.stdout
    proc = subprocess.run(
        [sys.executable, "-m", "fcclip", "synth", "images", "--out", str(tmp_path / "s"), "--count", "2"],
        capture_output=True, text=True, timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    assert sorted(p.name for p in (tmp_path / "s").iterdir()) == ["synth_00000.jpg", "synth_00001.jpg"]
