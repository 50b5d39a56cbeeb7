"""A pytest plugin for gpu_check's `gpu-tests` step: each test's outcome is a row of the step's JSON
(SAK_STEP_JSON), written as the test finishes, so a run stopped at its budget keeps the tests done.

    SAK_STEP_JSON=out.json python -m pytest -p pytest_rows ...     (bench/ on PYTHONPATH)

Status at the end: 'skipped: no CUDA' when every test marked `gpu` was skipped and nothing failed (the
set-up went through: collection, fixtures, the tests that need no GPU); else done / failed.
"""

from __future__ import annotations

import os

import pytest
from step_io import StepReport

_report: StepReport | None = None
_gpu: dict[str, bool] = {}  # nodeid -> marked gpu


def pytest_configure(config) -> None:
    global _report
    _report = StepReport(os.environ.get("SAK_STEP_JSON"), kind="pytest")


def pytest_collection_modifyitems(items) -> None:
    for item in items:
        _gpu[item.nodeid] = item.get_closest_marker("gpu") is not None
    _report.update(collected=len(items))


def pytest_runtest_logreport(report: pytest.TestReport) -> None:
    # one row per test: its call, or the phase that skipped or failed it before/after the call
    if report.when == "call" or report.outcome != "passed":
        reason = ""
        if report.skipped and isinstance(report.longrepr, tuple):
            reason = str(report.longrepr[2])
        elif report.failed:
            reason = str(report.longreprtext)[-1500:]
        _report.add(
            {
                "test": report.nodeid,
                "phase": report.when,
                "outcome": report.outcome,
                "seconds": round(report.duration, 3),
                "gpu": _gpu.get(report.nodeid, False),
                "reason": reason,
            }
        )


def pytest_sessionfinish(session, exitstatus) -> None:
    rows = _report.rows
    failed = [r for r in rows if r["outcome"] == "failed"]
    gpu = [r for r in rows if r["gpu"]]
    for r in failed:
        _report.failures.append({"case": r["test"], "error": r["reason"][-500:]})
    if gpu and not failed and all(r["outcome"] == "skipped" for r in gpu):
        others = sum(1 for r in rows if not r["gpu"] and r["outcome"] == "passed")
        _report.skip("no CUDA", f"{len(gpu)} CUDA tests skipped, {others} other tests passed")
    else:
        _report.done(exit_status=int(exitstatus))
