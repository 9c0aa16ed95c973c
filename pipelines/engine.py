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
- a task whose worker dies (a decoder segfault, an OOM kill) is retried by Ray ``RETRIES`` times; a chunk that still
  fails is split into single images, run again one at a time; an image that fails alone becomes an error row;
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
from .sink import Destination, commit_shard, write_fragment
from .stages import ReadDecode, describe_model, encode_rows, label_images

logger = logging.getLogger("fcclip.label")

RETRIES = runtime.RETRIES


class LabelError(RuntimeError):
    """The job cannot go on (the model cannot start, a shard cannot be committed)."""


# ---------------------------------------------------------------------------------------------------- Ray stages
def _decode(reader: ReadDecode, uris: list[str]):
    meta, images = reader(uris)
    return meta, images


def _write(dest_uri: str, shard: int, rows: list[int], uris: list[str], meta: dict | None, labelled: dict | None,
           constants: dict, errors: list[str] | None = None) -> dict:
    table = encode_rows(uris, rows, meta, labelled, constants, errors=errors)
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


def _label_chunk(segmenter, batch_size: int, meta: dict, images: list) -> dict:
    """The model actor's work on one chunk (runtime.ModelActor.run)."""
    return label_images(segmenter, meta, images, batch_size)


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
    calls: collections.deque = field(default_factory=collections.deque)  # (chunk, info_ref, labelled_ref, budget)
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
    model_metadata: dict | None = None  # the model stage's run_metadata (asked of the first actor, with describe)


class LabelEngine:
    """Schedules one run's pending shards; see the module docstring."""

    def __init__(self, dest: Destination, shard_sizes: dict[int, int], uris_of, reader: ReadDecode, model_stage, *,
                 actors: tuple[int, int], batch_size: int, chunk_size: int, gpus: float, cpus_per_actor: float,
                 batch_timeout: float | None, constants: dict, file_metadata: dict, progress=None,
                 describe: bool = False):
        self.dest = dest
        self.sizes = shard_sizes
        self.uris_of = uris_of  # shard -> its URIs (read from the manifest when the shard is scheduled)
        self.reader_ref = ray.put(reader)
        self.model_stage = model_stage
        self.actors_range = actors
        self.batch_size = batch_size
        self.chunk_size = max(1, chunk_size)
        self.gpus = gpus
        self.cpus_per_actor = cpus_per_actor
        self.batch_timeout = batch_timeout
        self.constants = constants
        self.file_metadata = file_metadata
        self.progress = progress
        self.describe = describe  # ask the first ready actor for its model's run metadata, add it to the files'
        self.result = EngineResult()
        cpus = max(1, int(ray.cluster_resources().get("CPU", 1)))
        self.max_decoding = cpus + 1
        self.decode_fn = ray.remote(_decode).options(num_cpus=1, num_returns=2, max_retries=RETRIES)
        self.write_fn = ray.remote(_write).options(num_cpus=1, max_retries=RETRIES)
        self.commit_fn = ray.remote(_commit).options(num_cpus=0.5, max_retries=RETRIES)

    # ------------------------------------------------------------------ actors
    def _new_actor(self) -> _Actor:
        handle = runtime.start_model_actor(self.model_stage, gpus=self.gpus, cpus=self.cpus_per_actor)
        return _Actor(handle, handle.ready.remote())

    def _replace(self, actor: _Actor) -> _Actor:
        ray.kill(actor.handle, no_restart=True)
        return self._new_actor()

    # ------------------------------------------------------------------ the loop
    def run(self, pending: list[int]) -> EngineResult:
        res = self.result
        queue: collections.deque[Chunk] = collections.deque()
        shards = collections.deque(pending)
        open_shards: dict[int, dict] = {}  # shard -> {"fragments": [names], "covered": rows written so far}
        decoding: dict = {}  # meta ref -> chunk
        decoded: collections.deque[Chunk] = collections.deque()
        writing: dict = {}  # ref -> chunk
        committing: dict = {}  # ref -> (shard, attempts)
        actors = [self._new_actor() for _ in range(self.actors_range[1])]
        startup_failures = 0

        def refill():
            # schedule shards' chunks as capacity frees up: at most a few shards open at a time
            while shards and len(queue) < 8:
                shard = shards.popleft()
                uris = self.uris_of(shard)
                open_shards[shard] = {"fragments": [], "covered": 0}
                for start in range(0, len(uris), self.chunk_size):
                    rows = list(range(start, min(start + self.chunk_size, len(uris))))
                    queue.append(Chunk(shard, rows, uris[rows[0] : rows[-1] + 1]))

        def fail(chunk: Chunk, reason: str):
            """A chunk that could not be labelled: its images one at a time, or an error row for a single image."""
            if len(chunk.rows) > 1:
                res.recovered += len(chunk.rows)
                for row, uri in zip(reversed(chunk.rows), reversed(chunk.uris)):
                    queue.appendleft(Chunk(chunk.shard, [row], [uri], isolated=True))
                return
            ref = self.write_fn.remote(self.dest.uri, chunk.shard, chunk.rows, chunk.uris, chunk.meta, None,
                                       self.constants, errors=[reason])
            writing[ref] = chunk

        while shards or queue or decoding or decoded or writing or committing or any(a.calls for a in actors):
            refill()
            # decoded chunks wait in the object store for a model call: enough to keep every actor busy, no more
            while queue and len(decoding) < self.max_decoding and len(decoding) + len(decoded) < 4 * len(actors):
                chunk = queue.popleft()
                meta_ref, images_ref = self.decode_fn.remote(self.reader_ref, chunk.uris)
                chunk.images = images_ref
                decoding[meta_ref] = chunk
            now = time.monotonic()
            for actor in actors:
                while actor.ready and decoded and len(actor.calls) < 2:
                    chunk = decoded.popleft()
                    info_ref, labelled_ref = actor.handle.run.options(num_returns=2).remote(
                        _label_chunk, self.batch_size, chunk.meta, chunk.images)
                    batches = -(-len(chunk.rows) // self.batch_size)
                    if not actor.calls:
                        actor.head_since = now
                    actor.calls.append((chunk, info_ref, labelled_ref, batches))

            waiting = list(decoding) + list(writing) + list(committing)
            waiting += [a.ready_ref for a in actors if not a.ready]
            waiting += [a.calls[0][1] for a in actors if a.calls]
            if not waiting:  # nothing can move (no actor at all): should not happen, but never spin
                time.sleep(0.1)
                continue
            ready, _ = ray.wait(waiting, num_returns=1, timeout=0.5, fetch_local=False)
            if ready:
                ready, _ = ray.wait(waiting, num_returns=len(waiting), timeout=0, fetch_local=False)
            ready = set(ready)
            now = time.monotonic()

            for i, actor in enumerate(actors):
                if not actor.ready and actor.ready_ref in ready:
                    try:
                        res.model_ids.add(ray.get(actor.ready_ref))
                        if self.describe and res.model_metadata is None:
                            # before any chunk goes to an actor, so before any shard is committed
                            _, meta_ref = actor.handle.run.options(num_returns=2).remote(describe_model)
                            res.model_metadata = ray.get(meta_ref)
                            self.file_metadata = {**self.file_metadata, **res.model_metadata}
                        actor.ready = True
                    except ray.exceptions.RayActorError as e:
                        startup_failures += 1
                        if startup_failures > RETRIES + len(actors):
                            raise LabelError(f"the model actor could not start: {_short(e)}") from None
                        logger.warning("a model actor failed to start (%s); starting another", _short(e))
                        actors[i] = self._new_actor()
                    continue
                if not actor.calls:
                    continue
                chunk, info_ref, labelled_ref, batches = actor.calls[0]
                if info_ref in ready:
                    actor.calls.popleft()
                    actor.head_since = now
                    try:
                        info = ray.get(info_ref)
                    except ray.exceptions.RayActorError as e:
                        logger.warning("a model actor died (%s); replacing it", _short(e))
                        requeue = [c for c, *_ in actor.calls]
                        actors[i] = self._replace(actor)
                        for c in [chunk, *requeue]:
                            c.attempts += 1
                            if c.attempts > RETRIES:
                                fail(c, f"model actor crashed or was killed ({c.attempts} attempts)")
                            else:
                                queue.appendleft(c)  # decoded again: its images may have died with a node
                        continue
                    except Exception as e:  # its input was lost (a node removed): decode again
                        chunk.attempts += 1
                        if chunk.attempts > RETRIES:
                            fail(chunk, f"model stage failed: {_short(e)}")
                        else:
                            queue.appendleft(chunk)
                        continue
                    res.actor_images += len(chunk.rows)
                    res.actor_outside_s += info["total_s"] - info["model_s"]
                    ref = self.write_fn.remote(self.dest.uri, chunk.shard, chunk.rows, chunk.uris, chunk.meta,
                                               labelled_ref, self.constants)
                    chunk.images = None
                    writing[ref] = chunk
                elif self.batch_timeout and now - actor.head_since > self.batch_timeout * batches:
                    limit = self.batch_timeout * batches
                    logger.warning("a model call ran past %.0f s; replacing its actor, its images go one by one", limit)
                    requeue = [c for c, *_ in list(actor.calls)[1:]]
                    actor.calls.clear()
                    actors[i] = self._replace(actor)
                    fail(chunk, f"model timed out after {self.batch_timeout:g} s on this image alone")
                    for c in reversed(requeue):
                        decoded.appendleft(c)

            for ref in [r for r in decoding if r in ready]:
                chunk = decoding.pop(ref)
                try:
                    chunk.meta = ray.get(ref)
                except Exception as e:  # the task's worker kept dying (after Ray's retries)
                    chunk.images = None
                    fail(chunk, f"worker crashed or was killed while processing this image ({RETRIES + 1} attempts "
                                f"in isolation): {_short(e)}")
                    continue
                if not any(not err for err in chunk.meta["error"]):
                    ref = self.write_fn.remote(self.dest.uri, chunk.shard, chunk.rows, chunk.uris, chunk.meta, None,
                                               self.constants)
                    chunk.images = None
                    writing[ref] = chunk
                else:
                    decoded.append(chunk)

            for ref in [r for r in writing if r in ready]:
                chunk = writing.pop(ref)
                try:
                    info = ray.get(ref)
                except Exception as e:
                    fail(chunk, f"worker crashed or was killed while processing this image ({RETRIES + 1} attempts "
                                f"in isolation): {_short(e)}")
                    continue
                if res.first_rows_at is None:
                    res.first_rows_at = time.time()
                res.ok += info["ok"]
                res.failed += info["failed"]
                res.segments += info["segments"]
                for reason, n in info["errors"].items():
                    res.errors[reason] = res.errors.get(reason, 0) + n
                if self.progress is not None:
                    self.progress.labelled(info["ok"], info["failed"])
                state = open_shards[chunk.shard]
                state["fragments"].append(info["fragment"])
                state["covered"] += len(chunk.rows)
                if state["covered"] == self.sizes[chunk.shard]:
                    ref = self.commit_fn.remote(self.dest.uri, chunk.shard, state["fragments"], self.sizes[chunk.shard],
                                                self.file_metadata)
                    committing[ref] = (chunk.shard, 0)

            for ref in [r for r in committing if r in ready]:
                shard, attempts = committing.pop(ref)
                try:
                    ray.get(ref)
                except Exception as e:
                    if attempts >= RETRIES:
                        raise LabelError(f"shard {shard} could not be committed: {_short(e)}") from None
                    state = open_shards[shard]
                    ref = self.commit_fn.remote(self.dest.uri, shard, state["fragments"], self.sizes[shard],
                                                self.file_metadata)
                    committing[ref] = (shard, attempts + 1)
                    continue
                del open_shards[shard]
                res.committed.append(shard)
                if self.progress is not None:
                    self.progress.committed()

        for actor in actors:
            ray.kill(actor.handle, no_restart=True)
        return res


def _short(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return (text[0] if text else type(e).__name__)[:200]
