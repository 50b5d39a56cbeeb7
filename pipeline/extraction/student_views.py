"""`sak-cache run --student-views raw`: each view stored as the student will see it.

The loader otherwise decodes the source JPEG and cuts the view with an antialiased bicubic resize for
every sample (5-8 ms per view on one core at 384 px). With raw views it reads S*S*3 bytes instead. The
pixels come from the same `cut_shard_views` (views.cut_view) the teachers' inputs come from, so the
student sees exactly the pixels it would have cut itself.

Layout: `student_views/` at the cache root, a Zarr v3 array (views, S, S, 3) uint8 (RGB, height, width
last like an image file), one view per inner chunk, `shard_size` views per shard file, no compression
(decoded pixels of photos do not compress losslessly enough to pay for the CPU). cache.json records it
(format.StudentViewsRecord) with the sha256 and xxh3-128 of every shard file. Read without project code:
    zarr.open_array("CACHE/student_views")[row]     # (S, S, 3) uint8
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np

from sak.pipeline.base.errors import SakError
from sak.pipeline.base.provenance import sha256_file, xxh3_file
from sak.pipeline.buckets.bucket import Bucket
from sak.pipeline.buckets.mirror import node_mirror
from sak.pipeline.extraction.preprocess import ViewRow, cut_shard_views
from sak.pipeline.format.documents import write_cache
from sak.pipeline.format.records import CacheManifest, FileDigest, StudentViewsRecord, StudentViewsShard
from sak.pipeline.store.zarr import drop_partials

STUDENT_VIEWS_DIR = "student_views"
STUDENT_VIEWS_MODES = ("decode", "raw")
CUT = "views.cut_view of the stored image: crop box, bicubic+antialias in float32, rounded to uint8, flip"


def check_mode(mode: str) -> str:
    if mode not in STUDENT_VIEWS_MODES:
        raise SakError(f"unknown --student-views {mode!r}; use one of {', '.join(STUDENT_VIEWS_MODES)}")
    return mode


def _array(cache_dir: Path, num_views: int, shard_size: int, size: int):
    import zarr

    path = cache_dir / STUDENT_VIEWS_DIR
    shape = (num_views, size, size, 3)
    if (path / "zarr.json").is_file():
        arr = zarr.open_array(str(path), mode="r+")
        if arr.shape != shape:
            raise SakError(
                f"{path} holds views of shape {arr.shape}, this cache needs {shape}; delete the folder"
            )
        return arr
    return zarr.create_array(
        str(path),
        shape=shape,
        dtype="uint8",
        chunks=(1, size, size, 3),
        shards=(shard_size, size, size, 3),
        compressors=None,
        fill_value=0,
        dimension_names=("view", "y", "x", "rgb"),
        attributes={"kind": "sak-student-views", "cut": CUT},
        config={"write_empty_chunks": True},
    )


def write_views_shard(
    cache_dir: str, rows: list[ViewRow], shard: int, start: int, size: int, cache_url: str | None = None
) -> StudentViewsShard:
    """Cut one shard's views at the student size and write its shard file (a Ray task). A cache at a URL:
    written in this node's mirror, then uploaded as one object and checked before the record is returned
    (the driver records only returned shards)."""
    meta = f"{STUDENT_VIEWS_DIR}/zarr.json"
    root = node_mirror(cache_url, [meta]) if cache_url else Path(cache_dir)
    arr = _open(root)
    views = cut_shard_views(cache_url or cache_dir, rows, [size])[size]  # (n, 3, S, S)
    arr[start : start + len(rows)] = np.ascontiguousarray(views.transpose(0, 2, 3, 1))
    rel = f"{STUDENT_VIEWS_DIR}/{arr.metadata.encode_chunk_key((shard, 0, 0, 0))}"
    drop_partials(root / rel)  # what a writer killed mid-write of this shard left
    record = StudentViewsShard(
        index=shard, file=rel, sha256=sha256_file(root / rel), xxh3=xxh3_file(root / rel)
    )
    if cache_url:
        Bucket(cache_url).put_whole(root / rel, rel)
    return record


def _open(root: Path):
    import zarr

    return zarr.open_array(str(root / STUDENT_VIEWS_DIR), mode="r+")


def add_student_views(
    cache_dir: Path, cache: CacheManifest, rows: list[ViewRow], cache_url: str | None = None
) -> CacheManifest:
    """Write the shards of raw student views the cache does not record yet; returns the updated cache.
    A cache at `cache_url` (cache_dir is the driver's mirror of its metadata): each shard file is uploaded
    whole and checked by the task that wrote it, and recorded only then."""
    import ray

    size, n, k = cache.view_plan.size, cache.num_views, cache.shard_size
    _array(cache_dir, n, k, size)
    meta = cache_dir / STUDENT_VIEWS_DIR / "zarr.json"
    old = cache.student_views
    if cache_url:  # the array's metadata first: the tasks open it from the bucket
        bucket = Bucket(cache_url)
        bucket.put_whole(meta, f"{STUDENT_VIEWS_DIR}/zarr.json")
        present = bucket.listing(STUDENT_VIEWS_DIR)
        done = {s.index: s for s in (old.shards if old else []) if s.file in present}
    else:
        done = {s.index: s for s in (old.shards if old else []) if (cache_dir / s.file).is_file()}
    task = ray.remote(num_cpus=1)(write_views_shard)
    refs = [
        task.remote(str(cache_dir), rows[s * k : min((s + 1) * k, n)], s, s * k, size, cache_url)
        for s in range(cache.num_shards)
        if s not in done
    ]
    for shard in ray.get(refs):
        done[shard.index] = shard
    record = StudentViewsRecord(
        array=STUDENT_VIEWS_DIR,
        size=size,
        shape=[n, size, size, 3],
        cut=CUT,
        metadata=FileDigest(sha256=sha256_file(meta), bytes=meta.stat().st_size),
        shards=[done[s] for s in sorted(done)],
    )
    return write_cache(cache_dir, dataclasses.replace(cache, student_views=record))
