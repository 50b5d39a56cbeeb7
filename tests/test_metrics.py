"""Evaluation metrics on hand-computed cases; odsF against a brute-force matching reference."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest
import torch
from scipy.optimize import linear_sum_assignment
from skimage.morphology import thin

from sak.pipeline.base.errors import SakError
from sak.student.train.metrics import (
    EDGE_TOLERANCE,
    SALIENCY_THRESHOLDS,
    BoundaryMeter,
    DepthMeter,
    NormalsMeter,
    SaliencyMeter,
    SegmentationMeter,
    match_boundaries,
    mtl_gain,
)


def test_miou_from_dataset_confusion_matrix():
    meter = SegmentationMeter(num_classes=4)
    meter.update(torch.tensor([[[0, 0, 1, 1]]]), torch.tensor([[[0, 1, 1, 255]]]))
    meter.update(np.array([[[2, 1]]]), np.array([[[2, 2]]]))
    # valid pairs (target, pred): (0,0) (1,0) (1,1) (2,2) (2,1)
    # class 0: tp 1, union = 1 + 2 - 1 = 2 -> 0.5; class 1: tp 1, union = 2 + 2 - 1 = 3 -> 1/3
    # class 2: tp 1, union = 2 + 1 - 1 = 2 -> 0.5; class 3 absent everywhere -> left out of the mean
    assert meter.compute() == pytest.approx(100 * (0.5 + 1 / 3 + 0.5) / 3)
    assert np.isnan(meter.iou_per_class()[3])
    with pytest.raises(SakError, match="class ids"):
        meter.update(np.array([[[4]]]), np.array([[[0]]]))


def test_saliency_maxf_hand_case_and_pooling():
    prob = np.array([[[0.9, 0.6, 0.3, 0.1, 0.7]]])
    target = np.array([[[1, 0, 1, 0, 255]]])
    meter = SaliencyMeter()
    meter.update(prob, target)
    # best threshold range 0.65..0.9: only 0.9 positive -> P 1, R 1/2, F = 1.3 * 0.5 / (0.3 + 0.5)
    assert meter.compute() == pytest.approx(100 * 0.65 / 0.8)
    assert (
        len(SALIENCY_THRESHOLDS) == 19 and SALIENCY_THRESHOLDS[0] == 0.05 and SALIENCY_THRESHOLDS[-1] == 0.95
    )

    # dataset-level pooling: two images in one batch or two updates give the same, and that is not
    # the mean of per-image maxF
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
    assert per_image[0] == pytest.approx(100.0)
    assert pooled.compute() != pytest.approx(float(np.mean(per_image)))


def test_normals_mean_angle_degrees():
    pred = torch.zeros(1, 3, 1, 3)
    pred[0, :, 0, 0] = torch.tensor([2.0, 0.0, 0.0])
    pred[0, :, 0, 1] = torch.tensor([1.0, 1.0, 0.0])
    pred[0, :, 0, 2] = torch.tensor([1.0, 0.0, 0.0])
    target = torch.zeros(1, 3, 1, 3)
    target[0, :, 0, 0] = torch.tensor([0.0, 1.0, 0.0])  # 90 degrees
    target[0, :, 0, 1] = torch.tensor([1.0, 0.0, 0.0])  # 45 degrees
    # pixel 2 has no label (all zero)
    meter = NormalsMeter()
    meter.update(pred, target)
    assert meter.compute() == pytest.approx(67.5)
    meter.update(-target[:, :, :, :1], target[:, :, :, :1])  # opposite: 180 degrees
    assert meter.compute() == pytest.approx((90 + 45 + 180) / 3)


def test_depth_rmse_pooled_over_valid_pixels():
    meter = DepthMeter()
    meter.update(torch.tensor([[[1.0, 2.0, 3.0]]]), torch.tensor([[[2.0, 0.0, 4.0]]]))
    assert meter.compute() == pytest.approx(1.0)
    meter.update(np.array([[[3.0]]]), np.array([[[1.0]]]))  # pooled: sqrt((1 + 1 + 4) / 3)
    assert meter.compute() == pytest.approx(math.sqrt(2.0))


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


# ----------------------------------------------------------------------------------------------
# boundaries


def _exhaustive_matching(pred: np.ndarray, gt: np.ndarray, max_dist: float) -> int:
    """Largest one-to-one matching by trying every injective assignment (tiny point sets only)."""
    pp, gp = np.argwhere(pred), np.argwhere(gt)
    for k in range(min(len(pp), len(gp)), 0, -1):
        for rows in itertools.combinations(range(len(pp)), k):
            for cols in itertools.permutations(range(len(gp)), k):
                if all(np.hypot(*(pp[r] - gp[c])) <= max_dist for r, c in zip(rows, cols)):
                    return k
    return 0


def _assignment_matching(pred: np.ndarray, gt: np.ndarray, max_dist: float) -> int:
    """Largest matching as a 0/1-cost assignment (Hungarian): an independent algorithm."""
    pp, gp = np.argwhere(pred), np.argwhere(gt)
    if len(pp) == 0 or len(gp) == 0:
        return 0
    dist = np.hypot(pp[:, None, 0] - gp[None, :, 0], pp[:, None, 1] - gp[None, :, 1])
    feasible = dist <= max_dist
    rows, cols = linear_sum_assignment(~feasible)  # minimise the number of infeasible pairs used
    return int(feasible[rows, cols].sum())


def test_matching_equals_exhaustive_on_tiny_sets():
    rng = np.random.default_rng(0)
    checked = 0
    for _ in range(40):
        pred = rng.random((6, 6)) < 0.12
        gt = rng.random((6, 6)) < 0.12
        if pred.sum() > 5 or gt.sum() > 5:
            continue
        checked += 1
        for max_dist in (0.5, 1.0, 1.5, 2.5):
            assert match_boundaries(pred, gt, max_dist) == _exhaustive_matching(pred, gt, max_dist)
    assert checked >= 10


def _reference_ods(probs, gts, thresholds, tolerance) -> float:
    matched = np.zeros(len(thresholds))
    predicted = np.zeros(len(thresholds))
    actual = 0.0
    for p, g in zip(probs, gts):
        g = g > 0
        actual += g.sum()
        max_dist = tolerance * math.hypot(*p.shape)
        for k, thr in enumerate(thresholds):
            e = thin(p >= thr)
            predicted[k] += e.sum()
            matched[k] += _assignment_matching(e, g, max_dist)
    best = 0.0
    for m, n in zip(matched, predicted):
        if m > 0:
            prec, rec = m / n, m / actual
            best = max(best, 2 * prec * rec / (prec + rec))
    return 100 * best


def test_odsf_against_brute_force_reference_on_12x12():
    rng = np.random.default_rng(1)
    probs = rng.random((3, 12, 12)) ** 2
    gts = (rng.random((3, 12, 12)) < 0.15).astype(np.uint8)
    thresholds = (0.3, 0.5, 0.7, 0.9)
    for tol in (0.05, 0.1):  # 0.85 and 1.7 pixels on a 12x12 diagonal
        meter = BoundaryMeter(tol, thresholds=thresholds)
        meter.update(torch.from_numpy(probs), torch.from_numpy(gts)[:, None])
        assert meter.compute() == pytest.approx(_reference_ods(probs, gts, thresholds, tol))
    assert 0 < meter.compute() < 100


def _line_case(shift: int) -> tuple[np.ndarray, np.ndarray]:
    gt = np.zeros((100, 100), np.uint8)
    gt[10:90, 50] = 1
    prob = np.zeros((100, 100))
    prob[10:90, 50 + shift] = 0.9
    return prob, gt


def test_odsf_tolerance_shift_by_one_matches_beyond_does_not():
    tol = EDGE_TOLERANCE["nyud"]  # 0.011 * 141.4 = 1.56 pixels
    for shift, expected in ((0, 100.0), (1, 100.0), (2, 0.0)):
        meter = BoundaryMeter(tol, thresholds=(0.5,))
        meter.update(*_line_case(shift))
        assert meter.compute() == pytest.approx(expected), shift
    tight = BoundaryMeter(0.005, thresholds=(0.5,))  # 0.7 pixels: even a one-pixel shift misses
    tight.update(*_line_case(1))
    assert tight.compute() == 0.0


def test_odsf_matching_is_one_to_one_and_ignores_255():
    gt = np.zeros((100, 100), np.uint8)
    gt[10:90, 50] = 1
    prob = np.zeros((100, 100))
    prob[10:90, 49] = prob[10:90, 51] = 0.9  # two lines, both within tolerance of the one gt line
    meter = BoundaryMeter(EDGE_TOLERANCE["nyud"], thresholds=(0.5,))
    meter.update(prob, gt)
    assert meter.compute() == pytest.approx(100 * 2 * 0.5 / 1.5)  # P 1/2, R 1
    gt_ignore = gt.copy()
    gt_ignore[:, 51:] = 255  # the second line lies in an ignored region
    meter = BoundaryMeter(EDGE_TOLERANCE["nyud"], thresholds=(0.5,))
    meter.update(prob, gt_ignore)
    assert meter.compute() == pytest.approx(100.0)
