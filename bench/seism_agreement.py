"""odsF of student/train/boundary_eval.py against pyEdgeEval's implementation of the same SEISM steps, on
the same synthetic boundary maps: a table of agreement per stage and of odsF.

    pip install --no-deps --target /tmp/pee pyEdgeEval==0.2.8   # NOT a dependency of this project:
    PYTHONPATH=/tmp/pee python bench/seism_agreement.py          # it builds C++ from an sdist and bundles
                                                                 # GPL-2.0 (BSDS) and MSR-LA (NMS) code

pyEdgeEval supplies: conv_tri / grad2 (Python ports of Piotr's toolbox), nms (C++ port of edgesNmsMex,
in double precision), bwmorph_thin (a port of MATLAB's bwmorph 'thin') and correspond_pixels (BSDS's
C++ correspondPixels: the CSA min-cost assignment with outliers). The ground truth (seg2bmap of the label
map) is this project's on both sides: pyEdgeEval has no SEISM seg2bmap (tests/test_boundary_eval.py
checks ours against a pixel-loop port of seg2bmap.m).

Maps: per image a label map of random rectangles (the LabelMap stand-in) and a boundary probability made
from its boundaries shifted by up to 2 px, blurred and mixed with noise, at a PASCAL-like 375x500.
"""

from __future__ import annotations

import argparse
import importlib.util
import math
from pathlib import Path

import numpy as np


def _pyedgeeval_module(relpath: str):
    """One pure-Python file of pyEdgeEval, loaded by path (its package __init__ needs OpenCV)."""
    root = Path(importlib.util.find_spec("pyEdgeEval").submodule_search_locations[0])
    spec = importlib.util.spec_from_file_location(relpath.replace("/", "_"), root / relpath)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def synthetic(seed: int, h: int, w: int) -> tuple[np.ndarray, np.ndarray]:
    from sak.student.train.boundary_eval import conv_tri, seg2bmap

    rng = np.random.default_rng(seed)
    seg = np.zeros((h, w), np.int64)
    for k in range(1, 9):
        y, x = rng.integers(0, h - 20), rng.integers(0, w - 20)
        seg[y : y + rng.integers(20, h // 2), x : x + rng.integers(20, w // 2)] = k
    shifted = np.roll(seg, (rng.integers(-1, 2), rng.integers(-2, 3)), axis=(0, 1))
    prob = conv_tri(seg2bmap(shifted).astype(np.float32), 2) * 2.5 + 0.3 * rng.random((h, w))
    return np.clip(prob, 0, 1).astype(np.float32), seg


def pyedgeeval_nms(saved: np.ndarray) -> np.ndarray:
    """nms_process.m with pyEdgeEval's pieces (r 4, s 5, m 1.01 as SEISM calls edgesNmsMex)."""
    from pyEdgeEval._lib import nms

    toolbox = _pyedgeeval_module("preprocess/nms/toolbox.py")
    conv_tri, grad2 = toolbox.conv_tri, toolbox.grad2
    x = (saved / 255.0).astype(np.float32)
    e = conv_tri(x, 1)
    ox, oy = grad2(conv_tri(e, 4))
    oxx, _ = grad2(ox)
    oxy, oyy = grad2(oy)
    o = np.mod(np.arctan(oyy * np.sign(-oxy) / (oxx + 1e-5)), np.pi)
    out = nms(e, o, r=4, s=5, m=1.01)
    return np.round(np.clip(out, 0, 1) * 255).astype(np.uint8)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--images", type=int, default=12)
    ap.add_argument("--height", type=int, default=375)
    ap.add_argument("--width", type=int, default=500)
    args = ap.parse_args()

    from pyEdgeEval._lib import correspond_pixels

    if not hasattr(np, "in1d"):  # pyEdgeEval 0.2.8 still calls np.in1d, gone in numpy 2.4
        np.in1d = np.isin
    bwmorph_thin = _pyedgeeval_module("preprocess/thin/bwmorph_thin.py").bwmorph_thin

    from sak.student.train.boundary_eval import (
        SEISM_MAX_DIST,
        SEISM_THRESHOLDS,
        SeismBoundaryMeter,
        match_count,
        nms_png,
        quantise,
        seg2bmap,
        seism_ground_truth,
    )

    cases = [synthetic(s, args.height, args.width) for s in range(args.images)]
    nms_equal = nms_total = thin_equal = thin_total = count_equal = count_total = 0
    rows = []
    for dataset, max_dist in SEISM_MAX_DIST.items():
        ours = SeismBoundaryMeter(max_dist)
        cnt, sum_p, sum_r = np.zeros(99), np.zeros(99), 0.0
        for prob, seg in cases:
            saved = quantise(prob)
            ours.update(prob, seg)
            mine, theirs = nms_png(saved), pyedgeeval_nms(saved)
            nms_equal += int((mine == theirs).sum())
            nms_total += mine.size
            truth = bwmorph_thin(seg2bmap(seg))
            thin_equal += int(np.array_equal(truth, seism_ground_truth(seg)))
            thin_total += 1
            radius = max_dist * math.hypot(*prob.shape)
            sum_r += truth.sum()
            for k, t in enumerate(SEISM_THRESHOLDS):
                e = bwmorph_thin(theirs / 255.0 >= t)
                m1, _, _, _ = correspond_pixels(e.astype(float), truth.astype(float), max_dist)
                matched = int((m1 > 0).sum())
                sum_p[k] += e.sum()
                cnt[k] += matched
                count_equal += int(matched == match_count(e, truth, radius))
                count_total += 1
        p = np.where(sum_p > 0, cnt / np.maximum(sum_p, 1), 0.0)
        r = cnt / sum_r
        f = np.where(cnt > 0, 2 * p * r / np.maximum(p + r, 1e-12), 0.0)
        rows.append((dataset, max_dist, ours.compute(), 100 * f.max()))
    print(f"{args.images} maps of {args.height}x{args.width}, 99 thresholds\n")
    print("| dataset | maxDist | odsF (this project) | odsF (pyEdgeEval steps) | difference |")
    print("|---|---|---|---|---|")
    for dataset, max_dist, a, b in rows:
        print(f"| {dataset} | {max_dist} | {a:.4f} | {b:.4f} | {a - b:+.4f} |")
    print(f"\nNMS PNG pixels equal: {nms_equal}/{nms_total} ({100 * nms_equal / nms_total:.4f} %)")
    print(f"thinned ground truth equal (skimage thin vs bwmorph_thin port): {thin_equal}/{thin_total}")
    print(
        f"match counts equal (max bipartite matching vs BSDS CSA, on pyEdgeEval's thinned maps): "
        f"{count_equal}/{count_total}"
    )


if __name__ == "__main__":
    main()
