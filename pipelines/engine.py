"""The labeling engine on Ray core: chunks of a shard flow decode task -> model actor -> encode-and-write task, and a
commit task per completed shard composes the shard's part file. The driver only schedules: it submits tasks, passes
object references from one stage to the next, and receives per chunk a small dict of metadata (rows covered,
counts, error reasons, a fragment's name); pixels, segment maps and rows never reach it.

    driver:  chunk (shard, rows, URIs) ----------------------------------------------------------------> bookkeeping
    decode task (CPU):        URIs -> meta (sizes, errors; to the driver) + images (object store)
    model actor (GPU/CPU):    images -> segment maps + segments (object store); the actor does device work only
    write task (CPU):         segment maps -> RLE, areas, boxes -> Arrow rows -> a fragment under _fcclip/fragments
    commit task (CPU):        a shard's fragments -> DEST/part-NNNNNN.parquet (atomic), fragments deleted

Faults, all bounded:
- a decode task whose worker dies (a decoder segfault, an OOM kill) splits its chunk into single images at once:
  a decoder crash is usually one image's doing, and retrying the whole chunk would only crash on it again. Each
  single image's decode, and every write and commit task, is retried by Ray ``RETRIES`` times; a write task that
  still fails is split the same way; an image that fails alone becomes an error row;
- a model actor that dies (killed, its node removed) is replaced; its chunk is run again, at most ``RETRIES`` times,
  then image by image as above;
- a model call running past ``batch_timeout`` per batch is abandoned: its actor is killed and replaced, the chunk's
  images are run again one at a time, and an image that times out alone becomes an error row.
"""
from __future__ import annotations

import collections
import logging
import time
from dataclasses import dataclass, field

import pyarrow.compute as pc
import ray

from . import runtime
from .output import Destination, commit_shard, write_fragment
from .stages import ReadDecode, encode_rows, label_images, run_metadata

logger = logging.getLogger("fcclip.label")

RETRIES = runtime.RETRIES


class LabelError(RuntimeError):
    """The job cannot go on (the model cannot start, a shard cannot be committed)."""


# ---------------------------------------------------------------------------------------------------- Ray stages
def _decode(decoder: ReadDecode, uris: list[str]):
    meta, images = decoder(uris)
    return meta, images


def _write(dest_uri: str, shard: int, rows: list[int], uris: list[str], meta: dict | None, labeled: dict | None,
           constants: dict, errors: list[str] | None = None) -> dict:
    table = encode_rows(uris, rows, meta, labeled, constants, errors=errors)
    name = write_fragment(Destination(dest_uri), shard, table)
    status = table.column("status").to_pylist()
    reasons: dict[str, int] = {}
    for err in table.column("error").to_pylist():
        if err:
            reason = err.split(":", 1)[0][:60]
            reasons[reason] = reasons.get(reason, 0) + 1
    return {
        "fragment": name, "ok": status.count("ok"), "failed": len(status) - status.count("ok"),
        "segments": int(pc.sum(pc.list_value_length(table.column("segments"))).as_py() or 0), "errors": reasons,
    }


def _commit(dest_uri: str, shard: int, fragments: list[str], expected: int, file_metadata: dict) -> int:
    return commit_shard(Destination(dest_uri), shard, fragments, expected, file_metadata)


def _label_chunk(model_stage, batch_size: int, meta: dict, images: list) -> dict:
    """The model actor's work on one chunk (runtime.ModelActor.run)."""
    return label_images(model_stage, meta, images, batch_size)


# ---------------------------------------------------------------------------------------------------- the driver
@dataclass
class Chunk:
    shard: int
    rows: list[int]
    uris: list[str]
    isolated: bool = False  # a single image run again after its chunk failed
    attempts: int = 0  # model calls that died with their actor
    meta: dict | None = None
    images: object = None  # ObjectRef


@dataclass
class _Actor:
    handle: object
    ready_ref: object
    ready: bool = False
    calls: collections.deque = field(default_factory=collections.deque)  # (chunk, info_ref, labeled_ref, budget)
    head_since: float = 0.0  # when the oldest call started, as far as the driver knows
    failures: int = 0


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


class LabelEngine:
    """Schedules one run's pending shards; see the module docstring."""

    def __init__(self, dest: Destination, shard_sizes: dict[int, int], uris_of, decoder: ReadDecode, make_model_stage, *,
                 actors: tuple[int, int], batch_size: int, chunk_size: int, gpus: float, cpus_per_actor: float,
                 batch_timeout: float | None, constants: dict, file_metadata: dict, progress=None,
                 ask_run_metadata: bool = False, on_committed=None):
        self.dest = dest
        self.sizes = shard_sizes
        self.uris_of = uris_of  # shard -> its URIs (read from the manifest when the shard is scheduled)
        self.decoder_ref = ray.put(decoder)
        self.make_model_stage = make_model_stage
        self.actors_range = actors
        self.batch_size = batch_size
        self.chunk_size = max(1, chunk_size)
        self.gpus = gpus
        self.cpus_per_actor = cpus_per_actor
        self.batch_timeout = batch_timeout
        self.constants = constants
        self.file_metadata = file_metadata
        self.progress = progress
        self.on_committed = on_committed  # shard -> None, on the driver once its part file is written (the table's log)
        self.ask_run_metadata = ask_run_metadata  # ask the first ready actor for its model's run metadata, add it to the files'
        self.result = EngineResult()
        cpus = max(1, int(ray.cluster_resources().get("CPU", 1)))
        self.max_decoding = cpus + 1
        decode = ray.remote(_decode)
        self.decode_fn = decode.options(num_cpus=1, num_returns=2, max_retries=RETRIES)
        # a chunk's decode is not retried: its worker's death splits the chunk into single images instead
        self.decode_chunk_fn = decode.options(num_cpus=1, num_returns=2, max_retries=0)
        self.write_fn = ray.remote(_write).options(num_cpus=1, max_retries=RETRIES)
        self.commit_fn = ray.remote(_commit).options(num_cpus=0.5, max_retries=RETRIES)

    # ------------------------------------------------------------------ actors
    def _new_actor(self) -> _Actor:
        handle = runtime.start_model_actor(self.make_model_stage, gpus=self.gpus, cpus=self.cpus_per_actor)
        return _Actor(handle, handle.ready.remote())

    def _replace(self, actor: _Actor) -> _Actor:
        ray.kill(actor.handle, no_restart=True)
        return self._new_actor()

    # ------------------------------------------------------------------ the loop
    def run(self, pending: list[int]) -> EngineResult:
        """Label the ``pending`` shards: every row of each ends in its committed part file (ok or error row)."""
        self.queue: collections.deque[Chunk] = collections.deque()  # to decode
        self.shards = collections.deque(pending)  # not yet split into chunks
        self.open_shards: dict[int, dict] = {}  # shard -> {"fragments": [names], "covered": rows written so far}
        self.decoding: dict = {}  # meta ref -> chunk
        self.decoded: collections.deque[Chunk] = collections.deque()  # waiting for a model call
        self.writing: dict = {}  # ref -> chunk
        self.committing: dict = {}  # ref -> (shard, attempts)
        self.actors = [self._new_actor() for _ in range(self.actors_range[1])]
        self.startup_failures = 0
        while (self.shards or self.queue or self.decoding or self.decoded or self.writing or self.committing
               or any(a.calls for a in self.actors)):
            self._refill()
            self._submit_decodes()
            self._submit_model_calls()
            ready = self._wait()
            if ready is None:
                continue
            now = time.monotonic()
            for i in range(len(self.actors)):
                self._on_actor(i, ready, now)
            self._on_decoded(ready)
            self._on_written(ready)
            self._on_committed(ready)
        for actor in self.actors:
            ray.kill(actor.handle, no_restart=True)
        return self.result

    def _refill(self) -> None:
        """Split shards into chunks as capacity frees up: at most a few shards open at a time."""
        while self.shards and len(self.queue) < 8:
            shard = self.shards.popleft()
            uris = self.uris_of(shard)
            self.open_shards[shard] = {"fragments": [], "covered": 0}
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
        ref = self.write_fn.remote(self.dest.uri, chunk.shard, chunk.rows, chunk.uris, chunk.meta, labeled_ref,
                                   self.constants, errors=errors)
        chunk.images = None
        self.writing[ref] = chunk

    def _submit_decodes(self) -> None:
        # decoded chunks wait in the object store for a model call: enough to keep every actor busy, no more
        while (self.queue and len(self.decoding) < self.max_decoding
               and len(self.decoding) + len(self.decoded) < 4 * len(self.actors)):
            chunk = self.queue.popleft()
            decode = self.decode_fn if len(chunk.uris) == 1 else self.decode_chunk_fn
            meta_ref, images_ref = decode.remote(self.decoder_ref, chunk.uris)
            chunk.images = images_ref
            self.decoding[meta_ref] = chunk

    def _submit_model_calls(self) -> None:
        now = time.monotonic()
        for actor in self.actors:
            while actor.ready and self.decoded and len(actor.calls) < 2:
                chunk = self.decoded.popleft()
                info_ref, labeled_ref = actor.handle.run.options(num_returns=2).remote(
                    _label_chunk, self.batch_size, chunk.meta, chunk.images)
                batches = -(-len(chunk.rows) // self.batch_size)
                if not actor.calls:
                    actor.head_since = now
                actor.calls.append((chunk, info_ref, labeled_ref, batches))

    def _wait(self) -> set | None:
        """The references that are done (at least one within half a second), or None when nothing can move."""
        waiting = list(self.decoding) + list(self.writing) + list(self.committing)
        waiting += [a.ready_ref for a in self.actors if not a.ready]
        waiting += [a.calls[0][1] for a in self.actors if a.calls]
        if not waiting:  # nothing can move (no actor at all): should not happen, but never spin
            time.sleep(0.1)
            return None
        ready, _ = ray.wait(waiting, num_returns=1, timeout=0.5, fetch_local=False)
        if ready:
            ready, _ = ray.wait(waiting, num_returns=len(waiting), timeout=0, fetch_local=False)
        return set(ready)

    def _on_actor(self, i: int, ready: set, now: float) -> None:
        """Actor ``i``: started (or failed to), its oldest call done (or died, or ran past the time limit)."""
        actor = self.actors[i]
        if not actor.ready:
            if actor.ready_ref in ready:
                self._on_started(i)
            return
        if not actor.calls:
            return
        chunk, info_ref, labeled_ref, batches = actor.calls[0]
        if info_ref in ready:
            actor.calls.popleft()
            actor.head_since = now
            try:
                info = ray.get(info_ref)
            except ray.exceptions.RayActorError as e:
                logger.warning("a model actor died (%s); replacing it", _short(e))
                requeue = [c for c, *_ in actor.calls]
                self.actors[i] = self._replace(actor)
                for c in [chunk, *requeue]:
                    self._retry(c, "model actor crashed or was killed", count_attempts=True)
                return
            except Exception as e:  # its input was lost (a node removed): decode again
                self._retry(chunk, f"model stage failed: {_short(e)}")
                return
            self.result.actor_images += len(chunk.rows)
            self.result.actor_outside_s += info["total_s"] - info["model_s"]
            self._write(chunk, labeled_ref)
        elif self.batch_timeout and now - actor.head_since > self.batch_timeout * batches:
            limit = self.batch_timeout * batches
            logger.warning("a model call ran past %.0f s; replacing its actor, its images go one by one", limit)
            requeue = [c for c, *_ in list(actor.calls)[1:]]
            actor.calls.clear()
            self.actors[i] = self._replace(actor)
            self._fail(chunk, f"model timed out after {self.batch_timeout:g} s on this image alone")
            for c in reversed(requeue):
                self.decoded.appendleft(c)

    def _on_started(self, i: int) -> None:
        actor = self.actors[i]
        try:
            self.result.model_ids.add(ray.get(actor.ready_ref))
            if self.ask_run_metadata and self.result.run_metadata is None:
                # before any chunk goes to an actor, so before any shard is committed
                _, meta_ref = actor.handle.run.options(num_returns=2).remote(run_metadata)
                self.result.run_metadata = ray.get(meta_ref)
                self.file_metadata = {**self.file_metadata, **self.result.run_metadata}
            actor.ready = True
        except ray.exceptions.RayActorError as e:
            self.startup_failures += 1
            if self.startup_failures > RETRIES + len(self.actors):
                raise LabelError(f"the model actor could not start: {_short(e)}") from None
            logger.warning("a model actor failed to start (%s); starting another", _short(e))
            self.actors[i] = self._new_actor()

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
                chunk.meta = ray.get(ref)
            except Exception as e:  # the task's worker died (a chunk's at once, a single image's after retries)
                chunk.images = None
                self._fail(chunk, _crashed(e))
                continue
            if not any(not err for err in chunk.meta["error"]):
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
                self._fail(chunk, _crashed(e))
                continue
            if res.first_rows_at is None:
                res.first_rows_at = time.time()
            res.ok += info["ok"]
            res.failed += info["failed"]
            res.segments += info["segments"]
            for reason, n in info["errors"].items():
                res.errors[reason] = res.errors.get(reason, 0) + n
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

    def _on_committed(self, ready: set) -> None:
        for ref in [r for r in self.committing if r in ready]:
            shard, attempts = self.committing.pop(ref)
            try:
                ray.get(ref)
            except Exception as e:
                if attempts >= RETRIES:
                    raise LabelError(f"shard {shard} could not be committed: {_short(e)}") from None
                self._commit(shard, attempts + 1)
                continue
            del self.open_shards[shard]
            if self.on_committed is not None:
                self.on_committed(shard)
            self.result.committed.append(shard)
            if self.progress is not None:
                self.progress.committed()


def _crashed(e: BaseException) -> str:
    return (f"worker crashed or was killed while processing this image ({RETRIES + 1} attempts in isolation): "
            f"{_short(e)}")


def _short(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return (text[0] if text else type(e).__name__)[:200]
