"""The teacher registry: frozen vision foundation models (DINOv2, CLIP, SAM) with multi-level taps.

A teacher target is the raw residual stream after a tapped block: prefix tokens (CLS, registers) dropped,
no final norm, laid out (B, H, W, C). Levels are 4 evenly spaced blocks, 0-based: [2, 5, 8, 11] for
12-block models, [5, 11, 17, 23] for 24-block ones. Every teacher sees the planned view at the plan size
except SAM, which sees it resized so its long side is 1024 and zero-padded to 1024x1024 (after
normalisation, as SAM's own preprocessing pads).

A new teacher family is one registration here: its `TeacherSpec` says everything the rest of the
project needs of it, the cost model of `sak-cache estimate` included (prefix tokens, MLP ratio, windowed
attention). Where its weights come from: weights.py; its forward pass: forward.py.
"""

from __future__ import annotations

from dataclasses import dataclass

from sak.pipeline.base.errors import SakError
from sak.pipeline.base.registry import Registry

TOKEN_SELECTION = "patch tokens after the block, prefix tokens dropped, no final norm"


@dataclass(frozen=True)
class TeacherSpec:
    name: str  # registry name, e.g. "dinov2_l"
    family: str  # "dinov2" | "clip" | "sam"
    timm_name: str  # timm architecture
    pretrained_tag: str | None  # timm pretrained tag whose weights and mean/std are used
    depth: int
    dim: int
    patch_size: int
    levels: tuple[int, ...]  # 0-based block indices whose outputs are stored
    fixed_input: int | None = None  # SAM: long side of its input; None: the view plan's size
    model_kwargs: tuple[tuple[str, object], ...] = ()  # overrides of the timm architecture (tiny variants)
    tiny: bool = False  # a narrow random-init variant for tests and the offline demo
    # the architecture as `estimate` bills it (the timm model itself is built from timm_name + model_kwargs)
    prefix_tokens: int = 1  # CLS and register tokens before the patch tokens
    mlp_ratio: float = 4.0  # MLP hidden width / model width
    attention_window: int | None = None  # windowed attention (SAM): window side in patches; None: global
    global_blocks: tuple[int, ...] = ()  # with windowed attention: the blocks that attend globally

    def input_hw(self, plan_size: int) -> tuple[int, int]:
        """(h, w) of the image the model sees (before padding)."""
        side = self.fixed_input or plan_size
        return (side, side)  # views are square; SAM's resize of the long side is then the whole side

    def model_input_side(self, plan_size: int) -> int:
        return self.fixed_input or plan_size

    def grid(self, plan_size: int) -> tuple[int, int]:
        side = self.model_input_side(plan_size) // self.patch_size
        return (side, side)

    def input_grid(self, height: int, width: int) -> tuple[int, int]:
        """The patch grid of an (height, width) image as the teacher takes it (forward.fit_to_input): a
        fixed-input teacher (SAM) sees its fixed square, the others the image itself."""
        if self.fixed_input:
            return (self.fixed_input // self.patch_size,) * 2
        return (height // self.patch_size, width // self.patch_size)


TEACHERS: Registry[TeacherSpec] = Registry("teacher")


def get_teacher(name: str) -> TeacherSpec:
    """The registered teacher `name` (unknown: a SakError listing the known ones)."""
    return TEACHERS.get(name)


def teacher_names() -> list[str]:
    return TEACHERS.names()


def parse_teachers(text: str | list[str]) -> list[TeacherSpec]:
    names = [n.strip() for n in (text.split(",") if isinstance(text, str) else text) if n.strip()]
    if not names:
        raise SakError(
            f"no teacher given; pass --teachers with a comma list of: {', '.join(TEACHERS.names())}"
        )
    if len(set(names)) != len(names):
        raise SakError(f"a teacher is listed twice in --teachers {','.join(names)}")
    return [TEACHERS.get(n) for n in names]


def tap_levels(depth: int) -> list[int]:
    """The one level-tap rule, for teachers and the student alike: 0-based block indices after L/4, L/2,
    3L/4 and L blocks ([2, 5, 8, 11] for 12 blocks, [5, 11, 17, 23] for 24)."""
    if depth < 4 or depth % 4:
        raise SakError(f"a model of depth {depth} cannot be tapped at L/4, L/2, 3L/4, L; use a multiple of 4")
    return [depth * k // 4 - 1 for k in (1, 2, 3, 4)]


def _vit(name, family, timm_name, tag, depth, dim, patch, **kw) -> TeacherSpec:
    prefix = {"sam": 0}.get(family, 1)  # CLS; the registered DINOv2s have no register tokens; SAM has none
    return TeacherSpec(
        name, family, timm_name, tag, depth, dim, patch, tuple(tap_levels(depth)), prefix_tokens=prefix, **kw
    )


@TEACHERS.register("dinov2_b")
def _dinov2_b():
    return _vit("dinov2_b", "dinov2", "vit_base_patch14_dinov2", "lvd142m", 12, 768, 14)


@TEACHERS.register("dinov2_l")
def _dinov2_l():
    return _vit("dinov2_l", "dinov2", "vit_large_patch14_dinov2", "lvd142m", 24, 1024, 14)


# note: timm's default tags for these CLIP towers are fine-tuned on ImageNet-12k/1k, not raw CLIP. The
# tag is recorded in the fingerprint, so a cache of another tag is a different store.
@TEACHERS.register("clip_b")
def _clip_b():
    return _vit("clip_b", "clip", "vit_base_patch16_clip_384", "laion2b_ft_in12k_in1k", 12, 768, 16)


@TEACHERS.register("clip_l")
def _clip_l():
    return _vit("clip_l", "clip", "vit_large_patch14_clip_336", "laion2b_ft_in12k_in1k", 24, 1024, 14)


def _sam_windows(global_blocks: tuple[int, ...]) -> dict:
    """SAM's attention as timm's samvit_{base,large}_patch16 build it: 14x14 windows, except the blocks
    that attend globally."""
    return {"attention_window": 14, "global_blocks": global_blocks}


@TEACHERS.register("sam_b")
def _sam_b():
    return _vit(
        "sam_b",
        "sam",
        "samvit_base_patch16",
        "sa1b",
        12,
        768,
        16,
        fixed_input=1024,
        **_sam_windows((2, 5, 8, 11)),
    )


@TEACHERS.register("sam_l")
def _sam_l():
    return _vit(
        "sam_l",
        "sam",
        "samvit_large_patch16",
        "sa1b",
        24,
        1024,
        16,
        fixed_input=1024,
        **_sam_windows((5, 11, 17, 23)),
    )


# Tiny variants: the real architectures, narrowed to 4 blocks of width 64, always random-init. DINOv2's
# LayerScale would start at 1e-5 and make every level of a random model the same, so it starts at 1.
_TINY = (("embed_dim", 64), ("depth", 4), ("num_heads", 2))


@TEACHERS.register("dinov2_tiny")
def _dinov2_tiny():
    kw = _TINY + (("init_values", 1.0),)
    return _vit(
        "dinov2_tiny", "dinov2", "vit_base_patch14_dinov2", None, 4, 64, 14, model_kwargs=kw, tiny=True
    )


@TEACHERS.register("clip_tiny")
def _clip_tiny():
    return _vit(
        "clip_tiny", "clip", "vit_base_patch16_clip_384", None, 4, 64, 16, model_kwargs=_TINY, tiny=True
    )


@TEACHERS.register("sam_tiny")
def _sam_tiny():
    window, global_blocks = 8, (1, 3)
    kw = _TINY + (("window_size", window), ("global_attn_indexes", global_blocks))
    return _vit(
        "sam_tiny", "sam", "samvit_base_patch16", None, 4, 64, 16, fixed_input=256, model_kwargs=kw, tiny=True,
        attention_window=window, global_blocks=global_blocks,
    )  # fmt: skip
