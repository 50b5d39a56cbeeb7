"""Teacher maps onto a store's grid (targets.py says which grid and which levels).

Resampling (before encoding, in float32): `F.interpolate(mode="bilinear", align_corners=False,
antialias=True)` on the (B, C, H, W) map. When shrinking (SAM 64 -> 24), antialias makes each target token
a triangle-weighted average of every teacher token under it, instead of bilinear's 2x2 sample that drops
most tokens (aliasing); when enlarging, PyTorch ignores antialias and it is plain bilinear. This mirrors the
loss: the loss resizes the student map bilinearly (align_corners=False) to the target's grid, so with
`grid student` the resize disappears and the target is the teacher map averaged onto the student's
tokens; with `native` (the paper's choice) the student map is upsampled to the teacher grid instead. The
two are different objectives, hence different fingerprints.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F

from sak.pipeline.base.errors import SakError
from sak.pipeline.teachers.specs import TeacherSpec


def resample(feats: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
    """(n, H, W, C) -> (n, h, w, C) float32 on `grid` (see the module docstring); identity when equal."""
    if tuple(feats.shape[1:3]) == tuple(grid):
        return feats
    x = feats.float().permute(0, 3, 1, 2)  # (n, C, H, W), a view
    y = F.interpolate(x, size=tuple(grid), mode="bilinear", align_corners=False, antialias=True)
    return y.permute(0, 2, 3, 1).contiguous()  # (n, h, w, C)


def shape_targets(
    spec: TeacherSpec, maps: Sequence[torch.Tensor], blocks: Sequence[int], grid: tuple[int, int]
) -> dict[int, torch.Tensor]:
    """Teacher output (one (n, H, W, C) map per tap in `spec.levels`, or per kept block) -> {block:
    (n, h, w, C)} of the kept blocks on the store grid: what `write_shard` takes."""
    if len(maps) == len(spec.levels):
        by_block = dict(zip(spec.levels, maps))
    elif len(maps) == len(blocks):
        by_block = dict(zip(blocks, maps))
    else:
        raise SakError(
            f"{spec.name}: got {len(maps)} maps for taps {list(spec.levels)} / kept blocks {list(blocks)}"
        )
    return {b: resample(by_block[b], grid) for b in blocks}
