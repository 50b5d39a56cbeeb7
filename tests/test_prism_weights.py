"""The converter of the authors' PRISM checkpoints (student/model/prism_weights.py), on synthetic
state_dicts laid out as their code names its parameters (Condition_MoE_PRISM / MultiTaskModel in
github robotyingtang/PRISM-VFM); their code itself is not needed."""

from __future__ import annotations

import pytest
import torch

from sak.pipeline.base.errors import SakError
from sak.student.model.multitask import DecodeHead
from sak.student.model.prism import TeacherTarget, build_prism
from sak.student.model.prism_weights import (
    AUTHORS_TASK_ORDER,
    convert_authors_stage1,
    load_authors_stage1,
    load_authors_stage2,
    read_authors_checkpoint,
)

pytestmark = pytest.mark.usefixtures("one_thread")

DIM, DEPTH, MOE, E = 64, 8, (1, 3, 5, 7), 4
TEACHER_DIMS = (48, 64, 32)  # their teacher ids 0, 1, 2 (config order dinov2, clip, sam)
OURS = ("dinov2_tiny", "clip_tiny", "sam_tiny")


def _lin(sd, name, out_f, in_f, g):
    sd[f"{name}.weight"] = torch.randn(out_f, in_f, generator=g)
    sd[f"{name}.bias"] = torch.randn(out_f, generator=g)


def authors_stage1(grid: int = 4, tasks: int = 0, seed: int = 0) -> dict[str, torch.Tensor]:
    """Their Condition_MoE_PRISM.state_dict() at prism_tiny's sizes: names as their modules define them."""
    g = torch.Generator().manual_seed(seed)
    T, hidden = len(TEACHER_DIMS), 4 * DIM
    sd: dict[str, torch.Tensor] = {
        "task_composer_weights": torch.randn(tasks, T, generator=g),
        "task_condition_embeddings.weight": torch.randn(tasks, DIM, generator=g),
        "vfm_condition_embeddings.weight": torch.randn(T, DIM, generator=g),
        "task_free_condition_embeddings.weight": torch.randn(1, DIM, generator=g),
        "backbone.pos_embed": torch.randn(1, 1 + grid * grid, DIM, generator=g),
        "backbone.cls_token": torch.randn(1, 1, DIM, generator=g),
        "backbone.patch_embed.proj.weight": torch.randn(DIM, 3, 16, 16, generator=g),
        "backbone.patch_embed.proj.bias": torch.randn(DIM, generator=g),
        "backbone.norm.weight": torch.randn(DIM, generator=g),
        "backbone.norm.bias": torch.randn(DIM, generator=g),
    }
    for i in range(DEPTH):
        b = f"backbone.blocks.{i}"
        for norm in ("norm1", "norm2"):
            sd[f"{b}.{norm}.weight"] = torch.randn(DIM, generator=g)
            sd[f"{b}.{norm}.bias"] = torch.randn(DIM, generator=g)
        _lin(sd, f"{b}.attn.qkv", 3 * DIM, DIM, g)
        _lin(sd, f"{b}.attn.proj", DIM, DIM, g)
        if i not in MOE:
            _lin(sd, f"{b}.mlp.fc1", hidden, DIM, g)
            _lin(sd, f"{b}.mlp.fc2", DIM, hidden, g)
            continue
        _lin(sd, f"{b}.standard_ffn.fc1", hidden, DIM, g)
        _lin(sd, f"{b}.standard_ffn.fc2", DIM, hidden, g)
        m = f"{b}.moe_ffn_layer"
        sd[f"{m}.ortho_loss_weight"] = torch.tensor(0.01)
        sd[f"{m}.variance_loss_weight"] = torch.tensor(1.0)
        _lin(sd, f"{m}.router.film_layer.to_gamma_beta", 2 * DIM, DIM, g)
        _lin(sd, f"{m}.router.W_gate_stage1", DIM, DIM, g)
        _lin(sd, f"{m}.router.W_g_base", E, DIM, g)
        _lin(sd, f"{m}.router.W_noise", E, DIM, g)
        for e in range(E):
            _lin(sd, f"{m}.experts.{e}.fc1", hidden, DIM, g)
            _lin(sd, f"{m}.experts.{e}.fc2", DIM, hidden, g)
        _lin(sd, f"{m}.shared_expert.fc1", hidden, DIM, g)
        _lin(sd, f"{m}.shared_expert.fc2", DIM, hidden, g)
        _lin(sd, f"{b}.gate_linear", 1, DIM, g)
    for t, tdim in enumerate(TEACHER_DIMS):
        for level in range(4):
            _lin(sd, f"vfm_projection_heads.{t}_{level}.net.0", DIM, DIM, g)
            _lin(sd, f"vfm_projection_heads.{t}_{level}.net.2", tdim, DIM, g)
    return sd


def tiny(teachers=OURS, tasks=(), img=64):
    dims = dict(zip(OURS, TEACHER_DIMS))
    return build_prism("prism_tiny", [TeacherTarget(n, dims[n]) for n in teachers], tasks=tasks, img_size=img)


def test_stage1_keys_land_where_they_belong(tmp_path):
    sd = authors_stage1()
    path = tmp_path / "prism_stage1.pth"
    torch.save({"model": sd}, path)  # the released files' layout
    model = tiny()
    load_authors_stage1(model, path)
    ours = model.state_dict()
    pairs = {
        "stem.blocks.3.moe.router.logits.weight": "backbone.blocks.3.moe_ffn_layer.router.W_g_base.weight",
        "stem.blocks.3.moe.router.noise.bias": "backbone.blocks.3.moe_ffn_layer.router.W_noise.bias",
        "stem.blocks.5.moe.router.film.weight": "backbone.blocks.5.moe_ffn_layer.router.film_layer.to_gamma_beta.weight",
        "stem.blocks.5.moe.router.film_gate.weight": "backbone.blocks.5.moe_ffn_layer.router.W_gate_stage1.weight",
        "stem.blocks.7.moe.experts.2.fc2.weight": "backbone.blocks.7.moe_ffn_layer.experts.2.fc2.weight",
        "stem.blocks.1.moe.shared_expert.fc1.bias": "backbone.blocks.1.moe_ffn_layer.shared_expert.fc1.bias",
        "stem.blocks.1.dense_ffn.fc1.weight": "backbone.blocks.1.standard_ffn.fc1.weight",
        "stem.blocks.1.stream_gate.weight": "backbone.blocks.1.gate_linear.weight",
        "stem.blocks.2.mlp.fc2.weight": "backbone.blocks.2.mlp.fc2.weight",
        "stem.blocks.2.attn.qkv.weight": "backbone.blocks.2.attn.qkv.weight",
        "stem.pos_embed": "backbone.pos_embed",
        "stem.norm.weight": "backbone.norm.weight",
        "teacher_embeddings.weight": "vfm_condition_embeddings.weight",
        "projectors.sam_tiny.5.fc2.weight": "vfm_projection_heads.2_2.net.2.weight",  # id 2, level 2 = block 5
        "projectors.dinov2_tiny.1.fc1.bias": "vfm_projection_heads.0_0.net.0.bias",
    }
    for mine, theirs in pairs.items():
        assert torch.equal(ours[mine], sd[theirs]), mine
    assert read_authors_checkpoint(path).keys() == sd.keys()
    with torch.no_grad():
        out = model.eval()(torch.randn(1, 3, 64, 64))
    assert torch.isfinite(out.distill_maps["sam_tiny"][0]).all()


def test_teacher_order_permutes_embeddings_and_projectors():
    sd = authors_stage1()
    model = tiny(teachers=("sam_tiny", "dinov2_tiny", "clip_tiny"))  # our order differs from theirs
    load_authors_stage1(model, sd, teacher_order=OURS)  # their id i is OURS[i]
    ours = model.state_dict()
    emb = sd["vfm_condition_embeddings.weight"]
    assert torch.equal(ours["teacher_embeddings.weight"], emb[[2, 0, 1]])
    assert torch.equal(ours["projectors.sam_tiny.7.fc2.bias"], sd["vfm_projection_heads.2_3.net.2.bias"])
    with pytest.raises(SakError, match="teacher_order .* must name each"):
        load_authors_stage1(model, sd, teacher_order=("sam_tiny", "sam_tiny", "clip_tiny"))


def test_bad_checkpoints_give_one_line_errors():
    model = tiny()
    sd = authors_stage1()
    missing = {k: v for k, v in sd.items() if k != "backbone.blocks.3.moe_ffn_layer.router.W_noise.weight"}
    with pytest.raises(
        SakError, match=r"lacks 1 student weights: stem\.blocks\.3\.moe\.router\.noise\.weight$"
    ):
        load_authors_stage1(model, missing)
    extra = {**sd, "backbone.blocks.0.extra.weight": torch.zeros(1)}
    with pytest.raises(SakError, match=r"has 1 keys the student does not: stem\.blocks\.0\.extra\.weight"):
        load_authors_stage1(model, extra)
    with pytest.raises(SakError, match=r"'foo\.bar' is not part of the PRISM student layout"):
        load_authors_stage1(model, {**sd, "foo.bar": torch.zeros(1)})
    bad = {**sd, "backbone.blocks.3.moe_ffn_layer.router.W_g_base.weight": torch.zeros(15, DIM)}
    with pytest.raises(
        SakError, match=r"router\.logits\.weight has shape \(15, 64\), the student expects \(4, 64\)"
    ):
        load_authors_stage1(model, bad)
    with pytest.raises(SakError, match="teacher id 3 / level 0 beyond"):
        load_authors_stage1(model, {**sd, "vfm_projection_heads.3_0.net.0.weight": torch.zeros(1)})
    with pytest.raises(SakError) as info:
        load_authors_stage1(model, missing)
    assert "\n" not in str(info.value)


def test_stage1_into_a_stage2_model_resamples_and_keeps_fresh_task_embeddings():
    model = tiny(tasks=("semseg", "depth"), img=96)  # 6x6 grid; the checkpoint has 4x4
    fresh = model.task_embeddings.weight.detach().clone()
    with pytest.raises(
        SakError, match=r"stem\.pos_embed has shape \(1, 17, 64\), the student expects \(1, 37, 64\)"
    ):
        load_authors_stage1(model, authors_stage1())
    load_authors_stage1(model, authors_stage1(), resample_pos_embed=True)
    assert model.stem.pos_embed.shape == (1, 37, 64)
    assert torch.equal(model.task_embeddings.weight, fresh)


def authors_stage2(tasks=AUTHORS_TASK_ORDER["pascal_context"], outputs=None) -> dict[str, torch.Tensor]:
    """Their MultiTaskModel.state_dict(): the backbone under `backbone.` plus one DecodeHead per task."""
    outputs = outputs or {"semseg": 21, "human_parts": 7, "normals": 3, "edge": 1, "sal": 2}
    sd = {f"backbone.{k}": v for k, v in authors_stage1(tasks=len(tasks), seed=1).items()}
    g = torch.Generator().manual_seed(2)
    for t in tasks:
        head = DecodeHead(DIM, outputs[t])
        for k, v in head.state_dict().items():
            sd[f"heads.{t}.{k}"] = torch.randn(v.shape, generator=g) if v.is_floating_point() else v
    return sd


def test_stage2_backbone_tasks_and_heads():
    sd = authors_stage2()
    ours_tasks = ("semseg", "human_parts", "sal", "normals", "edge")  # the project's order differs
    model = tiny(tasks=ours_tasks)
    heads = load_authors_stage2(model, sd, AUTHORS_TASK_ORDER["pascal_context"])
    # their rows: semseg, human_parts, normals, edge, sal
    emb = sd["backbone.task_condition_embeddings.weight"]
    assert torch.equal(model.task_embeddings.weight, emb[[0, 1, 4, 2, 3]])
    assert torch.equal(
        model.state_dict()["stem.blocks.5.moe.router.logits.weight"],
        sd["backbone.backbone.blocks.5.moe_ffn_layer.router.W_g_base.weight"],
    )
    two = sd["heads.sal.last_conv.weight"]
    assert torch.equal(heads["heads.sal.last_conv.weight"], (two[1] - two[0]).unsqueeze(0))  # one logit
    decode = torch.nn.ModuleDict(
        {
            t: DecodeHead(DIM, n)
            for t, n in {"semseg": 21, "human_parts": 7, "sal": 1, "normals": 3, "edge": 1}.items()
        }
    )
    decode.load_state_dict({k.removeprefix("heads."): v for k, v in heads.items()}, strict=True)
    with pytest.raises(SakError, match="stage-2 checkpoint"):
        load_authors_stage1(model, sd)
    with pytest.raises(SakError, match=r"no decode head for tasks \['depth'\]"):
        load_authors_stage2(tiny(tasks=("semseg", "depth")), sd, AUTHORS_TASK_ORDER["pascal_context"])
    backbone_only = {k.removeprefix("backbone."): v for k, v in sd.items() if k.startswith("backbone.")}
    with pytest.raises(SakError, match=r"tasks \['depth'\] are not among the checkpoint's tasks"):
        convert_authors_stage1(
            backbone_only, tiny(tasks=("semseg", "depth")), authors_tasks=AUTHORS_TASK_ORDER["pascal_context"]
        )
    with pytest.raises(SakError, match="pass authors_tasks"):
        convert_authors_stage1(
            {k.removeprefix("backbone."): v for k, v in sd.items() if k.startswith("backbone.")}, model
        )
