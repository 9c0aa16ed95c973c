"""`fcclip review merge` at N and 10N rows: time, rows/s and peak memory.

A labeling output of N rows is written (part files of `--rows-per-file`; each row with `--segments` segments whose
RLE strings are as long as a real 640x480 image's, and the uncertainty columns), and a reviewed output of
`--reviewed` of its images (spread over the part files, as a night's review is). Then `review.merge(DEST, REVIEWED,
MERGED)` runs in a fresh process, whose wall time and peak resident memory (ru_maxrss, imports included) are
reported. Merge reads every row of DEST and writes it again: this is the cost of one night's merge.

    .venv/bin/python benchmarks/review_merge.py --out out/merge --rows 100000 --scale 10
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pyarrow as pa

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

CHILD = """
import resource, sys, time
from fcclip_pipelines import review
t = time.perf_counter()
counts = review.merge(sys.argv[1], sys.argv[2], sys.argv[3])
print(time.perf_counter() - t, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, counts["replaced"])
"""


def _rows(start: int, n: int, segments: int, rng, schema: pa.Schema, extra: dict | None = None) -> pa.Table:
    labels = ["cat", "dog", "grass"]
    segs = [[{"id": k + 1, "label": labels[k % 3], "category_id": k % 3 + 1, "is_thing": k % 3 < 2,
              "score": float(rng.random()), "area": int(rng.integers(100, 50_000)),
              "bbox": [float(v) for v in rng.integers(0, 400, 4)],
              "rle": {"size": [480, 640], "counts": "".join(chr(48 + int(c)) for c in rng.integers(0, 60, 180))}}
             for k in range(segments)] for _ in range(n)]
    columns = {f.name: pa.nulls(n, f.type) for f in schema}
    columns.update(
        uri=pa.array([f"s3://bucket/images/{i:09d}.jpg" for i in range(start, start + n)]),
        image_id=pa.array([f"{i:016x}" for i in range(start, start + n)]), status=pa.array(["ok"] * n),
        width=pa.array(np.full(n, 640, np.int32)), height=pa.array(np.full(n, 480, np.int32)),
        segments=pa.array(segs, schema.field("segments").type), model=pa.array(["fcclip-convnext-large"] * n),
        margin=pa.array([rng.random(segments).astype(np.float32) for _ in range(n)], pa.list_(pa.float32())),
        uncertainty=pa.array(rng.random(n).astype(np.float32)),
    )
    columns.update({k: pa.array(v, schema.field(k).type) for k, v in (extra or {}).items()})
    return pa.Table.from_arrays([columns[f.name] for f in schema], schema=schema)


def write_outputs(dest: Path, reviewed: Path, rows: int, per_file: int, segments: int, picked: int) -> None:
    from fcclip.vocabulary import load_vocabulary
    from fcclip_pipelines.output import REVIEW_FIELDS, SCHEMA, Destination, write_part

    vocabulary = load_vocabulary("cat; dog; grass [stuff]").to_dict()
    rng = np.random.default_rng(0)
    for shard, start in enumerate(range(0, rows, per_file)):
        table = _rows(start, min(per_file, rows - start), segments, rng, SCHEMA)
        write_part(Destination(str(dest)), shard, table, {"vocabulary": vocabulary, "run_id": "bench"})
    schema = pa.schema(list(SCHEMA) + REVIEW_FIELDS)
    step = max(1, rows // picked)
    when = datetime.datetime(2026, 12, 5, tzinfo=datetime.timezone.utc)
    tables = [_rows(i, 1, segments, rng, schema, {"source": ["human-reviewed"], "reviewed_by": ["a@example.com"],
                                                   "reviewed_at": [when]}) for i in range(0, rows, step)[:picked]]
    write_part(Destination(str(reviewed)), 0, pa.concat_tables(tables), {"vocabulary": vocabulary, "run_id": "rev"})


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", required=True)
    p.add_argument("--rows", type=int, default=100_000)
    p.add_argument("--scale", type=int, default=10)
    p.add_argument("--rows-per-file", type=int, default=10_000)
    p.add_argument("--segments", type=int, default=12, help="segments per row (default: %(default)d)")
    p.add_argument("--reviewed", type=int, default=500, help="reviewed images (default: %(default)d)")
    p.add_argument("--json", default=None)
    args = p.parse_args(argv)
    out = Path(args.out)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT)] + os.environ.get("PYTHONPATH", "").split(os.pathsep))}
    results = []
    for rows in (args.rows, args.rows * args.scale):
        dest, reviewed, merged = out / f"rows-{rows}", out / f"reviewed-{rows}", out / f"merged-{rows}"
        if not dest.exists():
            t = time.perf_counter()
            write_outputs(dest, reviewed, rows, args.rows_per_file, args.segments, args.reviewed)
            print(f"wrote {rows} rows in {time.perf_counter() - t:.1f} s", file=sys.stderr)
        shutil.rmtree(merged, ignore_errors=True)
        proc = subprocess.run([sys.executable, "-c", CHILD, str(dest), str(reviewed), str(merged)], env=env,
                              capture_output=True, text=True, check=True)
        seconds, rss_mb, replaced = proc.stdout.split()
        results.append({"rows": rows, "replaced": int(replaced), "seconds": float(seconds),
                        "rows_per_s": rows / float(seconds), "peak_rss_mb": float(rss_mb),
                        "dest_mb": sum(f.stat().st_size for f in dest.glob("*.parquet")) / 2**20})
        shutil.rmtree(merged, ignore_errors=True)
    print("| rows | DEST MiB | replaced | seconds | rows/s | peak RSS (MiB) |\n|---|---|---|---|---|---|")
    for r in results:
        print(f"| {r['rows']:,} | {r['dest_mb']:.0f} | {r['replaced']} | {r['seconds']:.1f} | {r['rows_per_s']:,.0f} | "
              f"{r['peak_rss_mb']:.0f} |")
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
