"""PRISM's student (student/model/prism.py, prism_moe.py): shapes, top-k gating, upcycling, the batched
every-teacher pass, the teacher assignment, gradients, config round trip."""

from __future__ import annotations

import time

import pytest
import torch

from sak.pipeline.base.errors import SakError
from sak.student.model.prism import (
    PrismConfig,
    PrismMoE,
    TeacherTarget,
    build_prism,
    list_prism_students,
    stage2_config,
)
from sak.student.model.prism_loss import prism_stage1_loss, stage1_loss_config
from sak.student.model.prism_moe import DualStreamBlock
from sak.student.model.prism_pairs import RoutePairs, assign_teachers, pairs_every_condition

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models: OpenMP barriers on busy cores cost seconds

TEACHERS = (TeacherTarget("dinov2_tiny", 48), TeacherTarget("clip_tiny", 64), TeacherTarget("sam_tiny", 32))
IMG = 64  # 4x4 patch grid with patch 16


def tiny(tasks=(), **kw):
    torch.manual_seed(0)
    return build_prism("prism_tiny", TEACHERS, tasks=tasks, img_size=kw.pop("img_size", IMG), **kw)


def test_registry_and_unknown_name():
    assert list_prism_students() == ["prism_b", "prism_l", "prism_s", "prism_tiny"]
    with pytest.raises(SakError, match="unknown PRISM student 'prism_xl'.*prism_b"):
        build_prism("prism_xl", TEACHERS)


def test_registered_sizes_follow_the_authors_configs():
    from sak.student.model.prism import PRISM_STUDENTS

    for name, blocks, timm_name in (
        ("prism_s", (2, 5, 8, 11), "vit_small_patch16_384"),
        ("prism_b", (2, 5, 8, 11), "vit_base_patch16_384"),
        ("prism_l", (5, 11, 17, 23), "vit_large_patch16_384"),
    ):
        arch = PRISM_STUDENTS.get(name)
        assert arch.timm_name == timm_name
        moe = arch.moe
        assert moe.moe_blocks == blocks and moe.tap_blocks == blocks
        assert (moe.num_experts, moe.top_k, moe.expert_hidden_ratio) == (15, 3, 4.0)
        assert moe.gate_ranges == ((0.5, 1.0),) * 4 and moe.noisy_gating
        assert (moe.expert_dropout, moe.min_route_weight, moe.projector_hidden_ratio) == (0.1, 1e-6, 1.0)


def _check_shapes(model, B, img, teachers):
    grid = (img[0] // 16, img[1] // 16)
    model.eval()
    with torch.no_grad():
        out = model(torch.randn(B, 3, *img))
    assert list(out.distill_maps) == [t.name for t in teachers]
    for t in teachers:
        assert [tuple(m.shape) for m in out.distill_maps[t.name]] == [(B, t.dim, *grid)] * 4
        assert out.image_index[t.name].tolist() == list(range(B))
    E, k = model.config.moe.num_experts, model.config.moe.top_k
    tokens = grid[0] * grid[1] + 1
    assert [r.block for r in out.features.routing] == list(model.config.moe.moe_blocks)
    for r in out.features.routing:
        assert r.logits.shape == (B * len(teachers), tokens, E)
        assert r.top_index.shape == r.top_weight.shape == (B * len(teachers), tokens, k)
        assert r.stream_gate.shape == (B * len(teachers), tokens, 1)
    assert [tuple(m.shape) for m in out.features.levels] == [(B * len(teachers), model.embed_dim, *grid)] * 4


def test_tiny_shapes_stage1_and_stage2_non_square():
    model = tiny(tasks=("semseg", "depth"), img_size=(64, 96))
    _check_shapes(model, 2, (64, 96), TEACHERS)
    with torch.no_grad():
        out = model.forward_tasks(torch.randn(2, 3, 64, 96))
    assert list(out.task_maps) == ["semseg", "depth"]
    assert all(tuple(m.shape) == (2, 64, 4, 6) for maps in out.task_maps.values() for m in maps)


@pytest.mark.parametrize("name", ["prism_s", pytest.param("prism_b", marks=pytest.mark.slow)])
def test_real_sizes_shapes(name):
    t0 = time.perf_counter()
    teachers = (TeacherTarget("dinov2_b", 768), TeacherTarget("sam_b", 256))
    model = build_prism(name, teachers, img_size=32)  # the real architecture, a 2x2 grid for speed
    _check_shapes(model, 1, (32, 32), teachers)
    assert time.perf_counter() - t0 < 120


@pytest.mark.slow
def test_large_shapes():
    _check_shapes(build_prism("prism_l", TEACHERS, img_size=32), 1, (32, 32), TEACHERS)


def test_every_teacher_pass_equals_separate_passes_and_one_teacher_rows():
    """Rows of the batched pass are independent: each equals a pass routed by its teacher alone."""
    model = tiny().eval()
    x = torch.randn(3, 3, IMG, IMG)
    with torch.no_grad():
        every = model(x)
        for c, t in enumerate(TEACHERS):
            alone = model(x, pairs_every_condition(3, [c]))
            for a, b in zip(every.distill_maps[t.name], alone.distill_maps[t.name]):
                torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
        pairs = assign_teachers(3, 3, teachers_per_image=1, seed=7)
        one = model(x, pairs)
        for t in TEACHERS:
            rows = one.image_index[t.name]
            for a, b in zip(one.distill_maps[t.name], every.distill_maps[t.name]):
                torch.testing.assert_close(a, b[rows], rtol=1e-5, atol=1e-5)


def test_conditions_change_the_routing():
    model = tiny().eval()
    with torch.no_grad():
        for blk in model.stem.blocks:
            if isinstance(blk, DualStreamBlock):
                blk.moe.router.film.weight.normal_(0, 5.0)  # FiLM is zero at init: give it a say
        out = model(torch.randn(2, 3, IMG, IMG))
    logits = out.features.routing[-1].logits  # rows: teacher 0 (images 0, 1), teacher 1, teacher 2
    assert not torch.allclose(logits[0:2], logits[2:4])


# ------------------------------------------------------------------------------------------- gating


def test_top_k_gating_properties():
    model = tiny()
    x = torch.randn(2, 3, IMG, IMG)
    for mode in ("eval", "train"):
        getattr(model, mode)()
        with torch.no_grad():
            out = model(x)
        for r in out.features.routing:
            k = r.top_index.shape[-1]
            assert k == 2
            idx = r.top_index.reshape(-1, k)
            assert (idx[:, 0] != idx[:, 1]).all()  # k distinct experts per token
            torch.testing.assert_close(r.top_weight.sum(-1), torch.ones(r.top_weight.shape[:-1]))
            # the chosen experts are the k largest logits, weights their softmax
            top, _ = r.logits.topk(k, dim=-1)
            torch.testing.assert_close(r.top_weight, top.softmax(-1))
            # k nonzero weights per token; in training a weight is 0 only where expert dropout masked
            # more than E - k logits of the token (4 experts here; negligible with 15)
            assert ((r.top_weight > 0) | (mode == "train") & torch.isinf(top)).all()
            if mode == "eval":
                assert (r.top_weight > 0).all()
            lo, hi = 0.5, 1.0
            assert ((r.stream_gate >= lo) & (r.stream_gate <= hi)).all()


def test_noise_and_expert_dropout_only_in_training():
    model = tiny()
    x = torch.randn(2, 3, IMG, IMG)
    model.eval()
    with torch.no_grad():
        a, b = model(x), model(x)
    for ra, rb in zip(a.features.routing, b.features.routing):
        assert torch.equal(ra.logits, rb.logits) and torch.isfinite(ra.logits).all()
    model.train()
    with torch.no_grad():
        c = model(x)
    trained = torch.cat([r.logits.reshape(-1) for r in c.features.routing])
    assert torch.isinf(trained).float().mean().item() == pytest.approx(0.1, abs=0.03)  # 10% masked
    finite = torch.isfinite(trained)
    clean = torch.cat([r.logits.reshape(-1) for r in a.features.routing])
    assert not torch.allclose(trained[finite], clean[finite])  # noise on the rest
    quiet = PrismMoE(
        (1, 3, 5, 7), (1, 3, 5, 7), num_experts=4, top_k=2, noisy_gating=False, expert_dropout=0.0
    )
    model = tiny(moe=quiet)
    with torch.no_grad():
        model.eval()
        e = model(x)
        model.train()
        t = model(x)
    for re, rt in zip(e.features.routing, t.features.routing):
        assert torch.equal(re.logits, rt.logits)


def test_upcycled_block_matches_the_dense_mlp_formula():
    """At init every expert is the ViT's MLP, so the block's FFN output is
    MLP(h) + (1 - g) * sum_k w_k MLP(w_k h): the dense stream plus the routed experts' extra."""
    torch.manual_seed(0)
    model = tiny().eval()
    blk = model.stem.blocks[3]
    assert isinstance(blk, DualStreamBlock)
    mlp = blk.dense_ffn
    for expert in [blk.moe.shared_expert, *blk.moe.experts]:
        assert torch.equal(expert.fc1.weight, mlp.fc1.weight) and torch.equal(expert.fc2.bias, mlp.fc2.bias)
    x = torch.randn(2, 17, 64)
    cond = torch.randn(2, 64)
    with torch.no_grad():
        out, routing = blk(x, cond)
        a = x + blk.ls1(blk.attn(blk.norm1(x)))
        h = blk.norm2(a)
        w = routing.top_weight  # (2, 17, k)
        extra = sum(w[..., j : j + 1] * mlp(w[..., j : j + 1] * h) for j in range(w.shape[-1]))
        g = 0.5 + 0.5 * torch.sigmoid(h @ blk.stream_gate.weight.T + blk.stream_gate.bias)
        expected = a + mlp(h) + (1 - g) * extra
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)


def test_hidden_ratio_other_than_four_copies_the_overlap():
    moe = PrismMoE((1, 3, 5, 7), (1, 3, 5, 7), num_experts=4, top_k=2, expert_hidden_ratio=2.0)
    blk = tiny(moe=moe).stem.blocks[1]
    e, mlp = blk.moe.experts[0], blk.dense_ffn
    assert e.fc1.weight.shape == (128, 64) and mlp.fc1.weight.shape == (256, 64)
    assert torch.equal(e.fc1.weight, mlp.fc1.weight[:128]) and torch.equal(
        e.fc2.weight, mlp.fc2.weight[:, :128]
    )


# ------------------------------------------------------------------------------------------- pairs


def test_assign_every_teacher_and_balanced_one_teacher():
    every = assign_teachers(5, 3)
    assert sorted(zip(every.image_index.tolist(), every.condition.tolist())) == [
        (i, t) for i in range(5) for t in range(3)
    ]
    one = assign_teachers(20, 3, teachers_per_image=1, seed=3, step=11)
    assert sorted(one.image_index.tolist()) == list(range(20))  # every image exactly once
    assert torch.bincount(one.condition).tolist() == [7, 7, 6]  # B // T, +1 for the first B % T
    assert one.condition.tolist() == sorted(one.condition.tolist())  # grouped by teacher
    again = assign_teachers(20, 3, teachers_per_image=1, seed=3, step=11)
    assert torch.equal(one.image_index, again.image_index) and torch.equal(one.condition, again.condition)
    others = [
        assign_teachers(20, 3, 1, seed=s, step=st, rank=r)
        for s, st, r in ((4, 11, 0), (3, 12, 0), (3, 11, 1))
    ]
    for o in others:
        assert not torch.equal(o.image_index, one.image_index)


def test_assign_two_teachers_per_image():
    pairs = assign_teachers(6, 3, teachers_per_image=2, seed=0)
    per_image: dict[int, list[int]] = {}
    for i, t in zip(pairs.image_index.tolist(), pairs.condition.tolist()):
        per_image.setdefault(i, []).append(t)
    assert sorted(per_image) == list(range(6))
    assert all(len(set(ts)) == 2 for ts in per_image.values())
    assert torch.bincount(pairs.condition).tolist() == [4, 4, 4]


def test_assign_rejects_bad_counts():
    with pytest.raises(SakError, match="teachers per image must be between 1 and 3"):
        assign_teachers(4, 3, teachers_per_image=4)
    with pytest.raises(SakError, match="at least one teacher"):
        assign_teachers(4, 0)


def test_pairs_must_match_the_batch():
    model = tiny()
    with pytest.raises(SakError, match="batch of 3 images, got 2"):
        model(torch.randn(2, 3, IMG, IMG), assign_teachers(3, 3))
    with pytest.raises(SakError, match="conditions must lie in 0..2"):
        model(torch.randn(1, 3, IMG, IMG), RoutePairs(torch.tensor([0]), torch.tensor([5]), 1))
    with pytest.raises(SakError, match="no tasks"):
        model.forward_tasks(torch.randn(1, 3, IMG, IMG))


# ------------------------------------------------------------------------------------------- training


def _targets(B):
    return {t.name: [torch.randn(B, 5, 5, t.dim) for _ in range(4)] for t in TEACHERS}


def test_gradients_reach_every_trained_parameter():
    """Every parameter gets a gradient. At init the FiLM is zero, so the condition embeddings and the
    FiLM gate get exactly zero (structurally, as in the authors' model); after any update of the FiLM
    they get nonzero ones, which the second half checks."""
    model = tiny().train()
    x = torch.randn(4, 3, IMG, IMG)
    loss = prism_stage1_loss(model(x), _targets(4), stage1_loss_config("prism_tiny")).total
    loss.backward()
    assert [n for n, p in model.named_parameters() if p.grad is None] == []
    zero = {n for n, p in model.named_parameters() if not p.grad.abs().sum() > 0}
    assert zero == {"teacher_embeddings.weight"} | {
        f"stem.blocks.{b}.moe.router.film_gate.{p}" for b in (1, 3, 5, 7) for p in ("weight", "bias")
    }
    model.zero_grad()
    with torch.no_grad():
        for b in (1, 3, 5, 7):
            model.stem.blocks[b].moe.router.film.weight.normal_(0, 0.5)
    prism_stage1_loss(model(x), _targets(4), stage1_loss_config("prism_tiny")).total.backward()
    assert [n for n, p in model.named_parameters() if not p.grad.abs().sum() > 0] == []


def test_grad_checkpointing_gives_the_same_gradients():
    x = torch.randn(2, 3, IMG, IMG)
    grads = []
    for ckpt in (False, True):
        model = tiny().train()
        model.set_grad_checkpointing(ckpt)
        torch.manual_seed(5)  # the same routing noise; checkpointing must replay it in backward
        prism_stage1_loss(model(x), _targets(2), stage1_loss_config("prism_tiny")).total.backward()
        grads.append({n: p.grad.clone() for n, p in model.named_parameters()})
    for n in grads[0]:
        torch.testing.assert_close(grads[0][n], grads[1][n], rtol=1e-4, atol=1e-6, msg=n)


def test_config_round_trip_rebuilds_the_same_model():
    model = tiny(tasks=("semseg",))
    config = PrismConfig.from_dict(model.config.to_dict())
    assert config == model.config and config.moe is not None
    again = type(model)(config)
    assert {k: v.shape for k, v in again.state_dict().items()} == {
        k: v.shape for k, v in model.state_dict().items()
    }
    with pytest.raises(SakError, match="unknown fields"):
        PrismConfig.from_dict({**model.config.to_dict(), "colour": 1})
    s2 = stage2_config(model.config, ("semseg", "normals"), (448, 576))
    assert s2.tasks == ("semseg", "normals") and s2.img_size == (448, 576) and s2.moe == model.config.moe


def test_bad_configs_are_refused():
    with pytest.raises(SakError, match="need as many gate ranges"):
        PrismMoE((1, 3), (1, 3), gate_ranges=((0.5, 1.0),))
    with pytest.raises(SakError, match="overlap"):
        build_prism("prism_tiny", TEACHERS, tasks=("clip_tiny",), img_size=IMG)
    with pytest.raises(SakError, match="random-init test variant"):
        build_prism("prism_tiny", TEACHERS, img_size=IMG, pretrained=True)
    with pytest.raises(SakError, match="top-k must be between 1 and the 4 experts"):
        tiny(moe=PrismMoE((1, 3, 5, 7), (1, 3, 5, 7), num_experts=4, top_k=5))


def test_dispatch_skips_weights_at_or_below_the_floor():
    """A chosen expert whose softmax weight is <= 1e-6 does not run for that token (the authors' rule)."""
    blk = tiny().stem.blocks[1].eval()
    with torch.no_grad():
        blk.moe.router.logits.weight.zero_()
        blk.moe.router.logits.bias.copy_(torch.tensor([20.0, 0.0, -50.0, -60.0]))  # weights 1 - 2e-9, 2e-9
        blk.moe.experts[1].fc2.bias.fill_(1e9)  # were expert 1 run, it would add 2e-9 * 1e9 = 2
        h = torch.randn(1, 5, 64)
        out, _, top_index, top_weight = blk.moe(h, torch.zeros(1, 64))
        assert top_index[0, 0].tolist() == [0, 1] and top_weight[0, 0, 1] < 1e-6
        w0 = top_weight[..., :1]
        expected = blk.moe.shared_expert(h) + w0 * blk.moe.experts[0](w0 * h)  # expert 1 skipped
    torch.testing.assert_close(out, expected)


def test_expert_dropout_never_drops_every_expert_of_a_token():
    """With 4 experts and 10 % dropout one token in 10^4 lost all its logits: softmax of all -inf is NaN
    (prism_tiny training went NaN in its 7th step). Such a token keeps its logits; others are masked."""
    from sak.student.model.prism_moe import ConditionedRouter

    torch.manual_seed(0)
    router = ConditionedRouter(8, 4, 8, noisy=True, expert_dropout=1.0).train()
    logits = router(torch.randn(3, 5, 8), torch.randn(3, 8))
    assert torch.isfinite(logits).all()
    router.expert_dropout = 0.5
    logits = router(torch.randn(64, 5, 8), torch.randn(64, 8))
    assert torch.isinf(logits).any() and torch.isfinite(logits).any(-1).all()
