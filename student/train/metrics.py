"""Stage-2 evaluation metrics (paper B.4), accumulated at dataset level: `update` per batch, `compute` once.

    semseg, human_parts   SegmentationMeter   mIoU % over ALL classes (21 / 7 / 40), an absent class 0
    sal                   SaliencyMeter       maxF % (beta^2 0.3) over the thresholds 0.05, 0.10 .. 0.95
    normals               NormalsMeter        mean angular error (degrees) over all valid pixels
    depth                 DepthMeter          RMSE over all valid pixels, predictions clamped at 0
    edge                  boundary_eval.SeismBoundaryMeter: odsF % by the SEISM protocol
    mtl_gain              Delta_m % against single-task baselines (paper eq. 7; saliency enters as maxF)

Each follows innovator-zero/SAK evaluation/ (eval_semseg.py, eval_human_parts.py, eval_sal.py,
eval_normals.py, eval_depth.py) and utils.get_output; docs/protocol.md tabulates where InvPT and MTI-Net
differ. Every meter pools pixel counts over the whole dataset (never a mean of per-image scores):
- mIoU: per class c, IoU_c = TP_c / max(TP_c + FP_c + FN_c, 1e-8) from counts over all non-ignored
  pixels, then the mean over every class of the dataset: a class that neither occurs nor is predicted
  scores 0 (eval_semseg.py: 21 PASCAL classes with background, 40 NYUD classes).
- maxF: prediction p >= t at the float32 thresholds torch.arange(0.05, 1, 0.05); precision
  TP / (PP + 1e-8), recall TP / (AP + 1e-8), F = 1.3 P R / (0.3 P + R + 1e-8); the maximum over t.
- mErr: both vectors normalised (a zero prediction stays zero: 90 degrees), angle 2 atan2(|a - b|, |a + b|)
  over the pixels whose label is valid (not all zero).
- RMSE: predictions clamped at 0 (get_output), then <= 0 -> 1e-9 as eval_depth.py; valid 0 < depth < 80.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np
import torch

from sak.pipeline.base.errors import SakError

IGNORE_INDEX = 255
SALIENCY_BETA2 = 0.3
# eval_sal.py: torch.arange(0.05, 1, 0.05), float32 (0.05 .. 0.95, 19 values, as torch rounds them)
SALIENCY_THRESHOLDS = tuple(float(t) for t in torch.arange(0.05, 1, 0.05))
IOU_EPS = 1e-8  # TP / max(TP + FP + FN, 1e-8)
F_EPS = 1e-8  # eval_sal.py's epsilons in precision, recall and F
DEPTH_RANGE = (0.0, 80.0)  # eval_depth.py: min_depth < gt < max_depth

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
    """mIoU % over all `num_classes`. update(pred ids (B, H, W), target (B, [1,] H, W), 255 = ignore)."""

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
        """(K,) TP / max(TP + FP + FN, 1e-8): 0 for a class absent from both prediction and target."""
        tp = np.diag(self.confusion).astype(np.float64)
        fp = self.confusion.sum(0) - tp  # predicted c, labelled otherwise
        fn = self.confusion.sum(1) - tp  # labelled c, predicted otherwise
        return tp / np.maximum(tp + fp + fn, IOU_EPS)

    def compute(self) -> float:
        return float(self.iou_per_class().mean() * 100)


# ----------------------------------------------------------------------------------------------
# saliency


class SaliencyMeter:
    """maxF %. update(prob (B, [1,] H, W) in [0, 1], target {0, 1, 255}); a pixel is positive at prob >= t.

    prob is the salient-class probability (sigmoid of the one logit = softmax of the references' two);
    like get_output it passes through * 255 / 255 in float32 before the comparison.
    """

    def __init__(
        self,
        thresholds: Sequence[float] = SALIENCY_THRESHOLDS,
        beta2: float = SALIENCY_BETA2,
        ignore_index: int = IGNORE_INDEX,
    ):
        self.thresholds = np.asarray(thresholds, dtype=np.float32)
        self.beta2 = beta2
        self.ignore_index = ignore_index
        self.true_pos = np.zeros(len(self.thresholds))
        self.pred_pos = np.zeros(len(self.thresholds))
        self.actual_pos = 0.0

    def update(self, prob: torch.Tensor | np.ndarray, target: torch.Tensor | np.ndarray) -> None:
        p = _squeeze(_np(prob)).astype(np.float32) * np.float32(255) / np.float32(255)
        t = _squeeze(_np(target))
        valid = t != self.ignore_index
        p, t = p[valid], t[valid] == 1  # (P,)
        above = p[None, :] >= self.thresholds[:, None]  # (T, P); note: T x pixels booleans
        self.true_pos += (above & t[None, :]).sum(1)
        self.pred_pos += above.sum(1)
        self.actual_pos += float(t.sum())

    def f_scores(self) -> np.ndarray:
        precision = self.true_pos / (self.pred_pos + F_EPS)
        recall = self.true_pos / (self.actual_pos + F_EPS)
        return (1 + self.beta2) * precision * recall / (self.beta2 * precision + recall + F_EPS)

    def compute(self) -> float:
        return float(self.f_scores().max() * 100)


# ----------------------------------------------------------------------------------------------
# normals and depth


def _unit(v: np.ndarray) -> np.ndarray:
    """(P, 3) -> unit vectors; a zero vector stays zero (eval_normals.py normalize_tensor)."""
    norm = np.linalg.norm(v, axis=1, keepdims=True)
    return np.where(norm > 0, v / np.where(norm > 0, norm, 1.0), 0.0)


class NormalsMeter:
    """Mean angular error in degrees. update(pred (B, 3, H, W) any scale, target (B, 3, H, W) normals).

    Valid pixels: target not all zero and free of 255. Both vectors are normalised (a zero prediction
    stays zero, 90 degrees from any label); the angle is 2 * atan2(|a - b|, |a + b|).
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
        p = _unit(np.moveaxis(p, 1, -1)[valid])  # (P, 3)
        t = _unit(np.moveaxis(t, 1, -1)[valid])
        deg = np.degrees(2 * np.arctan2(np.linalg.norm(p - t, axis=1), np.linalg.norm(p + t, axis=1)))
        self.sum_deg += float(deg.sum())
        self.count += int(deg.size)

    def compute(self) -> float:
        if self.count == 0:
            raise SakError("mean angular error over zero valid pixels")
        return self.sum_deg / self.count


class DepthMeter:
    """RMSE over every valid pixel of the dataset. update(pred (B, [1,] H, W), target with 0 = missing).

    pred is clamped at 0 and then <= 0 -> 1e-9 (get_output, eval_depth.py); valid: 0 < target < 80.
    """

    def __init__(self) -> None:
        self.sum_sq = 0.0
        self.count = 0

    def update(self, pred: torch.Tensor | np.ndarray, target: torch.Tensor | np.ndarray) -> None:
        p, t = _squeeze(_np(pred)).astype(np.float64), _squeeze(_np(target)).astype(np.float64)
        p = np.where(p <= 0, 1e-9, p)  # the clamp at 0, then eval_depth.py's floor
        valid = (t > DEPTH_RANGE[0]) & (t < DEPTH_RANGE[1])
        self.sum_sq += float(((p[valid] - t[valid]) ** 2).sum())
        self.count += int(valid.sum())

    def compute(self) -> float:
        if self.count == 0:
            raise SakError("RMSE over zero valid pixels")
        return float(np.sqrt(self.sum_sq / self.count))


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

    M_t is each task's metric as reported: mIoU (semseg, human_parts), maxF (sal), mErr (normals, lower
    is better), odsF (edge), RMSE (depth, lower is better).

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
