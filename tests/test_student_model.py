"""Student model: registry, shapes, the TSAP recurrence, stem isolation, init, aligners, param counts."""

from __future__ import annotations

import sys
import types

import pytest
import torch
import torch.nn.functional as F

from sak.pipeline.base.errors import SakError
from sak.student.model import student as model_mod
from sak.student.model.config import StudentConfig, TeacherTarget
from sak.student.model.registry import (
    STUDENTS,
    StudentArch,
    create_student,
    get_student_arch,
    list_students,
    student_normalization,
)
from sak.student.model.student import SakStudent, adapter_forward, tap_levels

TINY_TEACHERS = [
    TeacherTarget("dinov2_tiny", 64),
    TeacherTarget("clip_tiny", 96),
    TeacherTarget("sam_tiny", 48),
]


def _tiny(img_size: int = 64, teachers=TINY_TEACHERS, seed: int = 0) -> SakStudent:
    torch.manual_seed(seed)
    return create_student("tiny", teachers, img_size=img_size).eval()


def _randomize_adapters(model: SakStudent, seed: int = 1) -> None:
    # init has up-projections of std 0.02 and scale 1; make every adapter clearly non-trivial
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for path in model.adapter_paths.values():
            for a in path:
                for p in (a.down.weight, a.down.bias, a.up.weight, a.up.bias):
                    p.copy_(torch.randn(p.shape, generator=g) * 0.3)
                a.scale.fill_(float(torch.rand((), generator=g)) + 0.5)
        for norms in model.level_norms.values():
            for ln in norms.values():
                ln.weight.copy_(torch.randn(ln.weight.shape, generator=g))
                ln.bias.copy_(torch.randn(ln.bias.shape, generator=g))


# ---------------------------------------------------------------------------------------------- registry


def test_registry_lists_all_students_and_rejects_unknown():
    assert set(list_students()) >= {"vit_s", "vit_b", "vit_l", "tiny"}
    assert get_student_arch("vit_b").timm_name == "vit_base_patch16_384"
    with pytest.raises(SakError, match="known students: .*tiny.*vit_b"):
        get_student_arch("vit_xxl")


def test_register_student_twice_is_refused():
    with pytest.raises(ValueError, match="twice"):
        STUDENTS.add("tiny", StudentArch("sak", "vit_small_patch16_384"))


def test_tap_levels():
    assert tap_levels(12) == [2, 5, 8, 11]
    assert tap_levels(24) == [5, 11, 17, 23]
    assert tap_levels(4) == [0, 1, 2, 3]
    with pytest.raises(SakError, match="multiple of 4"):
        tap_levels(10)


def test_tiny_has_no_pretrained_weights_and_bad_teachers_are_refused():
    with pytest.raises(SakError, match="no pretrained"):
        create_student("tiny", TINY_TEACHERS, pretrained=True)
    with pytest.raises(SakError, match="unique"):
        create_student("tiny", [TeacherTarget("a", 64), TeacherTarget("a", 64)], img_size=32)
    with pytest.raises(SakError, match="at least one teacher"):
        create_student("tiny", [], img_size=32)
    with pytest.raises(SakError, match="dot"):
        create_student("tiny", [TeacherTarget("a.b", 64)], img_size=32)


def test_normalization_comes_from_timm_pretrained_cfg():
    m = _tiny(img_size=32)
    assert (m.input_mean, m.input_std) == student_normalization("tiny")
    mean, std = student_normalization("vit_b")
    assert len(mean) == 3 and len(std) == 3 and all(s > 0 for s in std)


def test_config_round_trip():
    cfg = StudentConfig("tiny", tuple(TINY_TEACHERS), img_size=64)
    assert StudentConfig.from_dict(cfg.to_dict()) == cfg
    with pytest.raises(SakError, match="unknown fields"):
        StudentConfig.from_dict({**cfg.to_dict(), "router_depth": 2})


# ---------------------------------------------------------------------------------------------- shapes


@pytest.mark.parametrize(
    "name,img_size,dim,depth",
    [("tiny", 64, 64, 4), ("vit_s", 32, 384, 12), ("vit_b", 32, 768, 12)],
)
def test_shapes_random_weights(name, img_size, dim, depth):
    teachers = [TeacherTarget("t_same", dim), TeacherTarget("t_wide", 1024 if dim != 1024 else 768)]
    torch.manual_seed(0)
    m = create_student(name, teachers, img_size=img_size).eval()
    grid = img_size // 16
    assert m.levels == tap_levels(depth)
    with torch.no_grad():
        out = m(torch.randn(2, 3, img_size, img_size))
    assert [tuple(x.shape) for x in out.features.stem_levels] == [(2, dim, grid, grid)] * 4
    for t in teachers:
        assert [tuple(x.shape) for x in out.features.teacher_levels[t.name]] == [(2, dim, grid, grid)] * 4
        assert [tuple(x.shape) for x in out.distill_maps[t.name]] == [(2, t.dim, grid, grid)] * 4
    assert list(out.distill_maps) == [t.name for t in teachers]


def test_vit_l_shapes_on_meta_device():
    # the full-size 384 graph without allocating 344M parameters
    teachers = [TeacherTarget("dinov2_l", 1024), TeacherTarget("clip_b", 768)]
    with torch.device("meta"):
        m = create_student("vit_l", teachers)
        out = m(torch.randn(2, 3, 384, 384))
    assert m.levels == [5, 11, 17, 23]
    assert [tuple(x.shape) for x in out.features.stem_levels] == [(2, 1024, 24, 24)] * 4
    assert [tuple(x.shape) for x in out.distill_maps["dinov2_l"]] == [(2, 1024, 24, 24)] * 4
    assert [tuple(x.shape) for x in out.distill_maps["clip_b"]] == [(2, 768, 24, 24)] * 4


@pytest.mark.slow
def test_vit_l_real_weights_small_input():
    torch.manual_seed(0)
    teachers = [TeacherTarget(t, 1024) for t in ("dinov2_l", "clip_l", "sam_l")]
    m = create_student("vit_l", teachers, img_size=32).eval()
    with torch.no_grad():
        out = m(torch.randn(1, 3, 32, 32))
    assert [tuple(x.shape) for x in out.distill_maps["sam_l"]] == [(1, 1024, 2, 2)] * 4
    assert all(torch.isfinite(x).all() for maps in out.distill_maps.values() for x in maps)
    assert len(m.aligners) == 0


def test_experts_order_stem_first_then_teachers():
    m = _tiny()
    with torch.no_grad():
        feats = m.forward_features(torch.randn(1, 3, 64, 64))
    experts = feats.experts(2)
    assert len(experts) == 1 + len(TINY_TEACHERS)
    assert experts[0] is feats.stem_levels[2]
    assert [e is feats.teacher_levels[t.name][2] for e, t in zip(experts[1:], TINY_TEACHERS)] == [True] * 3


def test_dynamic_img_size_accepts_other_inputs():
    torch.manual_seed(0)
    m = create_student("tiny", TINY_TEACHERS, img_size=64, dynamic_img_size=True).eval()
    with torch.no_grad():
        out = m(torch.randn(1, 3, 48, 80))
    assert tuple(out.distill_maps["clip_tiny"][0].shape) == (1, 96, 3, 5)


# ---------------------------------------------------------------------------------------------- the method


def _hand_tsap(model: SakStudent, x: torch.Tensor) -> dict[str, list[torch.Tensor]]:
    """Paper eq. 1-3 written out with plain tensor math, independent of adapter_forward."""
    stem = model.stem
    z = stem.norm_pre(stem.patch_drop(stem._pos_embed(stem.patch_embed(x))))
    zs = [z]
    for blk in stem.blocks:
        zs.append(blk(zs[-1]))
    out = {}
    for name, path in model.adapter_paths.items():

        def a(u, ad):
            h = u @ ad.down.weight.T + ad.down.bias
            h = 0.5 * h * (1.0 + torch.erf(h / 2**0.5))  # exact GELU
            return u + ad.scale * (h @ ad.up.weight.T + ad.up.bias)

        r = [a(zs[0], path[0])]
        for k in range(1, len(zs)):
            r.append(a(r[k - 1] + zs[k], path[k]))  # Rk = ak(R(k-1) + Zk)
        maps = []
        for b in model.levels:  # block index b is the output Z(b+1), R(b+1)
            tokens = r[b + 1][:, 1:]
            ln = model.level_norms[name][str(b)]
            y = F.layer_norm(tokens, (tokens.shape[-1],), ln.weight, ln.bias, eps=1e-5)
            B, N, C = y.shape
            s = int(N**0.5)
            maps.append(y.reshape(B, s, s, C).permute(0, 3, 1, 2))
        out[name] = maps
    return out


def test_tsap_recurrence_matches_hand_loop():
    m = _tiny()
    _randomize_adapters(m)
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        feats = m.forward_features(x)
        want = _hand_tsap(m, x)
    for name in m.teacher_names:
        for got, ref in zip(feats.teacher_levels[name], want[name]):
            torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-5)
    # paths differ from each other and from the stem, so the test is not vacuous
    assert not torch.allclose(feats.teacher_levels["dinov2_tiny"][3], feats.teacher_levels["clip_tiny"][3])


def test_stem_stream_untouched_by_adapters():
    m = _tiny()
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        plain = m.stem.forward_intermediates(
            x, indices=m.levels, norm=False, intermediates_only=True, output_fmt="NCHW"
        )
        before = m.forward_features(x).stem_levels
        _randomize_adapters(m, seed=5)
        after = m.forward_features(x).stem_levels
    for p, b, a in zip(plain, before, after):
        torch.testing.assert_close(b, p, rtol=0, atol=0)
        torch.testing.assert_close(a, p, rtol=0, atol=0)


def test_adapter_init_values():
    torch.manual_seed(0)
    m = create_student("vit_s", [TeacherTarget("t", 384)], img_size=32)
    path = m.adapter_paths["t"]
    assert len(path) == 12 + 1
    for a in path:
        assert a.scale.shape == (1,) and a.scale.item() == 1.0
        assert a.down.weight.shape == (96, 384) and a.up.weight.shape == (384, 96)
        assert torch.count_nonzero(a.down.bias) == 0 and torch.count_nonzero(a.up.bias) == 0
    w = torch.cat([torch.cat([a.down.weight.flatten(), a.up.weight.flatten()]) for a in path])
    assert abs(w.std().item() - 0.02) < 0.001 and abs(w.mean().item()) < 0.001
    for norms in m.level_norms.values():
        for ln in norms.values():
            assert ln.eps == 1e-5
            assert torch.all(ln.weight == 1) and torch.all(ln.bias == 0)


def test_adapter_forward_math():
    torch.manual_seed(0)
    down, up = torch.nn.Linear(8, 2), torch.nn.Linear(2, 8)
    scale = torch.tensor([0.7])
    x, z = torch.randn(3, 5, 8), torch.randn(3, 5, 8)
    u = x + z
    want = u + 0.7 * up(F.gelu(down(u), approximate="none"))
    torch.testing.assert_close(adapter_forward(x, down, up, scale, z), want)
    torch.testing.assert_close(adapter_forward(u, down, up, scale), want)


def test_aligner_only_where_widths_differ():
    m = _tiny()
    assert set(m.aligners) == {"clip_tiny", "sam_tiny"}
    assert set(m.aligners["clip_tiny"]) == {"0", "1", "2", "3"}
    assert m.aligners["clip_tiny"]["2"].weight.shape == (96, 64)
    assert m.aligners["sam_tiny"]["0"].weight.shape == (48, 64)
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        out = m(x)
    # no aligner: the distillation map is the expert map itself
    for d, e in zip(out.distill_maps["dinov2_tiny"], out.features.teacher_levels["dinov2_tiny"]):
        assert d is e
    lin = m.aligners["clip_tiny"]["1"]
    want = torch.einsum("bchw,dc->bdhw", out.features.teacher_levels["clip_tiny"][1], lin.weight)
    torch.testing.assert_close(out.distill_maps["clip_tiny"][1], want + lin.bias[None, :, None, None])


def test_every_parameter_gets_a_gradient():
    # DDP without find_unused_parameters needs this; it would catch an unused final norm or head
    m = _tiny().train()
    out = m(torch.randn(2, 3, 64, 64))
    loss = sum(x.float().square().mean() for maps in out.distill_maps.values() for x in maps)
    loss.backward()
    no_grad = [n for n, p in m.named_parameters() if p.grad is None]
    assert no_grad == []


def test_grad_checkpointing_same_result():
    m = _tiny().train()
    _randomize_adapters(m)
    x = torch.randn(2, 3, 64, 64)
    ref = m(x).distill_maps["clip_tiny"][3].sum()
    ref.backward()
    g_ref = m.stem.blocks[0].attn.qkv.weight.grad.clone()
    m.zero_grad()
    m.set_grad_checkpointing(True)
    got = m(x).distill_maps["clip_tiny"][3].sum()
    got.backward()
    torch.testing.assert_close(got, ref)
    torch.testing.assert_close(m.stem.blocks[0].attn.qkv.weight.grad, g_ref)


def test_use_kernels_dispatches_to_fused_adapter(monkeypatch):
    calls = []

    def fused_adapter(x, w_down, b_down, w_up, b_up, scale, z=None):
        calls.append(z is None)
        u = x if z is None else x + z
        return u + scale * (F.gelu(u @ w_down.T + b_down) @ w_up.T + b_up)

    fake = types.ModuleType("sak.kernels.adapter")
    fake.fused_adapter = fused_adapter
    monkeypatch.setitem(sys.modules, "sak.kernels.adapter", fake)
    model_mod._fused_adapter.cache_clear()
    try:
        m = _tiny()
        x = torch.randn(1, 3, 64, 64)
        with torch.no_grad():
            ref = m(x).distill_maps
            m.use_kernels = True
            got = m(x).distill_maps
    finally:
        model_mod._fused_adapter.cache_clear()
    # a0 of each teacher without z, then per block one call per teacher with z = Zl
    assert calls == [True] * 3 + [False] * (4 * 3)
    for name in ref:
        for g, r in zip(got[name], ref[name]):
            torch.testing.assert_close(g, r)


def test_use_kernels_without_kernel_module_is_a_clear_error(monkeypatch):
    monkeypatch.setitem(sys.modules, "sak.kernels.adapter", None)  # import raises ModuleNotFoundError
    model_mod._fused_adapter.cache_clear()
    try:
        with pytest.raises(SakError, match="use_kernels"):
            create_student("tiny", TINY_TEACHERS, img_size=32, use_kernels=True)
    finally:
        model_mod._fused_adapter.cache_clear()


# ---------------------------------------------------------------------------------------------- Table 22


@pytest.mark.parametrize(
    "name,stem_m,total_m,teacher_dim",
    [
        ("vit_b", 86, 98, 1024),
        ("vit_b", 86, 98, 768),
        ("vit_l", 304, 344, 1024),
        ("vit_l", 304, 344, 768),
    ],
)
def test_parameter_counts_match_table_22(name, stem_m, total_m, teacher_dim):
    # counted on the meta device: same modules, no memory, no init time
    teachers = [TeacherTarget(t, teacher_dim) for t in ("dinov2", "clip", "sam")]
    with torch.device("meta"):
        m = create_student(name, teachers)
    stem = sum(p.numel() for p in m.stem.parameters())
    per_path = sum(p.numel() for p in m.adapter_paths["dinov2"].parameters())
    # the paper's stem counts include timm's 1000-class head (unused by SAK, dropped here) and appear
    # truncated to whole millions: vit_b 86.09M (+0.77M head), vit_l 303.69M (+1.03M head)
    assert abs(stem / 1e6 - stem_m) < 0.7
    assert per_path < 0.05 * stem  # "each TSAP branch < 5% of the backbone"
    total = m.num_parameters()  # stem + 3 adapter paths + level norms, aligners excluded
    assert abs(total / 1e6 - total_m) < 1.0, total
    aligners = m.num_parameters(include_aligners=True) - total
    assert (aligners == 0) == (teacher_dim == m.embed_dim)


def test_use_kernels_with_real_kernel_module_matches_torch():
    pytest.importorskip("sak.kernels.adapter")
    model_mod._fused_adapter.cache_clear()
    m = _tiny()
    _randomize_adapters(m)
    x = torch.randn(2, 3, 64, 64)
    ref = m(x).distill_maps
    m.use_kernels = True
    got = m(x).distill_maps
    for name in ref:
        for g, r in zip(got[name], ref[name]):
            torch.testing.assert_close(g, r, rtol=1e-5, atol=1e-5)
    sum(g.square().mean() for maps in got.values() for g in maps).backward()
    assert all(p.grad is not None for p in m.parameters())
