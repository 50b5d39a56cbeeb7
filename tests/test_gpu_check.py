"""`make gpu-check` without a GPU: it prints its plan and exits 0; its goal arithmetic on recorded figures."""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))
import gpu_check  # noqa: E402


@pytest.mark.skipif(torch.cuda.is_available(), reason="on a GPU machine the script measures instead")
def test_without_cuda_prints_the_plan_and_exits_0():
    proc = subprocess.run(
        [sys.executable, "bench/gpu_check.py"], cwd=ROOT, capture_output=True, text=True, timeout=120
    )
    assert proc.returncode == 0, proc.stderr
    assert "no CUDA device" in proc.stdout
    for step in gpu_check.steps():
        assert step.name in proc.stdout
    assert (
        "-m gpu" in proc.stdout and "dinov2_l,clip_l,sam_l" in proc.stdout and "--kernels both" in proc.stdout
    )


def test_budgets_fit_in_eight_minutes():
    assert sum(s.budget_s for s in gpu_check.steps()) <= gpu_check.TOTAL_BUDGET_S < 8 * 60


def test_goals_from_recorded_figures():
    def row(op, provider, shape, x_compile=None, pct_bw=0.0):
        return dict(
            op=op, provider=provider, shape=shape, x_compile=x_compile, pct_bw=pct_bw, **{"pass": "fwd+bwd"}
        )

    rows = [
        row("adapter", "triton", "vit_b fp32@autocast-bf16", x_compile=1.4),
        row("adapter", "triton", "vit_l fp32@autocast-bf16", x_compile=1.1),
        row("adapter", "triton", "vit_b bf16", x_compile=3.0),  # not the training case: ignored
        row("distill_loss", "triton", "sam_b fp32@autocast-bf16", pct_bw=75.0),
    ]
    train = {
        "cache (8 workers)": {"step_ms": 104.0},
        "online teachers": {"step_ms": 300.0},
        "student only (in memory)": {"step_ms": 100.0},
        "cache (8 workers) +kernels": {"step_ms": 50.0},
    }
    records = {"kernels": {"figures": {"rows": rows}}, "train": {"figures": {"rows": train}}}
    got = {g["goal"]: (round(g["value"], 3), g["met"]) for g in gpu_check.goals(records)}
    assert list(got.values()) == [(1.1, False), (75.0, True), (4.0, True), (2.885, True)]
    missing = gpu_check.goals({})
    assert all(g["value"] is None and g["met"] is None for g in missing)
    text = gpu_check.markdown(
        dict(device="X", date="d", code_version="c", torch="t", total_s=1.0, steps=[], goals=missing)
    )
    assert "not measured" in text


def test_a_step_over_its_budget_is_killed_and_recorded(tmp_path):
    # a step that would run for a minute, with a child of its own: both go at the budget, the check goes on
    sleeper = (
        "import subprocess, sys, time; "
        "subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(60)']); time.sleep(60)"
    )
    step = gpu_check.Step("slow", (sys.executable, "-c", sleeper), 5, "sleeps")
    record = gpu_check.run_step(step, tmp_path / "slow.json", deadline=time.monotonic() + 600)
    assert record["status"] == "timeout after 5 s" and record["seconds"] < 30
    writer = (
        "import json, sys; json.dump({'rows': [1, 2]}, open(sys.argv[1], 'w')); print('1 passed in 0.1s')"
    )
    ok = gpu_check.Step("gpu-tests", (sys.executable, "-c", writer, "{json}"), 30, "writes figures")
    record = gpu_check.run_step(ok, tmp_path / "ok.json", deadline=time.monotonic() + 600)
    assert record["status"] == "ok" and record["figures"] == {"rows": [1, 2]}
    assert record["summary"] == "1 passed in 0.1s"
    failing = gpu_check.Step("bad", (sys.executable, "-c", "raise SystemExit(3)"), 30, "fails")
    record = gpu_check.run_step(failing, tmp_path / "bad.json", deadline=time.monotonic() + 600)
    assert record["status"] == "failed (exit 3)"
