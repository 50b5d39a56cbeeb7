"""odsF by the SEISM protocol, as SAK runs it (innovator-zero/SAK evaluation/edge_evaluation.py driving
innovator-zero/seism: nms_process.m, then pr_curves_base.m -> eval_method.m -> eval_cont.m ->
edgesEvalImg.m -> correspondPixels, pooled by gather_measure.m / general_ods.m).

Per image, from the predicted boundary probability p (H, W) of the whole (unpadded) image:

    1. the saved prediction:  q = uint8(p * 255), truncated (SAK save_img: np.uint8 of sigmoid * 255)
    2. NMS (nms_process.m):   E = convTri(q / 255, 1); O from the second derivatives of convTri(E, 4):
                              O = mod(atan(Oyy * sign(-Oxy) / (Oxx + 1e-5)), pi); structured-edge NMS
                              (edgesNmsMex: radius 4, multiplier 1.01, border fade 5); n = uint8(round(255 E))
    3. per threshold t in 0.01, 0.02 .. 0.99 (parameters.txt): B = thin(n / 255 >= t) (read_one_png.m,
                              then edgesEvalImg's thinning, bwmorph 'thin' Inf = skimage thin)
    4. ground truth:          G = thin(seg2bmap(S)), S = the PASCAL-Context LabelMap (db_gt.m), or NYUD's
                              edge_mat Boundaries (seg2bmap applied to them, as db_gt + edgesEvalImg do)
    5. matching:              B and G matched one to one, pixels at most maxDist * diagonal apart
                              (0.0075 PASCAL-Context, 0.011 NYUD: eval_method.m); counts: matched,
                              |B|, |G|
    6. the dataset:           counts summed over images per t; P = matched / |B|, R = matched / |G|,
                              F = 2PR / (P + R) (0 when nothing matches); odsF = max over t.

The matching: BSDS's correspondPixels solves a min-cost perfect assignment (Goldberg's CSA) between the
two pixel sets plus outlier nodes, real pairs costing their distance and every unmatched pixel an outlier
cost of 100 x maxDist. Since two unmatched pixels cost far more than any real pair, its optimum has the
largest possible number of matched pairs; only that number enters P and R. Here the same assignment
problem is solved exactly (scipy's LAPJVsp, `match_count`) with a complete outlier structure, so the count
is the size of a maximum matching within the radius. (CSA's outlier graph is sparse and random, of degree
6, plus a high-cost overlay, so its count can fall a few pixels below the maximum: docs/protocol.md gives
the measured difference.) NMS runs in float32 as the MATLAB mex does; exact float ties can resolve
differently.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from scipy.ndimage import correlate1d
from scipy.sparse import coo_matrix
from scipy.sparse.csgraph import min_weight_full_bipartite_matching
from scipy.spatial import cKDTree
from skimage.morphology import thin

SEISM_THRESHOLDS = tuple(float(f"{k / 100:.2f}") for k in range(1, 100))  # parameters.txt, str2double
SEISM_MAX_DIST = {"pascal_context": 0.0075, "nyud": 0.011}  # fraction of the image diagonal
NMS_RADIUS, NMS_BORDER, NMS_MULTIPLIER = 4, 5, 1.01  # edgesNmsMex(E, O, 4, 5, 1.01, threads)


# ----------------------------------------------------------------------------------------------
# the prediction: quantisation and non-maximum suppression


def quantise(prob: np.ndarray) -> np.ndarray:
    """(H, W) probabilities in [0, 1] -> the uint8 PNG SAK saves: trunc(float32(p) * 255)."""
    scaled = np.asarray(prob, dtype=np.float32) * np.float32(255)
    return np.clip(scaled, 0, 255).astype(np.uint8)  # astype truncates towards zero, as np.uint8 does


def conv_tri(image: np.ndarray, radius: int) -> np.ndarray:
    """Piotr's convTri: separable triangle filter, symmetric padding ((H, W) float32 -> float32).

    radius 1: [1 p 1] / (2 + p) with p = 12 / r / (r + 2) - 2 = 2; radius r > 1: [1 .. r+1 .. 1] / (r+1)^2.
    """
    if radius == 0:
        return image
    if radius <= 1:
        p = 12.0 / radius / (radius + 2) - 2.0
        weights = np.array([1.0, p, 1.0]) / (2.0 + p)
    else:
        ramp = np.arange(1, radius + 2, dtype=np.float64)
        weights = np.concatenate([ramp, ramp[-2::-1]]) / (radius + 1) ** 2
    out = correlate1d(image, weights, axis=1, mode="reflect", output=np.float32)  # reflect = 'symmetric'
    return correlate1d(out, weights, axis=0, mode="reflect", output=np.float32)


def gradient2(image: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Piotr's gradient2: (Gx, Gy), central differences inside, one-sided at the borders (float32)."""
    return np.gradient(image, axis=1).astype(np.float32), np.gradient(image, axis=0).astype(np.float32)


def orientation(edges: np.ndarray) -> np.ndarray:
    """nms_process.m: O = mod(atan(Oyy * sign(-Oxy) / (Oxx + 1e-5)), pi) of convTri(E, 4)."""
    ox, oy = gradient2(conv_tri(edges, 4))
    oxx, _ = gradient2(ox)
    oxy, oyy = gradient2(oy)
    with np.errstate(divide="ignore", invalid="ignore"):
        o = np.mod(np.arctan(oyy * np.sign(-oxy) / (oxx + np.float32(1e-5))), np.float32(np.pi))
    return np.nan_to_num(o, nan=0.0).astype(np.float32)


def _interp(image: np.ndarray, x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """edgesNmsMex's bilinear read of image (H, W) at float (x, y), clamped to [0, w - 1.001]."""
    h, w = image.shape
    x = np.clip(x, 0, np.float32(w - 1.001)).astype(np.float32)
    y = np.clip(y, 0, np.float32(h - 1.001)).astype(np.float32)
    x0, y0 = x.astype(np.int64), y.astype(np.int64)
    dx0, dy0 = x - x0, y - y0
    dx1, dy1 = np.float32(1) - dx0, np.float32(1) - dy0
    return (
        image[y0, x0] * dx1 * dy1
        + image[y0, x0 + 1] * dx0 * dy1
        + image[y0 + 1, x0] * dx1 * dy0
        + image[y0 + 1, x0 + 1] * dx0 * dy0
    )


def edges_nms(
    edges: np.ndarray,
    orient: np.ndarray,
    radius: int = NMS_RADIUS,
    border: int = NMS_BORDER,
    multiplier: float = NMS_MULTIPLIER,
) -> np.ndarray:
    """edgesNmsMex: zero a pixel when, times `multiplier`, it is below the map read at any of +-1..radius
    steps along its orientation's normal (cos O, sin O); then fade the `border` pixels next to each side
    (column / row k of them times k / border). (H, W) float32 -> float32."""
    h, w = edges.shape
    ys, xs = np.mgrid[0:h, 0:w].astype(np.float32)
    cos, sin = np.cos(orient).astype(np.float32), np.sin(orient).astype(np.float32)
    scaled = edges * np.float32(multiplier)
    keep = edges != 0
    for d in range(-radius, radius + 1):
        if d:
            keep &= ~(scaled < _interp(edges, xs + d * cos, ys + d * sin))
    out = np.where(keep, edges, np.float32(0)).astype(np.float32)
    s = min(border, w // 2, h // 2)
    for k in range(s):
        fade = np.float32(k / s)
        out[:, k] *= fade
        out[:, w - 1 - k] *= fade
    for k in range(s):
        fade = np.float32(k / s)
        out[k, :] *= fade
        out[h - 1 - k, :] *= fade
    return out


def nms_png(saved: np.ndarray) -> np.ndarray:
    """nms_process.m on one saved prediction: (H, W) uint8 -> (H, W) uint8 (MATLAB uint8 rounds)."""
    x = (saved.astype(np.float64) / 255.0).astype(np.float32)
    edges = conv_tri(x, 1)
    suppressed = edges_nms(edges, orientation(edges))
    return np.clip(np.floor(suppressed.astype(np.float64) * 255.0 + 0.5), 0, 255).astype(np.uint8)


# ----------------------------------------------------------------------------------------------
# the ground truth


def seg2bmap(seg: np.ndarray) -> np.ndarray:
    """SEISM's seg2bmap: (H, W) labels -> bool boundary map. A pixel is a boundary when it differs from its
    east, south or south-east neighbour (zeros beyond the image), except: the last row compares only
    east, the last column only south, and the bottom-right pixel is never one."""
    seg = np.asarray(seg)
    east, south, south_east = np.zeros_like(seg), np.zeros_like(seg), np.zeros_like(seg)
    east[:, :-1] = seg[:, 1:]
    south[:-1, :] = seg[1:, :]
    south_east[:-1, :-1] = seg[1:, 1:]
    b = (seg != east) | (seg != south) | (seg != south_east)
    b[-1, :] = seg[-1, :] != east[-1, :]
    b[:, -1] = seg[:, -1] != south[:, -1]
    b[-1, -1] = False
    return b


def seism_ground_truth(source: np.ndarray) -> np.ndarray:
    """edgesEvalImg's ground truth: thin(seg2bmap(S)) of a label map or a boundary map -> (H, W) bool."""
    return thin(seg2bmap(source))


# ----------------------------------------------------------------------------------------------
# matching and the meter


def match_count(pred: np.ndarray, truth: np.ndarray, max_dist: float) -> int:
    """Matched pairs of correspondPixels' problem between the True pixels of two (H, W) bool maps.

    A min-cost perfect assignment (scipy's LAPJVsp) of pred pixels + one outlier node per truth pixel to
    truth pixels + one outlier node per pred pixel: a pair within max_dist pixels (d^2 <= maxDist^2) costs
    its distance, leaving a pixel unmatched 100 x max_dist (BSDS's outlier cost), and the outlier nodes of
    a possible pair may pair with each other. Its optimum holds a maximum matching; the count is returned.
    Only pixels with a partner in reach ("matchable", as match.cc) enter the problem.
    """
    pp, gp = np.argwhere(pred), np.argwhere(truth)  # (P, 2), (G, 2)
    if len(pp) == 0 or len(gp) == 0:
        return 0
    # all pairs within max_dist, zero distances included (ndarray output keeps them, unlike dok)
    pairs = cKDTree(pp).sparse_distance_matrix(cKDTree(gp), max_dist, output_type="ndarray")
    if len(pairs) == 0:
        return 0
    i_ids, i = np.unique(pairs["i"], return_inverse=True)  # matchable pred pixels, renumbered
    j_ids, j = np.unique(pairs["j"], return_inverse=True)
    n1, n2, outlier, tiny = len(i_ids), len(j_ids), 100.0 * max_dist + 1.0, 1e-3  # tiny: no zero weights
    # left: pred 0..n1-1, then truth outliers; right: truth 0..n2-1, then pred outliers
    left = np.concatenate([i, np.arange(n1), n1 + j, n1 + np.arange(n2)])
    right = np.concatenate([j, n2 + np.arange(n1), n2 + i, np.arange(n2)])
    cost = np.concatenate(
        [pairs["v"] + tiny, np.full(n1, outlier), np.full(len(i), tiny), np.full(n2, outlier)]
    )
    graph = coo_matrix((cost, (left, right)), shape=(n1 + n2, n1 + n2)).tocsr()
    rows, cols = min_weight_full_bipartite_matching(graph)
    return int(((rows < n1) & (cols < n2)).sum())


class SeismBoundaryMeter:
    """odsF % by the SEISM protocol (module docstring), counts pooled over the dataset.

    update(prob, source): one image's boundary probabilities (H, W) and the map its ground truth comes from
    (DenseDataset.boundary_source). update_nms(nms, truth): from an NMS'd uint8 map and a thinned bool
    ground truth, for callers that have them already.
    """

    def __init__(self, max_dist: float, thresholds: Sequence[float] = SEISM_THRESHOLDS):
        self.max_dist = max_dist
        self.thresholds = np.asarray(thresholds, dtype=np.float64)
        self.matched = np.zeros(len(self.thresholds))
        self.predicted = np.zeros(len(self.thresholds))
        self.actual = 0.0

    def update(self, prob: torch.Tensor | np.ndarray, source: np.ndarray) -> None:
        p = prob.detach().cpu().numpy() if isinstance(prob, torch.Tensor) else np.asarray(prob)
        p = p.reshape(p.shape[-2:])  # (1, H, W) or (H, W)
        self.update_nms(nms_png(quantise(p)), seism_ground_truth(source))

    def update_nms(self, nms: np.ndarray, truth: np.ndarray) -> None:
        if nms.shape != truth.shape:
            raise ValueError(f"prediction {nms.shape} and ground truth {truth.shape} differ in size")
        h, w = nms.shape
        radius = self.max_dist * float(np.sqrt(h * h + w * w))
        self.actual += float(truth.sum())
        level = nms.astype(np.float64) / 255.0
        for k, t in enumerate(self.thresholds):
            edges = thin(level >= t)
            self.predicted[k] += float(edges.sum())
            self.matched[k] += match_count(edges, truth, radius)

    def precision_recall(self) -> tuple[np.ndarray, np.ndarray]:
        with np.errstate(invalid="ignore", divide="ignore"):
            precision = np.where(self.predicted > 0, self.matched / self.predicted, 0.0)
            recall = self.matched / self.actual if self.actual > 0 else np.zeros_like(self.matched)
        return precision, recall

    def f_scores(self) -> np.ndarray:
        """Per threshold: 2PR / (P + R); 0 where nothing matched (gather_measure.m's special cases)."""
        p, r = self.precision_recall()
        with np.errstate(invalid="ignore", divide="ignore"):
            return np.where(self.matched > 0, 2 * p * r / (p + r), 0.0)

    def compute(self) -> float:
        return float(self.f_scores().max() * 100)
