"""TIGER's counterfactual routing loss (our reading of the paper's abstract), for any token-routed model:
TIGER over frozen teachers (student/model/tiger.py) and `sak-train stage2 --router tiger` (the SAK
student's experts). The model gives `task_order` and `decode(task, maps, out_size)`; the forward pass a
`TokenRouting` (student/model/routing.py).

Per output level l and task t:
    L        the task's (unweighted) loss of the prediction
    L_-e     the loss with expert e excluded at level l: its gates set to 0, the rest renormalised to sum 1,
             the head re-run; no gradient through it (BatchNorm running statistics untouched)
    c_e      max(L_-e - L, 0)          q = softmax(c / tau)         gbar = mean over tokens and images of g
    term     KL(q || gbar) = sum_e q_e (log q_e - log gbar_e); the loss is the mean over (l, t)
Under DDP, L_-e - L and gbar are means over the global batch (all ranks), as one process would have them.

Sampled experts (`cf_experts=K` < E): per step, level and task, K experts drawn without replacement from a
generator seeded by (seed, step) (every rank and a resumed run draw the same); only their K head re-runs
are made, and the term is KL(q_S || gbar_S) over the subset S: q_S = softmax(c_S / tau), gbar_S = the
subset's mean gates renormalised to sum 1. Each c_e is exact (not estimated); the subset KL is not an
unbiased estimate of the full KL's value, but it is zero exactly when gbar_e / gbar_f = q_e / q_f for the
pairs in S, so with every pair drawn with positive probability its minimiser is the full term's
(gbar proportional to exp(c / tau)). Cost: K instead of E head re-runs per level and task.
"""

from __future__ import annotations

from contextlib import contextmanager

import torch
from torch import nn

from sak.student.model.routing import TokenRouting, fuse_tokens
from sak.student.train.distributed import rank_mean, rank_mean_value
from sak.student.train.task_losses import TASK_LOSSES


@contextmanager
def batchnorm_stats_frozen(model: nn.Module):
    """Forward passes that use batch statistics (train mode) but leave the running statistics alone."""
    saved = []
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            saved.append((m, m.momentum, m.num_batches_tracked.clone()))
            m.momentum = 0.0
    try:
        yield
    finally:
        for m, momentum, tracked in saved:
            m.momentum = momentum
            m.num_batches_tracked.copy_(tracked)


def exclude_expert(gates: torch.Tensor, e: int) -> torch.Tensor:
    """Gates with expert e set to zero and the others renormalised to sum 1 per token."""
    g = gates.clone()
    g[..., e] = 0
    return g / g.sum(-1, keepdim=True).clamp_min(1e-12)


def sample_experts(
    keys: list[tuple[int, str]], num_experts: int, k: int | None, seed: int, step: int
) -> dict[tuple[int, str], list[int]]:
    """Per (level, task): the experts whose exclusion is tried this step (all of them when k is None or
    >= E); a draw without replacement from a generator seeded by (seed, step), the same on every rank."""
    if k is None or k >= num_experts:
        return {key: list(range(num_experts)) for key in keys}
    g = torch.Generator().manual_seed(int(seed) * 1_000_003 + int(step))
    return {key: sorted(torch.randperm(num_experts, generator=g)[:k].tolist()) for key in keys}


@torch.no_grad()
def expert_contributions(
    model: nn.Module,
    out: TokenRouting,
    targets: dict[str, torch.Tensor],
    out_size: tuple[int, int],
    sampled: dict[tuple[int, str], list[int]] | None = None,
) -> dict[tuple[int, str], torch.Tensor]:
    """c[(l, t)] = max(L_-e - L, 0) for the experts of sampled[(l, t)] (all E by default), in that order:
    the task loss's rise when expert e is excluded at level l (of the global batch under DDP)."""
    L, E = out.num_levels, out.num_experts
    c = {}
    with batchnorm_stats_frozen(model):
        for task in model.task_order:
            loss_fn, target = TASK_LOSSES[task], targets[task]
            base = loss_fn(out.preds[task].detach(), target)
            fused = [out.fused[(k, task)].detach() for k in range(L)]
            for lvl in range(L):
                experts = out.experts_at(lvl).detach()
                rises = []
                for e in sampled[(lvl, task)] if sampled is not None else range(E):
                    maps = list(fused)
                    maps[lvl] = fuse_tokens(
                        exclude_expert(out.gates[(lvl, task)].detach(), e), experts, out.grid
                    )
                    rises.append(loss_fn(model.decode(task, maps, out_size), target) - base)
                c[(lvl, task)] = rank_mean_value(torch.stack(rises)).clamp_min(0)  # of the global batch
    return c


def counterfactual_loss(
    model: nn.Module,
    out: TokenRouting,
    targets: dict[str, torch.Tensor],
    out_size: tuple[int, int],
    tau: float,
    sampled: dict[tuple[int, str], list[int]] | None = None,
) -> tuple[torch.Tensor, dict[str, dict[str, list]]]:
    """Mean over (level, task) of KL(softmax(c / tau) || mean gate), over all experts or, with `sampled`,
    over each (level, task)'s subset (gates renormalised on it); and what to log per (level, task)."""
    contributions = expert_contributions(model, out, targets, out_size, sampled)
    terms, logged = [], {}
    for (lvl, task), c in contributions.items():
        q = torch.softmax(c / tau, dim=0)
        gbar = rank_mean(out.gates[(lvl, task)].mean(dim=(0, 1)))  # (E,), over the global batch
        sub = gbar
        if sampled is not None and len(sampled[(lvl, task)]) < len(gbar):
            idx = torch.tensor(sampled[(lvl, task)], device=gbar.device)
            sub = gbar[idx] / gbar[idx].sum().clamp_min(1e-12)
        terms.append((q * (q.clamp_min(1e-12).log() - sub.clamp_min(1e-12).log())).sum())
        entry = {"c": c.tolist(), "q": q.tolist(), "gate": gbar.detach().tolist()}
        if sampled is not None and len(sampled[(lvl, task)]) < len(gbar):
            entry["sampled"] = list(sampled[(lvl, task)])  # c and q are over these experts, in this order
        logged[f"{lvl}/{task}"] = entry
    return torch.stack(terms).mean(), logged
