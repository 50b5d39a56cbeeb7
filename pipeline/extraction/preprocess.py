"""CPU side of extraction (and of the training loader): read stored image bytes, decode once, cut views.

One decode of an image feeds all of its views and every teacher's input size.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from sak.pipeline.base.errors import SakError
from sak.pipeline.buckets.bucket import is_url, node_mirror
from sak.pipeline.extraction.ingest import image_tar_name
from sak.pipeline.format.manifest import IMAGE_INDEX_FILE, VIEWS_FILE, read_table
from sak.pipeline.sources.images import decode_rgb
from sak.pipeline.sources.views import cut_view


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


def decode_image(data: bytes) -> torch.Tensor:
    """Stored bytes -> (3, H, W) uint8 RGB (no EXIF rotation: boxes are in stored-pixel coordinates)."""
    img = decode_rgb(data)
    return torch.from_numpy(np.asarray(img, dtype=np.uint8).copy()).permute(2, 0, 1).contiguous()


@dataclass(frozen=True)
class ViewRow:
    """One view as a CPU task cuts it: its image (tar, offset, size in images/) and its box and flip."""

    key: str
    image_shard: int
    offset: int
    nbytes: int
    box: tuple[int, int, int, int]  # x0, y0, x1, y1 in source pixels, half-open
    flip: bool


def cut_shard_views(cache_dir: str, rows: list[ViewRow], sizes: list[int]) -> dict[int, np.ndarray]:
    """Views of consecutive rows at each square size -> {size: (n, 3, size, size) uint8}. Consecutive rows
    of one image share one decode. A URL cache_dir: the image tars are fetched into this node's mirror."""
    if is_url(cache_dir):
        cache_dir = str(
            node_mirror(cache_dir, [image_tar_name(s) for s in sorted({r.image_shard for r in rows})])
        )
    reader = ImageReader(cache_dir)
    out = {s: np.empty((len(rows), 3, s, s), np.uint8) for s in sizes}
    image, image_key = None, None
    try:
        for i, r in enumerate(rows):
            if r.key != image_key:
                image = decode_image(reader.read(r.image_shard, r.offset, r.nbytes))
                image_key = r.key
            for s in sizes:
                out[s][i] = cut_view(image, r.box, r.flip, (s, s)).numpy()
    finally:
        reader.close()
    return out


def view_rows(out: Path) -> list[ViewRow]:
    """views.parquet joined with the image index: everything a CPU task needs to cut a view."""
    views = read_table(out / VIEWS_FILE).to_pylist()
    index = {r["key"]: r for r in read_table(out / IMAGE_INDEX_FILE).to_pylist()}
    rows = []
    for v in views:
        img = index.get(v["key"])
        if img is None:
            raise SakError(f"{out}: views.parquet names image {v['key']!r} that images/index.parquet lacks")
        box = (v["x0"], v["y0"], v["x1"], v["y1"])
        rows.append(ViewRow(v["key"], img["image_shard"], img["offset"], img["nbytes"], box, bool(v["flip"])))
    return rows
