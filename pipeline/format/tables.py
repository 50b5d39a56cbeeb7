"""The format's binary files: the two Parquet tables (their Arrow schemas and reader) and random access
to the image tars they index.

    images/index.parquet   one row per image: key, ext, width, height, image_shard, offset, nbytes, sha256
    views.parquet          one row per view, in store order: key, view, x0, y0, x1, y1, flip, image_shard
                           (row i is sample i of every teacher store)
"""

from __future__ import annotations

from pathlib import Path

import pyarrow as pa

from sak.pipeline.base.errors import SakError
from sak.pipeline.format.layout import image_tar_name

IMAGE_INDEX_SCHEMA = pa.schema(
    [
        ("key", pa.string()),
        ("ext", pa.string()),
        ("width", pa.int32()),
        ("height", pa.int32()),
        ("image_shard", pa.int32()),
        ("offset", pa.int64()),
        ("nbytes", pa.int64()),
        ("sha256", pa.string()),
    ]
)
VIEWS_SCHEMA = pa.schema(
    [
        ("key", pa.string()),
        ("view", pa.int32()),
        ("x0", pa.int32()),
        ("y0", pa.int32()),
        ("x1", pa.int32()),
        ("y1", pa.int32()),
        ("flip", pa.bool_()),
        ("image_shard", pa.int32()),
    ]
)


def read_table(path: Path):
    """A Parquet table of the cache; a damaged or missing one is a one-line SakError naming it."""
    import pyarrow.parquet as pq

    try:
        return pq.read_table(path)
    except (OSError, ValueError) as e:  # pyarrow's ArrowInvalid is a ValueError
        raise SakError(
            f"{path} cannot be read ({type(e).__name__}); the file is damaged: run `sak-cache verify`"
        ) from e


class ImageReader:
    """Random access to the source bytes stored in a cache's `images/` tars (offsets from the index)."""

    def __init__(self, cache_dir: str | Path) -> None:
        self.cache_dir = Path(cache_dir)
        self._files: dict[int, object] = {}

    def read(self, image_shard: int, offset: int, nbytes: int) -> bytes:
        f = self._files.get(image_shard)
        if f is None:
            path = self.cache_dir / image_tar_name(image_shard)
            try:
                f = self._files[image_shard] = open(path, "rb")
            except FileNotFoundError as e:
                raise SakError(f"image shard {path} is missing; run `sak-cache verify` on the cache") from e
        f.seek(offset)
        data = f.read(nbytes)
        if len(data) != nbytes:
            raise SakError(f"image shard {image_tar_name(image_shard)} is truncated at offset {offset}")
        return data

    def close(self) -> None:
        for f in self._files.values():
            f.close()
        self._files.clear()
