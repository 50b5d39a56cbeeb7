"""Evaluation meters on hand-computed cases, by the reference meters' rules (innovator-zero/SAK
evaluation/eval_semseg.py, eval_sal.py, eval_normals.py, eval_depth.py, utils.get_output). odsF:
test_boundary_eval.py."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from sak.pipeline.base.errors import SakError
from sak.student.train.metrics import (
    SALIENCY_THRESHOLDS,
    DepthMeter,
    NormalsMeter,
    SaliencyMeter,
    SegmentationMeter,
    mtl_gain,
)


def test_miou_averages_every_class_and_an_absent_class_scores_zero():
    meter = SegmentationMeter(num_classes=4)
    meter.update(torch.tensor([[[0, 0, 1, 1]]]), torch.tensor([[[0, 1, 1, 255]]]))
    meter.update(np.array([[[2, 1]]]), np.array([[[2, 2]]]))
    # valid (target, pred): (0,0) (1,0) (1,1) (2,2) (2,1); the (255, 1) pixel is ignored entirely
    # class 0: TP 1, FP 1, FN 0 -> 1/2; class 1: TP 1, FP 1, FN 1 -> 1/3; class 2: TP 1, FN 1 -> 1/2
    # class 3: neither labelled nor predicted: TP / max(0, 1e-8) = 0, and it counts in the mean of 4
    assert meter.compute() == pytest.approx(100 * (0.5 + 1 / 3 + 0.5 + 0.0) / 4)
    assert meter.iou_per_class()[3] == 0.0
    with pytest.raises(SakError, match="class ids"):
        meter.update(np.array([[[4]]]), np.array([[[0]]]))
    empty = SegmentationMeter(num_classes=3)  # nothing seen: every class 0
    assert empty.compute() == 0.0


def test_miou_class_only_predicted_scores_zero_not_left_out():
    meter = SegmentationMeter(num_classes=3)
    meter.update(np.array([[[0, 0, 2]]]), np.array([[[0, 0, 0]]]))  # class 2 predicted once, never labelled
    # class 0: TP 2, FN 1 -> 2/3; class 1: 0 (absent); class 2: TP 0, FP 1 -> 0
    assert meter.compute() == pytest.approx(100 * (2 / 3) / 3)


def test_saliency_thresholds_are_torch_arange_float32():
    reference = torch.arange(0.05, 1, 0.05)  # eval_sal.py
    assert len(SALIENCY_THRESHOLDS) == 19 and torch.equal(torch.tensor(SALIENCY_THRESHOLDS), reference)


def test_saliency_maxf_hand_case_with_the_reference_epsilons():
    prob = np.array([[[0.9, 0.6, 0.3, 0.1, 0.7]]])
    target = np.array([[[1, 0, 1, 0, 255]]])
    meter = SaliencyMeter()
    meter.update(prob, target)
    # thresholds 0.65 .. 0.9: only 0.9 positive -> TP 1, PP 1, AP 2 -> P = 1/(1+1e-8), R = 1/(2+1e-8)
    p, r = 1 / (1 + 1e-8), 1 / (2 + 1e-8)
    assert meter.compute() == pytest.approx(100 * 1.3 * p * r / (0.3 * p + r + 1e-8), rel=1e-12)
    # a threshold is met with >=: a probability exactly at 0.5 (float32) counts as salient there
    at = SaliencyMeter(thresholds=(0.5,))
    at.update(np.array([[[0.5, 0.2]]]), np.array([[[1, 0]]]))
    assert at.compute() == pytest.approx(100.0, abs=1e-5)


def test_saliency_pools_counts_over_the_dataset():
    a, b = (np.array([[[0.9, 0.2]]]), np.array([[[1, 0]]])), (np.array([[[0.4, 0.8]]]), np.array([[[1, 0]]]))
    pooled = SaliencyMeter()
    pooled.update(*a)
    pooled.update(*b)
    batched = SaliencyMeter()
    batched.update(np.concatenate([a[0], b[0]]), np.concatenate([a[1], b[1]]))
    assert pooled.compute() == pytest.approx(batched.compute())
    per_image = []
    for x in (a, b):
        m = SaliencyMeter()
        m.update(*x)
        per_image.append(m.compute())
    assert per_image[0] == pytest.approx(100.0, abs=1e-5)
    assert pooled.compute() != pytest.approx(float(np.mean(per_image)))


def test_normals_mean_angle_skips_invalid_labels_and_a_zero_prediction_is_90_degrees():
    pred = torch.zeros(1, 3, 1, 4)
    pred[0, :, 0, 0] = torch.tensor([2.0, 0.0, 0.0])
    pred[0, :, 0, 1] = torch.tensor([1.0, 1.0, 0.0])
    pred[0, :, 0, 2] = torch.tensor([1.0, 0.0, 0.0])
    # pixel 3: a zero prediction (normalize_tensor keeps it zero) against a valid label
    target = torch.zeros(1, 3, 1, 4)
    target[0, :, 0, 0] = torch.tensor([0.0, 1.0, 0.0])  # 90 degrees
    target[0, :, 0, 1] = torch.tensor([1.0, 0.0, 0.0])  # 45 degrees
    # pixel 2 has no label (all zero: masked or padding): skipped
    target[0, :, 0, 3] = torch.tensor([0.0, 0.0, 2.0])  # any length: normalised -> 90 degrees from zero
    meter = NormalsMeter()
    meter.update(pred, target)
    assert meter.compute() == pytest.approx((90 + 45 + 90) / 3)
    meter.update(-target[:, :, :, :1], target[:, :, :, :1])  # opposite: 180 degrees
    assert meter.compute() == pytest.approx((90 + 45 + 90 + 180) / 4)


def test_depth_rmse_clamps_negative_predictions_and_skips_invalid_depth():
    meter = DepthMeter()
    # pairs (pred, gt): (1, 2) err 1; (2, 0) missing; (-3, 4) clamped to 1e-9 -> err 4 - 1e-9; (5, 80) beyond
    # the reference's 80 m range: skipped
    meter.update(torch.tensor([[[1.0, 2.0, -3.0, 5.0]]]), torch.tensor([[[2.0, 0.0, 4.0, 80.0]]]))
    assert meter.compute() == pytest.approx(math.sqrt((1 + (4 - 1e-9) ** 2) / 2), rel=1e-12)
    meter.update(np.array([[[3.0]]]), np.array([[[1.0]]]))  # pooled over pixels, not a mean of images
    assert meter.compute() == pytest.approx(math.sqrt((1 + (4 - 1e-9) ** 2 + 4) / 3), rel=1e-12)
    unclamped = math.sqrt((1 + 49 + 4) / 3)
    assert meter.compute() < unclamped - 1.0


def test_mtl_gain_reproduces_paper_rows():
    sak_pascal = {"semseg": 81.88, "human_parts": 74.30, "sal": 84.79, "normals": 14.02, "edge": 74.09}
    assert mtl_gain(sak_pascal, dataset="pascal_context", backbone="vit_b") == pytest.approx(0.83, abs=0.005)
    sak_nyud = {"semseg": 59.93, "depth": 0.4942, "normals": 17.60, "edge": 78.60}
    assert mtl_gain(sak_nyud, dataset="nyud", backbone="vit_b") == pytest.approx(11.11, abs=0.005)
    assert mtl_gain({"semseg": 55.0, "depth": 0.5}, {"semseg": 50.0, "depth": 0.4}) == pytest.approx(
        100 * (0.1 - 0.25) / 2
    )
    with pytest.raises(SakError, match="needs baselines"):
        mtl_gain(sak_pascal)
    with pytest.raises(SakError, match="no single-task baseline"):
        mtl_gain({"flow": 1.0}, dataset="nyud", backbone="vit_b")
