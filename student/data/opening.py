"""Opening a cache for training: cache.json, views.parquet, images/index.parquet and the selected store
manifests, read and checked against each other (same views, dataset, plan, shards) -> a CacheIndex.

A bucket cache (s3:// / gs://) has its metadata mirrored locally first; its samples are then read by byte
range (bucket_ranges.py) or through a bounded local folder of whole shard objects (bucket_mirror.py).
"""

from __future__ import annotations

import dataclasses
import logging
from pathlib import Path

import numpy as np

from sak.pipeline.base.errors import SakError
from sak.pipeline.base.provenance import read_json, sha256_file
from sak.pipeline.base.typed_json import to_json
from sak.pipeline.buckets.bucket import Bucket, is_url
from sak.pipeline.buckets.mirror import pull, stage_dir
from sak.pipeline.format.documents import read_cache, read_store_manifest, stores_in_progress
from sak.pipeline.format.layout import IMAGE_INDEX_FILE, STORE_MANIFEST, VIEWS_FILE, store_file_kind
from sak.pipeline.format.records import CacheManifest, StoreManifest
from sak.pipeline.format.tables import read_table
from sak.pipeline.store.backends import store_codec
from sak.pipeline.store.lowrank import read_bases
from sak.pipeline.teachers.specs import get_teacher
from sak.student.data.index import CacheIndex, StoreInfo

log = logging.getLogger("sak")
DEFAULT_LOCAL_CACHE_GB = 50.0  # bound on a bucket cache's local read-through directory
READABLE_FORMATS = ("zarr", "wds")


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


def _stores_not_in_progress(
    root: Path, cache: CacheManifest, teachers: tuple[str, ...] | list[str] | None, where: str, complete: bool
) -> list[str]:
    """select_stores, leaving out the stores a live `sak-cache run` is adding (their manifests are written
    when it ends) with one warning; a store asked for by --teachers that is being added fails naming the
    holder (an online run takes one whose manifest exists: it reads only the manifest)."""
    busy = stores_in_progress(root, cache)
    if not teachers and busy:
        holder = next(iter(busy.values()))
        names = ", ".join(f"{cache.stores[fp].teacher} ({fp})" for fp in busy)
        if len(busy) == len(cache.stores):
            raise SakError(
                f"{where}: every store is being extracted right now ({names}; {holder}); wait for that "
                f"`sak-cache run` to finish"
            )
        log.warning(
            f"{where}: leaving out {names}, being extracted right now ({holder}); training on the rest"
        )
        cache = dataclasses.replace(cache, stores={k: e for k, e in cache.stores.items() if k not in busy})
    fps = select_stores(cache, teachers, where)
    for fp in fps:
        entry = cache.stores[fp]
        if fp in busy and (complete or not (root / entry.path / STORE_MANIFEST).is_file()):
            raise SakError(
                f"store {entry.teacher} ({fp}) of {where} is being extracted right now ({busy[fp]}); wait "
                f"for that `sak-cache run` to finish, or leave {entry.teacher} out of --teachers"
            )
    return fps


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
    is mirrored under ~/.cache/sak and the samples are read from the bucket by byte range (bucket_ranges.py)."""
    if is_url(cache_dir):
        url = str(cache_dir)
        local = Path(local_cache).expanduser() if local_cache else stage_dir(url, "reader")
        pull(Bucket(url), local, bulk=False)
        index = open_cache(local, teachers, require_complete)
        bound = int(local_cache_gb * 2**30)
        return dataclasses.replace(index, remote=url, local_cache_bytes=bound, ranged=local_cache is None)
    root = Path(cache_dir).expanduser().resolve()
    cache = read_cache(root)
    fps = _stores_not_in_progress(root, cache, teachers, str(cache_dir), require_complete)
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
    for fp, m in manifests.items():
        _check_zarr_metadata(root / cache.stores[fp].path, m)
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


def _check_zarr_metadata(store: Path, m: StoreManifest) -> None:
    """Each Zarr array's shape, dtype and shard shape against the manifest before any read: a forged
    zarr.json (a huge shape) is refused here instead of sizing the reads."""
    if m.format != "zarr":
        return
    for level in m.levels:
        arrays = [(level.array, level.shape, level.store_dtype)]
        arrays += [(level.scales, level.scales_shape, level.scales_dtype)] if level.scales else []
        for rel, shape, dtype in arrays:
            if rel is None:
                continue
            meta = read_json(store / rel / "zarr.json")
            try:
                got = (
                    meta["shape"],
                    meta["data_type"],
                    meta["chunk_grid"]["configuration"]["chunk_shape"][0],
                )
            except (KeyError, TypeError, IndexError) as e:
                raise SakError(f"{store / rel}/zarr.json lacks {e}; run `sak-cache verify`") from e
            if got != (list(shape), dtype, m.shard_size):
                raise SakError(
                    f"{store / rel}/zarr.json says shape {got[0]} {got[1]} in shards of {got[2]}, the manifest "
                    f"{list(shape)} {dtype} in shards of {m.shard_size}; the store is damaged: run `sak-cache verify`"
                )


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
