"""`sak-cache stage2`: teacher targets of the exact augmented images a stage-2 student sees, built on the
same machinery as `sak-cache run` (the lock, the teacher worker, the actor pool, the shard journal).

The pipeline knows nothing of the stage-2 dataset or of stage-1 runs: the top floor hands the builder a
typed `Stage2Source` (the replayed views and the teachers, picklable, so the same objects serve a worker
in this process and Ray actors), and the builder stores what the teachers make of those views.

    OUT/cache.json               Stage2Cache (format/records.py): the views' identity (dataset, split, images,
                                 seed, crop, augmentation, plan version, teacher fingerprints), epochs,
                                 codec, shards, per teacher: blocks, positions, grids, shard files
    OUT/views.parquet            one row per (epoch, image), row = epoch * N + image index, as the source
                                 describes it (the augmentation replayed, the image's sha256)
    OUT/teachers/<teacher>/      a Zarr teacher store (store/zarr.py): levels/<block> (rows, h, w, C) on the
                                 teacher's native grid at the crop, shards.jsonl journal (resume skips
                                 finished shards)

A shard is written whole by one worker and journaled by the driver (uploaded and checked first in a
bucket), so a killed build resumes from its journal: finished shards are never computed again.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from sak.pipeline.base.errors import SakError
from sak.pipeline.base.lock import LOCK_FILE, CacheLock
from sak.pipeline.base.provenance import atomic_path, code_version, now_iso, sha256_file
from sak.pipeline.buckets.bucket import Bucket, is_url
from sak.pipeline.buckets.lock import BucketLock
from sak.pipeline.buckets.mirror import fresh_mirror, pull, push_metadata
from sak.pipeline.extraction.config import Stage2BuildConfig
from sak.pipeline.extraction.stores import journal_shard
from sak.pipeline.extraction.worker import (
    ShardInputs,
    ShardJob,
    ShardResult,
    StoreJob,
    TeacherSet,
    TeacherWorker,
)
from sak.pipeline.format.documents import read_stage2_cache, write_stage2_cache
from sak.pipeline.format.journal import read_journal
from sak.pipeline.format.layout import CACHE_FILE, VIEWS_FILE, store_dir
from sak.pipeline.format.records import Stage2Cache, Stage2Identity, Stage2Teacher, WeightsRecord
from sak.pipeline.store.backends import create_teacher_store
from sak.pipeline.store.targets import TargetShape
from sak.pipeline.teachers.specs import get_teacher

log = logging.getLogger("sak")

STORE_FORMAT = "zarr"  # a stage-2 store is always Zarr: the trainer reads its rows in any order


@dataclass(frozen=True)
class Stage2TeacherInfo:
    """One teacher of a stage-2 cache, as its source describes it before any model is loaded."""

    teacher: str  # registry name
    fingerprint: str  # its stage-1 store's (--init), or one hashed from its name, weights and taps
    blocks: tuple[int, ...]  # the tapped blocks stored
    positions: tuple[int, ...]  # which of the student's 4 taps each stored block is compared with
    weights: WeightsRecord | None = None  # its weights (by name: as given; --init: its stage-1 store's)
    seed: int | None = None  # ... and its random-init seed


class Stage2Views(ShardInputs, Protocol):
    """The replayed views: the shard's teacher inputs and rows (ShardInputs.views, in the worker), and the
    rows alone (`rows`, in the driver, for shards a resumed build keeps)."""

    def rows(self, start: int, stop: int) -> Sequence[Mapping[str, Any]]: ...


@dataclass(frozen=True)
class Stage2Source:
    """What the top floor hands the builder: who sees which views, described and replayable."""

    identity: Stage2Identity  # what the cache serves: a trainer refuses a cache whose identity differs
    crop: tuple[int, int]  # (H, W) of every view
    data_root: str
    init: str | None  # the stage-1 run the teachers come from (None: teachers by name)
    teachers: tuple[Stage2TeacherInfo, ...]
    loader: TeacherSet  # loads those teachers, once per worker
    views: Stage2Views

    @property
    def num_images(self) -> int:
        return self.identity.num_images


def build_stage2_cache(cfg: Stage2BuildConfig, source: Stage2Source) -> Path:
    """Replay the views of every (epoch, image) and store the teachers' targets for them; resumes."""
    remote = Bucket(cfg.out) if is_url(cfg.out) else None  # written as `run` writes a bucket (buckets/)
    out = fresh_mirror(cfg.out) if remote else Path(cfg.out).expanduser()
    out.mkdir(parents=True, exist_ok=True)
    with BucketLock(remote) if remote else CacheLock(out):
        if remote:  # the driver works on a mirror of the bucket's metadata; the bucket is the truth
            pull(remote, out, bulk=False)
        return _build(cfg, source, out, remote)


def _check_existing(cfg: Stage2BuildConfig, source: Stage2Source, out: Path, shown: str) -> None:
    """An --out that holds a stage-2 cache must hold this one (resume); anything else is refused."""
    if not (out / CACHE_FILE).exists():
        if any(p.name != LOCK_FILE for p in out.iterdir()):
            raise SakError(
                f"--out {shown} exists and is not a stage-2 cache; choose an empty folder or prefix"
            )
        return
    old, identity = read_stage2_cache(out / CACHE_FILE), source.identity
    for f in dataclasses.fields(Stage2Identity):
        if getattr(old.identity, f.name) != getattr(identity, f.name):
            raise SakError(
                f"{shown} was built with {f.name} {getattr(old.identity, f.name)!r}, not "
                f"{getattr(identity, f.name)!r}: choose another --out"
            )
    if old.epochs != cfg.epochs or old.codec != cfg.codec.name or old.shard_size != cfg.shard_size:
        raise SakError(f"{shown} was built with other --epochs/--codec/--shard-size: choose another --out")


def _store_jobs(cfg: Stage2BuildConfig, source: Stage2Source, out: Path, n_rows: int) -> list[StoreJob]:
    """One Zarr store per teacher, created now with its final shape: the teacher's native grid at the crop
    (what it makes of the views; the worker refuses maps of another grid)."""
    jobs = []
    for t in source.teachers:
        spec = get_teacher(t.teacher)
        grid = spec.input_grid(*source.crop)
        shape = TargetShape(blocks=t.blocks, grid=grid, native=grid)
        path = out / store_dir(t.teacher)
        create_teacher_store(STORE_FORMAT, path, n_rows, cfg.shard_size, shape.grids(spec.dim), cfg.codec)
        jobs.append(
            StoreJob(
                teacher=t.teacher,
                path=str(path),
                rel=store_dir(t.teacher),
                codec=cfg.codec,
                shard_size=cfg.shard_size,
                format=STORE_FORMAT,
                shape=shape,
                cache_url=cfg.out if is_url(cfg.out) else None,
                fidelity_shard=None,  # the targets are the teachers' own maps: nothing lossy to measure
                statistics=False,
            )
        )
    return jobs


def _build(cfg: Stage2BuildConfig, source: Stage2Source, out: Path, remote: Bucket | None) -> Path:
    import pyarrow as pa
    import pyarrow.parquet as pq

    shown = remote.url if remote else str(out)
    _check_existing(cfg, source, out, shown)
    n_rows = cfg.epochs * source.num_images
    n_shards = math.ceil(n_rows / cfg.shard_size)
    record = Stage2Cache(
        identity=source.identity,
        data_root=source.data_root,
        init=source.init,
        epochs=cfg.epochs,
        rows=n_rows,
        codec=cfg.codec.name,
        shard_size=cfg.shard_size,
        num_shards=n_shards,
        views=VIEWS_FILE,
        complete=False,
        code_version=code_version(),
        created=now_iso(),
    )
    write_stage2_cache(out / CACHE_FILE, record)
    stores = _store_jobs(cfg, source, out, n_rows)
    if remote:  # the stores' Zarr metadata, so that they open from the bucket; `inspect` shows the build
        push_metadata(remote, out)
    t0 = time.perf_counter()
    done = {s.teacher: set(read_journal(s.path)) for s in stores}
    jobs = []
    rows_of: dict[int, Sequence[Mapping[str, Any]]] = {}
    for shard in range(n_shards):
        start, stop = shard * cfg.shard_size, min((shard + 1) * cfg.shard_size, n_rows)
        todo = tuple(s.teacher for s in stores if shard not in done[s.teacher])
        if todo:
            jobs.append(ShardJob(shard, start, stop, todo))
        else:  # resumed: on disk already, only its rows
            rows_of[shard] = source.views.rows(start, stop)
    by_name = {s.teacher: s for s in stores}
    for job, result in _compute(cfg, source, stores, jobs, out):
        rows_of[job.shard] = result.rows
        for name, shard_record in result.records.items():
            journal_shard(
                Path(by_name[name].path), shard_record, remote.sub(by_name[name].rel) if remote else None
            )
        log.info(f"stage-2 cache: shard {job.shard} done ({len(rows_of)}/{n_shards} shards)")
    with atomic_path(out / VIEWS_FILE) as tmp:
        pq.write_table(pa.Table.from_pylist([r for s in sorted(rows_of) for r in rows_of[s]]), tmp)
    record = dataclasses.replace(
        record,
        teachers=[_teacher_record(t, by_name[t.teacher]) for t in source.teachers],
        views_sha256=sha256_file(out / VIEWS_FILE),
        complete=True,
        seconds=round(time.perf_counter() - t0, 3),
        finished=now_iso(),
    )
    if remote:  # views and metadata first, cache.json (complete) last
        push_metadata(remote, out)
    write_stage2_cache(out / CACHE_FILE, record)
    if remote:
        remote.put_whole(out / CACHE_FILE, CACHE_FILE)
    log.info(f"stage-2 cache {shown}: {n_rows} rows ({cfg.epochs} epochs x {source.num_images} images)")
    return out


def _teacher_record(t: Stage2TeacherInfo, store: StoreJob) -> Stage2Teacher:
    journal = read_journal(store.path)
    return Stage2Teacher(
        teacher=t.teacher,
        stage1_fingerprint=t.fingerprint,
        weights=t.weights,
        seed=t.seed,
        path=store.rel,
        blocks=list(t.blocks),
        positions=list(t.positions),
        grids=[[*store.shape.grid, get_teacher(t.teacher).dim] for _ in t.blocks],
        shards={str(s): journal[s].files for s in sorted(journal)},
    )


def _compute(
    cfg: Stage2BuildConfig, source: Stage2Source, stores: list[StoreJob], jobs: list[ShardJob], out: Path
) -> Iterator[tuple[ShardJob, ShardResult]]:
    """(job, result) as shards land: a TeacherWorker in this process (--workers 0), or `cfg.workers` of
    them as Ray actors, placed, restarted and fed as `sak-cache run`'s (extraction/actors.py); a failure
    ends the build after the shards in flight, finished shards kept."""
    if not jobs:
        return
    if cfg.workers == 0:
        worker = TeacherWorker(source.loader, source.views, stores, cfg.batch_size, device=cfg.device,
                               in_node_mirror=False)  # fmt: skip
        for job in jobs:
            yield job, worker.process(job)
        return
    from sak.pipeline.extraction.actors import (
        ActorPool,
        actor_placement,
        shard_failure_error,
        start_actors,
        stop_actors,
    )
    from sak.pipeline.extraction.probe import probe_bucket_nodes, probe_nodes
    from sak.pipeline.extraction.runtime import ray_session

    with ray_session(cfg.address, None, 512):
        if is_url(cfg.out):  # the actors write the stores: a bucket every node can write
            probe_bucket_nodes(cfg.out)
        else:  # or one folder all nodes see
            probe_nodes(out)
        placement = actor_placement(cfg.workers, len(jobs), use_gpus=cfg.uses_gpus())
        placement = dataclasses.replace(placement, concurrency=1)  # one shard at a time per actor
        args = (source.loader, source.views, stores, cfg.batch_size, placement.threads, cfg.device)
        workers = start_actors(TeacherWorker, placement, *args)
        landed = 0
        try:
            for job, result in ActorPool(workers).run(jobs, lambda w, j: w.process.remote(j)):
                landed += 1
                yield job, result
        except Exception as e:
            raise shard_failure_error(e, out, landed, "stage-2 cache build") from e
        finally:
            stop_actors(workers)


def describe_build(cache: Stage2Cache) -> str:
    """The line `sak-cache stage2` prints when a build ends."""
    i = cache.identity
    teachers = ", ".join(t.teacher for t in cache.teachers or [])
    return (
        f"stage-2 cache: {i.dataset} {i.split} ({i.num_images} images) x {cache.epochs} epochs = "
        f"{cache.rows} rows, crop {i.crop[0]}x{i.crop[1]}, seed {i.seed}, {cache.codec}; "
        f"teachers {teachers}"
    )
