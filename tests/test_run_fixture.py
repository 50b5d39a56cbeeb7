"""Run folders written by the trainers before the run record and the one harness (tests/fixtures/v1_runs,
made by make_v1_runs.py) still resume with today's code and end where the old code's uninterrupted runs
ended; the stage-2 one still evaluates to the metrics the old code measured."""

from __future__ import annotations

import json
import math
import shutil

import pytest
import torch
from safetensors.torch import load_file

from sak.cli.train import main
from sak.student.run.record import RUN_SCHEMA, ModelRecord, Stage1Run, Stage2Run, TigerRun
from sak.student.train.run_eval import evaluate_run
from tests.fixtures.make_v1_runs import weights_digest, weights_sums
from tests.runs import V1_CACHE, V1_RUNS, train_losses, train_steps

pytestmark = pytest.mark.usefixtures("one_thread")  # the fixture was made with one compute thread

EXPECTED = json.loads((V1_RUNS / "expected.json").read_text())


@pytest.fixture
def runs(tmp_path):
    """A writable copy of the old run folders, their cache and data somewhere else than they were."""
    shutil.copytree(V1_RUNS, tmp_path / "runs")
    shutil.copytree(V1_CACHE, tmp_path / "cache")
    return tmp_path / "runs", tmp_path / "cache"


# The conv bias just before a BatchNorm has no effect on the loss: its gradient is rounding noise, which
# AdamW scales up to full-size steps, so its value (and the running mean that absorbs it) differs with the
# order of floating-point sums (the machine, the tests run before). Every other weight must agree.
NOISE_ONLY = ("linear_fuse.0.bias", "linear_fuse.1.running_mean")


def _ends_as_the_old_code_did(run, kind: str) -> None:
    want = EXPECTED[kind]
    assert train_steps(run) == [1, 2, 3, 4]  # the old steps kept, the lost one trained again
    assert train_losses(run) == pytest.approx(want["losses"], rel=1e-6, abs=1e-7)
    weights = load_file(str(run / "checkpoint/model.safetensors"))
    sums = weights_sums(weights)
    assert sums.keys() == want["weights_sums"].keys()
    for k, (total, magnitude) in want["weights_sums"].items():
        if k.endswith(NOISE_ONLY):
            continue
        assert sums[k] == pytest.approx([total, magnitude], rel=1e-5, abs=1e-6), k
    exact = weights_digest(weights) == want["weights_digest"]
    print(
        f"{kind}: resumed losses {train_losses(run)[2:]}; final weights bit-identical to the old run: {exact}"
    )


def test_an_old_stage1_run_stopped_by_stop_after_resumes_to_its_end(runs):
    root, cache = runs
    run = root / "stage1"
    assert json.loads((run / "config.json").read_text())["stage1"]["stop_after"] == 2  # as the old code wrote
    assert main(["stage1", "--resume", str(run), "--cache", str(cache)]) == 0  # the cache has moved
    _ends_as_the_old_code_did(run, "stage1")
    record = json.loads((run / "config.json").read_text())
    RUN_SCHEMA.validate(record, Stage1Run, run / "config.json")  # rewritten as a v1 record
    assert record["resumed"][-1]["step"] == 2 and record["resumed"][-1]["changed"]["cache"][1] == str(cache)


def test_an_old_stage2_run_evaluates_and_resumes(runs, tmp_path):
    root, _ = runs
    run = root / "stage2"
    report = evaluate_run(run, "folder", root / "data", "val", out=tmp_path / "eval", device="cpu")
    # the old checkpoint evaluates, every task of it; the values are not the old code's: the evaluation
    # protocol has since become the reference's (docs/protocol.md: whole images centre-padded, mIoU over
    # all classes, SEISM odsF), so the fixture's `eval_of_step_2` (old protocol) no longer applies
    assert report["metrics"].keys() == EXPECTED["stage2"]["eval_of_step_2"].keys()
    assert all(math.isfinite(m["value"]) for m in report["metrics"].values())
    assert report["protocol"]["padding"] == "centre"
    assert main(["stage2", "--resume", str(run), "--data-root", str(root / "data")]) == 0
    _ends_as_the_old_code_did(run, "stage2")  # the routers' noise: the old state.pt's torch RNG restored
    RUN_SCHEMA.validate(json.loads((run / "config.json").read_text()), Stage2Run, run / "config.json")
    RUN_SCHEMA.validate(json.loads((run / "checkpoint/model.json").read_text()), ModelRecord, run)


def test_an_old_tiger_run_resumes_and_its_lost_step_is_trained_again(runs):
    root, _ = runs
    run = root / "tiger"
    assert train_steps(run) == [1, 2, 3]  # killed in step 4, checkpoint of step 2
    assert main(["tiger", "--resume", str(run), "--data-root", str(root / "data")]) == 0
    _ends_as_the_old_code_did(run, "tiger")
    RUN_SCHEMA.validate(json.loads((run / "config.json").read_text()), TigerRun, run / "config.json")
    assert torch.equal(
        load_file(str(run / "instructions.safetensors"))["embeddings"],
        load_file(str(V1_RUNS / "tiger/instructions.safetensors"))["embeddings"],
    )
