"""A cache in a bucket, read through a bounded local directory: whole shard objects fetched on first use,
the next batch's shards prefetched in the background, least recently used files evicted past the bound.

The loader's integrity check then hashes the local copies against the manifests as for a local cache, so
a damaged object is caught the same way. One `ShardFetcher` per process (loader worker); the bound holds
per process, and loader workers own disjoint shards.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

from sak.pipeline.base.provenance import sha256_file
from sak.pipeline.buckets.bucket import Bucket
from sak.student.data.index import CacheIndex


def shard_objects(index: CacheIndex, shard: int, with_targets: bool) -> dict[str, str]:
    """Every object a teacher shard's samples are read from, relative to the cache root, with its recorded
    sha256: its image tars, its stored student views if any, and (with targets) each selected store's
    shard files."""
    k, size = index.views_per_image, index.shard_size
    first, last = shard * size // k, min((shard + 1) * size, index.num_views) // k
    tars = {t.index: t for t in index.cache.images.shards}
    found = {
        tars[t].file: tars[t].sha256
        for t in sorted({int(s) for s in index.image_shard[first:last]})
        if t in tars
    }
    sv = index.cache.student_views  # stored student pixels (--student-views raw): read instead of the image
    found.update({r.file: r.sha256 for r in (sv.shards if sv else []) if r.index == shard})
    for store in index.stores if with_targets else []:
        entry = next((r for r in store.manifest.shards if r.index == shard), None)
        rel_store = store.path.relative_to(index.root).as_posix()
        found.update({f"{rel_store}/{rel}": digest for rel, digest in (entry.files if entry else {}).items()})
    return found


class ShardFetcher:
    """Read-through local copies of a bucket cache's shard objects, at most `max_bytes` kept."""

    def __init__(self, index: CacheIndex, url: str, max_bytes: int, with_targets: bool) -> None:
        self.index, self.url, self.max_bytes, self.with_targets = index, url, max_bytes, with_targets
        self.bucket: Bucket | None = None
        self.kept: OrderedDict[str, int] = OrderedDict()  # rel -> bytes, least recently used first
        self.lock = threading.Lock()
        self.pool: ThreadPoolExecutor | None = None
        self.pending: dict[int, Future] = {}
        self.fetched_bytes = 0  # downloaded by this process (a second epoch within the bound adds none)

    def __getstate__(self) -> dict:  # a fresh fetcher state in each loader worker
        return {**self.__dict__, "bucket": None, "lock": None, "pool": None, "pending": {}}

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state, lock=threading.Lock())

    def ensure(self, shards: list[int]) -> None:
        """These shards' objects are in the local directory (fetched whole when missing)."""
        for s in shards:
            future = self.pending.pop(s, None)
            if future is not None:
                future.result()
        self._fetch(shards)

    def prefetch(self, shards) -> None:
        """Fetch these shards in the background (one thread), ahead of their first read."""
        if self.pool is None:
            self.pool = ThreadPoolExecutor(1, thread_name_prefix="sak-prefetch")
        for s in shards:
            if s not in self.pending:
                self.pending[s] = self.pool.submit(self._fetch, [s])

    def _fetch(self, shards: list[int]) -> None:
        wanted = {
            rel: d for s in shards for rel, d in shard_objects(self.index, s, self.with_targets).items()
        }
        rels = list(wanted)
        with self.lock:
            if self.bucket is None:
                self.bucket = Bucket(self.url)
            for rel, digest in wanted.items():
                path = self.index.root / rel
                # a copy left by an earlier run is kept only if it is still the recorded object
                if rel not in self.kept and not (path.is_file() and sha256_file(path) == digest):
                    self.bucket.get(rel, path)
                    self.fetched_bytes += path.stat().st_size
                self.kept[rel] = path.stat().st_size
                self.kept.move_to_end(rel)
            self._evict(keep=set(rels))

    def _evict(self, keep: set[str]) -> None:
        total = sum(self.kept.values())
        for rel in list(self.kept):
            if total <= self.max_bytes:
                break
            if rel in keep:
                continue
            total -= self.kept.pop(rel)
            Path(self.index.root / rel).unlink(missing_ok=True)
