"""A stage-2 target cache as a trainer reads it (`sak-train stage2 --cache`, `sak-train tiger --cache`):
the teachers' targets of each batch's (epoch, image) rows, in place of live teachers.

The cache is built by `sak-cache stage2` (pipeline/extraction/stage2.py, from the views of
stage2_views.py); its record is format/records.py's Stage2Cache. The reader refuses, in one line naming
both values, a cache whose identity differs from the run's or that holds fewer epochs than the run
needs, and checks every batch image against the sha256 the cache recorded for its row.
"""

from __future__ import annotations

import math
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import torch

from sak.pipeline.base.errors import SakError
from sak.pipeline.buckets.bucket import is_url
from sak.pipeline.buckets.mirror import metadata_mirror
from sak.pipeline.format.documents import read_stage2_cache
from sak.pipeline.format.layout import CACHE_FILE, VIEWS_FILE
from sak.pipeline.format.records import Stage2Identity
from sak.pipeline.store.codecs import get_codec
from sak.pipeline.store.zarr import ZarrTeacherStore
from sak.student.data.stage2_views import image_sha256

# a trainer option for each identity field a run may take from the cache (the rest follow the data)
OPTION_OF = {"crop": "--img-size", "seed": "--seed", "dataset": "--dataset", "num_images": "--data-root"}


def recorded_identity(path: str | Path) -> Stage2Identity | None:
    """What a stage-2 cache at `path` was built with (crop, seed, augmentation, ...): a run's defaults;
    None when `path` holds no stage-2 cache (the reader then says why)."""
    root = metadata_mirror(str(path).rstrip("/")) if is_url(path) else Path(path).expanduser()
    if not (root / CACHE_FILE).exists():
        return None
    try:
        return read_stage2_cache(root / CACHE_FILE).identity
    except SakError:
        return None


class Stage2CachedTargets:
    """Targets of the batch's (epoch, image) rows from a stage-2 cache, in Stage2Teachers' output form.

    `stores` carries each teacher's name and tap positions (what `student_levels` needs).
    """

    def __init__(self, path: str | Path, expected: dict, steps: int, batch_size: int) -> None:
        import pyarrow.parquet as pq

        url = str(path).rstrip("/") if is_url(path) else None  # read in place: zarr reads chunks by range
        self.root = metadata_mirror(url) if url else Path(path).expanduser()
        self.shown = url or self.root
        if not (self.root / CACHE_FILE).exists():
            raise SakError(f"--cache {self.shown} is not a stage-2 cache (no {CACHE_FILE})")
        try:
            cache = read_stage2_cache(self.root / CACHE_FILE)
        except SakError as e:
            raise SakError(f"--cache {self.shown}: {e}") from None
        if not cache.complete or cache.teachers is None:
            raise SakError(f"--cache {self.shown} is incomplete; re-run `sak-cache stage2` to finish it")
        for key, want in expected.items():
            have = getattr(cache.identity, key, None)
            if have != want:
                raise SakError(
                    f"--cache {self.shown} was built with {key} {have!r}, this run has {want!r}"
                    + (f"; leave out {OPTION_OF[key]} to take the cache's" if key in ("crop", "seed") else "")
                    + ", or build a cache for this run with `sak-cache stage2`"
                )
        needed = steps * batch_size
        if needed > cache.rows:
            raise SakError(
                f"--cache {self.shown} holds {cache.epochs} epochs ({cache.rows} samples), this run needs "
                f"{needed} ({math.ceil(needed / cache.identity.num_images)} epochs)"
            )
        self.cache = cache
        self.stores = [
            SimpleNamespace(teacher=t.teacher, positions=tuple(t.positions)) for t in cache.teachers
        ]
        self._readers = {
            t.teacher: (
                ZarrTeacherStore(
                    f"{url}/{t.path}" if url else self.root / t.path, get_codec(cache.codec), cache.shard_size
                ),
                t.blocks,
            )
            for t in cache.teachers
        }
        try:
            self.sha = pq.read_table(self.root / VIEWS_FILE, columns=["image_sha256"]).column(0).to_pylist()
        except (OSError, ValueError) as e:
            raise SakError(
                f"--cache {self.shown}: {VIEWS_FILE} cannot be read ({type(e).__name__}); the file is damaged"
            ) from e

    def __call__(
        self, batch: dict, images_u8: torch.Tensor, device: torch.device
    ) -> dict[str, list[torch.Tensor]]:
        rows = np.asarray(batch["rows"], dtype=np.int64)
        for r, im in zip(rows, images_u8):
            if image_sha256(im.cpu()) != self.sha[r]:
                raise SakError(
                    f"--cache {self.shown}: the augmented image of row {r} differs from the cached one "
                    f"(augmentation code changed?); rebuild the cache"
                )
        order = np.argsort(rows, kind="stable")
        inverse = np.empty_like(order)
        inverse[order] = np.arange(len(order))
        out = {}
        for teacher, (store, blocks) in self._readers.items():
            out[teacher] = [store.read_rows(b, rows[order])[inverse].to(device) for b in blocks]
        return out
