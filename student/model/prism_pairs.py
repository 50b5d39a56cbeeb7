"""Which (image, condition) rows a PRISM forward computes: every teacher on every image, the authors'
balanced one-teacher-per-image assignment, or the tasks of stage 2. Conditions are indices into the
student's condition names (teachers 0..T-1, then tasks T..T+K-1).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from sak.pipeline.base.errors import SakError


@dataclass(frozen=True, eq=False)
class RoutePairs:
    """Rows of a routed forward: image_index (P,) into the batch, condition (P,) into the student's
    conditions (teachers, then tasks). Built by the functions below, grouped by condition."""

    image_index: torch.Tensor
    condition: torch.Tensor
    batch_size: int

    def __len__(self) -> int:
        return int(self.image_index.numel())

    def rows_of(self, condition: int) -> torch.Tensor:
        """Positions (P_c,) of the rows routed by `condition`, in row order."""
        return torch.nonzero(self.condition == condition).squeeze(1)  # note: host-device sync

    def cat(self, other: RoutePairs) -> RoutePairs:
        if other.batch_size != self.batch_size:
            raise SakError(f"cannot join pairs of batches of {self.batch_size} and {other.batch_size} images")
        return RoutePairs(
            torch.cat([self.image_index, other.image_index]),
            torch.cat([self.condition, other.condition]),
            self.batch_size,
        )

    def to(self, device: torch.device | str) -> RoutePairs:
        return RoutePairs(self.image_index.to(device), self.condition.to(device), self.batch_size)


def pairs_every_condition(batch_size: int, conditions: Sequence[int]) -> RoutePairs:
    """Every image with every given condition index: P = B * len(conditions), grouped by condition."""
    if batch_size < 1 or not conditions:
        raise SakError(f"need at least one image and one condition, got {batch_size} and {list(conditions)}")
    cond = torch.tensor(list(conditions), dtype=torch.long).repeat_interleave(batch_size)
    images = torch.arange(batch_size, dtype=torch.long).repeat(len(conditions))
    return RoutePairs(images, cond, batch_size)


def assign_teachers(
    batch_size: int,
    num_teachers: int,
    teachers_per_image: int | None = None,
    seed: int = 0,
    step: int = 0,
    rank: int = 0,
) -> RoutePairs:
    """Which (image, teacher) pairs a stage-1 step computes; deterministic in (seed, step, rank).

    None (or num_teachers): every teacher on every image. k < num_teachers: each image gets k distinct
    teachers and the teachers share the images evenly: images are shuffled and the j-th takes the
    teacher slots j*k .. j*k+k-1 (mod T). With k = 1 this is the authors' stage-1 collate: B // T images
    per teacher, one more for the first B % T teachers, at random positions.
    """
    if num_teachers < 1:
        raise SakError("assign_teachers needs at least one teacher")
    k = num_teachers if teachers_per_image is None else int(teachers_per_image)
    if not 1 <= k <= num_teachers:
        raise SakError(f"teachers per image must be between 1 and {num_teachers}, got {teachers_per_image}")
    if k == num_teachers:
        return pairs_every_condition(batch_size, range(num_teachers))
    rng = np.random.default_rng([int(seed), int(step), int(rank)])  # PCG64: the same on every machine
    order = rng.permutation(batch_size)  # order[j] = the image in position j
    slots = (np.arange(batch_size)[:, None] * k + np.arange(k)[None, :]) % num_teachers  # (B, k)
    images = np.repeat(order, k)
    teachers = slots.reshape(-1)
    by_teacher = np.lexsort((images, teachers))  # group by teacher, images ascending within
    return RoutePairs(
        torch.from_numpy(images[by_teacher].astype(np.int64)),
        torch.from_numpy(teachers[by_teacher].astype(np.int64)),
        batch_size,
    )
