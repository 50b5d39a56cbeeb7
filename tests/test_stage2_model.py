"""Stage-2 model: MoR gates and noise, routed sums, the `sum` ablation, heads, paper key layout, freezing."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from sak.pipeline.base.errors import SakError
from sak.student.model.config import TeacherTarget
from sak.student.model.multitask import (
    NYUD_TASKS,
    PASCAL_CONTEXT_TASKS,
    MoRRouter,
    SakMultiTask,
)
from sak.student.model.registry import create_student
from sak.student.model.student import SakStudent

TINY_TEACHERS = [
    TeacherTarget("dinov2_tiny", 64),
    TeacherTarget("clip_tiny", 96),
    TeacherTarget("sam_tiny", 48),
]
TINY_DIM = 64


def _student(img_size: int = 64, seed: int = 0) -> SakStudent:
    torch.manual_seed(seed)
    return create_student("tiny", TINY_TEACHERS, img_size=img_size)


def _model(
    img_size: int = 64, tasks=PASCAL_CONTEXT_TASKS, router: str = "mor", seed: int = 0
) -> SakMultiTask:
    model = SakMultiTask(_student(img_size, seed), tasks, router=router)
    with torch.no_grad():  # make routers clearly non-uniform so weighted sums are a real test
        g = torch.Generator().manual_seed(seed + 1)
        for p in model.mor.parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.5)
    return model


def test_gates_sum_to_one_and_keys():
    model = _model().eval()
    preds, gates, distill = model(torch.randn(3, 3, 64, 64))
    assert set(gates) == {(b, t) for b in model.student.levels for t in PASCAL_CONTEXT_TASKS}
    for g in gates.values():
        assert g.shape == (3, 4)  # E = 3 teachers + stem
        assert torch.allclose(g.sum(1), torch.ones(3), atol=1e-6)
        assert (g > 0).all()
    assert set(distill) == {t.name for t in TINY_TEACHERS}
    assert distill["clip_tiny"][0].shape == (3, 96, 4, 4)  # aligner to the teacher width


def test_noise_only_in_training():
    model = _model()
    x = torch.randn(2, 3, 64, 64)
    model.eval()
    with torch.no_grad():
        p1, g1, _ = model(x)
        p2, g2, _ = model(x)
    for k in g1:
        assert torch.equal(g1[k], g2[k])
    for t in p1:
        assert torch.equal(p1[t], p2[t])
    model.train()
    with torch.no_grad():
        _, g3, _ = model(x)
        _, g4, _ = model(x)
    assert all(torch.allclose(g.sum(1), torch.ones(2), atol=1e-6) for g in g3.values())
    assert any(not torch.allclose(g3[k], g4[k]) for k in g3)
    assert any(not torch.allclose(g3[k], g1[k]) for k in g3)


def test_router_output_is_hand_computed_weighted_sum():
    torch.manual_seed(0)
    router = MoRRouter(dim=8, num_experts=3).eval()
    with torch.no_grad():
        for p in router.parameters():
            p.copy_(torch.randn(p.shape))
    stem = torch.randn(2, 8, 3, 5)  # (B, C, h, w)
    experts = [stem] + [torch.randn(2, 8, 3, 5) for _ in range(2)]
    out, gates = router(stem, experts)

    lin0, ln, lin3 = router.router.module[0], router.router.module[1], router.router.module[3]
    for b in range(2):
        tokens = stem[b].reshape(8, 15).T  # (N, C)
        h = F.gelu(F.layer_norm(tokens @ lin0.weight.T + lin0.bias, (4,), ln.weight, ln.bias))
        logits = (h @ lin3.weight.T + lin3.bias).mean(0)  # (2E,)
        g = torch.softmax(logits[:3], 0)  # clean half only in eval
        assert torch.allclose(gates[b], g, atol=1e-6)
        expected = g[0] * experts[0][b] + g[1] * experts[1][b] + g[2] * experts[2][b]
        assert torch.allclose(out[b], expected, atol=1e-5)
    with pytest.raises(SakError, match="3 experts"):
        router(stem, experts[:2])


def test_model_routes_stem_first_then_teachers_in_order():
    model = _model().eval()
    x = torch.randn(2, 3, 64, 64)
    feats = model.student.forward_features(x)
    _, gates, _ = model(x)
    block, task = model.student.levels[1], "edge"
    router = model.mor[f"{block}_{task}"]
    fused, g = router(feats.stem_levels[1], feats.experts(1))
    assert torch.allclose(gates[(block, task)], g, atol=1e-6)
    by_hand = g[:, 0, None, None, None] * feats.stem_levels[1]
    for e, t in enumerate(model.student.teacher_names, start=1):
        by_hand = by_hand + g[:, e, None, None, None] * feats.teacher_levels[t][1]
    assert torch.allclose(fused, by_hand, atol=1e-5)


def test_sum_variant_adds_experts_without_router():
    model = _model(router="sum").eval()
    assert len(model.mor) == 0 and model.num_router_parameters() == 0
    x = torch.randn(2, 3, 64, 64)
    preds, gates, _ = model(x)
    assert all(torch.equal(g, torch.ones(2, 4)) for g in gates.values())
    feats = model.student.forward_features(x)
    maps = [sum(feats.experts(i)) for i in range(len(feats.levels))]
    assert torch.allclose(preds["semseg"], model.heads["semseg"](maps, (64, 64)), atol=1e-5)
    with pytest.raises(SakError, match="unknown router"):
        SakMultiTask(_student(), PASCAL_CONTEXT_TASKS, router="attention")


@pytest.mark.parametrize(("size", "tasks"), [((512, 512), PASCAL_CONTEXT_TASKS), ((448, 576), NYUD_TASKS)])
def test_head_output_shapes_after_pos_embed_resample(size, tasks):
    model = _model(img_size=384, tasks=tasks)
    model.student.resize_input(size)
    h, w = size[0] // 16, size[1] // 16
    assert model.student.stem.pos_embed.shape == (1, 1 + h * w, TINY_DIM)
    model.eval()
    with torch.no_grad():
        preds, gates, _ = model(torch.randn(1, 3, *size))
    assert {t: tuple(p.shape) for t, p in preds.items()} == {t: (1, n, *size) for t, n in tasks.items()}
    assert len(gates) == 4 * len(tasks)


def test_resize_input_keeps_cls_and_is_identity_at_same_size():
    student = _student(img_size=64)
    before = student.stem.pos_embed.detach().clone()
    student.resize_input((64, 64))
    assert torch.equal(student.stem.pos_embed, before)
    student.resize_input((96, 128))
    after = student.stem.pos_embed
    assert after.shape == (1, 1 + 6 * 8, TINY_DIM)
    assert torch.equal(after[:, :1], before[:, :1])  # CLS position untouched
    student(torch.randn(1, 3, 96, 128))  # the patch embed accepts the new size


def _paper_layout_shapes(levels, tasks, dim, experts) -> dict[str, tuple[int, ...]]:
    """The router and head keys of the paper code (models/backbones/sak.py, models/heads.py), by hand."""
    shapes: dict[str, tuple[int, ...]] = {}
    for b in levels:
        for t in tasks:
            p = f"mor.{b}_{t}.router.module"
            shapes |= {
                f"{p}.0.weight": (dim // 2, dim),
                f"{p}.0.bias": (dim // 2,),
                f"{p}.1.weight": (dim // 2,),
                f"{p}.1.bias": (dim // 2,),
                f"{p}.3.weight": (2 * experts, dim // 2),
                f"{p}.3.bias": (2 * experts,),
            }
    for t, n in tasks.items():
        p = f"heads.{t}"
        for i in range(4):
            shapes |= {f"{p}.linears.{i}.weight": (dim // 4, dim), f"{p}.linears.{i}.bias": (dim // 4,)}
        shapes |= {
            f"{p}.linear_fuse.0.weight": (dim, dim, 3, 3),
            f"{p}.linear_fuse.0.bias": (dim,),
            f"{p}.linear_fuse.1.weight": (dim,),
            f"{p}.linear_fuse.1.bias": (dim,),
            f"{p}.linear_fuse.1.running_mean": (dim,),
            f"{p}.linear_fuse.1.running_var": (dim,),
            f"{p}.linear_fuse.1.num_batches_tracked": (),
            f"{p}.last_conv.weight": (n, dim, 1, 1),
            f"{p}.last_conv.bias": (n,),
        }
    return shapes


def test_paper_layout_state_dict_loads_strict():
    model = _model()
    ours = {k: tuple(v.shape) for k, v in model.state_dict().items() if not k.startswith("student.")}
    paper = _paper_layout_shapes(model.student.levels, PASCAL_CONTEXT_TASKS, TINY_DIM, 4)
    assert ours == paper
    g = torch.Generator().manual_seed(3)
    synthetic = {k: torch.randn(s, generator=g) for k, s in paper.items() if s != ()}
    synthetic |= {k: torch.tensor(7) for k, s in paper.items() if s == ()}
    synthetic |= {k: v for k, v in model.state_dict().items() if k.startswith("student.")}
    fresh = _model(seed=5)
    fresh.load_state_dict(synthetic, strict=True)
    key = f"mor.{model.student.levels[2]}_sal.router.module.3.weight"
    assert torch.equal(fresh.state_dict()[key], synthetic[key])


def test_freeze_backbone_trains_only_routers_and_heads():
    model = _model()
    model.freeze_backbone()
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(n.startswith(("mor.", "heads.")) for n in trainable)
    assert {n for n in dict(model.named_parameters()) if n.startswith(("mor.", "heads."))} == trainable

    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    opt = torch.optim.AdamW(model.trainable_parameters(), lr=1e-2)
    model.train()
    preds, _, _ = model(torch.randn(2, 3, 64, 64))
    loss = sum(p.float().pow(2).mean() for p in preds.values())
    loss.backward()
    opt.step()
    changed = {n for n, p in model.named_parameters() if not torch.equal(p, before[n])}
    assert changed and changed <= trainable
    assert any(n.startswith("mor.") for n in changed)
    assert all(p.grad is None for n, p in model.named_parameters() if n.startswith("student."))


def test_mor_parameter_count_vit_b_three_teachers_five_tasks():
    # paper Table 22: ViT-B 86M, +TSAP (3 branches) 98M, +MoR (5 tasks) 104M
    teachers = [TeacherTarget(n, 768) for n in ("dinov2_b", "clip_b", "sam_b")]
    with torch.device("meta"):  # shapes only: no memory, no init cost
        model = SakMultiTask(create_student("vit_b", teachers), PASCAL_CONTEXT_TASKS)
    stem = sum(p.numel() for p in model.student.stem.parameters())
    student = model.student.num_parameters()
    routers = model.num_router_parameters()
    assert 85e6 < stem < 87e6
    assert 97e6 < student < 99e6
    assert routers == 20 * (768 * 384 + 384 + 2 * 384 + 384 * 8 + 8)  # 4 levels x 5 tasks
    assert 103e6 < student + routers < 105e6  # Table 22's 104M counts routers, not heads
    assert 29e6 < model.num_head_parameters() < 30e6
