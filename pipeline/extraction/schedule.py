"""The driver's scheduling state of `sak-cache run`: shards waiting, being cut, being computed."""

from __future__ import annotations

import time
from dataclasses import dataclass, field

from sak.pipeline.extraction.actors import LiveActors, lost_actor
from sak.pipeline.extraction.runtime import log
from sak.pipeline.extraction.worker import ShardJob
from sak.pipeline.format.records import Throughput


@dataclass
class ShardSchedule:
    """The driver's scheduling state: shards waiting, being cut (CPU tasks), being computed (actors)."""

    queue: list[ShardJob]  # next job last
    total_views: int
    max_in_flight: int = 1  # backpressure: shards between decode and write, 2 per worker + 1
    cutting: dict = field(default_factory=dict)  # ref -> ShardJob
    computing: dict = field(default_factory=dict)  # ref -> (ShardJob, worker index)
    live: LiveActors = field(default_factory=lambda: LiveActors(0))  # shards on each worker, lost ones
    failure: Exception | None = None
    views_done: int = 0
    first_done: float | None = None  # time and views at the first finished shard (steady-state rate)
    views_at_first: int = 0
    steady_views_per_s: float | None = None
    actor_peak_rss_bytes: int | None = None  # the largest a teacher actor reported (host memory)
    hold_first: bool = False  # submit nothing more until the first job has landed (a pca<k> basis fit)

    @classmethod
    def of(cls, jobs: list[ShardJob]) -> ShardSchedule:
        return cls(list(reversed(jobs)), sum(j.views for j in jobs))

    def start(self, n_workers: int) -> None:
        self.live, self.max_in_flight = LiveActors(n_workers), 2 * n_workers + 1

    def can_submit(self) -> bool:
        in_flight = len(self.cutting) + len(self.computing)
        if self.hold_first and in_flight:
            return False
        return bool(self.queue) and self.failure is None and in_flight < self.max_in_flight

    def busy(self) -> bool:
        return bool((self.queue and self.failure is None) or self.cutting or self.computing)

    def idlest_worker(self) -> int:
        return self.live.idlest()

    def lost(self, job: ShardJob, worker: int, error: BaseException) -> bool:
        """The worker computing `job` was lost (its node gone, its process killed): queue the job again,
        for another live worker when there is one (the caller retires `worker` if it is now dead).
        False when the shard was retried too often."""
        if self.failure is not None or not lost_actor(error) or not self.live.lose(worker, job.shard):
            return False
        log.warning(f"shard {job.shard}: its worker was lost ({type(error).__name__}); computing it again")
        self.queue.append(job)
        self.max_in_flight = 2 * (len(self.live.load) - len(self.live.dead)) + 1
        return True

    def landed(self, job: ShardJob, peak_rss_bytes: int | None = None) -> None:
        self.hold_first = False
        if peak_rss_bytes is not None:
            self.actor_peak_rss_bytes = max(self.actor_peak_rss_bytes or 0, peak_rss_bytes)
        self.views_done += job.views
        if self.first_done is None:
            self.first_done, self.views_at_first = time.monotonic(), self.views_done
        elif self.views_done > self.views_at_first:
            rate = (self.views_done - self.views_at_first) / max(time.monotonic() - self.first_done, 1e-9)
            self.steady_views_per_s = round(rate, 3)

    def throughput(self, seconds: float) -> Throughput:
        return Throughput(
            views_this_run=self.views_done,
            seconds_this_run=round(seconds, 3),  # includes start-up: actors, teacher loading
            views_per_s=round(self.views_done / seconds, 3) if seconds > 0 else None,
            steady_views_per_s=self.steady_views_per_s,  # from the first finished shard to the last
            actor_peak_rss_bytes=self.actor_peak_rss_bytes,
        )
