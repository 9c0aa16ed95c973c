"""The Ray Data API (fcclip_pipelines.labeler): a user's own pipeline with `decode_images` and `FCCLIPLabeler` gives the
rows `fcclip label` gives for the same images, error rows included, and Ray Data writes them as Parquet that reads
back in the output schema."""
import shutil

import pyarrow.parquet as pq
import pytest

from fcclip.datasets.synthetic import write_images

pytestmark = pytest.mark.ray

VOCAB = "person; car; dog, puppy; grass [stuff]; sky [stuff]"


def test_map_batches_gives_the_rows_of_fcclip_label(tmp_path, ray_local, capsys):
    import ray

    from fcclip_pipelines.label import main_args
    from fcclip_pipelines.labeler import FCCLIPLabeler, decode_images
    from fcclip_pipelines.output import SCHEMA
    from fcclip_pipelines.cli import build_parser

    images = write_images(tmp_path / "in", count=5, size=(40, 56))
    shutil.copy(images[0], tmp_path / "in" / "truncated.jpg")
    with open(tmp_path / "in" / "truncated.jpg", "r+b") as f:
        f.truncate(200)  # a real corrupt file: an error row in both
    args = build_parser(["label"]).parse_args(
        ["label", str(tmp_path / "in"), "--out", str(tmp_path / "labels"), "--vocab", VOCAB, "--model", "fcclip-tiny",
         "--weights", "random", "--short-edge", "64", "--no-progress"])
    assert main_args(args) == 0
    expected = {r["uri"]: r for f in sorted((tmp_path / "labels").glob("*.parquet"))
                for r in pq.read_table(f).to_pylist()}

    (tmp_path / "in" / "notes.txt").write_text("not an image")  # read_binary_files reads it too: an error row
    # as the README writes it: decode in Ray Data's own blocks (a block of only undecodable files among them),
    # the labeler in batches of 4, an actor pool, a filter on the rows
    ds = (ray.data.read_binary_files(str(tmp_path / "in"), include_paths=True, override_num_blocks=7)
          .map_batches(decode_images, fn_kwargs={"model": "fcclip-tiny", "short_edge": 64})
          .map_batches(FCCLIPLabeler, fn_constructor_kwargs={"vocab": VOCAB, "model": "fcclip-tiny",
                                                             "weights": "random", "run_id": "mine"},
                       batch_size=4, compute=ray.data.ActorPoolStrategy(min_size=1, max_size=1), num_cpus=1)
          .materialize())
    ds.write_parquet(str(tmp_path / "mine"))
    ds.filter(expr="status == 'ok'").write_parquet(str(tmp_path / "ok"))
    assert pq.read_table(tmp_path / "ok").schema.remove_metadata().equals(SCHEMA.remove_metadata())
    assert pq.read_table(tmp_path / "ok").column("status").to_pylist() == ["ok"] * 5
    rows = {r["uri"]: r for r in pq.read_table(tmp_path / "mine").to_pylist()}
    notes = rows.pop(str(tmp_path / "in" / "notes.txt"))
    assert notes["status"] == "error" and "ImageDecodeError" in notes["error"], notes

    assert sorted(rows) == sorted(expected) and len(rows) == 6
    assert pq.read_table(tmp_path / "mine").schema.remove_metadata().equals(SCHEMA.remove_metadata())
    for uri, want in expected.items():
        got = rows[uri]
        assert got["run_id"] == "mine"
        for key in ("image_id", "width", "height", "status", "error", "model", "vocabulary"):
            assert got[key] == want[key], (uri, key)
        # the same segments, masks to the pixel; scores up to float32 rounding (batches of other sizes)
        assert [{**s, "score": None} for s in got["segments"]] == [{**s, "score": None} for s in want["segments"]]
        assert [s["score"] for s in got["segments"]] == pytest.approx([s["score"] for s in want["segments"]],
                                                                      abs=1e-5)
    bad = rows[str(tmp_path / "in" / "truncated.jpg")]
    assert bad["status"] == "error" and bad["segments"] == []
    assert sum(len(r["segments"]) for r in rows.values()) > 0
