"""Where everything of a cache lives: the one definition of every file and folder name of format v1.

    cache.json                        CacheManifest: dataset, view plan, image tars, tables, stores, `files`
    .sak-lock                         the writer's lock (base/lock.py); the one file no digest covers, by
                                      design: it changes while a run holds it and says only who holds it
    images/images-NNNNNN.tar          image bytes; sha256 in cache.json images.shards[]
    images/index.parquet              per image: tar, offset, size, sha256; digest in cache.json files
    views.parquet                     per view: key, box, flip; digest in cache.json views and files
    student_views/                    optional: every view as the student's input pixels (Zarr)
    teachers/<fingerprint>/           one teacher store, each file digested in its manifest's `files`:
      manifest.json                     StoreManifest (digest in cache.json stores[fp].manifest_sha256)
      shards.jsonl                      ShardRecord journal, one line per finished shard
      stats/NNNNNN.npy                  per-shard channel sums (feature statistics)
      zarr.json, levels/zarr.json, levels/<b>/zarr.json, levels/<b>/c/<s>/0/0/0, scales/...   (Zarr)
      layout.json, shards/shard-NNNNNN.tar                                                     (WebDataset)
      basis/...                         pca<k> stores: each level's basis (store/lowrank.py)

A stage-2 target cache (`sak-cache stage2`) uses the same names: cache.json, views.parquet and
teachers/<teacher>/ Zarr stores with their shards.jsonl.
"""

from __future__ import annotations

import re

from sak.pipeline.base.lock import LOCK_FILE

CACHE_FILE = "cache.json"
VIEWS_FILE = "views.parquet"
IMAGE_INDEX_FILE = "images/index.parquet"
TEACHERS_DIR = "teachers"
STORE_MANIFEST = "manifest.json"
JOURNAL = "shards.jsonl"
STATS_DIR = "stats"

_CACHE_FILES = {  # kind -> pattern of a path relative to the cache
    "cache manifest": re.escape(CACHE_FILE),
    "lock file": re.escape(LOCK_FILE),
    "views table": re.escape(VIEWS_FILE),
    "image index": re.escape(IMAGE_INDEX_FILE),
    "image tar": r"images/images-\d{6}\.tar",
    "student views metadata": r"student_views/zarr\.json",
    "student views shard": r"student_views/c/\d+/0/0/0",
}
_STORE_FILES = {  # kind -> pattern of a path relative to a store
    "store manifest": re.escape(STORE_MANIFEST),
    "shard journal": re.escape(JOURNAL),
    "statistics": rf"{STATS_DIR}/\d{{6}}\.npy",
    "zarr metadata": r"(?:(?:levels|scales)/(?:\d+/)?)?zarr\.json",
    "zarr shard": r"(?:levels|scales)/\d+/c/\d+/0/0/0",
    "wds layout": r"layout\.json",
    "wds shard": r"shards/shard-\d{6}\.tar",
    "pca basis": r"basis/(?:(?:\d+/(?:(?:mean|components)/)?)?zarr\.json|\d+/mean/c/0|\d+/components/c/0/0"
    r"|\d+\.(?:mean|components)\.npy)",
}


def store_dir(name: str) -> str:
    """A teacher store's folder relative to its cache: teachers/<fingerprint> (teachers/<teacher> in a
    stage-2 target cache)."""
    return f"{TEACHERS_DIR}/{name}"


def image_tar_name(shard: int) -> str:
    return f"images/images-{shard:06d}.tar"


def stats_file(shard: int) -> str:
    """A store's per-shard feature statistics, relative to the store."""
    return f"{STATS_DIR}/{shard:06d}.npy"


def _kind(rel: str, table: dict[str, str]) -> str | None:
    return next((kind for kind, pattern in table.items() if re.fullmatch(pattern, rel)), None)


def cache_file_kind(rel: str) -> str | None:
    """What a top-level file of a cache is (None: not a file the format names)."""
    return _kind(rel, _CACHE_FILES)


def store_file_kind(rel: str) -> str | None:
    """What a file of a teacher store is, by its path relative to the store (None: not the format's)."""
    return _kind(rel, _STORE_FILES)
