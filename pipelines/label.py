"""`fcclip label`: stream an image collection through FC-CLIP on Ray and write Parquet, resumably.

    fcclip label SOURCE --out DEST --vocab VOCAB [--model PRESET] [--weights W] [--batch-size N]
                 [--actors N | MIN-MAX] [--gpus-per-actor F] [--gpu-wait S] [--min-score S] [--short-edge N] [--address ADDR]
                 [--decode-timeout SECONDS] [--batch-timeout SECONDS] [--overwrite] [--max-failed-fraction F]
                 [--embeddings]

The job, in order:
1. The driver takes DEST's lock (one writer at a time, pipelines/lake.py). SOURCE is listed (or the manifest or
   inventory report read) in a stream to Parquet files on local disk, deduplicated in DuckDB and split into shards
   of ``--shard-size`` URIs, written under DEST/_fcclip/manifest; then the run's settings (DEST/_fcclip/run.json).
   A rerun with the same DEST resumes the run; once it is complete, a rerun lists SOURCE again and labels what the
   table lacks (new URIs, changed objects: the run's next shards). A rerun that resumed an unfinished run lists
   SOURCE again as soon as that run is complete, in the same command: what arrived meanwhile waits for no further
   run. Other settings are refused while a shard of the run is committed (``--overwrite`` starts over). A DEST
   holding files fcclip did not write is refused unless ``--overwrite`` (see prepare_run).
2. Shards without a committed part file are labeled on Ray (pipelines/engine.py), in chunks of ``--chunk-size``
   images: read bytes and decode in CPU tasks -> the model stage on actors (GPU when the cluster has one; device
   work only) -> masks to COCO RLE and Arrow rows in CPU tasks, written as fragments -> one commit task per
   completed shard writes its Parquet part file (see pipelines/output.py for why this is exactly-once), and the
   driver names it in a version of DEST's Delta table (pipelines/lake.py). The driver only schedules and keeps
   metadata: no pixels, masks or rows pass through it.
3. Faults are bounded: when a decode task's worker dies (a decoder segfault, an out-of-memory kill), its chunk's
   images are run one at a time, each retried a bounded number of times, and an image that still fails becomes an
   error row. So does a model actor that dies (it is replaced) and a model batch that runs past ``--batch-timeout`` (its
   actor is replaced at once). An image whose read and decode take longer than ``--decode-timeout`` is an error row;
   one stuck where the time limit cannot interrupt it (native code) ends its worker and goes the crash way
   (pipelines/stages.py, ``_time_limit``). Every input image ends up in exactly one row.
4. With ``--embeddings``, each row also holds its segments' query embeddings (fcclip_pipelines.output.EMBEDDING_COLUMNS), and
   the first model actor to start is asked for the model's ``EmbeddingSpace`` (stages.run_metadata), which goes
   into every part file's metadata (``fcclip.embeddings``) and run.json: what ``fcclip relabel`` and ``fcclip
   search`` need beyond the text.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import os
import sys
import time
from dataclasses import asdict, dataclass, field

from tqdm.contrib.logging import logging_redirect_tqdm

from fcclip.config import ConfigError, check_weights, load_config
from fcclip.images import DEFAULT_MAX_PIXELS
from fcclip.vocabulary import (
    PROMPT_TEMPLATES, VocabularyError, load_vocabulary, prompts_surely_fit, validate_prompt_lengths,
)

from . import lake, runtime
from .arguments import COUNT, SCORE, SECONDS, number
from .engine import LabelEngine, LabelError, LabelStopped
from .progress import JobProgress
from .output import PART_RE, Destination, location_key, new_run_id, weights_key
from .sources import IMAGE_EXTENSIONS, SourceError, read_manifest_shard
from .stages import FCCLIPSegmenter, ModelSpec, ReadDecode

logger = logging.getLogger("fcclip.label")



@dataclass
class LabelConfig:
    source: str
    dest: str
    vocab: str
    model: str = "fcclip-convnext-large"
    weights: str = "official"
    batch_size: int = 4
    actors: tuple[int, int] = (1, 1)
    gpus_per_actor: float | None = None  # default: runtime.default_gpus (1 on a cluster; locally the machine's)
    gpu_wait: float = runtime.GPU_WAIT_S  # seconds to wait for the asked-for GPUs before giving up
    cpus_per_actor: float = 1.0
    min_score: float = 0.0
    short_edge: int | None = None  # default: the model's (800 for the released models)
    max_size: int | None = None
    shard_size: int = 1000
    address: str | None = None
    extensions: tuple[str, ...] | None = None
    max_pixels: int | None = None
    chunk_size: int | None = None  # images per decode task, model call and fragment (the driver's unit of work);
    # None: chunk_size_for(gpus)
    batch_timeout: float | None = 600.0  # seconds a model batch may take before its actor is replaced
    decode_timeout: float = 120.0  # seconds to read and decode one image; then an error row (see stages._time_limit)
    autocast: str | None = None
    num_cpus: int | None = None  # for a local Ray started by the job
    embeddings: bool = False  # store each segment's query embeddings (fcclip relabel, fcclip search)
    refresh: bool = True  # a rerun labels changed objects again (their old rows replaced); False: new URIs only
    retry_errors: bool = False  # a rerun also labels again the error rows of unchanged objects (replacing them)
    prune: bool = False  # a rerun removes the rows of URIs SOURCE no longer lists


@dataclass
class LabelSummary:
    dest: str
    run_id: str
    images: int = 0
    ok: int = 0
    failed: int = 0
    segments: int = 0
    skipped_shards: int = 0  # committed by an earlier run
    seconds: float = 0.0
    non_image_files: int = 0
    duplicate_uris: int = 0
    recovered: int = 0  # rows re-run one by one after a worker crash, a dead actor or a model time-out
    errors: dict = field(default_factory=dict)
    startup_seconds: float = 0.0  # listing, cluster start, model loading, the first chunk: until the first rows arrived
    actor_overhead_s_per_image: float | None = None  # model actor time per image outside the model stage's call
    model_actors: int = 0  # the most model actors alive at once (the pool grows from MIN towards MAX)
    new: int | None = None  # URIs of this listing DEST lacked (None: the first listing)
    changed: int | None = None  # URIs whose object changed since labeled (labeled again unless --no-refresh)
    unchanged: int | None = None
    not_refreshed: int = 0  # changed, kept as labeled (--no-refresh)
    retried: int = 0  # unchanged objects whose error rows were labeled again (--retry-errors)
    # error rows of images SOURCE still lists that this run kept as they are, not labeled again (None: the first
    # listing); rows of images gone from SOURCE are counted in ``gone``
    error_rows: int | None = None
    gone: int = 0  # URIs of the table SOURCE no longer lists (their rows kept unless --prune)
    pruned: int = 0  # rows of those removed (--prune)
    version: int | None = None  # the table's current version (DEST/_delta_log) when the job ended
    resumed: bool = False  # this run went on with a listing an earlier, unfinished run made
    finished_first: dict | None = None  # when it did: that listing's part (images, ok, failed, new, changed, ...);
    # the counts above then add both parts, and the listing's fields describe SOURCE listed again

    @property
    def images_per_second(self) -> float:
        return (self.ok + self.failed) / self.seconds if self.seconds else 0.0


def _settings(cfg: LabelConfig, model_config, vocabulary) -> dict:
    """What must not change between runs writing into one DEST."""
    inf = model_config.inference
    return {
        "model": model_config.name,
        "weights": cfg.weights,
        "vocabulary_digest": vocabulary.digest,
        "min_score": cfg.min_score,
        "short_edge": cfg.short_edge if cfg.short_edge is not None else inf.short_edge,
        "max_size": cfg.max_size if cfg.max_size is not None else inf.max_size,
        "shard_size": cfg.shard_size,
        "source": location_key(cfg.source),
        **({"embeddings": True} if cfg.embeddings else {}),  # absent when off: earlier runs' settings still match
    }


def _thresholds(cfg: LabelConfig, model_config) -> dict:
    inf = model_config.inference
    return {
        "alpha": inf.alpha,
        "beta": inf.beta,
        "object_mask_threshold": inf.object_mask_threshold,
        "overlap_threshold": inf.overlap_threshold,
        "min_score": cfg.min_score,
    }


class DestinationError(ValueError):
    """DEST cannot take this run (nothing was read from it but its listing, nothing was written)."""


class RunMismatch(DestinationError):
    pass


def _describe(names: list[str], limit: int = 5) -> str:
    shown = ", ".join(repr(n) for n in names[:limit])
    return shown + (f" and {len(names) - limit} more" if len(names) > limit else "")


def reopen_run(dest, settings: dict, overwrite: bool = False) -> dict | None:
    """The run in DEST to resume (its run.json), or None when a new one is to start there (DEST cleared of an
    earlier run's files where that is allowed). The rules of :func:`prepare_run`, shared with ``fcclip relabel``.

    Raises DestinationError (foreign files, without ``overwrite``) or RunMismatch (other settings, committed shards).
    """

    survey = dest.survey()
    if survey.foreign and survey.run is None:  # once a run is there (resumed), files put beside it are not checked
        collisions = [n for n in survey.foreign if PART_RE.fullmatch(n)]
        if collisions:
            raise DestinationError(
                f"{dest.uri} holds files fcclip did not write with the names of its output ({_describe(collisions)}); "
                "they were left untouched. Write into another --out, or move them away"
            )
        if not overwrite:
            raise DestinationError(
                f"{dest.uri} holds files fcclip did not write ({_describe(survey.foreign)}); nothing was read or "
                "changed. Use an empty or new --out (readers of DEST/*.parquet would mix them with the labels), "
                "or --overwrite to write beside them"
            )
    run = survey.run
    if run is not None:
        recorded = dict(run["settings"])
        if isinstance(recorded.get("source"), str):  # runs before 2026-12-07 recorded it as typed
            recorded["source"] = location_key(recorded["source"])
        if isinstance(recorded.get("weights"), str):  # a release before recorded a checkpoint's path as typed
            recorded["weights"] = weights_key(recorded["weights"])
        differ = {k: (recorded.get(k), v) for k, v in settings.items() if recorded.get(k) != v}
        if overwrite or differ or not run.get("manifest_complete"):
            if differ and survey.parts and not overwrite:
                detail = "; ".join(f"{k}: {a!r} there, {b!r} now" for k, (a, b) in differ.items())
                raise RunMismatch(
                    f"{dest.uri} holds a run with other settings ({detail}) and {len(survey.parts)} "
                    "committed shard(s); use another --out, or --overwrite to replace that run"
                )
            if differ and not overwrite:
                logger.info("%s holds an earlier run's settings but none of its shards: starting over", dest.uri)
            dest.remove_own_files(survey)
        else:
            return run
    return None


def prepare_run(cfg: LabelConfig, dest, model_config, vocabulary, overwrite: bool = False, on_listed=None) -> dict:
    """Create or reopen the run in DEST (manifest, then settings). Returns run.json's content.

    - DEST holding files fcclip did not write, and no run of fcclip's, is refused (DestinationError) unless
      ``overwrite`` (the run then writes beside them); a foreign file with a part file's name is refused even then,
      as the run would replace it.
    - run.json is written only once the manifest is complete: a listing that fails (a typo'd SOURCE) leaves no
      settings behind, and the next run lists again.
    - A run with other settings is replaced when none of its shards is committed (nothing is lost) or when
      ``overwrite`` is given (its part files and ``_fcclip/`` are removed, nothing else); otherwise RunMismatch.

    ``on_listed(n)`` is called as URIs are listed (progress).
    """

    settings = _settings(cfg, model_config, vocabulary)
    run = reopen_run(dest, settings, overwrite)
    if run is not None:
        if not lake.has_table(dest):  # labeled before DEST was a table, or killed before its first version
            lake.adopt_parts(dest, run, dest.survey().parts)
        sizes = run["shard_sizes"]
        done = lake.committed_shards(dest, run)
        if any(s not in done and sizes[s] > 0 for s in range(len(sizes))):
            return run  # an unfinished run or increment: resumed as listed (run_label lists again once it is done)
        return _next_increment(cfg, dest, run, on_listed)
    t = time.time()
    dest.clear_manifest()  # shards of an earlier listing that did not finish
    # the first listing is an increment of an empty table: on local disk and in DuckDB, duplicates dropped there
    listing = lake.plan_increment(cfg.source, dest, {"shard_sizes": []}, cfg.shard_size,
                                  cfg.extensions or IMAGE_EXTENSIONS, on_listed=on_listed)
    sizes = listing.pop("shard_sizes")
    if not sum(sizes):  # a typo'd prefix, an empty folder: said, not a table of nothing reported as done
        dest.clear_manifest()
        skipped = listing["skipped"]
        raise SourceError(
            f"{cfg.source}: no images there" + (f" ({skipped} file(s) without an image extension: "
                                                f"{', '.join(cfg.extensions or IMAGE_EXTENSIONS)})" if skipped else "")
            + "; nothing was written")
    logger.info(
        "listed %d images in %d shards (%.1f s); %d non-image files skipped, %d duplicates",
        sum(sizes), len(sizes), time.time() - t, listing["skipped"], listing["duplicates"],
    )
    run = {
        "run_id": new_run_id(), "settings": settings, "created": time.time(), "manifest_complete": True,
        "vocabulary": vocabulary.to_dict(), "thresholds": _thresholds(cfg, model_config),
        "num_images": sum(sizes), "shard_sizes": sizes,
        "non_image_files": listing["skipped"], "duplicate_uris": listing["duplicates"],
        "increments": [{**listing, "listed": time.time()}],
    }
    dest.write_run(run)
    return run


def _shards_to_label(sizes: list[int]) -> int:
    """The shards that hold images (a prune's shard holds none: it names the files the prune rewrites)."""
    return sum(1 for size in sizes if size)


def _next_increment(cfg: LabelConfig, dest, run: dict, on_listed=None) -> dict:
    """A complete run labeled again: SOURCE listed again, what the table lacks (new URIs, changed objects unless
    ``cfg.refresh`` is off) becomes the run's next shards (pipelines/lake.py). run.json names them only once all are
    written, so a listing cut short is listed again by the next run."""
    t = time.time()
    increment = lake.plan_increment(cfg.source, dest, run, cfg.shard_size, cfg.extensions or IMAGE_EXTENSIONS,
                                    refresh=cfg.refresh, on_listed=on_listed, retry_errors=cfg.retry_errors,
                                    prune=cfg.prune)
    sizes = increment.pop("shard_sizes")
    logger.info(
        "listed %s again (%.1f s): %d new, %d changed%s, %d unchanged%s; %d shard(s) to label%s",
        cfg.source, time.time() - t, increment["new"], increment["changed"],
        f" ({increment['not_refreshed']} more kept as labeled: --no-refresh)" if increment["not_refreshed"] else "",
        increment["unchanged"],
        f" ({increment['retried']} of them error rows, labeled again: --retry-errors)" if increment["retried"] else "",
        _shards_to_label(sizes),
        f", {increment['gone']} row(s) of images gone from SOURCE to remove (--prune)" if "prune_shard" in increment
        else "",
    )
    run = dict(run)
    increments = list(run.get("increments") or [{"first_shard": 0, "new": run["num_images"]}])
    increments.append({**increment, "listed": time.time()})
    run.update(increments=increments, shard_sizes=list(run["shard_sizes"]) + sizes,
               num_images=sum(sizes), non_image_files=increment["skipped"], duplicate_uris=increment["duplicates"])
    dest.write_run(run)
    return run


def run_label(
    cfg: LabelConfig, progress: bool = True, overwrite: bool = False, verbose: bool = False,
    make_model_stage=None, reader=None,
) -> LabelSummary:
    """Run (or resume) a labeling job; returns its summary.

    ``progress``: progress lines (tqdm on a terminal, log lines otherwise); ``verbose`` adds Ray's own warnings.
    ``overwrite``: see prepare_run. The seams for stand-ins (benchmarks, fault tests), both picklable:
    ``make_model_stage``: a zero-argument callable (a class, say) called once in each model actor, returning the model
    stage (see
    stages.FCCLIPSegmenter for its interface); default FC-CLIP as ``cfg`` says. ``reader``: URI -> bytes, called in
    the decode tasks within the decode time limit; default stages.read_bytes (fsspec).
    """

    problem = Destination(cfg.dest).placement_problem()
    if problem:
        raise DestinationError(f"{problem}; nothing was read or written")
    runtime.check_address(cfg.address or os.environ.get("RAY_ADDRESS"))  # a cluster not there: before the listing
    lock = lake.WriterLock(Destination(cfg.dest))
    lock.acquire()  # before anything in DEST is read: one writer at a time (DestinationBusy)
    ray_kept: list[bool] = []  # the Ray a resumed run's first pass started, kept for the second
    try:
        summary = _run_label_once(cfg, progress, overwrite, verbose, make_model_stage, reader, ray_kept)
        if summary.resumed:  # that listing is labeled now: SOURCE again, for what arrived since it was made
            logger.info("the unfinished run is complete: listing %s again", cfg.source)
            then = _run_label_once(cfg, progress, False, verbose, make_model_stage, reader, ray_kept)
            summary = _after_resumed(summary, then)
        return summary
    finally:
        try:
            runtime.shutdown_ray(any(ray_kept))
        finally:
            lock.release()


def _run_label_once(cfg: LabelConfig, progress: bool, overwrite: bool, verbose: bool, make_model_stage,
                    reader, ray_kept: list | None = None) -> LabelSummary:
    bars = JobProgress(enabled=progress)
    try:
        if bars.bars:
            with logging_redirect_tqdm(loggers=[logging.getLogger()]):  # log lines above the progress lines
                return _run_label(cfg, bars, overwrite, verbose, make_model_stage, reader, ray_kept)
        return _run_label(cfg, bars, overwrite, verbose, make_model_stage, reader, ray_kept)
    finally:
        bars.close()


def _after_resumed(first: LabelSummary, then: LabelSummary) -> LabelSummary:
    """One summary of a run that finished an unfinished listing (``first``) and then labeled SOURCE listed again."""
    errors = dict(first.errors)
    for reason, n in then.errors.items():
        errors[reason] = errors.get(reason, 0) + n
    part = {k: getattr(first, k) for k in ("images", "ok", "failed", "segments", "skipped_shards", "seconds", "new",
                                          "changed", "unchanged", "run_id")}
    return dataclasses.replace(
        then, images=first.images + then.images, ok=first.ok + then.ok, failed=first.failed + then.failed,
        segments=first.segments + then.segments, recovered=first.recovered + then.recovered, errors=errors,
        seconds=first.seconds + then.seconds, skipped_shards=first.skipped_shards,
        startup_seconds=first.startup_seconds or then.startup_seconds,
        model_actors=max(first.model_actors, then.model_actors), resumed=True, finished_first=part,
        pruned=first.pruned + then.pruned,
    )


def _run_label(cfg: LabelConfig, bars, overwrite: bool, verbose: bool, make_model_stage, reader,
               ray_kept: list | None = None) -> LabelSummary:
    """One pass: list (or resume a listing), label what is pending. ``ray_kept``: where a resumed run's first pass
    leaves the Ray it started running for the second (whose listing comes next), instead of stopping it."""
    started = time.time()
    model_config = load_config(cfg.model)
    check_weights(model_config, cfg.weights)  # before the listing, Ray and a model actor that would fail to load them
    vocabulary = load_vocabulary(cfg.vocab)  # a bad vocabulary fails here, before any cluster work
    if not prompts_surely_fit(vocabulary):  # a long name: the tokenizer (and PyTorch) tells, here, not in each actor
        from fcclip.backbone import clip_context_length
        from fcclip.text import count_tokens

        validate_prompt_lengths(vocabulary, PROMPT_TEMPLATES, count_tokens, clip_context_length(model_config.clip))
    dest = Destination(cfg.dest)
    bars.listing_started(cfg.source)
    run = prepare_run(cfg, dest, model_config, vocabulary, overwrite=overwrite, on_listed=bars.listed)
    sizes = run["shard_sizes"]
    bars.listing_done(run["num_images"], len(sizes))
    done = lake.committed_shards(dest, run)
    pending = [s for s in range(len(sizes)) if s not in done and sizes[s] > 0]
    increment = lake.latest_increment(run)
    summary = LabelSummary(
        dest=cfg.dest, run_id=run["run_id"], skipped_shards=len(done - set(range(increment["first_shard"]))),
        non_image_files=run.get("non_image_files", 0), duplicate_uris=run.get("duplicate_uris", 0),
        resumed=bool(pending) and increment.get("listed", 0) < started,  # a listing an earlier run made
    )
    if len(run.get("increments") or ()) > 1:
        summary.new, summary.changed, summary.unchanged = increment["new"], increment["changed"], increment["unchanged"]
        summary.not_refreshed = increment.get("not_refreshed", 0)
        summary.retried = increment.get("retried", 0)
        summary.error_rows = increment.get("errors_kept", increment.get("error_rows"))  # a listing of a release before
        summary.gone = increment.get("gone", 0)
    if "prune_shard" in increment and "pruned" not in increment:  # --prune: the rows of URIs gone from SOURCE
        increment["pruned"] = lake.prune(dest, increment, {"run_id": run["run_id"], "model": f"{model_config.name}@"
                                         f"{cfg.weights}", "increment": len(run["increments"]) - 1})
        dest.write_run(run)
    summary.pruned = increment.get("pruned", 0)
    if not pending:
        lake.mark_complete(dest, run)
        summary.version = lake.table_version(dest)
        logger.info("nothing to label: all %d shards of %s are committed", _shards_to_label(sizes), cfg.dest)
        summary.seconds = time.time() - started
        return summary

    bars.startup_started(*cfg.actors, ray_up=bool(ray_kept))  # a resumed run's second pass: on the first's Ray
    started_ray = runtime.init_ray(cfg.address, cfg.num_cpus, verbose)
    try:
        gpus = runtime.resolve_gpus(cfg.gpus_per_actor, cfg.address)
        cpus_per_actor, threads, asked = runtime.model_actor_cpus(cfg.address, cfg.num_cpus, gpus,
                                                                  cfg.cpus_per_actor, cfg.actors)
        asked += f", {cfg.autocast}" if cfg.autocast else ", float32"
        logger.info("%s", asked)
        if gpus:  # granted, or one line and a non-zero exit: never the model on CPU instead
            with runtime.StopSignals("the wait for GPUs", logger) as waiting:
                runtime.wait_for_resources({"GPU": gpus, "CPU": cpus_per_actor}, 1, cfg.gpu_wait, asked,
                                           stop=waiting)
            if waiting.received is not None:  # during the wait, or as it ended
                raise LabelStopped(f"stopped by {waiting.received.name} while waiting for GPUs; nothing was labeled "
                                   "in this run", int(waiting.received))
        spec = ModelSpec(  # device "auto": the actor's device follows the GPU Ray assigns it
            model=cfg.model, weights=cfg.weights, vocabulary=vocabulary.to_dict(), min_score=cfg.min_score,
            autocast=cfg.autocast, embeddings=cfg.embeddings, threads=threads,
        )
        file_metadata = {
            "run_id": run["run_id"], "vocabulary": run["vocabulary"], "thresholds": run["thresholds"],
            "model": model_config.name, "weights": cfg.weights,
        }
        constants = {
            "vocabulary": f"{vocabulary.name}@{vocabulary.digest[:16]}", "run_id": run["run_id"],
            "model": f"{model_config.name}@{cfg.weights}",
        }
        if cfg.embeddings:
            from fcclip.backbone import clip_embed_dim

            constants["embedding_dim"] = clip_embed_dim(model_config.clip)
        committer = lake.ShardCommitter(dest, {
            "run_id": run["run_id"], "model": f"{model_config.name}@{cfg.weights}",
            "vocabulary_digest": vocabulary.digest, "increment": len(run.get("increments") or [None]) - 1,
        })
        inf = model_config.inference
        short_edge = cfg.short_edge if cfg.short_edge is not None else inf.short_edge
        decoder = ReadDecode(
            short_edge if short_edge and short_edge > 0 else None,
            cfg.max_size if cfg.max_size is not None else inf.max_size,
            cfg.max_pixels or DEFAULT_MAX_PIXELS, timeout_s=cfg.decode_timeout, reader=reader,
        )
        stop = runtime.StopSignals("labeling", logger)
        engine = LabelEngine(
            dest, {s: sizes[s] for s in pending}, lambda shard: read_manifest_shard(dest, shard), decoder,
            make_model_stage or FCCLIPSegmenter.builder(spec), actors=cfg.actors, batch_size=cfg.batch_size,
            chunk_size=cfg.chunk_size or chunk_size_for(gpus), gpus=gpus, cpus_per_actor=cpus_per_actor,
            batch_timeout=cfg.batch_timeout, constants=constants, file_metadata=file_metadata, progress=bars,
            ask_run_metadata=cfg.embeddings,
            on_committed=committer, stop=stop,
            # the id the rows' model column holds (NAME@sha256:... of the weights), in each version's commit info too
            on_model_ready=lambda model_id: committer.info.update(model_id=model_id),
        )
        bars.labeling_started(sum(sizes[s] for s in pending), len(pending), summary.skipped_shards)  # of this listing
        try:
            with stop:  # Ctrl-C, SIGTERM: the loop ends at its next turn, and what is committed goes in the table
                result = engine.run(pending)
        except BaseException:  # what is complete goes into the table, also when the job fails or is stopped
            try:
                committer.flush()
            except Exception as e:  # DEST failing ended the job, likely: its first error is the one the user sees
                logger.warning("the shards complete when the job ended could not be committed to the table: %s: %s",
                               type(e).__name__, " ".join(str(e).split())[:200])
            raise
        try:
            committer.flush()
        except Exception as e:  # an OSError, or deltalake's own error (a log that is not a table's)
            raise LabelError(f"the last shards could not be committed to the table: {type(e).__name__}: "
                             f"{' '.join(str(e).split())[:200]}. Their rows are written; run the same command again, "
                             "once DEST takes writes, to label and commit them") from None
    finally:
        if summary.resumed and ray_kept is not None:
            ray_kept.append(started_ray)  # run_label stops it after the second pass
        else:
            runtime.shutdown_ray(started_ray)
    dest.remove_fragments()
    if result.run_metadata and "embeddings" not in run:
        run["embeddings"] = result.run_metadata.get("embeddings")  # what fcclip relabel needs beyond the text
        dest.write_run(run)
    lake.mark_complete(dest, run)  # the engine returned: every pending shard is committed (it raises otherwise)
    summary.images = result.ok + result.failed
    summary.version = lake.table_version(dest)
    summary.ok, summary.failed, summary.segments = result.ok, result.failed, result.segments
    summary.errors = result.errors
    summary.recovered = result.recovered
    summary.model_actors = result.max_actors
    summary.seconds = time.time() - started
    if result.first_rows_at is not None:
        summary.startup_seconds = result.first_rows_at - started
    if result.actor_images:
        summary.actor_overhead_s_per_image = result.actor_outside_s / result.actor_images
    return summary


CHUNK_GPU = 128  # images per chunk where the model actors have GPUs (ConvNeXt-L, 1024 px: about 7 s on an H200)
CHUNK_CPU = 16  # where the model computes on CPU (ConvNeXt-L, 800 px: 11 s an image on 2 cores, 3 min a chunk)


def chunk_size_for(gpus: float) -> int:
    """The default ``--chunk-size``. A chunk is the unit the progress counts and a write covers: where the model
    runs on CPU, 128 images of ConvNeXt-L kept the progress at 0 for 20 minutes on 2 cores. Smaller
    chunks cost the driver a task or three more per chunk, nothing next to a CPU model's seconds per image."""
    return CHUNK_GPU if gpus else CHUNK_CPU


def _parse_actors(text: str) -> tuple[int, int]:
    lo, _, hi = text.partition("-")
    try:
        lo_i, hi_i = int(lo), int(hi or lo)
    except ValueError:
        raise argparse.ArgumentTypeError(f"--actors takes N or MIN-MAX, got {text!r}") from None
    if lo_i < 1 or hi_i < lo_i:
        raise argparse.ArgumentTypeError(f"--actors: need 1 <= MIN <= MAX, got {text!r}")
    return lo_i, hi_i


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("source", help="folder, glob, s3:// / gs:// prefix, or manifest (.parquet/.csv with 'uri', .txt)")
    p.add_argument("--out", required=True, help="output folder or object-store prefix")
    p.add_argument("--vocab", required=True, help="builtin name, .txt/.json/.yaml file, or inline 'cat; dog, puppy'")
    p.add_argument("--model", default="fcclip-convnext-large", help="preset or preset YAML (default: %(default)s)")
    p.add_argument("--weights", default="official", help="'official', 'random' (smoke runs), or a path/URI")
    p.add_argument("--batch-size", type=COUNT, default=4,
                   help="images per model forward pass, of one padded size (default: %(default)s)")
    p.add_argument("--actors", type=_parse_actors, default=(1, 1),
                   help="model actors: N, or MIN-MAX: MIN start at once, more (up to MAX) while images wait for them, "
                   "idle ones end when none are left (default: 1)")
    runtime.add_gpu_arguments(p, "--gpus-per-actor", "model actor", "runs the model on CPU", "the first GPU")
    p.add_argument("--cpus-per-actor", type=number(minimum=0), default=1.0,
                   help="CPUs each model actor asks for, beside its GPUs (default: %(default)g). On CPU the model "
                   "computes with as many threads, except on a local Ray: there the actors compute with all its "
                   "CPUs and ask for fewer where they would leave none to decode images")
    p.add_argument("--min-score", type=SCORE, default=0.0, help="drop segments scoring below this (default: 0)")
    p.add_argument("--short-edge", type=number(int, minimum=0), default=None,
                   help="test-time short edge (default: the model's, 800 for the released models; 0 = keep size)")
    p.add_argument("--max-size", type=COUNT, default=None,
                   help="test-time long-edge limit (default: the model's, 1333 for the released models)")
    p.add_argument("--shard-size", type=COUNT, default=1000,
                   help="images per output Parquet file (default: %(default)d)")
    p.add_argument("--address", default=None, help="Ray cluster address (default: $RAY_ADDRESS, else a local Ray)")
    p.add_argument("--bf16", action="store_true",
                   help="run the model under bfloat16 autocast (where the device computes bfloat16 natively)")
    p.add_argument("--decode-timeout", type=SECONDS, default=120.0,
                   help="seconds to read and decode one image before it becomes an error row (default: %(default)s)")
    p.add_argument("--batch-timeout", type=number(minimum=0), default=600.0,
                   help="seconds one model batch may take; past it the actor is replaced and the images are run one "
                   "at a time, and an image that times out alone is an error row (default: %(default)s; 0 = none)")
    p.add_argument("--chunk-size", type=COUNT, default=None,
                   help=f"images per decode task, model call and written fragment, the steps the progress moves by "
                   f"(default: {CHUNK_GPU} where the model actors have GPUs, {CHUNK_CPU} where the model runs on CPU, "
                   "at seconds per image)")
    p.add_argument("--num-cpus", type=COUNT, default=None, help="CPUs of the local Ray (default: all)")
    p.add_argument("--overwrite", action="store_true",
                   help="start over in a DEST that holds an earlier run (its part files and _fcclip/ are removed), "
                   "or write beside files fcclip did not write; nothing else is removed")
    p.add_argument("--max-failed-fraction", type=SCORE, default=None, metavar="F",
                   help="exit with status 1 when more than this fraction of the images became error rows "
                   "(after committing everything; default: off)")
    p.add_argument("--no-progress", action="store_true", help="no progress lines")
    p.add_argument("-v", "--verbose", action="store_true", default=argparse.SUPPRESS,
                   help="also Ray's own warnings and log lines (as `fcclip -v label`)")
    p.add_argument("--summary-json", default=None, help="also write the run's summary (counts, timings) as JSON")
    p.add_argument("--no-refresh", action="store_true",
                   help="on a rerun, label only URIs DEST lacks: objects changed since labeled keep their old rows")
    p.add_argument("--retry-errors", action="store_true",
                   help="on a rerun, also label again the images whose rows are error rows (a read that failed, a "
                   "time-out); without it they keep their error rows until their object changes")
    p.add_argument("--prune", action="store_true",
                   help="on a rerun, remove the rows of images SOURCE no longer lists (deleted, expired); without it "
                   "they keep their rows. Refused where SOURCE lists none of DEST's images")
    p.add_argument("--embeddings", action="store_true",
                   help="also store each segment's query embeddings (for fcclip relabel and fcclip search)")


def main_args(args: argparse.Namespace, make_model_stage=None, reader=None) -> int:
    """The subcommand; ``make_model_stage`` and ``reader`` as for run_label (tests hand stand-ins in here)."""
    cfg = LabelConfig(
        source=args.source, dest=args.out, vocab=args.vocab, model=args.model, weights=weights_key(args.weights),
        batch_size=args.batch_size, actors=args.actors, gpus_per_actor=args.gpus_per_actor, gpu_wait=args.gpu_wait,
        cpus_per_actor=args.cpus_per_actor, min_score=args.min_score, short_edge=args.short_edge,
        max_size=args.max_size, shard_size=args.shard_size, address=args.address,
        autocast="bf16" if args.bf16 else None, num_cpus=args.num_cpus, decode_timeout=args.decode_timeout,
        batch_timeout=args.batch_timeout or None, chunk_size=args.chunk_size, embeddings=args.embeddings,
        refresh=not args.no_refresh, retry_errors=args.retry_errors, prune=args.prune,
    )
    try:
        summary = run_label(
            cfg, progress=not args.no_progress, overwrite=args.overwrite, verbose=getattr(args, "verbose", False),
            make_model_stage=make_model_stage, reader=reader,
        )
    except (ConfigError, VocabularyError, SourceError, DestinationError, lake.DestinationBusy, lake.PruneRefused,
            FileNotFoundError, NotADirectoryError) as e:
        print(f"fcclip label: error: {e}", file=sys.stderr)
        return 2
    except LabelStopped as e:
        print(f"fcclip label: {e}", file=sys.stderr)
        return 128 + e.signal
    except (LabelError, runtime.ResourcesNotGranted) as e:
        print(f"fcclip label: error: {e}", file=sys.stderr)
        return 1
    print_summary(summary)
    if args.summary_json:
        with open(args.summary_json, "w") as f:
            json.dump(summary_dict(summary), f, indent=1)
    limit = args.max_failed_fraction
    if limit is not None and summary.images and summary.failed / summary.images > limit:
        print(
            f"fcclip label: error: {summary.failed} of {summary.images} image(s) failed "
            f"({summary.failed / summary.images:.1%}), more than --max-failed-fraction {limit:g}; "
            "the rows are committed (see the reasons above)",
            file=sys.stderr,
        )
        return 1
    return 0


def print_summary(s: LabelSummary) -> None:
    print(
        f"labeled {s.images} image(s) in {s.seconds:.1f} s ({s.images_per_second:.2f} images/s): "
        f"{s.ok} ok, {s.failed} failed, {s.segments} segments"
    )
    if s.startup_seconds:
        print(f"(the first labeled rows arrived after {s.startup_seconds:.1f} s: listing, Ray and model start-up, "
              "the first chunk)")
    first = s.finished_first
    if first:
        listing = (f"{first['new']} new, {first['changed']} changed, {first['unchanged']} unchanged"
                   if first["new"] is not None else "the first listing")
        print(f"first finished an unfinished run ({listing}): {first['images']} image(s), {first['ok']} ok, "
              f"{first['failed']} failed; then SOURCE was listed again")
    if s.new is not None:
        kept = f" ({s.not_refreshed} changed kept as labeled, --no-refresh)" if s.not_refreshed else ""
        print(f"listed again: {s.new} new, {s.changed} changed, {s.unchanged} unchanged{kept}")
        if s.retried:
            print(f"{s.retried} error row(s) of unchanged images labeled again (--retry-errors)")
        elif s.error_rows:
            print(f"the table holds {s.error_rows} error row(s), kept as they are until their image changes; "
                  "--retry-errors labels them again (after a failed read or a time-out, say)")
        if s.pruned:
            print(f"{s.pruned} row(s) of images gone from SOURCE removed (--prune)")
        elif s.gone:
            print(f"{s.gone} image(s) of the table are gone from SOURCE and keep their rows; --prune removes them")
    if s.skipped_shards:
        print(f"{s.skipped_shards} shard(s) were already committed by an earlier run and were skipped")
    if s.recovered:
        print(f"{s.recovered} image(s) were re-run one at a time after worker crashes, actor deaths or model time-outs")
    for reason, n in sorted(s.errors.items(), key=lambda kv: -kv[1])[:10]:
        print(f"  {n:6d} x {reason}")
    if s.non_image_files:
        print(f"{s.non_image_files} listed file(s) without an image extension were not labeled")
    if s.duplicate_uris:
        print(f"{s.duplicate_uris} duplicate URI(s) in the source were labeled once")
    version = f", table version {s.version}" if s.version is not None else ""
    print(f"output: {s.dest.rstrip('/')} (a Delta table{version}; run {s.run_id})")


def summary_dict(s: LabelSummary) -> dict:
    d = asdict(s)
    d["images_per_second"] = s.images_per_second
    return d
