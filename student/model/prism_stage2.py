"""PRISM's stage-2 model as the stage-2 trainer and evaluation call it (`sak-train stage2 --init RUN` of a
PRISM stage-1 run, `sak-train eval`): `PrismMultiTask` behind SakMultiTask's calls.

    forward(images) -> (preds {task: (B, out, H, W)},
                        gates {(block, task): (B, E)}     per image, the mean dispatch weight of each routed
                                                          expert under the task (eval's routers.png)
                        distill_maps {teacher: [(B, C_t, h, w)]})   teacher rows, every teacher on every
                                                          image, when `distill` is on ({} otherwise)
    last_output     the whole routed pass of the last forward: the trainer's balance term, expert use
    router_kind     "prism" (the routing is the MoE blocks' own, conditioned on the task)

The record that rebuilds it is the stage-1 run's StudentConfig (type "prism") + MultiTaskHeads with router
"prism": `from_record` builds the task-conditioned student (stage2_student) and the heads.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
import torch.nn as nn

from sak.student.model.config import StudentConfig
from sak.student.model.prism import PrismFeatures, PrismStudent, stage2_student
from sak.student.model.prism_multitask import PrismMultiTask, PrismMultiTaskOutput

PRISM_ROUTER = "prism"


def expert_gates(features: PrismFeatures, task_rows: Mapping[str, torch.Tensor]) -> dict:
    """{(block, task): (B, E)}: per image, mean over its tokens of each routed expert's dispatch weight."""
    gates = {}
    with torch.no_grad():
        for r in features.routing:
            P, N, _ = r.top_index.shape
            dense = torch.zeros(P, N, r.num_experts, device=r.top_weight.device)
            dense.scatter_add_(2, r.top_index, r.top_weight.float())  # (P, N, E)
            per_row = dense.mean(1)  # (P, E)
            for task, rows in task_rows.items():
                gates[(r.block, task)] = per_row.index_select(0, rows)
    return gates


def _authors_teacher_id(name: str) -> int:
    """Their teacher ids: the order of `teachers:` in their configs (dinov2, clip, sam); others last."""
    families = ("dinov2", "clip", "sam")
    family = name.split("_")[0]
    return families.index(family) if family in families else len(families)


class PrismStage2Model(nn.Module):
    """See the module docstring. `student_config`: the stage-1 student's record (what rebuilds it)."""

    router_kind = PRISM_ROUTER
    router_hidden = 0

    def __init__(self, multitask: PrismMultiTask, student_config: StudentConfig):
        super().__init__()
        self.multitask = multitask
        self.student_config = student_config
        self.distill = False  # the trainer turns the teacher rows on when it has targets
        self.last_output: PrismMultiTaskOutput | None = None

    @property
    def student(self) -> PrismStudent:
        return self.multitask.student

    @property
    def tasks(self) -> dict[str, int]:
        return self.multitask.tasks

    @property
    def levels(self) -> list[int]:
        """The gates' levels: the MoE blocks."""
        return list(self.student.moe_blocks)

    @property
    def expert_names(self) -> list[str]:
        return [f"expert {e}" for e in range(self.student.config.resolved().moe.num_experts)]

    @classmethod
    def from_record(
        cls,
        student_config: StudentConfig,
        stage1: PrismStudent,
        tasks: Mapping[str, int],
        img_size: Sequence[int],
    ) -> PrismStage2Model:
        student = stage2_student(stage1, list(tasks), tuple(img_size))
        return cls(PrismMultiTask(student, tasks), student_config)

    def load_authors_stage2(self, path: str, authors_tasks: Sequence[str] | None = None) -> None:
        """The authors' released stage-2 file (student and decode heads) through the converter. Their
        task order: `authors_tasks`, or by the checkpoint's task count (5 PASCAL-Context, 4 NYUD-v2);
        their teacher ids (dinov2, clip, sam) matched to ours by name."""
        from sak.pipeline.base.errors import SakError
        from sak.student.model.prism_weights import (
            AUTHORS_TASK_ORDER,
            load_authors_stage2,
            read_authors_checkpoint,
        )

        sd = read_authors_checkpoint(path)
        if authors_tasks is None:
            rows = sd.get("backbone.task_condition_embeddings.weight")
            by_count = {len(v): v for v in AUTHORS_TASK_ORDER.values()}
            if rows is None or rows.shape[0] not in by_count:
                raise SakError(f"{path}: not a PRISM stage-2 checkpoint of PASCAL-Context or NYUD-v2 tasks")
            authors_tasks = by_count[rows.shape[0]]
        order = sorted(self.student.teacher_names, key=_authors_teacher_id)
        heads = load_authors_stage2(self.student, sd, authors_tasks, order)
        self.multitask.heads.load_state_dict(
            {k.removeprefix("heads."): v for k, v in heads.items()}, strict=True
        )

    def forward(self, images: torch.Tensor, routing: bool = False) -> tuple:
        pairs = self.student.teacher_pairs(images.shape[0]) if self.distill else None
        out = self.multitask(images, pairs)
        self.last_output = out
        T = len(self.student.teacher_names)
        task_rows = {
            t: out.features.pairs.rows_of(T + k).to(images.device)
            for k, t in enumerate(self.student.task_names)
        }
        distill_maps = dict(out.distill.distill_maps) if out.distill is not None else {}
        return out.preds, expert_gates(out.features, task_rows), distill_maps

    def freeze_backbone(self) -> None:
        """Train the heads and the task embeddings only."""
        for name, p in self.student.named_parameters():
            p.requires_grad_(name.startswith("task_embeddings"))

    def trainable_parameters(self) -> list[nn.Parameter]:
        return [p for p in self.parameters() if p.requires_grad]
