"""The stage-2 views a target cache replays: the uint8 image `TrainSamples` gives for (seed, image, epoch).

A stage-2 view is the replayable `augment_plan` (scale, pad, crop, flip, photometric jitter) applied by
`apply_plan`, the very functions the trainer uses, so the targets a cache stores are those of the images
the student is shown. Row r of a cache is (epoch, image) = divmod(r, N), in the split file's order.

`Stage2Views` is what the pipeline's stage-2 builder (pipeline/extraction/stage2.py) replays: picklable (a
Ray actor rebuilds its dataset from the recorded fields), it gives each shard's teacher inputs and its
views.parquet rows:

    row, epoch, image, name, height, width (the source image), scale, flip, crop_y, crop_x, brightness,
    contrast, saturation, hue (null = step skipped), contrast_first, valid_h, valid_w (unpadded part of
    the crop), image_sha256 (of the augmented uint8 image, (3, H, W) C order)
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping
from typing import Any

import torch

from sak.pipeline.base.provenance import stable_hash
from sak.pipeline.extraction.worker import ShardJob, ShardViews
from sak.pipeline.format.records import Stage2Identity
from sak.pipeline.teachers.forward import LoadedTeacher, fit_to_input
from sak.student.data.dense import DenseDataset, TrainSamples
from sak.student.data.dense_augment import apply_plan
from sak.student.data.dense_labels import read_image

PLAN_VERSION = 1  # bump when augment_plan / apply_plan change what a (seed, image, epoch) view is
SPLIT = "train"


def names_hash(names: list[str]) -> str:
    return stable_hash(list(names))


def image_sha256(image: torch.Tensor) -> str:
    return hashlib.sha256(image.contiguous().numpy().tobytes()).hexdigest()


def augmented_image(samples: TrainSamples, epoch: int, index: int) -> tuple[torch.Tensor, dict]:
    """The uint8 image TrainSamples gives for (epoch, image index), without reading labels; + its plan row."""
    data = samples.data
    name = data.names[index]
    image = read_image(data.image_path(name))
    h, w = image.shape[-2:]
    plan = samples.plan(name, epoch, h, w)
    out = apply_plan({"name": name, "image": image, "labels": {}}, plan, samples.crop)
    row = {
        "row": epoch * len(data) + index,
        "epoch": epoch,
        "image": index,
        "name": name,
        "height": int(h),
        "width": int(w),
        **{k: getattr(plan, k) for k in plan.__dataclass_fields__},
        "valid_h": int(out["size"][0]),
        "valid_w": int(out["size"][1]),
        "image_sha256": image_sha256(out["image"]),
    }
    return out["image"], row


class Stage2Views:
    """The training split's augmented views, replayed from (seed, crop, scale range, photometric)."""

    def __init__(
        self,
        dataset: str,
        data_root: str,
        crop: tuple[int, int],
        seed: int,
        scale_range: tuple[float, float],
        photometric: bool,
    ) -> None:
        self.dataset, self.data_root, self.crop = dataset, data_root, tuple(crop)
        self.seed, self.scale_range, self.photometric = seed, tuple(scale_range), photometric
        self._samples: TrainSamples | None = None

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_samples": None}  # a worker re-reads the split file itself

    @property
    def samples(self) -> TrainSamples:
        if self._samples is None:
            data = DenseDataset(self.dataset, self.data_root, SPLIT)
            self._samples = TrainSamples(data, self.crop, self.seed, self.scale_range, self.photometric)
        return self._samples

    def identity(self, fingerprints: list[str]) -> Stage2Identity:
        """What a cache of these views serves (a trainer checks its own against it)."""
        data = self.samples.data
        return Stage2Identity(
            dataset=self.dataset,
            split=SPLIT,
            num_images=len(data),
            names_sha=names_hash(data.names),
            seed=int(self.seed),
            crop=list(self.crop),
            scale_range=[float(x) for x in self.scale_range],
            photometric=bool(self.photometric),
            plan_version=PLAN_VERSION,
            fingerprints=list(fingerprints),
        )

    def _row(self, r: int) -> tuple[torch.Tensor, dict]:
        return augmented_image(self.samples, *divmod(r, len(self.samples.data)))

    def rows(self, start: int, stop: int) -> list[dict]:
        return [self._row(r)[1] for r in range(start, stop)]

    def views(self, job: ShardJob, payload: Any, teachers: Mapping[str, LoadedTeacher]) -> ShardViews:
        """Rows [start, stop): their augmented images (3, H, W) uint8, as each teacher takes them."""
        built = [self._row(r) for r in range(job.start, job.stop)]
        images = torch.stack([image for image, _ in built])  # (n, 3, H, W) uint8
        inputs = {name: fit_to_input(teachers[name].spec, images) for name in job.teachers}
        return ShardViews(inputs, [row for _, row in built])
