"""`sak-cache estimate`: MACs counted from the architecture agree with torch's FLOP counter and with
the published per-view figures, bytes agree with what a real extraction writes, and the CLI prints the table."""

from __future__ import annotations

import json
import math

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from sak.cli.cache import main as cache_main
from sak.pipeline.base.errors import SakError
from sak.pipeline.inspection.estimate import (
    EstimateConfig,
    estimate,
    estimate_to_dict,
    format_estimate,
    measured_store_bytes,
    stored_bytes_per_view,
    teacher_macs,
)
from sak.pipeline.store.codecs import codec_option, get_codec
from sak.pipeline.store.targets import select_levels
from sak.pipeline.teachers.forward import load_teacher
from sak.pipeline.teachers.specs import get_teacher
from sak.pipeline.teachers.weights import WeightsChoice, build_model

SIZE = 64


def _sdpa_shapes_only(calls: list[float]):
    """A stand-in for F.scaled_dot_product_attention that records the op's MACs from its operand
    shapes (QK^T: B.H.Nq.Nk.D, then AV: B.H.Nq.Nk.Dv) and returns an output of the right shape without
    computing anything, so the FLOP counter never sees the attention op."""

    def sdpa(q, k, v, *args, **kwargs):
        *batch, nq, d = q.shape
        nk, dv = k.shape[-2], v.shape[-1]
        calls.append(float(math.prod(batch) * nq * nk * (d + dv)))
        return q.new_zeros((*batch, nq, dv))

    return sdpa


@pytest.mark.parametrize("name", ["dinov2_tiny", "clip_tiny", "sam_tiny"])
def test_macs_equal_an_independent_count(name, monkeypatch):
    """Same architecture code path as extraction (timm forward_intermediates, stop_early): exact count,
    including SAM's windowed blocks, their padding and the decomposed relative positions.

    Why not compare the total with torch's FlopCounterMode directly: how it counts
    `scaled_dot_product_attention` changes between torch releases (the fused CPU kernels gained and
    changed their FLOP formulas), so an exact comparison would fail on some versions the lower bounds
    allow. Attention is counted here from the operand shapes of every attention call, and
    FlopCounterMode counts only the rest (linears, convolutions and SAM's relative-position einsums),
    which it counts as plain matmuls the same way on every release."""
    sdpa_macs: list[float] = []
    monkeypatch.setattr(torch.nn.functional, "scaled_dot_product_attention", _sdpa_shapes_only(sdpa_macs))
    spec = get_teacher(name)
    model = build_model(spec, WeightsChoice("random"), SIZE)
    side = spec.model_input_side(SIZE)
    with FlopCounterMode(display=False) as counter:
        model.forward_intermediates(
            torch.zeros(1, 3, side, side),
            indices=list(spec.levels),
            norm=False,
            stop_early=True,
            intermediates_only=True,
        )
    assert sdpa_macs, "timm did not call scaled_dot_product_attention: the count would miss attention"
    counted = counter.get_total_flops() / 2 + sum(sdpa_macs)
    linear, attention = teacher_macs(spec, SIZE)
    assert linear + attention == pytest.approx(counted, rel=1e-9)
    if spec.family != "sam":  # no relative positions: the split itself is exact
        assert attention == pytest.approx(sum(sdpa_macs), rel=1e-9)


def test_macs_match_published_figures():
    """The published figures count patch embed + linear layers (221G, 221G, 1308G); attention adds 12-14%."""
    for name, design in (("dinov2_l", 221e9), ("clip_l", 221e9), ("sam_l", 1308e9)):
        linear, attention = teacher_macs(get_teacher(name), 384)
        assert linear == pytest.approx(design, rel=0.01), name
        assert 0.10 < attention / linear < 0.15, name
    linear, attention = teacher_macs(get_teacher("dinov2_l"), 384, blocks_run=12)  # --levels 0,1: stop early
    assert linear + attention < 0.51 * sum(teacher_macs(get_teacher("dinov2_l"), 384))


def test_bytes_per_view_from_grids_levels_and_codec():
    # ~45 MB per view raw fp16 at native grids, SAM alone ~33 MB
    est = estimate(
        EstimateConfig(("dinov2_l", "clip_l", "sam_l"), images=10, views_per_image=1, compression=1.0)
    )
    raw = {t.name: t.raw_bytes_per_view for t in est.teachers}
    assert raw["sam_l"] == 4 * 64 * 64 * 1024 * 2 and raw["dinov2_l"] == 4 * 27 * 27 * 1024 * 2
    assert 44e6 < sum(raw.values()) < 46e6
    raw8, _ = stored_bytes_per_view(24, 24, 1024, 2, get_codec("int8"), 1.0, "zarr")
    assert raw8 == 2 * 24 * 24 * (1024 + 2 * 1024 // 32)  # values + one fp16 scale per 32 channels
    small = estimate(EstimateConfig(("sam_l",), images=10, grid="student", levels="-1", codec="int8"))
    assert small.teachers[0].grid == (24, 24) and small.teachers[0].blocks == (23,)
    assert small.target_bytes_per_view < est.target_bytes_per_view / 50


def test_estimate_is_within_10_percent_of_a_real_run(tiny_caches, photo_dir):
    teachers = ("dinov2_tiny", "sam_tiny")
    for codec in ("fp16", "int8"):
        out = tiny_caches.get(codec)  # the session's shared caches: 6 images x 2 views at 64 px
        meta = json.loads((out / "cache.json").read_text())
        est = estimate(
            EstimateConfig(teachers, size=SIZE, views_per_image=2, codec=codec, source=str(photo_dir))
        )
        assert est.num_views == meta["num_views"] == 12
        for t in est.teachers:
            store = next(
                out / e["path"]
                for e in meta["stores"].values()
                if e["teacher"] == t.name and e["codec"] == codec_option(codec).name
            )
            written = measured_store_bytes(store)
            predicted = t.bytes_per_view * est.num_views
            assert abs(predicted / written - 1) < 0.10, (codec, t.name, predicted, written)


def test_cli_prints_the_table(capsys, tmp_path):
    argv = [
        "estimate",
        "--teachers",
        "dinov2_l,clip_l,sam_l",
        "--images",
        "1281167",
        "--views-per-image",
        "1",
    ]
    assert cache_main([*argv, "--json", str(tmp_path / "e.json")]) == 0
    text = capsys.readouterr().out
    for word in ("dinov2_l", "sam_l", "GPU-h", "TB", "samples/s"):
        assert word in text
    data = json.loads((tmp_path / "e.json").read_text())
    assert data["num_views"] == 1281167 and 40e12 < data["target_bytes"] < 70e12
    assert cache_main([*argv, "--gpu", "tpu9"]) == 2
    assert "known: a10, a100" in capsys.readouterr().err
    assert cache_main(["estimate", "--teachers", "clip_l"]) == 2  # neither --source nor --images


@pytest.mark.parametrize("name", ["dinov2_tiny", "clip_tiny", "sam_tiny"])
def test_levels_stop_the_teacher_early_and_estimate_bills_the_same(name, monkeypatch):
    """`--levels 1` keeps the second tap only: forward_levels runs the blocks up to it and no further
    (counted with forward hooks on the real timm blocks, and in MACs with the same counter as above),
    its map is the full run's map of that block, and `estimate` bills exactly the blocks and MACs run."""
    spec = get_teacher(name)
    teacher = load_teacher(spec, WeightsChoice("random", seed=0), SIZE)
    ran: list[int] = []
    for i, block in enumerate(teacher.model.blocks):
        block.register_forward_hook(lambda _m, _i, _o, i=i: ran.append(i))
    h, w = teacher.input_hw
    views = torch.randint(0, 256, (1, 3, h, w), dtype=torch.uint8)

    def run(blocks):
        ran.clear()
        sdpa_macs: list[float] = []
        with monkeypatch.context() as m:
            m.setattr(torch.nn.functional, "scaled_dot_product_attention", _sdpa_shapes_only(sdpa_macs))
            with FlopCounterMode(display=False) as counter:
                maps = teacher.forward_levels(views, blocks)
        return maps, list(ran), counter.get_total_flops() / 2 + sum(sdpa_macs)

    full_maps, full_ran, full_macs = run(None)
    kept = select_levels(spec, "1")
    kept_maps, kept_ran, kept_macs = run(kept)
    assert full_ran == list(range(spec.depth))
    assert kept_ran == list(range(kept[-1] + 1)) and len(kept_ran) < spec.depth
    assert len(kept_maps) == 1
    torch.testing.assert_close(kept_maps[0], full_maps[1])  # the same block, only the deeper ones skipped

    cfg = EstimateConfig(teachers=(name,), size=SIZE, levels="1", images=1)
    (est,) = estimate(cfg).teachers
    assert est.blocks_run == len(kept_ran)
    assert est.macs == pytest.approx(kept_macs, rel=1e-9)
    assert sum(teacher_macs(spec, SIZE)) == pytest.approx(full_macs, rel=1e-9)
    assert kept_macs < 0.75 * full_macs


def test_cache_or_online_and_what_a_node_can_feed():
    base = dict(teachers=("dinov2_l", "clip_l", "sam_l"), images=1000, views_per_image=2)
    est = estimate(EstimateConfig(**base))
    assert est.online_gpu_hours_per_epoch() == pytest.approx(est.gpu_hours() / 2)
    assert est.break_even_epochs == pytest.approx(2.0)  # K views once vs one view per image per epoch
    fed = est.samples_per_s_fed()
    assert fed["storage"] == pytest.approx(10e9 / est.read_bytes_per_sample)
    assert fed["fed"] == min(fed["storage"], fed["cpu"])
    raw = estimate(EstimateConfig(**base, student_views="raw", cores=24, read_gbps=40.0))
    assert raw.loader_ms_per_sample < est.loader_ms_per_sample  # no JPEG decode in the loader
    assert (
        raw.samples_per_s_fed()["cpu"] > 2 * fed["cpu"]
        and raw.samples_per_s_fed()["storage"] > fed["storage"]
    )
    zstd = estimate(EstimateConfig(**base, compressor="zstd"))
    assert zstd.compression > 1.0 == est.compression and zstd.loader_ms_per_sample > est.loader_ms_per_sample
    with pytest.raises(SakError, match="unknown --compressor 'gzip'"):
        estimate(EstimateConfig(**base, compressor="gzip"))


def test_estimate_states_the_host_memory_per_actor_and_it_is_near_a_measured_peak(tiny_caches):
    """The actor memory model (estimate.py ACTOR_MEMORY_MODEL) by part, in the table and the JSON, within a
    factor 1.5 of the peak the session's real tiny extraction recorded in its manifests."""
    from sak.pipeline.format.documents import read_cache, read_store_manifest

    out = tiny_caches.get("fp16")
    peaks = [
        read_store_manifest(out / e.path).throughput.actor_peak_rss_bytes
        for e in read_cache(out).stores.values()
    ]
    cfg = EstimateConfig(
        ("dinov2_tiny", "clip_tiny", "sam_tiny"), images=6, size=64, views_per_image=2, shard_size=4
    )
    est = estimate(cfg)
    memory = estimate_to_dict(est)["actor_host_memory_bytes"]
    assert memory["total"] == sum(v for k, v in memory.items() if not k.endswith("total"))
    assert (
        memory["targets"] == 2 * 4 * sum(4 * 4 * 4 * 4 * 64 for _ in range(2)) + 2 * 4 * 4 * 16 * 16 * 64 * 4
    )
    assert all(p is not None for p in peaks) and 1 / 1.5 < memory["total"] / max(peaks) < 1.5
    assert "host memory      ~" in format_estimate(est) and "per teacher actor" in format_estimate(est)
    big = estimate(EstimateConfig(("dinov2_b", "sam_b"), images=12, size=384, shard_size=4, batch_size=4))
    assert 1 / 1.3 < big.actor_host_memory()["cpu_only_total"] / 9.4e9 < 1.3  # measured: 9.4 GB on a CPU
