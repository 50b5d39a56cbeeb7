"""CPU side of extraction: read stored image bytes, decode once, cut each view at every teacher input size.

One decode of an image feeds all of its views and every teacher's input size.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from sak.pipeline.base.errors import SakError
from sak.pipeline.buckets.bucket import is_url
from sak.pipeline.buckets.mirror import node_mirror
from sak.pipeline.format.layout import IMAGE_INDEX_FILE, VIEWS_FILE, image_tar_name
from sak.pipeline.format.tables import ImageReader, read_table
from sak.pipeline.sources.images import cut_view, decode_image


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
