"""Cache stores: the Zarr and WebDataset backends behind one small interface.

create_teacher_store(fmt, path, num_views, shard_size, grids, codec)   once, by the driver
open_teacher_store(fmt, path, codec, shard_size)  .write_shard(shard, start, {block: (n, H, W, C)})
                                                  -> {relpath: sha256}; .read(block, start, stop)
level_records(fmt, codec, num_views, grids)       the manifest's "levels" entries
open_store(path, manifest)                        a store as its manifest describes it, for reading
                                                  (store_codec(manifest): its codec, resolved once)
"""

from __future__ import annotations

from pathlib import Path

from sak.pipeline.base.errors import SakError
from sak.pipeline.base.oserrors import write_error
from sak.pipeline.format.records import LevelRecord, StoreManifest
from sak.pipeline.store.codecs import Codec, get_codec

STORE_FORMATS = ("zarr", "wds")


def check_format(fmt: str) -> str:
    if fmt not in STORE_FORMATS:
        raise SakError(f"unknown store format {fmt!r}; known formats: {', '.join(STORE_FORMATS)}")
    return fmt


def create_teacher_store(
    fmt: str, path: Path, num_views: int, shard_size: int, grids: dict, codec: Codec, compressor: str = "none"
) -> None:
    """Create a store (grids: block -> (H, W, C)) with its final shapes; idempotent, refuses another layout.
    compressor (Zarr only; WebDataset shards are plain tars): none | lz4 | zstd."""
    if check_format(fmt) == "wds":
        from sak.pipeline.store.wds import create_wds_store

        return create_wds_store(path, num_views, shard_size, grids, codec)
    from sak.pipeline.store.zarr import create_store

    try:
        return create_store(path, num_views, shard_size, grids, codec, compressor)
    except SakError:
        raise
    except Exception as e:  # noqa: BLE001 - zarr raises many kinds on damaged metadata
        raise write_error(e, path) or SakError(
            f"{path}: the store's Zarr metadata cannot be read ({type(e).__name__}); run `sak-cache verify`, "
            f"or delete the store folder to compute it again"
        ) from e


def store_codec(manifest: StoreManifest) -> Codec:
    """The codec a store's manifest names, resolved once per store: readers keep it with the store."""
    return get_codec(manifest.codec)


def open_store(path: str | Path, manifest: StoreManifest):
    """A store as its manifest describes it (format, codec, shard size), for reading."""
    return open_teacher_store(manifest.format, path, store_codec(manifest), manifest.shard_size)


def open_teacher_store(fmt: str, path: str | Path, codec: Codec, shard_size: int):
    """A ZarrTeacherStore or WdsTeacherStore (same write_shard/read/read_rows/read_shard contract)."""
    if check_format(fmt) == "wds":
        from sak.pipeline.store.wds import WdsTeacherStore

        return WdsTeacherStore(path, codec, shard_size)
    from sak.pipeline.store.zarr import ZarrTeacherStore

    return ZarrTeacherStore(path, codec, shard_size)


def level_records(
    fmt: str, codec: Codec, num_views: int, grids: dict[int, tuple[int, int, int]]
) -> list[LevelRecord]:
    """One manifest entry per level: where its values (and scales) are, shapes, dtypes, codec."""
    from sak.pipeline.store.lowrank import basis_record

    zarr = check_format(fmt) == "zarr"
    out = []
    for b, (h, w, channels) in sorted(grids.items()):
        c = codec.stored_width(channels)  # pca<k>: the stored k; `channels` and `basis` say how to decode
        out.append(
            LevelRecord(
                block=int(b),
                array=f"levels/{b}" if zarr else None,
                member=None if zarr else f"<samplekey>.{b}.npy",
                shape=[num_views, h, w, c],
                dtype=codec.true_dtype,
                store_dtype=codec.store_dtype,
                codec=codec.name,
                scales=f"scales/{b}" if zarr and codec.scaled else None,
                scales_member=f"<samplekey>.{b}.scales.npy" if codec.scaled and not zarr else None,
                scales_shape=[num_views, *codec.scale_shape(h, w, c)] if codec.scaled else None,
                scales_dtype="float16" if codec.scaled else None,
                channels=channels if codec.low_rank else None,
                basis=basis_record(fmt, b, c, channels) if codec.low_rank else None,
            )
        )
    return out
