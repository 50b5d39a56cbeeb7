"""Stage 2 of SAK: Mixture-of-Representations routers and task heads on top of the stage-1 student.

    images (B, 3, H, W)
      -> SakStudent.forward_features                       per tapped level l: stem Zl + one map per teacher
      -> router r_l^t (one per level and task) on Zl       gates g (B, E), E = teachers + 1
      -> sum_e g[:, e] * expert_e                          routed map (B, C, h, w) per level and task
      -> head t: 4 levels -> C/4 each -> 1/4 input -> C    logits (B, out_t, H/4, W/4)
      -> bilinear to the input size                        preds[t] (B, out_t, H, W)

The student is used untouched; `SakMultiTask.distill_maps` come from `SakStudent.align`, so stage-2
training can keep the distillation loss (paper eq. 6: task loss + gamma * distillation loss).

Module names follow the paper code so its state_dict keys come out unchanged:
    mor.<block>_<task>.router.module.{0,1,3}.*      Linear(C, C/2), LayerNorm(C/2), -, Linear(C/2, 2E)
    heads.<task>.linears.<i>.*                      per-level Linear(C, C/4), i = 0..3
    heads.<task>.linear_fuse.{0,1}.*                Conv3x3(C, C) (with bias), BatchNorm2d(C)
    heads.<task>.last_conv.*                        Conv1x1(C, outputs)
<block> is the 0-based stem block of the level (2, 5, 8, 11 for ViT-B), <task> the paper's task name.
The student's own weights sit under `student.*` (see student/model/weights.py for the paper's `vit.*`).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Literal

import torch
import torch.nn as nn
import torch.nn.functional as F

from sak.pipeline.base.errors import SakError
from sak.student.model.routing import InstructionRouter, TokenRouting, fuse_tokens, tokens_of
from sak.student.model.student import INIT_STD, SakStudent

ROUTER_NOISE_FLOOR = 1e-2  # noise std = softplus(raw) + 1e-2 (paper code)
HEAD_REDUCTION = 4  # per-level Linear C -> C/4; 4 levels concatenated give C again

# Task names as the paper code spells them (they appear in state_dict keys) and their output channels.
# Saliency is one logit trained with class-balanced BCE (the paper code uses 2-class CE: 2 channels).
PASCAL_CONTEXT_TASKS: dict[str, int] = {"semseg": 21, "human_parts": 7, "sal": 1, "normals": 3, "edge": 1}
NYUD_TASKS: dict[str, int] = {"semseg": 40, "normals": 3, "edge": 1, "depth": 1}
DATASET_TASKS: dict[str, dict[str, int]] = {"pascal_context": PASCAL_CONTEXT_TASKS, "nyud": NYUD_TASKS}
RouterKind = Literal["mor", "sum", "tiger"]


def _init_linear(m: nn.Linear) -> None:
    nn.init.trunc_normal_(m.weight, std=INIT_STD)
    nn.init.zeros_(m.bias)


# ----------------------------------------------------------------------------------------------
# router


class GlobalRouter(nn.Module):
    """Token MLP then mean over tokens: (B, N, C) -> (B, 2E) logits (clean half, noise half)."""

    def __init__(self, dim: int, num_logits: int):
        super().__init__()
        self.module = nn.Sequential(
            nn.Linear(dim, dim // 2),  # module.0
            nn.LayerNorm(dim // 2),  # module.1
            nn.GELU(),  # module.2, no parameters
            nn.Linear(dim // 2, num_logits),  # module.3
        )
        for m in self.module:
            if isinstance(m, nn.Linear):
                _init_linear(m)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.module(tokens).mean(dim=1)  # (B, N, 2E) -> (B, 2E)


class MoRRouter(nn.Module):
    """Mixture-of-Representations router for one (level, task): one global gate per image and expert.

    forward(stem_map, experts) -> (routed (B, C, h, w), gates (B, E)). Training adds
    randn * (softplus(noise logits) + 1e-2) to the clean logits (noisy gating); eval uses them as is.
    """

    def __init__(self, dim: int, num_experts: int):
        super().__init__()
        self.num_experts = num_experts
        self.router = GlobalRouter(dim, 2 * num_experts)

    def gates(self, stem_map: torch.Tensor) -> torch.Tensor:
        """stem_map (B, C, h, w) -> softmax gates (B, E)."""
        tokens = stem_map.flatten(2).transpose(1, 2)  # (B, N, C)
        clean, raw_noise = self.router(tokens).chunk(2, dim=1)  # (B, E) each
        if self.training:
            clean = clean + torch.randn_like(clean) * (F.softplus(raw_noise) + ROUTER_NOISE_FLOOR)
        return clean.softmax(dim=1)

    def forward(
        self, stem_map: torch.Tensor, experts: list[torch.Tensor]
    ) -> tuple[torch.Tensor, torch.Tensor]:
        if len(experts) != self.num_experts:
            raise SakError(f"router built for {self.num_experts} experts got {len(experts)}")
        g = self.gates(stem_map)  # (B, E)
        routed = sum(g[:, e, None, None, None] * x for e, x in enumerate(experts))  # (B, C, h, w)
        return routed, g


# ----------------------------------------------------------------------------------------------
# head


class DecodeHead(nn.Module):
    """Per-level Linear(C, C/4) -> 1/4 input grid -> concat (C) -> Conv3x3 -> BN -> GELU -> Conv1x1.

    forward(maps [(B, C, h, w)] x levels, out_size (H, W)) -> logits (B, outputs, H, W).
    """

    def __init__(self, dim: int, outputs: int, num_levels: int = 4):
        super().__init__()
        embed = dim // HEAD_REDUCTION
        if embed * num_levels != dim:
            raise SakError(
                f"head needs C divisible by {HEAD_REDUCTION} with {num_levels} levels, got C={dim}"
            )
        self.embed = embed
        self.linears = nn.ModuleList([nn.Linear(dim, embed) for _ in range(num_levels)])
        self.linear_fuse = nn.Sequential(
            nn.Conv2d(dim, dim, kernel_size=3, padding=1), nn.BatchNorm2d(dim), nn.GELU()
        )
        self.last_conv = nn.Conv2d(dim, outputs, kernel_size=1)
        for lin in self.linears:
            _init_linear(lin)
        for conv in (self.linear_fuse[0], self.last_conv):  # fan-out normal init, as the paper code
            fan_out = conv.kernel_size[0] * conv.kernel_size[1] * conv.out_channels
            nn.init.normal_(conv.weight, std=math.sqrt(2.0 / fan_out))
            nn.init.zeros_(conv.bias)

    def forward(self, maps: list[torch.Tensor], out_size: tuple[int, int]) -> torch.Tensor:
        quarter = (out_size[0] // 4, out_size[1] // 4)
        feats = []
        for lin, m in zip(self.linears, maps, strict=True):
            B, _, h, w = m.shape
            x = lin(m.flatten(2).transpose(1, 2))  # (B, N, C/4)
            x = x.transpose(1, 2).reshape(B, self.embed, h, w)  # back to the grid
            feats.append(F.interpolate(x, size=quarter, mode="bilinear", align_corners=False))
        x = self.linear_fuse(torch.cat(feats, dim=1))  # (B, C, H/4, W/4)
        x = self.last_conv(x)  # (B, outputs, H/4, W/4)
        return F.interpolate(x, size=out_size, mode="bilinear", align_corners=False)


# ----------------------------------------------------------------------------------------------
# wrapper


class SakMultiTask(nn.Module):
    """Stage-1 SakStudent + one router per (level, task) + one decode head per task.

    tasks: {task name: output channels}, in a fixed order (e.g. PASCAL_CONTEXT_TASKS).
    router: "mor" (the paper), "sum" (ablation: experts summed with weight 1, no router) or "tiger"
    (TIGER's token-level instruction router, student/model/routing.py, over the same E experts; needs
    `instructions` (T, text_dim), one embedding per task in `tasks` order, kept as a buffer).
    forward(images) -> (preds {task: (B, out, H, W)}, gates {(block, task): (B, E)}, distill_maps).
    With router="sum" the gates are all ones (the fixed weights used); with "tiger" they are per token
    (B, N, E), and forward(images, routing=True) adds the TokenRouting the counterfactual loss re-runs.
    """

    def __init__(
        self,
        student: SakStudent,
        tasks: Mapping[str, int],
        router: RouterKind = "mor",
        instructions: torch.Tensor | None = None,
        router_hidden: int = 64,
    ):
        super().__init__()
        if router not in ("mor", "sum", "tiger"):
            raise SakError(f"unknown router {router!r}; known: mor, sum, tiger")
        if not tasks:
            raise SakError("stage 2 needs at least one task")
        for t in tasks:
            if not t or "." in t:
                raise SakError(f"task name {t!r} cannot name a module (empty or contains a dot)")
        self.student = student
        self.tasks = dict(tasks)
        self.router_kind = router
        self.levels = list(student.levels)  # 0-based stem blocks
        dim = student.embed_dim
        self.num_experts = len(student.teacher_names) + 1
        self.mor = nn.ModuleDict(
            {
                f"{b}_{t}": MoRRouter(dim, self.num_experts)
                for b in self.levels
                for t in self.tasks
                if router == "mor"
            }
        )
        self.heads = nn.ModuleDict({t: DecodeHead(dim, n, len(self.levels)) for t, n in self.tasks.items()})
        self.router_hidden = router_hidden
        self.tiger = nn.ModuleDict()
        if router == "tiger":
            if instructions is None or instructions.dim() != 2 or instructions.shape[0] != len(self.tasks):
                raise SakError("--router tiger needs one instruction embedding per task (T, text_dim)")
            self.register_buffer("instructions", instructions.float().clone())
            text_dim = int(instructions.shape[1])
            for b in self.levels:
                for t in self.tasks:
                    self.tiger[f"{b}_{t}"] = InstructionRouter(self.num_experts, dim, text_dim, router_hidden)

    @property
    def task_order(self) -> list[str]:
        return list(self.tasks)

    def decode(self, task: str, maps: list[torch.Tensor], out_size: tuple[int, int]) -> torch.Tensor:
        return self.heads[task](maps, out_size)

    def freeze_backbone(self) -> None:
        """Freeze the stem, adapter paths, level norms and aligners: only routers and heads train."""
        for p in self.student.parameters():
            p.requires_grad_(False)

    def trainable_parameters(self) -> list[nn.Parameter]:
        return [p for p in self.parameters() if p.requires_grad]

    def num_router_parameters(self) -> int:
        return sum(p.numel() for p in self.mor.parameters()) + sum(p.numel() for p in self.tiger.parameters())

    def num_head_parameters(self) -> int:
        return sum(p.numel() for p in self.heads.parameters())

    def forward(self, images: torch.Tensor, routing: bool = False) -> tuple:
        """-> (preds, gates, distill_maps), plus the TokenRouting when routing=True (router "tiger")."""
        features = self.student.forward_features(images)
        B = images.shape[0]
        routed: dict[str, list[torch.Tensor]] = {t: [] for t in self.tasks}
        gates: dict[tuple[int, str], torch.Tensor] = {}
        token = TokenRouting({}, {}, [], {}, (0, 0))  # level-indexed record of the tiger router
        for i, block in enumerate(features.levels):
            experts = features.experts(i)  # [(B, C, h, w)] x E: stem first, then teachers in order
            if self.router_kind == "tiger":
                self._route_tokens(i, block, experts, routed, gates, token)
                continue
            if self.router_kind == "sum":
                total = torch.stack(experts).sum(0)  # (B, C, h, w), shared by all tasks
                ones = experts[0].new_ones(B, len(experts))
                for t in self.tasks:
                    routed[t].append(total)
                    gates[(block, t)] = ones
                continue
            for t in self.tasks:
                fused, g = self.mor[f"{block}_{t}"](features.stem_levels[i], experts)
                routed[t].append(fused)
                gates[(block, t)] = g
        out_size = (images.shape[-2], images.shape[-1])
        preds = {t: self.heads[t](routed[t], out_size) for t in self.tasks}
        distill_maps = self.student.align(features)
        if routing:
            if self.router_kind != "tiger":
                raise SakError(f"routing=True needs the tiger router, not {self.router_kind!r}")
            token.preds = preds
            return preds, gates, distill_maps, token
        return preds, gates, distill_maps

    def _route_tokens(self, i, block, experts, routed, gates, token: TokenRouting) -> None:
        """Level i: per-token instruction gates over the E experts, per task (routers read the experts
        without gradient, so a counterfactual term trains the routers only)."""
        tokens = tokens_of(experts)  # (B, N, E, C)
        grid = tuple(experts[0].shape[-2:])
        token.grid = grid
        token.experts.append(tokens)
        for k, t in enumerate(self.tasks):
            g = self.tiger[f"{block}_{t}"](tokens.detach(), self.instructions[k])  # (B, N, E)
            fused = fuse_tokens(g, tokens, grid)
            routed[t].append(fused)
            gates[(block, t)] = g
            token.gates[(i, t)] = g
            token.fused[(i, t)] = fused


# ------------------------------------------------------------------------- the authors' stage-2 checkpoints


def convert_paper_stage2_state_dict(
    paper_state_dict: Mapping[str, torch.Tensor], teacher_map: Mapping[str, str], model: SakMultiTask
) -> dict[str, torch.Tensor]:
    """The paper code's stage-2 state_dict -> ours, checked against `model`'s keys and shapes.

    The backbone keys (`vit.*`, `tsap.*`, `out_norms.*`, `ts_aligners.*`) go through the stage-1
    converter; `mor.*` and `heads.*` already have our names. The paper code's saliency head predicts two
    classes (cross-entropy); ours one logit (balanced BCE). softmax(z)[1] = sigmoid(z1 - z0), so the
    difference of the two output rows of `heads.sal.last_conv` is the exact single logit.
    """
    from sak.student.model.weights import convert_paper_state_dict

    ours = model.state_dict()
    backbone = {k: v for k, v in paper_state_dict.items() if not k.startswith(("mor.", "heads."))}
    expected = {k: v.shape for k, v in model.student.state_dict().items()}
    out = {f"student.{k}": v for k, v in convert_paper_state_dict(backbone, teacher_map, expected).items()}
    for key, value in paper_state_dict.items():
        if key.startswith(("mor.", "heads.")):
            if key.startswith("heads.sal.last_conv.") and value.shape[0] == 2 and ours[key].shape[0] == 1:
                value = (value[1] - value[0]).unsqueeze(0)  # two-class logits -> one sigmoid logit
            out[key] = value
    missing = sorted(set(ours) - set(out))
    extra = sorted(set(out) - set(ours))
    if missing or extra:
        raise SakError(
            f"paper stage-2 checkpoint does not fit this model: missing {missing[:3]}, unexpected {extra[:3]}; "
            f"check --tasks, --router and the teachers"
        )
    for key, value in out.items():
        if value.shape != ours[key].shape:
            raise SakError(
                f"paper key for {key!r} has shape {tuple(value.shape)}, the model expects "
                f"{tuple(ours[key].shape)}"
            )
    return out


def load_paper_stage2_checkpoint(
    model: SakMultiTask, source: str | Mapping[str, torch.Tensor], teacher_map: Mapping[str, str]
) -> None:
    """Load the authors' stage-2 checkpoint (a file or a state_dict) into `model`, strictly."""
    from sak.student.model.weights import read_paper_checkpoint

    sd = source if isinstance(source, Mapping) else read_paper_checkpoint(source)
    model.load_state_dict(convert_paper_stage2_state_dict(sd, teacher_map, model), strict=True)
