"""WebDataset teacher store: the same targets as the Zarr store, one uncompressed tar per shard.

Same shard boundaries and sample order as the Zarr store and views.parquet (row i = sample i). Layout of
one store (`teachers/<fingerprint>/`):
  layout.json                  format, codec (codec.describe()), views, shard size, per-level shapes
  shards/shard-NNNNNN.tar      rows [N * shard_size, (N + 1) * shard_size)
  manifest.json, shards.jsonl, stats/   as for Zarr (format/manifest.py, format/journal.py)

Members of one sample, consecutive, in block order (WebDataset groups consecutive members by key):
  <samplekey>.<block>.npy          values (H, W, C): float16 | float32 | uint16 (bf16 bits) | int8 | uint8 (fp8 bits)
  <samplekey>.<block>.scales.npy   quantised codecs: float16 (H, W, G) or (1, 1, C)
The sample key is the view's key plus its view index, `f"{key}__v{view}"`: keys keep '/' and never hold
a dot (WebDataset splits a member name at the first dot of its base name). `.npy` has no bfloat16 or
float8 (bf16 would load as a void type): those are stored as their uint16/uint8 bits, and the true dtype
is in layout.json and the store manifest. Never pickled: read with `np.load(f, allow_pickle=False)`.

A tar is written under a temporary name in the same folder, fsynced, then renamed: a reader never sees
half a shard, and a crashed writer leaves only a `.shard-*.tmp*` file that the next run replaces. Tar
headers carry no time or owner, so rewriting a shard with the same targets gives the same bytes (and
sha256). Read with stock tools only:

    import webdataset as wds
    for s in wds.WebDataset(urls, shardshuffle=False).decode():  # s["__key__"], s["11.npy"], ...
        ...
"""

from __future__ import annotations

import io
import os
import re
import tarfile
from pathlib import Path

import numpy as np
import torch

from sak.pipeline.base.errors import SakError
from sak.pipeline.base.provenance import read_json, sha256_file, write_json_atomic
from sak.pipeline.store.codecs import Codec, Encoded
from sak.pipeline.store.lowrank import PcaBasis, basis_paths, decode_level, encode_level, level_basis

FORMAT = "wds"
LAYOUT_FILE = "layout.json"
_MEMBER = re.compile(r"^((?:.*/|)[^.]+)[.]([^/]*)$")  # WebDataset's own key/extension split


def sample_key(key: str, view: int) -> str:
    """`f"{key}__v{view}"`; a dot would split the key in WebDataset, so it is refused."""
    if "." in key:
        raise SakError(f"view key {key!r} contains a dot; keys of a cache never do (sources.normalise_key)")
    return f"{key}__v{view}"


def shard_file(shard: int) -> str:
    """Path of one shard's tar relative to the store."""
    return f"shards/shard-{shard:06d}.tar"


def member_names(key: str, block: int) -> tuple[str, str]:
    """(values member, scales member) of one sample and level."""
    return f"{key}.{block}.npy", f"{key}.{block}.scales.npy"


def layout_record(
    num_views: int, shard_size: int, grids: dict[int, tuple[int, int, int]], codec: Codec
) -> dict:
    return {
        "format": FORMAT,
        "codec": codec.describe(),
        "num_views": num_views,
        "shard_size": shard_size,
        "levels": [
            {
                "block": int(b),
                "member": f"<samplekey>.{b}.npy",
                "shape": [h, w, codec.stored_width(c)],
                **(
                    {"channels": c, "basis": dict(zip(("mean", "components"), basis_paths(FORMAT, b)))}
                    if codec.low_rank
                    else {}
                ),
                "store_dtype": codec.store_dtype,
                "true_dtype": codec.true_dtype,
                **(
                    {
                        "scales_member": f"<samplekey>.{b}.scales.npy",
                        "scales_shape": list(codec.scale_shape(h, w, codec.stored_width(c))),
                    }
                    if codec.scaled
                    else {}
                ),
            }
            for b, (h, w, c) in sorted(grids.items())
        ],
        "sample_key": "f'{key}__v{view}' from views.parquet",
    }


def create_wds_store(
    path: Path, num_views: int, shard_size: int, grids: dict[int, tuple[int, int, int]], codec: Codec
) -> None:
    """Create the store folder and its layout.json; idempotent, refuses a store of another layout."""
    path = Path(path)
    (path / "shards").mkdir(parents=True, exist_ok=True)
    layout = layout_record(num_views, shard_size, grids, codec)
    if (path / LAYOUT_FILE).exists():
        old = read_json(path / LAYOUT_FILE)
        if old != layout:
            raise SakError(
                f"{path} holds a WebDataset store of another layout (codec, views, shard size or level "
                f"shapes differ); the store belongs to another run, delete it"
            )
        return
    write_json_atomic(path / LAYOUT_FILE, layout)


def _npy_bytes(a: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, np.ascontiguousarray(a), allow_pickle=False)
    return buf.getvalue()


def _add(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size, info.mode, info.mtime = len(data), 0o644, 0  # no time, owner: same targets, same bytes
    tar.addfile(info, io.BytesIO(data))


class WdsTeacherStore:
    """Writer and reader of one WebDataset teacher store; cheap to construct, safe to send to a worker.

    sample_keys: the WebDataset key of every row (`sample_key(key, view)` of views.parquet, in order);
    default: read from `<store>/../../views.parquet`, i.e. the cache the store sits in.
    """

    def __init__(
        self, path: str | Path, codec: Codec, shard_size: int, sample_keys: list[str] | None = None
    ) -> None:
        self.path = Path(path)
        self.codec = codec
        self.shard_size = shard_size
        self._keys = sample_keys
        self._index: dict[int, tuple[int, dict[str, tarfile.TarInfo]]] = {}  # shard -> (mtime, members)
        self.format = FORMAT
        self.bases: dict[int, PcaBasis] = {}  # pca<k>: each level's basis (lowrank.py), read when first used

    @property
    def sample_keys(self) -> list[str]:
        if self._keys is None:
            import pyarrow.parquet as pq

            views = self.path.parent.parent / "views.parquet"
            if not views.exists():
                raise SakError(f"{views} not found: pass sample_keys, or keep the store inside its cache")
            try:
                table = pq.read_table(views, columns=["key", "view"]).to_pydict()
            except (OSError, ValueError) as e:  # pyarrow's ArrowInvalid is a ValueError
                raise SakError(
                    f"{views} cannot be read ({type(e).__name__}); the file is damaged: run `sak-cache verify`"
                ) from e
            self._keys = [sample_key(k, v) for k, v in zip(table["key"], table["view"])]
        return self._keys

    @property
    def num_views(self) -> int:
        return len(self.sample_keys)

    def shard_file(self, shard: int) -> str:
        return shard_file(shard)

    def _bounds(self, shard: int) -> tuple[int, int]:
        start = shard * self.shard_size
        if not 0 <= start < self.num_views:
            raise SakError(f"shard {shard} is outside the store ({self.num_views} views)")
        return start, min(start + self.shard_size, self.num_views)

    # ----------------------------------------------------------------------------------------- write

    def write_shard(self, shard: int, start: int, levels: dict[int, torch.Tensor]) -> dict[str, str]:
        """Write rows [start, start + n) of every level (block -> (n, H, W, C) float) as one whole tar,
        atomically; return {relative file: sha256}."""
        lo, hi = self._bounds(shard)
        if start != lo:
            raise ValueError(f"shard {shard} must start at {lo}, not {start}")
        for block, feats in levels.items():
            if feats.shape[0] != hi - lo:
                raise ValueError(
                    f"shard {shard} of level {block} must hold {hi - lo} rows, got {feats.shape[0]}"
                )
        encoded = {b: encode_level(self.codec, self.basis(b), levels[b]) for b in sorted(levels)}
        rel = shard_file(shard)
        final = self.path / rel
        final.parent.mkdir(parents=True, exist_ok=True)
        tmp = final.with_name(f".{final.name}.tmp{os.getpid()}")
        try:
            with open(tmp, "wb") as f:
                with tarfile.open(fileobj=f, mode="w", format=tarfile.PAX_FORMAT) as tar:
                    for i, key in enumerate(self.sample_keys[lo:hi]):
                        for block, enc in encoded.items():
                            values_name, scales_name = member_names(key, block)
                            _add(tar, values_name, _npy_bytes(enc.values[i]))
                            if enc.scales is not None:
                                _add(tar, scales_name, _npy_bytes(enc.scales[i]))
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, final)
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise
        dir_fd = os.open(final.parent, os.O_RDONLY)  # make the rename itself durable
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)
        self._index.pop(shard, None)
        return {rel: sha256_file(final)}

    # ------------------------------------------------------------------------------------------ read

    def _members(self, shard: int) -> dict[str, tarfile.TarInfo]:
        path = self.path / shard_file(shard)
        if not path.exists():
            raise SakError(f"{path} is missing: shard {shard} was never written (or was deleted)")
        mtime = path.stat().st_mtime_ns
        if shard not in self._index or self._index[shard][0] != mtime:
            with tarfile.open(path, mode="r:") as tar:  # headers only: the data is seeked over
                self._index[shard] = (mtime, {m.name: m for m in tar.getmembers() if m.isfile()})
        return self._index[shard][1]

    def _load(self, shard: int, names: list[str]) -> list[np.ndarray]:
        members = self._members(shard)
        out = []
        with open(self.path / shard_file(shard), "rb") as f:
            for name in names:
                if name not in members:
                    raise SakError(
                        f"{self.path / shard_file(shard)} has no member {name}: the tar does not hold "
                        f"this store's samples; run `sak-cache verify`"
                    )
                m = members[name]
                f.seek(m.offset_data)
                out.append(load_member(f.read(m.size), f"{self.path / shard_file(shard)}:{name}"))
        return out

    def _read_rows_encoded(self, block: int, rows: np.ndarray) -> Encoded:
        """Stored values (and scales) of rows (any order), grouped by shard for sequential reads."""
        rows = np.asarray(rows, dtype=np.int64)
        values: list[np.ndarray | None] = [None] * len(rows)
        scales: list[np.ndarray | None] = [None] * len(rows)
        for shard in np.unique(rows // self.shard_size):
            idx = np.flatnonzero(rows // self.shard_size == shard)
            idx = idx[np.argsort(rows[idx], kind="stable")]
            names = []
            for i in idx:
                v, s = member_names(self.sample_keys[rows[i]], block)
                names += [v, s] if self.codec.scaled else [v]
            arrays = self._load(int(shard), names)
            step = 2 if self.codec.scaled else 1
            for j, i in enumerate(idx):
                values[i] = arrays[step * j]
                scales[i] = arrays[step * j + 1] if self.codec.scaled else None
        if not len(rows):
            raise SakError("no rows asked for")
        return Encoded(np.stack(values), np.stack(scales) if self.codec.scaled else None)

    def read_encoded(self, block: int, start: int, stop: int) -> Encoded:
        """Rows [start, stop) as stored: values (n, H, W, C) and scales (or None)."""
        return self._read_rows_encoded(block, np.arange(start, stop))

    def read_encoded_rows(self, block: int, rows: np.ndarray) -> Encoded:
        return self._read_rows_encoded(block, rows)

    def read(self, block: int, start: int, stop: int) -> torch.Tensor:
        """Rows [start, stop) of one level, decoded to float32 (n, H, W, C)."""
        return decode_level(self.codec, self.basis(block), *self.read_encoded(block, start, stop))

    def read_rows(self, block: int, rows: np.ndarray) -> torch.Tensor:
        return decode_level(self.codec, self.basis(block), *self._read_rows_encoded(block, rows))

    def basis(self, block: int) -> PcaBasis | None:
        return level_basis(self, block)

    def blocks(self, shard: int = 0) -> list[int]:
        """Blocks stored in a shard (from its first sample's members)."""
        first = self.sample_keys[shard * self.shard_size]
        found = set()
        for name in self._members(shard):
            m = _MEMBER.match(name)
            if (
                m
                and m.group(1) == first
                and m.group(2).endswith(".npy")
                and not m.group(2).endswith(".scales.npy")
            ):
                found.add(int(m.group(2).split(".")[0]))
        return sorted(found)

    def check_shard(self, shard: int, blocks: list[int]) -> list[str]:
        """Problems of one shard's tar from its headers alone (cheap: no data is read): missing tar, sample
        keys not those of views.parquet rows in order, a missing values or scales member."""
        lo, hi = self._bounds(shard)
        try:
            members = self._members(shard)
        except (SakError, tarfile.TarError, OSError) as e:
            return [f"{shard_file(shard)}: {e}"]
        expected = []
        for key in self.sample_keys[lo:hi]:
            for b in blocks:
                values, scales = member_names(key, b)
                expected += [values, scales] if self.codec.scaled else [values]
        names = list(members)
        if names == expected:
            return []
        missing = [n for n in expected if n not in members]
        if missing:
            return [f"{shard_file(shard)}: {len(missing)} member(s) missing, e.g. {missing[0]}"]
        return [f"{shard_file(shard)}: members are not this store's samples in views.parquet order"]

    def read_shard(self, shard: int) -> dict[int, torch.Tensor]:
        """Every level of one shard decoded to float32: {block: (n, H, W, C)}. Checks that the tar holds
        exactly this store's sample keys, in order."""
        lo, hi = self._bounds(shard)
        keys = []
        for name in self._members(shard):
            m = _MEMBER.match(name)
            if m is None:
                raise SakError(f"{self.path / shard_file(shard)}: member {name} is not <key>.<ext>")
            if not keys or keys[-1] != m.group(1):
                keys.append(m.group(1))
        if keys != self.sample_keys[lo:hi]:
            bad = next(
                (i for i, (a, b) in enumerate(zip(keys, self.sample_keys[lo:hi])) if a != b), len(keys)
            )
            raise SakError(
                f"{self.path / shard_file(shard)}: sample {bad} has key "
                f"{keys[bad] if bad < len(keys) else None!r}, views.parquet row {lo + bad} expects "
                f"{self.sample_keys[lo + bad] if lo + bad < hi else None!r}"
            )
        return {b: self.read(b, lo, hi) for b in self.blocks(shard)}


def load_member(data: bytes, where: str) -> np.ndarray:
    """One .npy member of a shard, untrusted: its header is read first and only a numeric array is
    loaded (never pickled); anything else is one SakError naming the member."""
    buf = io.BytesIO(data)
    try:
        version = np.lib.format.read_magic(buf)
        read = (
            np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
        )
        shape, _, dtype = read(buf)
    except (ValueError, SyntaxError, TypeError) as e:
        raise SakError(
            f"{where} is not a .npy array ({e}); the store is damaged: run `sak-cache verify`"
        ) from e
    if dtype.hasobject or np.prod(shape, dtype=np.int64) * dtype.itemsize > len(data):
        raise SakError(
            f"{where} holds a {dtype} array of shape {shape}, not this store's numeric values; the store is "
            f"damaged or forged: run `sak-cache verify`"
        )
    try:
        return np.load(io.BytesIO(data), allow_pickle=False)
    except ValueError as e:
        raise SakError(f"{where} cannot be read ({e}); the store is damaged: run `sak-cache verify`") from e
