"""PRISM's student (arXiv 2606.03444): a timm ViT whose tapped blocks are dual-stream mixtures of experts
routed by a condition: the teacher being distilled (stage 1) or the task being predicted (stage 2).

    images (B, 3, H, W)
      -> patch embed + pos embed, blocks before the first MoE block      once per image (condition-free)
      -> gather rows: one per (image, condition) pair                    (P, 1+N, C), P = len(pairs)
      -> blocks; MoE blocks (prism_moe.DualStreamBlock) routed by the condition embedding of each row
      -> at tapped blocks: the ViT's final LayerNorm (eps 1e-6), CLS dropped      level map (P, C, h, w)
      -> stage 1: per teacher and level, an MLP projector C -> C -> C_teacher      distill map

Every teacher on every image is `pairs_every_teacher` (the cache makes every teacher's target free); the
authors' balanced one-teacher-per-image assignment is `assign_teachers(..., teachers_per_image=1)`. All
pairs go through ONE batched pass: the condition-free prefix runs once per image, the rest once per pair
(compute and activation memory of the routed part scale with the pairs per image).

Condition indices: 0..T-1 the teachers (in config order), T..T+K-1 the tasks. Parameter names are ours;
student/model/prism_weights.py converts the authors' state_dict layout by a fixed key table.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass, fields, replace
from typing import Any

import timm
import torch
import torch.nn as nn
import torch.nn.functional as F
from timm.models.vision_transformer import VisionTransformer
from torch.utils.checkpoint import checkpoint

from sak.pipeline.base.errors import SakError
from sak.pipeline.base.registry import Registry
from sak.student.model.config import TeacherTarget  # re-exported below
from sak.student.model.prism_moe import BlockRouting, DualStreamBlock
from sak.student.model.prism_pairs import RoutePairs, assign_teachers, pairs_every_condition
from sak.student.model.student import INIT_STD

# ----------------------------------------------------------------------------------------------
# configuration


@dataclass(frozen=True)
class PrismMoE:
    """The routed part of a PRISM student; recorded whole in every run so the model rebuilds exactly.

    Defaults are the authors' configs (configs/s1_prism/*.yml, configs/s2_prism/*.yml): 15 experts,
    top 3, hidden ratio 4, gate range [0.5, 1.0] in every MoE block, noisy gating, MLP projectors of
    hidden ratio 1; expert dropout 0.1 and the 1e-6 dispatch floor are constants of their code.
    """

    moe_blocks: tuple[int, ...]
    tap_blocks: tuple[int, ...]
    num_experts: int = 15
    top_k: int = 3
    expert_hidden_ratio: float = 4.0
    gate_ranges: tuple[tuple[float, float], ...] = ((0.5, 1.0),) * 4
    noisy_gating: bool = True
    expert_dropout: float = 0.1
    min_route_weight: float = 1e-6
    projector_hidden_ratio: float = 1.0

    def __post_init__(self) -> None:
        if len(self.gate_ranges) != len(self.moe_blocks):
            raise SakError(
                f"{len(self.moe_blocks)} MoE blocks need as many gate ranges, got {len(self.gate_ranges)}"
            )
        if list(self.moe_blocks) != sorted(set(self.moe_blocks)) or not self.moe_blocks:
            raise SakError(f"MoE blocks must be distinct and increasing, got {list(self.moe_blocks)}")
        if list(self.tap_blocks) != sorted(set(self.tap_blocks)) or not self.tap_blocks:
            raise SakError(f"tapped blocks must be distinct and increasing, got {list(self.tap_blocks)}")


@dataclass(frozen=True)
class PrismArch:
    """A registered PRISM size: the timm stem, its constructor overrides, and the routed part."""

    timm_name: str
    moe: PrismMoE
    overrides: tuple[tuple[str, Any], ...] = ()
    has_pretrained: bool = True


PRISM_STUDENTS: Registry[PrismArch] = Registry("PRISM student")
_B_BLOCKS = (2, 5, 8, 11)  # ViT-S / ViT-B: moe_layers_indices = out_indices (all configs)


@PRISM_STUDENTS.register("prism_s")
def _prism_s() -> PrismArch:
    return PrismArch("vit_small_patch16_384", PrismMoE(_B_BLOCKS, _B_BLOCKS))  # BS_s1.yml


@PRISM_STUDENTS.register("prism_b")
def _prism_b() -> PrismArch:
    return PrismArch("vit_base_patch16_384", PrismMoE(_B_BLOCKS, _B_BLOCKS))  # BB_s1.yml, LB_s1.yml


@PRISM_STUDENTS.register("prism_l")
def _prism_l() -> PrismArch:
    blocks = (5, 11, 17, 23)
    return PrismArch("vit_large_patch16_384", PrismMoE(blocks, blocks))  # LL_s1.yml


@PRISM_STUDENTS.register("prism_tiny")
def _prism_tiny() -> PrismArch:
    # the same timm class, shrunk for tests: 8 blocks (4 dense, 4 dual-stream), 4 experts, top 2
    overrides = (("embed_dim", 64), ("depth", 8), ("num_heads", 2))
    moe = PrismMoE((1, 3, 5, 7), (1, 3, 5, 7), num_experts=4, top_k=2)
    return PrismArch("vit_small_patch16_384", moe, overrides, has_pretrained=False)


def list_prism_students() -> list[str]:
    return PRISM_STUDENTS.names()


def _pair(size: int | Sequence[int]) -> tuple[int, int]:
    if isinstance(size, int):
        return (size, size)
    h, w = size
    return (int(h), int(w))


@dataclass(frozen=True)
class PrismConfig:
    """Everything needed to rebuild a PRISM student; what a run records next to its weights.

    name: registered size (`prism_tiny`, `prism_s`, `prism_b`, `prism_l`).
    teachers: stage-1 conditions and projector targets, in order (condition indices 0..T-1).
    tasks: stage-2 conditions (indices T..T+K-1); empty for a stage-1 student.
    img_size: (H, W) the position embedding is built for (384 in stage 1; 512 or 448x576 in stage 2).
    pretrained: load the timm stem weights before upcycling (needs the timm cache).
    moe: the routed part; None takes the registered size's (build_prism resolves it).
    """

    name: str
    teachers: tuple[TeacherTarget, ...]
    tasks: tuple[str, ...] = ()
    img_size: tuple[int, int] = (384, 384)
    pretrained: bool = False
    moe: PrismMoE | None = None

    def resolved(self) -> PrismConfig:
        return self if self.moe is not None else replace(self, moe=PRISM_STUDENTS.get(self.name).moe)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self.resolved())

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> PrismConfig:
        unknown = sorted(set(d) - {f.name for f in fields(cls)})
        if unknown:
            raise SakError(f"PRISM config has unknown fields {unknown}; written by a newer version?")
        moe = d.get("moe")
        if moe is not None:
            unknown = sorted(set(moe) - {f.name for f in fields(PrismMoE)})
            if unknown:
                raise SakError(f"PRISM MoE config has unknown fields {unknown}; written by a newer version?")
            moe = PrismMoE(
                **{
                    **moe,
                    "moe_blocks": tuple(moe["moe_blocks"]),
                    "tap_blocks": tuple(moe["tap_blocks"]),
                    "gate_ranges": tuple((float(lo), float(hi)) for lo, hi in moe["gate_ranges"]),
                }
            )
        return cls(
            name=str(d["name"]),
            teachers=tuple(TeacherTarget(str(t["name"]), int(t["dim"])) for t in d["teachers"]),
            tasks=tuple(str(t) for t in d.get("tasks", ())),
            img_size=_pair(d.get("img_size", 384)),
            pretrained=bool(d.get("pretrained", False)),
            moe=moe,
        )


# ----------------------------------------------------------------------------------------------
# outputs


@dataclass
class PrismFeatures:
    """One routed forward. levels: per tapped block (P, C, h, w), the final LayerNorm of the stream there
    (no projector); routing: one BlockRouting per MoE block, rows aligned with `pairs`."""

    blocks: list[int]
    pairs: RoutePairs
    levels: list[torch.Tensor]
    routing: list[BlockRouting]


@dataclass
class PrismOutput:
    """Stage-1 forward: distill_maps {teacher: [(P_t, C_t, h, w)] per level}; image_index {teacher:
    (P_t,)} the batch rows those maps belong to (pick the same rows of the cached targets)."""

    distill_maps: dict[str, list[torch.Tensor]]
    image_index: dict[str, torch.Tensor]
    features: PrismFeatures


@dataclass
class PrismTaskOutput:
    """Stage-2 task features: task_maps {task: [(B, C, h, w)] per level}, for the decode heads."""

    task_maps: dict[str, list[torch.Tensor]]
    features: PrismFeatures


# ----------------------------------------------------------------------------------------------
# model


class Projector(nn.Module):
    """Linear(C, hidden) -> GELU -> Linear(hidden, C_teacher): one per (teacher, tapped block)."""

    def __init__(self, dim: int, hidden: int, out_dim: int):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.fc2 = nn.Linear(hidden, out_dim)
        for lin in (self.fc1, self.fc2):
            nn.init.trunc_normal_(lin.weight, std=INIT_STD)
            nn.init.zeros_(lin.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.gelu(self.fc1(x)))


def _check_names(kind: str, names: Sequence[str]) -> None:
    if len(set(names)) != len(names):
        raise SakError(f"{kind} names must be unique, got {list(names)}")
    for n in names:
        if not n or "." in n:
            raise SakError(f"{kind} name {n!r} cannot name a module (empty or contains a dot)")


def build_prism_stem(config: PrismConfig) -> VisionTransformer:
    arch = PRISM_STUDENTS.get(config.name)
    if config.pretrained and not arch.has_pretrained:
        raise SakError(
            f"PRISM student {config.name!r} is a random-init test variant; it has no pretrained weights"
        )
    stem = timm.create_model(
        arch.timm_name,
        pretrained=config.pretrained,
        num_classes=0,
        img_size=config.img_size,
        **dict(arch.overrides),
    )
    if not isinstance(stem, VisionTransformer):
        raise SakError(
            f"PRISM student {config.name!r} builds {type(stem).__name__}, expected a VisionTransformer"
        )
    return stem


class PrismStudent(nn.Module):
    """See the module docstring. forward_features(images, pairs) -> PrismFeatures; forward(images, pairs)
    -> PrismOutput (stage 1); forward_tasks(images) -> PrismTaskOutput (stage 2)."""

    def __init__(self, config: PrismConfig):
        super().__init__()
        config = config.resolved()
        moe = config.moe
        assert moe is not None
        teacher_names = [t.name for t in config.teachers]
        if not teacher_names:
            raise SakError("a PRISM student needs at least one teacher (the stage-1 conditions)")
        _check_names("teacher", teacher_names)
        _check_names("task", list(config.tasks))
        if set(teacher_names) & set(config.tasks):
            raise SakError(
                f"teacher and task names overlap: {sorted(set(teacher_names) & set(config.tasks))}"
            )
        self.config = config
        self.stem = build_prism_stem(config)
        depth, dim = len(self.stem.blocks), self.stem.embed_dim
        for b in (*moe.moe_blocks, *moe.tap_blocks):
            if not 0 <= b < depth:
                raise SakError(f"block {b} does not exist in {config.name!r} ({depth} blocks)")
        for b, gate_range in zip(moe.moe_blocks, moe.gate_ranges):
            self.stem.blocks[b] = DualStreamBlock(
                self.stem.blocks[b],
                b,
                moe.num_experts,
                moe.top_k,
                moe.expert_hidden_ratio,
                gate_range,
                dim,
                moe.noisy_gating,
                moe.expert_dropout,
                moe.min_route_weight,
            )
        self.teacher_embeddings = nn.Embedding(len(teacher_names), dim)
        nn.init.trunc_normal_(self.teacher_embeddings.weight, std=INIT_STD)
        self.task_embeddings = nn.Embedding(len(config.tasks), dim) if config.tasks else None
        if self.task_embeddings is not None:
            nn.init.trunc_normal_(self.task_embeddings.weight, std=INIT_STD)
        hidden = int(dim * moe.projector_hidden_ratio)
        self.projectors = nn.ModuleDict(
            {
                t.name: nn.ModuleDict({str(b): Projector(dim, hidden, t.dim) for b in moe.tap_blocks})
                for t in config.teachers
            }
        )
        self.levels = list(moe.tap_blocks)
        self.moe_blocks = list(moe.moe_blocks)
        self.num_prefix_tokens = self.stem.num_prefix_tokens
        self.input_mean: tuple[float, ...] = tuple(self.stem.pretrained_cfg["mean"])
        self.input_std: tuple[float, ...] = tuple(self.stem.pretrained_cfg["std"])
        self.grad_checkpointing = False

    # -- names ---------------------------------------------------------------------------------

    @property
    def teacher_names(self) -> list[str]:
        return [t.name for t in self.config.teachers]

    @property
    def task_names(self) -> list[str]:
        return list(self.config.tasks)

    @property
    def condition_names(self) -> list[str]:
        """Row labels of routing statistics: teachers (0..T-1), then tasks (T..T+K-1)."""
        return self.teacher_names + self.task_names

    @property
    def embed_dim(self) -> int:
        return self.stem.embed_dim

    def condition_index(self, name: str) -> int:
        names = self.condition_names
        if name not in names:
            raise SakError(f"unknown condition {name!r}; this student routes by {', '.join(names)}")
        return names.index(name)

    # -- pairs ---------------------------------------------------------------------------------

    def teacher_pairs(
        self,
        batch_size: int,
        teachers_per_image: int | None = None,
        seed: int = 0,
        step: int = 0,
        rank: int = 0,
    ) -> RoutePairs:
        return assign_teachers(batch_size, len(self.teacher_names), teachers_per_image, seed, step, rank)

    def task_pairs(self, batch_size: int, tasks: Sequence[str] | None = None) -> RoutePairs:
        names = self.task_names if tasks is None else list(tasks)
        if not names:
            raise SakError("this PRISM student has no tasks; build it with tasks=... for stage 2")
        return pairs_every_condition(batch_size, [self.condition_index(t) for t in names])

    # -- forward -------------------------------------------------------------------------------

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        """Recompute every block in backward (the routing noise is replayed: RNG state is preserved)."""
        self.grad_checkpointing = enable

    def _conditions(self) -> torch.Tensor:
        """(T+K, C) condition embeddings: teachers, then tasks."""
        tables = [self.teacher_embeddings.weight]
        if self.task_embeddings is not None:
            tables.append(self.task_embeddings.weight)
        return torch.cat(tables) if len(tables) > 1 else tables[0]

    def _run(self, fn, *args):
        if self.grad_checkpointing and torch.is_grad_enabled():
            return checkpoint(fn, *args, use_reentrant=False)
        return fn(*args)

    def _level(self, x: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
        patches = self.stem.norm(x[:, self.num_prefix_tokens :])  # (P, N, C), the ViT's final norm
        P, _, C = patches.shape
        return patches.reshape(P, grid[0], grid[1], C).permute(0, 3, 1, 2)  # (P, C, h, w), a view

    def forward_features(self, images: torch.Tensor, pairs: RoutePairs) -> PrismFeatures:
        """images (B, 3, H, W), pairs -> tapped level maps and routing for every pair."""
        B = images.shape[0]
        if pairs.batch_size != B:
            raise SakError(f"pairs were made for a batch of {pairs.batch_size} images, got {B}")
        if len(pairs) == 0:
            raise SakError("a routed forward needs at least one (image, condition) pair")
        n_cond = len(self.condition_names)
        if int(pairs.condition.max()) >= n_cond or int(pairs.condition.min()) < 0:  # note: host sync
            raise SakError(f"pair conditions must lie in 0..{n_cond - 1} ({', '.join(self.condition_names)})")
        stem = self.stem
        grid = stem.patch_embed.dynamic_feat_size(images.shape[-2:])
        x = stem.norm_pre(stem.patch_drop(stem._pos_embed(stem.patch_embed(images))))  # (B, 1+N, C)
        image_index = pairs.image_index.to(images.device)
        condition = self._conditions().index_select(0, pairs.condition.to(images.device))  # (P, C)
        first_routed = self.moe_blocks[0]
        features = PrismFeatures(list(self.levels), pairs, [], [])
        for i, block in enumerate(stem.blocks):
            if i == first_routed:
                x = x.index_select(0, image_index)  # (P, 1+N, C): the condition-free prefix ran once
            if isinstance(block, DualStreamBlock):
                x, *parts = self._run(block.forward_tensors, x, condition)
                features.routing.append(BlockRouting(i, *parts))
            else:
                x = self._run(block, x)
            if i in self.levels:
                level = self._level(x, grid)
                features.levels.append(level if i >= first_routed else level.index_select(0, image_index))
        return features

    def project(self, features: PrismFeatures) -> PrismOutput:
        """Stage-1 distillation maps of every teacher that has rows in `features`."""
        maps: dict[str, list[torch.Tensor]] = {}
        index: dict[str, torch.Tensor] = {}
        for c, teacher in enumerate(self.teacher_names):
            rows = features.pairs.rows_of(c).to(features.levels[0].device)
            if rows.numel() == 0:
                continue
            index[teacher] = features.pairs.image_index.to(rows.device).index_select(0, rows)
            maps[teacher] = [
                self.projectors[teacher][str(b)](level.index_select(0, rows).permute(0, 2, 3, 1)).permute(
                    0, 3, 1, 2
                )
                for b, level in zip(features.blocks, features.levels)
            ]  # channels-last MLP, back to (P_t, C_t, h, w)
        return PrismOutput(maps, index, features)

    def task_maps(self, features: PrismFeatures) -> dict[str, list[torch.Tensor]]:
        """{task: [(B, C, h, w)] per level} for every task whose rows cover the batch in image order."""
        out: dict[str, list[torch.Tensor]] = {}
        T = len(self.teacher_names)
        for k, task in enumerate(self.task_names):
            rows = features.pairs.rows_of(T + k).to(features.levels[0].device)
            if rows.numel() == 0:
                continue
            images = features.pairs.image_index.to(rows.device).index_select(0, rows)
            if images.numel() != features.pairs.batch_size or not torch.equal(images.sort().values, images):
                raise SakError(f"task {task!r} must be routed once for every image of the batch, in order")
            out[task] = [level.index_select(0, rows) for level in features.levels]
        return out

    def forward(self, images: torch.Tensor, pairs: RoutePairs | None = None) -> PrismOutput:
        """Stage 1. pairs default: every teacher on every image."""
        if pairs is None:
            pairs = self.teacher_pairs(images.shape[0])
        return self.project(self.forward_features(images, pairs))

    def forward_tasks(self, images: torch.Tensor, tasks: Sequence[str] | None = None) -> PrismTaskOutput:
        """Stage 2: one routed pass per task (batched), every image; the heads read task_maps."""
        features = self.forward_features(images, self.task_pairs(images.shape[0], tasks))
        return PrismTaskOutput(self.task_maps(features), features)

    def num_parameters(self, include_aligners: bool = False) -> int:
        """Parameters of the deployed student (stem with experts, routers, embeddings); the projectors
        (PRISM's distillation-only aligners) optional."""
        n = sum(p.numel() for p in self.parameters())
        if not include_aligners:
            n -= sum(p.numel() for p in self.projectors.parameters())
        return n

    # -- what the trainers' student contract asks (docs/prism.md) --------------------------------

    use_kernels = False  # no fused kernels for this student; the trainers may set it, it is ignored

    @property
    def token_grid(self) -> tuple[int, int]:
        """(h, w) of the patch grid at the current input size."""
        return tuple(self.stem.patch_embed.grid_size)

    def resize_input(self, img_size: int | Sequence[int]) -> None:
        """Take H x W inputs: resample the position embedding (bicubic, CLS kept), as the authors' stage-2
        loader does for a stage-1 checkpoint; the recorded config follows."""
        from timm.layers import resample_abs_pos_embed

        size = _pair(img_size)
        stem = self.stem
        old = list(stem.patch_embed.grid_size)
        stem.patch_embed.set_input_size(img_size=size)
        new = list(stem.patch_embed.grid_size)
        if new != old:
            with torch.no_grad():
                resampled = resample_abs_pos_embed(
                    stem.pos_embed.data, new_size=new, old_size=old, num_prefix_tokens=self.num_prefix_tokens
                )
            stem.pos_embed = nn.Parameter(resampled, requires_grad=stem.pos_embed.requires_grad)
        self.config = replace(self.config, img_size=size)

    @classmethod
    def from_student_config(cls, config: Any, arch: Any = None) -> PrismStudent:
        """Build from the trainers' generic student record (fields name, teachers, img_size, pretrained;
        `arch` unused: the routed part comes from this file's registry under the same name)."""
        return cls(
            PrismConfig(config.name, tuple(config.teachers), (), _pair(config.img_size), config.pretrained)
        )


def stage2_student(stage1: PrismStudent, tasks: Sequence[str], img_size: int | Sequence[int]) -> PrismStudent:
    """`stage2 --init RUN`: the same student with task conditions, at the stage-2 input size. Every weight
    of `stage1` carries over (the position embedding resampled); the task embeddings start fresh
    (trunc-normal 0.02), as the authors' stage-2 loader skips them."""
    model = PrismStudent(stage2_config(stage1.config, tasks, stage1.config.img_size))
    missing, unexpected = model.load_state_dict(stage1.state_dict(), strict=False)
    if unexpected or set(missing) != {"task_embeddings.weight"}:
        raise SakError(
            f"stage-1 weights do not fit the stage-2 student: missing {missing}, unexpected {unexpected}"
        )
    model.resize_input(img_size)
    return model


def build_prism(
    name: str,
    teachers: Sequence[TeacherTarget],
    tasks: Sequence[str] = (),
    img_size: int | Sequence[int] = 384,
    pretrained: bool = False,
    moe: PrismMoE | None = None,
) -> PrismStudent:
    """`PrismStudent(PrismConfig(...))` with the registered size's routed part unless `moe` is given."""
    PRISM_STUDENTS.get(name)  # unknown name: SakError listing the known ones
    config = PrismConfig(name, tuple(teachers), tuple(tasks), _pair(img_size), pretrained, moe)
    return PrismStudent(config)


def stage2_config(stage1: PrismConfig, tasks: Sequence[str], img_size: int | Sequence[int]) -> PrismConfig:
    """The stage-2 student of a stage-1 run: same size, teachers and routed part, plus the tasks."""
    return replace(stage1.resolved(), tasks=tuple(tasks), img_size=_pair(img_size), pretrained=False)


__all__ = [
    "PRISM_STUDENTS",
    "PrismArch",
    "PrismConfig",
    "PrismFeatures",
    "PrismMoE",
    "PrismOutput",
    "PrismStudent",
    "PrismTaskOutput",
    "RoutePairs",
    "TeacherTarget",
    "assign_teachers",
    "build_prism",
    "list_prism_students",
    "pairs_every_condition",
    "stage2_config",
    "stage2_student",
]
