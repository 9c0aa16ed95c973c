"""`fcclip label`'s figures as Ray metrics, for Prometheus and Grafana: what the progress lines say, per cluster.

Recorded by the driver through ``ray.util.metrics``; the metrics agent of the driver's node (the head, for a job
submitted with `ray job submit`) serves them in Prometheus' format at its ``--metrics-export-port``, with Ray's own
metrics. Ray prefixes each name with ``ray_`` and counters end in ``_total``; every series has a ``dest`` tag (the
job's DEST) beside Ray's own (``SessionName``, ``WorkerId`` ...):

    ray_fcclip_label_images_total{status="ok"|"failed"}   images written as rows (failed: error rows)
    ray_fcclip_label_segments_total                        segments in those rows
    ray_fcclip_label_shards_committed_total                part files committed to the table
    ray_fcclip_label_model_actors_replaced_total{reason="died"|"timed_out"|"failed_to_start"}
    ray_fcclip_label_images_left                           images of this run not yet written
    ray_fcclip_label_model_actors{state="ready"|"starting"}
    ray_fcclip_label_chunks_waiting                        decoded chunks waiting for a model actor (the backlog)

Counters start from zero in each run (each run is a new driver: Prometheus' ``rate()`` and ``increase()`` take that
in their stride). Ray's agent drops a gauge that is not set again for about 20 s, so the driver sets every gauge each
second, whether it changed or not: a run's gauges vanish soon after it ends, also when its driver was killed (at a
clean end they are set to zero first). Where Ray cannot make or record them, the job goes on without them and says
so in a debug line (``-v``).
"""
from __future__ import annotations

import functools
import logging
import time

logger = logging.getLogger("fcclip.label")

GAUGE_EVERY_S = 1.0  # the gauges are set this often (the driver's loop turns about every half second at most)


def _guarded(record):
    """A recorder method that does nothing once metrics are off, and turns them off on an error (a debug line)."""

    @functools.wraps(record)
    def guarded(self, *args, **kwargs):
        if not self._ok:
            return
        try:
            record(self, *args, **kwargs)
        except Exception as e:  # noqa: BLE001 - metrics are an addition: never the job's end
            logger.debug("Ray metrics off for the rest of this job: %s", e)
            self._ok = False

    return guarded


class LabelMetrics:
    """The driver's recorder (after Ray is initialized). Every method is cheap (a few microseconds) and never raises."""

    def __init__(self, dest: str):
        self._last_gauges = 0.0
        self._ok = False
        try:
            from ray.util.metrics import Counter, Gauge

            def metric(kind, name, description, *keys):
                made = kind(name, description=description, tag_keys=("dest", *keys))
                made.set_default_tags({"dest": dest})
                return made

            self.images = metric(Counter, "fcclip_label_images", "images written as rows (failed: error rows)",
                                 "status")
            self.segments = metric(Counter, "fcclip_label_segments", "segments in the rows written")
            self.shards = metric(Counter, "fcclip_label_shards_committed", "part files committed to the table")
            self.replaced = metric(Counter, "fcclip_label_model_actors_replaced", "model actors replaced", "reason")
            self.images_left = metric(Gauge, "fcclip_label_images_left", "images of this run not yet written")
            self.actors = metric(Gauge, "fcclip_label_model_actors", "model actors alive", "state")
            self.waiting = metric(Gauge, "fcclip_label_chunks_waiting", "decoded chunks waiting for a model actor")
            self._ok = True
        except Exception as e:  # noqa: BLE001 - metrics are an addition: never the job's end
            logger.debug("no Ray metrics for this job: %s", e)

    @_guarded
    def labeled(self, ok: int, failed: int, segments: int) -> None:
        """A chunk's rows written."""
        if ok:
            self.images.inc(ok, tags={"status": "ok"})
        if failed:
            self.images.inc(failed, tags={"status": "failed"})
        if segments:
            self.segments.inc(segments)

    @_guarded
    def committed(self) -> None:
        self.shards.inc()

    @_guarded
    def actor_replaced(self, reason: str) -> None:
        """``reason``: died, timed_out or failed_to_start."""
        self.replaced.inc(tags={"reason": reason})

    @_guarded
    def pool(self, actors: list, waiting: int, left: int, force: bool = False) -> None:
        """Each turn of the driver's loop: the pool (``actors``, each with ``ready``), the chunks ``waiting`` for it
        and the images ``left``; the gauges are set every GAUGE_EVERY_S (``force``: now)."""
        now = time.monotonic()
        if not force and now - self._last_gauges < GAUGE_EVERY_S:
            return
        self._last_gauges = now
        ready = sum(1 for a in actors if a.ready)
        self.actors.set(ready, tags={"state": "ready"})
        self.actors.set(len(actors) - ready, tags={"state": "starting"})
        self.waiting.set(waiting)
        self.images_left.set(left)

    def close(self, left: int) -> None:
        """The run's end: nothing alive, nothing waiting; ``left``: what a stopped run left."""
        self.pool([], 0, left, force=True)
