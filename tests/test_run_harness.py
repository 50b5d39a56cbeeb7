"""The one run harness, tested the same way for the three trainers: a run stopped (--stop-after) or
crashed after a checkpoint, then resumed on fewer loader workers, gives the uninterrupted run's losses and
its final checkpoint (weights, optimizer state, every RNG) bit for bit; and a trainer process killed with
SIGKILL resumes the same way (its stale lock taken over)."""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from sak.cli.train import main
from sak.student.run.harness import RunRequest
from sak.student.train.stage1 import train_stage1
from sak.student.train.stage1_config import Stage1Config
from sak.student.train.stage2 import train_stage2
from sak.student.train.stage2_config import Stage2Config
from sak.student.train.tiger import train_tiger
from sak.student.train.tiger_config import TigerConfig
from tests.runs import V1_RUNS, checkpoint_tensors, copy_inputs, stage1_args, train_losses, train_steps

pytestmark = pytest.mark.usefixtures("one_thread")

STEPS, SAVED = 6, 2  # checkpoint every 2 steps; interrupted after step 2 (stop) or in step 3 (crash)


@pytest.fixture(scope="module")
def inputs(tiny_caches, tiny_stage1_run, tmp_path_factory):
    """Stage 1: the session's tiny cache (2 training shards: 2 loader streams); stage 2: the session's
    stage-1 run; both dense trainers: the committed folder dataset."""
    data = Path(shutil.copytree(V1_RUNS / "data", tmp_path_factory.mktemp("harness") / "data"))
    return tiny_caches.get(), tiny_stage1_run, data


def _config(trainer: str, inputs, out: Path, workers: int):
    cache, stage1_run, data = inputs
    common = dict(steps=STEPS, checkpoint_every=SAVED, num_workers=workers)
    if trainer == "stage1":
        return Stage1Config.debug(str(cache), str(out), eval_every=0, batch_size=4, **common)
    if trainer == "stage2":  # MoR routers: their noise draws from the global torch RNG
        return Stage2Config.debug("folder", str(data), str(stage1_run), str(out), gamma=0.0, img_size=(48, 64),
                                  lr=1e-3, **common)  # fmt: skip
    return TigerConfig.debug("folder", str(data), str(out), online=True, teachers=("dinov2_tiny",),
                             img_size=(48, 64), dim=8, router_hidden=4, **common)  # fmt: skip


TRAIN = {"stage1": train_stage1, "stage2": train_stage2, "tiger": train_tiger}


def _crash_in(step: int):
    def on_step(done: int, batch, record) -> None:
        if done == step:  # its metrics line is written, its checkpoint never will be
            raise KeyboardInterrupt("simulated crash")

    return on_step


@pytest.mark.parametrize("how", ["stop", "crash"])
@pytest.mark.parametrize("trainer", ["stage1", "stage2", "tiger"])
def test_an_interrupted_run_resumes_bit_exactly_on_fewer_workers(trainer, how, inputs, tmp_path):
    train = TRAIN[trainer]
    straight = train(_config(trainer, inputs, tmp_path / "straight", workers=2))
    part = _config(trainer, inputs, tmp_path / "part", workers=2)
    if how == "stop":
        first = train(part, RunRequest(stop_after=SAVED))
        assert first.stopped and first.step == SAVED
    else:
        with pytest.raises(KeyboardInterrupt):
            train(part, on_step=_crash_in(SAVED + 1))
        assert train_steps(tmp_path / "part") == [1, 2, 3]  # step 3 logged, never saved
    resumed = train(dataclasses.replace(part, num_workers=1), RunRequest(resume=True))  # a smaller node
    assert resumed.step == STEPS and not resumed.stopped

    run, ref = tmp_path / "part", tmp_path / "straight"
    assert train_steps(run) == list(range(1, STEPS + 1))  # step 3 of the crash trained again, logged once
    assert train_losses(run) == train_losses(ref) == straight.losses  # bit for bit
    a, b = checkpoint_tensors(ref), checkpoint_tensors(run)  # weights, optimizer moments, torch RNG
    assert a.keys() == b.keys() and [k for k in a if not torch.equal(a[k], b[k])] == []
    rng = [json.loads((r / "checkpoint/state.json").read_text())["rng"] for r in (ref, run)]
    assert rng[0] == rng[1]  # python and numpy generators too


def test_a_trainer_killed_with_sigkill_resumes_bit_exactly(tmp_path, caplog):
    """`sak-train stage1` in its own process, killed -9 mid-run (after a checkpoint, before the next):
    the resume takes over its stale lock, drops the metrics of the lost steps and ends like a run that
    was never killed."""
    cache, _ = copy_inputs(tmp_path)
    steps, every = 120, 10
    # click keeps the last of a repeated option: --steps 300 over the helper's --steps 4
    argv = stage1_args(cache, tmp_path / "killed", "--steps", str(steps), "--checkpoint-every", str(every))
    code = "import sys, torch; torch.set_num_threads(1); from sak.cli.train import main; sys.exit(main(sys.argv[1:]))"
    proc = subprocess.Popen([sys.executable, "-c", code, *argv], start_new_session=True,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            env={**os.environ, "OMP_NUM_THREADS": "1"})  # fmt: skip
    metrics = tmp_path / "killed/metrics.jsonl"
    try:
        deadline = time.time() + 120
        while time.time() < deadline and not (
            metrics.exists() and metrics.read_text().count("\n") > every + 5
        ):
            assert proc.poll() is None, "the trainer ended before it could be killed"
            time.sleep(0.02)
        os.kill(proc.pid, signal.SIGKILL)
    finally:
        proc.wait(timeout=60)
    lines_at_kill = metrics.read_text().count("\n")
    saved = json.loads((tmp_path / "killed/checkpoint/state.json").read_text())["step"]
    assert saved % every == 0 and every <= saved < steps and lines_at_kill > saved
    assert main(["stage1", "--resume", str(tmp_path / "killed")]) == 0
    assert "taking over a stale lock" in caplog.text
    assert main(stage1_args(cache, tmp_path / "straight", "--steps", str(steps))) == 0
    assert train_steps(tmp_path / "killed") == list(range(1, steps + 1))
    assert train_losses(tmp_path / "killed") == train_losses(tmp_path / "straight")
    a, b = checkpoint_tensors(tmp_path / "straight"), checkpoint_tensors(tmp_path / "killed")
    assert [k for k in a if not torch.equal(a[k], b[k])] == []
    print(
        f"killed with {lines_at_kill} steps logged, checkpoint of step {saved}; resumed to {steps}, bit-exact"
    )
