"""PRISM's dual-stream block: the ViT's dense FFN beside a condition-routed mixture of experts.

    x (P, T, C), condition c (P, C)              P rows = (image, teacher or task) pairs, T tokens
      -> a = x + ls1(attn(norm1(x)))              the ViT block's attention, unchanged
      -> h = norm2(a)
      -> dense  = FFN(h)                          the ViT's own MLP (stream 1)
      -> moe    = shared(h) + sum_k w_k E_k(w_k h) routed experts, top-k of E per token (stream 2)
      -> g      = lo + (hi - lo) sigmoid(Wg h)     per-token stream gate in [lo, hi] (bias init 2.0)
      -> out    = a + ls2(g dense + (1 - g) moe)

Router (per block), conditioned by FiLM on the condition embedding c:
    f = h + sigmoid(Ws h) * ((1 + gamma(c)) h + beta(c) - h)     gamma, beta = Linear(c), zero-init
    logits = Wl f;  training only: 10% of logits set to -inf (expert dropout), then
    logits += randn * softplus(Wn f) (noisy gating)
    top-k logits -> softmax: the k weights of a token sum to 1; E_k sees its input scaled by its weight
    (w_k h) and its output is scaled again (the authors' "double weighting", kept for fidelity);
    a selected expert whose weight is <= 1e-6 is skipped, as in the authors' dispatch.
The balance term (prism_loss.balance_term) is computed from the BlockRouting this block returns.

Experts (shared and routed) are upcycled from the ViT's MLP: with hidden ratio 4 every expert starts as
an exact copy; other ratios copy the overlapping block. Numbers from the authors' configs and code
(github robotyingtang/PRISM-VFM, models/backbones/condition_moe_prism.py and router.py).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F
from timm.models.vision_transformer import Block

from sak.pipeline.base.errors import SakError

STREAM_GATE_BIAS = 2.0  # sigmoid(2) = 0.88: the dense stream dominates at init
EXPERT_DROPOUT = 0.1  # training-only share of router logits masked to -inf
MIN_ROUTE_WEIGHT = 1e-6  # a selected expert with a weight at or below this is not run for the token


@dataclass
class BlockRouting:
    """What one dual-stream block decided, rows aligned with the forward's pairs.

    logits (P, T, E) router logits (after dropout and noise in training); top_index (P, T, k) long;
    top_weight (P, T, k) softmax over the k chosen logits; stream_gate (P, T, 1) g, the dense stream's
    share.
    """

    block: int
    logits: torch.Tensor
    top_index: torch.Tensor
    top_weight: torch.Tensor
    stream_gate: torch.Tensor

    @property
    def num_experts(self) -> int:
        return int(self.logits.shape[-1])


class Expert(nn.Module):
    """Linear(C, H) -> exact GELU -> Linear(H, C): the ViT MLP's shape, so it can be upcycled from it."""

    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.gelu(self.fc1(x)))

    @torch.no_grad()
    def upcycle_from(self, mlp: nn.Module) -> None:
        """Copy the MLP's fc1/fc2; where the hidden widths differ, the overlapping block only."""
        for mine, theirs in ((self.fc1, mlp.fc1), (self.fc2, mlp.fc2)):
            rows = min(mine.weight.shape[0], theirs.weight.shape[0])
            cols = min(mine.weight.shape[1], theirs.weight.shape[1])
            mine.weight[:rows, :cols].copy_(theirs.weight[:rows, :cols])
            mine.bias[:rows].copy_(theirs.bias[:rows])


class ConditionedRouter(nn.Module):
    """Per-token logits over E experts, steered by a FiLM of the condition embedding (see module doc)."""

    def __init__(self, dim: int, num_experts: int, condition_dim: int, noisy: bool, expert_dropout: float):
        super().__init__()
        self.num_experts = num_experts
        self.noisy = noisy
        self.expert_dropout = expert_dropout
        self.film = nn.Linear(condition_dim, 2 * dim)  # -> (gamma, beta)
        self.film_gate = nn.Linear(dim, dim)  # how much of the FiLM shift each token takes
        self.logits = nn.Linear(dim, num_experts)
        self.noise = nn.Linear(dim, num_experts) if noisy else None
        nn.init.zeros_(self.film.weight)  # starts as the identity modulation
        nn.init.zeros_(self.film.bias)

    def forward(self, h: torch.Tensor, condition: torch.Tensor) -> torch.Tensor:
        """h (P, T, C), condition (P, Cc) -> logits (P, T, E)."""
        gamma, beta = self.film(condition).unsqueeze(1).chunk(2, dim=-1)  # (P, 1, C) each
        modulated = (1.0 + gamma) * h + beta
        f = h + torch.sigmoid(self.film_gate(h)) * (modulated - h)  # (P, T, C)
        logits = self.logits(f)  # (P, T, E)
        if self.training and self.expert_dropout > 0:
            dropped = torch.rand_like(logits) < self.expert_dropout
            # a token that lost every expert keeps them (its softmax would be NaN); same draws as before
            dropped = dropped & ~dropped.all(dim=-1, keepdim=True)
            logits = logits.masked_fill(dropped, float("-inf"))
        if self.training and self.noise is not None:
            logits = logits + torch.randn_like(logits) * F.softplus(self.noise(f))
        return logits


class RoutedExperts(nn.Module):
    """Shared expert + E routed experts with top-k dispatch. forward(h, condition) -> (out, routing parts)."""

    def __init__(
        self,
        dim: int,
        hidden: int,
        num_experts: int,
        top_k: int,
        condition_dim: int,
        noisy: bool,
        expert_dropout: float = EXPERT_DROPOUT,
        min_route_weight: float = MIN_ROUTE_WEIGHT,
    ):
        super().__init__()
        if not 1 <= top_k <= num_experts:
            raise SakError(f"top-k must be between 1 and the {num_experts} experts, got {top_k}")
        self.num_experts = num_experts
        self.top_k = top_k
        self.min_route_weight = min_route_weight
        self.shared_expert = Expert(dim, hidden)
        self.experts = nn.ModuleList([Expert(dim, hidden) for _ in range(num_experts)])
        self.router = ConditionedRouter(dim, num_experts, condition_dim, noisy, expert_dropout)

    def upcycle_from(self, mlp: nn.Module) -> None:
        self.shared_expert.upcycle_from(mlp)
        for expert in self.experts:
            expert.upcycle_from(mlp)

    def forward(self, h: torch.Tensor, condition: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """h (P, T, C) -> (out (P, T, C), logits (P, T, E), top_index (P, T, k), top_weight (P, T, k))."""
        P, T, C = h.shape
        logits = self.router(h, condition)  # (P, T, E)
        flat_logits = logits.reshape(P * T, self.num_experts)
        top_logits, top_index = flat_logits.topk(self.top_k, dim=-1)  # (P*T, k)
        top_weight = top_logits.softmax(dim=-1)  # (P*T, k), sums to 1 per token
        # (P*T, E): each token's weight on each expert, 0 where not chosen
        combine = torch.zeros_like(flat_logits).scatter_add(1, top_index, top_weight)

        tokens = h.reshape(P * T, C)
        routed = torch.zeros_like(tokens)
        # (token, expert) pairs to run, grouped by expert with tokens ascending: two host syncs per block
        token_ids, expert_ids = torch.nonzero(combine > self.min_route_weight, as_tuple=True)  # note: sync
        by_expert = torch.argsort(expert_ids, stable=True)
        token_ids, expert_ids = token_ids[by_expert], expert_ids[by_expert]
        counts = torch.bincount(expert_ids, minlength=self.num_experts).tolist()  # note: sync
        start = 0
        for e, (expert, n) in enumerate(zip(self.experts, counts)):
            if n == 0:
                continue
            rows = token_ids[start : start + n]  # (M,)
            start += n
            w = combine[:, e].index_select(0, rows).unsqueeze(1)  # (M, 1)
            out = expert(tokens.index_select(0, rows) * w) * w  # input and output both weighted
            routed = routed.index_add(0, rows, out)
        out = self.shared_expert(h) + routed.reshape(P, T, C)
        k = self.top_k
        return out, logits, top_index.reshape(P, T, k), top_weight.reshape(P, T, k)


class DualStreamBlock(nn.Module):
    """A timm ViT block whose FFN becomes PRISM's dense + routed streams; attention is the block's own.

    Built from the ViT block it replaces (its attention, norms and MLP move in); forward(x, condition)
    -> (x, BlockRouting).
    """

    def __init__(
        self,
        base: Block,
        block_index: int,
        num_experts: int,
        top_k: int,
        expert_hidden_ratio: float,
        gate_range: tuple[float, float],
        condition_dim: int,
        noisy: bool,
        expert_dropout: float = EXPERT_DROPOUT,
        min_route_weight: float = MIN_ROUTE_WEIGHT,
    ):
        super().__init__()
        lo, hi = gate_range
        if not 0.0 <= lo < hi <= 1.0:
            raise SakError(f"gate range {gate_range} must satisfy 0 <= lo < hi <= 1")
        self.block_index = block_index
        self.gate_range = (float(lo), float(hi))
        self.norm1, self.attn, self.ls1, self.drop_path1 = base.norm1, base.attn, base.ls1, base.drop_path1
        self.norm2, self.ls2, self.drop_path2 = base.norm2, base.ls2, base.drop_path2
        self.dense_ffn = base.mlp  # stream 1: the pretrained MLP itself
        dim = base.mlp.fc1.in_features
        self.moe = RoutedExperts(
            dim,
            int(dim * expert_hidden_ratio),
            num_experts,
            top_k,
            condition_dim,
            noisy,
            expert_dropout,
            min_route_weight,
        )
        self.moe.upcycle_from(base.mlp)
        self.stream_gate = nn.Linear(dim, 1)
        with torch.no_grad():
            self.stream_gate.bias.fill_(STREAM_GATE_BIAS)

    def gate(self, h: torch.Tensor) -> torch.Tensor:
        """h (P, T, C) -> g (P, T, 1) in [lo, hi]."""
        lo, hi = self.gate_range
        return lo + (hi - lo) * torch.sigmoid(self.stream_gate(h))

    def forward_tensors(self, x: torch.Tensor, condition: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """The block as a function of tensors only (for activation checkpointing)."""
        a = x + self.drop_path1(self.ls1(self.attn(self.norm1(x))))  # (P, T, C)
        h = self.norm2(a)
        dense = self.dense_ffn(h)
        moe, logits, top_index, top_weight = self.moe(h, condition)
        g = self.gate(h)  # (P, T, 1)
        out = a + self.drop_path2(self.ls2(g * dense + (1.0 - g) * moe))
        return out, logits, top_index, top_weight, g

    def forward(self, x: torch.Tensor, condition: torch.Tensor) -> tuple[torch.Tensor, BlockRouting]:
        out, logits, top_index, top_weight, g = self.forward_tensors(x, condition)
        return out, BlockRouting(self.block_index, logits, top_index, top_weight, g)
