"""The authors' stage-2 checkpoints load: backbone keys converted, routers and heads as they are, and the
two-class saliency head folded exactly into our one logit."""

import pytest
import torch

from sak.pipeline.base.errors import SakError
from sak.student.model.config import TeacherTarget
from sak.student.model.multitask import (
    PASCAL_CONTEXT_TASKS,
    SakMultiTask,
    convert_paper_stage2_state_dict,
    load_paper_stage2_checkpoint,
)
from sak.student.model.registry import create_student

PAPER = {"dinov2": ("dinov2_tiny", 64), "clip": ("clip_tiny", 96), "sam": ("sam_tiny", 48)}
TEACHER_MAP = {p: ours for p, (ours, _) in PAPER.items()}


def _model() -> SakMultiTask:
    torch.manual_seed(0)
    student = create_student("tiny", [TeacherTarget(o, d) for o, d in PAPER.values()], img_size=64)
    return SakMultiTask(student, PASCAL_CONTEXT_TASKS).eval()


def _paper_state_dict(model: SakMultiTask) -> dict[str, torch.Tensor]:
    """Our model's tensors under the paper code's names (random values), saliency head with 2 classes."""
    g = torch.Generator().manual_seed(1)
    back = {ours: paper for paper, (ours, _) in PAPER.items()}
    sd = {}
    for key, value in model.state_dict().items():
        rand = torch.randn(value.shape, generator=g) * 0.1 if value.is_floating_point() else value.clone()
        parts = key.split(".")
        if parts[0] == "student":
            kind, rest = parts[1], parts[2:]
            if kind == "stem":
                key = "vit." + ".".join(rest)
            elif kind == "adapter_paths":
                key = f"tsap.{back[rest[0]]}." + ".".join(rest[1:])
            elif kind in ("level_norms", "aligners"):
                prefix = "out_norms" if kind == "level_norms" else "ts_aligners"
                key = f"{prefix}.{rest[1]}_{back[rest[0]]}." + ".".join(rest[2:])
        if key.startswith("heads.sal.last_conv."):
            rand = torch.randn((2, *value.shape[1:]), generator=g) * 0.1
        sd[key] = rand
    return sd


def test_paper_stage2_checkpoint_loads_strict_and_saliency_is_exact():
    model = _model()
    paper = _paper_state_dict(model)
    assert any(k.startswith("mor.") for k in paper) and any(k.startswith("vit.") for k in paper)
    load_paper_stage2_checkpoint(model, paper, TEACHER_MAP)
    ours = model.state_dict()
    assert torch.equal(ours["student.stem.pos_embed"], paper["vit.pos_embed"])
    some_router = next(k for k in paper if k.startswith("mor.") and k.endswith("module.0.weight"))
    assert torch.equal(ours[some_router], paper[some_router])
    # the folded saliency logit gives the paper head's class-1 probability exactly
    w2, b2 = paper["heads.sal.last_conv.weight"], paper["heads.sal.last_conv.bias"]
    feats = torch.randn(2, w2.shape[1], 5, 5)
    p_paper = torch.softmax(torch.nn.functional.conv2d(feats, w2, b2), dim=1)[:, 1:]
    p_ours = torch.sigmoid(model.heads["sal"].last_conv(feats))
    assert torch.allclose(p_paper, p_ours, atol=1e-6)
    with torch.no_grad():
        preds, gates, _ = model(torch.randn(1, 3, 64, 64))
    assert set(preds) == set(PASCAL_CONTEXT_TASKS)


def test_wrong_tasks_are_named():
    model = _model()
    paper = _paper_state_dict(model)
    paper = {k: v for k, v in paper.items() if ".edge" not in k and "_edge" not in k}
    with pytest.raises(SakError, match="missing"):
        convert_paper_stage2_state_dict(paper, TEACHER_MAP, model)
