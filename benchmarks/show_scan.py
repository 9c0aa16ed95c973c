"""How long `fcclip show` takes to count a large labeling output, and how much memory the counting adds.

    python benchmarks/show_scan.py --files 20 --rows 10000 --segments 5

Writes a synthetic output in the documented schema (``fcclip_pipelines.output.SCHEMA``: --files part files of --rows rows,
--segments segments each with 600-character RLE strings, 2% error rows), then runs ``fcclip_pipelines.show.scan`` on it
(the counts and the seeded sample; no image is drawn) in a fresh process, and prints rows, segments, the Parquet
size, the seconds the scan took and the peak resident memory it added (sampled every 10 ms), with the CPU's model
and flags.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import fcclip_pipelines.show as show  # noqa: E402
from fcclip.vocabulary import load_vocabulary  # noqa: E402
from fcclip_pipelines.output import SCHEMA, part_name  # noqa: E402

LABELS = ["cat", "dog", "grass", "sky"]


def _part(file: int, rows: int, segments: int, rng: np.random.Generator) -> pa.Table:
    n = rows * segments
    ids = np.tile(np.arange(1, segments + 1, dtype=np.int32), rows)
    classes = rng.integers(0, len(LABELS), n)
    rle = pa.StructArray.from_arrays(
        [pa.array([[480, 640]] * n, pa.list_(pa.int32())), pa.array([os.urandom(300).hex() for _ in range(n)])],
        names=["size", "counts"],
    )
    given = {"id": pa.array(ids), "label": pa.array(np.array(LABELS)[classes]),
             "category_id": pa.array((classes + 1).astype(np.int32)), "is_thing": pa.array(classes < 2),
             "score": pa.array(rng.random(n).astype(np.float32)), "area": pa.array(np.full(n, 100, np.int64)),
             "bbox": pa.array([[0.0, 0.0, 10.0, 10.0]] * n, pa.list_(pa.float32())), "rle": rle}
    fields = list(SCHEMA.field("segments").type.value_type)  # the uncertainty fields: null, as a stand-in writes
    items = pa.StructArray.from_arrays([given.get(f.name, pa.nulls(n, f.type)) for f in fields], fields=fields)
    status = np.where(rng.random(rows) < 0.02, "error", "ok")
    uris = [f"s3://bucket/images/{file:04d}/{i:06d}.jpg" for i in range(rows)]
    columns = {
        "uri": uris, "image_id": [f"{file:08x}{i:08x}" for i in range(rows)],
        "width": pa.array(np.full(rows, 640, np.int32)), "height": pa.array(np.full(rows, 480, np.int32)),
        "status": status.tolist(), "error": [None if s == "ok" else f"not found: {u}" for s, u in zip(status, uris)],
        "segments": pa.ListArray.from_arrays(pa.array(np.arange(0, n + 1, segments, dtype=np.int32)), items),
        "model": ["bench"] * rows, "vocabulary": ["bench"] * rows, "run_id": ["bench"] * rows,
    }
    return pa.table({f.name: columns.get(f.name, pa.nulls(rows, f.type)) for f in SCHEMA}, schema=SCHEMA)


def _cpu() -> str:
    try:
        info = Path("/proc/cpuinfo").read_text()
    except OSError:
        return platform.processor() or "unknown CPU"
    model = next((line.split(":", 1)[1].strip() for line in info.splitlines() if line.startswith("model name")), "?")
    flags = next((line.split(":", 1)[1].split() for line in info.splitlines() if line.startswith("flags")), [])
    simd = [f for f in flags if f in ("sse4_2", "avx", "avx2", "avx512f", "avx512bw", "neon", "asimd")]
    return f"{model}, {os.cpu_count()} cores, flags: {' '.join(simd)}"


def _rss_kb() -> int:
    try:
        status = Path("/proc/self/status").read_text()
    except OSError:  # not Linux: the peak of the process instead
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(next(line.split()[1] for line in status.splitlines() if line.startswith("VmRSS:")))


def scan(dest: str, sample: int) -> None:
    """The measured part, run in its own process after the imports: resident memory sampled every 10 ms."""
    before, peak, done = _rss_kb(), [0], threading.Event()

    def sample_rss():
        while not done.wait(0.01):
            peak[0] = max(peak[0], _rss_kb())

    sampler = threading.Thread(target=sample_rss, daemon=True)
    sampler.start()
    start = time.perf_counter()
    report = show.scan(dest, sample=sample)
    seconds = time.perf_counter() - start
    done.set()
    sampler.join()
    added = max(peak[0], _rss_kb()) - before
    print(json.dumps({"rows": report.images, "segments": report.segments, "seconds": seconds, "added_kb": added}))


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--files", type=int, default=20)
    p.add_argument("--rows", type=int, default=10_000, help="rows per part file")
    p.add_argument("--segments", type=int, default=5, help="segments per row")
    p.add_argument("--sample", type=int, default=24)
    p.add_argument("--scan", metavar="DEST", help=argparse.SUPPRESS)  # the child process
    args = p.parse_args(argv)
    if args.scan:
        scan(args.scan, args.sample)
        return 0
    vocabulary = json.dumps(load_vocabulary("; ".join(LABELS[:2] + [f"{x} [stuff]" for x in LABELS[2:]])).to_dict())
    rng = np.random.default_rng(0)
    with tempfile.TemporaryDirectory(prefix="fcclip-showbench-") as dest:
        for file in range(args.files):
            table = _part(file, args.rows, args.segments, rng)
            table = table.replace_schema_metadata({b"fcclip.vocabulary": vocabulary.encode()})
            pq.write_table(table, f"{dest}/{part_name(file)}", compression="zstd")
        size = sum(f.stat().st_size for f in Path(dest).iterdir())
        child = subprocess.run([sys.executable, __file__, "--scan", dest, "--sample", str(args.sample)],
                               capture_output=True, text=True, check=True)
        r = json.loads(child.stdout.strip().splitlines()[-1])
    print(f"{r['rows']:,} rows, {r['segments']:,} segments, {size / 1e6:.0f} MB of Parquet in {args.files} files: "
          f"scan {r['seconds']:.1f} s, peak resident memory +{r['added_kb'] / 1024:.0f} MB")
    print(_cpu())
    return 0


if __name__ == "__main__":
    sys.exit(main())
