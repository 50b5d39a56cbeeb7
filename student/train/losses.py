"""Distillation loss (paper eq. 5) and the Rep Sim metric, against cached teacher targets.

Per teacher and level: 0.9 * (1 - cos) + 0.1 * smoothL1(beta=1, mean), where cos is taken per image
over the whole flattened map and averaged over the batch, and the student map is bilinearly resized
(align_corners=False) to the target's grid. The total is the plain sum over teachers and levels.

Layouts: student maps come from the model as (B, C, h, w); targets come from the cache as
(B, H, W, C), channels last, in any float dtype. Both are compared in fp32.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from sak.pipeline.base.errors import SakError

COS_WEIGHT = 0.9
L1_WEIGHT = 0.1
SMOOTH_L1_BETA = 1.0


def distill_loss_reference(
    student: torch.Tensor,
    target: torch.Tensor,
    cos_weight: float = COS_WEIGHT,
    l1_weight: float = L1_WEIGHT,
    beta: float = SMOOTH_L1_BETA,
) -> torch.Tensor:
    """One term on same-shape tensors (B, ...): cos_weight * mean_b(1 - cos_b) + l1_weight * smoothL1.

    The torch reference of sak.kernels.distill_loss.distill_loss (same signature). Returns a scalar.
    """
    if student.shape != target.shape:
        raise SakError(
            f"distillation term needs equal shapes, got {tuple(student.shape)} and {tuple(target.shape)}"
        )
    # the one torch implementation lives beside the kernel it is the reference of
    from sak.kernels.distill_loss import distill_loss_reference as reference

    return reference(student.float(), target.float(), cos_weight, l1_weight, beta)


def resize_to_target(student_map_bchw: torch.Tensor, target_bhwc: torch.Tensor) -> torch.Tensor:
    """Student (B, C, h, w) -> fp32 (B, H, W, C) on the target's grid (bilinear, align_corners=False)."""
    if student_map_bchw.ndim != 4 or target_bhwc.ndim != 4:
        raise SakError(
            f"expected a student map (B, C, h, w) and a target (B, H, W, C), "
            f"got {tuple(student_map_bchw.shape)} and {tuple(target_bhwc.shape)}"
        )
    B, C, _, _ = student_map_bchw.shape
    Bt, H, W, Ct = target_bhwc.shape
    if (B, C) != (Bt, Ct):
        raise SakError(
            f"student map {tuple(student_map_bchw.shape)} (B, C, h, w) does not match target "
            f"{tuple(target_bhwc.shape)} (B, H, W, C): batch or channel width differs"
        )
    s = student_map_bchw.float()
    if s.shape[-2:] != (H, W):
        s = F.interpolate(s, size=(H, W), mode="bilinear", align_corners=False)  # (B, C, H, W)
    return s.permute(0, 2, 3, 1)  # (B, H, W, C), a view: the target is never copied to channels-first


def distill_term(
    student_map_bchw: torch.Tensor, target_bhwc: torch.Tensor, use_kernels: bool = False
) -> torch.Tensor:
    """One (teacher, level) term: resize the student map to the target grid, then the loss.

    use_kernels: the fused one-pass op `sak.kernels.distill_loss.distill_loss` (Triton on CUDA, its torch
    implementation elsewhere; SAK_KERNELS forces one) instead of the plain reference below.
    """
    s = resize_to_target(student_map_bchw, target_bhwc)  # (B, H, W, C) fp32, maybe a strided view
    if use_kernels:
        from sak.kernels.distill_loss import distill_loss

        return distill_loss(s, target_bhwc)  # reads the strided map and the stored dtype in place
    return distill_loss_reference(s.contiguous(), target_bhwc.float())


def _check_pairing(
    student_maps: dict[str, list[torch.Tensor]], targets: dict[str, list[torch.Tensor]]
) -> None:
    if set(student_maps) != set(targets):
        raise SakError(
            f"student teachers {sorted(student_maps)} do not match target teachers {sorted(targets)}"
        )
    for name, maps in student_maps.items():
        if len(maps) != len(targets[name]):
            raise SakError(
                f"teacher {name!r}: the student has {len(maps)} levels, the targets {len(targets[name])}"
            )


def distillation_loss(
    student_maps: dict[str, list[torch.Tensor]],
    targets: dict[str, list[torch.Tensor]],
    use_kernels: bool = False,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Sum over teachers and levels. Returns (total, {"<teacher>/L<i>": detached term}).

    Level i is the i-th tapped level of both the student and the teacher. The terms stay tensors so
    logging them costs no host-device sync until the caller asks (`.item()`).
    """
    _check_pairing(student_maps, targets)
    total: torch.Tensor | None = None
    terms: dict[str, torch.Tensor] = {}
    for name, maps in student_maps.items():
        for i, (s, t) in enumerate(zip(maps, targets[name])):
            term = distill_term(s, t, use_kernels)
            terms[f"{name}/L{i}"] = term.detach()
            total = term if total is None else total + term
    if total is None:
        raise SakError("distillation_loss got no (teacher, level) pairs")
    return total, terms


@torch.no_grad()
def rep_sim(student_map_bchw: torch.Tensor, target_bhwc: torch.Tensor) -> torch.Tensor:
    """The paper's Rep Sim: mean over images and tokens of the per-token cosine (scalar, fp32)."""
    s = resize_to_target(student_map_bchw, target_bhwc)  # (B, H, W, C)
    return F.cosine_similarity(s, target_bhwc.float(), dim=-1).mean()  # (B, H, W) -> ()


@torch.no_grad()
def rep_sim_by_teacher(
    student_maps: dict[str, list[torch.Tensor]], targets: dict[str, list[torch.Tensor]]
) -> dict[str, torch.Tensor]:
    """{teacher: Rep Sim averaged over its levels}."""
    _check_pairing(student_maps, targets)
    return {
        name: torch.stack([rep_sim(s, t) for s, t in zip(maps, targets[name])]).mean()
        for name, maps in student_maps.items()
    }


def clip_gradients(parameters, max_norm: float | None) -> torch.Tensor:
    """Global gradient norm of `parameters` (those with a gradient), clipped to `max_norm` when given."""
    params = [p for p in parameters if p.grad is not None]
    if max_norm is not None:
        return torch.nn.utils.clip_grad_norm_(params, max_norm)
    return torch.nn.utils.get_total_norm([p.grad for p in params])
