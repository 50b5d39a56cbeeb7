"""Stage-1 data: stream a cache's views and teacher targets to the student, shard-aware and resumable.

    open_cache(CACHE, teachers)   cache.json + views.parquet + images/index.parquet + store manifests,
                                  checked against each other (same views, dataset, plan, shards) -> CacheIndex
    StreamPlan (order.py, pure)   which rows every batch holds, a function of (seed, epoch, rank, stream):
        epoch e: training shards in a seeded order, dealt to slots (rank, stream) -> each slot owns whole
                 shards; a slot's images are shuffled within windows of `shuffle_window` shards and cut to
                 the same length L for every slot; image j is read at row j*K + e%K (view e mod K)
        a slot's samples run on from one epoch into the next; batch i of a stream = its samples [iB, iB+B)
        emission t of a rank = batch t // S of stream t % S (S streams per rank, one per loader worker)
    BatchReader (in the workers)  stored bytes -> decode -> cut_view at the student size -> normalise;
                                  each store's targets (Zarr or WebDataset) read as sorted rows within
                                  each shard, kept as stored (fp16 stays fp16; int8/fp8 values + scales
                                  are dequantised on the training device by decode_targets; pca<k>
                                  coefficients decoded there by one matmul with the store's basis), batch order
    ShardIntegrity (integrity.py)  before a shard is first read: sha256 of its store files and image
                                  tars against the manifests, once per file per process; a bad file is a
                                  SakError naming shard and file (or, --skip-bad-shards, the trainer
                                  checks every shard up front and leaves the bad ones out of the plan)
    CacheLoader (main process)    DataLoader(workers = streams); worker w yields emissions t0+w, t0+w+S, ...
                                  which the DataLoader's round robin returns as t0, t0+1, ... in order, so a
                                  resume at t0 (`load_state_dict`) gives exactly the uninterrupted batches

Shards are written in sorted key order (class-sorted for ImageNet-style folders), so mixing comes from
the per-epoch shard order, the windows, and batches drawing on several shards; widen `shuffle_window` for
sorted datasets. The last `holdout_shards` shards are never trained on: Rep Sim is measured there.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from sak.pipeline.base.errors import SakError
from sak.pipeline.base.provenance import sha256_file
from sak.pipeline.base.typed_json import to_json
from sak.pipeline.buckets.bucket import Bucket, is_url
from sak.pipeline.buckets.mirror import pull, stage_dir
from sak.pipeline.format.documents import read_cache, read_store_manifest
from sak.pipeline.format.layout import IMAGE_INDEX_FILE, VIEWS_FILE, store_file_kind
from sak.pipeline.format.records import CacheManifest, StoreManifest
from sak.pipeline.format.tables import ImageReader, read_table
from sak.pipeline.sources.images import cut_view, decode_image
from sak.pipeline.sources.views import ViewPlan
from sak.pipeline.store.backends import store_codec
from sak.pipeline.store.lowrank import decode_level, read_bases
from sak.pipeline.store.zarr import ShardRows, read_sorted_rows
from sak.pipeline.teachers.forward import IMAGENET_MEAN, IMAGENET_STD, normalize_u8
from sak.pipeline.teachers.specs import get_teacher
from sak.student.data.index import CacheIndex, StoreInfo
from sak.student.data.integrity import ShardIntegrity
from sak.student.data.order import StreamPlan
from sak.student.data.ranged import (
    RangedBucket,
    RangedImages,
    RangedIntegrity,
    RangedShardRows,
    RangedWdsStore,
    ReadAhead,
    fetch_batch,
)
from sak.student.data.remote import ShardFetcher

log = logging.getLogger("sak")
DEFAULT_LOCAL_CACHE_GB = 50.0  # bound on a bucket cache's local read-through directory

NORMALIZATIONS = ("student", "imagenet")
READABLE_FORMATS = ("zarr", "wds")

# ------------------------------------------------------------------------------------------ the cache


def select_stores(
    cache: CacheManifest, teachers: tuple[str, ...] | list[str] | None, where: str
) -> list[str]:
    """Fingerprints of the stores to train on: each entry a teacher name or a store fingerprint; none
    given = every store. Two stores of one teacher must be told apart by fingerprint."""
    stores = cache.stores
    if not stores:
        raise SakError(f"{where} holds no teacher store yet; add one with `sak-cache run --out {where}`")
    by_teacher: dict[str, list[str]] = {}
    for fp, entry in stores.items():
        by_teacher.setdefault(entry.teacher, []).append(fp)
    wanted = list(teachers) if teachers else list(by_teacher)
    chosen: list[str] = []
    for name in wanted:
        if name in stores:
            chosen.append(name)
            continue
        fps = by_teacher.get(name)
        if not fps:
            known = ", ".join(f"{e.teacher} ({fp})" for fp, e in stores.items())
            raise SakError(f"{where} has no store of teacher {name!r}; its stores: {known}")
        if len(fps) > 1:
            raise SakError(
                f"{where} holds {len(fps)} stores of {name} ({', '.join(fps)}); choose one by passing its "
                f"fingerprint in --teachers"
            )
        chosen.append(fps[0])
    names = [stores[fp].teacher for fp in chosen]
    dupes = sorted({n for n in names if names.count(n) > 1})
    if dupes:
        raise SakError(
            f"--teachers selects two stores of {', '.join(dupes)}; the student has one path per teacher"
        )
    return chosen


_AGREEMENT = (  # (manifest field, cache.json value, what it means)
    ("views_sha256", lambda c: c.views.sha256, "views.parquet digest (which views, in which order)"),
    ("dataset_fingerprint", lambda c: c.dataset.fingerprint, "dataset fingerprint"),
    ("view_plan", lambda c: c.view_plan, "view plan"),
    ("num_views", lambda c: c.num_views, "number of views"),
    ("shard_size", lambda c: c.shard_size, "shard size"),
)


def check_stores_agree(cache: CacheManifest, manifests: dict[str, StoreManifest], where: str) -> None:
    """Every selected store must describe the cache's views in the cache's order and shard boundaries."""
    items = list(manifests.items())
    for key, from_cache, meaning in _AGREEMENT:
        for (fp_a, a), (fp_b, b) in zip(items, items[1:]):
            if getattr(a, key) != getattr(b, key):
                raise SakError(
                    f"teacher stores disagree on the {meaning} ({key}): {a.teacher.name} ({fp_a}) has "
                    f"{_shown(getattr(a, key))!r}, {b.teacher.name} ({fp_b}) has {_shown(getattr(b, key))!r}; "
                    f"stores trained together must come from one cache's views"
                )
        for fp, m in items:
            if getattr(m, key) != from_cache(cache):
                raise SakError(
                    f"store {m.teacher.name} ({fp}) was computed with {meaning} {_shown(getattr(m, key))!r}, "
                    f"but {where}/cache.json has {_shown(from_cache(cache))!r}; the store belongs to another cache"
                )


def _shown(value):
    return to_json(value)


def open_cache(
    cache_dir: str | Path,
    teachers: tuple[str, ...] | list[str] | None = None,
    require_complete: bool = True,
    local_cache: str | None = None,
    local_cache_gb: float = DEFAULT_LOCAL_CACHE_GB,
) -> CacheIndex:
    """Read and cross-check a cache for training. `require_complete=False` (online training) accepts
    stores still being extracted: only their manifests are used. A URL cache: its metadata is mirrored
    into `local_cache` and its shard objects fetched there whole as read; without `local_cache`, its metadata
    is mirrored under ~/.cache/sak and the samples are read from the bucket by byte range (ranged.py)."""
    if is_url(cache_dir):
        url = str(cache_dir)
        local = Path(local_cache).expanduser() if local_cache else stage_dir(url, "reader")
        pull(Bucket(url), local, bulk=False)
        index = open_cache(local, teachers, require_complete)
        bound = int(local_cache_gb * 2**30)
        return dataclasses.replace(index, remote=url, local_cache_bytes=bound, ranged=local_cache is None)
    root = Path(cache_dir).expanduser().resolve()
    cache = read_cache(root)
    fps = select_stores(cache, teachers, str(cache_dir))
    manifests = {fp: read_store_manifest(root / cache.stores[fp].path) for fp in fps}
    if require_complete:
        for fp, m in manifests.items():
            if not m.complete:
                raise SakError(
                    f"store {m.teacher.name} ({fp}) is incomplete ({len(m.shards)} of "
                    f"{cache.num_shards} shards); finish it with `sak-cache run --out {cache_dir} "
                    f"--teachers {m.teacher.name}`, or leave it out of --teachers"
                )
    check_stores_agree(cache, manifests, str(cache_dir))
    views_path = root / VIEWS_FILE
    if not views_path.is_file() or sha256_file(views_path) != cache.views.sha256:
        raise SakError(
            f"{views_path} does not match the digest in cache.json; the file changed (run `sak-cache verify`)"
        )
    _check_recorded_digests(root, cache, manifests)
    plan = cache.view_plan
    k, num_views, shard_size = plan.views_per_image, cache.num_views, cache.shard_size
    if shard_size % k:
        raise SakError(f"{cache_dir}: shard size {shard_size} is not a multiple of {k} views per image")

    views = read_table(views_path)
    index = read_table(root / IMAGE_INDEX_FILE)
    if views.num_rows != num_views or index.num_rows * k != num_views:
        raise SakError(
            f"{cache_dir}: {views.num_rows} views and {index.num_rows} images do not make {num_views} views "
            f"of {k} per image; run `sak-cache verify`"
        )
    # the join: row j*K+v must be view v of image j of the index (image-major store order)
    view_keys = np.asarray(views.column("key").to_numpy(zero_copy_only=False), dtype=object).reshape(-1, k)
    image_keys = np.asarray(index.column("key").to_numpy(zero_copy_only=False), dtype=object)
    view_idx = views.column("view").to_numpy().reshape(-1, k)
    if not (view_keys == image_keys[:, None]).all() or not (view_idx == np.arange(k)[None, :]).all():
        raise SakError(
            f"{cache_dir}: views.parquet is not image-major in index order; run `sak-cache verify`"
        )

    stores = []
    for fp, m in manifests.items():
        taps = list(get_teacher(m.teacher.name).levels)
        for lv in m.levels:
            if lv.shape[0] != num_views:
                raise SakError(f"store {fp}: level {lv.block} has {lv.shape[0]} rows, not {num_views}")
            if lv.block not in taps:
                raise SakError(f"store {fp}: block {lv.block} is not one of {m.teacher.name}'s taps {taps}")
        if m.format not in READABLE_FORMATS:
            raise SakError(
                f"store {fp} has format {m.format!r}; the loader reads {', '.join(READABLE_FORMATS)}"
            )
        codec = store_codec(m)  # resolved once per store: the batches use it as it is
        stores.append(
            StoreInfo(
                fingerprint=fp,
                teacher=m.teacher.name,
                dim=m.teacher.dim,
                path=root / cache.stores[fp].path,
                codec=codec,
                format=m.format,
                blocks=tuple(lv.block for lv in m.levels),
                positions=tuple(taps.index(lv.block) for lv in m.levels),
                grids=tuple((lv.shape[1], lv.shape[2]) for lv in m.levels),
                manifest=m,
                bases=_store_bases(root / cache.stores[fp].path, m, fp) if codec.low_rank else None,
            )
        )
    boxes = np.stack([views.column(c).to_numpy().astype(np.int64) for c in ("x0", "y0", "x1", "y1")], axis=1)
    return CacheIndex(
        root=root,
        cache=cache,
        plan=plan,
        stores=stores,
        shard_size=shard_size,
        num_views=num_views,
        num_shards=cache.num_shards,
        image_shard=index.column("image_shard").to_numpy().astype(np.int64),
        image_offset=index.column("offset").to_numpy().astype(np.int64),
        image_nbytes=index.column("nbytes").to_numpy().astype(np.int64),
        boxes=boxes,
        flips=views.column("flip").to_numpy(zero_copy_only=False).astype(bool),
    )


def _store_bases(path: Path, m: StoreManifest, fp: str) -> dict | None:
    """A pca<k> store's basis of every level (checked against the manifest's digests before)."""
    bases = read_bases(path, m.format, [lv.block for lv in m.levels])
    if bases is None:
        raise SakError(
            f"store {m.teacher.name} ({fp}) is a {m.codec} store without its pca basis (basis/); it cannot be "
            f"decoded: run `sak-cache verify`, delete the store and re-run `sak-cache run`"
        )
    for lv in m.levels:
        if list(bases[lv.block].components.shape) != [lv.shape[-1], lv.channels]:
            raise SakError(
                f"store {m.teacher.name} ({fp}) level {lv.block}: its pca basis has shape "
                f"{list(bases[lv.block].components.shape)}, the manifest says {[lv.shape[-1], lv.channels]}"
            )
    return bases


def _check_recorded_digests(root: Path, cache: CacheManifest, manifests: dict[str, StoreManifest]) -> None:
    """The small files the loader reads besides shards (the image index, each store's Zarr metadata or
    WebDataset layout) against the digests the format records for them (caches that record them)."""
    files = [(root / rel, d) for rel, d in (cache.files or {}).items()]
    for fp, m in manifests.items():
        store = root / cache.stores[fp].path
        files += [
            (store / rel, d)
            for rel, d in (m.files or {}).items()
            if rel.endswith(("zarr.json", "layout.json")) or store_file_kind(rel) == "pca basis"
        ]
    for path, digest in files:
        if not path.is_file() or path.stat().st_size != digest.bytes or sha256_file(path) != digest.sha256:
            what = "a pca basis file: the store cannot be decoded; " if "/basis/" in path.as_posix() else ""
            raise SakError(
                f"{path} does not match its recorded sha256 (damaged, modified or missing; {what}run "
                f"`sak-cache verify`)"
            )


def input_normalization(mode: str, student: str) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """(mean, std) of the student's input: "student" = its timm pretrained_cfg, "imagenet" = ImageNet's
    (what the paper's code fed every model)."""
    if mode == "imagenet":
        return IMAGENET_MEAN, IMAGENET_STD
    if mode != "student":
        raise SakError(f"unknown normalization {mode!r}; use one of {', '.join(NORMALIZATIONS)}")
    from sak.student.model.student import student_normalization

    return student_normalization(student)


def check_image_size(image_size: int, plan: ViewPlan) -> None:
    if image_size != plan.size:
        raise SakError(
            f"the student takes {image_size}px input but the cache's views are {plan.size}px; cached targets "
            f"belong to those views: train at {plan.size}px or extract a cache with --size {image_size}"
        )


# ----------------------------------------------------------------------------------------- reading


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
        self._images: ImageReader | None = None
        self._arrays: dict[tuple[str, int], object] = {}
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
        state["_images"], state["_arrays"] = None, {}  # open files and arrays never cross processes
        return state

    def reopen(self) -> None:
        """Drop file handles inherited through fork: a forked descriptor shares its seek offset with the
        parent's, so concurrent seek+read pairs would interleave."""
        if self._images is not None:
            self._images.close()  # closes this process's copies only
        self._images, self._arrays = None, {}

    def _array(self, store: StoreInfo, block: int, kind: str = "levels"):
        key = (store.fingerprint, block, kind)
        if key not in self._arrays:
            import zarr

            path = store.path / kind / str(block)
            where = f"{self.index.remote}/{self._rel(path)}" if self.ranged else str(path)
            self._arrays[key] = zarr.open_array(where, mode="r")
        return self._arrays[key]

    def _rel(self, path: Path) -> str:
        return path.relative_to(self.index.root).as_posix()

    def _shard_rows(self, path: Path) -> ShardRows | None:
        """Fast row reads of a sharded array: from its local files, or by range from the bucket."""
        rows = ShardRows.of(path)  # its zarr.json: local (a bucket cache's metadata is mirrored)
        return RangedShardRows.over(rows, self.ranged, self._rel(path)) if self.ranged else rows

    def _rows_reader(self, store: StoreInfo, block: int, kind: str) -> ShardRows | None:
        key = (store.fingerprint, block, f"rows-{kind}")
        if key not in self._arrays:
            self._arrays[key] = self._shard_rows(store.path / kind / str(block))
        return self._arrays[key]

    def _read_level(self, store: StoreInfo, block: int, rows: np.ndarray, kind: str) -> np.ndarray:
        """One level's values (kind "levels") or scales ("scales") of `rows`, in the given order, as
        stored. Zarr shard files are read row by row straight into the batch (sorted reads, no reorder
        copy); other layouts go through zarr or the WebDataset store (sorted unique rows, then reordered)."""
        fast = self._rows_reader(store, block, kind) if store.format == "zarr" else None
        if fast is not None:
            out = np.empty((len(rows), *fast.shape[1:]), dtype=fast.dtype)
            order = np.argsort(rows, kind="stable")
            fast.read_into(rows[order], out, dest=order)
            return out
        uniq, inverse = np.unique(rows, return_inverse=True)  # sorted; a row twice is read once
        if store.format == "wds":
            from sak.pipeline.store.wds import WdsTeacherStore

            key = (store.fingerprint, -1, "wds")
            if key not in self._arrays:
                args = (store.path, store.codec, self.index.shard_size)
                self._arrays[key] = (
                    RangedWdsStore(*args, self.ranged, self._rel(store.path))
                    if self.ranged
                    else WdsTeacherStore(*args)
                )
            last = (store.fingerprint, block, uniq.tobytes())
            if self._arrays.get("wds-last", (None, None))[0] != last:  # values and scales: one read
                enc = self._arrays[key].read_encoded_rows(block, uniq)  # groups rows by shard itself
                self._arrays["wds-last"] = (last, enc)
            enc = self._arrays["wds-last"][1]
            return (enc.values if kind == "levels" else enc.scales)[inverse]
        # sorted rows as runs of slices (zarr's index-array selection is ~20x slower on sharded arrays)
        return read_sorted_rows(self._array(store, block, kind), uniq)[inverse]

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
            for block in store.blocks:
                values = self._read_level(store, block, rows, "levels")
                scales = self._read_level(store, block, rows, "scales") if scaled else None
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
        key = ("student_views", 0, "rows")
        if key not in self._arrays:
            self._arrays[key] = self._shard_rows(self.index.root / sv.array)
        return self._arrays[key]

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
            for block in store.blocks if store.format == "zarr" else ():
                arrays += [(r, rows) for kind in kinds if (r := self._rows_reader(store, block, kind))]
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


# ----------------------------------------------------------------------------------------- loading


class CacheStream(IterableDataset):
    """Endless batches of one rank from emission `start` on. In DataLoader worker w of S: emissions
    start+w, start+w+S, ... (always the same stream, so the same shards); without workers: all of them."""

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
        if num_workers and num_workers != plan.streams:
            num_workers = plan.streams  # one worker per stream: each worker owns its stream's shards
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
            dataset, batch_size=None, num_workers=self.num_workers, pin_memory=self.pin_memory, **kwargs
        )
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
