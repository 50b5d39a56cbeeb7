"""The Ray actor of `sak-cache run`, and the messages the driver sends it.

StoreJob      one store as a worker needs it: teacher, weights, where and how to write
ShardJob      one shard to compute: its rows, for the teachers that have not done it
TeacherWorker holds every selected teacher, loaded once; per shard: forward passes, levels shaped to
              the store grid, overflow refused, a pca<k> basis fitted on shard 0, fidelity measured
              on the fidelity shard, whole shard files written (and uploaded whole to a bucket), and
              the records returned for the driver to journal
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from sak.pipeline.base.provenance import xxh3_file
from sak.pipeline.buckets.bucket import Bucket
from sak.pipeline.buckets.mirror import node_mirror, push
from sak.pipeline.format.manifest import save_stats, shard_stats
from sak.pipeline.format.records import ShardRecord
from sak.pipeline.store.backends import open_teacher_store
from sak.pipeline.store.codecs import Codec, refuse_overflow
from sak.pipeline.store.fidelity import is_lossy, measure_levels
from sak.pipeline.store.lowrank import prepare_bases
from sak.pipeline.store.resample import shape_targets
from sak.pipeline.store.targets import TargetShape
from sak.pipeline.teachers.forward import load_teacher
from sak.pipeline.teachers.weights import WeightsChoice


@dataclass(frozen=True)
class StoreJob:
    """One store as a TeacherWorker needs it: which teacher, its weights, where and how to write."""

    teacher: str
    weights: WeightsChoice
    path: str
    codec: Codec
    shard_size: int
    format: str
    shape: TargetShape  # kept blocks on the stored grid
    cache_url: str | None = None  # a URL cache: the worker writes in its node's mirror, then uploads
    fidelity_shard: int = 0  # the shard whose stored targets are compared with fp32 (pca<k>: a held-out one)


@dataclass(frozen=True)
class ShardJob:
    """One shard to compute: rows [start, stop) for the listed teachers (those that have not done it)."""

    shard: int
    start: int
    stop: int
    teachers: tuple[str, ...]

    @property
    def views(self) -> int:
        return self.stop - self.start


class TeacherWorker:
    """Holds every selected teacher, loaded once; computes and writes whole shards (a Ray actor).

    Two calls may run at once (max_concurrency=2): the forward passes take a lock, so one shard's
    compression and file writes overlap the next shard's teacher compute.
    """

    def __init__(
        self, stores: list[StoreJob], plan_size: int, normalization: str, batch_size: int, threads: int
    ) -> None:
        from sak.pipeline.teachers.specs import get_teacher

        self.device = "cuda" if torch.cuda.is_available() else "cpu"
        if self.device == "cpu":
            torch.set_num_threads(threads)
        self.batch_size = batch_size
        self.teachers, self.stores, self.sizes, self.shapes = {}, {}, {}, {}
        self.fidelity_shard: dict[str, int] = {}
        self.uploads: dict[str, tuple[str, str]] = {}  # teacher -> (cache URL, store path in the bucket)
        for s in stores:
            spec = get_teacher(s.teacher)
            self.teachers[spec.name] = load_teacher(spec, s.weights, plan_size, normalization, self.device)
            path = s.path
            if s.cache_url:  # write in this node's mirror, upload each shard's objects whole
                rel = f"teachers/{Path(s.path).name}"
                path = str(node_mirror(s.cache_url, [], metadata=True) / rel)
                self.uploads[spec.name] = (s.cache_url, rel)
            self.stores[spec.name] = open_teacher_store(s.format, path, s.codec, s.shard_size)
            self.shapes[spec.name] = s.shape
            self.fidelity_shard[spec.name] = s.fidelity_shard
            self.sizes[spec.name] = spec.model_input_side(plan_size) if spec.fixed_input else plan_size
        self.lock = threading.Lock()

    def process(self, job: ShardJob, views: dict[int, object]) -> dict[str, ShardRecord]:
        t0 = time.monotonic()
        feats: dict[str, list[torch.Tensor]] = {}
        native: dict[str, list[torch.Tensor]] = {}  # first shard of a lossy store: fp32 before resampling
        with self.lock:
            for name in job.teachers:
                keep = job.shard == self.fidelity_shard[name]
                feats[name], native[name] = self._forward(name, views, keep_native=keep)
        records = {}
        for name, levels in feats.items():
            store, blocks = self.stores[name], self.shapes[name].blocks
            for block, level in zip(blocks, levels):
                refuse_overflow(store.codec, level, name, block)
            remote = self._store_bucket(name)  # a URL cache: the store in its bucket
            prepare_bases(store, job.shard, dict(zip(blocks, levels)), remote)  # pca<k>: fit on shard 0 first
            fidelity = None
            if native[name]:  # measured before writing: the stored bytes are the same encoding
                fidelity = measure_levels(
                    store.codec, dict(zip(blocks, native[name])), dict(zip(blocks, levels)), store.bases
                )
            files = store.write_shard(job.shard, job.start, dict(zip(blocks, levels)))
            stats = save_stats(store.path, job.shard, shard_stats([lv.numpy() for lv in levels]))
            fast = {rel: xxh3_file(store.path / rel) for rel in files}  # page-cached: ~6 GB/s
            if remote is not None:  # uploaded and checked before the driver journals the shard
                push(remote, Path(store.path), [*files, stats])
            records[name] = ShardRecord(
                shard=job.shard,
                start=job.start,
                stop=job.stop,
                files=files,
                seconds=time.monotonic() - t0,
                xxh3=fast,
                fidelity=fidelity,
            )
        return records

    def _store_bucket(self, name: str) -> Bucket | None:
        """A teacher's store in its bucket (None: a local cache)."""
        if name not in self.uploads:
            return None
        url, rel = self.uploads[name]
        return Bucket(url).sub(rel)

    def _forward(
        self, name: str, views: dict[int, object], keep_native: bool
    ) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        """One teacher on one shard's views: its kept levels on the store grid, (n, h, w, C) float32 on the
        CPU, and, when `keep_native` and the store is lossy, the same levels on the native grid."""
        teacher, store = self.teachers[name], self.stores[name]
        blocks, grid = self.shapes[name].blocks, self.shapes[name].grid
        batch_views = torch.from_numpy(views[self.sizes[name]].copy())  # (n, 3, s, s) uint8
        parts, native = [], []
        for i in range(0, batch_views.shape[0], self.batch_size):
            x = batch_views[i : i + self.batch_size].to(self.device, non_blocking=True)
            # run up to the deepest kept block, resample on the device, then copy the (smaller) targets:
            # host-device sync
            maps = teacher.forward_levels(x, blocks)
            shaped = shape_targets(teacher.spec, maps, blocks, grid)
            parts.append([shaped[b].cpu() for b in blocks])
            native_hw = tuple(maps[0].shape[1:3])
            if keep_native and is_lossy(store.codec, native_hw, grid):
                kept = shape_targets(teacher.spec, maps, blocks, native_hw)  # the kept blocks, not resampled
                native.append([kept[b].float().cpu() for b in blocks])
        levels = [torch.cat([p[level] for p in parts]) for level in range(len(blocks))]
        return levels, [
            torch.cat([p[level] for p in native]) for level in range(len(blocks))
        ] if native else []
