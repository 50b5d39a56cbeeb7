"""A cache in a bucket read in place, by byte range: what the loader does without `--local-cache`.

Only the bytes a batch needs cross the network: an image's bytes at its recorded offset in its image tar,
a Zarr shard file's chunk index (its last 16 x rows + 4 bytes, read once per shard and process) and then
one range per sample and level, a WebDataset shard's tar headers (once per shard and process) and then each
member's data by its offset. A batch's Zarr chunks and images are requested in one go (`fetch_batch`: fsspec
runs the GETs concurrently). Nothing is written locally. `ReadAhead` reads the worker's next batch (its
next shard, when the batch crosses into one) in a background thread while the current batch is used.

Integrity: a range read cannot be checked against a whole object's digest without reading the whole
object, so here every object a shard needs must exist in the bucket with the size its manifest records
(an object replaced or cut short is refused before use); the digests are checked by `--local-cache`
(whole objects, hashed before first use) and by `sak-cache verify URL`.
"""

from __future__ import annotations

import os
import tarfile
import threading
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

import numpy as np

from sak.pipeline.base.errors import SakError
from sak.pipeline.buckets.bucket import Bucket
from sak.pipeline.buckets.failures import storage_errors
from sak.pipeline.format.layout import image_tar_name
from sak.pipeline.store.codecs import Codec
from sak.pipeline.store.wds import WdsTeacherStore, load_member, shard_file
from sak.pipeline.store.zarr import ShardRows
from sak.student.data.index import CacheIndex
from sak.student.data.integrity import ShardIntegrity


class RangedBucket:
    """Byte ranges of a bucket cache's objects (paths relative to the cache root); counts what it reads."""

    def __init__(self, url: str) -> None:
        self.url = url
        self.fetched_bytes = 0  # downloaded by this process
        self.requests = 0
        self._bucket: Bucket | None = None
        self._pid = 0
        self._sizes: dict[str, int] | None = None
        self._lock = threading.Lock()

    def __getstate__(self) -> dict:  # a fresh connection in each loader worker
        return {**self.__dict__, "_bucket": None, "_lock": None}

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state, _lock=threading.Lock())

    @property
    def bucket(self) -> Bucket:
        if self._bucket is None or self._pid != os.getpid():  # a forked worker opens its own connection
            self._bucket, self._pid = Bucket(self.url), os.getpid()
        return self._bucket

    def size(self, rel: str) -> int | None:
        """An object's size from one listing of the cache (None: no such object)."""
        if self._sizes is None:
            self._sizes = self.bucket.listing()
        return self._sizes.get(rel)

    def read(self, rel: str, offset: int, nbytes: int) -> bytes:
        """Bytes [offset, offset + nbytes) of one object (one ranged GET)."""
        if nbytes <= 0:
            return b""
        try:
            with storage_errors(self.url, f"reading {rel}"):
                data = self.bucket.fs.cat_file(self.bucket.key(rel), start=offset, end=offset + nbytes)
        except FileNotFoundError:
            raise SakError(f"{self.url}/{rel} does not exist; run `sak-cache verify {self.url}`") from None
        self.count(len(data))
        return data

    def read_many(self, ranges: list[tuple[str, int, int]]) -> list[bytes]:
        """Several (object, offset, nbytes) ranges at once: fsspec issues the GETs concurrently."""
        if not ranges:
            return []
        b = self.bucket
        keys = [b.key(rel) for rel, _, _ in ranges]
        try:
            with storage_errors(self.url, f"reading {len(ranges)} byte range(s)"):
                out = b.fs.cat_ranges(
                    keys, [o for _, o, _ in ranges], [o + n for _, o, n in ranges], on_error="raise"
                )
        except FileNotFoundError:
            raise SakError(
                f"{self.url}: an object of the cache is missing; run `sak-cache verify {self.url}`"
            ) from None
        with self._lock:
            self.fetched_bytes += sum(len(d) for d in out)
            self.requests += len(out)
        return out

    def count(self, nbytes: int) -> None:
        with self._lock:
            self.fetched_bytes += nbytes
            self.requests += 1

    def open(self, rel: str) -> _CountedFile:
        """A seekable file of one object that reads by range, no read-ahead (for tar headers)."""
        return _CountedFile(self.bucket.fs.open(self.bucket.key(rel), "rb", cache_type="none"), self)


class _CountedFile:
    """A bucket object's file whose reads are counted in its RangedBucket."""

    def __init__(self, f, source: RangedBucket) -> None:
        self.f, self.source = f, source

    def read(self, n: int = -1) -> bytes:
        data = self.f.read(n)
        self.source.count(len(data))
        return data

    def seek(self, *args) -> int:
        return self.f.seek(*args)

    def tell(self) -> int:
        return self.f.tell()

    def __enter__(self) -> _CountedFile:
        return self

    def __exit__(self, *exc) -> None:
        self.f.close()


class RangedImages:
    """`ImageReader`'s interface over a bucket: one image's stored bytes per range read."""

    def __init__(self, source: RangedBucket) -> None:
        self.source = source
        self.loaded: dict[tuple[int, int, int], bytes] = {}  # (tar, offset, nbytes) -> bytes (fetch_batch)

    def read(self, image_shard: int, offset: int, nbytes: int) -> bytes:
        data = self.loaded.pop((image_shard, offset, nbytes), None)
        if data is None:
            data = self.source.read(image_tar_name(image_shard), offset, nbytes)
        if len(data) != nbytes:
            raise SakError(f"image shard {image_tar_name(image_shard)} is truncated at offset {offset}")
        return data

    def close(self) -> None:
        pass


NO_CHUNK = 2**64 - 1  # a Zarr sharding index entry of a chunk that was never written


class _Object:
    """A shard file of a bucket as `RangedShardRows` opens it (nothing to close)."""

    def __init__(self, rel: str) -> None:
        self.rel = rel

    def close(self) -> None:
        pass


class RangedShardRows(ShardRows):
    """`ShardRows` over a bucket: the chunk index and each sample's chunk, by byte range."""

    source: RangedBucket
    rel: str  # the array's folder relative to the cache root

    @classmethod
    def over(cls, local: ShardRows | None, source: RangedBucket, rel: str) -> RangedShardRows | None:
        """The same array (its metadata from the local mirror), its shard files read from the bucket."""
        if local is None:
            return None
        rows = cls(local.path, local.shape, local.dtype, local.shard_rows, local.blosc)
        rows.source, rows.rel, rows.ready = source, rel, {}
        return rows

    def _open(self, shard: int, row: int) -> _Object:
        rel = f"{self.rel}/c/{shard}/0/0/0"
        if not self.source.size(rel):
            raise SakError(
                f"{self.source.url}/{rel}: shard file {shard} is missing, so row {row} was never written; "
                f"run `sak-cache verify {self.source.url}` and re-run `sak-cache run`"
            )
        return _Object(rel)

    def _size(self, f: _Object) -> int:
        return int(self.source.size(f.rel) or 0)

    def _pread(self, f: _Object, nbytes: int, offset: int) -> bytes:
        return self.source.read(f.rel, offset, nbytes)

    def _pread_into(self, f: _Object, buf: np.ndarray, offset: int) -> int:
        data = self.source.read(f.rel, offset, buf.nbytes)
        buf[: len(data)] = np.frombuffer(data, dtype=np.uint8)
        return len(data)

    def ranges(self, rows: np.ndarray) -> list[tuple[str, int, int]]:
        """(object, offset, nbytes) of each row's chunk (the shards' chunk indexes read first if new)."""
        found = []
        for row in np.asarray(rows).tolist():
            shard, k = divmod(row, self.shard_rows)
            f = self._open(shard, row)
            offset, nbytes = (int(v) for v in self._shard_index(shard, f)[k])
            if offset == NO_CHUNK:
                raise SakError(
                    f"{self.source.url}/{f.rel}: row {row} was never written (a hole in shard {shard}); "
                    f"run `sak-cache verify` and re-run `sak-cache run` to finish the store"
                )
            found.append((f.rel, offset, nbytes))
        return found

    def read_into(self, rows: np.ndarray, out: np.ndarray, dest: np.ndarray | None = None) -> None:
        """As ShardRows.read_into; chunks fetched ahead (`ready`, see `fetch_batch`) are used, the rest
        fetched at once (concurrent GETs)."""
        import numcodecs.blosc

        dest = np.arange(len(rows)) if dest is None else dest
        flat = out.reshape(out.shape[0], -1).view(np.uint8)
        where = self.ranges(rows)
        missing = [r for r in where if r not in self.ready]
        self.ready.update(zip(missing, self.source.read_many(missing)))
        for (rel, _, nbytes), d in zip(where, np.asarray(dest).tolist()):
            data = self.ready.pop((rel, _, nbytes), None)
            if data is None:  # a row twice in the batch: its chunk again
                data = self.source.read(rel, _, nbytes)
            if self.blosc:
                numcodecs.blosc.decompress(data, flat[d])
            elif nbytes != self.row_bytes or len(data) != nbytes:
                raise SakError(f"{self.source.url}/{rel}: a chunk is truncated; run `sak-cache verify`")
            else:
                flat[d] = np.frombuffer(data, dtype=np.uint8)


def fetch_batch(
    source: RangedBucket,
    arrays: list[tuple[RangedShardRows, np.ndarray]],
    images: RangedImages,
    image_ranges: list[tuple[int, int, int]],
) -> None:
    """Every range a batch needs (each array's rows' chunks, and the images), requested in one go so the
    GETs run concurrently; each reader then finds its bytes ready."""
    wanted = [(a, r) for a, rows in arrays for r in a.ranges(rows)]
    todo_images = sorted(set(image_ranges) - set(images.loaded))
    datas = source.read_many([r for _, r in wanted] + [(image_tar_name(s), o, n) for s, o, n in todo_images])
    for (a, r), data in zip(wanted, datas):
        a.ready[r] = data
    images.loaded.update(zip(todo_images, datas[len(wanted) :]))


class RangedWdsStore(WdsTeacherStore):
    """A WebDataset teacher store in a bucket: each shard's tar headers walked by range once (the data is
    seeked over), then each member read by its offset."""

    def __init__(self, path: Path, codec: Codec, shard_size: int, source: RangedBucket, rel: str) -> None:
        super().__init__(path, codec, shard_size)
        self.source, self.rel = source, rel
        self._members_of: dict[int, dict[str, tarfile.TarInfo]] = {}

    def _members(self, shard: int) -> dict[str, tarfile.TarInfo]:
        if shard not in self._members_of:
            rel = f"{self.rel}/{shard_file(shard)}"
            if not self.source.size(rel):
                raise SakError(f"{self.source.url}/{rel} is missing: shard {shard} was never written")
            with self.source.open(rel) as f, tarfile.open(fileobj=f, mode="r:") as tar:
                self._members_of[shard] = {m.name: m for m in tar.getmembers() if m.isfile()}
        return self._members_of[shard]

    def _load(self, shard: int, names: list[str]) -> list[np.ndarray]:

        members, rel = self._members(shard), f"{self.rel}/{shard_file(shard)}"
        for name in names:
            if name not in members:
                raise SakError(
                    f"{self.source.url}/{rel} has no member {name}: the tar does not hold this store's "
                    f"samples; run `sak-cache verify`"
                )
        datas = self.source.read_many([(rel, members[n].offset_data, members[n].size) for n in names])
        return [load_member(data, f"{self.source.url}/{rel}:{n}") for n, data in zip(names, datas)]


class RangedIntegrity(ShardIntegrity):
    """`ShardIntegrity` for range reads: every object a shard needs exists in the bucket, with the size the
    manifests record where they record one (see the module docstring for why digests are checked
    elsewhere): an object replaced or cut short is refused before it is read."""

    def __init__(self, index: CacheIndex, source: RangedBucket, with_targets: bool = True) -> None:
        super().__init__(index, with_targets)
        self.source = source
        self.recorded = {t.file: t.bytes for t in index.cache.images.shards}  # rel to the cache -> bytes
        for store in index.stores:
            prefix = store.path.relative_to(index.root).as_posix()
            for rel, d in (store.manifest.files or {}).items():
                self.recorded[f"{prefix}/{rel}"] = d.bytes

    def _file(self, path: Path, digest: str | None, fast: str | None = None) -> str | None:
        if path not in self._verdicts:
            rel = path.relative_to(self.index.root).as_posix()
            size, recorded = self.source.size(rel), self.recorded.get(rel)
            if not size:
                self._verdicts[path] = "is missing from the bucket"
            elif recorded is not None and size != recorded:
                self._verdicts[path] = (
                    f"has {size} bytes in the bucket, {recorded} recorded (replaced or cut short)"
                )
            else:
                self._verdicts[path] = None
        return self._verdicts[path]


class ReadAhead:
    """This worker's next batch, read in one background thread while the current one is used.

    Reads never overlap: a batch is submitted only after the current read returned, and a request for
    other rows waits for the pending read first (the reader's open arrays are not shared across threads).
    """

    def __init__(self) -> None:
        self._pool: ThreadPoolExecutor | None = None
        self._pending: tuple[bytes, Future] | None = None

    def __getstate__(self) -> dict:
        return {"_pool": None, "_pending": None}

    def take(self, rows: np.ndarray, read) -> dict:
        if self._pending is not None:
            key, future = self._pending
            self._pending = None
            if key == rows.tobytes():
                return future.result()
            future.exception()  # settle it (its error, if any, belongs to a batch nobody asked for)
        return read(rows)

    def submit(self, rows: np.ndarray, read) -> None:
        if self._pool is None:
            self._pool = ThreadPoolExecutor(1, thread_name_prefix="sak-read-ahead")
        self._pending = (rows.tobytes(), self._pool.submit(read, rows))
