"""PRISM's stage 2 (student/model/prism_multitask.py) and the stage-1 -> stage-2 student."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from sak.pipeline.base.errors import SakError
from sak.student.model.prism import PrismStudent, TeacherTarget, build_prism, stage2_student
from sak.student.model.prism_loss import stage1_loss_config
from sak.student.model.prism_multitask import (
    STAGE2_RECIPES,
    PrismMultiTask,
    authors_task_embedding_init,
    prism_stage2_distillation,
)

pytestmark = pytest.mark.usefixtures("one_thread")

TEACHERS = (TeacherTarget("dinov2_tiny", 48), TeacherTarget("sam_tiny", 32))
TASKS = {"semseg": 21, "normals": 3, "edge": 1}


def stage1():
    torch.manual_seed(0)
    return build_prism("prism_tiny", TEACHERS, img_size=64)


def test_stage2_student_keeps_stage1_weights_and_starts_task_embeddings_fresh():
    s1 = stage1()
    s2 = stage2_student(s1, list(TASKS), (48, 80))
    assert s2.config.tasks == tuple(TASKS) and s2.config.img_size == (48, 80) and s2.token_grid == (3, 5)
    a, b = s1.state_dict(), s2.state_dict()
    for k in a:
        if k != "stem.pos_embed":
            assert torch.equal(a[k], b[k]), k
    assert b["stem.pos_embed"].shape == (1, 1 + 15, 64)
    assert torch.equal(b["stem.pos_embed"][:, 0], a["stem.pos_embed"][:, 0])  # CLS position kept
    assert b["task_embeddings.weight"].shape == (3, 64) and b["task_embeddings.weight"].std() < 0.05


def test_forward_with_and_without_distillation_and_gradients():
    s2 = stage2_student(stage1(), list(TASKS), 64)
    model = PrismMultiTask(s2, TASKS).train()
    x = torch.randn(2, 3, 64, 64)
    off = model(x)
    assert {t: tuple(p.shape) for t, p in off.preds.items()} == {t: (2, n, 64, 64) for t, n in TASKS.items()}
    assert off.distill is None and len(off.features.pairs) == 2 * 3
    with torch.no_grad():
        for b in s2.moe_blocks:
            s2.stem.blocks[b].moe.router.film.weight.normal_(0, 0.5)  # past init: conditions matter
    on = model(x, s2.teacher_pairs(2, teachers_per_image=1, seed=1))
    assert len(on.features.pairs) == 2 * 3 + 2 and on.distill is not None
    assert sorted(torch.cat(list(on.distill.image_index.values())).tolist()) == [0, 1]
    targets = {t.name: [torch.randn(2, 4, 4, t.dim) for _ in range(4)] for t in TEACHERS}
    terms = prism_stage2_distillation(on, s2, targets, stage1_loss_config("prism_b"))
    task_loss = sum(p.float().pow(2).mean() for p in on.preds.values())
    (task_loss + terms.total).backward()
    no_grad = [n for n, p in model.named_parameters() if p.grad is None or not p.grad.abs().sum() > 0]
    assert no_grad == []
    with pytest.raises(SakError, match="without teacher rows"):
        prism_stage2_distillation(off, s2, targets, stage1_loss_config("prism_b"))


def test_heads_must_follow_the_student_tasks():
    s2 = stage2_student(stage1(), ["semseg", "edge"], 64)
    with pytest.raises(SakError, match="must be the student's task conditions"):
        PrismMultiTask(s2, {"edge": 1, "semseg": 21})


def test_recipes_follow_the_authors_stage2_configs():
    assert STAGE2_RECIPES[("nyud", "prism_s")].distill is False  # nyud_s2_BS.yml: vfm_training False
    on = [k for k, r in STAGE2_RECIPES.items() if r.distill]
    assert len(on) == 5
    assert STAGE2_RECIPES[("pascal_context", "prism_s")].decorrelation is False  # loss_type cos+l1
    assert STAGE2_RECIPES[("pascal_context", "prism_b")].epochs == 50
    assert all(r.distill_weight == 1.0 and r.grad_clip == 10.0 for r in STAGE2_RECIPES.values())


def test_authors_task_init_and_generic_record():
    s2 = stage2_student(stage1(), ["semseg", "normals", "edge"], 64)
    authors_task_embedding_init(s2, "pascal_context")
    assert torch.equal(s2.task_embeddings.weight[2], s2.teacher_embeddings.weight[0])
    with pytest.raises(SakError, match="no task 'depth'"):
        authors_task_embedding_init(s2, "nyud")
    record = SimpleNamespace(name="prism_tiny", teachers=TEACHERS, img_size=64, pretrained=False)
    built = PrismStudent.from_student_config(record)
    assert built.config.moe.num_experts == 4 and built.teacher_names == ["dinov2_tiny", "sam_tiny"]
