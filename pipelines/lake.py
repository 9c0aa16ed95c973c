"""DEST as a Delta Lake table: its log, the one writer's lock, and the diff that makes a rerun incremental.

The part files stay what pipelines/output.py writes (plain Parquet, the output's schema and metadata); this module
only names them in the table's log, ``DEST/_delta_log/`` (delta-rs, the ``deltalake`` package), through its
transaction API (add and remove actions). The driver commits shards once their part files are complete: a table
version per batch of shards completed within ``ShardCommitter.interval_s`` (a shard replacing rows alone), whose
commit info names the run, the model, the vocabulary's digest, the shards and the rows added and replaced
(:class:`ShardCommitter`, :func:`commit_version`). A killed run leaves a table of the versions it committed; a
part file written but not yet named in the log is in no version, and the rerun writes it again (same name, same
rows) and names it then.

Shards and versions: a shard is *committed* when a version adds its part file. A later increment may replace some
of its rows (their objects changed in SOURCE): the version that adds the new rows' shard also removes the old part
file and adds its rewrite without those rows, named ``part-OLD-rNEW.parquet`` (OLD's rows, as rewritten when NEW was
committed). So every version holds each URI at most once, and a reader of any version sees the old row or the new
one, never both.

Other programs' maintenance (an OPTIMIZE compaction, a DELETE) rewrites part files under names of their own and
without fcclip's footer metadata. So which shards are committed is read off the log's commit info where the file
names do not account for them (:func:`committed_shards`), a changed URI's old row is looked for by file, not by
shard (:func:`_files_holding`), and the files' metadata is kept in ``_fcclip/table.json`` (:func:`table_metadata`).
Such maintenance may also land while a run commits: a version that removes files is committed only on top of a
version that still holds them, else the rows are looked for again (:func:`_commit_on_files`, :class:`FilesGone`).

Incremental runs (:func:`plan_increment`): a DEST whose shards are all committed, labeled again with the same
settings, lists SOURCE again into Parquet files on local disk, and DuckDB compares that listing with the URIs of the
current version (an anti-join on ``uri`` and, for URIs in both, the object's ETag, else its size and modification
time, recorded per row in ``source_etag``, ``source_size``, ``source_mtime``). DuckDB spills to a local temporary
folder, so neither side is held in memory. What is new, then what changed, becomes the next shards of the run's
manifest, each changed URI with the part file that holds its old row (``replaces``).

One writer (:class:`WriterLock`): ``DEST/_fcclip/lock.json``, created only if absent (``O_EXCL`` on a local
filesystem; ``If-None-Match: *`` on S3; ``ifGenerationMatch=0`` on GCS), holding the owner's host, process id and
a heartbeat the owner rewrites every ``HEARTBEAT_S`` seconds. A second driver is refused at once, unless the lock
is stale: its heartbeat older than ``STALE_S``, or its owner a process of this host that no longer runs (a killed
driver). A stale lock is removed and taken over.
"""
from __future__ import annotations

import concurrent.futures
import datetime
import io
import json
import logging
import os
import re
import shutil
import socket
import tempfile
import threading
import time
import uuid

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from .output import DELTA_LOG, META_DIR, METADATA_PREFIX, Destination, PartFile, manifest_name, part_name

logger = logging.getLogger("fcclip.lake")

LOCK = f"{META_DIR}/lock.json"
TABLE_METADATA = f"{META_DIR}/table.json"
HEARTBEAT_S = 30.0
STALE_S = 300.0
TABLE_FILE_RE = re.compile(r"part-(\d+)(?:-r(\d+))?\.parquet$")
"""A part file in the table: ``part-N.parquet`` (shard N as labeled) or ``part-N-rM.parquet`` (shard N's rows that
remained when shard M replaced some of them)."""
REWRITE_SUFFIX_RE = re.compile(r"-r(\d{6})\.parquet$")
"""What a rewrite adds to the name of the file it rewrites: ``-rM`` (shard M replaced some of its rows)."""
COMMIT_RE = re.compile(r"\d{20}\.json")
REWRITE_THREADS = 8
"""Files rewritten at once on the driver (a prune's, a follow's removal)."""
COMMIT_TRIES = 20
"""Tries at committing a version that removes files, each on top of a version another program committed meanwhile."""
WRITE_OPERATIONS = ("WRITE", "CREATE TABLE")
"""The log's operations of the versions that add shards (commit_version's); not schema or property changes, and not
another program's rewrites (OPTIMIZE, DELETE, ...)."""


def rewrite_name(name: str, by: int) -> str:
    """The name of part file ``name`` (relative to DEST) rewritten without the rows shard ``by`` replaced:
    ``part-000003.parquet`` and ``part-000003-r000010.parquet`` both become ``part-000003-r000042.parquet`` for
    ``by`` 42; a file another program wrote (``part-00000-<uuid>-c000.zstd.parquet``, a compaction's) gets the same
    suffix. So a file and its rewrites share one base (:func:`_base`)."""
    return _base(name)[: -len(".parquet")] + f"-r{by:06d}.parquet"


def _base(name: str) -> str:
    return REWRITE_SUFFIX_RE.sub(".parquet", name)


# ---------------------------------------------------------------------------------------------------- the log
def storage_options(uri: str) -> dict[str, str]:
    """delta-rs options for DEST: on S3, plain HTTP when the endpoint is (a test server, MinIO), and a version's
    log entry written only if absent (``If-None-Match: *``, S3's conditional write, as :class:`WriterLock`'s), not
    through a lock service: a commit of another program's (a compaction) that lands at the same moment fails one of
    the two commits instead of overwriting it."""
    if not uri.startswith(("s3://", "s3a://")):
        return {}
    options = {"AWS_CONDITIONAL_PUT": "etag"}
    endpoint = os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL") or ""
    if endpoint.startswith("http://"):
        options["AWS_ALLOW_HTTP"] = "true"
    return options


def table_uri(dest: Destination) -> str:
    return os.path.abspath(dest.uri) if "://" not in dest.uri else dest.uri


def has_table(dest: Destination) -> bool:
    fs = dest.fs
    log = dest.path(DELTA_LOG)
    fs.invalidate_cache(log)
    try:
        return any(p.endswith(".json") for p in fs.ls(log, detail=False))
    except FileNotFoundError:
        return False


def open_table(dest: Destination, version: int | None = None):
    """The table (deltalake.DeltaTable) at ``version`` (default: the current one)."""
    from deltalake import DeltaTable

    return DeltaTable(table_uri(dest), version=version, storage_options=storage_options(dest.uri))


def table_files(dest: Destination, version: int | None = None) -> list[str]:
    """Paths (relative to DEST) of the part files of a version, sorted; [] when DEST has no table yet."""
    return versioned_files(dest, version)[1] if has_table(dest) else []


def versioned_files(dest: Destination, version: int | None = None) -> tuple[int, list[str]]:
    """(the version read, the paths relative to DEST of its part files, sorted): ``version``, or the current one as
    of this call (one read of the log, so the two agree while a writer commits)."""
    table = open_table(dest, version)
    actions = table.get_add_actions(flatten=True)
    return table.version(), sorted(str(p) for p in pa.table(actions).column("path").to_pylist())


def table_metadata(dest: Destination) -> dict[str, str]:
    """The ``fcclip.*`` key-value metadata of the part files the table's versions added (:func:`commit_version`),
    as their footers hold it (JSON texts); {} when none was recorded."""
    try:
        return json.loads(dest.read_bytes(TABLE_METADATA))
    except FileNotFoundError:
        return {}


def table_version(dest: Destination) -> int | None:
    return open_table(dest).version() if has_table(dest) else None


def delta_type(t: pa.DataType) -> pa.DataType:
    """The Delta type the log records for an Arrow type of the output: Delta has no half float (the embedding
    vectors' float16 is recorded as float) and no fixed-size list (recorded as an array)."""
    if pa.types.is_float16(t):
        return pa.float32()
    if pa.types.is_fixed_size_list(t) or pa.types.is_list(t) or pa.types.is_large_list(t):
        return pa.list_(pa.field(t.value_field.name, delta_type(t.value_type), t.value_field.nullable))
    if pa.types.is_struct(t):
        return pa.struct([pa.field(f.name, delta_type(f.type), f.nullable) for f in t])
    return t


def delta_schema(schema: pa.Schema):
    from deltalake import Schema

    return Schema.from_arrow(pa.schema([pa.field(f.name, delta_type(f.type), f.nullable) for f in schema]))


def _add_action(dest: Destination, relative: str):
    from deltalake.transaction import AddAction

    fs = dest.fs
    path = dest.path(relative)
    fs.invalidate_cache(path.rsplit("/", 1)[0])  # written by a Ray task: not in this process's listing cache
    size = int(fs.info(path)["size"])
    with fs.open(path, "rb") as f:
        meta = pq.ParquetFile(f).metadata
        schema = meta.schema.to_arrow_schema()
    stats = json.dumps({"numRecords": meta.num_rows})
    fcclip = {k.decode(): v.decode() for k, v in (meta.metadata or {}).items() if k.startswith(METADATA_PREFIX.encode())}
    return AddAction(relative, size, {}, int(time.time() * 1000), True, stats), schema, meta.num_rows, fcclip


def commit_version(dest: Destination, add: list[str], remove: list[str] = (), info: dict | None = None,
                   carried: int = 0) -> int:
    """One table version that adds the part files ``add`` and removes ``remove`` (paths relative to DEST), with
    ``info`` (``fcclip.*`` keys) in its commit info; creates the table on the first commit. Returns the version.
    ``fcclip.rows_added`` is the rows of ``add`` less ``carried``, those of them that files of ``remove`` held
    already (a file rewritten without some rows carries the others over), so that the rows a version holds are the
    sum of its versions' ``rows_added`` less their ``rows_replaced``.

    The ``fcclip.*`` key-value metadata of the files added (the run's vocabulary, thresholds, model, ...) is kept
    beside the table too, in ``_fcclip/table.json`` (:func:`table_metadata`), before the version is committed: a
    file another program rewrites (a compaction, a DELETE) keeps the rows but not the footer, and readers take the
    metadata from there (``output.open_output``). (Not the table's properties: delta-rs takes only ``delta.*`` keys
    when it creates a table, and its ALTER holds Python's GIL through its requests.) A table holds one run's
    versions (``--overwrite`` removes the log with the run), so one file serves all its versions."""
    from deltalake import CommitProperties
    from deltalake.transaction import RemoveAction, create_table_with_add_actions

    actions, schema, added_rows, properties = [], None, 0, {}
    for relative in add:
        action, file_schema, rows, fcclip = _add_action(dest, relative)
        actions.append(action)
        added_rows += rows
        properties.update(fcclip)
        if schema is None or len(file_schema) > len(schema):
            schema = file_schema
    now = int(time.time() * 1000)
    actions += [RemoveAction(relative, True, now) for relative in remove]
    recorded = table_metadata(dest) if properties else {}
    if any(recorded.get(k) != v for k, v in properties.items()):
        dest.write_bytes(TABLE_METADATA, json.dumps({**recorded, **properties}).encode())
    metadata = {f"fcclip.{k}": v if isinstance(v, str) else json.dumps(v) for k, v in (info or {}).items()}
    metadata["fcclip.rows_added"] = str(added_rows - carried)
    props = CommitProperties(custom_metadata=metadata)
    options = storage_options(dest.uri)
    if not has_table(dest):
        if remove:
            raise RuntimeError("the first version of a table cannot remove files")
        create_table_with_add_actions(table_uri(dest), delta_schema(schema.remove_metadata()), actions,
                                      storage_options=options, commit_properties=props)
        return 0
    table = open_table(dest)
    if schema is not None:
        # a version that changes the schema names the run, not the shards: only the version that adds a shard's
        # file says it (committed_shards reads that)
        _add_new_columns(table, schema, CommitProperties(custom_metadata={"fcclip.run_id": metadata.get(
            "fcclip.run_id", "")}))
    target = table.schema()
    if not remove:  # an append conflicts with nothing: delta-rs retries it on top of whatever was committed meanwhile
        table.create_write_transaction(actions, mode="append", schema=target, commit_properties=props)
        return table.version() + 1
    return _commit_on_files(table, actions, remove, target, metadata)


def _commit_on_files(table, actions: list, remove, schema, metadata: dict) -> int:
    """Commit a version that removes files only on top of a version that still holds them all. delta-rs checks a
    write's removes against nothing: where another program's compaction or DELETE removed a file since it was read,
    it would commit the remove as a no-op, and the file's rows would stay in the other program's rewrite beside
    ours (every kept row twice, the replaced ones too). So each try commits exactly the next version
    (``max_commit_retries=0``), and a version committed meanwhile by another program is looked at: its removals
    leave ours standing (the try is made again on top of it) or raise :class:`FilesGone` (the caller finds the rows
    again). The other order is delta-rs' to catch: an OPTIMIZE or DELETE that read a file a version of ours has
    removed fails ("a concurrent transaction deleted data this operation read"), and its program runs it again."""
    from deltalake import CommitProperties
    from deltalake.exceptions import CommitFailedError

    props = CommitProperties(custom_metadata=metadata, max_commit_retries=0)
    for _ in range(COMMIT_TRIES):
        held = set(pa.table(table.get_add_actions(flatten=True)).column("path").to_pylist())
        gone = sorted(set(remove) - held)
        if gone:
            raise FilesGone(f"version {table.version()} of the table no longer holds {', '.join(gone)}")
        read = table.version()
        try:
            table.create_write_transaction(actions, mode="append", schema=schema, commit_properties=props)
            return read + 1
        except CommitFailedError:
            table.update_incremental()
            if table.version() == read:  # not a version committed meanwhile: a failure of its own
                raise
    raise RuntimeError(f"{COMMIT_TRIES} versions were committed by other programs while fcclip tried to commit one; "
                       "the shards committed so far stay, and the rerun goes on from there")


def _add_new_columns(table, schema: pa.Schema, props) -> None:
    """Columns of a file to add that the table lacks (a DEST labeled before a column existed): one version that
    records them in the table's schema, before the version that adds the file (nullable: older files read as null)."""
    from deltalake import Field

    have = {f.name for f in table.schema().fields}
    new = [f for f in schema if f.name not in have]
    if new:
        table.alter.add_columns([Field.from_arrow(pa.field(f.name, delta_type(f.type), True)) for f in new],
                                commit_properties=props)
        table.update_incremental()


def committed_shards(dest: Destination, run: dict) -> set[int]:
    """Shards of the run whose rows are in the table: every shard before the latest increment (an increment starts
    only once all earlier shards are committed, and a later one may have removed a shard's file whose rows were all
    replaced), and those of the latest increment that a version added. Read off the current version's file names
    (``part-N``, ``...-rM``), and where another program's files are in the version (a compaction's, a DELETE's) and
    those names do not account for every shard, off the log: the versions that added shards name them
    (:func:`logged_shards`; a run killed before its shards were committed, the common case, reads no history)."""
    increment = latest_increment(run)
    first = increment["first_shard"]
    if not has_table(dest):
        return set()
    if increment.get("complete"):  # every shard committed, seen by the run that labeled them (mark_complete)
        return set(range(len(run.get("shard_sizes") or [])))
    done = set(range(first))
    rewritten = False  # a file of another program's in the version
    for name in table_files(dest):
        m = TABLE_FILE_RE.search(name)
        if m:
            done.add(int(m.group(1)))
        else:
            rewritten = True
        m = REWRITE_SUFFIX_RE.search(name)
        if m:
            done.add(int(m.group(1)))
    sizes = run.get("shard_sizes") or []
    if rewritten and any(s not in done and sizes[s] > 0 for s in range(first, len(sizes))):
        done |= logged_shards(dest, run["run_id"], since=increment.get("table_version"))
    return done


def logged_shards(dest: Destination, run_id: str, since: int | None = None) -> set[int]:
    """The shards that versions of the table added for run ``run_id`` (their commit info's ``fcclip.shards``, or
    ``fcclip.shard`` for a relabel): the commits after version ``since`` (None: all the log keeps), read as files
    (``_delta_log/NNN.json``, one action a line) rather than through delta-rs, whose history holds Python's GIL
    through its requests."""
    fs = dest.fs
    log = dest.path(DELTA_LOG)
    fs.invalidate_cache(log)
    shards: set[int] = set()
    for path in sorted(fs.ls(log, detail=False)):
        name = path.rstrip("/").rsplit("/", 1)[-1]
        if not COMMIT_RE.fullmatch(name) or (since is not None and int(name[:20]) <= since):
            continue
        for line in fs.cat_file(path).splitlines():
            info = json.loads(line).get("commitInfo") if line.strip() else None
            if not info or info.get("operation") not in WRITE_OPERATIONS or info.get("fcclip.run_id") != run_id:
                continue
            if "fcclip.shards" in info:
                shards.update(int(s) for s in json.loads(info["fcclip.shards"]))
            if "fcclip.shard" in info:
                shards.add(int(info["fcclip.shard"]))
    return shards


def latest_increment(run: dict) -> dict:
    increments = run.get("increments") or [{"first_shard": 0}]
    return increments[-1]


def mark_complete(dest: Destination, run: dict) -> None:
    """Record in run.json that every shard of the run's latest increment is committed, once a run has seen them
    committed: from then on that is not read off the table, whose log another program's maintenance and the log's
    own clean-up (commits older than its retention, 30 days by default) may have rewritten by the next run. (A
    relabel's run, which has no increments, is one.)"""
    increments = run.get("increments") or [{"first_shard": 0, "new": run.get("num_images", 0)}]
    if not increments[-1].get("complete"):
        increments[-1] = {**increments[-1], "complete": True}
        run["increments"] = increments
        dest.write_run(run)


def adopt_parts(dest: Destination, run: dict, parts: dict[int, str]) -> None:
    """A DEST labeled before it became a table (part files, no log): one version naming its part files."""
    names = [p.rsplit("/", 1)[-1] for _, p in sorted(parts.items())]
    if names:
        commit_version(dest, names, info={"run_id": run["run_id"], "operation": "adopt", "shards": sorted(parts)})


# ---------------------------------------------------------------------------------------------------- shard commits
class FilesGone(RuntimeError):
    """Files a version was to remove are no longer in the table: another program rewrote them after they were read
    (a compaction, a DELETE), and their rows are to be looked for again (:func:`_commit_on_files`)."""


class ShardCommitter:
    """The driver's half of a shard's commit, called once the shard's part file is complete: one table version adds
    the part files of the shards completed since the last version (a version at most every ``interval_s`` seconds,
    so that a driver committing many shards a second writes fewer, larger versions; :meth:`flush` commits what is
    left). A shard whose rows replace others' is committed at once, alone: its version also removes the part files
    holding the old rows and adds them rewritten without those rows (a Ray task each, when Ray runs)."""

    def __init__(self, dest: Destination, info: dict, remote: bool = True, interval_s: float = 2.0):
        self.dest = dest
        self.info = info
        self.remote = remote
        self.interval_s = interval_s
        self.waiting: list[int] = []  # complete shards not yet in a version
        self.last = 0.0  # when the last version was committed (monotonic)

    def __call__(self, shard: int) -> None:
        replaced = _replaced_rows(self.dest, shard)
        if replaced:
            self.flush()
            self._commit([shard], replaced)
        else:
            self.waiting.append(shard)
            if time.monotonic() - self.last >= self.interval_s:
                self.flush()

    def flush(self) -> None:
        """Commit the shards waiting for a version (where the commit fails, they stay waiting: not in the table)."""
        if self.waiting:
            self._commit(list(self.waiting), {})
            self.waiting = []

    def commit_replacing(self, shards: list[int], replaced: dict, by: int) -> int:
        """Commit ``shards`` (none: a prune) in one version that also removes the rows of ``replaced`` ({the file
        that held them when listed: URIs}), wherever they are now, the files holding them rewritten (``-rBY``).
        Returns the rows removed."""
        self.flush()
        return self._commit(shards, replaced, by)[1]

    def _commit(self, shards: list[int], replaced: dict, by: int | None = None) -> tuple[int | None, int]:
        dest = self.dest
        shard = shards[0] if by is None else by
        for _ in range(COMMIT_TRIES):
            add, remove = [part_name(s) for s in shards], []
            rows_replaced = carried = 0
            if replaced:
                jobs = _files_holding(dest, replaced, shard)
                rows_replaced = sum(len(uris) for uris in jobs.values())
                results = _run_rewrites(dest, shard, list(jobs.items()), self.remote)
                for name, kept in zip(jobs, results):
                    remove.append(name)
                    if kept:
                        add.append(rewrite_name(name, shard))
                        carried += kept
            info = {**self.info, "shards": shards, "files_removed": len(remove), "rows_replaced": rows_replaced}
            if not add and not remove:  # nothing of it left in the table (an earlier run removed it)
                return None, 0
            try:
                version = commit_version(dest, add, remove, info, carried)
                break
            except FilesGone as e:  # another program's compaction or DELETE came between: the old rows moved
                logger.info("%s: looking for the rows shard %d replaces again", e, shard)
                for name in add[len(shards):]:  # this try's rewrites, in no version
                    dest.fs.rm_file(dest.path(name))
        else:
            raise RuntimeError(f"the files holding the rows shard {shard} replaces were rewritten by other programs "
                               f"{COMMIT_TRIES} times while fcclip tried to commit it; the shards committed so far "
                               "stay, and the rerun goes on from there")
        self.last = time.monotonic()
        return version, rows_replaced


def _replaced_rows(dest: Destination, shard: int) -> dict:
    """{the part file that held the old rows when SOURCE was listed (its name relative to DEST; an old shard's number
    in a manifest written before names were recorded): URIs} that shard ``shard``'s rows replace (its manifest's
    ``replaces`` column)."""
    return _by_file(pq.read_table(io.BytesIO(dest.read_bytes(f"{META_DIR}/manifest/{manifest_name(shard)}"))))


def _by_file(table: pa.Table) -> dict:
    """{``replaces``: its URIs} of a table of ``uri, replaces`` (rows without ``replaces`` left out)."""
    if "replaces" not in table.column_names:
        return {}
    out: dict = {}
    for uri, old in zip(table.column("uri").to_pylist(), table.column("replaces").to_pylist()):
        if old is not None:
            out.setdefault(old, []).append(uri)
    return out


def _files_holding(dest: Destination, replaced: dict, by: int) -> dict[str, list[str]]:
    """{a part file of the current version: the URIs of ``replaced`` it holds}. A file named at listing time is
    either still there, or was rewritten since by an earlier shard of the increment (same base name, a new ``-rM``),
    or by shard ``by`` itself (a run killed after that version and before recording it: those rows are gone);
    where another program rewrote it (a compaction between the listing and this commit), the current version's
    files are searched for the URIs."""
    current = table_files(dest)
    by_base = {_base(name): name for name in current}
    by_shard = {int(m.group(1)): name for name in current if (m := TABLE_FILE_RE.search(name))}
    jobs: dict[str, list[str]] = {}
    lost: list[str] = []
    for old, uris in sorted(replaced.items(), key=lambda kv: str(kv[0])):
        name = by_shard.get(old) if isinstance(old, int) else by_base.get(_base(old))
        suffix = REWRITE_SUFFIX_RE.search(name) if name is not None else None
        if suffix and int(suffix.group(1)) == by:  # rewritten by this very commit, in a run cut short after it
            continue
        if name is None:
            lost.extend(uris)
        else:
            jobs.setdefault(name, []).extend(uris)
    if lost:
        wanted = pa.array(lost, pa.string())
        for name in current:
            with dest.fs.open(dest.path(name), "rb") as f:
                uris = PartFile(f).read(columns=["uri"]).column("uri")
            found = pc.filter(uris, pc.is_in(uris, value_set=wanted)).to_pylist()
            if found:
                jobs.setdefault(name, []).extend(found)
    return jobs


def rewrite_without(dest_uri: str, name: str, new_name: str, uris: list[str]) -> int:
    """Write ``new_name``: part file ``name`` without the rows of ``uris`` (its schema and key-value metadata kept),
    unless no row remains. Returns the rows kept."""
    dest = Destination(dest_uri)
    table = PartFile(io.BytesIO(dest.read_bytes(name))).read()  # as fcclip writes it, whoever rewrote it
    kept = table.filter(pc.invert(pc.is_in(table.column("uri"), value_set=pa.array(uris, pa.string()))))
    if kept.num_rows:
        buf = io.BytesIO()
        pq.write_table(kept, buf, compression="zstd")
        dest.write_bytes(new_name, buf.getvalue())
    return kept.num_rows


def _run_rewrites(dest: Destination, shard: int, jobs: list, remote: bool) -> list[int]:
    if not jobs:
        return []
    if remote:
        import ray

        task = ray.remote(rewrite_without).options(num_cpus=0.5, max_retries=3)
        return ray.get([task.remote(dest.uri, name, rewrite_name(name, shard), uris) for name, uris in jobs])
    # on the driver (a prune, a follow's removal: no Ray started for them): a few at once, as the files' reads and
    # writes wait on the store and Arrow's decoding and encoding release the GIL
    with concurrent.futures.ThreadPoolExecutor(max_workers=min(REWRITE_THREADS, len(jobs))) as pool:
        return list(pool.map(lambda job: rewrite_without(dest.uri, job[0], rewrite_name(job[0], shard), job[1]),
                             jobs))


# ---------------------------------------------------------------------------------------------------- the lock
class FolderTaken(ValueError):
    """A one-shot output's folder (``fcclip review pull`` / ``merge``) holds something else; one line for the user."""


def unfinished_parts(dest: Destination, key: str, value, what: str | None) -> list[str]:
    """The part files in ``dest`` of an output written by the same command with the same inputs (its part files'
    ``fcclip.<key>`` metadata is ``value``) that stopped before its commit (no table log): the command writes it
    again from the start, and these go. ``what`` names that output in the warning (None: no warning). A table, or
    part files of anything else, raise FolderTaken: nothing is touched."""
    if not dest.fs.exists(dest.root):
        return []
    parts = dest.fs.glob(dest.path("*.parquet"))
    if not parts:
        return []
    if has_table(dest):
        raise FolderTaken(f"{dest.uri} already holds a table; give an empty or new folder")
    expected = json.dumps(value, sort_keys=True).encode()  # as encode_table writes it
    for path in parts:
        try:  # part files are written whole or not at all (Destination.write_bytes): ours read
            with dest.fs.open(path, "rb") as f:
                meta = pq.ParquetFile(f).schema_arrow.metadata or {}
        except (OSError, pa.ArrowException):
            meta = {}
        if meta.get(f"fcclip.{key}".encode()) != expected:
            raise FolderTaken(f"{dest.uri} already holds part files; give an empty or new folder")
    if what:
        logger.warning("%s holds %d part file(s) of an unfinished %s (no commit): writing it again", dest.uri,
                       len(parts), what)
    return parts


class DestinationBusy(RuntimeError):
    """Another driver writes into DEST."""


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:  # a zombie (killed, not yet reaped by its parent) has ended: its lock is stale
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rpartition(")")[2].split()[0] != "Z"
    except (OSError, IndexError):
        return True  # no /proc (macOS): the signal's answer


class WriterLock:
    """The one writer's lock on DEST (see the module docstring). Use as a context manager."""

    def __init__(self, dest: Destination, stale_s: float = STALE_S, heartbeat_s: float = HEARTBEAT_S):
        self.dest = dest
        self.stale_s = stale_s
        self.heartbeat_s = heartbeat_s
        self.token = uuid.uuid4().hex
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._created: list[str] = []  # local folders the lock created (removed with it when left empty)

    def _body(self) -> bytes:
        return json.dumps({"token": self.token, "host": socket.gethostname(), "pid": os.getpid(),
                           "heartbeat": time.time()}).encode()

    def _create(self) -> bool:
        """Create the lock if absent; False if it exists."""
        dest, body = self.dest, self._body()
        if dest.is_local:
            path = dest.path(LOCK)
            missing, parent = [], dest.root  # DEST's own folders and the parents made for it (--out a/b/labels)
            while parent and not os.path.isdir(parent):
                missing.insert(0, parent)
                parent = os.path.dirname(parent)
            self._created = missing + [p for p in (dest.path(META_DIR),) if not os.path.isdir(p)]
            os.makedirs(os.path.dirname(path), exist_ok=True)
            try:
                fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                return False
            with os.fdopen(fd, "wb") as f:
                f.write(body)
            return True
        if dest.uri.startswith("s3://"):
            import botocore.exceptions

            from .sources import s3_client

            bucket, key = dest.path(LOCK).split("/", 1)
            try:
                s3_client().put_object(Bucket=bucket, Key=key, Body=body, IfNoneMatch="*")
            except botocore.exceptions.ClientError as e:
                if e.response.get("Error", {}).get("Code") in ("PreconditionFailed", "ConditionalRequestConflict"):
                    return False
                raise
            return True
        if dest.uri.startswith("gs://"):  # a generation-match precondition (ifGenerationMatch=0): created if absent
            try:
                dest.fs.pipe_file(dest.path(LOCK), body, mode="create")
            except FileExistsError:
                return False
            return True
        if dest.exists(LOCK):  # another object store: check, then write (not atomic; documented)
            return False
        dest.write_bytes(LOCK, body)
        return True

    def _read(self) -> dict | None:
        try:
            return json.loads(self.dest.read_bytes(LOCK))
        except FileNotFoundError:
            return None
        except ValueError:
            return {}

    def _stale(self, held: dict) -> bool:
        if time.time() - float(held.get("heartbeat", 0)) > self.stale_s:
            return True
        return held.get("host") == socket.gethostname() and not _pid_alive(int(held.get("pid", -1)))

    def acquire(self) -> None:
        for _ in range(2):
            if self._create():
                break
            held = self._read()
            if held is None:
                continue  # released meanwhile
            if not self._stale(held):
                since = datetime.datetime.fromtimestamp(float(held.get("heartbeat", 0)), datetime.timezone.utc)
                raise DestinationBusy(
                    f"{self.dest.uri} is being written by another fcclip run (host {held.get('host')}, process "
                    f"{held.get('pid')}, alive at {since:%Y-%m-%d %H:%M:%S} UTC); nothing was read or changed. Wait "
                    f"for it to end (a lock older than {self.stale_s:.0f} s, or of a process gone, is taken over)"
                )
            logger.warning("taking over the stale lock of %s (host %s, process %s)", self.dest.uri,
                           held.get("host"), held.get("pid"))
            self.dest.fs.rm_file(self.dest.path(LOCK))
        else:
            raise DestinationBusy(f"{self.dest.uri}: another run took the lock first")
        self._thread = threading.Thread(target=self._beat, name="fcclip-lock-heartbeat", daemon=True)
        self._thread.start()

    def _beat(self) -> None:
        while not self._stop.wait(self.heartbeat_s):
            try:
                held = self._read()
                if not held or held.get("token") != self.token:
                    logger.error("the lock of %s was taken by another run", self.dest.uri)
                    return
                self.dest.write_bytes(LOCK, self._body())
            except Exception as e:  # a heartbeat missed is retried; a lock not renewed for STALE_S is lost
                logger.warning("could not renew the lock of %s: %s", self.dest.uri, e)

    def release(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
        held = self._read()
        if held and held.get("token") == self.token:
            self.dest.fs.rm_file(self.dest.path(LOCK))
        if self.dest.is_local:  # a DEST refused (foreign files) is left as it was: no empty _fcclip/ or DEST
            for path in reversed(self._created):
                for folder, _, _ in sorted(os.walk(path), reverse=True):  # and no empty folder in them (_fcclip/tmp)
                    try:
                        os.rmdir(folder)
                    except OSError:
                        pass

    def __enter__(self):
        self.acquire()
        return self

    def __exit__(self, *exc):
        self.release()


# ---------------------------------------------------------------------------------------------------- increments
def plan_increment(source: str, dest: Destination, run: dict, shard_size: int, extensions, refresh: bool = True,
                   on_listed=None, memory_limit: str | None = None, retry_errors: bool = False,
                   prune: bool = False) -> dict:
    """List SOURCE again and write what the current version lacks as the run's next manifest shards (new URIs, then
    changed ones with ``replaces``, then, with ``retry_errors``, unchanged ones whose row is an error row, with
    ``replaces`` too; unchanged ones, and changed ones when not ``refresh``, are left out). Returns the increment:
    ``{"first_shard", "shard_sizes", "new", "changed", "unchanged", "skipped", "duplicates", "retried",
    "error_rows", "errors_kept", "gone", "table_version"}`` (``error_rows``: the error rows of the current version,
    retried or not; ``errors_kept``: those of images listed that this increment does not label again;
    ``gone``: its URIs SOURCE no longer lists; ``table_version``: the version the listing was compared with, None
    before the first). With ``prune``, the gone URIs are written to ``_fcclip/manifest/gone-FIRST.manifest`` with the
    file holding each (:func:`prune`), ``"prune_shard"``: the number that names the files the prune rewrites (a shard
    of no rows, appended to ``shard_sizes``). Raises :class:`PruneRefused` where the prune would remove every row."""
    from .sources import list_to_parquet

    base_version = table_version(dest)  # the versions after it are this increment's (committed_shards)
    work = tempfile.mkdtemp(prefix="fcclip-diff-")
    try:
        listed = list_to_parquet(source, work, extensions, on_listed=on_listed)
        first = len(run["shard_sizes"])
        gone_path = f"{work}/gone.parquet" if prune else None
        counts = diff_listing(dest, f"{work}/listing", f"{work}/diff.parquet", refresh=refresh,
                              memory_limit=memory_limit, temp_dir=f"{work}/spill", retry_errors=retry_errors,
                              gone_path=gone_path)
        if prune and counts["gone"] and counts["gone"] == counts["rows"]:
            raise PruneRefused(f"{source} lists none of the {counts['rows']} images of {dest.uri}: --prune would "
                               "remove every row; nothing was changed (is SOURCE right?)")
        sizes = write_shards(dest, f"{work}/diff.parquet", first, shard_size)
        extra = {}
        if prune and counts["gone"]:
            extra["prune_shard"] = first + len(sizes)
            sizes.append(0)
            with open(gone_path, "rb") as f:
                dest.write_bytes(gone_manifest(first), f.read())
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return {"first_shard": first, "shard_sizes": sizes, "skipped": listed["skipped"], "table_version": base_version,
            "duplicates": listed["listed"] - counts["distinct"], "new": counts["new"], "changed": counts["changed"],
            "unchanged": counts["distinct"] - counts["new"] - counts["changed"] - counts["not_refreshed"],
            "not_refreshed": counts["not_refreshed"], "retried": counts["retried"], "error_rows": counts["error_rows"],
            "errors_kept": counts["errors_kept"], "gone": counts["gone"], **extra}


class PruneRefused(ValueError):
    """``--prune`` would remove every row of the table: SOURCE lists none of its images (a mistyped SOURCE, say)."""


def prune(dest: Destination, increment: dict, info: dict) -> int:
    """Remove from the table the rows of the URIs an increment found gone from SOURCE (``--prune``): one version
    that removes the files holding them and adds them rewritten without those rows (``-rP``, P the increment's
    ``prune_shard``), committed as a replacing shard's is (:meth:`ShardCommitter.commit_replacing`). Returns the rows
    removed (0 where an earlier run removed them already)."""
    return remove_listed(dest, gone_manifest(increment["first_shard"]), increment["prune_shard"],
                         {**info, "operation": "prune"})


def gone_manifest(first_shard: int) -> str:
    """The file (relative to DEST) listing the rows an increment removes without adding any (``uri, replaces``)."""
    return f"{META_DIR}/manifest/gone-{first_shard:06d}.manifest"


def remove_listed(dest: Destination, listed: str, by: int, info: dict) -> int:
    """Remove the rows listed in ``listed`` (a Parquet file relative to DEST: ``uri, replaces``, the file holding each
    when listed) in one version that adds no shard: the files holding them removed and added rewritten without them
    (``-rBY``). Returns the rows removed (0 where an earlier run removed them already)."""
    gone = _by_file(pq.read_table(io.BytesIO(dest.read_bytes(listed))))
    return ShardCommitter(dest, info, remote=False).commit_replacing([], gone, by=by)


_CHANGED = """(o.uri IS NOT NULL AND (
    (l.etag IS NOT NULL AND o.source_etag IS NOT NULL AND l.etag <> o.source_etag)
    OR ((l.etag IS NULL OR o.source_etag IS NULL) AND l.size IS NOT NULL AND o.source_size IS NOT NULL
        AND (l.size <> o.source_size OR l.mtime IS DISTINCT FROM o.source_mtime))))"""


ROW_KEYS = {"uri": "VARCHAR", "source_etag": "VARCHAR", "source_size": "BIGINT", "source_mtime": "TIMESTAMPTZ",
            "status": "VARCHAR", "error": "VARCHAR"}
"""The columns that say which image, as which version of its object, a row is of, and whether it is an error row."""


def table_scan(con, dest: Destination, names: list[str], columns, named: bool = True,
               fill_missing: bool = False) -> str:
    """A DuckDB query of ``columns`` (names of :data:`ROW_KEYS`) and ``file`` (each row's file, relative to DEST) over
    part files ``names`` of DEST (``named`` False: ``names`` are paths, and ``file`` is that path), the file system
    of an object store registered with ``con``. ``fill_missing``: a column no file has is NULL (the files' footers
    read once more for it)."""
    types = {c: ROW_KEYS[c] for c in columns}
    if not names:
        nulls = ", ".join(f"NULL::{t} AS {c}" for c, t in types.items())
        return f"SELECT {nulls}, NULL::VARCHAR AS file WHERE false"
    files, root = list(names), ""
    if named:
        protocol = dest.fs.protocol if isinstance(dest.fs.protocol, str) else dest.fs.protocol[0]
        if not dest.is_local and protocol not in con.list_filesystems():  # (registered by its first protocol)
            con.register_filesystem(dest.fs)
        prefix = dest.uri.split("://", 1)[0] + "://" if "://" in dest.uri else ""
        files = [prefix + dest.path(n) if prefix else dest.path(n) for n in names]
        root = files[0][: len(files[0]) - len(names[0])]
    file_list = "[" + ", ".join("'" + f.replace("'", "''") + "'" for f in files) + "]"
    scan = f"read_parquet({file_list}, filename = true, union_by_name = true)"
    have = set(types)
    if fill_missing:
        have = {row[0] for row in con.execute(f"DESCRIBE SELECT * FROM {scan}").fetchall()}
    select = ", ".join(c if c in have else f"NULL::{t} AS {c}" for c, t in types.items())
    return f"SELECT {select}, substr(filename, {len(root) + 1}) AS file FROM {scan}"


def diff_listing(dest: Destination, listing_dir: str, out_path: str, refresh: bool = True,
                 memory_limit: str | None = None, temp_dir: str | None = None, labeled_files: list[str] | None = None,
                 retry_errors: bool = False, gone_path: str | None = None) -> dict:
    """Compare a listing (Parquet files ``uri, etag, size, mtime, ord`` under ``listing_dir``) with the current
    version's rows and write, ordered (new first, then changed, then unchanged error rows with ``retry_errors``; each
    in listing order), the URIs to label to ``out_path`` (``uri, etag, size, mtime, replaces``). Returns
    ``{"distinct", "new", "changed", "not_refreshed", "retried", "error_rows", "errors_kept", "gone", "rows"}``
    (``retried``: unchanged URIs whose error row is labeled again; ``error_rows``: the current version's error rows;
    ``errors_kept``: those of URIs listed and not labeled again (unchanged; changed with not ``refresh``); ``gone``: its
    URIs the listing lacks, written with the file holding each, ``uri, replaces``, to ``gone_path`` where given;
    ``rows``: its rows). ``labeled_files`` overrides the current version's files (a benchmark's)."""
    import duckdb

    con = duckdb.connect()
    if temp_dir:
        os.makedirs(temp_dir, exist_ok=True)
        con.execute(f"SET temp_directory = '{temp_dir}'")
    if memory_limit:
        con.execute(f"SET memory_limit = '{memory_limit}'")
    con.execute("SET preserve_insertion_order = false")
    listed = (f"SELECT uri, arg_min(etag, ord) AS etag, arg_min(size, ord) AS size, arg_min(mtime, ord) AS mtime, "
              f"min(ord) AS ord FROM read_parquet('{listing_dir}/*.parquet') GROUP BY uri")
    old = table_scan(con, dest, table_files(dest) if labeled_files is None else labeled_files,
                     ("uri", "source_etag", "source_size", "source_mtime", "status"),
                     named=labeled_files is None)
    con.execute(f"CREATE TEMP VIEW listed AS {listed}")
    con.execute(f"CREATE TEMP VIEW old AS {old}")
    # one join: what is new or changed (a few rows of the listing, as a rule), and what is gone from the listing, go
    # to a local table, then sorted
    retry = "OR o.status = 'error'" if retry_errors else ""
    con.execute(f"""
        CREATE TEMP TABLE joined AS
            SELECT l.uri, l.etag, l.size, l.mtime, l.ord, CASE WHEN o.uri IS NULL THEN NULL ELSE o.file END AS replaces,
                   coalesce(NOT ({_CHANGED}) AND o.status = 'error', false) AS retried, o.uri AS old_uri, o.file
            FROM listed l FULL OUTER JOIN old o ON l.uri = o.uri
            WHERE l.uri IS NULL OR o.uri IS NULL OR {_CHANGED} {retry}""")
    con.execute("CREATE TEMP VIEW todo AS SELECT * FROM joined WHERE uri IS NOT NULL")
    gone = int(con.execute("SELECT count(*) FROM joined WHERE uri IS NULL").fetchall()[0][0])
    if gone_path:
        con.execute(f"COPY (SELECT old_uri AS uri, file AS replaces FROM joined WHERE uri IS NULL ORDER BY file, uri) "
                    f"TO '{gone_path}' (FORMAT parquet, COMPRESSION zstd)")
    keep = "" if refresh else "WHERE replaces IS NULL OR retried"
    con.execute(f"""COPY (SELECT uri, etag, size, mtime, replaces FROM todo {keep}
                          ORDER BY (replaces IS NOT NULL), retried, ord)
                    TO '{out_path}' (FORMAT parquet, COMPRESSION zstd)""")
    new, all_changed, retried = (int(v) for v in con.execute(
        "SELECT count(*) FILTER (WHERE replaces IS NULL), count(*) FILTER (WHERE replaces IS NOT NULL AND NOT retried), "
        "count(*) FILTER (WHERE retried) FROM todo").fetchall()[0])
    distinct = int(con.execute(
        f"SELECT count(DISTINCT uri) FROM read_parquet('{listing_dir}/*.parquet')").fetchall()[0][0])
    # one more scan of the table: its error rows, those of them kept (neither labeled by this increment nor gone from
    # the listing: both small tables here), its rows
    error_rows, errors_kept, rows = (int(v) for v in con.execute(f"""
        SELECT count(*) FILTER (WHERE status = 'error'),
               count(*) FILTER (WHERE status = 'error' AND uri NOT IN (SELECT uri FROM todo {keep})
                                AND uri NOT IN (SELECT old_uri FROM joined WHERE uri IS NULL)),
               count(*)
        FROM old""").fetchall()[0])
    con.close()
    return {"distinct": distinct, "new": new, "changed": all_changed if refresh else 0,
            "not_refreshed": 0 if refresh else all_changed, "retried": retried, "error_rows": error_rows,
            "errors_kept": errors_kept, "gone": gone, "rows": rows}


def write_shards(dest: Destination, diff_path: str, first: int, shard_size: int) -> list[int]:
    """Stream the diff into manifest shards ``first``, ``first + 1``, ...; returns their sizes."""
    from .sources import write_manifest_shard

    sizes: list[int] = []
    pending: list[pa.RecordBatch] = []
    rows = 0
    pf = pq.ParquetFile(diff_path)

    def flush():
        nonlocal pending, rows
        table = pa.Table.from_batches(pending).combine_chunks()
        for start in range(0, table.num_rows, shard_size):
            part = table.slice(start, shard_size)
            if part.num_rows < shard_size and start + shard_size > table.num_rows and not final:
                pending, rows = [b for b in part.to_batches()], part.num_rows
                return
            write_manifest_shard(dest, first + len(sizes), part)
            sizes.append(part.num_rows)
        pending, rows = [], 0

    final = False
    for batch in pf.iter_batches(batch_size=65536):
        pending.append(batch)
        rows += batch.num_rows
        if rows >= shard_size:
            flush()
    final = True
    if rows:
        flush()
    return sizes
