"""The driver's rewrites of a prune (`fcclip label --prune`) or a follow's removal (`fcclip relabel`): files of a
table rewritten without a few rows each, one at a time against a few at once (pipelines/lake.py ``_run_rewrites``).

    python benchmarks/lake_rewrites.py /tmp/fcclip-rewrites [s3://bucket/prefix ...] [--files 40] [--rows 1000]

For each folder or prefix: ``--files`` part files of ``--rows`` rows (a URI and ~5 KB of RLE-like text per row,
zstd), then every file rewritten without 3 of its rows by ``_run_rewrites`` with 1 thread and with
``lake.REWRITE_THREADS``, twice each, in turns. An ``s3://`` prefix is reached as the commands reach it (the AWS
variables; a loopback moto_server with ``AWS_ENDPOINT_URL``).
"""
from __future__ import annotations

import argparse
import io
import sys
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from fcclip_pipelines import lake  # noqa: E402
from fcclip_pipelines.output import Destination  # noqa: E402


def make(dest: Destination, files: int, rows: int) -> list[tuple[str, list[str]]]:
    rng = np.random.default_rng(0)
    jobs = []
    for k in range(files):
        uris = [f"s3://lake/photos/{k:04d}-{i:05d}.jpg" for i in range(rows)]
        buf = io.BytesIO()
        pq.write_table(pa.table({"uri": uris, "counts": [rng.bytes(2500).hex() for _ in range(rows)]}), buf,
                       compression="zstd")
        dest.write_bytes(lake.part_name(k), buf.getvalue())
        jobs.append((lake.part_name(k), uris[:3]))
    return jobs


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser()
    p.add_argument("where", nargs="+", help="local folders or s3:// prefixes (written to)")
    p.add_argument("--files", type=int, default=40)
    p.add_argument("--rows", type=int, default=1000)
    args = p.parse_args(argv)
    threads = lake.REWRITE_THREADS
    print(f"| where | files x rows | 1 thread (s) | {threads} threads (s) |")
    print("|---|---|---|---|")
    for where in args.where:
        dest = Destination(where)
        jobs = make(dest, args.files, args.rows)
        times: dict[int, list[float]] = {1: [], threads: []}
        for n in (1, threads, 1, threads):
            lake.REWRITE_THREADS = n
            t = time.time()
            kept = lake._run_rewrites(dest, 999_999, jobs, remote=False)
            times[n].append(time.time() - t)
            assert sum(kept) == args.files * (args.rows - 3)
        lake.REWRITE_THREADS = threads
        print(f"| {where} | {args.files} x {args.rows} | {' / '.join(f'{x:.2f}' for x in times[1])} | "
              f"{' / '.join(f'{x:.2f}' for x in times[threads])} |", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
