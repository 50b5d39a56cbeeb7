"""What a cache holds, as the student reads it: the selected teacher stores and the per-row columns.

`open_cache` (opening.py) builds a `CacheIndex`; the data order (order.py), the integrity checks
(integrity.py) and the loader all take one. It sits below them so none of them imports another back.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from sak.pipeline.format.records import CacheManifest, StoreManifest
from sak.pipeline.sources.views import ViewPlan
from sak.pipeline.store.codecs import Codec
from sak.pipeline.store.lowrank import PcaBasis


@dataclass(frozen=True)
class StoreInfo:
    """One selected teacher store: where it is and what its levels look like."""

    fingerprint: str
    teacher: str  # registry name, e.g. "clip_tiny"; the student's adapter path has the same name
    dim: int
    path: Path
    codec: Codec  # resolved from the manifest once (store.backends.store_codec)
    format: str  # "zarr" | "wds"
    blocks: tuple[int, ...]  # tapped block of each stored level, in the store's level order
    positions: tuple[int, ...]  # which of the teacher's (and student's) 4 taps each stored level is
    grids: tuple[tuple[int, int], ...]  # (H, W) of each level (the teacher's grid, or a resampled one)
    manifest: StoreManifest = field(compare=False, repr=False)
    bases: dict[int, PcaBasis] | None = field(default=None, compare=False, repr=False)  # pca<k>, by block

    @property
    def side(self) -> int:
        """Side of the view this teacher saw (the plan size, or SAM's fixed input)."""
        return self.manifest.identity.input_size[0]


@dataclass
class CacheIndex:
    """A validated cache: per-image and per-row columns as numpy arrays (cheap to fork into workers)."""

    root: Path
    cache: CacheManifest
    plan: ViewPlan
    stores: list[StoreInfo]
    shard_size: int  # rows per shard (a multiple of K)
    num_views: int
    num_shards: int
    # per image j (rows j*K .. j*K+K-1)
    image_shard: np.ndarray  # (N,) int64: which images/ tar
    image_offset: np.ndarray  # (N,) int64
    image_nbytes: np.ndarray  # (N,) int64
    # per row
    boxes: np.ndarray  # (V, 4) int64: x0, y0, x1, y1 in source pixels, half-open
    flips: np.ndarray  # (V,) bool
    remote: str | None = None  # a bucket cache: root is its local read-through directory
    local_cache_bytes: int = 0  # the bound on that directory's shard objects
    ranged: bool = False  # a bucket cache read in place by byte range (no --local-cache): root holds metadata

    @property
    def views_per_image(self) -> int:
        return self.plan.views_per_image

    @property
    def num_images(self) -> int:
        return self.num_views // self.views_per_image

    @property
    def images_per_shard(self) -> int:
        return self.shard_size // self.views_per_image
