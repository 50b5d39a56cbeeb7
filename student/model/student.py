"""The SAK student: Teacher-Agnostic Stem (a timm ViT) + one Teacher-Specific Adapter Path per teacher.

    images (B, 3, H, W)
      -> stem: patch embed + pos embed (+ pos_drop, norm_pre)      Z0 (B, 1+N, C)   R0 = a0(Z0)
      -> block l (l = 1..L)                                        Zl = b_l(Z(l-1)) Rl = al(R(l-1) + Zl)
      -> at tapped blocks: drop CLS, LayerNorm per teacher          expert map (B, C, h, w)
      -> only for distillation, when widths differ: Linear aligner  distill map (B, C_teacher, h, w)

The stem stream Z is never modified by the adapters. Stage 2 (routers, task heads) builds on
`forward_features`, which returns the stem's and every teacher path's per-level maps before any aligner.

Module attributes are named so that the paper code's state_dict converts by a plain key mapping
(see student/model/weights.py): `stem.*` (paper `vit.*`), `adapter_paths.<teacher>.<i>.*` (paper `tsap.*`),
`level_norms.<teacher>.<block>.*` (paper `out_norms.<block>_<teacher>.*`), `aligners.<teacher>.<block>.*`
(paper `ts_aligners.<block>_<teacher>.*`).
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import lru_cache

import timm
import torch
import torch.nn as nn
import torch.nn.functional as F
from timm.layers import resample_abs_pos_embed
from timm.models.vision_transformer import VisionTransformer
from torch.utils.checkpoint import checkpoint

from sak.pipeline.base.errors import SakError
from sak.pipeline.teachers.specs import tap_levels  # the one level-tap rule, shared with the teachers
from sak.student.model.config import StudentArch, StudentConfig

ADAPTER_REDUCTION = 4  # down-projection C -> C/4 (paper B.1)
LEVEL_NORM_EPS = 1e-5  # per-level LayerNorm; note the ViT's own norms use 1e-6
INIT_STD = 0.02

# ----------------------------------------------------------------------------------------------
# adapter


@lru_cache(maxsize=1)
def _fused_adapter() -> Callable[..., torch.Tensor]:
    try:
        module = importlib.import_module("sak.kernels.adapter")
    except ModuleNotFoundError as e:
        if e.name != "sak.kernels.adapter":
            raise
        raise SakError(
            "use_kernels=True but sak.kernels.adapter is not installed; set use_kernels=False"
        ) from e
    return module.fused_adapter


def adapter_forward(
    x: torch.Tensor,
    down: nn.Linear,
    up: nn.Linear,
    scale: torch.Tensor,
    z: torch.Tensor | None = None,
    *,
    use_kernels: bool = False,
) -> torch.Tensor:
    """u = x (+ z); u + scale * up(GELU(down(u))). The one place the TSAP math lives.

    x, z: (B, T, C); down: C -> C/4; up: C/4 -> C; scale: (1,).
    """
    if use_kernels:
        return _fused_adapter()(x, down.weight, down.bias, up.weight, up.bias, scale, z)
    u = x if z is None else x + z  # (B, T, C); a new tensor, so the stem stream z stays untouched
    return u + scale * up(F.gelu(down(u)))  # exact (erf) GELU


class Adapter(nn.Module):
    """Houlsby bottleneck with a learnable scalar scale (paper eq. 3)."""

    def __init__(self, dim: int, reduction: int = ADAPTER_REDUCTION):
        super().__init__()
        self.down = nn.Linear(dim, dim // reduction)
        self.up = nn.Linear(dim // reduction, dim)
        self.scale = nn.Parameter(torch.ones(1))
        for lin in (self.down, self.up):
            nn.init.trunc_normal_(lin.weight, std=INIT_STD)
            nn.init.zeros_(lin.bias)

    def forward(
        self, x: torch.Tensor, z: torch.Tensor | None = None, use_kernels: bool = False
    ) -> torch.Tensor:
        return adapter_forward(x, self.down, self.up, self.scale, z, use_kernels=use_kernels)


# ----------------------------------------------------------------------------------------------
# model


@dataclass
class StudentFeatures:
    """Per-level maps of one forward pass, before any aligner (what stage 2 routes between).

    levels: the tapped 0-based block indices.
    stem_levels: [(B, C, h, w)] raw stem patch tokens Zl (the teacher-agnostic expert, router input).
    teacher_levels: {teacher: [(B, C, h, w)]} LayerNorm(Rl) patch tokens (the teacher-specific experts).
    """

    levels: list[int]
    stem_levels: list[torch.Tensor]
    teacher_levels: dict[str, list[torch.Tensor]] = field(default_factory=dict)

    def experts(self, level: int) -> list[torch.Tensor]:
        """The E = teachers + 1 expert maps at the level-th tapped level: stem first, then teachers in order."""
        return [self.stem_levels[level]] + [maps[level] for maps in self.teacher_levels.values()]


@dataclass
class StudentOutput:
    """forward(): the maps to distil plus the features they came from.

    distill_maps: {teacher: [(B, C_teacher, h, w)]}, one per tapped level, after the aligner if any.
    """

    distill_maps: dict[str, list[torch.Tensor]]
    features: StudentFeatures


def build_stem(
    arch: StudentArch, img_size: int = 384, pretrained: bool = False, dynamic_img_size: bool = False
) -> VisionTransformer:
    """The registered timm ViT with its classifier head and final norm removed (both unused by SAK)."""
    stem = timm.create_model(
        arch.timm_name,
        pretrained=pretrained,
        num_classes=0,
        img_size=img_size,
        dynamic_img_size=dynamic_img_size,
        **dict(arch.overrides),
    )
    if not isinstance(stem, VisionTransformer):
        raise SakError(f"{arch.timm_name} builds {type(stem).__name__}, expected a timm VisionTransformer")
    # no final norm for taps; an Identity also keeps DDP from seeing parameters without gradients
    stem.norm = nn.Identity()
    return stem


class SakStudent(nn.Module):
    """Teacher-Agnostic Stem + one Teacher-Specific Adapter Path per teacher (stage 1 of SAK).

    forward(images) -> StudentOutput(distill_maps, features); forward_features(images) -> StudentFeatures;
    align(features) -> distill_maps. Stage 2 adds routers and heads on top of forward_features. Built by
    the student registry (type "sak"; student/model/registry.py) from the config and the registered arch.
    """

    def __init__(self, config: StudentConfig, arch: StudentArch):
        super().__init__()
        names = [t.name for t in config.teachers]
        if not names:
            raise SakError("the student needs at least one teacher (one adapter path per teacher)")
        if len(set(names)) != len(names):
            raise SakError(f"teacher names must be unique, got {names}")
        for n in names:
            if not n or "." in n:
                raise SakError(f"teacher name {n!r} cannot name a module (empty or contains a dot)")
        self.config = config
        self.use_kernels = config.use_kernels  # may be flipped later; checked at each forward
        if config.use_kernels:
            _fused_adapter()  # fail now, not mid-training, when the kernel module is missing

        self.stem = build_stem(arch, config.img_size, config.pretrained, config.dynamic_img_size)
        dim = self.stem.embed_dim
        depth = len(self.stem.blocks)
        self.levels = tap_levels(depth)
        self.num_prefix_tokens = self.stem.num_prefix_tokens  # 1 (CLS) for these ViTs
        mean, std = self.stem.pretrained_cfg["mean"], self.stem.pretrained_cfg["std"]
        self.input_mean: tuple[float, ...] = tuple(mean)  # for the data loader's Normalize
        self.input_std: tuple[float, ...] = tuple(std)

        # L+1 adapters per teacher: index 0 after the patch embedding, index l after block l (1-based)
        self.adapter_paths = nn.ModuleDict(
            {t.name: nn.ModuleList([Adapter(dim) for _ in range(depth + 1)]) for t in config.teachers}
        )
        # keyed by the 0-based block index, as str because ModuleDict keys are strings
        self.level_norms = nn.ModuleDict(
            {
                t.name: nn.ModuleDict({str(b): nn.LayerNorm(dim, eps=LEVEL_NORM_EPS) for b in self.levels})
                for t in config.teachers
            }
        )
        # distillation-only channel aligners, only for teachers whose width differs from the stem's
        self.aligners = nn.ModuleDict(
            {
                t.name: nn.ModuleDict({str(b): self._make_aligner(dim, t.dim) for b in self.levels})
                for t in config.teachers
                if t.dim != dim
            }
        )

    @staticmethod
    def _make_aligner(dim: int, teacher_dim: int) -> nn.Linear:
        lin = nn.Linear(dim, teacher_dim)
        nn.init.trunc_normal_(lin.weight, std=INIT_STD)
        nn.init.zeros_(lin.bias)
        return lin

    @property
    def teacher_names(self) -> list[str]:
        return [t.name for t in self.config.teachers]

    @property
    def embed_dim(self) -> int:
        return self.stem.embed_dim

    @property
    def token_grid(self) -> tuple[int, int]:
        """(h, w) patch grid of the input size the position embedding is built for."""
        return tuple(self.stem.patch_embed.grid_size)

    def resize_input(self, img_size: tuple[int, int]) -> None:
        """Resample the stem's absolute position embedding from its current grid to img_size (H, W).

        Stage 2 calls it after loading the stage-1 weights (built for 384x384) to train at, e.g., 512x512 or
        448x576. Bicubic, prefix (CLS) position kept, as timm's resample_abs_pos_embed does it.
        """
        stem = self.stem
        old_grid = tuple(stem.patch_embed.grid_size)
        stem.patch_embed.set_input_size(img_size=tuple(img_size))
        new_grid = tuple(stem.patch_embed.grid_size)
        if stem.pos_embed is not None and new_grid != old_grid:
            prefix = 0 if stem.no_embed_class else stem.num_prefix_tokens
            with torch.no_grad():
                resampled = resample_abs_pos_embed(
                    stem.pos_embed.data,
                    new_size=list(new_grid),
                    old_size=list(old_grid),
                    num_prefix_tokens=prefix,
                )
            stem.pos_embed = nn.Parameter(resampled, requires_grad=stem.pos_embed.requires_grad)

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        """Recompute stem blocks in backward (the adapters are cheap and keep their activations)."""
        self.stem.set_grad_checkpointing(enable)

    def num_parameters(self, include_aligners: bool = False) -> int:
        """Parameters of the deployed student (stem + adapter paths + level norms); aligners optional."""
        n = sum(p.numel() for p in self.parameters())
        if not include_aligners:
            n -= sum(p.numel() for p in self.aligners.parameters())
        return n

    @staticmethod
    def _patch_map(patches: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
        B, _, C = patches.shape  # (B, N, C) -> (B, C, h, w), a view
        return patches.reshape(B, grid[0], grid[1], C).permute(0, 3, 1, 2)

    def forward_features(self, images: torch.Tensor) -> StudentFeatures:
        """images (B, 3, H, W) -> stem and teacher-path maps at every tapped level, before aligners."""
        stem = self.stem
        grid = stem.patch_embed.dynamic_feat_size(images.shape[-2:])  # (h, w)
        z = stem.patch_embed(images)
        z = stem._pos_embed(z)  # adds CLS + position embedding, then pos_drop
        z = stem.patch_drop(z)
        z = stem.norm_pre(z)  # Z0 (B, 1+N, C): the tokens entering block 0

        teachers = self.teacher_names
        r = {t: self.adapter_paths[t][0](z, use_kernels=self.use_kernels) for t in teachers}  # R0 = a0(Z0)
        features = StudentFeatures(
            levels=list(self.levels), stem_levels=[], teacher_levels={t: [] for t in teachers}
        )
        for i, block in enumerate(stem.blocks):
            if stem.grad_checkpointing and torch.is_grad_enabled():
                z = checkpoint(block, z, use_reentrant=False)
            else:
                z = block(z)  # Z(i+1) (B, 1+N, C)
            for t in teachers:
                r[t] = self.adapter_paths[t][i + 1](r[t], z, use_kernels=self.use_kernels)  # al(R(l-1) + Zl)
            if i in self.levels:  # drop the prefix (CLS) tokens only here
                P = self.num_prefix_tokens
                features.stem_levels.append(self._patch_map(z[:, P:], grid))
                for t in teachers:
                    normed = self.level_norms[t][str(i)](r[t][:, P:])  # (B, N, C)
                    features.teacher_levels[t].append(self._patch_map(normed, grid))
        return features

    def align(self, features: StudentFeatures) -> dict[str, list[torch.Tensor]]:
        """Distillation maps {teacher: [(B, C_teacher, h, w)]}: aligner where widths differ, else as is."""
        out: dict[str, list[torch.Tensor]] = {}
        for t, maps in features.teacher_levels.items():
            if t not in self.aligners:
                out[t] = list(maps)
                continue
            aligned = []
            for b, m in zip(features.levels, maps):
                lin = self.aligners[t][str(b)]
                aligned.append(lin(m.permute(0, 2, 3, 1)).permute(0, 3, 1, 2))  # channels-last Linear
            out[t] = aligned
        return out

    def forward(self, images: torch.Tensor) -> StudentOutput:
        features = self.forward_features(images)
        return StudentOutput(distill_maps=self.align(features), features=features)
