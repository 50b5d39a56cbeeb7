"""Zarr v3 teacher store: one array `levels/<block>` of shape (views, H, W, C) per tapped level, plus
`scales/<block>` for quantised codecs (int8, fp8; see codecs.py).

One sample per inner chunk (random access to a view), `shard_size` samples per shard file, Blosc-lz4,
Blosc-zstd or no compression (`--compressor`; byte shuffle for multi-byte values, none for one-byte
ones). Arrays are created once, by the driver, with their final shape; afterwards each shard file is written whole by exactly one task (concurrent writers
inside one shard lose data). Arrays are filled with NaN (or its bit pattern: bf16 and fp8 are stored as
uint16/uint8 bits), so a chunk that was never written cannot pass for data; int8 has no NaN, and its holes
show through the NaN fill of its scales. The true dtype and the codec are in the array attributes.

Layout of one store (`teachers/<fingerprint>/`):
  zarr.json                    group metadata
  levels/<block>/zarr.json     array metadata (attributes: block, codec, true_dtype, codec_spec)
  levels/<block>/c/<s>/0/0/0   shard file s of the values
  scales/<block>/...           quantised codecs only: float16 (views, H, W, G) or (views, 1, 1, C)
  manifest.json                see format/records.py (StoreManifest)
  shards.jsonl                 journal of completed shards (append-only; fsynced)
  stats/<s>.npy                per-shard channel sums for the feature statistics

Read without project code (int8 per group of G channels):
  v = group["levels/11"][i]; s = group["scales/11"][i]                  # (H, W, C) int8, (H, W, C/G) fp16
  x = v.reshape(*s.shape, -1) * s[..., None].astype("float32")          # -> reshape(H, W, C)
"""

from __future__ import annotations

import math
import os
from pathlib import Path

import numpy as np
import torch
import zarr
from zarr.codecs import BloscCodec

from sak.pipeline.base.errors import SakError
from sak.pipeline.base.provenance import sha256_file
from sak.pipeline.buckets.bucket import is_url
from sak.pipeline.store.codecs import SCALE_DTYPE, Codec, Encoded
from sak.pipeline.store.lowrank import PcaBasis, decode_level, encode_level, level_basis

FORMAT = "zarr"


COMPRESSORS = ("none", "lz4", "zstd")
# Measured (bench/loader.py, the paper's target shapes, one core, outlier-laden synthetic maps): Blosc-zstd
# saves 7-8% of the bytes for 5-10x the decode CPU (0.2-0.3 GB/s per core against 2.5-10 GB/s raw);
# Blosc-lz4 saves 0-1% for 2-4x the CPU. Feature maps are close to incompressible, so none is the default.
DEFAULT_COMPRESSOR = "none"


def check_compressor(name: str) -> str:
    if name not in COMPRESSORS:
        raise SakError(f"unknown compressor {name!r}; use one of {', '.join(COMPRESSORS)}")
    return name


def _compressor(codec: Codec | None, compressor: str) -> BloscCodec | None:
    """The Blosc codec of a values (codec given) or scales (None) array; None stores raw chunks."""
    if check_compressor(compressor) == "none":
        return None
    if codec is None:  # scales: float16
        return BloscCodec(cname=compressor, clevel=3, shuffle="shuffle", typesize=2)
    return BloscCodec(cname=compressor, clevel=3, shuffle=codec.blosc_shuffle, typesize=codec.bytes_per_value)


def _require_array(
    parent: zarr.Group, name: str, shape: tuple, dtype: str, fill, compressor, attributes: dict, where: str
) -> None:
    if name in parent.array_keys():
        existing = parent[name]
        if existing.shape != shape or existing.dtype != np.dtype(dtype):
            raise SakError(
                f"{where} exists with shape {existing.shape} {existing.dtype}, expected {shape} {dtype}; "
                f"the store belongs to another run, delete it"
            )
        return
    parent.create_array(
        name,
        shape=shape,
        dtype=dtype,
        chunks=(1, *shape[1:]),  # one sample per inner chunk: random access to a view
        shards=(attributes.pop("shard_size"), *shape[1:]),  # many samples per file: big sequential reads
        compressors=compressor,
        fill_value=fill,
        dimension_names=("view", "y", "x", "channel"),
        attributes=attributes,
        config={"write_empty_chunks": True},
    )


def create_store(
    path: Path,
    num_views: int,
    shard_size: int,
    grids: dict[int, tuple[int, int, int]],
    codec: Codec,
    compressor: str = DEFAULT_COMPRESSOR,
) -> None:
    """Create the group and the arrays of every level (block -> (H, W, C)) with final shapes; idempotent.
    compressor: Blosc's zstd or lz4 over every chunk, or none (raw chunks)."""
    group = zarr.open_group(str(path), mode="a", zarr_format=3)
    levels = group.require_group("levels")
    scales = group.require_group("scales") if codec.scaled else None
    for block, (h, w, c) in grids.items():
        attrs = {"block": int(block), "codec": codec.name, "true_dtype": codec.true_dtype}
        c = codec.stored_width(c)  # pca<k>: k coefficients per token
        _require_array(
            levels,
            str(block),
            (num_views, h, w, c),
            codec.store_dtype,
            codec.fill_value,
            _compressor(codec, compressor),
            {**attrs, "codec_spec": codec.describe(), "shard_size": shard_size},
            f"{path}/levels/{block}",
        )
        if scales is not None:
            _require_array(
                scales,
                str(block),
                (num_views, *codec.scale_shape(h, w, c)),
                SCALE_DTYPE,
                float("nan"),
                _compressor(None, compressor),
                {**attrs, "role": "scales", "granularity": codec.granularity, "shard_size": shard_size},
                f"{path}/scales/{block}",
            )


class ZarrTeacherStore:
    """Read/write access to one teacher store. Cheap to construct; arrays open lazily."""

    def __init__(self, path: str | Path, codec: Codec, shard_size: int) -> None:
        # a URL (s3://, gs://): read in place through zarr's fsspec store, which reads shard files by range
        self.url = str(path).rstrip("/") if is_url(path) else None
        self.path = Path(path)
        self.codec = codec
        self.shard_size = shard_size
        self._arrays: dict[tuple[str, int], zarr.Array] = {}
        self.format = FORMAT
        self.bases: dict[int, PcaBasis] = {}  # pca<k>: each level's basis (lowrank.py), read when first used

    def array(self, block: int, kind: str = "levels") -> zarr.Array:
        """The values (`kind="levels"`) or scales (`kind="scales"`) array of one level."""
        if (kind, block) not in self._arrays:
            try:
                self._arrays[kind, block] = (
                    zarr.open_array(f"{self.url}/{kind}/{block}", mode="r")
                    if self.url
                    else zarr.open_array(str(self.path / kind / str(block)), mode="r+")
                )
            except Exception as e:  # noqa: BLE001 - zarr raises many kinds on damaged metadata
                raise SakError(
                    f"{self.path / kind / str(block)}: the Zarr array cannot be opened ({type(e).__name__}); "
                    f"its metadata is damaged or missing: run `sak-cache verify`"
                ) from e
        return self._arrays[kind, block]

    def shard_file(self, block: int, shard: int, kind: str = "levels") -> str:
        """Path of a shard file relative to the store, from the array's own chunk-key encoding."""
        key = self.array(block, kind).metadata.encode_chunk_key((shard, 0, 0, 0))
        return f"{kind}/{block}/{key}"

    def write_shard(self, shard: int, start: int, levels: dict[int, torch.Tensor]) -> dict[str, str]:
        """Write rows [start, start + n) of every level (block -> (n, H, W, C) float) as whole shard
        files (values, and scales for quantised codecs), then return {relative file: sha256} of them."""
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
            enc = encode_level(self.codec, self.basis(block), feats)
            arr[start:stop] = enc.values
            kinds = ["levels"]
            if enc.scales is not None:
                self.array(block, "scales")[start:stop] = enc.scales
                kinds.append("scales")
            for kind in kinds:
                rel = self.shard_file(block, shard, kind)
                drop_partials(self.path / rel)
                files[rel] = sha256_file(self.path / rel)
        return files

    # ------------------------------------------------------------------------------------------ read

    def read_encoded(self, block: int, start: int, stop: int) -> Encoded:
        """Rows [start, stop) of one level as stored: values (n, H, W, C) and scales (or None)."""
        scales = self.array(block, "scales")[start:stop] if self.codec.scaled else None
        return Encoded(self.array(block)[start:stop], scales)

    def read_encoded_rows(self, block: int, rows: np.ndarray) -> Encoded:
        """Arbitrary rows as stored (sorted rows read fastest: see `read_sorted_rows`)."""
        scales = read_sorted_rows(self.array(block, "scales"), rows) if self.codec.scaled else None
        return Encoded(read_sorted_rows(self.array(block), rows), scales)

    def read(self, block: int, start: int, stop: int) -> torch.Tensor:
        """Rows [start, stop) of one level, decoded to float32 (n, H, W, C)."""
        return decode_level(self.codec, self.basis(block), *self.read_encoded(block, start, stop))

    def read_rows(self, block: int, rows: np.ndarray) -> torch.Tensor:
        """Arbitrary rows (sorted for speed within a shard) decoded to float32 (n, H, W, C)."""
        return decode_level(self.codec, self.basis(block), *self.read_encoded_rows(block, rows))

    def basis(self, block: int) -> PcaBasis | None:
        return level_basis(self, block)

    def blocks(self) -> list[int]:
        return sorted(int(k) for k in zarr.open_group(str(self.path / "levels"), mode="r").array_keys())

    def read_shard(self, shard: int) -> dict[int, torch.Tensor]:
        """Every level of one shard, decoded to float32: {block: (n, H, W, C)}."""
        out = {}
        for block in self.blocks():
            start = shard * self.shard_size
            out[block] = self.read(block, start, min(start + self.shard_size, self.array(block).shape[0]))
        return out


def read_sorted_rows(arr: zarr.Array, rows: np.ndarray) -> np.ndarray:
    """Rows of a (views, ...) array, in the given order, read as runs of consecutive rows.

    note: zarr's `get_orthogonal_selection` with an index array is 15-20x slower than plain slices on
    sharded (27x27x1024 / 64x64x1024) feature arrays (measured: ~25 MB/s vs ~500 MB/s per core), so sorted
    rows are split into contiguous runs and each run is one slice.
    """
    rows = np.asarray(rows, dtype=np.int64)
    if rows.size == 0:
        return np.empty((0, *arr.shape[1:]), dtype=arr.dtype)
    cuts = np.flatnonzero(np.diff(rows) != 1) + 1
    parts = [arr[int(run[0]) : int(run[-1]) + 1] for run in np.split(rows, cuts)]
    return parts[0] if len(parts) == 1 else np.concatenate(parts)


def num_shards(num_views: int, shard_size: int) -> int:
    return math.ceil(num_views / shard_size)


# ------------------------------------------------------------------------------ fast sharded row reads

_NO_CHUNK = np.uint64(2**64 - 1)  # a sharding index entry of a chunk that was never written


class ShardRows:
    """Rows of one sharded (views, H, W, C) Zarr array, read straight from its shard files into a caller's
    buffer: the loader's hot path.

    The array is read as the Zarr v3 spec lays it out (the sharding_indexed codec, one sample per inner
    chunk, the chunk index of (offset, nbytes) uint64 pairs + crc32c at the end of each shard file), each
    chunk raw or one Blosc frame, decompressed by numcodecs straight into the destination row. This
    skips zarr's per-chunk machinery (measured: zarr reads these arrays at 0.2-0.8 GB/s per core, uncompressed
    chunks included). `ShardRows.of` returns None for any layout it does not know (the caller then reads
    through zarr); a chunk that was never written is a SakError, as the NaN fill it would read as is.
    """

    def __init__(self, path: Path, shape: tuple, dtype: np.dtype, shard_rows: int, blosc: bool) -> None:
        self.path, self.shape, self.dtype = path, tuple(shape), np.dtype(dtype)
        self.shard_rows, self.blosc = shard_rows, blosc
        self.row_bytes = int(np.prod(self.shape[1:])) * self.dtype.itemsize
        self._index: dict[int, np.ndarray] = {}  # shard -> (rows, 2) uint64

    @classmethod
    def of(cls, array_dir: Path) -> ShardRows | None:
        """A reader for the array at `array_dir` (its zarr.json), or None if its layout is not the one
        the stores write."""
        import json

        try:
            meta = json.loads((array_dir / "zarr.json").read_text())
            (outer,) = meta["codecs"]
            conf = outer["configuration"]
            shape, shard_shape = meta["shape"], meta["chunk_grid"]["configuration"]["chunk_shape"]
            inner = [c["name"] for c in conf["codecs"]]
            index = [c["name"] for c in conf["index_codecs"]]
            endian = conf["codecs"][0].get("configuration", {}).get("endian", "little")
            ok = (
                outer["name"] == "sharding_indexed"
                and conf.get("index_location", "end") == "end"
                and conf["chunk_shape"] == [1, *shape[1:]]
                and shard_shape[1:] == shape[1:]
                and inner in (["bytes"], ["bytes", "blosc"])
                and index == ["bytes", "crc32c"]
                and endian == "little"
                and meta["chunk_key_encoding"] == {"name": "default", "configuration": {"separator": "/"}}
            )
        except (OSError, ValueError, KeyError, TypeError, RecursionError):
            return None
        if not ok:
            return None
        return cls(array_dir, tuple(shape), np.dtype(meta["data_type"]), shard_shape[0], inner[-1] == "blosc")

    def _shard_index(self, shard: int, f) -> np.ndarray:
        if shard not in self._index:
            n = self.shard_rows
            raw = self._pread(f, 16 * n + 4, self._size(f) - 16 * n - 4)
            self._index[shard] = np.frombuffer(raw[: 16 * n], dtype="<u8").reshape(n, 2)
        return self._index[shard]

    # the byte access a subclass replaces (student/data/ranged.py reads a bucket's objects by range)
    def _size(self, f) -> int:
        return os.fstat(f.fileno()).st_size

    def _pread(self, f, nbytes: int, offset: int) -> bytes:
        return os.pread(f.fileno(), nbytes, offset)

    def _pread_into(self, f, buf: np.ndarray, offset: int) -> int:
        return os.preadv(f.fileno(), [buf], offset)

    def _open(self, shard: int, row: int):
        try:
            return open(self.path / "c" / str(shard) / "0" / "0" / "0", "rb", buffering=0)
        except FileNotFoundError:
            raise SakError(
                f"{self.path}: shard file {shard} is missing, so row {row} was never written (a hole, which "
                f"zarr would read as NaN fill); run `sak-cache verify` and re-run `sak-cache run`"
            ) from None

    def read_into(self, rows: np.ndarray, out: np.ndarray, dest: np.ndarray | None = None) -> None:
        """out[dest[i]] = row rows[i] for every i (dest default: i). `out` is C-contiguous, of this
        array's dtype and per-row shape; rows in any order (sorted reads are the fastest)."""
        import numcodecs.blosc

        dest = np.arange(len(rows)) if dest is None else dest
        flat = out.reshape(out.shape[0], -1).view(np.uint8)
        files: dict[int, object] = {}
        try:
            for row, d in zip(np.asarray(rows).tolist(), np.asarray(dest).tolist()):
                shard, k = divmod(row, self.shard_rows)
                f = files.get(shard)
                if f is None:
                    f = files[shard] = self._open(shard, row)
                offset, nbytes = (int(v) for v in self._shard_index(shard, f)[k])
                if offset == int(_NO_CHUNK):
                    raise SakError(
                        f"{self.path}: row {row} was never written (a hole in shard {shard}); "
                        f"run `sak-cache verify` and re-run `sak-cache run` to finish the store"
                    )
                if self.blosc:
                    numcodecs.blosc.decompress(self._pread(f, nbytes, offset), flat[d])
                elif nbytes != self.row_bytes or self._pread_into(f, flat[d], offset) != nbytes:
                    raise SakError(f"{self.path}: shard {shard} row {k} is truncated; run `sak-cache verify`")
        finally:
            for f in files.values():
                f.close()


def drop_partials(shard_file: Path) -> None:
    """Remove the temporary files zarr's local store leaves beside a shard file when a writer is killed
    mid-write (`<file>.<uuid>.partial`, renamed into place on success): the shard was just written whole."""
    for leftover in shard_file.parent.glob(f"{shard_file.name}.*.partial"):
        leftover.unlink(missing_ok=True)
