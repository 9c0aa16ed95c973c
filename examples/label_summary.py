"""Summarise a labeling output with DuckDB: `python examples/label_summary.py DEST`."""
import sys

import duckdb
import fsspec

dest = sys.argv[1].rstrip("/") if len(sys.argv) > 1 else "demo/labels"
con = duckdb.connect()
if "://" in dest:  # object storage through fsspec (s3fs / gcsfs), with the usual credentials
    con.register_filesystem(fsspec.filesystem(dest.split("://", 1)[0]))
files = f"read_parquet('{dest}/*.parquet')"
print(con.sql(f"select status, count(*) as images from {files} group by status order by status"))
print(con.sql(f"""
    select s.label, count(*) as segments, round(avg(s.score), 3) as mean_score, sum(s.area) as pixels
    from (select unnest(segments) as s from {files})
    group by s.label order by segments desc
"""))
print(con.sql(f"select uri, error from {files} where status = 'error' limit 10"))
