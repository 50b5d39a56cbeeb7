"""The student's input normalisation, by name (no torch at import: the stage-1 options read the names).

"student"   the stem's timm pretrained_cfg mean/std (student/model/registry.py)
"imagenet"  ImageNet's mean/std, what the paper's code fed every model
"""

from __future__ import annotations

from sak.pipeline.base.errors import SakError

NORMALIZATIONS = ("student", "imagenet")


def input_normalization(mode: str, student: str) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """(mean, std) of the student's input under `mode` ("student" or "imagenet")."""
    if mode == "imagenet":
        from sak.pipeline.teachers.forward import IMAGENET_MEAN, IMAGENET_STD

        return IMAGENET_MEAN, IMAGENET_STD
    if mode != "student":
        raise SakError(f"unknown normalization {mode!r}; use one of {', '.join(NORMALIZATIONS)}")
    from sak.student.model.registry import student_normalization

    return student_normalization(student)
