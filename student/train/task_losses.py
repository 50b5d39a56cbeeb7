"""Stage-2 task losses (paper B.5, following Maninis et al. 2019 / ATRC / InvPT practice).

    semseg, human_parts   cross-entropy, ignore 255, mean over valid pixels
    sal                   class-balanced BCE on one logit: positives weighted by the batch's negative
                          fraction, negatives by its positive fraction; ignore 255; sum / valid pixels
    normals               L1 between the unit-normalised prediction and the target, summed over the 3
                          channels, / valid pixels; a pixel is ignored when its target is all zero or
                          holds 255 (the "no label" fill of the PASCAL/NYUD normal maps)
    edge                  weighted BCE: 0.95 on positive pixels, 0.05 on negatives, ignore 255, mean
    depth                 L1 over valid pixels (target > 0; 0 marks missing depth)

Every loss takes logits / raw predictions (B, out, H, W) and targets (B, H, W) or (B, 1, H, W)
(normals (B, 3, H, W)), and returns a scalar; with no valid pixel it returns 0 with a gradient path.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping

import torch
import torch.nn.functional as F

from sak.pipeline.base.errors import SakError
from sak.student.train.dense_config import DEFAULT_TASK_WEIGHTS

IGNORE_INDEX = 255
EDGE_POS_WEIGHT = 0.95


def _squeeze_target(target: torch.Tensor) -> torch.Tensor:
    return target[:, 0] if target.dim() == 4 else target  # (B, 1, H, W) -> (B, H, W)


def _logit_map(pred: torch.Tensor) -> torch.Tensor:
    if pred.dim() != 4 or pred.shape[1] != 1:
        raise SakError(f"a binary task needs one logit channel (B, 1, H, W), got {tuple(pred.shape)}")
    return pred[:, 0]  # (B, H, W)


def cross_entropy_loss(
    logits: torch.Tensor, target: torch.Tensor, ignore_index: int = IGNORE_INDEX
) -> torch.Tensor:
    """logits (B, K, H, W), target (B, [1,] H, W) class ids -> mean CE over non-ignored pixels."""
    target = _squeeze_target(target).long()
    if not (target != ignore_index).any():
        return logits.sum() * 0.0
    return F.cross_entropy(logits, target, ignore_index=ignore_index)


def balanced_bce_loss(
    logits: torch.Tensor, target: torch.Tensor, ignore_index: int = IGNORE_INDEX
) -> torch.Tensor:
    """Saliency. logits (B, 1, H, W), target (B, [1,] H, W) in {0, 1, 255}.

    w = (#negatives / #valid) over the batch; loss = sum(w * BCE_pos + (1 - w) * BCE_neg) / #valid,
    so the rarer class weighs more (the class-balanced cross-entropy of the multi-task literature).
    """
    x = _logit_map(logits)
    y = _squeeze_target(target).to(x.dtype)
    valid = _squeeze_target(target) != ignore_index
    n_valid = valid.sum()
    if n_valid == 0:
        return logits.sum() * 0.0
    x, y = x[valid], y[valid]
    w_pos = (1.0 - y).sum() / n_valid  # fraction of negatives
    weight = torch.where(y > 0.5, w_pos, 1.0 - w_pos)
    bce = F.binary_cross_entropy_with_logits(x, y, weight=weight, reduction="sum")
    return bce / n_valid


def normals_l1_loss(
    pred: torch.Tensor, target: torch.Tensor, ignore_index: int = IGNORE_INDEX
) -> torch.Tensor:
    """pred (B, 3, H, W) raw, target (B, 3, H, W) unit normals -> L1 of unit(pred) vs target per valid pixel."""
    if pred.shape[1] != 3 or target.shape != pred.shape:
        raise SakError(
            f"normals need (B, 3, H, W) prediction and target, got {tuple(pred.shape)}, {tuple(target.shape)}"
        )
    valid = (target != ignore_index).all(dim=1) & (target != 0).any(dim=1)  # (B, H, W)
    n_valid = valid.sum()
    if n_valid == 0:
        return pred.sum() * 0.0
    unit = F.normalize(pred, p=2, dim=1)
    diff = (unit - target).abs().sum(dim=1)  # (B, H, W), summed over the 3 channels
    return diff[valid].sum() / n_valid


def edge_bce_loss(
    logits: torch.Tensor,
    target: torch.Tensor,
    pos_weight: float = EDGE_POS_WEIGHT,
    ignore_index: int = IGNORE_INDEX,
) -> torch.Tensor:
    """Boundaries. logits (B, 1, H, W), target in {0, 1, 255}: mean of 0.95 * BCE_pos + 0.05 * BCE_neg."""
    x = _logit_map(logits)
    t = _squeeze_target(target)
    valid = t != ignore_index
    if not valid.any():
        return logits.sum() * 0.0
    y = t[valid].to(x.dtype)
    weight = torch.where(y > 0.5, torch.full_like(y, pos_weight), torch.full_like(y, 1.0 - pos_weight))
    return F.binary_cross_entropy_with_logits(x[valid], y, weight=weight, reduction="mean")


def depth_l1_loss(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """pred (B, 1, H, W), target (B, [1,] H, W) metres, 0 = missing -> mean L1 over target > 0."""
    p = _logit_map(pred)
    t = _squeeze_target(target).to(p.dtype)
    valid = t > 0
    if not valid.any():
        return pred.sum() * 0.0
    return (p[valid] - t[valid]).abs().mean()


TASK_LOSSES: dict[str, Callable[[torch.Tensor, torch.Tensor], torch.Tensor]] = {
    "semseg": cross_entropy_loss,
    "human_parts": cross_entropy_loss,
    "sal": balanced_bce_loss,
    "normals": normals_l1_loss,
    "edge": edge_bce_loss,
    "depth": depth_l1_loss,
}


def multi_task_loss(
    preds: Mapping[str, torch.Tensor],
    targets: Mapping[str, torch.Tensor],
    weights: Mapping[str, float] | None = None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Weighted sum over the tasks in preds: (total, {task: weighted loss}). Weights default to paper B.5."""
    weights = DEFAULT_TASK_WEIGHTS if weights is None else weights
    parts: dict[str, torch.Tensor] = {}
    for task, pred in preds.items():
        if task not in TASK_LOSSES:
            raise SakError(f"no loss for task {task!r}; known tasks: {', '.join(TASK_LOSSES)}")
        if task not in targets:
            raise SakError(f"no target for task {task!r}")
        if task not in weights:
            raise SakError(f"no loss weight for task {task!r}")
        parts[task] = float(weights[task]) * TASK_LOSSES[task](pred, targets[task])
    total = torch.stack(list(parts.values())).sum()
    return total, parts
