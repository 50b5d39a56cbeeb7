"""PRISM's stage-1 objective, against cached teacher targets (numbers from the authors' losses.py,
models/condition_moe_mt_distiller.py and configs; their `loss_type` names the parts):

    total = sum_{teacher, level} [0.9 (1 - cos) + 0.1 smoothL1]       "cos+l1"  (the SAK term, same code)
          + 0.5 * sum_{level in 0, 1} decorrelation(first teacher's projected map)   "+decorrelation"
          + 0.1 * 0.01 * sum_{MoE blocks} balance                      the MoE auxiliary loss

decorrelation(m) = mean_{b, i, j} |cos(m_b,i, m_b,j)| * (1 - exp(-d_ij^2 / (2 sigma^2))), sigma = 0.1 min(h, w):
long-range similarity between the tokens of one map is penalised, near tokens are free.
balance (one block, over a group of rows) = E * sum_e load_e * mean_prob_e: load_e the share of tokens
that route to e, mean_prob_e the mean softmax(logits)_e. Their stage-1 pass is one group; their stage 2
adds the teacher pass's and the mean of the per-task passes' (`stage2_balance`).

Distillation terms: the student map is resized to the target grid (as SAK's); the authors resize the
smaller of the two to the larger, which is the same whenever the student grid is the smaller (24 vs 27, 24,
64 at 384). The terms and the total are a plain sum over (teacher, level), as theirs.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from sak.pipeline.base.errors import SakError
from sak.student.model.prism import PrismFeatures, PrismOutput, PrismStudent
from sak.student.model.prism_moe import BlockRouting
from sak.student.train.losses import distill_term


@dataclass(frozen=True)
class PrismLossConfig:
    """Coefficients of the stage-1 objective (the authors' values; see `stage1_loss_config`)."""

    decorrelation: bool = True  # loss_type "cos+l1+decorrelation" (False: "cos+l1")
    decorrelation_weight: float = 0.5
    decorrelation_levels: tuple[int, ...] = (0, 1)  # the first two tapped levels
    decorrelation_sigma: float = 0.1  # Gaussian radius as a fraction of min(h, w)
    balance_alpha: float = 0.01  # load_balancing_alpha of each MoE layer
    aux_weight: float = 0.1  # the distiller's factor on the summed MoE auxiliary loss


def stage1_loss_config(student_name: str) -> PrismLossConfig:
    """The authors' stage-1 `loss_type` per size: ViT-S (BS_s1.yml) "cos+l1", ViT-B and ViT-L
    (BB_s1.yml, LB_s1.yml, LL_s1.yml) "cos+l1+decorrelation"; the test size follows ViT-B."""
    return PrismLossConfig(decorrelation=student_name != "prism_s")


@dataclass
class PrismLossTerms:
    """total (scalar, with graph); the parts detached for logging: distill {"<teacher>/L<i>": term},
    decorrelation and balance (the weighted values that entered the total)."""

    total: torch.Tensor
    distill: dict[str, torch.Tensor]
    decorrelation: torch.Tensor
    balance: torch.Tensor


def decorrelation_loss(feature_map: torch.Tensor, sigma_fraction: float = 0.1) -> torch.Tensor:
    """feature_map (B, C, h, w) -> mean over b, i, j of |cos_ij| * (1 - gaussian(d_ij)). Scalar."""
    B, C, h, w = feature_map.shape
    ys, xs = torch.meshgrid(
        torch.arange(h, device=feature_map.device), torch.arange(w, device=feature_map.device), indexing="ij"
    )
    coords = torch.stack([ys, xs], dim=-1).reshape(-1, 2).float()  # (N, 2)
    dist_sq = (coords[:, None, :] - coords[None, :, :]).pow(2).sum(-1)  # (N, N)
    sigma = sigma_fraction * min(h, w)
    penalty = 1.0 - torch.exp(-dist_sq / (2 * sigma**2))  # ~0 near, ~1 far
    tokens = F.normalize(feature_map.float().flatten(2).transpose(1, 2), dim=-1)  # (B, N, C)
    similarity = torch.bmm(tokens, tokens.transpose(1, 2)).abs()  # (B, N, N)
    return (similarity * penalty).mean()


def balance_term(routing: BlockRouting, rows: torch.Tensor | None = None) -> torch.Tensor:
    """E * sum_e load_e * mean_prob_e over the tokens of `rows` (all rows when None). Scalar, fp32."""
    logits, top_index, top_weight = routing.logits, routing.top_index, routing.top_weight
    if rows is not None:
        logits, top_index, top_weight = (t.index_select(0, rows) for t in (logits, top_index, top_weight))
    E = routing.num_experts
    flat_index = top_index.reshape(-1, top_index.shape[-1])  # (tokens, k)
    hits = (top_weight.reshape(flat_index.shape) > 0).float()
    routed = torch.zeros(flat_index.shape[0], E, device=logits.device).scatter_add(1, flat_index, hits)
    load = (routed > 0).float().mean(dim=0)  # (E,), no gradient (as theirs: a count)
    mean_prob = logits.reshape(-1, E).float().softmax(dim=-1).mean(dim=0)  # (E,)
    return E * (load * mean_prob).sum()


def balance_loss(features: PrismFeatures, rows: torch.Tensor | None = None) -> torch.Tensor:
    """Sum over MoE blocks of `balance_term` over one group of rows (unweighted)."""
    return torch.stack([balance_term(r, rows) for r in features.routing]).sum()


def stage2_balance(features: PrismFeatures, student: PrismStudent) -> torch.Tensor:
    """The authors' stage-2 auxiliary sum: the teacher pass's balance plus the mean over tasks of each
    task pass's, each pass a group of rows of the one batched forward. Unweighted."""
    T = len(student.teacher_names)
    teacher_rows = torch.nonzero(features.pairs.condition < T).squeeze(1)
    parts = []
    if teacher_rows.numel():
        parts.append(balance_loss(features, teacher_rows.to(features.levels[0].device)))
    task_parts = [
        balance_loss(features, rows.to(features.levels[0].device))
        for k in range(len(student.task_names))
        if (rows := features.pairs.rows_of(T + k)).numel()
    ]
    if task_parts:
        parts.append(torch.stack(task_parts).mean())
    if not parts:
        raise SakError("stage2_balance got a forward with no rows")
    return torch.stack(parts).sum()


def distillation_terms(
    output: PrismOutput, targets: Mapping[str, Sequence[torch.Tensor]], use_kernels: bool = False
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Sum over (teacher, level) of the SAK term, each teacher's maps against its own rows of the batch.

    targets: {teacher: [(B, H, W, C)] per level}, the cache's batch layout; rows are picked by
    output.image_index[teacher] (all images by default, one share of them with teachers_per_image=1).
    """
    missing = sorted(set(output.distill_maps) - set(targets))
    if missing:
        raise SakError(f"no cached targets for teachers {missing} (have {sorted(targets)})")
    total: torch.Tensor | None = None
    terms: dict[str, torch.Tensor] = {}
    for teacher, maps in output.distill_maps.items():
        if len(maps) != len(targets[teacher]):
            raise SakError(
                f"teacher {teacher!r}: the student has {len(maps)} levels, the targets {len(targets[teacher])}"
            )
        rows = output.image_index[teacher]
        for i, (s, t) in enumerate(zip(maps, targets[teacher])):
            term = distill_term(s, t.index_select(0, rows.to(t.device)), use_kernels)
            terms[f"{teacher}/L{i}"] = term.detach()
            total = term if total is None else total + term
    if total is None:
        raise SakError("the forward produced no distillation maps")
    return total, terms


def prism_stage1_loss(
    output: PrismOutput,
    targets: Mapping[str, Sequence[torch.Tensor]],
    config: PrismLossConfig,
    use_kernels: bool = False,
) -> PrismLossTerms:
    """The stage-1 objective of one step (see the module docstring)."""
    total, terms = distillation_terms(output, targets, use_kernels)
    decorrelation = total.new_zeros(())
    if config.decorrelation:
        first = next(iter(output.distill_maps))  # the first teacher with rows, in the student's order
        for level in config.decorrelation_levels:
            decorrelation = decorrelation + decorrelation_loss(
                output.distill_maps[first][level], config.decorrelation_sigma
            )
        decorrelation = config.decorrelation_weight * decorrelation
    balance = config.aux_weight * config.balance_alpha * balance_loss(output.features)
    return PrismLossTerms(total + decorrelation + balance, terms, decorrelation.detach(), balance.detach())
