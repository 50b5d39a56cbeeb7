"""bench/extract.py end to end at a tiny size (it once failed after all its work), and its set-up-only path."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def bench_extract():
    sys.path.insert(0, str(ROOT / "bench"))  # its step_io
    spec = importlib.util.spec_from_file_location("bench_extract", ROOT / "bench" / "extract.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_tiny_run_reports_pipeline_bare_and_their_ratio(bench_extract, ray_local, tmp_path, capsys):
    out = tmp_path / "extract.json"
    argv = ["--images", "4", "--size", "64", "--batch-size", "4", "--shard-size", "4", "--json", str(out)]
    assert bench_extract.main(argv) == 0
    got = json.loads(out.read_text())
    assert got["status"] == "done" and not got["failures"]
    pipe, bare = got["rows"]
    assert pipe["measure"] == "pipeline" and pipe["views"] == 8 and pipe["views_per_s"] > 0
    assert bare["measure"] == "bare teacher forward" and bare["views_per_s"] > 0
    assert got["efficiency"] == pytest.approx(pipe["views_per_s"] / bare["views_per_s"])
    assert set(pipe["bytes_per_view"]) == {"dinov2_tiny", "clip_tiny", "sam_tiny"}
    assert all(b > 0 for b in pipe["bytes_per_view"].values())
    assert got["flops_per_view"] > 0 and pipe["mfu_datasheet"] is None  # no GPU peak on a CPU
    assert "pipeline efficiency" in capsys.readouterr().out


@pytest.mark.skipif(torch.cuda.is_available(), reason="with CUDA it measures")
def test_without_cuda_the_set_up_runs_and_the_step_is_skipped(bench_extract, tmp_path):
    out = tmp_path / "extract.json"
    argv = ["--teachers", "dinov2_l,clip_l,sam_l", "--size", "384", "--skip-without-cuda", "--json", str(out)]
    assert bench_extract.main(argv) == 0
    got = json.loads(out.read_text())
    assert got["status"] == "skipped: no CUDA" and got["rows"] == []
    # per 384 view: patch embed + linear layers 221G + 221G + 1308G MACs (DINOv2-L, CLIP-L, SAM-L), attention
    # matmuls 26G + 26G + 182G on top, as sak-cache estimate counts them; 2 FLOP per MAC
    assert got["flops_per_view"] == pytest.approx(2 * (221 + 221 + 1308 + 26 + 26 + 182) * 1e9, rel=0.005)
