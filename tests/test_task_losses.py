"""Task losses on tiny hand-computed cases."""

from __future__ import annotations

import math

import pytest
import torch

from sak.pipeline.base.errors import SakError
from sak.student.train.dense_config import DEFAULT_TASK_WEIGHTS
from sak.student.train.task_losses import (
    balanced_bce_loss,
    cross_entropy_loss,
    depth_l1_loss,
    edge_bce_loss,
    multi_task_loss,
    normals_l1_loss,
)


def _bce(x: float, y: float) -> float:
    p = 1 / (1 + math.exp(-x))
    return -(y * math.log(p) + (1 - y) * math.log(1 - p))


def test_cross_entropy_ignores_255():
    logits = torch.zeros(1, 3, 1, 3)
    logits[0, :, 0, 0] = torch.tensor([2.0, 0.0, 0.0])
    logits[0, :, 0, 1] = torch.tensor([0.0, 1.0, 0.0])
    target = torch.tensor([[[0, 2, 255]]])  # (B, H, W)
    lse0 = math.log(math.exp(2) + 2)
    lse1 = math.log(math.exp(1) + 2)
    expected = ((lse0 - 2.0) + (lse1 - 0.0)) / 2
    assert cross_entropy_loss(logits, target).item() == pytest.approx(expected, rel=1e-6)
    assert cross_entropy_loss(logits, target[:, None]).item() == pytest.approx(expected, rel=1e-6)
    none_valid = cross_entropy_loss(logits.requires_grad_(), torch.full((1, 1, 3), 255))
    assert none_valid.item() == 0.0
    none_valid.backward()


def test_balanced_bce_weights_by_batch_class_ratio():
    x = torch.tensor([1.0, -0.5, 0.3, 2.0, -1.0]).reshape(1, 1, 1, 5)
    y = torch.tensor([1, 0, 0, 0, 255]).reshape(1, 1, 1, 5)
    # valid: 1 positive, 3 negatives -> positives weigh 3/4, negatives 1/4; normalised by 4 valid pixels
    expected = (0.75 * _bce(1.0, 1) + 0.25 * (_bce(-0.5, 0) + _bce(0.3, 0) + _bce(2.0, 0))) / 4
    assert balanced_bce_loss(x, y).item() == pytest.approx(expected, rel=1e-6)
    with pytest.raises(SakError, match="one logit"):
        balanced_bce_loss(torch.zeros(1, 2, 1, 5), y)


def test_normals_l1_on_unit_prediction_skips_unlabelled():
    pred = torch.zeros(1, 3, 1, 3)
    pred[0, :, 0, 0] = torch.tensor([0.0, 0.0, 5.0])  # normalises to (0, 0, 1)
    pred[0, :, 0, 1] = torch.tensor([3.0, 4.0, 0.0])  # normalises to (0.6, 0.8, 0)
    pred[0, :, 0, 2] = torch.tensor([1.0, 1.0, 1.0])
    target = torch.zeros(1, 3, 1, 3)
    target[0, :, 0, 0] = torch.tensor([0.0, 0.0, 1.0])  # error 0
    target[0, :, 0, 1] = torch.tensor([1.0, 0.0, 0.0])  # error 0.4 + 0.8 + 0 = 1.2
    # pixel 2: all-zero target, ignored
    assert normals_l1_loss(pred, target).item() == pytest.approx(1.2 / 2, rel=1e-6)
    target[0, :, 0, 2] = 255.0  # the 255 fill is ignored as well
    assert normals_l1_loss(pred, target).item() == pytest.approx(1.2 / 2, rel=1e-6)


def test_edge_weighted_bce_095_005():
    x = torch.tensor([0.5, -2.0, 1.5]).reshape(1, 1, 1, 3)
    y = torch.tensor([[[[1, 0, 255]]]])
    expected = (0.95 * _bce(0.5, 1) + 0.05 * _bce(-2.0, 0)) / 2
    assert edge_bce_loss(x, y).item() == pytest.approx(expected, rel=1e-6)


def test_depth_l1_ignores_zero():
    pred = torch.tensor([1.0, 2.0, 3.0, 4.0]).reshape(1, 1, 2, 2)
    target = torch.tensor([1.5, 0.0, 2.0, 4.0]).reshape(1, 1, 2, 2)
    assert depth_l1_loss(pred, target).item() == pytest.approx((0.5 + 1.0 + 0.0) / 3)


def test_multi_task_loss_weights_and_errors():
    assert DEFAULT_TASK_WEIGHTS == {
        "semseg": 1.0, "human_parts": 2.0, "sal": 5.0, "normals": 10.0, "edge": 50.0, "depth": 1.0
    }  # fmt: skip
    pred = torch.tensor([1.0, 2.0]).reshape(1, 1, 1, 2)
    target = torch.tensor([2.0, 2.0]).reshape(1, 1, 1, 2)
    edge_x, edge_y = torch.zeros(1, 1, 1, 2), torch.tensor([[[[1, 0]]]])
    total, parts = multi_task_loss({"depth": pred, "edge": edge_x}, {"depth": target, "edge": edge_y})
    assert parts["depth"].item() == pytest.approx(0.5)
    assert parts["edge"].item() == pytest.approx(50 * (0.95 + 0.05) * math.log(2) / 2, rel=1e-6)
    assert total.item() == pytest.approx(parts["depth"].item() + parts["edge"].item())
    with pytest.raises(SakError, match="no loss for task"):
        multi_task_loss({"flow": pred}, {"flow": target})
    with pytest.raises(SakError, match="no target"):
        multi_task_loss({"depth": pred}, {})
