"""Every student, built from its name in one place: student types and the names registered for them.

    STUDENT_TYPES   type name -> StudentType: the module class that builds it from a StudentConfig
    STUDENTS        student name (what --student takes) -> StudentArch: its type and its timm stem

    build_student(config)                 the module of a recorded StudentConfig (runs, checkpoints, stage 2)
    create_student("vit_b", teachers)     the same from a name, for code and tests that have no record yet

Stage 1 (`sak-train stage1 --student`), stage 2 (`--init`: the stage-1 checkpoint), evaluation, Rep Sim
and every checkpoint loader build through `build_student`, so a new kind of student (PRISM's mixture-of-
experts ViT, say) is one new file holding its module plus its registration here: a StudentType factory
and the names it serves (docs/students.md says what the module must provide).

Modules are imported when a type is first built, so the registry itself (and `--help`) loads no torch.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from typing import Any

from sak.pipeline.base.errors import SakError
from sak.pipeline.base.registry import Registry
from sak.student.model.config import StudentArch, StudentConfig, TeacherTarget


@dataclass(frozen=True)
class StudentType:
    """How one kind of student is built.

    build: (StudentConfig, StudentArch) -> the module (an nn.Module honouring docs/students.md).
    paper_layout: the SAK paper code's stage-1 checkpoints convert into it (`--init-paper`).
    """

    name: str
    build: Callable[[StudentConfig, StudentArch], Any]
    paper_layout: bool = False


STUDENT_TYPES: Registry[StudentType] = Registry("student type")
STUDENTS: Registry[StudentArch] = Registry("student")


# ----------------------------------------------------------------------------------------------- types


@STUDENT_TYPES.register("sak")
def _sak() -> StudentType:
    from sak.student.model.student import SakStudent  # Teacher-Agnostic Stem + Teacher-Specific Adapters

    return StudentType("sak", SakStudent, paper_layout=True)


@STUDENT_TYPES.register("prism")
def _prism() -> StudentType:
    from sak.student.model.prism import PrismStudent  # PRISM's teacher/task-routed MoE ViT (docs/prism.md)

    return StudentType("prism", PrismStudent.from_student_config)


# ----------------------------------------------------------------------------------------------- names

_TINY = (("embed_dim", 64), ("depth", 4), ("num_heads", 2))  # the timm ViT class and patch 16, shrunk
_MICRO = (("embed_dim", 8), ("depth", 4), ("num_heads", 2))  # small enough for committed run fixtures

STUDENTS.add("vit_s", StudentArch("sak", "vit_small_patch16_384"))  # 22M, C 384, 12 blocks
STUDENTS.add("vit_b", StudentArch("sak", "vit_base_patch16_384"))  # 86M, C 768, 12 blocks
STUDENTS.add("vit_l", StudentArch("sak", "vit_large_patch16_384"))  # 304M, C 1024, 24 blocks
STUDENTS.add("tiny", StudentArch("sak", "vit_small_patch16_384", _TINY, has_pretrained=False))
STUDENTS.add("micro", StudentArch("sak", "vit_small_patch16_384", _MICRO, has_pretrained=False))
# PRISM: the routed part (MoE blocks, experts, top-k) comes from prism.py's PRISM_STUDENTS under the same name
STUDENTS.add("prism_s", StudentArch("prism", "vit_small_patch16_384"))
STUDENTS.add("prism_b", StudentArch("prism", "vit_base_patch16_384"))
STUDENTS.add("prism_l", StudentArch("prism", "vit_large_patch16_384"))
STUDENTS.add(
    "prism_tiny",
    StudentArch(
        "prism",
        "vit_small_patch16_384",
        (("embed_dim", 64), ("depth", 8), ("num_heads", 2)),
        has_pretrained=False,
    ),
)


def register_student(name: str, arch: StudentArch) -> StudentArch:
    """Add a student name (its type must be registered by the time it is built)."""
    return STUDENTS.add(name, arch)


def list_students() -> list[str]:
    return STUDENTS.names()


def get_student_arch(name: str) -> StudentArch:
    return STUDENTS.get(name)


def student_type(config: StudentConfig) -> StudentType:
    """The type that builds `config`; its recorded type must be the one its name is registered with."""
    arch = STUDENTS.get(config.name)
    if config.type != arch.type:
        raise SakError(
            f"student {config.name!r} is registered as type {arch.type!r}, the record says {config.type!r}; "
            f"it was made by another version or registry"
        )
    return STUDENT_TYPES.get(arch.type)


def build_student(config: StudentConfig):
    """The student module of a config (random init, or the timm stem weights with pretrained=True)."""
    kind, arch = student_type(config), STUDENTS.get(config.name)
    if config.pretrained and not arch.has_pretrained:
        raise SakError(f"student {config.name!r} is a random-init test variant; it has no pretrained weights")
    return kind.build(config, arch)


def create_student(
    name: str,
    teachers: Sequence[TeacherTarget],
    img_size: int = 384,
    pretrained: bool = False,
    dynamic_img_size: bool = False,
    use_kernels: bool = False,
):
    """`build_student` from a registered name: the config is made here (type from the registry)."""
    config = StudentConfig(
        name=name,
        teachers=tuple(teachers),
        img_size=img_size,
        pretrained=pretrained,
        dynamic_img_size=dynamic_img_size,
        use_kernels=use_kernels,
        type=STUDENTS.get(name).type,
    )
    return build_student(config)


def without_pretrained(config: StudentConfig) -> StudentConfig:
    """The config a checkpoint is rebuilt from: its weights come from the file, never from timm."""
    return replace(config, pretrained=False)


def student_normalization(name: str) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """(mean, std) the stem's pretrained weights expect, from the timm pretrained_cfg (for the loader)."""
    import timm

    cfg = timm.models.get_pretrained_cfg(STUDENTS.get(name).timm_name)
    return tuple(cfg.mean), tuple(cfg.std)
