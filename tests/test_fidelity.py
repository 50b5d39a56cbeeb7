"""Fidelity measured at extraction (store/fidelity.py): a lossy store records, per level, how its stored targets
compare with the float32 values before encoding; `inspect` shows it, `run` warns under 0.99; an fp16 store
refuses a value it cannot hold, at extraction, in one line naming teacher, level and the alternatives."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch

from sak.pipeline.base.errors import SakError
from sak.pipeline.format.documents import read_cache, read_store_manifest
from sak.pipeline.inspection.describe import describe_cache, store_fidelity_warnings
from sak.pipeline.store.codecs import get_codec, outlier_features, refuse_overflow
from sak.pipeline.store.fidelity import compare, fidelity_warnings, measure_levels
from sak.pipeline.store.resample import resample


def test_compare_is_exact_for_identical_maps_and_sees_a_coarse_grid():
    x = outlier_features(2, 8, 8, 64, seed=0)
    same = compare(3, x, x.clone(), "codec")
    assert same.cos_p1 == pytest.approx(1.0) and same.rel_l2 == 0.0 and same.std_cos_p1 == pytest.approx(1.0)
    assert same.tokens == 2 * 8 * 8
    coarse = compare(3, x, resample(x, (2, 2)), "grid")  # brought back to 8x8 before comparing
    assert coarse.cos_p1 < 0.99 and coarse.std_rel_l2 > 0.3


def test_measure_levels_names_what_was_lossy():
    x = outlier_features(2, 8, 8, 64, seed=1)
    int8 = measure_levels(get_codec("int8"), {5: x}, {5: x})
    assert int8[0].compared == "codec" and 0.99 < int8[0].cos_p1 < 1.0
    grid = measure_levels(get_codec("fp16"), {5: x}, {5: resample(x, (4, 4))})
    assert grid[0].compared == "grid"
    both = measure_levels(get_codec("fp8"), {5: x}, {5: resample(x, (4, 4))})
    assert both[0].compared == "codec+grid" and both[0].cos_mean < grid[0].cos_mean + 1e-3


def test_a_lossy_store_records_fidelity_per_level_and_inspect_shows_it(tiny_caches):
    out = tiny_caches.get("int8")
    cache = read_cache(out)
    for entry in cache.stores.values():
        m = read_store_manifest(out / entry.path)
        assert [f.block for f in m.fidelity] == [lv.block for lv in m.levels]
        for f in m.fidelity:
            assert f.compared == "codec" and f.tokens >= 4 * m.levels[0].shape[1] * m.levels[0].shape[2]
            assert 0.9 < f.cos_p1 <= f.cos_mean <= 1.0 and 0.0 < f.rel_l2 < 0.1
            assert f.std_cos_p1 <= f.std_cos_mean <= 1.0
    text = describe_cache(out)
    assert text.count("fidelity L") == sum(
        len(read_store_manifest(out / e.path).levels) for e in cache.stores.values()
    )
    exact = tiny_caches.get()  # fp16, native grid: nothing lossy, nothing recorded
    for entry in read_cache(exact).stores.values():
        assert read_store_manifest(exact / entry.path).fidelity is None
    assert "fidelity" not in describe_cache(exact) and store_fidelity_warnings(exact) == []


def test_run_warns_under_0_99_naming_teacher_level_and_fix(tiny_caches):
    out = tiny_caches.get("int8")
    entry = next(iter(read_cache(out).stores.values()))
    m = read_store_manifest(out / entry.path)
    low = dataclasses.replace(m.fidelity[0], std_cos_p1=0.95)
    lines = fidelity_warnings("dinov2_tiny", dataclasses.replace(m, fidelity=[low, *m.fidelity[1:]]))
    assert len(lines) == 1 and f"level {low.block}" in lines[0] and "0.9500" in lines[0]
    assert "int8_tc" in lines[0] and "dinov2_tiny" in lines[0]


def test_fp16_store_refuses_overflow_in_one_line():
    x = torch.ones(1, 2, 2, 8)
    refuse_overflow(get_codec("fp16"), x * 65504, "clip_l", 11)  # the largest finite value fits
    refuse_overflow(get_codec("bf16"), x * 1e6, "clip_l", 11)  # bf16 has float32's range
    with pytest.raises(SakError, match=r"teacher clip_l level 11: .*1e\+06.*--codec bf16.*--codec fp8") as e:
        refuse_overflow(get_codec("fp16"), x * 1e6, "clip_l", 11)
    assert "\n" not in str(e.value)
    with pytest.raises(SakError, match="does not fit float16"):
        refuse_overflow(get_codec("fp16"), x * float("inf"), "clip_l", 11)


@pytest.mark.slow  # ~25-70 s: its own tiny extraction, then 2 steps
def test_stage1_trains_from_an_int8_tc_store(tiny_caches, tmp_path):
    """The robust codec goes through the loader's existing codec interface (to_torch / decode_torch)."""
    from sak.student.train.stage1 import train_stage1
    from sak.student.train.stage1_config import Stage1Config

    cache = tiny_caches.get("int8_tc", views_per_image=1, teachers=("dinov2_tiny",))
    m = read_store_manifest(cache / next(iter(read_cache(cache).stores.values())).path)
    assert m.codec == "int8_tc" and m.codec_spec.scales.granularity == "token_channel" and m.fidelity
    res = train_stage1(
        Stage1Config.debug(str(cache), str(tmp_path / "run"), steps=2, batch_size=2, eval_every=0)
    )
    assert len(res.losses) == 2 and all(np.isfinite(res.losses))


def test_run_warns_only_for_the_stores_it_touched(tiny_caches, monkeypatch):
    """A run that adds clip_tiny does not re-print the warnings of dinov2_tiny's or sam_tiny's stores."""
    import sak.pipeline.inspection.describe as describe

    out = tiny_caches.get("int8")
    monkeypatch.setattr(describe, "fidelity_warnings", lambda teacher, manifest: [f"low {teacher}"])
    assert describe.store_fidelity_warnings(out, ("clip_tiny",), "int8_tc") == ["low clip_tiny"]
    assert describe.store_fidelity_warnings(out, ("clip_tiny",), "fp16") == []
    assert len(describe.store_fidelity_warnings(out)) == 3
