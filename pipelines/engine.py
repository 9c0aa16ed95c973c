"""The labeling engine on Ray core: chunks of a shard flow decode task -> model actors (one call per batch) ->
encode-and-write task, and a commit task per completed shard composes the shard's part file. The driver only
schedules: it submits tasks, passes object references from one stage to the next, and receives per chunk a count
of decoded images and a small dict of metadata (rows covered, counts, error reasons, a fragment's name); pixels,
segment maps and rows never reach it. (A chunk's sizes and decode errors, a few KiB, are held by its Ray worker as
the owner of that small object and passed on to the model call and the write task as bytes; its Python never opens
them.)

    driver:  chunk (shard, rows, URIs) ----------------------------------------------------------------> bookkeeping
    decode task (CPU):     URIs -> images decoded (a count, to the driver) + meta (sizes, errors) + images (store)
    model actor (GPU/CPU): a chunk's images, batch by batch -> segment maps + segments (object store); device work
    write task (CPU):      segment maps -> RLE, areas, boxes -> Arrow rows -> a fragment under _fcclip/fragments
    commit task (CPU):     a shard's fragments -> DEST/part-NNNNNN.parquet (atomic), fragments deleted

The driver also records what it sees as Ray metrics (pipelines/telemetry.py: rows written, shards committed, the
pool, the backlog), which a cluster's Prometheus scrapes.

Resources are asked for, never read off the cluster: every model actor asks for ``gpus`` GPUs and
``cpus_per_actor`` CPUs, every decode and write task for one CPU, so that an autoscaling cluster sees the demand and
adds the nodes. The model actors are a pool of MIN to MAX (``actors``): MIN start at once; while the chunks waiting
for them are more than their number, more start, up to MAX (no more starting at once than are up, so the pool at most
doubles while nodes come up); once no chunk is left to give them, idle actors are ended, so that their nodes go back. Decode tasks run ahead of the model by up to four
chunks per actor (their images wait in the object store), however many CPUs the cluster has at the moment, and pause
while the results of two chunks per actor wait for their write tasks (so that writes get CPUs where decodes would
take them all, and the results do not pile up in the store).

Faults, all bounded:
- a decode task whose worker dies (a decoder segfault, an OOM kill) splits its chunk into single images at once:
  a decoder crash is usually one image's doing, and retrying the whole chunk would only crash on it again. Each
  single image's decode, and every write and commit task, is retried by Ray ``RETRIES`` times; a write task that
  still fails is split the same way; an image that fails alone becomes an error row;
- a write that DEST refuses (disk full, no permission, the bucket gone) is retried by Ray ``RETRIES`` times, then ends
  the job with that error (``LabelError``): it is no image's fault, and the shards committed so far stay, so running
  the job again goes on from there. Writing a chunk's error rows is retried the same way, and one that still fails
  ends the job too: nothing is left that could be written instead;
- a stop asked for (``stop``: Ctrl-C, SIGTERM) ends the loop at its next turn with ``LabelStopped``; what is
  committed stays;
- a model actor that dies (killed, its node removed) is replaced; its chunks are run again, at most ``RETRIES``
  times, then image by image as above;
- a model batch running past ``batch_timeout`` is abandoned: its actor is killed and replaced, the chunk's images
  are run again one at a time, and an image that times out alone becomes an error row. The limit is per batch: a
  call (one chunk, several batches) that runs past it is asked how long its current batch has been running
  (``ModelActor.batch_age``, answered beside the model's thread) and given the rest of that batch's limit.
"""
from __future__ import annotations

import collections
import logging
import re
import time
from dataclasses import dataclass, field

import pyarrow.compute as pc
import ray

from . import runtime
from .output import Destination, DestinationWriteError, commit_shard, write_fragment
from .stages import ReadDecode, encode_rows, label_images, run_metadata
from .telemetry import LabelMetrics

logger = logging.getLogger("fcclip.label")

RETRIES = runtime.RETRIES


class LabelError(RuntimeError):
    """The job cannot go on (the model cannot start, a shard cannot be committed)."""


class LabelStopped(LabelError):
    """The job was asked to stop (a signal); ``signal`` is its number."""

    def __init__(self, message: str, signal: int):
        super().__init__(message)
        self.signal = signal


# ---------------------------------------------------------------------------------------------------- Ray stages
def _decode(decoder: ReadDecode, uris: list[str]):
    meta, images = decoder(uris)
    return sum(1 for err in meta["error"] if not err), meta, images


def error_reason(error: str) -> str:
    """An error row's reason without what is particular to its image (a size, a path, a message's details), so that
    the summary counts the images that failed for one reason together: ``ImageDecodeError: not an image, or a format
    Pillow cannot read``, ``ImageDecodeError: cannot decode the image``, ``not found``, ``model failed: ValueError``,
    ``timed out after 120.0 s while reading or decoding``."""
    kind, _, rest = error.partition(": ")
    if kind == "ImageDecodeError" and ": " in rest:  # "image bytes (N bytes): what is wrong (details): more"
        what = rest.split(": ", 1)[1]
        return f"{kind}: {what.split(': ', 1)[0].split(' (', 1)[0]}"[:120]
    if kind in ("model failed", "encoding failed"):
        return f"{kind}: {rest.split(': ', 1)[0]}"[:120]
    return kind[:120]


def _write(dest_uri: str, shard: int, rows: list[int], uris: list[str], meta: dict | None, labeled: dict | None,
           constants: dict, errors: list[str] | None = None) -> dict:
    """Encode a chunk's rows (the model's result ``labeled``; None when none ran) and write them as a fragment."""
    table = encode_rows(uris, rows, meta, labeled, constants, errors=errors)
    name = write_fragment(Destination(dest_uri), shard, table)
    status = table.column("status").to_pylist()
    reasons: dict[str, int] = {}
    for err in table.column("error").to_pylist():
        if err:
            reason = error_reason(err)
            reasons[reason] = reasons.get(reason, 0) + 1
    return {
        "fragment": name, "ok": status.count("ok"), "failed": len(status) - status.count("ok"),
        "segments": int(pc.sum(pc.list_value_length(table.column("segments"))).as_py() or 0), "errors": reasons,
    }


def _commit(dest_uri: str, shard: int, fragments: list[str], expected: int, file_metadata: dict) -> int:
    return commit_shard(Destination(dest_uri), shard, fragments, expected, file_metadata)


def _label_chunk(model_stage, batch_size: int, meta: dict, images: list) -> dict:
    """The model actor's work on one chunk (runtime.ModelActor.run), batch by batch, each batch's start marked for
    the actor's heartbeat."""
    return label_images(model_stage, meta, images, batch_size, on_batch=runtime.mark_batch)


# ---------------------------------------------------------------------------------------------------- the driver
@dataclass
class Chunk:
    shard: int
    rows: list[int]
    uris: list[str]
    isolated: bool = False  # a single image run again after its chunk failed
    error_rows: bool = False  # its write holds error rows only (no model result)
    attempts: int = 0  # model calls that died with their actor
    meta: object = None  # ObjectRef: sizes and decode errors
    images: object = None  # ObjectRef


@dataclass
class Call:
    chunk: Chunk
    info_ref: object
    labeled_ref: object


@dataclass
class _Actor:
    handle: object
    ready_ref: object
    ready: bool = False
    calls: collections.deque = field(default_factory=collections.deque)  # Call, oldest first
    deadline: float = 0.0  # when the oldest call's current batch runs out of time, as far as the driver knows


@dataclass
class EngineResult:
    ok: int = 0
    failed: int = 0
    segments: int = 0
    recovered: int = 0
    errors: dict = field(default_factory=dict)
    committed: list = field(default_factory=list)
    first_rows_at: float | None = None
    model_ids: set = field(default_factory=set)
    actor_images: int = 0
    actor_outside_s: float = 0.0
    run_metadata: dict | None = None  # the model stage's run_metadata (asked of the first actor)
    max_actors: int = 0  # the most model actors alive at once
    actors_started: int = 0


class LabelEngine:
    """Schedules one run's pending shards; see the module docstring."""

    def __init__(self, dest: Destination, shard_sizes: dict[int, int], uris_of, decoder: ReadDecode,
                 make_model_stage, *, actors: tuple[int, int], batch_size: int, chunk_size: int, gpus: float,
                 cpus_per_actor: float, batch_timeout: float | None, constants: dict, file_metadata: dict,
                 progress=None, ask_run_metadata: bool = False, on_committed=None, stop=None, on_model_ready=None):
        self.dest = dest
        self.sizes = shard_sizes
        self.uris_of = uris_of  # shard -> its URIs (read from the manifest when the shard is scheduled)
        self.decoder_ref = ray.put(decoder)
        self.make_model_stage = make_model_stage
        self.min_actors, self.max_actors = actors
        self.batch_size = max(1, batch_size)
        self.chunk_size = max(1, chunk_size)
        self.gpus = gpus
        self.cpus_per_actor = cpus_per_actor
        self.batch_timeout = batch_timeout
        self.constants = constants
        self.file_metadata = file_metadata
        self.progress = progress
        # shard -> None, on the driver once its part file is written: the table's log. Where it has a flush() and a
        # list of shards `waiting` for a version (lake.ShardCommitter), a job that stops commits those first, and
        # counts as committed only the shards in the table
        self.on_committed = on_committed
        self.on_model_ready = on_model_ready  # model id -> None, as each model actor is ready (before its first call)
        self.stop = stop  # runtime.StopSignals: a signal received ends the loop at its next turn
        self.ask_run_metadata = ask_run_metadata  # ask the first ready actor for its run metadata, add it to the files'
        self.result = EngineResult()
        decode = ray.remote(_decode)
        self.decode_fn = decode.options(num_cpus=1, num_returns=3, max_retries=RETRIES)
        # a chunk's decode is not retried: its worker's death splits the chunk into single images instead
        self.decode_chunk_fn = decode.options(num_cpus=1, num_returns=3, max_retries=0)
        self.write_fn = ray.remote(_write).options(num_cpus=1, max_retries=RETRIES,
                                                   retry_exceptions=[DestinationWriteError])
        self.commit_fn = ray.remote(_commit).options(num_cpus=0.5, max_retries=RETRIES)

    # ------------------------------------------------------------------ actors
    def _new_actor(self) -> _Actor:
        handle = runtime.start_model_actor(self.make_model_stage, gpus=self.gpus, cpus=self.cpus_per_actor)
        self.result.actors_started += 1
        return _Actor(handle, handle.ready.remote())

    def _end(self, actor: _Actor) -> None:
        ray.kill(actor.handle, no_restart=True)

    def _scale(self) -> None:
        """Grow the pool with the backlog (up to MAX), shrink it when no batch is left for it."""
        upstream = self.shards or self.queue or self.decoding or self.decoded
        starting = sum(1 for a in self.actors if not a.ready)
        if not self.actors and upstream:
            self.actors.append(self._new_actor())
        elif (len(self.actors) < self.max_actors and len(self.decoded) > len(self.actors)
              and starting < max(1, len(self.actors) - starting)):  # at most doubling while nodes come up
            self.actors.append(self._new_actor())
            logger.info("model actors: %d (chunks waiting: %d)", len(self.actors), len(self.decoded))
        elif not (self.shards or self.queue or self.decoding or self.decoded):
            idle = [a for a in self.actors if a.ready and not a.calls]
            for actor in idle:
                self._end(actor)
                self.actors.remove(actor)
        self.result.max_actors = max(self.result.max_actors, len(self.actors))

    # ------------------------------------------------------------------ the loop
    def run(self, pending: list[int]) -> EngineResult:
        """Label the ``pending`` shards: every row of each ends in its committed part file (ok or error row)."""
        self.queue: collections.deque[Chunk] = collections.deque()  # to decode
        self.shards = collections.deque(pending)  # not yet split into chunks
        self.open_shards: dict[int, dict] = {}  # shard -> {"fragments": [names], "covered": rows written so far}
        self.decoding: dict = {}  # count ref -> chunk
        self.decoded: collections.deque[Chunk] = collections.deque()  # waiting for a model call
        self.writing: dict = {}  # ref -> chunk
        self.committing: dict = {}  # ref -> (shard, attempts)
        self.metrics = LabelMetrics(self.dest.uri)  # for Prometheus
        self.images = sum(self.sizes[s] for s in pending)
        self.actors = [self._new_actor() for _ in range(self.min_actors)]
        self.startup_failures = 0
        self.init_failures = 0  # of them, exceptions raised by the model stage's construction
        try:
            while (self.shards or self.queue or self.decoding or self.decoded or self.writing or self.committing
                   or any(a.calls for a in self.actors)):
                if self.stop is not None and self.stop.received is not None:
                    sig = self.stop.received
                    raise LabelStopped(self._stopped(f"stopped by {sig.name}", " to label the rest"), int(sig))
                self._refill()
                self._submit_decodes()
                self._scale()
                self._submit_model_calls()
                ready = self._wait()
                if ready is None:
                    continue
                now = time.monotonic()
                for actor in list(self.actors):
                    self._on_actor(actor, ready, now)
                self._on_decoded(ready)
                self._on_written(ready)
                self._on_committed(ready)
                self.metrics.pool(self.actors, len(self.decoded), self._left())
        finally:
            for actor in self.actors:
                self._end(actor)
            self.metrics.close(self._left())
        return self.result

    def _left(self) -> int:
        """Images of this run not written yet."""
        return self.images - self.result.ok - self.result.failed

    def _refill(self) -> None:
        """Split shards into chunks as capacity frees up: at most a few shards open at a time."""
        while self.shards and len(self.queue) < 8:
            shard = self.shards.popleft()
            self.open_shards[shard] = {"fragments": [], "covered": 0}
            try:
                uris = self.uris_of(shard)
            except OSError as e:  # its manifest, in DEST: gone, or DEST unreachable
                raise LabelError(self._stopped(f"the manifest of shard {shard} could not be read: "
                                               f"{type(e).__name__}: {_short(e)}")) from None
            for start in range(0, len(uris), self.chunk_size):
                rows = list(range(start, min(start + self.chunk_size, len(uris))))
                self.queue.append(Chunk(shard, rows, uris[rows[0] : rows[-1] + 1]))

    def _fail(self, chunk: Chunk, reason: str) -> None:
        """A chunk that could not be labeled: its images one at a time, or an error row for a single image."""
        if len(chunk.rows) > 1:
            self.result.recovered += len(chunk.rows)
            for row, uri in zip(reversed(chunk.rows), reversed(chunk.uris)):
                self.queue.appendleft(Chunk(chunk.shard, [row], [uri], isolated=True))
            return
        self._write(chunk, None, errors=[reason])

    def _write(self, chunk: Chunk, labeled_ref, errors: list[str] | None = None) -> None:
        # the decode's sizes go with error rows too, where the decode succeeded (chunk.meta)
        ref = self.write_fn.remote(self.dest.uri, chunk.shard, chunk.rows, chunk.uris, chunk.meta, labeled_ref,
                                   self.constants, errors=errors)
        chunk.images = None
        chunk.error_rows = labeled_ref is None
        self.writing[ref] = chunk

    def _submit_decodes(self) -> None:
        # decoded chunks wait in the object store for the model: enough to keep every actor busy, no more. Nor more
        # while the model's results wait for write tasks: a CPU that keeps getting decodes would never run a write
        # (Ray hands a freed worker the next task of the same kind), and the results would pile up in the store
        ahead = 4 * max(1, len(self.actors))
        while (self.queue and len(self.decoding) + len(self.decoded) < ahead
               and len(self.writing) < 2 * max(1, len(self.actors))):
            chunk = self.queue.popleft()
            decode = self.decode_fn if len(chunk.uris) == 1 else self.decode_chunk_fn
            count_ref, chunk.meta, chunk.images = decode.remote(self.decoder_ref, chunk.uris)
            self.decoding[count_ref] = chunk

    def _submit_model_calls(self) -> None:
        now = time.monotonic()
        for actor in self.actors:
            while actor.ready and self.decoded and len(actor.calls) < 2:
                chunk = self.decoded.popleft()
                info_ref, labeled_ref = actor.handle.run.options(num_returns=2).remote(
                    _label_chunk, self.batch_size, chunk.meta, chunk.images)
                if not actor.calls:
                    actor.deadline = now + (self.batch_timeout or 0)
                actor.calls.append(Call(chunk, info_ref, labeled_ref))

    def _wait(self) -> set | None:
        """The references that are done (at least one within half a second), or None when nothing can move."""
        waiting = list(self.decoding) + list(self.writing) + list(self.committing)
        waiting += [a.ready_ref for a in self.actors if not a.ready]
        waiting += [a.calls[0].info_ref for a in self.actors if a.calls]
        if not waiting:  # nothing can move (no actor at all): should not happen, but never spin
            time.sleep(0.1)
            return None
        ready, _ = ray.wait(waiting, num_returns=1, timeout=0.5, fetch_local=False)
        if ready:
            ready, _ = ray.wait(waiting, num_returns=len(waiting), timeout=0, fetch_local=False)
        return set(ready)

    def _on_actor(self, actor: _Actor, ready: set, now: float) -> None:
        """An actor: started (or failed to), its oldest call done (or died, or its batch ran past the time limit)."""
        if not actor.ready:
            if actor.ready_ref in ready:
                self._on_started(actor)
            return
        if not actor.calls:
            return
        call = actor.calls[0]
        if call.info_ref in ready:
            actor.calls.popleft()
            actor.deadline = now + (self.batch_timeout or 0)
            try:
                info = ray.get(call.info_ref)
            except ray.exceptions.RayActorError as e:
                logger.warning("a model actor died (%s); replacing it", _short(e))
                requeue = [c.chunk for c in actor.calls]
                self._replace(actor, "died")
                for chunk in [call.chunk, *requeue]:
                    self._retry(chunk, "model actor crashed or was killed", count_attempts=True)
                return
            except Exception as e:  # its input was lost (a node removed): decode again
                self._retry(call.chunk, f"model stage failed: {_short(e)}")
                return
            self.result.actor_images += len(call.chunk.rows)
            self.result.actor_outside_s += info["total_s"] - info["model_s"]
            self._write(call.chunk, call.labeled_ref)
        elif self.batch_timeout and now > actor.deadline:
            age = self._batch_age(actor)
            if age is not None and age < self.batch_timeout:  # a later batch of the call: it has the rest of its limit
                actor.deadline = now + self.batch_timeout - age
                return
            logger.warning("a model batch ran past %.0f s; replacing its actor, its images go one by one",
                           self.batch_timeout)
            requeue = [c.chunk for c in list(actor.calls)[1:]]
            actor.calls.clear()
            self._replace(actor, "timed_out")
            self._fail(call.chunk, f"model timed out after {self.batch_timeout:g} s on this image alone")
            for chunk in reversed(requeue):
                self.decoded.appendleft(chunk)

    def _batch_age(self, actor: _Actor) -> float | None:
        """How long the actor's current batch has been running, by its own clock; None when it does not answer
        within a few seconds (a model stuck in native code holding the GIL) or is idle."""
        probe = actor.handle.batch_age.options(concurrency_group="probe").remote()
        done, _ = ray.wait([probe], timeout=5.0)
        if not done:
            return None
        try:
            return ray.get(probe)
        except Exception:
            return None

    def _replace(self, actor: _Actor, reason: str) -> None:
        self._end(actor)
        self.metrics.actor_replaced(reason)
        self.actors[self.actors.index(actor)] = self._new_actor()

    def _on_started(self, actor: _Actor) -> None:
        try:
            model_id = ray.get(actor.ready_ref)
            self.result.model_ids.add(model_id)
            if self.on_model_ready is not None:
                self.on_model_ready(model_id)
            if self.ask_run_metadata and self.result.run_metadata is None:
                # before any chunk goes to an actor, so before any shard is committed
                _, meta_ref = actor.handle.run.options(num_returns=2).remote(run_metadata)
                self.result.run_metadata = ray.get(meta_ref)
                self.file_metadata = {**self.file_metadata, **self.result.run_metadata}
            actor.ready = True
        except (runtime.ModelStageFailed, ray.exceptions.RayActorError) as e:
            self.startup_failures += 1
            # an exception of the model stage's construction (weights that are not a checkpoint, a class name too
            # long for the text encoder, ...) comes again in the next actor: a second one, while no actor has got
            # past it, ends the job with its reason; other failures (a node lost while it started, one node's GPU
            # out of memory) as many as RETRIES for each actor of the pool
            if isinstance(e, runtime.ModelStageFailed):
                self.init_failures += 1
                reason = " ".join(str(e.cause.args[0]).split())[:500]
            elif getattr(e, "actor_init_failed", False):  # its arguments could not be loaded, say
                self.init_failures += 1
                reason = _last_line(e)
            else:
                reason = _short(e)
            repeated = self.init_failures > 1 and not self.result.model_ids
            if repeated or self.startup_failures > RETRIES + self.max_actors:
                raise LabelError(f"the model actor could not start: {reason}") from None
            logger.warning("a model actor failed to start (%s); starting another", reason)
            self._replace(actor, "failed_to_start")

    def _retry(self, chunk: Chunk, reason: str, count_attempts: bool = False) -> None:
        """Run a chunk whose model call was lost again (decoded again: its images may have died with a node), at
        most RETRIES times; then `_fail` it with ``reason`` (and the number of attempts)."""
        chunk.attempts += 1
        if chunk.attempts > RETRIES:
            self._fail(chunk, f"{reason} ({chunk.attempts} attempts)" if count_attempts else reason)
        else:
            self.queue.appendleft(chunk)

    def _on_decoded(self, ready: set) -> None:
        for ref in [r for r in self.decoding if r in ready]:
            chunk = self.decoding.pop(ref)
            try:
                decoded = ray.get(ref)
            except Exception as e:  # the task's worker died (a chunk's at once, a single image's after retries)
                chunk.images = chunk.meta = None
                self._fail(chunk, _crashed(e))
                continue
            if not decoded:
                self._write(chunk, None)  # every image failed to decode: error rows, no model call
            else:
                self.decoded.append(chunk)

    def _on_written(self, ready: set) -> None:
        res = self.result
        for ref in [r for r in self.writing if r in ready]:
            chunk = self.writing.pop(ref)
            try:
                info = ray.get(ref)
            except Exception as e:
                cause = getattr(e, "cause", None) or e  # what the task raised, where Ray wrapped it
                if isinstance(cause, DestinationWriteError):
                    raise LabelError(self._stopped(f"{_short(cause)} ({RETRIES + 1} attempts)")) from None
                if chunk.error_rows and chunk.meta is None and len(chunk.rows) == 1:
                    raise LabelError(self._stopped(f"the error row of {chunk.uris[0]} could not be written: "
                                                   f"{_short(e)}")) from None
                chunk.meta = None  # it may be what could not be read
                self._fail(chunk, _crashed(e))
                continue
            if res.first_rows_at is None:
                res.first_rows_at = time.time()
            res.ok += info["ok"]
            res.failed += info["failed"]
            res.segments += info["segments"]
            for reason, n in info["errors"].items():
                res.errors[reason] = res.errors.get(reason, 0) + n
            self.metrics.labeled(info["ok"], info["failed"], info["segments"])
            if self.progress is not None:
                self.progress.labeled(info["ok"], info["failed"])
            state = self.open_shards[chunk.shard]
            state["fragments"].append(info["fragment"])
            state["covered"] += len(chunk.rows)
            if state["covered"] == self.sizes[chunk.shard]:
                self._commit(chunk.shard, 0)

    def _commit(self, shard: int, attempts: int) -> None:
        ref = self.commit_fn.remote(self.dest.uri, shard, self.open_shards[shard]["fragments"], self.sizes[shard],
                                    self.file_metadata)
        self.committing[ref] = (shard, attempts)

    def _stopped(self, reason: str, then: str = ", once DEST takes writes, to label the rest") -> str:
        """The message of a job that cannot go on: why, what is committed, and how to go on."""
        committer, waiting = self.on_committed, ()
        if hasattr(committer, "flush"):
            try:
                committer.flush()
            except Exception:  # DEST failing, likely what stops the job: those shards stay out of the table
                waiting = set(committer.waiting)
        done = len(set(self.result.committed) - set(waiting))
        total = len(set(self.result.committed) | set(self.open_shards) | set(self.shards))
        return (f"{reason}. {done} of the {total} shards this run had to label are committed (they stay); "
                f"run the same command again{then}")

    def _on_committed(self, ready: set) -> None:
        for ref in [r for r in self.committing if r in ready]:
            shard, attempts = self.committing.pop(ref)
            try:
                ray.get(ref)
            except Exception as e:
                if attempts >= RETRIES:
                    raise LabelError(self._stopped(f"shard {shard} could not be committed: {_short(e)}")) from None
                self._commit(shard, attempts + 1)
                continue
            del self.open_shards[shard]
            if self.on_committed is not None:
                try:
                    self.on_committed(shard)
                except Exception as e:  # the table's commit on the driver (DEST stopped taking writes): an OSError,
                    # or deltalake's own error where the log it finds is not a table's
                    self.open_shards[shard] = {"fragments": [], "covered": 0}  # not in the table: not committed
                    raise LabelError(self._stopped(f"shard {shard} could not be committed to the table: "
                                                   f"{type(e).__name__}: {_short(e)}")) from None
            self.result.committed.append(shard)
            self.metrics.committed()
            if self.progress is not None:
                self.progress.committed()


def _crashed(e: BaseException) -> str:
    return (f"worker crashed or was killed while processing this image ({RETRIES + 1} attempts in isolation): "
            f"{_short(e)}")


def _short(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return (text[0] if text else type(e).__name__)[:200]


def _last_line(e: BaseException) -> str:
    """Of an error that carries a remote traceback, the line that gives the remote exception's type and message
    (the last such line: a chained exception's comes after its cause's), else the last line."""
    text = [line.strip() for line in str(e).strip().splitlines() if line.strip()]
    raised = [line for line in text if re.match(r"[A-Za-z_][\w.]*(Error|Exception|Exit)\b", line)]
    return ((raised or text)[-1] if text else type(e).__name__)[:500]
