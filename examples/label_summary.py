"""Summarise a labeling output with DuckDB: `python examples/label_summary.py DEST [VERSION]`.

DuckDB reads the part files of the table's current version (or of VERSION): a glob (`DEST/*.parquet`) would read
the files an incremental run replaced too, which the table keeps for readers of past versions."""
import sys

import duckdb

from fcclip_pipelines.output import open_output

dest = sys.argv[1].rstrip("/") if len(sys.argv) > 1 else "demo/labels"
output = open_output(dest, version=int(sys.argv[2]) if len(sys.argv) > 2 else None)
con = duckdb.connect()
if "://" in dest:  # object storage through fsspec (s3fs / gcsfs), with the usual credentials
    con.register_filesystem(output.fs)
rows = "read_parquet([" + ", ".join("'" + f.replace("'", "''") + "'" for f in output.urls) + "])"
print(f"{dest}: version {output.version}, {len(output.urls)} part file(s)")
print(con.sql(f"select status, count(*) as images from {rows} group by status order by status"))
print(con.sql(f"""
    select s.label, count(*) as segments, round(avg(s.score), 3) as mean_score, sum(s.area) as pixels
    from (select unnest(segments) as s from {rows})
    group by s.label order by segments desc
"""))
print(con.sql(f"select uri, error from {rows} where status = 'error' limit 10"))
