"""`fcclip review pick` at N and 10N rows: time and peak memory (its memory should not grow with the rows).

A labeling output of N rows is written (part files of `--rows-per-file`; empty segment lists, a random
`uncertainty` per row, each object's ETag, size and time, so the files are what pick reads of a real output: uri,
image_id, status, uncertainty and the version columns, source_* and width, height),
then `fcclip review pick DEST --count C --by uncertainty` and `--by random` run in a fresh process each, whose
peak resident memory (ru_maxrss) and wall time are reported.

    .venv/bin/python benchmarks/review_pick_scale.py --out out/pick-scale --rows 200000 --scale 10
"""
from __future__ import annotations

import argparse
import json
import os
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
picks = review.pick(sys.argv[1], int(sys.argv[2]), sys.argv[3])
print(time.perf_counter() - t, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, picks.table.num_rows)
"""


def write_output(dest: Path, rows: int, per_file: int, seed: int = 0) -> None:
    from fcclip.vocabulary import load_vocabulary
    from fcclip_pipelines.output import Destination, part_schema, write_part

    vocabulary = load_vocabulary("cat; dog; grass [stuff]").to_dict()
    rng = np.random.default_rng(seed)
    for shard, start in enumerate(range(0, rows, per_file)):
        n = min(per_file, rows - start)
        uris = [f"s3://bucket/images/{i:09d}.jpg" for i in range(start, start + n)]
        schema = part_schema()
        columns = {f.name: pa.nulls(n, f.type) for f in schema}
        columns.update(
            uri=pa.array(uris), image_id=pa.array([f"{i:016x}" for i in range(start, start + n)]),
            status=pa.array(["ok"] * n), width=pa.array(np.full(n, 640, np.int32)),
            height=pa.array(np.full(n, 480, np.int32)),
            segments=pa.array([[]] * n, schema.field("segments").type),
            uncertainty=pa.array(rng.random(n).astype(np.float32)),
            source_etag=pa.array([f'"{i:032x}"' for i in range(start, start + n)]),
            source_size=pa.array(rng.integers(50_000, 500_000, n)),
            source_mtime=pa.array(np.full(n, 1_764_892_800_000_000, np.int64)).cast(schema.field("source_mtime").type),
        )
        table = pa.Table.from_arrays([columns[f.name] for f in schema], schema=schema)
        write_part(Destination(str(dest)), shard, table, {"vocabulary": vocabulary, "run_id": "bench"})


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", required=True)
    p.add_argument("--rows", type=int, default=200_000)
    p.add_argument("--scale", type=int, default=10)
    p.add_argument("--rows-per-file", type=int, default=100_000)
    p.add_argument("--count", type=int, default=1000)
    p.add_argument("--json", default=None)
    args = p.parse_args(argv)
    out = Path(args.out)
    results = []
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT)] + os.environ.get("PYTHONPATH", "").split(os.pathsep))}
    for rows in (args.rows, args.rows * args.scale):
        dest = out / f"rows-{rows}"
        if not dest.exists():
            t = time.perf_counter()
            write_output(dest, rows, args.rows_per_file)
            print(f"wrote {rows} rows in {time.perf_counter() - t:.1f} s", file=sys.stderr)
        for by in ("uncertainty", "random"):
            proc = subprocess.run([sys.executable, "-c", CHILD, str(dest), str(args.count), by], env=env,
                                  capture_output=True, text=True, check=True)
            seconds, rss_mb, picked = proc.stdout.split()
            results.append({"rows": rows, "by": by, "count": int(picked), "seconds": float(seconds),
                            "rows_per_s": rows / float(seconds), "peak_rss_mb": float(rss_mb)})
    print("| rows | --by | picked | seconds | rows/s | peak RSS (MiB) |\n|---|---|---|---|---|---|")
    for r in results:
        print(f"| {r['rows']:,} | {r['by']} | {r['count']} | {r['seconds']:.1f} | {r['rows_per_s']:,.0f} | "
              f"{r['peak_rss_mb']:.0f} |")
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
