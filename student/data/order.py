"""The stage-1 data order: which cache rows every batch of every rank holds, as a pure function of
(seed, epoch, rank, stream) with no I/O. Training shards are dealt to slots (rank, loader stream) in a
seeded per-epoch order, each slot's images are shuffled within windows of `shuffle_window` shards, and
epoch e reads view e mod K of each image; the last `holdout_shards` shards are never trained on (Rep Sim
is measured there). The permutations use the project's SplitMix64, not numpy's or torch's generators,
so a resumed run on other hardware replays the same batches. Kept apart from the reading and loading
in batches.py and loader.py because it is pure: testable on plain numbers, and the order a resume must reproduce.
"""

from __future__ import annotations

import hashlib
import logging
import struct
from dataclasses import asdict, dataclass
from functools import lru_cache

import numpy as np

from sak.pipeline.base.errors import SakError
from sak.pipeline.sources.views import ViewSampler
from sak.student.data.index import CacheIndex

log = logging.getLogger("sak")


def _mix(*parts: int) -> int:
    return int.from_bytes(hashlib.sha256(struct.pack(f"<{len(parts)}q", *parts)).digest()[:8], "little")


def stable_permutation(n: int, *seed_parts: int) -> np.ndarray:
    """Fisher-Yates driven by the project's SplitMix64 (pipeline/sources/views.py): the same order on every
    machine and numpy/torch version, so a resumed run on other hardware replays the same batches."""
    rng = ViewSampler(_mix(*seed_parts))
    perm = list(range(n))
    for i in range(n - 1, 0, -1):
        j = rng.randint(0, i)
        perm[i], perm[j] = perm[j], perm[i]
    return np.asarray(perm, dtype=np.int64)


@dataclass(frozen=True)
class StreamPlan:
    """Which cache rows each batch of one rank holds; a pure function of its fields (no I/O).

    num_images, views_per_image, images_per_shard: the cache's layout (K = views_per_image).
    train_shards: shards trained on (the held-out ones excluded).
    batch_size: samples per batch of this rank (global batch / world size).
    seed: data-order seed; epoch e's shard order and windows are seeded by (seed, e, ...).
    world_size, rank: DDP ranks; streams: loader streams per rank (the loader workers a run started with,
      1 without workers): part of the order, so a resumed run keeps them whatever its workers now.
    shuffle_window: shards of one slot whose images are shuffled together.
    """

    num_images: int
    views_per_image: int
    images_per_shard: int
    train_shards: tuple[int, ...]
    batch_size: int
    seed: int = 0
    world_size: int = 1
    rank: int = 0
    streams: int = 1
    shuffle_window: int = 8

    def __post_init__(self) -> None:
        if self.batch_size < 1 or self.streams < 1 or self.shuffle_window < 1:
            raise SakError("batch size, streams and shuffle window must be >= 1")
        if not 0 <= self.rank < self.world_size:
            raise SakError(f"rank {self.rank} is outside world size {self.world_size}")
        if len(self.train_shards) < self.slots:
            raise SakError(
                f"{len(self.train_shards)} training shard(s) cannot feed {self.world_size} rank(s) x "
                f"{self.streams} stream(s): every loader worker of every rank owns whole shards; use fewer "
                f"workers or ranks, fewer --holdout-shards, or a cache with a smaller --shard-size"
            )

    @property
    def slots(self) -> int:
        return self.world_size * self.streams

    def shard_images(self, shard: int) -> range:
        start = shard * self.images_per_shard
        return range(start, min(start + self.images_per_shard, self.num_images))

    @property
    def epoch_length(self) -> int:
        """Samples of one slot in one epoch: the same for every slot and epoch (a slot's extra shard, or a
        short last shard, is cut at a random point of its last window)."""
        full = self.images_per_shard
        shortest = min(len(self.shard_images(s)) for s in self.train_shards)
        return (len(self.train_shards) // self.slots) * full - (full - shortest)

    @property
    def samples_per_epoch(self) -> int:
        """Samples of all ranks in one epoch."""
        return self.epoch_length * self.slots

    def identity(self) -> dict:
        """Everything that fixes the order except the rank (checked on resume)."""
        d = asdict(self)
        d.pop("rank")
        d["train_shards"] = list(self.train_shards)
        return d

    def slot_samples(self, epoch: int, slot: int) -> np.ndarray:
        """Image indices of one slot in one epoch, in training order: (epoch_length,) int64."""
        return _slot_samples(self, epoch, slot)

    def batch(self, t: int) -> tuple[np.ndarray, np.ndarray]:
        """Emission t of this rank -> (rows (B,) int64, epochs (B,) int64)."""
        stream, i = t % self.streams, t // self.streams
        slot = self.rank * self.streams + stream
        pos = np.arange(i * self.batch_size, (i + 1) * self.batch_size, dtype=np.int64)
        length = self.epoch_length
        epochs = pos // length
        images = np.empty_like(pos)
        for e in np.unique(epochs):
            sel = epochs == e
            images[sel] = self.slot_samples(int(e), slot)[pos[sel] % length]
        rows = images * self.views_per_image + epochs % self.views_per_image  # epoch e replays view e mod K
        return rows, epochs


@lru_cache(maxsize=8)
def _slot_samples(plan: StreamPlan, epoch: int, slot: int) -> np.ndarray:
    order = stable_permutation(len(plan.train_shards), plan.seed, epoch)
    mine = [plan.train_shards[i] for i in order[slot :: plan.slots]]
    parts = []
    for w in range(0, len(mine), plan.shuffle_window):
        images = np.concatenate(
            [np.arange(r.start, r.stop) for r in map(plan.shard_images, mine[w : w + plan.shuffle_window])]
        )
        parts.append(images[stable_permutation(len(images), plan.seed, epoch, slot, w)])
    return np.concatenate(parts)[: plan.epoch_length]


def split_shards(num_shards: int, holdout_shards: int) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """(training shards, held-out shards): the last `holdout_shards` shards are held out."""
    if not 0 <= holdout_shards < num_shards:
        raise SakError(
            f"--holdout-shards {holdout_shards} leaves nothing to train on: the cache has {num_shards} shard(s); "
            f"give --holdout-shards {max(num_shards - 1, 0)} or less (0 holds none out), or extract with a smaller "
            "--shard-size for more shards"
            if holdout_shards >= num_shards
            else f"--holdout-shards must be >= 0, got {holdout_shards}"
        )
    return tuple(range(num_shards - holdout_shards)), tuple(range(num_shards - holdout_shards, num_shards))


def make_stream_plan(
    index: CacheIndex,
    batch_size: int,
    *,
    seed: int = 0,
    world_size: int = 1,
    rank: int = 0,
    num_workers: int = 0,
    shuffle_window: int = 8,
    holdout_shards: int = 1,
    streams: int | None = None,
) -> StreamPlan:
    """The plan for one rank; streams = loader workers, fewer when there are too few shards. `streams`
    given (a resumed run's recorded count) fixes the order whatever the workers now: the loader then
    runs the streams on fewer workers (CacheLoader)."""
    train, _ = split_shards(index.num_shards, holdout_shards)
    if streams is None:
        streams = _streams_for(len(train), world_size, max(1, num_workers))
    return StreamPlan(
        num_images=index.num_images,
        views_per_image=index.views_per_image,
        images_per_shard=index.images_per_shard,
        train_shards=train,
        batch_size=batch_size,
        seed=seed,
        world_size=world_size,
        rank=rank,
        streams=streams,
        shuffle_window=shuffle_window,
    )


def _streams_for(train_shards: int, world_size: int, wanted: int) -> int:
    """Loader streams per rank for a new run: one per worker, fewer when there are too few shards."""
    if train_shards >= world_size * wanted:
        return wanted
    fit = max(1, train_shards // world_size)
    if fit < wanted:
        log.info(
            f"{train_shards} training shard(s) for {world_size} rank(s): using {fit} loader stream(s) per "
            f"rank instead of {wanted} (a worker owns whole shards)"
        )
    return fit


def holdout_rows(index: CacheIndex, holdout_shards: int) -> np.ndarray:
    """Every view of the held-out shards, in store order: (n,) int64."""
    _, held = split_shards(index.num_shards, holdout_shards)
    if not held:
        return np.zeros(0, np.int64)
    return np.arange(held[0] * index.shard_size, index.num_views, dtype=np.int64)
