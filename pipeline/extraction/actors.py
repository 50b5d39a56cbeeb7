"""Ray actor pools of the cache builders, in one place: `sak-cache run` (driver.py) and `sak-cache stage2`
(stage2.py) size, place, start, feed and stop their TeacherWorker actors (worker.py) here.

    actor_placement(requested, n_jobs)   how many actors, on GPUs or CPUs, and torch threads each:
                                         one per GPU, else one per two CPUs (or `requested`), never more
                                         than there are shards
    start_actors(cls, placement, *args)  the actors, each holding its teachers; spread over the nodes
                                         (one lost node costs only its own actors). An actor that dies
                                         (kill -9, OOM, preemption) is restarted and its task retried:
                                         a shard's result is whole, so a retry is idempotent; errors the
                                         task raises (a bad file, ENOSPC) are not retried
    ActorPool(actors).run(jobs, submit)  jobs to the least-loaded actor, 2 in flight each; yields
                                         (job, result) as they land so the driver journals each one
                                         before the next; a job whose actor was lost (its node gone)
                                         goes to another live actor; after any other failure nothing new
                                         is submitted, the shards in flight still land, then it is raised
    LiveActors(n), lost_actor(error)     that bookkeeping, shared with driver.py's own feeding loop
    shard_failure_error(...)             the one-line error: what failed, that finished shards are kept
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sak.pipeline.base.errors import SakError
from sak.pipeline.base.oserrors import write_error
from sak.pipeline.buckets.failures import failure_kind

log = logging.getLogger("sak")

IN_FLIGHT_PER_ACTOR = 2  # one computing, one queued: an actor never waits for the driver
SHARD_RETRIES = 2  # a shard whose actor was lost is given to another live actor at most this many times


def lost_actor(error: BaseException) -> bool:
    """Whether a task failed because its actor died or became unreachable (its node lost, an OOM kill),
    rather than because of what the task raised: the shard can then be computed again by another actor."""
    import ray

    return isinstance(error, ray.exceptions.RayActorError)


class LiveActors:
    """Which actors are still in use, and how often each shard was given out again after a loss.

    An actor lost while others live is retired (the caller kills it for good, so a restart Ray would
    otherwise place on a surviving node cannot take the CPUs or GPU the rest of the run needs there) and
    its shards go to the others; the last actor is kept: Ray restarts it in place (max_restarts) and
    the shard is submitted to it again."""

    def __init__(self, n: int) -> None:
        self.load = [0] * n
        self.dead: set[int] = set()
        self.retries: dict[Any, int] = {}

    def idlest(self) -> int:
        w = min((i for i in range(len(self.load)) if i not in self.dead), key=self.load.__getitem__)
        self.load[w] += 1
        return w

    def lose(self, worker: int, job: Any) -> bool:
        """Actor `worker` was lost while computing `job`. True when the job may be submitted again (it
        has retries left); `worker` is then in `dead` unless it is the last live actor."""
        if worker not in self.dead and len(self.dead) + 1 < len(self.load):
            self.dead.add(worker)
        self.retries[job] = self.retries.get(job, 0) + 1
        return self.retries[job] <= SHARD_RETRIES


def retire(actor: Any) -> None:
    """Kill a lost actor for good (no restart): its resources go back to the cluster."""
    import ray

    try:
        ray.kill(actor, no_restart=True)
    except Exception:  # already gone with its node
        pass


@dataclass(frozen=True)
class ActorPlacement:
    actors: int
    gpus: bool  # one GPU per actor; else CPU actors
    threads: int  # torch threads per actor (1 on GPUs)
    concurrency: int = IN_FLIGHT_PER_ACTOR  # tasks an actor runs at once (threads sharing its teachers)

    @property
    def options(self) -> dict[str, Any]:
        """ray.remote(...).options(...) of one actor of this placement."""
        return {
            "num_gpus": 1 if self.gpus else 0,
            "num_cpus": 1 if self.gpus else self.threads,
            "max_concurrency": self.concurrency,
            "max_restarts": 3,  # a killed actor comes back in place (kill -9, OOM) ...
            "max_task_retries": 0,  # ... but its failed task is the driver's to give out again (LiveActors)
            "scheduling_strategy": "SPREAD",
        }


def actor_placement(requested: int | None, n_jobs: int, use_gpus: bool | None = None) -> ActorPlacement:
    """Actors for n_jobs shards on the running Ray: one per GPU, else one per two CPUs, or `requested`.

    use_gpus: None = whenever the cluster has GPUs; False = CPU actors even so (--device cpu)."""
    import ray

    resources = ray.cluster_resources()
    gpus = int(resources.get("GPU", 0)) if use_gpus is not False else 0
    if use_gpus and not gpus:
        raise SakError("--device cuda: the Ray cluster has no GPU; use --device cpu or a GPU cluster")
    cpus = int(resources.get("CPU", 1))
    n = max(1, min(requested or (gpus if gpus else max(1, cpus // 2)), max(1, n_jobs)))
    threads = 1 if gpus else max(1, cpus // (2 * n))
    return ActorPlacement(actors=n, gpus=bool(gpus), threads=threads)


def start_actors(cls: type, placement: ActorPlacement, *args: Any) -> list:
    """placement.actors actors of `cls`, each built with *args."""
    import ray

    actor = ray.remote(cls).options(**placement.options)
    return [actor.remote(*args) for _ in range(placement.actors)]


def stop_actors(actors: Iterable) -> None:
    import ray

    for a in actors:
        ray.kill(a)


class ActorPool:
    """Jobs over a fixed set of actors, least-loaded first, IN_FLIGHT_PER_ACTOR each."""

    def __init__(self, actors: list) -> None:
        self.actors = actors
        self.live = LiveActors(len(actors))
        self.failure: BaseException | None = None

    def run(self, jobs: Iterable, submit: Callable[[Any, Any], Any]) -> Iterator[tuple[Any, Any]]:
        """submit(actor, job) -> an ObjectRef; yields (job, result) as results land, in landing order.
        A job (hashable) whose actor was lost goes to another live actor (SHARD_RETRIES times at most)."""
        import ray

        queue, pending = list(jobs), {}
        while (queue and self.failure is None) or pending:
            room = IN_FLIGHT_PER_ACTOR * (len(self.actors) - len(self.live.dead))
            while queue and self.failure is None and len(pending) < room:
                w = self.live.idlest()
                job = queue.pop(0)
                pending[submit(self.actors[w], job)] = (job, w)
            ready, _ = ray.wait(list(pending), num_returns=1)
            job, w = pending.pop(ready[0])
            self.live.load[w] -= 1
            try:
                result = ray.get(ready[0])
            except Exception as e:  # keep what lands; raise once the shards in flight have settled
                if self.failure is None and lost_actor(e) and self.live.lose(w, job):
                    log.warning(f"an actor was lost ({type(e).__name__}); its shard is computed again")
                    if w in self.live.dead:
                        retire(self.actors[w])
                    queue.insert(0, job)
                    continue
                self.failure = self.failure or e
                continue
            yield job, result
        if self.failure is not None:
            raise self.failure


def rerun_helps(failure: BaseException) -> bool:
    """Whether running the same command again can get past `failure`: a lost worker, actor, node or
    object (killed, preempted, out of memory), or a transient network error; not what a task raised
    deterministically (a bad weights file, a bug, a full disk: those need a fix first)."""
    import ray.exceptions as rx

    lost = (rx.RayActorError, rx.NodeDiedError, rx.WorkerCrashedError, rx.ObjectLostError,
            rx.LocalRayletDiedError, rx.OutOfMemoryError)  # fmt: skip
    if isinstance(failure, lost):
        return True
    cause = _task_cause(failure)
    if write_error(cause) is not None:
        return False
    return failure_kind(cause) == "unreachable"  # a network error: Python's, botocore's or aiohttp's


def _task_cause(failure: BaseException) -> BaseException:
    """What a Ray task raised (RayTaskError.cause), else the failure itself."""
    cause = getattr(failure, "cause", None)
    return cause if isinstance(cause, BaseException) else failure


def shard_failure_error(failure: BaseException, out: Path, done: int, what: str = "extraction") -> SakError:
    """The error a failed build ends with: its cause in one line; finished shards are kept. Only a failure
    a re-run can get past (rerun_helps) says to run the same command again."""
    cause = _task_cause(failure)
    kept = f"the {done} shard(s) already recorded are kept"
    if isinstance(cause, SakError):
        return SakError(f"{str(cause).strip()} ({kept})")
    written = write_error(failure)  # a full disk, permissions, a too-long name: in the actor or here
    if written is not None:
        return SakError(f"{written} ({kept})")
    lines = str(cause).strip().splitlines()
    said = f"{type(cause).__name__}: {lines[0] if lines else ''}".rstrip(": ")
    if rerun_helps(failure):
        return SakError(f"{what} failed ({said}); {kept}: re-run the same command to continue")
    return SakError(f"{what} failed ({said}); see the log above ({kept})")
