"""SOURCE handling: manifests are streamed, never listed or held whole; folders, globs and prefixes."""
import subprocess
import sys
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from fcclip_pipelines.output import Destination
from fcclip_pipelines.lake import plan_increment
from fcclip_pipelines.sources import SourceError, iter_source, iter_source_entries, read_manifest_shard


def write_manifest(source: str, dest: Destination, shard_size: int) -> dict:
    """The first listing of a run, as `fcclip label` makes it: an increment of an empty table."""
    return plan_increment(source, dest, {"shard_sizes": []}, shard_size, (".jpg",))


def test_manifest_of_10000_uris_on_s3_is_streamed(s3_bucket, tmp_path, monkeypatch):
    import boto3
    import fcclip_pipelines.sources as sources

    uris = [f"s3://{s3_bucket}/photos/{i:05d}.jpg" for i in range(10_000)]
    local = tmp_path / "manifest.parquet"
    # 10,000 URIs and 20 MB of other columns, uncompressed, in row groups of 1,000
    notes = [f"{i:04d}" * 512 for i in range(len(uris))]
    pq.write_table(pa.table({"uri": uris, "note": notes}), local, row_group_size=1000, compression="none")
    boto3.client("s3").upload_file(str(local), s3_bucket, "lists/manifest.parquet")

    def no_listing(*a, **k):
        raise AssertionError("the bucket was listed")

    monkeypatch.setattr(sources, "_iter_s3_prefix", no_listing)
    dest = Destination(str(tmp_path / "out"))
    summary = write_manifest(f"s3://{s3_bucket}/lists/manifest.parquet", dest, shard_size=1000)
    assert summary["shard_sizes"] == [1000] * 10 and summary["new"] == 10_000 and summary["duplicates"] == 0
    assert read_manifest_shard(dest, 3) == uris[3000:4000]

    # In a fresh process (so the peak is this job's alone): only the uri column is decoded, so Arrow never holds
    # the file's 20 MB.
    code = (
        "import sys, pyarrow as pa\n"
        "from fcclip_pipelines.output import Destination\n"
        "from fcclip_pipelines.lake import plan_increment\n"
        "plan_increment(sys.argv[1], Destination(sys.argv[2]), {'shard_sizes': []}, 1000, ('.jpg',))\n"
        "print(pa.default_memory_pool().max_memory())\n"
    )
    proc = subprocess.run(
        [sys.executable, "-c", code, f"s3://{s3_bucket}/lists/manifest.parquet", str(tmp_path / "out2")],
        capture_output=True, text=True, timeout=300, cwd=Path(__file__).parent.parent,
    )
    assert proc.returncode == 0, proc.stderr
    peak = int(proc.stdout.split()[-1])
    # (the listing's own Parquet files, written and read back around DuckDB, take ~5 MiB of Arrow memory here)
    assert peak < 8 * 2**20, f"Arrow peak {peak / 2**20:.1f} MiB"


def test_csv_and_text_manifests_with_relative_entries(tmp_path):
    (tmp_path / "a.csv").write_text("uri,label\nimgs/1.jpg,x\n/abs/2.jpg,y\n\n")
    (tmp_path / "b.txt").write_text("# comment\nimgs/3.jpg\n\ns3://bucket/4.jpg\n")
    assert [u for u, _ in iter_source(str(tmp_path / "a.csv"))] == [str(tmp_path / "imgs/1.jpg"), "/abs/2.jpg"]
    assert [u for u, _ in iter_source(str(tmp_path / "b.txt"))] == [str(tmp_path / "imgs/3.jpg"), "s3://bucket/4.jpg"]
    (tmp_path / "c.csv").write_text("path\nx.jpg\n")
    with pytest.raises(SourceError, match="no 'uri' column"):
        list(iter_source(str(tmp_path / "c.csv")))


def test_folder_glob_and_extensions(tmp_path):
    for name in ("a/1.jpg", "a/b/2.PNG", "a/notes.txt", "a/.hidden.jpg", "c/3.webp"):
        p = tmp_path / name
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_bytes(b"x")
    listed = list(iter_source(str(tmp_path)))
    assert [(u[len(str(tmp_path)) + 1 :], ok) for u, ok in listed] == [
        ("a/1.jpg", True), ("a/notes.txt", False), ("a/b/2.PNG", True), ("c/3.webp", True)]
    globbed = [u for u, _ in iter_source(str(tmp_path / "a" / "**" / "*.jpg"))]
    assert globbed == [str(tmp_path / "a" / "1.jpg")]
    with pytest.raises(SourceError):
        list(iter_source(str(tmp_path / "missing")))


def test_duplicates_are_labeled_once(tmp_path):
    (tmp_path / "m.txt").write_text("x/1.jpg\nx/2.jpg\nx/1.jpg\n")
    summary = write_manifest(str(tmp_path / "m.txt"), Destination(str(tmp_path / "out")), shard_size=10)
    assert summary["shard_sizes"] == [2] and summary["duplicates"] == 1
    assert read_manifest_shard(Destination(str(tmp_path / "out")), 0) == [str(tmp_path / "x/1.jpg"),
                                                                          str(tmp_path / "x/2.jpg")]


def test_import_fcclip_does_not_import_ray():
    import subprocess
    import sys

    code = "import fcclip, fcclip.predictor, sys; assert 'ray' not in sys.modules, 'ray imported'"
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)


def test_s3_inventory_reports(s3_bucket, tmp_path):
    """An S3 Inventory report as SOURCE: a CSV data file with a header, and a report's manifest.json naming
    headerless, gzipped CSV files (keys URL-encoded) in the inventory's bucket."""
    import datetime
    import gzip
    import json

    import boto3

    (tmp_path / "inv.csv").write_text(
        "bucket,key,size,last_modified_date,e_tag\n"
        "lake,photos/a.jpg,10,2026-12-01T10:00:00.000Z,abc\n"
        "lake,photos/b c.jpg,,,\n")
    entries = list(iter_source_entries(str(tmp_path / "inv.csv")))
    when = datetime.datetime(2026, 12, 1, 10, tzinfo=datetime.timezone.utc)
    assert [tuple(e) for e in entries] == [("s3://lake/photos/a.jpg", True, '"abc"', 10, when),
                                           ("s3://lake/photos/b c.jpg", True, None, None, None)]
    s3 = boto3.client("s3")
    s3.put_object(Bucket=s3_bucket, Key="inv/data/1.csv.gz", Body=gzip.compress(
        b'"lake","photos/x+y%2B1.jpg","7","2026-12-01T10:00:00.000Z","e1"\n'))
    s3.put_object(Bucket=s3_bucket, Key="inv/manifest.json", Body=json.dumps({
        "destinationBucket": f"arn:aws:s3:::{s3_bucket}", "fileFormat": "CSV",
        "fileSchema": "Bucket, Key, Size, LastModifiedDate, ETag", "files": [{"key": "inv/data/1.csv.gz"}]}).encode())
    entries = list(iter_source_entries(f"s3://{s3_bucket}/inv/manifest.json"))
    assert [tuple(e) for e in entries] == [("s3://lake/photos/x y+1.jpg", True, '"e1"', 7, when)]


def test_a_bucket_that_is_not_there_is_the_commands_mistake(s3_bucket):
    """A typo'd bucket: SourceError naming it (fcclip label's status 2, a bad command), not the storage error of a
    store that refuses us (status 1); an empty prefix of a bucket that is there lists nothing."""
    with pytest.raises(SourceError, match=rf"s3://{s3_bucket}-typo/photos/: no such bucket \({s3_bucket}-typo\)"):
        list(iter_source(f"s3://{s3_bucket}-typo/photos/"))
    assert list(iter_source(f"s3://{s3_bucket}/photos/")) == []
