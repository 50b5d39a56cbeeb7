"""The teacher worker of the cache builders (`sak-cache run` and `sak-cache stage2`), and what it is sent.

StoreJob      one store as a worker writes it: where, codec, shard size, format, target shape
ShardJob      one shard to compute: its rows, for the teachers that have not done it
TeacherSet    who the teachers are: loaded by the worker, once (`run`: RegisteredTeachers)
ShardInputs   what the teachers see for a shard's rows: uint8 views per teacher (`run`: PlannedViews,
              cut by a CPU task; stage 2: the augmented images the stage-2 trainer sees)
TeacherWorker holds every teacher, loaded once (a Ray actor, or in the driver's process); per shard:
              forward passes, levels shaped to the store grid, overflow refused, a pca<k> basis fitted
              on shard 0, fidelity measured on the fidelity shard, whole shard files written (and
              uploaded whole to a bucket), and the records returned for the driver to journal
"""

from __future__ import annotations

import threading
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import torch

from sak.pipeline.base.errors import SakError
from sak.pipeline.base.oserrors import writing
from sak.pipeline.base.provenance import peak_rss_bytes, xxh3_file
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
from sak.pipeline.teachers.forward import LoadedTeacher, load_teacher
from sak.pipeline.teachers.specs import get_teacher
from sak.pipeline.teachers.weights import WeightsChoice


@dataclass(frozen=True)
class StoreJob:
    """One store as a TeacherWorker writes it."""

    teacher: str
    path: str  # the store's folder (a URL cache: in the driver's mirror)
    rel: str  # the store's folder relative to its cache (teachers/<fingerprint>, teachers/<teacher>)
    codec: Codec
    shard_size: int
    format: str
    shape: TargetShape  # kept blocks on the stored grid
    cache_url: str | None = None  # a URL cache: the worker writes in a mirror, then uploads
    fidelity_shard: int | None = 0  # the shard compared with fp32 (pca<k>: a held-out one); None: never
    statistics: bool = True  # per-shard channel sums (stats/), merged into the manifest


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


@dataclass(frozen=True)
class ShardViews:
    """What the teachers see for one shard: {teacher: (n, 3, h, w) uint8} as each takes its input, and the
    rows the cache's views table gets for them (stage 2; None when the table exists already)."""

    inputs: Mapping[str, torch.Tensor]
    rows: Sequence[Mapping[str, Any]] | None = None


@dataclass(frozen=True)
class ShardResult:
    """What a worker returns for one shard: each teacher's journal record, and its views' rows."""

    records: Mapping[str, ShardRecord]
    rows: Sequence[Mapping[str, Any]] | None = None
    peak_rss_bytes: int | None = None  # the worker process's peak host memory so far


class TeacherSet(Protocol):
    """Who the teachers are; picklable, loaded by each worker once (on its device)."""

    def load(self, device: str) -> dict[str, LoadedTeacher]: ...


class ShardInputs(Protocol):
    """What the teachers see for a shard; picklable, called in the worker. `payload`: what the driver
    sent with the job (None when the inputs make their own)."""

    def views(self, job: ShardJob, payload: Any, teachers: Mapping[str, LoadedTeacher]) -> ShardViews: ...


# ------------------------------------------------------------------------------------- `sak-cache run`


@dataclass(frozen=True)
class RegisteredTeachers:
    """`run`'s teachers: registered specs with their weights, built at the view plan's size."""

    weights: Mapping[str, WeightsChoice]  # teacher -> where its weights come from
    plan_size: int
    normalization: str

    def load(self, device: str) -> dict[str, LoadedTeacher]:
        return {
            name: load_teacher(get_teacher(name), choice, self.plan_size, self.normalization, device)
            for name, choice in self.weights.items()
        }


@dataclass(frozen=True)
class PlannedViews:
    """`run`'s inputs: the payload is a CPU task's cut of the shard's planned views, {side: (n, 3, s, s)
    uint8 numpy}; each teacher takes the side it sees (the plan size, SAM its fixed side)."""

    plan_size: int

    def views(self, job: ShardJob, payload: Any, teachers: Mapping[str, LoadedTeacher]) -> ShardViews:
        sides = {name: teachers[name].spec.model_input_side(self.plan_size) for name in job.teachers}
        return ShardViews({name: torch.from_numpy(payload[side].copy()) for name, side in sides.items()})


# ----------------------------------------------------------------------------------------- the worker


def assigned_device() -> str:
    """The device of this worker: in a Ray worker process (an actor or task), 'cuda' exactly when Ray gave
    it a GPU (the placement decides: a CPU actor on a GPU node, or `--device cpu`, stays off the GPU; Ray
    points CUDA_VISIBLE_DEVICES at the assigned GPU, so it is cuda:0 there); in the driver's own process
    (no Ray, or the driver itself), CUDA when this process has it."""
    import ray

    if ray.is_initialized() and ray.get_runtime_context().worker.mode == ray.WORKER_MODE:
        return "cuda" if ray.get_runtime_context().get_accelerator_ids().get("GPU") else "cpu"
    return "cuda" if torch.cuda.is_available() else "cpu"


class TeacherWorker:
    """Holds every teacher, loaded once; computes and writes whole shards (a Ray actor, or in process).

    Two calls may run at once (max_concurrency=2): the forward passes take a lock, so one shard's
    compression and file writes overlap the next shard's teacher compute. `device`: None = CUDA when
    available (`assigned_device`: a Ray actor's from its GPU assignment); `threads`: torch threads of a CPU worker (None: leave them). A worker in the driver's
    process (`in_node_mirror=False`) writes a URL cache's stores in the driver's mirror, where StoreJob.path
    points; an actor writes in its node's mirror.
    """

    def __init__(
        self,
        teachers: TeacherSet,
        inputs: ShardInputs,
        stores: list[StoreJob],
        batch_size: int,
        threads: int | None = None,
        device: str | None = None,
        in_node_mirror: bool = True,
    ) -> None:
        self.device = device or assigned_device()
        if self.device == "cpu" and threads:
            torch.set_num_threads(threads)
        self.batch_size, self.inputs = batch_size, inputs
        self.teachers = teachers.load(self.device)
        self.jobs = {s.teacher: s for s in stores}
        self.stores = {s.teacher: open_teacher_store(s.format, self._local_path(s, in_node_mirror), s.codec, s.shard_size)
                       for s in stores}  # fmt: skip
        self.lock = threading.Lock()

    @staticmethod
    def _local_path(s: StoreJob, in_node_mirror: bool) -> str:
        if s.cache_url and in_node_mirror:  # write in this node's mirror, upload each shard's objects whole
            return str(node_mirror(s.cache_url, [], metadata=True) / s.rel)
        return s.path

    def process(self, job: ShardJob, payload: Any = None) -> ShardResult:
        t0 = time.monotonic()
        feats: dict[str, list[torch.Tensor]] = {}
        native: dict[str, list[torch.Tensor]] = {}  # the fidelity shard of a lossy store: fp32, native grid
        with self.lock:
            views = self.inputs.views(job, payload, self.teachers)
            for name in job.teachers:
                keep = job.shard == self.jobs[name].fidelity_shard
                feats[name], native[name] = self._forward(name, views.inputs[name], keep_native=keep)
        records = {name: self._write(job, name, levels, native[name], t0) for name, levels in feats.items()}
        return ShardResult(records, views.rows, peak_rss_bytes=peak_rss_bytes())

    def _write(
        self, job: ShardJob, name: str, levels: list[torch.Tensor], native: list[torch.Tensor], t0: float
    ) -> ShardRecord:
        """One teacher's shard: checked, encoded and written whole (uploaded and checked for a bucket)."""
        spec, store = self.jobs[name], self.stores[name]
        blocks = spec.shape.blocks
        for block, level in zip(blocks, levels):
            refuse_overflow(store.codec, level, name, block)
        remote = Bucket(spec.cache_url).sub(spec.rel) if spec.cache_url else None  # the store in its bucket
        prepare_bases(store, job.shard, dict(zip(blocks, levels)), remote)  # pca<k>: fit on shard 0 first
        fidelity = None
        if native:  # measured before writing: the stored bytes are the same encoding
            fidelity = measure_levels(
                store.codec, dict(zip(blocks, native)), dict(zip(blocks, levels)), store.bases
            )
        with writing(store.path):  # a full disk: one line naming the store (its writers leave no temp)
            files = store.write_shard(job.shard, job.start, dict(zip(blocks, levels)))
            written = list(files)
            if spec.statistics:
                written.append(save_stats(store.path, job.shard, shard_stats([lv.numpy() for lv in levels])))
        fast = {rel: xxh3_file(store.path / rel) for rel in files}  # page-cached: ~6 GB/s
        if remote is not None:  # uploaded and checked before the driver journals the shard
            push(remote, Path(store.path), written)
        return ShardRecord(
            shard=job.shard,
            start=job.start,
            stop=job.stop,
            files=files,
            seconds=time.monotonic() - t0,
            xxh3=fast,
            fidelity=fidelity,
        )

    def _forward(
        self, name: str, views_u8: torch.Tensor, keep_native: bool
    ) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        """One teacher on one shard's (n, 3, h, w) uint8 views: its kept levels on the store grid,
        (n, H, W, C) float32 on the CPU, and, when `keep_native` and the store is lossy, the same levels on
        the native grid."""
        teacher, store, shape = self.teachers[name], self.stores[name], self.jobs[name].shape
        parts, native = [], []
        for i in range(0, views_u8.shape[0], self.batch_size):
            x = views_u8[i : i + self.batch_size].to(self.device, non_blocking=True)
            # run up to the deepest kept block, resample on the device, then copy the (smaller) targets:
            # host-device sync
            maps = teacher.forward_levels(x, shape.blocks)
            native_hw = tuple(maps[0].shape[1:3])
            if not shape.resampled and native_hw != shape.native:
                raise SakError(
                    f"teacher {name} gave {native_hw[0]}x{native_hw[1]} maps, its store was planned for "
                    f"{shape.native[0]}x{shape.native[1]}: the planned input size is not what the model sees"
                )
            shaped = shape_targets(teacher.spec, maps, shape.blocks, shape.grid)
            parts.append([shaped[b].cpu() for b in shape.blocks])
            if keep_native and is_lossy(store.codec, native_hw, shape.grid):
                kept = shape_targets(
                    teacher.spec, maps, shape.blocks, native_hw
                )  # kept blocks, not resampled
                native.append([kept[b].float().cpu() for b in shape.blocks])
        levels = [torch.cat([p[level] for p in parts]) for level in range(len(shape.blocks))]
        return levels, [
            torch.cat([p[level] for p in native]) for level in range(len(shape.blocks))
        ] if native else []
