"""What `fcclip relabel` costs to plan a follow of a grown, compacted DEST (pipelines/relabel.py, ``_plan_follow``).

    python benchmarks/relabel_follow.py --sizes 1000000 3000000 [--memory-limit 1GB] [--work DIR] [--json PATH]

For each N, in a fresh process (so that its peak memory is its own): DuckDB writes DEST2 as N relabeled rows in part
files of 100,000 rows, and the version of DEST to follow as the same images after a night and a compaction: one
file of 1,000,000 rows per million (another layout than DEST2's), 1% of DEST2's images gone (deleted), 1% new, 0.1%
with another ETag (changed), 0.5% of the rows error rows. The files hold only the columns the comparison reads
(``lake.ROW_KEYS``; Parquet is columnar: a real part file's masks and embeddings are never read). Then the follow's
comparison (``_diff_tables``) and its manifests (``_write_manifests``) run as a relabel runs them, and the child
reports their time, the rows to relabel, held and deleted, and its peak RSS (``ru_maxrss``: Python, pyarrow and
DuckDB together). Before the follow compared rows, every row of DEST's new files was relabeled: N rows here.
"""
from __future__ import annotations

import argparse
import json
import resource
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from lake_diff import run_sizes  # noqa: E402 - this folder is the script's: sys.path[0]

ROWS = """SELECT 's3://lake/photos/' || lpad(i::VARCHAR, 10, '0') || '.jpg' AS uri, {etag} AS source_etag,
    100000 + i % 5000 AS source_size, TIMESTAMPTZ '2026-01-01 00:00:00+00' + to_seconds(i % 86400) AS source_mtime,
    CASE WHEN i % 200 = 3 THEN 'error' ELSE 'ok' END AS status,
    CASE WHEN i % 200 = 3 THEN 'cannot identify image file' ELSE NULL END AS error
    FROM range({start}, {stop}) t(i)"""


def make_data(work: Path, n: int) -> tuple[list[str], list[str]]:
    """DEST's and DEST2's part files under ``work/dest`` and ``work/dest2``; their names."""
    import duckdb

    (work / "dest").mkdir(parents=True)
    (work / "dest2").mkdir()
    con = duckdb.connect()
    con.execute(f"SET temp_directory = '{work}/spill'")
    dest2 = []
    for k, start in enumerate(range(0, n, 100_000)):
        dest2.append(f"part-{k:06d}.parquet")
        rows = ROWS.format(etag="md5(i::VARCHAR)", start=start, stop=min(n, start + 100_000))
        con.execute(f"COPY ({rows}) TO '{work}/dest2/{dest2[-1]}' (FORMAT parquet)")
    gone = n // 100
    dest = []  # DEST2's images but the first 1%, and 1% new ones; every 1000th object has another ETag
    for k, start in enumerate(range(gone, n + gone, 1_000_000)):
        dest.append(f"part-00000-{k:05d}-compacted.zstd.parquet")
        rows = ROWS.format(etag="CASE WHEN i % 1000 = 7 THEN md5('new' || i::VARCHAR) ELSE md5(i::VARCHAR) END",
                           start=start, stop=min(n + gone, start + 1_000_000))
        con.execute(f"COPY ({rows}) TO '{work}/dest/{dest[-1]}' (FORMAT parquet)")
    con.close()
    return dest, dest2


def child(work: Path, n: int, memory_limit: str | None) -> dict:
    from fcclip_pipelines.output import Destination
    from fcclip_pipelines.relabel import _diff_tables, _write_manifests

    t = time.time()
    dest, dest2 = make_data(work, n)
    made = time.time() - t
    (work / "plan").mkdir()
    t = time.time()
    counts = _diff_tables(Destination(str(work / "dest")), dest, Destination(str(work / "dest2")), dest2,
                          str(work / "plan"), memory_limit=memory_limit)
    diffed = time.time() - t
    t = time.time()
    plan, sizes = _write_manifests(Destination(str(work / "dest2")), str(work / "plan" / "todo.parquet"), 0)
    written = time.time() - t
    return {"n": n, "data_s": round(made, 1), "diff_s": round(diffed, 1), "manifests_s": round(written, 1),
            "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024), **counts,
            "shards": len(plan), "rows_in_shards": sum(sizes), "memory_limit": memory_limit}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--sizes", type=int, nargs="+", default=[1_000_000, 3_000_000])
    p.add_argument("--memory-limit", default=None, help="DuckDB's memory_limit (default: DuckDB's, 80%% of RAM)")
    p.add_argument("--work", default="/tmp/fcclip-relabel-follow")
    p.add_argument("--json", default=None, metavar="PATH", help="also write the figures as JSON")
    p.add_argument("--child", type=int, default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    work = Path(args.work)
    if args.child is not None:
        print(json.dumps(child(work, args.child, args.memory_limit)))
        return 0
    print("| N | DuckDB memory_limit | compare (s) | manifests (s) | peak RSS (MB) | to relabel | held | deleted "
          "| before: relabeled |")
    print("|---|---|---|---|---|---|---|---|---|")

    def row(n: int, r: dict) -> str:
        assert r["rows_in_shards"] == r["relabel"]
        return (f"| {n:,} | {r['memory_limit'] or 'default'} | {r['diff_s']} | {r['manifests_s']} | "
                f"{r['peak_rss_mb']:,} | {r['relabel']:,} | {r['held']:,} | {r['deleted']:,} | {n:,} |")

    run_sizes(__file__, args.sizes, work, ["--memory-limit", args.memory_limit] if args.memory_limit else [],
              args.json, row)
    return 0


if __name__ == "__main__":
    sys.exit(main())
