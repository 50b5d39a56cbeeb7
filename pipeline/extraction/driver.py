"""`sak-cache run`: the Ray job that fills a cache with multi-level teacher features.

    driver: ingest once (images/, views.parquet, cache.json), create each teacher store, plan shard jobs
    CPU tasks: read stored image bytes, decode each image once, cut its views at every teacher input size
    one TeacherWorker actor per GPU (per CPU slot without GPUs): all selected teachers loaded once; runs each
      batch through each teacher under inference mode (bf16 autocast on CUDA) and writes whole shard files
    driver: journals each finished shard (checksums), so a re-run skips done shards and redoes the rest

Memory stays bounded: at most `max_in_flight` shards exist between decode and write at any time.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

from sak.pipeline.base.errors import SakError
from sak.pipeline.base.lock import CacheLock
from sak.pipeline.buckets.bucket import Bucket, is_url
from sak.pipeline.buckets.lock import BucketLock
from sak.pipeline.buckets.mirror import fresh_mirror, pull
from sak.pipeline.extraction.actors import (
    actor_placement,
    retire,
    shard_failure_error,
    start_actors,
    stop_actors,
)
from sak.pipeline.extraction.config import MAX_VIEW_SIZE, ExtractConfig
from sak.pipeline.extraction.ingest import ingest
from sak.pipeline.extraction.preprocess import cut_shard_views, view_rows
from sak.pipeline.extraction.probe import check_out_dir, probe_bucket_nodes, probe_nodes
from sak.pipeline.extraction.runtime import Progress, log, ray_session
from sak.pipeline.extraction.schedule import ShardSchedule
from sak.pipeline.extraction.stores import (
    StorePlan,
    finalize_store,
    journal_shards,
    needs_basis,
    plan_store,
    register_stores,
)
from sak.pipeline.extraction.student_views import add_student_views
from sak.pipeline.extraction.student_views import check_mode as check_views_mode
from sak.pipeline.extraction.worker import PlannedViews, RegisteredTeachers, ShardJob, TeacherWorker
from sak.pipeline.format.documents import read_cache
from sak.pipeline.format.layout import CACHE_FILE
from sak.pipeline.format.records import CacheManifest
from sak.pipeline.sources.limits import ImageLimits
from sak.pipeline.sources.views import ViewPlan
from sak.pipeline.store.backends import check_format
from sak.pipeline.store.targets import TargetShape, target_shape
from sak.pipeline.teachers.specs import TeacherSpec, parse_teachers
from sak.pipeline.teachers.weights import WeightsChoice, check_weights_load, resolve_weights


def run_extraction(cfg: ExtractConfig) -> Path:
    """Run (or resume) an extraction; returns the cache folder."""
    teachers, out, plan, shard_size = _setup(cfg)
    for t in teachers:  # hub or file weights that cannot load fail here, before any image is ingested
        check_weights_load(t.spec, t.weights, cfg.size)
    remote = Bucket(cfg.out) if is_url(cfg.out) else None
    with (
        BucketLock(remote) if remote else CacheLock(out),
        ray_session(cfg.address, None, cfg.object_store_mb),
    ):
        if remote:  # the driver works on a mirror of the bucket's metadata; the bucket is the truth
            probe_bucket_nodes(cfg.out)  # every node, before the ingest: its credentials are its own
            pull(remote, out, bulk=False)
        else:
            probe_nodes(out)  # on a cluster of 2+ nodes (--address or RAY_ADDRESS): one shared folder
        cache = _open_or_ingest(cfg, out, plan, shard_size)
        if cfg.student_views == "raw":
            cache = add_student_views(out, cache, view_rows(out), cfg.out if remote else None)
        stores = [plan_store(cfg, cache, out, t.spec, t.weights, t.shape) for t in teachers]
        cache = register_stores(out, cache, stores, finished=False)  # `inspect` shows a run in progress
        schedule = ShardSchedule.of(_shard_jobs(cache, stores))
        schedule.hold_first = needs_basis(stores)  # pca<k>: shard 0 fits the basis before any other shard
        t0 = time.monotonic()
        try:
            _run_shards(cfg, out, stores, schedule)
        finally:
            for sp in stores:
                finalize_store(sp, cache, time.monotonic() - t0, schedule)
            register_stores(out, cache, stores, finished=True)
    for sp in stores:
        if sp.manifest.random_init:
            log.warning(
                f"store {sp.fingerprint} holds RANDOM-INIT {sp.spec.name} features: not a real teacher"
            )
    return out


@dataclass(frozen=True)
class TeacherPlan:
    """One teacher of the run, resolved before any work: its spec, where its weights come from, and the
    shape of its store (the config's --levels and --grid, resolved for this teacher once)."""

    spec: TeacherSpec
    weights: WeightsChoice
    shape: TargetShape


def _setup(cfg: ExtractConfig) -> tuple[list[TeacherPlan], Path, ViewPlan, int]:
    """Check every option before any work (the codec and grid were resolved with the config): (each
    teacher's plan, the out folder, the view plan, the shard size)."""
    specs = parse_teachers(list(cfg.teachers))
    out = Path(cfg.out).expanduser().resolve() if not is_url(cfg.out) else fresh_mirror(cfg.out)
    if cfg.source is not None and not Path(cfg.source.split("{")[0].split("*")[0]).exists():
        raise SakError(
            f"source {cfg.source} does not exist; pass --source with an image folder, .tar shards "
            f"or .parquet files"
        )
    if cfg.batch_size < 1:
        raise SakError(f"--batch-size must be >= 1, got {cfg.batch_size}")
    if not 16 <= cfg.size <= MAX_VIEW_SIZE:
        raise SakError(f"--size {cfg.size} is out of range: 16 to {MAX_VIEW_SIZE} pixels")
    check_format(cfg.format)
    check_views_mode(cfg.student_views)
    shapes = [
        target_shape(s, cfg.size, cfg.levels, cfg.grid) for s in specs
    ]  # a bad --levels/--grid fails now
    plan = ViewPlan(seed=cfg.seed, views_per_image=cfg.views_per_image, size=cfg.size)
    shard_size = cfg.resolved_shard_size()
    choices = resolve_weights(specs, dict(cfg.weights), cfg.random_init, cfg.seed)
    teachers = [TeacherPlan(s, choices[s.name], shape) for s, shape in zip(specs, shapes)]
    check_out_dir(out)
    return teachers, out, plan, shard_size


def _open_or_ingest(cfg: ExtractConfig, out: Path, plan: ViewPlan, shard_size: int) -> CacheManifest:
    if (out / CACHE_FILE).exists():
        cache = read_cache(out)
        for name, mine, theirs in (
            ("--views-per-image", plan.views_per_image, cache.view_plan.views_per_image),
            ("--size", plan.size, cache.view_plan.size),
            ("--seed", plan.seed, cache.view_plan.seed),
        ):
            if mine != theirs:
                raise SakError(
                    f"{out} was created with {name} {theirs}, this run asks for {mine}; "
                    f"use the same value to add a store, or another --out for a new cache"
                )
        if cfg.shard_size is not None and shard_size != cache.shard_size:
            raise SakError(f"{out} has --shard-size {cache.shard_size}, this run asks for {shard_size}")
        log.info(f"reusing images and views of {out} ({cache.num_views} views)")
        return cache
    if not cfg.source:
        raise SakError(f"{out} holds no cache yet; pass --source with the images to extract")
    return ingest(
        cfg.source,
        out,
        plan,
        shard_size,
        limit=cfg.limit,
        limits=ImageLimits(cfg.min_image_side, cfg.max_pixels, cfg.max_decode_ratio),
        progress=cfg.progress,
        url=cfg.out if is_url(cfg.out) else None,
    )


def _shard_jobs(cache: CacheManifest, stores: list[StorePlan]) -> list[ShardJob]:
    jobs = []
    for s in range(cache.num_shards):
        todo = tuple(sp.spec.name for sp in stores if s not in sp.done)
        if todo:
            jobs.append(
                ShardJob(s, s * cache.shard_size, min((s + 1) * cache.shard_size, cache.num_views), todo)
            )
    if cache.num_shards > len(jobs):
        log.info(f"skipping {cache.num_shards - len(jobs)} shard(s) already done; {len(jobs)} to compute")
    return jobs


def _start_workers(cfg: ExtractConfig, stores: list[StorePlan], n_jobs: int) -> list:
    """TeacherWorker actors, one per GPU (or per two CPUs), each holding every selected teacher; placed,
    restarted and retried as extraction/actors.py says (shared with `sak-cache stage2`)."""
    placement = actor_placement(cfg.workers, n_jobs)
    teachers = RegisteredTeachers({sp.spec.name: sp.weights for sp in stores}, cfg.size, cfg.normalization)
    jobs = [sp.job() for sp in stores]
    args = (teachers, PlannedViews(cfg.size), jobs, cfg.batch_size, placement.threads)
    return start_actors(TeacherWorker, placement, *args)


def _waiting_for(schedule: ShardSchedule, landed: int, actors: int, stores: list[StorePlan]) -> str:
    """What a run waiting on Ray is waiting for, in words (Progress.tick's heartbeat line)."""
    if landed == 0:
        names = ", ".join(sorted({sp.spec.name for sp in stores}))
        return f"{actors} actor(s) loading {names} and computing the first shard"
    return f"{len(schedule.computing)} shard(s) on the teachers, {len(schedule.cutting)} being cut"


def _run_shards(cfg: ExtractConfig, out: Path, stores: list[StorePlan], schedule: ShardSchedule) -> None:
    """Compute every queued shard: cut its views (CPU task), run the teachers (actor), journal the result."""
    import ray

    if not schedule.queue:
        return
    rows = view_rows(out)
    sizes = sorted({sp.spec.model_input_side(cfg.size) if sp.spec.fixed_input else cfg.size for sp in stores})
    workers = _start_workers(cfg, stores, len(schedule.queue))
    log.info(f"started {len(workers)} teacher actor(s); {len(schedule.queue)} shard(s) to compute")
    schedule.start(len(workers))
    cut = ray.remote(num_cpus=1)(cut_shard_views)
    bar = Progress(schedule.total_views, "views", "extract", enabled=cfg.progress)
    try:
        while schedule.busy():
            while schedule.can_submit():
                job = schedule.queue.pop()
                where = cfg.out if is_url(cfg.out) else str(out)
                schedule.cutting[cut.remote(where, rows[job.start : job.stop], sizes)] = job
            ready, _ = ray.wait(list(schedule.cutting) + list(schedule.computing), num_returns=1, timeout=1.0)
            bar.tick(_waiting_for(schedule, bar.count, len(workers), stores))
            for ref in ready:
                if ref in schedule.cutting:
                    job = schedule.cutting.pop(ref)
                    if schedule.failure is None:
                        w = schedule.idlest_worker()
                        schedule.computing[workers[w].process.remote(job, ref)] = (job, w)
                    continue
                job, w = schedule.computing.pop(ref)
                schedule.live.load[w] -= 1
                try:
                    result = ray.get(ref)
                except Exception as e:  # keep what is done; report after in-flight shards settle
                    if not schedule.lost(job, w, e):
                        schedule.failure = schedule.failure or e
                    elif w in schedule.live.dead:
                        retire(workers[w])  # its restart must not take the resources the others need
                    continue
                journal_shards(stores, result.records)
                schedule.landed(job, result.peak_rss_bytes)
                bar.update(job.views)
    finally:
        bar.close()
        stop_actors(workers)
    if schedule.failure is not None:
        raise shard_failure_error(schedule.failure, out, sum(len(sp.done) for sp in stores))
