"""What stage 1 does differently for a PRISM student (student/model/prism.py, docs/prism.md).

    pairs   every teacher on every image (default), or `--teachers-per-image k`: the authors' balanced
            assignment (k=1: each image of the rank's batch to one teacher, evenly), from seed, step, rank
    loss    prism_stage1_loss: cos + smoothL1 per (teacher, level) on each teacher's rows of the cached
            targets, + decorrelation (ViT-B/L) + the MoE balance term, as the authors' config per size
    use     expert use by teacher, counted on the device every step; a {"kind": "experts"} line in
            metrics.jsonl every log_every steps and at the end, and RUN/routers.png at the end

SAK's student goes the other way (stage1.py); `is_prism` decides.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from sak.pipeline.base.errors import SakError
from sak.student.model.prism import PrismOutput, PrismStudent
from sak.student.model.prism_loss import PrismLossTerms, prism_stage1_loss, stage1_loss_config
from sak.student.model.prism_usage import ExpertUseCounts, count_expert_use, plot_expert_use
from sak.student.train.distributed import DistEnv, all_reduce_sum

ROUTERS_PICTURE = "routers.png"


def is_prism(model: torch.nn.Module) -> bool:
    return isinstance(model, PrismStudent)


def check_prism_stores(model: PrismStudent, positions: dict[str, tuple[int, ...]]) -> None:
    """PRISM distils every tapped level (decorrelation reads levels 0 and 1): stores of some levels only
    (`sak-cache run --levels`) are refused."""
    partial = sorted(t for t, p in positions.items() if len(p) != len(model.levels))
    if partial:
        raise SakError(
            f"a PRISM student distils all {len(model.levels)} tapped levels; store(s) {', '.join(partial)} keep "
            f"fewer (--levels): use stores of every level"
        )


AUTHORS_TEACHER_IDS = ("dinov2", "clip", "sam")  # the order of `teachers:` in their configs: their ids


def load_prism_paper_stage1(model: PrismStudent, path: str, mapping: dict[str, str]) -> None:
    """`--init-paper CKPT` for a PRISM student: the authors' stage-1 file through the converter. mapping:
    their teacher name -> ours (--paper-teachers, or by family); their ids follow dinov2, clip, sam (names
    outside those after them, in the order given). The position embedding is resampled to the input."""
    from sak.student.model.prism_weights import load_authors_stage1

    known = [mapping[t] for t in AUTHORS_TEACHER_IDS if t in mapping]
    order = known + [ours for theirs, ours in mapping.items() if theirs not in AUTHORS_TEACHER_IDS]
    load_authors_stage1(model, path, teacher_order=order, resample_pos_embed=True)


def prism_train_loss(
    model: PrismStudent,
    train_model: torch.nn.Module,
    images: torch.Tensor,
    targets: dict[str, list[torch.Tensor]],
    teachers_per_image: int | None,
    seed: int,
    step: int,
    rank: int,
) -> tuple[PrismLossTerms, PrismOutput]:
    """One step's objective. images (B, 3, S, S) of this rank; targets {teacher: [(B, H, W, C)]}."""
    pairs = model.teacher_pairs(images.shape[0], teachers_per_image, seed, step, rank)
    output = train_model(images, pairs)
    config = stage1_loss_config(model.config.name)
    return prism_stage1_loss(output, targets, config, use_kernels=bool(model.use_kernels)), output


@dataclass
class ExpertUseLog:
    """Expert-use counts since the last metrics line (counts of every rank summed when written)."""

    model: PrismStudent
    env: DistEnv
    counts: ExpertUseCounts | None = None
    steps: int = 0
    total: ExpertUseCounts | None = None  # this session's, for the picture

    def add(self, output: PrismOutput) -> None:
        c = count_expert_use(output.features, self.model.condition_names)
        self.counts = c if self.counts is None else self.counts + c
        self.total = c if self.total is None else self.total + c
        self.steps += 1

    def line(self, step: int) -> dict | None:
        """{"kind": "experts", "step", "steps", blocks, conditions, load, weight, dense, tokens,
        specialisation}: the steps since the last line, every rank (collective). None when nothing is new."""
        if self.counts is None:
            return None
        use = _summed(self.counts, self.env).summary()
        record = {"kind": "experts", "step": step, "steps": self.steps, **use.to_dict()}
        self.counts, self.steps = None, 0
        return record

    def draw(self, run: Path, title: str) -> Path | None:
        """RUN/routers.png from this session's counts (collective; rank 0 draws)."""
        if self.total is None:
            return None
        use = _summed(self.total, self.env).summary()
        if not self.env.is_main:
            return None
        path = run / ROUTERS_PICTURE
        plot_expert_use(use, path, title)
        return path


def _summed(counts: ExpertUseCounts, env: DistEnv) -> ExpertUseCounts:
    if not env.distributed:
        return counts
    parts = [counts.selections, counts.weight, counts.dense, counts.tokens]
    summed = [all_reduce_sum(p.float().clone(), env) for p in parts]
    return ExpertUseCounts(counts.blocks, counts.conditions, *summed)
