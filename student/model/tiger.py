"""TIGER: instruction-guided token-level routing over frozen teachers (experts), our reading of the paper.

From the paper's abstract: frozen vision foundation models are the experts; a light routing network,
guided by a natural-language instruction per task, gives each token a weight per expert; a counterfactual
loss aligns the routing with each expert's causal contribution (the change of the prediction when it is
excluded). Everything below that is more specific is our reading (the authors' code is not public):

    experts   every cached teacher at every stored level, e = (teacher, block): (B, h_e, w_e, C_e)
              -> SAM's zero-padded part cropped away -> bilinear to one common grid (gh, gw)
              -> its own Linear(C_e, D)                                   z_e: (B, N, D), N = gh * gw
    routers   one per (output level l, task t): u = LN(Linear(E*D, H)(concat_e z_e, no gradient to z))
              FiLM by the task's instruction embedding s_t: h = u * (1 + gamma(s_t)) + beta(s_t)
              gates g = softmax_E(MLP(h))                                 (B, N, E), sum 1 per token
    fusion    f_{l,t} = sum_e g_e z_e  -> (B, D, gh, gw); the task's DecodeHead (stage 2's) over l = 0..L-1

The routers read the projected experts without gradient to the projections, so the counterfactual term
(which depends on the gates only) trains the routers and nothing else; the projections and heads learn
from the task losses through the fusion. `counterfactual` (student/train/tiger.py) uses `fuse` and
`decode` to re-run a head with one expert excluded. The router and the fusion are student/model/routing.py's
(shared with `sak-train stage2 --router tiger`).
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
import torch.nn.functional as F
from torch import nn

from sak.pipeline.base.errors import SakError
from sak.student.model.config import TigerModelConfig
from sak.student.model.multitask import DecodeHead
from sak.student.model.routing import InstructionRouter, TokenRouting, fuse_tokens

TigerOutput = TokenRouting  # preds, gates, experts (B, N, E, D) shared by the levels, fused, grid


class Tiger(nn.Module):
    """Projections, routers (per level and task) and heads (per task); the instruction embeddings are a
    buffer (T, text_dim) computed once by a frozen text encoder and stored with the run."""

    def __init__(self, config: TigerModelConfig, instructions: torch.Tensor):
        super().__init__()
        E, T = len(config.experts), len(config.tasks)
        if E < 2:
            raise SakError(f"TIGER routes between experts: got {E}; cache more teachers or levels")
        if tuple(instructions.shape) != (T, config.text_dim):
            raise SakError(f"instruction embeddings {tuple(instructions.shape)} != ({T}, {config.text_dim})")
        self.config = config
        self.tasks = dict(config.tasks)
        self.task_order = [t for t, _ in config.tasks]
        self.register_buffer("instructions", instructions.float().clone())
        self.proj = nn.ModuleList([nn.Linear(e.dim, config.dim) for e in config.experts])
        self.routers = nn.ModuleDict(
            {
                f"{lvl}_{t}": InstructionRouter(E, config.dim, config.text_dim, config.router_hidden)
                for lvl in range(config.num_levels)
                for t in self.task_order
            }
        )
        self.heads = nn.ModuleDict({t: DecodeHead(config.dim, n, config.num_levels) for t, n in config.tasks})

    @property
    def expert_names(self) -> list[str]:
        return [e.name for e in self.config.experts]

    def router(self, level: int, task: str) -> InstructionRouter:
        return self.routers[f"{level}_{task}"]

    def router_parameters(self) -> list[nn.Parameter]:
        return list(self.routers.parameters())

    def align(self, maps: Mapping[str, list[torch.Tensor]]) -> torch.Tensor:
        """{teacher: [(B, h, w, C)] per stored level} -> projected experts (B, N, E, D) on the common grid."""
        out = []
        for spec, proj in zip(self.config.experts, self.proj):
            try:
                x = maps[spec.teacher][spec.position]
            except (KeyError, IndexError):
                raise SakError(
                    f"expert {spec.name}: its teacher's level is missing from the targets"
                ) from None
            if x.shape[-1] != spec.dim:
                raise SakError(f"expert {spec.name}: width {x.shape[-1]}, the model expects {spec.dim}")
            h, w = x.shape[1:3]
            vh, vw = max(1, round(h * spec.valid[0])), max(1, round(w * spec.valid[1]))
            x = x[:, :vh, :vw].permute(0, 3, 1, 2).float()  # (B, C, vh, vw)
            if (vh, vw) != tuple(self.config.grid):
                x = F.interpolate(x, size=self.config.grid, mode="bilinear", align_corners=False)
            out.append(proj(x.flatten(2).transpose(1, 2)))  # (B, N, D)
        return torch.stack(out, dim=2)

    def fuse(self, gates: torch.Tensor, experts: torch.Tensor) -> torch.Tensor:
        """gates (B, N, E), experts (B, N, E, D) -> fused map (B, D, gh, gw)."""
        return fuse_tokens(gates, experts, tuple(self.config.grid))

    def decode(self, task: str, fused: list[torch.Tensor], out_size: tuple[int, int]) -> torch.Tensor:
        return self.heads[task](fused, out_size)

    def forward(self, maps: Mapping[str, list[torch.Tensor]], out_size: tuple[int, int]) -> TigerOutput:
        experts = self.align(maps)
        route_in = experts.detach()  # routers never send gradient into the projections
        gates, fused, preds = {}, {}, {}
        for k, task in enumerate(self.task_order):
            for lvl in range(self.config.num_levels):
                g = self.router(lvl, task)(route_in, self.instructions[k])
                gates[(lvl, task)] = g
                fused[(lvl, task)] = self.fuse(g, experts)
            preds[task] = self.decode(
                task, [fused[(lvl, task)] for lvl in range(self.config.num_levels)], out_size
            )
        return TigerOutput(preds, gates, experts, fused, tuple(self.config.grid))
