"""Manifests (typed in format.py): `cache.json` and one `manifest.json` per teacher store; the shard
journal and the feature statistics.

A shard counts as done only after its files are written, flushed and their sha256 recorded. Records go to
an append-only journal (`shards.jsonl`, one fsynced JSON line per shard) while extraction runs, so a crash
costs at most the shards in flight; `manifest.json` is rewritten atomically from the journal when a run
ends (and whenever a run resumes).
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import numpy as np

from sak.pipeline.base.errors import SakError
from sak.pipeline.base.provenance import sha256_file, stable_hash
from sak.pipeline.base.typed_json import from_json
from sak.pipeline.format.records import (
    CACHE_FILE,
    IMAGE_INDEX_FILE,
    JOURNAL,
    STORE_MANIFEST,
    VIEWS_FILE,
    CacheManifest,
    FileDigest,
    LevelStats,
    ShardEntry,
    ShardRecord,
    StoreIdentity,
    read_cache,
    read_store_manifest,
    store_file_kind,
    to_json,
    validate,
    write_cache,
    write_store_manifest,
)

__all__ = [  # the format's names, for the modules that read manifests through this one
    "CACHE_FILE",
    "IMAGE_INDEX_FILE",
    "JOURNAL",
    "STORE_MANIFEST",
    "VIEWS_FILE",
    "CacheManifest",
    "ShardEntry",
    "ShardRecord",
    "read_cache",
    "read_store_manifest",
    "write_cache",
    "write_store_manifest",
]


def now_iso() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())


# ------------------------------------------------------------------------------------------ fingerprint


def store_fingerprint(identity: StoreIdentity) -> str:
    """Fingerprint of a teacher store: hash of everything that determines its bytes (timm name and tag,
    weights id, input size, preprocessing, levels, token selection, grid, dtype/codec, schema version),
    plus the dataset and view plan it was computed on."""
    return f"{identity.teacher}-{stable_hash(to_json(identity), 12)}"


# -------------------------------------------------------------------------------------------- digests


def store_files_table(
    store_dir: Path, shard_digests: dict[str, str], remote_sizes: dict[str, int] | None = None
) -> dict[str, FileDigest]:
    """Digest of every file of a store the format names, but its manifest: shard files from their journal
    records (hashed when written), the small ones (Zarr metadata, layout, journal, statistics) now. For a
    store in a bucket, remote_sizes lists its objects (store_dir mirrors the small ones)."""
    if remote_sizes is not None:
        return {
            rel: FileDigest(sha256=shard_digests.get(rel) or sha256_file(Path(store_dir) / rel), bytes=n)
            for rel, n in sorted(remote_sizes.items())
            if rel != STORE_MANIFEST
            and store_file_kind(rel) is not None
            # an uploaded shard object whose shard was never journaled (its writer died) is not recorded
            and (rel in shard_digests or (Path(store_dir) / rel).is_file())
        }
    table = {}
    for path in sorted(p for p in Path(store_dir).rglob("*") if p.is_file()):
        rel = path.relative_to(store_dir).as_posix()
        if rel == STORE_MANIFEST or store_file_kind(rel) is None:
            continue  # not the format's (a leftover temp file): verify reports it
        digest = shard_digests.get(rel) or sha256_file(path)
        table[rel] = FileDigest(sha256=digest, bytes=path.stat().st_size)
    return table


# -------------------------------------------------------------------------------------------- journal


def append_journal(store_dir: str | Path, record: ShardRecord) -> None:
    """One JSON line per completed shard; flushed and fsynced before the shard counts as done."""
    with open(Path(store_dir) / JOURNAL, "a") as f:
        f.write(json.dumps(to_json(record), sort_keys=True) + "\n")
        f.flush()
        os.fsync(f.fileno())


def read_journal(store_dir: str | Path) -> dict[int, ShardRecord]:
    """Completed shards by index (the last record of a shard wins). A torn last line is ignored."""
    path = Path(store_dir) / JOURNAL
    done: dict[int, ShardRecord] = {}
    if not path.exists():
        return done
    try:
        lines = path.read_bytes().decode("utf-8", errors="replace").splitlines()
    except OSError as e:
        raise SakError(f"{path} cannot be read ({e.strerror}); run `sak-cache verify`") from e
    for line in lines:
        try:
            data = json.loads(line)
            validate(data, ShardRecord, path)
        except (json.JSONDecodeError, SakError):
            continue  # a crash mid-append leaves at most one torn line; its shard is redone
        rec = from_json(ShardRecord, data)
        done[rec.shard] = rec
    return done


# ------------------------------------------------------------------------------------ feature statistics


def shard_stats(levels: list[np.ndarray]) -> np.ndarray:
    """Per-channel count, sum and sum of squares of each level: (L, 3, C) float64, levels padded to max C."""
    width = max(a.shape[-1] for a in levels)
    out = np.zeros((len(levels), 3, width), np.float64)
    for i, a in enumerate(levels):
        flat = a.reshape(-1, a.shape[-1]).astype(np.float64)
        out[i, 0, : a.shape[-1]] = flat.shape[0]
        out[i, 1, : a.shape[-1]] = flat.sum(0)
        out[i, 2, : a.shape[-1]] = np.square(flat).sum(0)
    return out


def save_stats(store_dir: Path, shard: int, stats: np.ndarray) -> str:
    rel = f"stats/{shard:06d}.npy"
    (store_dir / "stats").mkdir(exist_ok=True)
    with open(store_dir / rel, "wb") as f:
        np.save(f, stats, allow_pickle=False)
        f.flush()
        os.fsync(f.fileno())
    return rel


def merge_stats(store_dir: Path, shards: list[int], blocks: list[int], widths: list[int]) -> list[LevelStats]:
    """Channel mean and std per level over all shards (from the per-shard sums)."""
    total = None
    for s in shards:
        path = store_dir / f"stats/{s:06d}.npy"
        try:
            part = np.load(path, allow_pickle=False)
        except (OSError, ValueError) as e:
            raise SakError(f"{path} cannot be read ({e}); run `sak-cache verify`") from e
        total = part if total is None else total + part
    out = []
    for i, (block, c) in enumerate(zip(blocks, widths)):
        if total is None:
            out.append(LevelStats(block=block, mean=[], std=[]))
            continue
        n = np.maximum(total[i, 0, :c], 1)
        mean = total[i, 1, :c] / n
        var = np.maximum(total[i, 2, :c] / n - mean**2, 0)
        out.append(
            LevelStats(
                block=block,
                mean=[round(float(v), 6) for v in mean],
                std=[round(float(v), 6) for v in np.sqrt(var)],
            )
        )
    return out


def read_table(path: Path):
    """A Parquet table of the cache; a damaged or missing one is a one-line SakError naming it."""
    import pyarrow.parquet as pq

    try:
        return pq.read_table(path)
    except (OSError, ValueError) as e:  # pyarrow's ArrowInvalid is a ValueError
        raise SakError(
            f"{path} cannot be read ({type(e).__name__}); the file is damaged: run `sak-cache verify`"
        ) from e
