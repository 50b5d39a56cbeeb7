"""What a teacher store's manifest.json is made from, besides the journal: the store's fingerprint, the
digest table of its files, and its per-level feature statistics (mean and std per channel, merged from
each shard's channel sums, so the normalisation of targets is a versioned part of the cache).
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from sak.pipeline.base.errors import SakError
from sak.pipeline.base.provenance import atomic_path, sha256_file, stable_hash
from sak.pipeline.base.typed_json import to_json
from sak.pipeline.format.layout import STATS_DIR, STORE_MANIFEST, stats_file, store_file_kind
from sak.pipeline.format.records import FileDigest, LevelStats, StoreIdentity

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
    rel = stats_file(shard)
    (store_dir / STATS_DIR).mkdir(exist_ok=True)
    with atomic_path(store_dir / rel) as tmp, open(tmp, "wb") as f:
        np.save(f, stats, allow_pickle=False)
        f.flush()
        os.fsync(f.fileno())
    return rel


def merge_stats(store_dir: Path, shards: list[int], blocks: list[int], widths: list[int]) -> list[LevelStats]:
    """Channel mean and std per level over all shards (from the per-shard sums)."""
    total = None
    for s in shards:
        path = store_dir / stats_file(s)
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
