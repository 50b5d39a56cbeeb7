"""Target shape options: level subsets are validated against each teacher's taps, grids resolve and
resample as documented, and the fingerprint fields of the default shape do not change."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from sak.pipeline.base.errors import SakError
from sak.pipeline.store.resample import resample, shape_targets
from sak.pipeline.store.targets import GridChoice, parse_grid, select_levels, target_shape
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


def test_grids_parse_once_and_resolve_per_teacher():
    dino, sam = get_teacher("dinov2_l"), get_teacher("sam_l")
    assert parse_grid("native").resolve(dino, 384) == (27, 27) and parse_grid(None) == GridChoice("native")
    assert parse_grid("native").resolve(sam, 384) == (64, 64)
    assert parse_grid("student").resolve(sam, 384) == (24, 24)
    explicit = parse_grid(" 16X20 ")
    assert explicit == GridChoice("explicit", (16, 20)) and str(explicit) == "16x20"  # prints as written
    assert explicit.resolve(dino, 384) == (16, 20)
    for bad in ("huge", "0x4", "24"):
        with pytest.raises(SakError, match="--grid"):
            parse_grid(bad)
    with pytest.raises(SakError, match="divisible by the student patch 16"):
        parse_grid("student").resolve(dino, 100)


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


def test_shape_targets_and_the_target_shape_fingerprint_fields():
    spec = get_teacher("dinov2_tiny")  # taps 0..3
    maps = [torch.full((2, 4, 4, 64), float(i)) for i in range(4)]
    out = shape_targets(spec, maps, select_levels(spec, "1,3"), (2, 2))
    assert sorted(out) == [1, 3] and out[3].shape == (2, 2, 2, 64) and float(out[3].mean()) == 3.0
    # the defaults add no grid_mode / resample to the identity (fingerprints of existing stores unchanged)
    native = target_shape(get_teacher("sam_l"), 384, None, parse_grid("native"))
    assert (native.blocks, native.grid, native.grid_mode, native.resample) == (
        (5, 11, 17, 23),
        (64, 64),
        None,
        None,
    )
    student = target_shape(get_teacher("sam_l"), 384, "-1", parse_grid("student"))
    assert (student.blocks, student.grid, student.grid_mode) == ((23,), (24, 24), "student")
    assert student.resampled and "antialias" in student.resample
    same = target_shape(get_teacher("clip_b"), 384, None, parse_grid("student"))  # 24x24 is clip_b's own
    assert same.grid_mode == "student" and same.resample is None and not same.resampled
    assert student.grids(1024) == {23: (24, 24, 1024)}


def test_codec_and_grid_are_resolved_once_where_the_config_is_made():
    """`--codec` and `--grid` become a Codec and a GridChoice at the config boundary (the CLI's parse, or
    a script's names resolved by the config itself) and travel whole; the manifest records their names."""
    from sak.cli.cache import RUN_OPTIONS
    from sak.pipeline.extraction.config import ExtractConfig
    from sak.pipeline.store.codecs import Codec, get_codec

    by_name = ExtractConfig(
        views_per_image=2, source=None, out="x", teachers=("dinov2_tiny",), codec="int8", grid="16X16"
    )
    assert isinstance(by_name.codec, Codec) and by_name.codec is get_codec(
        "int8_tc"
    )  # --codec int8 means int8_tc
    assert by_name.grid == GridChoice("explicit", (16, 16))
    opts = {"out": "x", "teachers": "dinov2_tiny", "codec": "pca8-fp8", "grid": "student"}
    parsed = RUN_OPTIONS.build(ExtractConfig, opts)
    assert parsed.codec == get_codec("pca8-fp8") and parsed.codec.rank == 8 and parsed.grid.mode == "student"
    assert ExtractConfig(
        views_per_image=2, source=None, out="x", teachers=("dinov2_tiny",)
    ).codec is get_codec("fp16")
    with pytest.raises(SakError, match=r"unknown codec 'int4'; known codecs: bf16, .*, pca<k>, pca<k>-fp8"):
        ExtractConfig(views_per_image=2, source=None, out="x", teachers=("dinov2_tiny",), codec="int4")
