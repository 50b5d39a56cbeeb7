"""Zarr v3 teacher store: one array `levels/<block>` of shape (views, H, W, C) per tapped level.

One sample per inner chunk (random access to a view), `shard_size` samples per shard file, Blosc-zstd with
byte shuffle. Arrays are created once, by the driver, with their final shape; afterwards each shard file is
written whole by exactly one task (concurrent writers inside one shard lose data). Float arrays are filled
with NaN, so a chunk that was never written cannot pass for data. bfloat16 is stored as uint16 bits with
the true dtype in the array attributes.

Layout of one store (`teachers/<fingerprint>/`):
  zarr.json                 group metadata
  levels/<block>/zarr.json  array metadata (attributes: block, codec, true_dtype)
  levels/<block>/c/<s>/0/0/0  shard file s
  manifest.json             see manifest.py
  shards.jsonl              journal of completed shards (append-only; fsynced)
  stats/<s>.npy             per-shard channel sums for the feature statistics
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import torch
import zarr
from zarr.codecs import BloscCodec

from sak.pipeline.codecs import Codec, get_codec
from sak.pipeline.errors import SakError
from sak.pipeline.provenance import sha256_file

FORMAT = "zarr"


def create_store(
    path: Path, num_views: int, shard_size: int, grids: dict[int, tuple[int, int, int]], codec: Codec
) -> None:
    """Create the group and one array per level (block -> (H, W, C)) with final shapes; idempotent."""
    group = zarr.open_group(str(path), mode="a", zarr_format=3)
    levels = group.require_group("levels")
    fill = float("nan") if codec.store_dtype.startswith("float") else 0
    for block, (h, w, c) in grids.items():
        if str(block) in levels.array_keys():
            existing = levels[str(block)]
            if existing.shape != (num_views, h, w, c) or existing.dtype != np.dtype(codec.store_dtype):
                raise SakError(
                    f"{path}/levels/{block} exists with shape {existing.shape} {existing.dtype}, expected "
                    f"{(num_views, h, w, c)} {codec.store_dtype}; the store belongs to another run, delete it"
                )
            continue
        levels.create_array(
            str(block),
            shape=(num_views, h, w, c),
            dtype=codec.store_dtype,
            chunks=(1, h, w, c),  # one sample per inner chunk: random access to a view
            shards=(shard_size, h, w, c),  # many samples per file: few files, big sequential reads
            compressors=BloscCodec(cname="zstd", clevel=3, shuffle="shuffle", typesize=codec.bytes_per_value),
            fill_value=fill,
            dimension_names=("view", "y", "x", "channel"),
            attributes={"block": int(block), "codec": codec.name, "true_dtype": codec.true_dtype},
            config={"write_empty_chunks": True},
        )


class ZarrTeacherStore:
    """Read/write access to one teacher store. Cheap to construct; arrays open lazily."""

    def __init__(self, path: str | Path, codec: str, shard_size: int) -> None:
        self.path = Path(path)
        self.codec = get_codec(codec)
        self.shard_size = shard_size
        self._arrays: dict[int, zarr.Array] = {}

    def array(self, block: int) -> zarr.Array:
        if block not in self._arrays:
            self._arrays[block] = zarr.open_array(str(self.path / "levels" / str(block)), mode="r+")
        return self._arrays[block]

    def shard_file(self, block: int, shard: int) -> str:
        """Path of a shard file relative to the store, from the array's own chunk-key encoding."""
        key = self.array(block).metadata.encode_chunk_key((shard, 0, 0, 0))
        return f"levels/{block}/{key}"

    def write_shard(self, shard: int, start: int, levels: dict[int, torch.Tensor]) -> dict[str, str]:
        """Write rows [start, start + n) of every level (block -> (n, H, W, C) float) as whole shard
        files, then return {relative file: sha256} of what is now on disk."""
        if start != shard * self.shard_size:
            raise ValueError(f"shard {shard} must start at {shard * self.shard_size}, not {start}")
        files = {}
        for block, feats in levels.items():
            arr = self.array(block)
            stop = start + feats.shape[0]
            if stop != min(start + self.shard_size, arr.shape[0]):
                raise ValueError(
                    f"shard {shard} of level {block} must hold whole shard rows, got {feats.shape[0]}"
                )
            arr[start:stop] = self.codec.encode(feats.cpu())
            rel = self.shard_file(block, shard)
            files[rel] = sha256_file(self.path / rel)
        return files

    def read(self, block: int, start: int, stop: int) -> torch.Tensor:
        """Rows [start, stop) of one level, decoded to float32 (n, H, W, C)."""
        return self.codec.decode(self.array(block)[start:stop])

    def read_rows(self, block: int, rows: np.ndarray) -> torch.Tensor:
        """Arbitrary rows (sorted for speed within a shard) decoded to float32 (n, H, W, C)."""
        return self.codec.decode(
            self.array(block).get_orthogonal_selection((rows, slice(None), slice(None), slice(None)))
        )


def num_shards(num_views: int, shard_size: int) -> int:
    return math.ceil(num_views / shard_size)
