"""Token-level instruction routing, shared by TIGER (student/model/tiger.py: frozen teachers as experts)
and `sak-train stage2 --router tiger` (student/model/multitask.py: the SAK student's experts).

    experts   per level l: E maps on one token grid, stacked         (B, N, E, D), N = gh * gw
    router    u = LN(Linear(E*D, H)(concat_e experts))               read without gradient to the experts
              FiLM by the task's instruction embedding s_t: h = u * (1 + gamma(s_t)) + beta(s_t)
              gates g = softmax_E(MLP(h))                            (B, N, E), sum 1 per token
    fusion    f = sum_e g_e x_e                                      (B, D, gh, gw)

`TokenRouting` is what a routed forward pass hands the counterfactual loss (student/train/counterfactual.py):
levels indexed 0..L-1, the experts each level routed, its gates and fused maps, and the predictions.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn


class InstructionRouter(nn.Module):
    """Per-token gates over E experts, conditioned on the tokens' expert features and one instruction."""

    def __init__(self, num_experts: int, dim: int, text_dim: int, hidden: int):
        super().__init__()
        self.inp = nn.Linear(num_experts * dim, hidden)
        self.norm = nn.LayerNorm(hidden, elementwise_affine=False)
        self.film = nn.Linear(text_dim, 2 * hidden)
        self.mlp = nn.Sequential(nn.Linear(hidden, hidden), nn.GELU(), nn.Linear(hidden, num_experts))

    def forward(self, experts: torch.Tensor, instruction: torch.Tensor) -> torch.Tensor:
        """experts (B, N, E, D), instruction (text_dim,) -> gates (B, N, E), softmax over E."""
        u = self.norm(self.inp(experts.flatten(2)))  # (B, N, H)
        gamma, beta = self.film(instruction).chunk(2, dim=-1)  # (H,) each
        return self.mlp(u * (1 + gamma) + beta).softmax(dim=-1)


def fuse_tokens(gates: torch.Tensor, experts: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
    """gates (B, N, E), experts (B, N, E, D) -> the gate-weighted sum as a map (B, D, gh, gw)."""
    fused = torch.einsum("bne,bned->bnd", gates, experts)
    B, _, D = fused.shape
    return fused.transpose(1, 2).reshape(B, D, *grid)


def tokens_of(maps: list[torch.Tensor]) -> torch.Tensor:
    """E maps (B, D, gh, gw) -> the experts' tokens stacked (B, N, E, D)."""
    return torch.stack([x.flatten(2).transpose(1, 2) for x in maps], dim=2)


@dataclass
class TokenRouting:
    """A token-routed forward pass: what the counterfactual loss re-runs with one expert excluded."""

    preds: dict[str, torch.Tensor]  # task -> (B, outputs, H, W)
    gates: dict[tuple[int, str], torch.Tensor]  # (level, task) -> (B, N, E), level 0..L-1
    experts: torch.Tensor | list[torch.Tensor]  # (B, N, E, D): one for every level, or one per level
    fused: dict[tuple[int, str], torch.Tensor]  # (level, task) -> (B, D, gh, gw)
    grid: tuple[int, int]  # (gh, gw)

    @property
    def num_levels(self) -> int:
        return len({lvl for lvl, _ in self.gates})

    @property
    def num_experts(self) -> int:
        return int(next(iter(self.gates.values())).shape[-1])

    def experts_at(self, level: int) -> torch.Tensor:
        return self.experts[level] if isinstance(self.experts, list) else self.experts
