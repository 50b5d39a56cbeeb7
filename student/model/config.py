"""The configs that rebuild a trained model, recorded in every run folder (student/run/record.py).

Plain frozen dataclasses, no torch: the run record, its JSON Schema and `sak-train --help` read them
without loading a model library.

    StudentConfig       the student of stage 1 and stage 2: registered name (and its type), teachers, input
    StudentArch         what a registered student name stands for (its type, its timm stem)
    TigerModelConfig    TIGER's projections, routers and heads: experts, tasks, grid, widths
    InstructionIdentity the text encoder and the sentences that made TIGER's instruction embeddings
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import asdict, dataclass, fields
from typing import Any

from sak.pipeline.base.errors import SakError


@dataclass(frozen=True)
class StudentArch:
    """What a registered student name stands for (student/model/registry.py): the type that builds it,
    and the timm stem it starts from."""

    type: str
    timm_name: str
    overrides: tuple[tuple[str, Any], ...] = ()  # timm kwargs, as pairs so the dataclass stays hashable
    has_pretrained: bool = True  # False for test variants: pretrained=True is refused


@dataclass(frozen=True)
class TeacherTarget:
    """One teacher the student distils from: its registry name and feature width (order matters)."""

    name: str
    dim: int


@dataclass(frozen=True)
class StudentConfig:
    """Everything needed to rebuild a student; recorded next to every checkpoint.

    name: registered student (`vit_s`, `vit_b`, `vit_l`, `tiny`, `micro`; student/model/registry.py).
    teachers: one adapter path per teacher, in this order; level i matches the teacher's i-th level.
    img_size: input size the position embedding is built for (384 in stage 1).
    pretrained: load the timm weights for the stem (needs network or a timm cache).
    dynamic_img_size: resample the position embedding on the fly for other input sizes (stage 2).
    use_kernels: route adapters through sak.kernels.adapter.fused_adapter.
    type: the student type that builds it (the registry's entry for `name` says which; "sak": stem +
      adapter paths). Recorded so a reader knows the module without the registry; checked on build.
    """

    name: str
    teachers: tuple[TeacherTarget, ...]
    img_size: int = 384
    pretrained: bool = False
    dynamic_img_size: bool = False
    use_kernels: bool = False
    type: str = "sak"

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> StudentConfig:
        unknown = sorted(set(d) - {f.name for f in fields(cls)})
        if unknown:
            raise SakError(f"student config has unknown fields {unknown}; written by a newer version?")
        teachers = tuple(TeacherTarget(str(t["name"]), int(t["dim"])) for t in d["teachers"])
        return cls(**{**d, "teachers": teachers})


@dataclass(frozen=True)
class ExpertSpec:
    """One TIGER expert: a teacher's stored level. `valid` is the fraction (rows, cols) of its grid that
    covers the image (SAM sees the image resized to its fixed side and zero-padded square; others: (1, 1))."""

    teacher: str
    block: int
    position: int  # index of this level in the teacher's stored levels (its maps list)
    dim: int
    valid: tuple[float, float] = (1.0, 1.0)

    @property
    def name(self) -> str:
        return f"{self.teacher}@{self.block}"


@dataclass(frozen=True)
class TigerModelConfig:
    experts: tuple[ExpertSpec, ...]
    tasks: tuple[tuple[str, int], ...]  # (task, output channels)
    grid: tuple[int, int]  # common token grid of the experts
    text_dim: int  # width of the instruction embeddings
    dim: int = 256  # D: width of the projected experts and of the heads
    router_hidden: int = 64  # H: width inside a router
    num_levels: int = 4  # L: fused maps per task, one router each

    def to_dict(self) -> dict:
        return json.loads(json.dumps(asdict(self)))

    @classmethod
    def from_dict(cls, d: Mapping) -> TigerModelConfig:
        experts = tuple(
            ExpertSpec(e["teacher"], int(e["block"]), int(e["position"]), int(e["dim"]), tuple(e["valid"]))
            for e in d["experts"]
        )
        return cls(
            experts=experts,
            tasks=tuple((t, int(n)) for t, n in d["tasks"]),
            grid=tuple(d["grid"]),
            text_dim=int(d["text_dim"]),
            dim=int(d["dim"]),
            router_hidden=int(d["router_hidden"]),
            num_levels=int(d["num_levels"]),
        )


@dataclass(frozen=True)
class InstructionIdentity:
    """What made a run's instruction embeddings (student/model/instructions.py)."""

    model: str  # open_clip model name, e.g. ViT-B-32
    weights: str  # the pretrained tag, or "random init, seed s"
    random_init: bool
    texts_sha256: str  # of the canonical JSON of {task: text}
    texts: dict[str, str]
    dim: int

    def to_dict(self) -> dict:
        return asdict(self)
