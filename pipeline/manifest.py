"""Manifests: `cache.json` (the dataset part of a cache) and one `manifest.json` per teacher store.

A shard counts as done only after its files are written, flushed and their sha256 recorded. Records go to
an append-only journal (`shards.jsonl`, one fsynced JSON line per shard) while extraction runs, so a crash
costs at most the shards in flight; `manifest.json` is rewritten atomically from the journal when a run
ends (and whenever a run resumes).
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from sak.pipeline.errors import SakError
from sak.pipeline.provenance import SCHEMA_VERSION, read_json, stable_hash, write_json_atomic

CACHE_FILE = "cache.json"
VIEWS_FILE = "views.parquet"
IMAGE_INDEX_FILE = "images/index.parquet"
STORE_MANIFEST = "manifest.json"
JOURNAL = "shards.jsonl"


def now_iso() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())


# ------------------------------------------------------------------------------------------- validation

_CACHE_FIELDS = {
    "schema_version": int,
    "kind": str,
    "code_version": str,
    "dataset": dict,
    "view_plan": dict,
    "shard_size": int,
    "num_views": int,
    "num_shards": int,
    "images": dict,
    "views": dict,
    "stores": dict,
}
_STORE_FIELDS = {
    "schema_version": int,
    "kind": str,
    "fingerprint": str,
    "teacher": dict,
    "weights": dict,
    "format": str,
    "codec": str,
    "num_views": int,
    "shard_size": int,
    "levels": list,
    "views_sha256": str,
    "dataset_fingerprint": str,
    "shards": list,
    "complete": bool,
}


def _validate(data: Any, fields: dict[str, type], kind: str, path: Path) -> dict:
    if not isinstance(data, dict):
        raise SakError(f"{path}: expected a JSON object, found {type(data).__name__}; the file is damaged")
    if data.get("kind") != kind:
        raise SakError(
            f"{path}: field 'kind' is {data.get('kind')!r}, expected {kind!r}; not a SAK cache file"
        )
    version = data.get("schema_version")
    if version != SCHEMA_VERSION:
        raise SakError(
            f"{path}: field 'schema_version' is {version!r}, this code reads version {SCHEMA_VERSION}; "
            f"use a sak-cache release that matches the cache"
        )
    for name, typ in fields.items():
        if name not in data:
            raise SakError(f"{path}: required field {name!r} is missing; the file is damaged")
        if not isinstance(data[name], typ) or (typ is int and isinstance(data[name], bool)):
            raise SakError(
                f"{path}: field {name!r} should be {typ.__name__}, found {type(data[name]).__name__}"
            )
    return data


def read_cache(cache_dir: str | Path) -> dict:
    path = Path(cache_dir) / CACHE_FILE
    if not path.exists():
        raise SakError(f"{cache_dir} is not a SAK cache (no {CACHE_FILE}); create one with `sak-cache run`")
    return _validate(read_json(path), _CACHE_FIELDS, "sak-cache", path)


def write_cache(cache_dir: str | Path, data: dict) -> None:
    write_json_atomic(Path(cache_dir) / CACHE_FILE, data)


def read_store_manifest(store_dir: str | Path) -> dict:
    path = Path(store_dir) / STORE_MANIFEST
    return _validate(read_json(path), _STORE_FIELDS, "sak-teacher-store", path)


def write_store_manifest(store_dir: str | Path, data: dict) -> None:
    write_json_atomic(Path(store_dir) / STORE_MANIFEST, data)


# ------------------------------------------------------------------------------------------ fingerprint


def store_fingerprint(identity: dict) -> str:
    """Fingerprint of a teacher store: hash of everything that determines its bytes (timm name and tag,
    weights id, input size, preprocessing, levels, token selection, grid, dtype/codec, schema version),
    plus the dataset and view plan it was computed on."""
    return f"{identity['teacher']}-{stable_hash(identity, 12)}"


# -------------------------------------------------------------------------------------------- journal


@dataclass
class ShardRecord:
    shard: int
    start: int
    stop: int
    files: dict[str, str]  # relative path -> sha256
    seconds: float = 0.0

    def to_json(self) -> dict:
        return {
            "shard": self.shard,
            "start": self.start,
            "stop": self.stop,
            "files": self.files,
            "seconds": round(self.seconds, 4),
        }

    @classmethod
    def from_json(cls, d: dict) -> ShardRecord:
        return cls(
            int(d["shard"]), int(d["start"]), int(d["stop"]), dict(d["files"]), float(d.get("seconds", 0.0))
        )


def append_journal(store_dir: str | Path, record: ShardRecord) -> None:
    """One JSON line per completed shard; flushed and fsynced before the shard counts as done."""
    with open(Path(store_dir) / JOURNAL, "a") as f:
        f.write(json.dumps(record.to_json(), sort_keys=True) + "\n")
        f.flush()
        os.fsync(f.fileno())


def read_journal(store_dir: str | Path) -> dict[int, ShardRecord]:
    """Completed shards by index (the last record of a shard wins). A torn last line is ignored."""
    path = Path(store_dir) / JOURNAL
    done: dict[int, ShardRecord] = {}
    if not path.exists():
        return done
    for line in path.read_text().splitlines():
        try:
            rec = ShardRecord.from_json(json.loads(line))
        except (json.JSONDecodeError, KeyError, TypeError, ValueError):
            continue  # a crash mid-append leaves at most one torn line; its shard is redone
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


def merge_stats(store_dir: Path, shards: list[int], widths: list[int]) -> list[dict]:
    """Channel mean and std per level over all shards (from the per-shard sums)."""
    total = None
    for s in shards:
        part = np.load(store_dir / f"stats/{s:06d}.npy", allow_pickle=False)
        total = part if total is None else total + part
    out = []
    for i, c in enumerate(widths):
        if total is None:
            out.append({"mean": [], "std": []})
            continue
        n = np.maximum(total[i, 0, :c], 1)
        mean = total[i, 1, :c] / n
        var = np.maximum(total[i, 2, :c] / n - mean**2, 0)
        out.append(
            {"mean": [round(float(v), 6) for v in mean], "std": [round(float(v), 6) for v in np.sqrt(var)]}
        )
    return out
