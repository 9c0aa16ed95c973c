"""What `fcclip label` (and `fcclip relabel`) tells a person while it runs: one line per stage of the job.

    listing   12,000 images in 12 shards
    start-up  Ray and 2 model actor(s) ready after 00:24
    labeled  3,120/12,000 images, ok 3,101, failed 19, 41.3 images/s, ETA 03:35
    committed 3/12 shards

On a terminal these are tqdm lines updated in place (on stderr); elsewhere (a log file, `ray job logs`, a test's
pipe) the same information comes as log lines: at each stage's start and end, and about once a minute while
labeling, with the rate since the first rows and the time left at that rate:

    labeled 3,120/12,000 images (19 failed), 41.3 images/s, about 00:03:35 left
"""
from __future__ import annotations

import logging
import os
import sys
import threading
import time

from tqdm import tqdm

logger = logging.getLogger("fcclip.label")

LOG_EVERY_S = 60.0


def _interactive(stream) -> bool:
    try:
        return stream.isatty()
    except (AttributeError, ValueError):
        return False


def _clock(seconds: float) -> str:
    seconds = int(seconds + 0.5)
    return f"{seconds // 3600:02d}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"


class JobProgress:
    """The job's progress lines. ``enabled=False`` (``--no-progress``) keeps only the log lines. ``verb``,
    ``activity`` and ``log``: what the job does to images and where its log lines go (``fcclip relabel``'s)."""

    def __init__(self, enabled: bool = True, stream=None, verb: str = "labeled", activity: str = "labeling",
                 log: logging.Logger = logger):
        self.verb, self.activity, self.log = verb, activity, log
        self.stream = stream if stream is not None else sys.stderr
        self.bars = enabled and _interactive(self.stream)
        self._listing = self._startup = self._labeled = self._committed = None
        self._listed = 0
        self._started = None
        self._first = None  # (time, images) at the first log line of labeling: where its rate is counted from
        self._counts = {"ok": 0, "failed": 0}
        self._total_images = self._total_shards = 0
        self._last_log = 0.0
        self._lock = threading.Lock()
        self._stop_clock = threading.Event()

    def _bar(self, desc: str, **kw) -> tqdm:
        try:
            columns = os.get_terminal_size(self.stream.fileno()).columns
        except (OSError, AttributeError, ValueError):
            columns = 0
        return tqdm(desc=f"{desc:9s}", file=self.stream, ncols=columns or 100, leave=True, mininterval=0.5, **kw)

    # ------------------------------------------------------------------ listing
    def listing_started(self, source: str) -> None:
        if self.bars:
            self._listing = self._bar("listing", unit=" images", bar_format="{desc} {n_fmt} images ({elapsed})")

    def listed(self, n: int) -> None:
        self._listed += n
        if self._listing is not None:
            self._listing.update(n)

    def listing_done(self, images: int, shards: int) -> None:
        if self._listing is not None:
            self._listing.bar_format = "{desc} {n_fmt} images in " + f"{shards} shards" + " ({elapsed})"
            self._listing.n = images
            self._listing.close()
            self._listing = None

    # ------------------------------------------------------------------ start-up
    def startup_started(self, actors: int, most: int | None = None, ray_up: bool = False) -> None:
        """``actors`` model actors start at once (--actors MIN), more up to ``most`` (MAX) as the backlog grows;
        Ray with them unless ``ray_up``."""
        more = f" (up to {most} as the backlog grows)" if most and most > actors else ""
        self._startup_what = ("" if ray_up else "Ray and ") + f"{actors} model actor(s){more}"
        what = self._startup_what + " starting"
        if not self.bars:
            logger.info("%s", what)
        if self.bars:
            self._startup = bar = self._bar("start-up", bar_format="{desc} " + what + " ... {elapsed}")
            stop = self._stop_clock = threading.Event()

            def clock():  # the driver blocks until the first rows come: keep the start-up clock moving meanwhile
                while not stop.wait(1.0):
                    with self._lock:
                        if self._startup is bar:
                            bar.refresh()
            threading.Thread(target=clock, name="fcclip-progress", daemon=True).start()

    def _startup_done(self) -> None:
        if self._started is None:
            self._started = time.monotonic()
            self._stop_clock.set()
            with self._lock:
                if self._startup is not None:
                    self._startup.bar_format = "{desc} " + self._startup_what + " ready after {elapsed}"
                    self._startup.close()
                    self._startup = None

    # ------------------------------------------------------------------ labeling and commits
    def labeling_started(self, images: int, shards: int, skipped_shards: int) -> None:
        """``images`` in ``shards`` to go (called again for more: a relabel's next increment)."""
        self._total_images = self._counts["ok"] + self._counts["failed"] + images
        if skipped_shards:
            self.log.info("%d shard(s) already committed by an earlier run are skipped", skipped_shards)
        self._total_shards = (self._committed.n if self._committed is not None else 0) + shards
        if self._labeled is not None:
            self._labeled.total, self._committed.total = self._total_images, self._total_shards
        if not self.bars:
            self.log.info("%s %d images in %d shards", self.activity, images, shards)

    def _open_labeling_bars(self) -> None:
        """Once the start-up line is done (so that the lines do not take each other's place)."""
        self._labeled = self._bar(
            self.verb, total=self._total_images, unit=" images",
            bar_format="{desc} {n_fmt}/{total_fmt} images{postfix}, {rate_fmt}, ETA {remaining}",
        )
        self._labeled.set_postfix_str("ok 0, failed 0", refresh=False)
        self._committed = self._bar(
            "committed", total=self._total_shards, bar_format="{desc} {n_fmt}/{total_fmt} shards"
        )

    def labeled(self, ok: int, failed: int) -> None:
        self._startup_done()
        self._counts["ok"] += ok
        self._counts["failed"] += failed
        if self.bars and self._labeled is None:
            self._open_labeling_bars()
        if self._labeled is not None:
            self._labeled.set_postfix_str(f"ok {self._counts['ok']:,}, failed {self._counts['failed']:,}",
                                           refresh=False)
            self._labeled.update(ok + failed)
        elif time.monotonic() - self._last_log >= LOG_EVERY_S:
            self._last_log = now = time.monotonic()
            done = self._counts["ok"] + self._counts["failed"]
            line = f"{self.verb} {done:,}/{self._total_images:,} images ({self._counts['failed']:,} failed)"
            if self._first is None:  # the first rows: the rate is counted from here
                self._first = (now, done)
            elif now > self._first[0]:
                rate = (done - self._first[1]) / (now - self._first[0])
                left = max(self._total_images - done, 0)
                line += f", {rate:.1f} images/s" + (f", about {_clock(left / rate)} left" if rate > 0 else "")
            self.log.info("%s", line)

    def committed(self, shards: int = 1) -> None:
        if self.bars and self._labeled is None:
            self._startup_done()
            self._open_labeling_bars()
        if self._committed is not None:
            self._committed.update(shards)

    def close(self) -> None:
        self._stop_clock.set()
        for bar in (self._listing, self._startup, self._labeled, self._committed):
            if bar is not None:
                bar.close()
        self._listing = self._startup = self._labeled = self._committed = None
