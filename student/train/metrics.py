"""Stage-2 evaluation metrics (paper B.4), all accumulated at dataset level: `update` per batch, `compute` once.

    semseg, human_parts   SegmentationMeter   mIoU % from one confusion matrix over the dataset (ignore 255)
    sal                   SaliencyMeter       maxF % (beta^2 0.3) over thresholds 0.05..0.95
    normals               NormalsMeter        mean angular error (degrees) over all valid pixels
    edge                  BoundaryMeter       odsF % with a localisation tolerance (fraction of the diagonal)
    depth                 DepthMeter          RMSE over all valid (> 0) pixels
    mtl_gain              Delta_m % against single-task baselines (paper eq. 7)

Averaging conventions (those of the ATRC / InvPT / SAK evaluation code the paper's numbers come from):
- mIoU: IoU per class from the dataset-level confusion matrix, averaged over classes that occur in the
  prediction or the ground truth (union > 0).
- maxF: precision and recall per threshold from pixel counts pooled over the whole dataset (micro
  average), F per threshold, maximum over thresholds. Not a mean of per-image F scores.
- mErr and RMSE: pooled over every valid pixel of the dataset (not a mean of per-image values).
- odsF: per threshold, matched / predicted / ground-truth boundary pixel counts summed over the dataset,
  then the best F over thresholds (optimal dataset scale, Martin et al. 2004).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np
import torch
from scipy.sparse import coo_matrix
from scipy.sparse.csgraph import maximum_bipartite_matching
from scipy.spatial import cKDTree
from skimage.morphology import thin

from sak.pipeline.base.errors import SakError

IGNORE_INDEX = 255
SALIENCY_BETA2 = 0.3
SALIENCY_THRESHOLDS = tuple(round(0.05 * k, 2) for k in range(1, 20))  # 0.05 .. 0.95
EDGE_TOLERANCE = {"pascal_context": 0.0075, "nyud": 0.011}  # max mis-localisation / image diagonal
EDGE_THRESHOLDS = tuple((k + 1) / 100 for k in range(99))  # 0.01 .. 0.99, as the BSDS/SEISM benchmarks

# Single-task baselines of the paper (Tables 13-16 and 5-6), for Delta_m: {dataset: {backbone: {task: M}}}.
SINGLE_TASK_BASELINES: dict[str, dict[str, dict[str, float]]] = {
    "pascal_context": {
        "vit_s": {"semseg": 77.59, "human_parts": 66.58, "sal": 84.60, "normals": 14.16, "edge": 70.95},
        "vit_b": {"semseg": 80.25, "human_parts": 70.54, "sal": 84.54, "normals": 13.57, "edge": 74.22},
        "vit_l": {"semseg": 81.61, "human_parts": 72.77, "sal": 83.80, "normals": 13.87, "edge": 75.24},
    },
    "nyud": {
        "vit_s": {"semseg": 48.11, "depth": 0.5911, "normals": 20.27, "edge": 75.17},
        "vit_b": {"semseg": 51.15, "depth": 0.5792, "normals": 19.77, "edge": 77.35},
        "vit_l": {"semseg": 54.19, "depth": 0.5560, "normals": 19.22, "edge": 78.09},
    },
}
LOWER_IS_BETTER = frozenset({"normals", "depth"})  # mErr, RMSE


def _np(x: torch.Tensor | np.ndarray) -> np.ndarray:
    return x.detach().cpu().numpy() if isinstance(x, torch.Tensor) else np.asarray(x)


def _squeeze(x: np.ndarray) -> np.ndarray:
    return x[:, 0] if x.ndim == 4 and x.shape[1] == 1 else x  # (B, 1, H, W) -> (B, H, W)


# ----------------------------------------------------------------------------------------------
# segmentation


class SegmentationMeter:
    """mIoU % from a dataset-level confusion matrix. update(pred ids (B, H, W), target (B, [1,] H, W))."""

    def __init__(self, num_classes: int, ignore_index: int = IGNORE_INDEX):
        self.num_classes = num_classes
        self.ignore_index = ignore_index
        self.confusion = np.zeros((num_classes, num_classes), dtype=np.int64)  # rows: target, cols: pred

    def update(self, pred: torch.Tensor | np.ndarray, target: torch.Tensor | np.ndarray) -> None:
        p, t = _squeeze(_np(pred)).astype(np.int64).ravel(), _squeeze(_np(target)).astype(np.int64).ravel()
        if p.shape != t.shape:
            raise SakError(f"prediction and target differ in size: {p.shape} vs {t.shape}")
        valid = t != self.ignore_index
        p, t = p[valid], t[valid]
        if ((t < 0) | (t >= self.num_classes) | (p < 0) | (p >= self.num_classes)).any():
            raise SakError(f"class ids must lie in [0, {self.num_classes}) or be {self.ignore_index}")
        k = self.num_classes
        self.confusion += np.bincount(t * k + p, minlength=k * k).reshape(k, k)

    def iou_per_class(self) -> np.ndarray:
        tp = np.diag(self.confusion).astype(np.float64)
        union = self.confusion.sum(0) + self.confusion.sum(1) - tp
        with np.errstate(invalid="ignore", divide="ignore"):
            return np.where(union > 0, tp / union, np.nan)

    def compute(self) -> float:
        iou = self.iou_per_class()
        if np.isnan(iou).all():
            raise SakError("mIoU of an empty confusion matrix")
        return float(np.nanmean(iou) * 100)


# ----------------------------------------------------------------------------------------------
# saliency


class SaliencyMeter:
    """maxF %. update(prob (B, [1,] H, W) in [0, 1], target {0, 1, 255}); a pixel is positive at prob >= thr."""

    def __init__(
        self,
        thresholds: Sequence[float] = SALIENCY_THRESHOLDS,
        beta2: float = SALIENCY_BETA2,
        ignore_index: int = IGNORE_INDEX,
    ):
        self.thresholds = np.asarray(thresholds, dtype=np.float64)
        self.beta2 = beta2
        self.ignore_index = ignore_index
        self.true_pos = np.zeros(len(self.thresholds))
        self.pred_pos = np.zeros(len(self.thresholds))
        self.actual_pos = 0.0

    def update(self, prob: torch.Tensor | np.ndarray, target: torch.Tensor | np.ndarray) -> None:
        p, t = _squeeze(_np(prob)).astype(np.float64), _squeeze(_np(target))
        valid = t != self.ignore_index
        p, t = p[valid], t[valid] > 0.5  # (P,)
        above = p[None, :] >= self.thresholds[:, None]  # (T, P); note: T x pixels booleans
        self.true_pos += (above & t[None, :]).sum(1)
        self.pred_pos += above.sum(1)
        self.actual_pos += float(t.sum())

    def f_scores(self) -> np.ndarray:
        with np.errstate(invalid="ignore", divide="ignore"):
            precision = np.where(self.pred_pos > 0, self.true_pos / self.pred_pos, 0.0)
            recall = self.true_pos / self.actual_pos if self.actual_pos > 0 else np.zeros_like(self.true_pos)
            denom = self.beta2 * precision + recall
            return np.where(denom > 0, (1 + self.beta2) * precision * recall / denom, 0.0)

    def compute(self) -> float:
        return float(self.f_scores().max() * 100)


# ----------------------------------------------------------------------------------------------
# normals and depth


class NormalsMeter:
    """Mean angular error in degrees. update(pred (B, 3, H, W) any scale, target (B, 3, H, W) normals).

    Valid pixels: target not all zero and free of 255. Both vectors are normalised; the angle uses
    2 * atan2(|a - b|, |a + b|), accurate near 0 and 180 degrees.
    """

    def __init__(self, ignore_index: int = IGNORE_INDEX):
        self.ignore_index = ignore_index
        self.sum_deg = 0.0
        self.count = 0

    def update(self, pred: torch.Tensor | np.ndarray, target: torch.Tensor | np.ndarray) -> None:
        p, t = _np(pred).astype(np.float64), _np(target).astype(np.float64)
        if p.shape != t.shape or p.ndim != 4 or p.shape[1] != 3:
            raise SakError(f"normals need (B, 3, H, W) prediction and target, got {p.shape}, {t.shape}")
        valid = (t != self.ignore_index).all(1) & (t != 0).any(1)  # (B, H, W)
        p = np.moveaxis(p, 1, -1)[valid]  # (P, 3)
        t = np.moveaxis(t, 1, -1)[valid]
        p = p / np.maximum(np.linalg.norm(p, axis=1, keepdims=True), 1e-12)
        t = t / np.linalg.norm(t, axis=1, keepdims=True)
        deg = np.degrees(2 * np.arctan2(np.linalg.norm(p - t, axis=1), np.linalg.norm(p + t, axis=1)))
        self.sum_deg += float(deg.sum())
        self.count += int(deg.size)

    def compute(self) -> float:
        if self.count == 0:
            raise SakError("mean angular error over zero valid pixels")
        return self.sum_deg / self.count


class DepthMeter:
    """RMSE over every valid pixel of the dataset. update(pred (B, [1,] H, W), target with 0 = missing)."""

    def __init__(self) -> None:
        self.sum_sq = 0.0
        self.count = 0

    def update(self, pred: torch.Tensor | np.ndarray, target: torch.Tensor | np.ndarray) -> None:
        p, t = _squeeze(_np(pred)).astype(np.float64), _squeeze(_np(target)).astype(np.float64)
        valid = t > 0
        self.sum_sq += float(((p[valid] - t[valid]) ** 2).sum())
        self.count += int(valid.sum())

    def compute(self) -> float:
        if self.count == 0:
            raise SakError("RMSE over zero valid pixels")
        return float(np.sqrt(self.sum_sq / self.count))


# ----------------------------------------------------------------------------------------------
# boundaries


def match_boundaries(pred: np.ndarray, gt: np.ndarray, max_dist: float) -> int:
    """Size of a maximum one-to-one matching between boundary pixels of two (H, W) bool maps.

    A predicted and a ground-truth pixel may be matched when their Euclidean distance is <= max_dist.
    """
    pp, gp = np.argwhere(pred), np.argwhere(gt)  # (P, 2), (G, 2)
    if len(pp) == 0 or len(gp) == 0:
        return 0
    # all pairs within max_dist, zero distances included (ndarray output keeps them, unlike dok)
    pairs = cKDTree(pp).sparse_distance_matrix(cKDTree(gp), max_dist, output_type="ndarray")
    if len(pairs) == 0:
        return 0
    ones = np.ones(len(pairs), dtype=np.int8)
    graph = coo_matrix((ones, (pairs["i"], pairs["j"])), shape=(len(pp), len(gp))).tocsr()
    match = maximum_bipartite_matching(graph, perm_type="column")  # per predicted pixel: gt index or -1
    return int((match >= 0).sum())


class BoundaryMeter:
    """odsF %: update(prob (B, [1,] H, W) in [0, 1], target {0, 1, 255}).

    Per threshold: binarise at prob >= thr, thin to one-pixel width (skimage), drop ignored pixels,
    match to the ground-truth boundary pixels within tolerance * image diagonal (maximum bipartite
    matching), and add matched / predicted / ground-truth counts over the dataset. odsF is the best
    F = 2PR / (P + R) over thresholds. The ground truth is used as given (already thin in PASCAL/NYUD).
    """

    def __init__(
        self,
        tolerance: float,
        thresholds: Sequence[float] = EDGE_THRESHOLDS,
        ignore_index: int = IGNORE_INDEX,
    ):
        self.tolerance = tolerance
        self.thresholds = np.asarray(thresholds, dtype=np.float64)
        self.ignore_index = ignore_index
        self.matched = np.zeros(len(self.thresholds))
        self.predicted = np.zeros(len(self.thresholds))
        self.actual = 0.0

    def update(self, prob: torch.Tensor | np.ndarray, target: torch.Tensor | np.ndarray) -> None:
        probs, targets = _squeeze(_np(prob)).astype(np.float64), _squeeze(_np(target))
        if probs.ndim == 2:
            probs, targets = probs[None], targets[None]
        for p, t in zip(probs, targets, strict=True):
            valid = t != self.ignore_index
            gt = (t > 0) & valid
            max_dist = self.tolerance * float(np.hypot(*p.shape))
            self.actual += float(gt.sum())
            for k, thr in enumerate(self.thresholds):
                edges = thin(p >= thr) & valid
                self.predicted[k] += float(edges.sum())
                self.matched[k] += match_boundaries(edges, gt, max_dist)

    def f_scores(self) -> np.ndarray:
        with np.errstate(invalid="ignore", divide="ignore"):
            precision = np.where(self.predicted > 0, self.matched / self.predicted, 0.0)
            recall = self.matched / self.actual if self.actual > 0 else np.zeros_like(self.matched)
            return np.where(precision + recall > 0, 2 * precision * recall / (precision + recall), 0.0)

    def compute(self) -> float:
        return float(self.f_scores().max() * 100)


# ----------------------------------------------------------------------------------------------
# multi-task gain


def mtl_gain(
    results: Mapping[str, float],
    baselines: Mapping[str, float] | None = None,
    *,
    dataset: str | None = None,
    backbone: str | None = None,
    lower_is_better: frozenset[str] | set[str] = LOWER_IS_BETTER,
) -> float:
    """Delta_m % = 100/T * sum_t (-1)^{l_t} (M_t - M_ST,t) / M_ST,t over the tasks in `results`.

    Baselines: pass them, or name dataset ("pascal_context", "nyud") and backbone ("vit_s", "vit_b",
    "vit_l") to use the paper's single-task baselines (SINGLE_TASK_BASELINES).
    """
    if baselines is None:
        if dataset is None or backbone is None:
            raise SakError("mtl_gain needs baselines, or dataset and backbone for the paper's table")
        try:
            baselines = SINGLE_TASK_BASELINES[dataset][backbone]
        except KeyError:
            known = {d: sorted(b) for d, b in SINGLE_TASK_BASELINES.items()}
            raise SakError(f"no paper baseline for {dataset!r}/{backbone!r}; known: {known}") from None
    if not results:
        raise SakError("mtl_gain of no tasks")
    total = 0.0
    for task, value in results.items():
        if task not in baselines:
            raise SakError(f"no single-task baseline for task {task!r}")
        base = float(baselines[task])
        sign = -1.0 if task in lower_is_better else 1.0
        total += sign * (float(value) - base) / base
    return 100.0 * total / len(results)
