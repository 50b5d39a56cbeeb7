"""Stage-1 data: stream a cache's views and teacher targets to the student, shard-aware and resumable.

    open_cache(CACHE, teachers)   (opening.py) cache.json + views.parquet + images/index.parquet + store
                                  manifests, checked against each other (same views, dataset, plan, shards)
    StreamPlan (order.py, pure)   which rows every batch holds, a function of (seed, epoch, rank, stream):
        epoch e: training shards in a seeded order, dealt to slots (rank, stream) -> each slot owns whole
                 shards; a slot's images are shuffled within windows of `shuffle_window` shards and cut to
                 the same length L for every slot; image j is read at row j*K + e%K (view e mod K)
        a slot's samples run on from one epoch into the next; batch i of a stream = its samples [iB, iB+B)
        emission t of a rank = batch t // S of stream t % S (S streams per rank)
    BatchReader (batches.py)      in the workers: rows -> decoded, cut, normalised views + stored targets
    ShardIntegrity (integrity.py)  before a shard is first read: sha256 of its store files and image
                                  tars against the manifests (or, --skip-bad-shards, every shard up front)
    CacheLoader (here)            DataLoader(W workers, W dividing S); worker w yields emissions t0+w,
                                  t0+w+W, ... (whole streams: the same shards), which the DataLoader's round
                                  robin returns as t0, t0+1, ... in order, so a resume at t0
                                  (`load_state_dict`) gives exactly the uninterrupted batches, on any W

Shards are written in sorted key order (class-sorted for ImageNet-style folders), so mixing comes from
the per-epoch shard order, the windows, and batches drawing on several shards; widen `shuffle_window` for
sorted datasets. The last `holdout_shards` shards are never trained on: Rep Sim is measured there.
"""

from __future__ import annotations

import os
from collections.abc import Iterator

import numpy as np
import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from sak.pipeline.base.errors import SakError
from sak.student.data.batches import BatchReader
from sak.student.data.opening import open_cache  # noqa: F401  (the stage-2 cache builder's import, until it moves)
from sak.student.data.order import StreamPlan


def usable_workers(requested: int) -> int:
    """Loader workers this machine can run: the request, capped at its CPU count (a per-machine setting,
    so a run resumed on a smaller node keeps its data order; torch warns when workers exceed the CPUs)."""
    return max(0, min(requested, os.cpu_count() or 1))


class CacheStream(IterableDataset):
    """Endless batches of one rank from emission `start` on. In DataLoader worker w of W (W dividing the
    S streams): emissions start+w, start+w+W, ... (always the same streams, so the same shards); without
    workers: all of them."""

    def __init__(self, plan: StreamPlan, reader: BatchReader, start: int = 0) -> None:
        self.plan, self.reader, self.start = plan, reader, start

    def batch(self, t: int, step: int = 1) -> dict:
        rows, epochs = self.plan.batch(t)
        ahead = self.reader.ahead
        out = ahead.take(rows, self.reader.read) if ahead is not None else self.reader.read(rows)
        if ahead is not None:  # a bucket read by range: this worker's next batch is read meanwhile
            ahead.submit(self.plan.batch(t + step)[0], self.reader.read)
        if self.reader.fetcher is not None:  # this worker's next batch: fetch its shards meanwhile
            upcoming, _ = self.plan.batch(t + step)
            self.reader.fetcher.prefetch(np.unique(upcoming // self.reader.index.shard_size).tolist())
        out["epochs"] = torch.from_numpy(epochs)
        out["index"] = t
        out["stream"] = t % self.plan.streams
        return out

    def __iter__(self) -> Iterator[dict]:
        info = get_worker_info()
        workers, wid = (1, 0) if info is None else (info.num_workers, info.id)
        if info is not None:
            self.reader.reopen()
        if self.plan.streams % workers:
            raise RuntimeError(f"{workers} loader workers cannot split {self.plan.streams} streams evenly")
        t = self.start + wid
        while True:
            try:
                batch = self.batch(t, workers)
            except SakError as e:
                if info is None:
                    raise
                # handed to the main process as data: CacheLoader raises it there, without the worker's
                # traceback wrapped around the message
                yield {"index": t, "error": str(e)}
                return
            yield batch
            t += workers


class CacheLoader:
    """The training loader of one rank: endless batches in a fixed order, resumable exactly.

    Iterating yields batch dicts (see BatchReader.read, plus `index`, `epochs`, `stream`); `state_dict()`
    counts the batches handed out, `load_state_dict()` restarts right after them.
    """

    def __init__(
        self,
        plan: StreamPlan,
        reader: BatchReader,
        num_workers: int = 0,
        pin_memory: bool | None = None,
        prefetch_factor: int = 2,
    ) -> None:
        num_workers = usable_workers(num_workers)
        if num_workers:
            # each worker owns whole streams (hence their shards): one per stream, or fewer that split them
            # evenly (a resumed run keeps its recorded streams whatever its workers now)
            num_workers = max(
                w for w in range(1, min(num_workers, plan.streams) + 1) if plan.streams % w == 0
            )
        self.plan, self.reader, self.num_workers = plan, reader, num_workers
        self.pin_memory = torch.cuda.is_available() if pin_memory is None else pin_memory
        self.prefetch_factor = prefetch_factor
        self.consumed = 0  # batches handed to the trainer

    @property
    def epoch(self) -> float:
        """Epochs of data handed out so far (each slot advances one batch per `streams` emissions)."""
        return self.consumed * self.plan.batch_size / (self.plan.streams * self.plan.epoch_length)

    def state_dict(self) -> dict:
        return {"batches": self.consumed, "plan": self.plan.identity()}

    def load_state_dict(self, state: dict) -> None:
        if state["plan"] != self.plan.identity():
            mine, theirs = self.plan.identity(), state["plan"]
            diff = sorted(k for k in set(mine) | set(theirs) if mine.get(k) != theirs.get(k))
            raise SakError(
                f"the saved loader state belongs to another data order (differs in {', '.join(diff)}); "
                f"resume with the run's own cache, seed, batch size, world size and --num-workers"
            )
        self.consumed = int(state["batches"])

    def __iter__(self) -> Iterator[dict]:
        dataset = CacheStream(self.plan, self.reader, start=self.consumed)
        kwargs = {"prefetch_factor": self.prefetch_factor} if self.num_workers else {}
        loader = DataLoader(
            dataset, batch_size=None, num_workers=self.num_workers, pin_memory=self.pin_memory,
            generator=torch.Generator().manual_seed(self.plan.seed),  # its workers' seed: never the global RNG
            **kwargs,
        )  # fmt: skip
        for batch in loader:
            if "error" in batch:
                raise SakError(batch["error"])
            if batch["index"] != self.consumed:  # the DataLoader's round robin is what makes resume exact
                raise RuntimeError(f"loader returned batch {batch['index']}, expected {self.consumed}")
            self.consumed += 1
            yield batch


def eval_batches(
    reader: BatchReader, rows: np.ndarray, batch_size: int, rank: int = 0, world_size: int = 1
) -> Iterator[dict]:
    """Batches over a fixed row list (held-out views), this rank's contiguous part, in the main process."""
    mine = np.array_split(rows, world_size)[rank]
    for i in range(0, len(mine), batch_size):
        yield reader.read(mine[i : i + batch_size])
