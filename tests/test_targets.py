"""Target shape options: level subsets are validated against each teacher's taps, grids resolve and
resample as documented, and the fingerprint fields of the default shape do not change."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from sak.pipeline.base.errors import SakError
from sak.pipeline.store.resample import resample, shape_targets
from sak.pipeline.store.targets import identity_fields, resolve_grid, select_levels
from sak.pipeline.teachers.specs import get_teacher


def test_levels_are_tap_positions_valid_for_every_depth():
    assert select_levels(get_teacher("dinov2_l"), "all") == (5, 11, 17, 23)
    assert select_levels(get_teacher("dinov2_l"), "1,3") == (11, 23)
    assert select_levels(get_teacher("dinov2_b"), "1,3") == (5, 11)
    assert select_levels(get_teacher("sam_l"), "-1") == (23,)
    assert select_levels(get_teacher("clip_b"), [3, 0]) == (2, 11)  # sorted, shallowest first
    with pytest.raises(SakError, match=r"taps blocks \[5, 11, 17, 23\]"):
        select_levels(get_teacher("clip_l"), "4")
    with pytest.raises(SakError, match="twice"):
        select_levels(get_teacher("clip_l"), "3,-1")
    with pytest.raises(SakError, match="tap positions"):
        select_levels(get_teacher("clip_l"), "11,b23")


def test_grids_resolve():
    dino, sam = get_teacher("dinov2_l"), get_teacher("sam_l")
    assert resolve_grid(dino, 384, "native") == (27, 27)
    assert resolve_grid(sam, 384, "native") == (64, 64)
    assert resolve_grid(sam, 384, "student") == (24, 24)
    assert resolve_grid(dino, 384, "16X20") == (16, 20)
    for bad in ("huge", "0x4", "24"):
        with pytest.raises(SakError, match="--grid"):
            resolve_grid(dino, 384, bad)


def test_shrinking_averages_every_teacher_token():
    """64 -> 16 (SAM to a 16 px student grid at 256): antialiased bilinear equals 4x4 area averaging up to
    the triangle filter's overlap, and unlike plain bilinear it sees every source token."""
    x = torch.randn(2, 64, 64, 8)
    y = resample(x, (16, 16))
    assert y.shape == (2, 16, 16, 8)
    area = F.avg_pool2d(x.permute(0, 3, 1, 2), 4).permute(0, 2, 3, 1)
    plain = F.interpolate(x.permute(0, 3, 1, 2), size=(16, 16), mode="bilinear").permute(0, 2, 3, 1)
    err_aa, err_plain = (y - area).norm() / area.norm(), (plain - area).norm() / area.norm()
    assert err_aa < 0.5 * err_plain, (err_aa, err_plain)
    const = torch.full((1, 27, 27, 4), 3.0)
    torch.testing.assert_close(resample(const, (24, 24)), torch.full((1, 24, 24, 4), 3.0))  # mean kept
    assert resample(x, (64, 64)) is x


def test_shape_targets_and_identity_fields():
    spec = get_teacher("dinov2_tiny")  # taps 0..3
    maps = [torch.full((2, 4, 4, 64), float(i)) for i in range(4)]
    out = shape_targets(spec, maps, select_levels(spec, "1,3"), (2, 2))
    assert sorted(out) == [1, 3] and out[3].shape == (2, 2, 2, 64) and float(out[3].mean()) == 3.0
    # defaults give exactly the identity fields the extraction writes today (fingerprints unchanged)
    assert identity_fields(get_teacher("sam_l"), 384, None, None) == {
        "levels": [5, 11, 17, 23],
        "grid": [64, 64],
    }
    f = identity_fields(get_teacher("sam_l"), 384, "-1", "student")
    assert (
        f["levels"] == [23]
        and f["grid"] == [24, 24]
        and f["grid_mode"] == "student"
        and "antialias" in f["resample"]
    )
