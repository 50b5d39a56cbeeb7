"""Distillation loss and Rep Sim: hand computations, resizing, layouts, dtypes, pairing errors."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from sak.pipeline.base.errors import SakError
from sak.student.train.losses import (
    distill_loss_reference,
    distill_term,
    distillation_loss,
    rep_sim,
    rep_sim_by_teacher,
    resize_to_target,
)


def _smooth_l1(d: float, beta: float = 1.0) -> float:
    return 0.5 * d * d / beta if abs(d) < beta else abs(d) - 0.5 * beta


def test_reference_equals_hand_computation():
    # two images, 2x2 map, 2 channels, laid out (B, H, W, C); differences both below and above beta
    s = torch.tensor(
        [
            [[[1.0, 0.0], [2.0, -1.0]], [[0.5, 0.5], [3.0, 1.0]]],
            [[[0.0, 1.0], [1.0, 1.0]], [[-2.0, 0.0], [0.0, 0.0]]],
        ]
    )
    t = torch.tensor(
        [
            [[[1.5, 0.0], [0.0, -1.0]], [[0.5, 1.0], [1.0, 1.0]]],
            [[[0.0, -1.0], [1.0, 2.0]], [[-1.0, 0.5], [0.2, 0.0]]],
        ]
    )
    cos = []
    for b in range(2):
        sv, tv = s[b].flatten().tolist(), t[b].flatten().tolist()
        dot = sum(x * y for x, y in zip(sv, tv))
        cos.append(dot / (math.sqrt(sum(x * x for x in sv)) * math.sqrt(sum(y * y for y in tv))))
    l1 = sum(_smooth_l1(x - y) for x, y in zip(s.flatten().tolist(), t.flatten().tolist())) / s.numel()
    want = 0.9 * sum(1 - c for c in cos) / 2 + 0.1 * l1
    got = distill_loss_reference(s, t)
    assert got.dtype == torch.float32 and got.ndim == 0
    assert abs(got.item() - want) < 1e-6


def test_cosine_is_per_image_over_the_whole_map_not_per_token():
    # per-token cosines are 1 and -1 (mean 0), the whole-map cosine is not
    s = torch.tensor([[[[1.0, 0.0]], [[0.0, 3.0]]]])  # (1, 2, 1, 2)
    t = torch.tensor([[[[2.0, 0.0]], [[0.0, -1.0]]]])
    got = distill_loss_reference(s, t, cos_weight=1.0, l1_weight=0.0)
    whole = (2.0 - 3.0) / (math.sqrt(10.0) * math.sqrt(5.0))
    assert abs(got.item() - (1 - whole)) < 1e-6


def test_weights_and_beta_are_used():
    s, t = torch.zeros(1, 4), torch.tensor([[0.5, -0.5, 2.0, 4.0]])
    l1_beta2 = sum(_smooth_l1(d, 2.0) for d in (0.5, 0.5, 2.0, 4.0)) / 4
    got = distill_loss_reference(s, t, cos_weight=0.0, l1_weight=1.0, beta=2.0)
    assert abs(got.item() - l1_beta2) < 1e-6


def test_zero_for_identical_maps():
    torch.manual_seed(0)
    target = torch.randn(3, 6, 6, 32)  # (B, H, W, C)
    student = target.permute(0, 3, 1, 2).clone()  # (B, C, h, w), same grid
    assert distill_term(student, target).item() == pytest.approx(0.0, abs=1e-6)
    total, terms = distillation_loss({"t": [student, student]}, {"t": [target, target]})
    assert total.item() == pytest.approx(0.0, abs=1e-6)


def test_resize_is_bilinear_half_pixel():
    # a 1x2 row [0, 1] resized to 1x4 with align_corners=False is [0, .25, .75, 1]
    s = torch.tensor([0.0, 1.0]).reshape(1, 1, 1, 2)  # (B, C, h, w)
    t = torch.zeros(1, 1, 4, 1)  # (B, H, W, C)
    got = resize_to_target(s, t)
    assert got.shape == (1, 1, 4, 1)
    torch.testing.assert_close(got.flatten(), torch.tensor([0.0, 0.25, 0.75, 1.0]))


@pytest.mark.parametrize(
    "student_hw,target_hw", [((4, 4), (7, 7)), ((6, 6), (4, 4)), ((4, 4), (4, 4)), ((3, 5), (6, 2))]
)
def test_distill_term_resizes_student_to_target_grid(student_hw, target_hw):
    torch.manual_seed(0)
    s = torch.randn(2, 8, *student_hw, requires_grad=True)
    t = torch.randn(2, *target_hw, 8)
    got = distill_term(s, t)
    up = F.interpolate(s.detach(), size=target_hw, mode="bilinear", align_corners=False)  # (B, C, H, W)
    want = distill_loss_reference(up, t.permute(0, 3, 1, 2))
    torch.testing.assert_close(got, want)
    got.backward()
    assert s.grad is not None and torch.isfinite(s.grad).all() and s.grad.abs().sum() > 0


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_low_precision_targets_are_upcast(dtype):
    torch.manual_seed(0)
    s = torch.randn(2, 16, 3, 3)
    t = torch.randn(2, 3, 3, 16).to(dtype)
    got = distill_term(s, t)
    assert got.dtype == torch.float32
    torch.testing.assert_close(got, distill_term(s, t.float()))
    # and a low-precision student map is compared in fp32 too
    assert distill_term(s.to(dtype), t).dtype == torch.float32


def test_distillation_loss_is_plain_sum_with_named_terms():
    torch.manual_seed(0)
    student = {
        "dinov2_b": [torch.randn(2, 4, 3, 3) for _ in range(4)],
        "sam_b": [torch.randn(2, 6, 3, 3) for _ in range(4)],
    }
    targets = {
        "dinov2_b": [torch.randn(2, 5, 5, 4) for _ in range(4)],
        "sam_b": [torch.randn(2, 8, 8, 6) for _ in range(4)],
    }
    total, terms = distillation_loss(student, targets)
    assert list(terms) == [f"{t}/L{i}" for t in ("dinov2_b", "sam_b") for i in range(4)]
    assert not any(v.requires_grad for v in terms.values())
    torch.testing.assert_close(total, torch.stack(list(terms.values())).sum())
    torch.testing.assert_close(terms["sam_b/L2"], distill_term(student["sam_b"][2], targets["sam_b"][2]))


def test_pairing_and_shape_errors():
    s = {"a": [torch.randn(1, 4, 2, 2)]}
    with pytest.raises(SakError, match="do not match target teachers"):
        distillation_loss(s, {"b": [torch.randn(1, 2, 2, 4)]})
    with pytest.raises(SakError, match="1 levels, the targets 2"):
        distillation_loss(s, {"a": [torch.randn(1, 2, 2, 4)] * 2})
    with pytest.raises(SakError, match="channel width"):
        distill_term(torch.randn(1, 4, 2, 2), torch.randn(1, 2, 2, 5))
    with pytest.raises(SakError, match="equal shapes"):
        distill_loss_reference(torch.randn(2, 3), torch.randn(2, 4))


def test_rep_sim():
    torch.manual_seed(0)
    t = torch.randn(2, 4, 4, 8)  # (B, H, W, C)
    s = t.permute(0, 3, 1, 2)
    assert rep_sim(s, t).item() == pytest.approx(1.0, abs=1e-6)
    assert rep_sim(-s, t).item() == pytest.approx(-1.0, abs=1e-6)
    # per-token: scaling each token separately does not change it (unlike the loss's whole-map cosine)
    scales = torch.rand(2, 1, 4, 4) + 0.1
    assert rep_sim(s * scales, t).item() == pytest.approx(1.0, abs=1e-5)
    # hand computation on a resized pair
    s2 = torch.randn(2, 8, 2, 2)
    up = F.interpolate(s2, size=(4, 4), mode="bilinear", align_corners=False).permute(0, 2, 3, 1)
    per_token = (up * t).sum(-1) / (up.norm(dim=-1) * t.norm(dim=-1))
    assert rep_sim(s2, t).item() == pytest.approx(per_token.mean().item(), abs=1e-6)
    by_teacher = rep_sim_by_teacher({"x": [s, -s]}, {"x": [t, t]})
    assert by_teacher["x"].item() == pytest.approx(0.0, abs=1e-6)
