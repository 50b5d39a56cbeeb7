"""Stage 2 of PRISM: task-conditioned routing recomposes the experts; one decode head per task.

    images (B, 3, H, W)
      -> PrismStudent.forward_features with one row per (image, task)      [+ (image, teacher) rows when
         (the task's embedding routes every MoE block)                      distillation stays on]
      -> per task: the 4 tapped level maps (B, C, h, w)                     PrismStudent.task_maps
      -> DecodeHead (student/model/multitask.py, the authors' head too)     preds[task] (B, out, H, W)
      -> teacher rows -> projectors                                         distill (PrismOutput)

There is no representation router here (unlike SAK's MoR): the routing lives inside the MoE blocks and
is steered by the task. All rows go through one batched pass (the authors run one pass per task and one
for the teachers: the same rows, the same result; see prism_loss.stage2_balance for the aux term).

Whether distillation stays on in stage 2 is per config (their `vfm_training`): STAGE2_RECIPES.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch
import torch.nn as nn

from sak.pipeline.base.errors import SakError
from sak.student.model.multitask import DecodeHead
from sak.student.model.prism import PrismFeatures, PrismOutput, PrismStudent
from sak.student.model.prism_loss import (
    PrismLossConfig,
    PrismLossTerms,
    decorrelation_loss,
    distillation_terms,
    stage2_balance,
)
from sak.student.model.prism_pairs import RoutePairs


@dataclass(frozen=True)
class Stage2Recipe:
    """One of the authors' stage-2 configs (configs/s2_prism/*.yml; train_s2_condition_moe.py)."""

    config_file: str
    distill: bool  # vfm_training: the teacher pass and its distillation loss stay on
    decorrelation: bool  # loss_type has "+decorrelation"
    lr: float
    weight_decay: float
    batch_size: int  # per GPU (their README runs 2 GPUs)
    iterations: int | None  # max_iters, or None when max_epochs > 0 sets the length
    epochs: int | None
    grad_clip: float = 10.0
    distill_weight: float = 1.0  # --alpha: task loss + alpha * (distillation + 0.1 * aux)


STAGE2_RECIPES: dict[tuple[str, str], Stage2Recipe] = {
    ("pascal_context", "prism_s"): Stage2Recipe("pascal_s2_BS.yml", True, False, 1e-5, 1e-6, 32, 50000, None),
    ("pascal_context", "prism_b"): Stage2Recipe("pascal_s2.yml", True, True, 2e-5, 1e-6, 3, None, 50),
    ("pascal_context", "prism_l"): Stage2Recipe("pascal_s2_LL.yml", True, True, 2e-5, 1e-6, 6, 50000, None),
    ("nyud", "prism_s"): Stage2Recipe("nyud_s2_BS.yml", False, True, 1e-5, 1e-6, 32, 50000, None),
    ("nyud", "prism_b"): Stage2Recipe("nyud_s2.yml", True, True, 2e-5, 1e-6, 6, 40000, None),
    ("nyud", "prism_l"): Stage2Recipe("nyud_s2_LL.yml", True, True, 2e-5, 1e-6, 8, 50000, None),
}


@dataclass
class PrismMultiTaskOutput:
    """preds {task: (B, out, H, W)}; distill: the teacher rows' maps (None when distillation is off);
    features: the whole routed pass (for expert-use statistics and the aux term)."""

    preds: dict[str, torch.Tensor]
    distill: PrismOutput | None
    features: PrismFeatures


class PrismMultiTask(nn.Module):
    """A task-conditioned PrismStudent (tasks in its config) + one DecodeHead per task.

    tasks: {task: output channels}, the student's task order. forward(images, teacher_pairs) ->
    PrismMultiTaskOutput; pass teacher_pairs (PrismStudent.teacher_pairs) to keep distillation on.
    """

    def __init__(self, student: PrismStudent, tasks: Mapping[str, int]):
        super().__init__()
        if list(tasks) != student.task_names:
            raise SakError(
                f"the heads' tasks {list(tasks)} must be the student's task conditions {student.task_names}, "
                "in order (build it with prism.stage2_student)"
            )
        self.student = student
        self.tasks = dict(tasks)
        self.heads = nn.ModuleDict(
            {t: DecodeHead(student.embed_dim, n, len(student.levels)) for t, n in tasks.items()}
        )

    def forward(self, images: torch.Tensor, teacher_pairs: RoutePairs | None = None) -> PrismMultiTaskOutput:
        pairs = self.student.task_pairs(images.shape[0])
        if teacher_pairs is not None:
            pairs = teacher_pairs.cat(pairs)
        features = self.student.forward_features(images, pairs)
        out_size = (images.shape[-2], images.shape[-1])
        task_maps = self.student.task_maps(features)
        preds = {t: self.heads[t](task_maps[t], out_size) for t in self.tasks}
        distill = self.student.project(features) if teacher_pairs is not None else None
        return PrismMultiTaskOutput(preds, distill, features)


def prism_stage2_distillation(
    output: PrismMultiTaskOutput,
    student: PrismStudent,
    targets: Mapping[str, Sequence[torch.Tensor]],
    config: PrismLossConfig,
    use_kernels: bool = False,
) -> PrismLossTerms:
    """The distillation part of the stage-2 objective, which the authors add to the task loss with
    weight `distill_weight` (1.0): distillation + decorrelation + 0.1 * 0.01 * stage2_balance."""
    if output.distill is None:
        raise SakError("this stage-2 forward ran without teacher rows; pass teacher_pairs to distil")
    total, terms = distillation_terms(output.distill, targets, use_kernels)
    decorrelation = total.new_zeros(())
    if config.decorrelation:
        first = next(iter(output.distill.distill_maps))
        for level in config.decorrelation_levels:
            maps = output.distill.distill_maps[first][level]
            decorrelation = decorrelation + decorrelation_loss(maps, config.decorrelation_sigma)
        decorrelation = config.decorrelation_weight * decorrelation
    balance = config.aux_weight * config.balance_alpha * stage2_balance(output.features, student)
    return PrismLossTerms(total + decorrelation + balance, terms, decorrelation.detach(), balance.detach())


# their train_s2_condition_moe.py, after loading the stage-1 weights: task row 3 takes teacher row 0
AUTHORS_TASK_ROW3 = {"pascal_context": "edge", "nyud": "depth"}


@torch.no_grad()
def authors_task_embedding_init(student: PrismStudent, dataset: str) -> None:
    """Optional, for a faithful reproduction: the authors' stage 2 copies the first teacher's embedding
    (DINOv2) into their task row 3 (PASCAL-Context edge, NYUD-v2 depth) before training."""
    if dataset not in AUTHORS_TASK_ROW3:
        raise SakError(
            f"no authors' stage-2 init for dataset {dataset!r}; known: {sorted(AUTHORS_TASK_ROW3)}"
        )
    task = AUTHORS_TASK_ROW3[dataset]
    if student.task_embeddings is None or task not in student.task_names:
        raise SakError(f"the student has no task {task!r} to initialise")
    row = student.task_names.index(task)
    student.task_embeddings.weight[row].copy_(student.teacher_embeddings.weight[0])
