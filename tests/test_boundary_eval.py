"""odsF by the SEISM protocol (student/train/boundary_eval.py) against an independent implementation
written here from the reference code's rules (innovator-zero/seism: nms_process.m, convTri.m,
gradient2, edgesNmsMex.cpp, seg2bmap.m, edgesEvalImg.m, gather_measure.m; BSDS correspondPixels):
per-pixel loops instead of vectorised numpy, MATLAB's bwmorph 'thin' rule (Lam, Lee, Suen) instead of
skimage, and the BSDS min-cost assignment with outlier nodes (scipy linear_sum_assignment) instead of the
maximum bipartite matching."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from scipy.optimize import linear_sum_assignment
from skimage.morphology import thin

from sak.student.train.boundary_eval import (
    SEISM_MAX_DIST,
    SEISM_THRESHOLDS,
    SeismBoundaryMeter,
    conv_tri,
    edges_nms,
    gradient2,
    match_count,
    nms_png,
    quantise,
    seg2bmap,
    seism_ground_truth,
)

F32 = np.float32


# ----------------------------------------------------------------------------------------------
# the independent implementation


def ref_conv_tri(image: np.ndarray, r: int) -> np.ndarray:
    """convTri.m (the nomex path): symmetric padding by r, 'valid' convolution with f then f'."""
    f = np.array([1, 2, 1]) / 4 if r == 1 else np.array([*range(1, r + 2), *range(r, 0, -1)]) / (r + 1) ** 2
    padded = np.pad(image.astype(np.float64), r, mode="symmetric")
    h, w = image.shape
    rows = sum(f[k] * padded[:, k : k + w] for k in range(len(f)))  # (h + 2r, w)
    return sum(f[k] * rows[k : k + h, :] for k in range(len(f))).astype(F32)


def ref_gradient(image: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """gradientMex 'gradient2': (I[x+1] - I[x-1]) / 2 inside, one-sided differences at the borders."""
    h, w = image.shape
    gx, gy = np.zeros_like(image), np.zeros_like(image)
    for x in range(w):
        lo, hi = max(x - 1, 0), min(x + 1, w - 1)
        gx[:, x] = (image[:, hi] - image[:, lo]) / (hi - lo)
    for y in range(h):
        lo, hi = max(y - 1, 0), min(y + 1, h - 1)
        gy[y, :] = (image[hi, :] - image[lo, :]) / (hi - lo)
    return gx, gy


def ref_nms(edges: np.ndarray, orient: np.ndarray, r: int = 4, s: int = 5, m: float = 1.01) -> np.ndarray:
    """edgesNmsMex.cpp as its loops read, one pixel at a time in float32."""
    h, w = edges.shape
    out = edges.copy()

    def interp(x: float, y: float) -> float:
        x = 0.0 if x < 0 else (w - 1.001 if x > w - 1.001 else x)
        y = 0.0 if y < 0 else (h - 1.001 if y > h - 1.001 else y)
        x0, y0 = int(x), int(y)
        dx0, dy0 = F32(x - x0), F32(y - y0)
        dx1, dy1 = F32(1) - dx0, F32(1) - dy0
        return (
            edges[y0, x0] * dx1 * dy1
            + edges[y0, x0 + 1] * dx0 * dy1
            + edges[y0 + 1, x0] * dx1 * dy0
            + edges[y0 + 1, x0 + 1] * dx0 * dy0
        )

    for x in range(w):
        for y in range(h):
            e = edges[y, x]
            if not e:
                continue
            e = e * F32(m)
            co, si = F32(math.cos(orient[y, x])), F32(math.sin(orient[y, x]))
            for d in range(-r, r + 1):
                if d and e < interp(F32(x + d * co), F32(y + d * si)):
                    out[y, x] = 0
                    break
    s = min(s, w // 2, h // 2)
    for x in range(s):
        out[:, x] *= F32(x / s)
        out[:, w - 1 - x] *= F32(x / s)
    for y in range(s):
        out[y, :] *= F32(y / s)
        out[h - 1 - y, :] *= F32(y / s)
    return out


def ref_nms_process(saved: np.ndarray) -> np.ndarray:
    """nms_process.m on one uint8 PNG."""
    e = ref_conv_tri((saved / 255.0).astype(F32), 1)
    ox, oy = ref_gradient(ref_conv_tri(e, 4))
    oxx, _ = ref_gradient(ox)
    oxy, oyy = ref_gradient(oy)
    o = np.mod(np.arctan(oyy * np.sign(-oxy) / (oxx + F32(1e-5))), np.pi).astype(F32)
    n = ref_nms(e, o)
    return np.array([[min(255, int(math.floor(float(v) * 255 + 0.5))) for v in row] for row in n], np.uint8)


def ref_seg2bmap(seg: np.ndarray) -> np.ndarray:
    """seg2bmap.m, pixel by pixel (outside the image counts as 0)."""
    h, w = seg.shape

    def at(y, x):
        return seg[y, x] if y < h and x < w else 0

    b = np.zeros((h, w), bool)
    for y in range(h):
        for x in range(w):
            if y == h - 1 and x == w - 1:
                continue
            if x == w - 1:
                b[y, x] = seg[y, x] != at(y + 1, x)
            elif y == h - 1:
                b[y, x] = seg[y, x] != at(y, x + 1)
            else:
                b[y, x] = (
                    seg[y, x] != at(y, x + 1) or seg[y, x] != at(y + 1, x) or seg[y, x] != at(y + 1, x + 1)
                )
    return b


def ref_thin(image: np.ndarray) -> np.ndarray:
    """bwmorph(x, 'thin', Inf): Lam, Lee & Suen's two-subiteration rule, MATLAB's documented algorithm.

    Neighbours x1..x8 counter-clockwise from east (x1 E, x2 NE, x3 N, x4 NW, x5 W, x6 SW, x7 S, x8 SE).
    Subiteration 1 deletes p when G1, G2 and G3 hold, subiteration 2 when G1, G2 and G3'; repeat until stable.
    """
    img = image.astype(bool).copy()
    offsets = [(0, 1), (-1, 1), (-1, 0), (-1, -1), (0, -1), (1, -1), (1, 0), (1, 1)]
    while True:
        changed = False
        for sub in (0, 1):
            p = np.pad(img, 1)
            h, w = img.shape
            x = [p[1 + dy : 1 + dy + h, 1 + dx : 1 + dx + w] for dy, dx in offsets]  # x[0] = x1
            xn = x + [x[0]]  # x9 = x1
            b = sum((~xn[2 * i]) & (xn[2 * i + 1] | xn[2 * i + 2]) for i in range(4))
            g1 = b == 1
            n1 = sum((xn[2 * k] | xn[2 * k + 1]).astype(int) for k in range(4))
            n2 = sum((xn[2 * k + 1] | xn[2 * k + 2]).astype(int) for k in range(4))
            g2 = (np.minimum(n1, n2) >= 2) & (np.minimum(n1, n2) <= 3)
            if sub == 0:
                g3 = ~((x[1] | x[2] | ~x[7]) & x[0])
            else:
                g3 = ~((x[5] | x[6] | ~x[3]) & x[4])
            delete = img & g1 & g2 & g3
            if delete.any():
                img = img & ~delete
                changed = True
        if not changed:
            return img


def ref_match(pred: np.ndarray, truth: np.ndarray, max_dist: float) -> int:
    """correspondPixels' problem: a min-cost perfect assignment of pred pixels + outlier nodes to truth
    pixels + outlier nodes; real pairs cost their distance (only within max_dist), an unmatched pixel
    costs 100 x max_dist. Returns the number of real pairs in the optimum."""
    pp, gp = np.argwhere(pred), np.argwhere(truth)
    n1, n2 = len(pp), len(gp)
    if n1 == 0 or n2 == 0:
        return 0
    outlier, forbidden = 100 * max_dist, 1e9
    dist = np.hypot(pp[:, None, 0] - gp[None, :, 0], pp[:, None, 1] - gp[None, :, 1])
    cost = np.zeros((n1 + n2, n2 + n1))
    cost[:n1, :n2] = np.where(dist**2 <= max_dist**2, dist, forbidden)
    cost[:n1, n2:] = outlier  # pred pixel unmatched
    cost[n1:, :n2] = outlier  # truth pixel unmatched
    rows, cols = linear_sum_assignment(cost)
    return int(sum(1 for r, c in zip(rows, cols) if r < n1 and c < n2 and cost[r, c] < forbidden))


def ref_ods(probs: list[np.ndarray], sources: list[np.ndarray], max_dist: float, thresholds) -> float:
    """The whole protocol: save (truncate), NMS, threshold >= t, thin, match, pool, best F."""
    cnt = np.zeros(len(thresholds))
    sum_p = np.zeros(len(thresholds))
    sum_r = 0.0
    for prob, source in zip(probs, sources):
        saved = np.floor(prob.astype(F32) * F32(255)).astype(np.uint8)
        nms = ref_nms_process(saved)
        truth = ref_thin(ref_seg2bmap(source))
        radius = max_dist * math.hypot(*prob.shape)
        sum_r += truth.sum()
        for k, t in enumerate(thresholds):
            e = ref_thin(nms / 255.0 >= t)
            sum_p[k] += e.sum()
            cnt[k] += ref_match(e, truth, radius)
    best = 0.0
    for c, sp in zip(cnt, sum_p):
        if c > 0:
            prec, rec = c / sp, c / sum_r
            best = max(best, 2 * prec * rec / (prec + rec))
    return 100 * best


def synthetic_case(seed: int, h: int = 60, w: int = 80) -> tuple[np.ndarray, np.ndarray]:
    """A label map of random rectangles and a blurred, noisy, slightly shifted boundary probability."""
    rng = np.random.default_rng(seed)
    seg = np.zeros((h, w), np.int64)
    for k in range(1, 5):
        y, x = rng.integers(0, h - 6), rng.integers(0, w - 6)
        seg[y : y + rng.integers(5, h // 2), x : x + rng.integers(5, w // 2)] = k
    bmap = seg2bmap(np.roll(seg, (rng.integers(-1, 2), rng.integers(-2, 3)), axis=(0, 1))).astype(np.float64)
    prob = ref_conv_tri(bmap.astype(F32), 1) * 1.6 + 0.25 * rng.random((h, w))
    return np.clip(prob, 0, 1).astype(F32), seg


# ----------------------------------------------------------------------------------------------
# the pieces


def test_seg2bmap_hand_case():
    seg = np.array([[1, 1, 2], [1, 1, 2], [3, 3, 3]])
    # east / south / south-east differences; last column: south only; last row: east only; corner never
    assert seg2bmap(seg).astype(int).tolist() == [[0, 1, 0], [1, 1, 1], [0, 0, 0]]
    rng = np.random.default_rng(0)
    for _ in range(5):
        s = rng.integers(0, 3, (9, 11))
        assert np.array_equal(seg2bmap(s), ref_seg2bmap(s))


def test_skimage_thin_is_matlabs_bwmorph_thin():
    rng = np.random.default_rng(1)
    for k in range(12):
        img = ref_conv_tri(rng.random((24, 30)).astype(F32), 1) > 0.45 + 0.02 * k
        assert np.array_equal(thin(img), ref_thin(img)), k


def test_conv_tri_and_gradient_follow_the_toolbox():
    rng = np.random.default_rng(2)
    x = rng.random((13, 17)).astype(F32)
    for r in (1, 4):
        np.testing.assert_allclose(conv_tri(x, r), ref_conv_tri(x, r), rtol=1e-6, atol=1e-7)
    gx, gy = gradient2(x)
    rx, ry = ref_gradient(x)
    np.testing.assert_allclose(gx, rx, atol=1e-7)
    np.testing.assert_allclose(gy, ry, atol=1e-7)


def test_nms_matches_the_mex_loops_and_thins_a_blurred_line():
    rng = np.random.default_rng(3)
    for _ in range(3):
        e = ref_conv_tri(rng.random((20, 26)).astype(F32), 1)
        o = (rng.random((20, 26)) * np.pi).astype(F32)
        assert np.array_equal(edges_nms(e, o), ref_nms(e, o))
    line = np.zeros((40, 40), np.uint8)
    line[:, 18:23] = [60, 160, 250, 160, 60]  # a wide vertical ridge, peak at column 20
    out = nms_png(line)
    assert np.array_equal(out, ref_nms_process(line))
    middle = out[10:30]
    assert (middle[:, 20] > 200).all() and (np.delete(middle, 20, axis=1) == 0).all()
    assert (out[0] == 0).all() and (out[:, 0] == 0).all()  # the border fade zeroes the outermost pixels


def test_quantise_truncates_as_numpy_uint8_of_the_scaled_probability():
    p = np.array([[0.0, 0.5, 0.999, 1.0, 0.0039]], np.float32)
    assert quantise(p).tolist() == [[0, 127, 254, 255, 0]]


def test_thresholds_are_seism_parameters_and_inclusive():
    assert len(SEISM_THRESHOLDS) == 99 and SEISM_THRESHOLDS[0] == 0.01 and SEISM_THRESHOLDS[-1] == 0.99
    assert SEISM_MAX_DIST == {"pascal_context": 0.0075, "nyud": 0.011}
    truth = np.zeros((20, 20), bool)
    truth[2:18, 10] = True
    nms = np.where(truth, 51, 0).astype(np.uint8)  # 51 / 255 == 0.2 exactly
    meter = SeismBoundaryMeter(0.05, thresholds=(0.2, 0.21))
    meter.update_nms(nms, truth)
    assert meter.f_scores().tolist() == [1.0, 0.0]  # >= 0.2 keeps the line, 0.21 drops it


def hk_match(pred: np.ndarray, truth: np.ndarray, radius: float) -> int:
    """A third algorithm: the size of a maximum matching by Hopcroft-Karp on the pairs within radius."""
    from scipy.sparse import csr_matrix
    from scipy.sparse.csgraph import maximum_bipartite_matching

    pp, gp = np.argwhere(pred), np.argwhere(truth)
    if len(pp) == 0 or len(gp) == 0:
        return 0
    d2 = (pp[:, None, 0] - gp[None, :, 0]) ** 2 + (pp[:, None, 1] - gp[None, :, 1]) ** 2
    graph = csr_matrix((d2 <= radius**2).astype(np.int8))
    return int((maximum_bipartite_matching(graph, perm_type="column") >= 0).sum())


def test_matching_equals_the_bsds_min_cost_assignment_and_a_maximum_matching():
    rng = np.random.default_rng(4)
    for trial in range(30):
        pred, truth = rng.random((12, 14)) < 0.15, rng.random((12, 14)) < 0.15
        for radius in (0.5, 1.0, 1.5, 2.3):
            ours = match_count(pred, truth, radius)
            assert ours == ref_match(pred, truth, radius) == hk_match(pred, truth, radius), (trial, radius)


def test_matching_is_one_to_one_within_the_radius():
    truth = np.zeros((100, 100), bool)
    truth[10:90, 50] = True
    two = np.zeros_like(truth)
    two[10:90, 49] = two[10:90, 51] = True  # two lines within 1.56 px of one ground-truth line
    radius = SEISM_MAX_DIST["nyud"] * math.hypot(100, 100)
    assert match_count(two, truth, radius) == 80
    assert match_count(np.roll(truth, 2, axis=1), truth, radius) == 0  # 2 px away: beyond 1.56


def test_nyud_boundaries_go_through_seg2bmap_like_a_label_map():
    boundaries = np.zeros((12, 12), np.uint8)
    boundaries[:, 6] = 1  # a one-pixel line: seg2bmap marks both of its sides, thinning keeps one line
    truth = seism_ground_truth(boundaries)
    assert np.array_equal(truth, ref_thin(ref_seg2bmap(boundaries)))
    assert truth[1:-1, 5:7].any(1).all() and not truth[:, :4].any() and not truth[:, 8:].any()


# ----------------------------------------------------------------------------------------------
# the whole protocol


def test_odsf_equals_the_independent_protocol_on_synthetic_maps():
    cases = [synthetic_case(seed) for seed in range(3)]
    probs, sources = [c[0] for c in cases], [c[1] for c in cases]
    # 0.75 px (PASCAL-Context), 1.1 px (NYUD) and 3 px on these 60x80 maps (diagonal 100)
    results = {}
    for max_dist in (SEISM_MAX_DIST["pascal_context"], SEISM_MAX_DIST["nyud"], 0.03):
        meter = SeismBoundaryMeter(max_dist)
        for p, s in zip(probs, sources):
            meter.update(torch.from_numpy(p)[None], s)
        ours, theirs = meter.compute(), ref_ods(probs, sources, max_dist, SEISM_THRESHOLDS)
        print(f"odsF at maxDist {max_dist}: {ours:.4f} ours, {theirs:.4f} independent")
        assert ours == pytest.approx(theirs, abs=1e-9)
        results[max_dist] = ours
    assert 10 < results[0.0075] < results[0.011] < results[0.03] < 100  # the tolerance matters here


def test_odsf_pools_counts_over_images_not_a_mean_of_f():
    a, b = synthetic_case(5), synthetic_case(6)
    pooled = SeismBoundaryMeter(0.0075, thresholds=(0.3,))
    singles = []
    for p, s in (a, b):
        pooled.update(p, s)
        m = SeismBoundaryMeter(0.0075, thresholds=(0.3,))
        m.update(p, s)
        singles.append(m)
    matched = sum(m.matched[0] for m in singles)
    prec = matched / sum(m.predicted[0] for m in singles)
    rec = matched / sum(m.actual for m in singles)
    assert pooled.compute() == pytest.approx(100 * 2 * prec * rec / (prec + rec))
