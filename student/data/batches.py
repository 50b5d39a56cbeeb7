"""Building a batch from cache rows, in the loader's workers: stored bytes -> decode -> cut_view at the
student size -> normalise; each store's targets (Zarr or WebDataset) read as sorted rows within each shard,
kept as stored (fp16 stays fp16; int8/fp8 values + scales are dequantised on the training device by
`decode_targets`; pca<k> coefficients decoded there by one matmul with the store's basis), batch order.

Before a shard is first read its files are checked (integrity.py; by size for a bucket read in place).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from sak.pipeline.base.errors import SakError
from sak.pipeline.format.tables import ImageReader
from sak.pipeline.sources.images import cut_view, decode_image
from sak.pipeline.sources.views import ViewPlan
from sak.pipeline.store.lowrank import decode_level
from sak.pipeline.store.zarr import ShardRows, read_sorted_rows
from sak.pipeline.teachers.forward import normalize_u8
from sak.student.data.bucket_mirror import ShardFetcher
from sak.student.data.bucket_ranges import (
    RangedBucket,
    RangedImages,
    RangedIntegrity,
    RangedShardRows,
    RangedWdsStore,
    ReadAhead,
    fetch_batch,
)
from sak.student.data.index import CacheIndex, StoreInfo
from sak.student.data.integrity import ShardIntegrity


def check_image_size(image_size: int, plan: ViewPlan) -> None:
    if image_size != plan.size:
        raise SakError(
            f"the student takes {image_size}px input but the cache's views are {plan.size}px; cached targets "
            f"belong to those views: train at {plan.size}px or extract a cache with --size {image_size}"
        )


def _to_tensors(
    codec, values: np.ndarray, scales: np.ndarray | None
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Stored arrays -> tensors without widening: fp16 stays fp16 (and int8/fp8 one byte) until the
    training device decodes them (`decode_targets`)."""
    if hasattr(codec, "to_torch"):
        return codec.to_torch(values, scales)
    values = np.ascontiguousarray(values)
    if codec.true_dtype == "bfloat16":  # kept as uint16 bits
        return torch.from_numpy(values.view(np.int16)).view(torch.bfloat16), None
    return torch.from_numpy(values), None


def _is_scaled(codec) -> bool:
    return bool(getattr(codec, "scaled", False))


def decode_targets(
    batch: dict, stores: list[StoreInfo], device: torch.device | str
) -> dict[str, list[torch.Tensor]]:
    """A batch's stored targets -> {teacher: [(B, H, W, C)]} on `device`. Float codecs move as stored (the
    loss widens them); quantised ones (values and scales) are dequantised there, to float32. Every value
    is checked finite there too (one sync per batch), not in the CPU workers: a NaN hole or an inf is a
    SakError naming store, level and row."""
    scales = batch.get("target_scales", {})
    out = {}
    for store in stores:
        values = batch["targets"][store.teacher]
        if store.bases is not None:  # pca<k>: coefficients (B, H, W, k) @ components (k, C) + mean, there
            codec = store.codec
            sc = scales.get(store.teacher, [None] * len(values))
            out[store.teacher] = [
                decode_level(codec, store.bases[b], v, s, device=device)
                for b, v, s in zip(store.blocks, values, sc)
            ]
        elif store.teacher in scales:
            codec = store.codec
            out[store.teacher] = [
                codec.decode_torch(v, sc, device=device, dtype=torch.float32)
                for v, sc in zip(values, scales[store.teacher])
            ]
        else:
            out[store.teacher] = [v.to(device, non_blocking=True) for v in values]
    _check_finite(out, stores, batch.get("rows"))
    return out


def _check_finite(
    targets: dict[str, list[torch.Tensor]], stores: list[StoreInfo], rows: torch.Tensor | None
) -> None:
    flags = [torch.isfinite(t).all() for s in stores for t in targets[s.teacher] if t.is_floating_point()]
    if not flags or bool(torch.stack(flags).all()):
        return
    for store in stores:
        for block, t in zip(store.blocks, targets[store.teacher]):
            if t.is_floating_point() and not bool(torch.isfinite(t).all()):
                i = int(torch.nonzero(~torch.isfinite(t.flatten(1).float()).all(1))[0])
                row = int(rows[i]) if rows is not None else i
                raise SakError(
                    f"store {store.teacher} ({store.fingerprint}) level {block} row {row} is not finite: a "
                    f"hole or corruption; run `sak-cache verify {store.path.parent.parent}`"
                )


class StoreReader:
    """One teacher store's levels (and scales) of cache rows, its arrays opened lazily in the process that
    reads them: Zarr shard files row by row (`ShardRows`, local or by range from a bucket), other Zarr
    layouts through zarr, WebDataset shards through the WebDataset store (one read gives values and scales)."""

    def __init__(self, store: StoreInfo, index: CacheIndex, ranged: RangedBucket | None) -> None:
        self.store, self.index, self.ranged = store, index, ranged
        self._rows: dict[tuple[int, str], ShardRows | None] = {}  # (block, kind) -> fast row reader
        self._arrays: dict[tuple[int, str], object] = {}  # (block, kind) -> zarr array
        self._wds = None  # the WebDataset store
        self._wds_last: tuple[tuple[int, bytes], object] | None = None  # ((block, rows), encoded rows)

    def _rel(self, path: Path) -> str:
        return path.relative_to(self.index.root).as_posix()

    def rows_reader(self, block: int, kind: str) -> ShardRows | None:
        """Fast row reads of a sharded Zarr level (None: not a sharded array)."""
        if (block, kind) not in self._rows:
            self._rows[(block, kind)] = open_shard_rows(
                self.index, self.ranged, self.store.path / kind / str(block)
            )
        return self._rows[(block, kind)]

    def _array(self, block: int, kind: str):
        if (block, kind) not in self._arrays:
            import zarr

            path = self.store.path / kind / str(block)
            where = f"{self.index.remote}/{self._rel(path)}" if self.ranged else str(path)
            self._arrays[(block, kind)] = zarr.open_array(where, mode="r")
        return self._arrays[(block, kind)]

    def _wds_rows(self, block: int, uniq: np.ndarray):
        if self._wds is None:
            from sak.pipeline.store.wds import WdsTeacherStore

            args = (self.store.path, self.store.codec, self.index.shard_size)
            self._wds = (
                RangedWdsStore(*args, self.ranged, self._rel(self.store.path))
                if self.ranged
                else WdsTeacherStore(*args)
            )
        key = (block, uniq.tobytes())
        if self._wds_last is None or self._wds_last[0] != key:  # values and scales: one read
            self._wds_last = (key, self._wds.read_encoded_rows(block, uniq))  # groups rows by shard itself
        return self._wds_last[1]

    def read(self, block: int, rows: np.ndarray, kind: str) -> np.ndarray:
        """One level's values (kind "levels") or scales ("scales") of `rows`, in the given order, as
        stored. Zarr shard files are read row by row straight into the batch (sorted reads, no reorder
        copy); other layouts read sorted unique rows, then reorder."""
        fast = self.rows_reader(block, kind) if self.store.format == "zarr" else None
        if fast is not None:
            out = np.empty((len(rows), *fast.shape[1:]), dtype=fast.dtype)
            order = np.argsort(rows, kind="stable")
            fast.read_into(rows[order], out, dest=order)
            return out
        uniq, inverse = np.unique(rows, return_inverse=True)  # sorted; a row twice is read once
        if self.store.format == "wds":
            enc = self._wds_rows(block, uniq)
            return (enc.values if kind == "levels" else enc.scales)[inverse]
        # sorted rows as runs of slices (zarr's index-array selection is ~20x slower on sharded arrays)
        return read_sorted_rows(self._array(block, kind), uniq)[inverse]


def open_shard_rows(index: CacheIndex, ranged: RangedBucket | None, path: Path) -> ShardRows | None:
    """Fast row reads of a sharded array: from its local files, or by range from the bucket."""
    rows = ShardRows.of(path)  # its zarr.json: local (a bucket cache's metadata is mirrored)
    return RangedShardRows.over(rows, ranged, path.relative_to(index.root).as_posix()) if ranged else rows


class BatchReader:
    """Builds batches from cache rows. Files and arrays open lazily, so it is safe to fork into workers.

    image_size: student input side (must equal the view size); mean/std: the student's normalisation.
    with_targets: read every store's targets. view_sides: also return uint8 views at these sides (online
    teachers: the plan size, and SAM's fixed side), cut from the source like extraction did.
    stored_views: read the cache's stored student pixels when it has them (False: always decode + cut).
    """

    def __init__(
        self,
        index: CacheIndex,
        image_size: int,
        mean: tuple[float, ...],
        std: tuple[float, ...],
        with_targets: bool = True,
        view_sides: tuple[int, ...] = (),
        stored_views: bool = True,
    ) -> None:
        check_image_size(image_size, index.plan)
        self.stored_views = stored_views  # use the cache's student views (--student-views raw) if it has them
        self.index = index
        self.image_size = image_size
        self.mean = torch.tensor(mean, dtype=torch.float32).view(1, 3, 1, 1)
        self.std = torch.tensor(std, dtype=torch.float32).view(1, 3, 1, 1)
        self.with_targets = with_targets
        self.view_sides = tuple(sorted(set(view_sides)))
        # opened in the process that reads (never across a fork): image files, store arrays, stored views
        self._images: ImageReader | None = None
        self._stores: dict[str, StoreReader] = {}
        self._raw_views: list[ShardRows | None] = []  # [] = not opened yet
        # a bucket cache: read by range in place (`ranged`, with the next batch read ahead), or its shard
        # objects fetched whole into --local-cache (`fetcher`)
        self.ranged = RangedBucket(index.remote) if index.ranged else None
        self.ahead = ReadAhead() if self.ranged else None
        self.fetcher = (
            ShardFetcher(index, index.remote, index.local_cache_bytes, with_targets)
            if index.remote and not index.ranged
            else None
        )
        # verdicts are plain data: kept across forks
        self.integrity = (
            RangedIntegrity(index, self.ranged, with_targets)
            if self.ranged
            else ShardIntegrity(index, with_targets)
        )

    def __getstate__(self) -> dict:
        state = dict(self.__dict__)
        state.update(_images=None, _stores={}, _raw_views=[])  # open files and arrays never cross processes
        return state

    def reopen(self) -> None:
        """Drop file handles inherited through fork: a forked descriptor shares its seek offset with the
        parent's, so concurrent seek+read pairs would interleave."""
        if self._images is not None:
            self._images.close()  # closes this process's copies only
        self._images, self._stores, self._raw_views = None, {}, []

    def store_reader(self, store: StoreInfo) -> StoreReader:
        if store.fingerprint not in self._stores:
            self._stores[store.fingerprint] = StoreReader(store, self.index, self.ranged)
        return self._stores[store.fingerprint]

    def read_targets(
        self, rows: np.ndarray
    ) -> tuple[dict[str, list[torch.Tensor]], dict[str, list[torch.Tensor]]]:
        """({teacher: [(B, H, W, C) values per level]}, {teacher: [scales per level]} for quantised codecs),
        rows in the given order, values in the stored dtype (see decode_targets, which also checks them
        finite on the training device)."""
        values_out: dict[str, list[torch.Tensor]] = {}
        scales_out: dict[str, list[torch.Tensor]] = {}
        for store in self.index.stores:
            codec = store.codec
            scaled = _is_scaled(codec)
            reader = self.store_reader(store)
            for block in store.blocks:
                values = reader.read(block, rows, "levels")
                scales = reader.read(block, rows, "scales") if scaled else None
                v, sc = _to_tensors(codec, values, scales)
                values_out.setdefault(store.teacher, []).append(v)  # (B, H, W, C)
                if scaled:
                    scales_out.setdefault(store.teacher, []).append(sc)
        return values_out, scales_out

    def raw_views(self) -> ShardRows | None:
        """The cache's stored student views (`--student-views raw`) if it has them at the student size."""
        sv = self.index.cache.student_views
        if sv is None or sv.size != self.image_size or not self.stored_views:
            return None
        if not self._raw_views:
            self._raw_views.append(open_shard_rows(self.index, self.ranged, self.index.root / sv.array))
        return self._raw_views[0]

    def read_views(self, rows: np.ndarray, sides: tuple[int, ...]) -> dict[int, torch.Tensor]:
        """{side: (B, 3, side, side) uint8}: the stored student views when the cache has them at that side
        (no decode, no resize; a channels-last view of the stored bytes), else one decode per distinct
        image and cut_view per row and side."""
        raw = self.raw_views()
        if raw is not None and sides == (self.image_size,):
            out = np.empty((len(rows), *raw.shape[1:]), dtype=np.uint8)  # (B, S, S, 3)
            order = np.argsort(rows, kind="stable")
            raw.read_into(rows[order], out, dest=order)
            return {self.image_size: torch.from_numpy(out).permute(0, 3, 1, 2)}
        idx = self.index
        if self._images is None:
            self._images = RangedImages(self.ranged) if self.ranged else ImageReader(idx.root)
        out = {s: torch.empty((len(rows), 3, s, s), dtype=torch.uint8) for s in sides}
        decoded: dict[int, torch.Tensor] = {}
        for i, row in enumerate(rows.tolist()):
            j = row // idx.views_per_image
            if j not in decoded:
                data = self._images.read(
                    int(idx.image_shard[j]), int(idx.image_offset[j]), int(idx.image_nbytes[j])
                )
                decoded[j] = decode_image(data)  # (3, H, W) uint8
            box = tuple(int(v) for v in idx.boxes[row])
            for s in sides:
                out[s][i] = cut_view(decoded[j], box, bool(idx.flips[row]), (s, s))
        return out

    def normalize(self, views_u8: torch.Tensor) -> torch.Tensor:
        """(B, 3, S, S) uint8 -> float32 student input."""
        return normalize_u8(views_u8, self.mean, self.std)

    def _fetch_ranges(self, rows: np.ndarray, sides: tuple[int, ...]) -> None:
        """A bucket read by range: every Zarr chunk and image this batch needs, requested in one go (the
        GETs run concurrently); the readers below then find their bytes ready."""
        idx, arrays, image_ranges = self.index, [], []
        raw = self.raw_views()
        if raw is not None and sides == (self.image_size,):
            arrays.append((raw, rows))
        else:
            images = np.unique(rows // idx.views_per_image)
            cols = (idx.image_shard[images], idx.image_offset[images], idx.image_nbytes[images])
            image_ranges = [tuple(int(v) for v in image) for image in zip(*cols)]
        for store in idx.stores if self.with_targets else []:
            kinds = ("levels", "scales") if _is_scaled(store.codec) else ("levels",)
            reader = self.store_reader(store)
            for block in store.blocks if store.format == "zarr" else ():
                arrays += [(r, rows) for kind in kinds if (r := reader.rows_reader(block, kind))]
        if self._images is None:
            self._images = RangedImages(self.ranged)
        fetch_batch(self.ranged, arrays, self._images, image_ranges)

    def read(self, rows: np.ndarray) -> dict:
        """A batch: rows (B,), images (B, 3, S, S) float32, targets (if with_targets), views (if sides)."""
        shards = np.unique(rows // self.index.shard_size).tolist()
        if self.fetcher is not None:  # a bucket cache: its shard objects, fetched into the local directory
            self.fetcher.ensure(shards)
        for shard in shards:
            self.integrity.check(shard)  # before any byte of it is used; hashed once per file per process
        sides = tuple(sorted({self.image_size, *self.view_sides}))
        if self.ranged:
            self._fetch_ranges(rows, sides)
        views = self.read_views(rows, sides)
        batch: dict = {
            "rows": torch.from_numpy(rows.astype(np.int64)),
            "images": self.normalize(views[self.image_size]),
        }
        if self.view_sides:
            batch["views"] = {s: views[s] for s in self.view_sides}
        if self.with_targets:
            batch["targets"], scales = self.read_targets(rows)
            if scales:
                batch["target_scales"] = scales
        return batch
