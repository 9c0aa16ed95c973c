"""The incremental diff at scale: a listing of N URIs against a DEST of N labeled rows (pipelines/lake.py).

    python benchmarks/lake_diff.py --sizes 1000000 3000000 10000000 [--memory-limit 1GB] [--retry-errors]
                                   [--work DIR] [--json PATH]

For each N, in a fresh process (so that its peak memory is its own): DuckDB writes a DEST of N rows as part files
of 100,000 rows (``uri``, ``source_etag``, ``source_size``, ``source_mtime``, ``status``: the columns the diff reads,
0.5% of the rows error rows; a real part file's other columns are never read, Parquet being columnar) and a listing
of N URIs as the job writes it: 1% of DEST's URIs gone, 1% new, 0.1% changed (another ETag). Then ``diff_listing``
and ``write_shards`` run as a rerun runs them (with ``--retry-errors``, as ``fcclip label --retry-errors`` does),
and the child reports their time and its peak RSS (``ru_maxrss``: the whole process, Python and DuckDB).
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


def make_data(work: Path, n: int, file_rows: int = 100_000) -> list[str]:
    """DEST's part files and the listing under ``work``; the part files' paths."""
    import duckdb

    (work / "dest").mkdir(parents=True)
    (work / "listing").mkdir()
    con = duckdb.connect()
    con.execute(f"SET temp_directory = '{work}/spill'")
    files = []
    for k, start in enumerate(range(0, n, file_rows)):
        path = f"{work}/dest/part-{k:06d}.parquet"
        con.execute(f"""COPY (SELECT 's3://lake/photos/' || lpad(i::VARCHAR, 10, '0') || '.jpg' AS uri,
                md5(i::VARCHAR) AS source_etag, 100000 + i % 5000 AS source_size,
                TIMESTAMPTZ '2026-01-01 00:00:00+00' + to_seconds(i % 86400) AS source_mtime,
                CASE WHEN i % 200 = 3 THEN 'error' ELSE 'ok' END AS status
            FROM range({start}, {min(n, start + file_rows)}) t(i)) TO '{path}' (FORMAT parquet)""")
        files.append(path)
    gone, changed = n // 100, n // 1000
    # the listing: DEST's URIs but the first 1%, then 1% new ones; every 1000th object has another ETag
    con.execute(f"""COPY (SELECT 's3://lake/photos/' || lpad(i::VARCHAR, 10, '0') || '.jpg' AS uri,
            CASE WHEN i % 1000 = 7 AND i < {n} THEN md5('new' || i::VARCHAR) ELSE md5(i::VARCHAR) END AS etag,
            100000 + i % 5000 AS size, TIMESTAMPTZ '2026-01-01 00:00:00+00' + to_seconds(i % 86400) AS mtime,
            i - {gone} AS ord
        FROM range({gone}, {n + gone}) t(i)) TO '{work}/listing/000000.parquet' (FORMAT parquet)""")
    con.close()
    assert changed > 0
    return files


def child(work: Path, n: int, memory_limit: str | None, retry_errors: bool = False) -> dict:
    from fcclip_pipelines.lake import diff_listing, write_shards
    from fcclip_pipelines.output import Destination

    t = time.time()
    files = make_data(work, n)
    made = time.time() - t
    dest = Destination(str(work / "dest"))
    t = time.time()
    counts = diff_listing(dest, f"{work}/listing", f"{work}/diff.parquet", memory_limit=memory_limit,
                          temp_dir=f"{work}/spill", labeled_files=files, retry_errors=retry_errors)
    diffed = time.time() - t
    t = time.time()
    sizes = write_shards(dest, f"{work}/diff.parquet", first=len(files), shard_size=1000)
    sharded = time.time() - t
    return {"n": n, "data_s": round(made, 1), "diff_s": round(diffed, 1), "shards_s": round(sharded, 1),
            "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024),
            "new": counts["new"], "changed": counts["changed"], "distinct": counts["distinct"],
            "error_rows": counts["error_rows"], "retried": counts["retried"], "shards": len(sizes),
            "memory_limit": memory_limit}


def run_child(script: str, n: int, work: Path, extra: list[str]) -> dict:
    """Run ``script --child N --work WORK *extra`` in a fresh process (its peak memory its own), in an emptied
    ``work``; the JSON object its last line prints."""
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    command = [sys.executable, script, "--child", str(n), "--work", str(work), *extra]
    out = subprocess.run(command, check=True, capture_output=True, text=True, env=dict(os.environ)).stdout
    return json.loads(out.strip().splitlines()[-1])


def run_sizes(script: str, sizes: list[int], work: Path, extra: list[str], json_path: str | None, row) -> list[dict]:
    """:func:`run_child` for each N of ``sizes``, a table row (``row(n, result)``) printed after each; the results
    also written to ``json_path`` where given."""
    results = []
    for n in sizes:
        results.append(run_child(script, n, work, extra))
        print(row(n, results[-1]), flush=True)
    shutil.rmtree(work, ignore_errors=True)
    if json_path:
        Path(json_path).write_text(json.dumps(results, indent=1))
    return results


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--sizes", type=int, nargs="+", default=[1_000_000, 3_000_000, 10_000_000])
    p.add_argument("--memory-limit", default=None, help="DuckDB's memory_limit (default: DuckDB's, 80%% of RAM)")
    p.add_argument("--retry-errors", action="store_true", help="also list the unchanged URIs' error rows again")
    p.add_argument("--work", default="/tmp/fcclip-lake-diff")
    p.add_argument("--json", default=None, metavar="PATH", help="also write the figures as JSON")
    p.add_argument("--child", type=int, default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    work = Path(args.work)
    if args.child is not None:
        print(json.dumps(child(work, args.child, args.memory_limit, args.retry_errors)))
        return 0
    print("| N | DuckDB memory_limit | diff (s) | manifest shards (s) | peak RSS (MB) | new | changed | error rows "
          "| retried |")
    print("|---|---|---|---|---|---|---|---|---|")
    extra = (["--memory-limit", args.memory_limit] if args.memory_limit else []) + (
        ["--retry-errors"] if args.retry_errors else [])
    run_sizes(__file__, args.sizes, work, extra, args.json, lambda n, r: (
        f"| {n:,} | {r['memory_limit'] or 'default'} | {r['diff_s']} | {r['shards_s']} | {r['peak_rss_mb']:,} "
        f"| {r['new']:,} | {r['changed']:,} | {r['error_rows']:,} | {r['retried']:,} |"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
