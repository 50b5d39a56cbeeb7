"""One command grammar for the three trainers (stage1, stage2, tiger), through `sak-train` itself: the same
--resume form, the same --img-size syntax, recorded options restated freely, per-machine settings and the
length changeable on resume, anything else refused naming both values, --stop-after for this invocation
only, --restart for a run that never saved, a torn metrics line survived, and one lock per run folder."""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from sak.cli.train import main
from tests.runs import copy_inputs, metrics, stage1_args, stage2_args, tiger_args, train_steps

pytestmark = pytest.mark.usefixtures("one_thread")

TRAINERS = ("stage1", "stage2", "tiger")


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    """The committed cache and dense data (copied), and a finished 4-step stage-1 run stage 2 starts from."""
    root = tmp_path_factory.mktemp("grammar")
    cache, data = copy_inputs(root)
    assert main(stage1_args(cache, root / "s1")) == 0
    return cache, data, root / "s1"


def args(trainer: str, inputs, out: Path, *extra: str) -> list[str]:
    cache, data, s1 = inputs
    if trainer == "stage1":
        return stage1_args(cache, out, *extra)
    if trainer == "stage2":
        return stage2_args(data, s1, out, *extra)
    return tiger_args(data, out, *extra)


def _error_line(capsys) -> str:
    err = [ln for ln in capsys.readouterr().err.splitlines() if ln.startswith("sak-train: error:")]
    assert len(err) == 1, err
    return err[0]


def _record(run: Path) -> dict:
    return json.loads((run / "config.json").read_text())


@pytest.mark.parametrize("trainer", TRAINERS)
def test_resume_run_takes_restated_options_and_new_per_machine_settings(trainer, inputs, tmp_path):
    """`--resume RUN` for every trainer; restating --out RUN and the recorded --steps is fine; the
    workers, device and log cadence may change (a run continues on a smaller node)."""
    run = tmp_path / "run"
    assert main([*args(trainer, inputs, run), "--stop-after", "2"]) == 0
    again = [trainer, "--resume", str(run), "--out", str(run), "--steps", "4", "--num-workers", "1",
             "--log-every", "3", "--device", "cpu"]  # fmt: skip
    assert main(again) == 0
    assert train_steps(run) == [1, 2, 3, 4]
    resumed = _record(run)["resumed"]
    assert [r["step"] for r in resumed] == [2]
    assert resumed[0]["changed"]["num_workers"] == [0, 1] and resumed[0]["changed"]["log_every"][1] == 3
    assert _record(run)["config"]["num_workers"] == 1


@pytest.mark.parametrize("trainer", TRAINERS)
def test_the_older_flag_spelling_of_resume_still_works(trainer, inputs, tmp_path):
    run = tmp_path / "run"
    assert main([*args(trainer, inputs, run), "--stop-after", "2"]) == 0
    assert main([trainer, "--resume", "--out", str(run)]) == 0
    assert train_steps(run) == [1, 2, 3, 4]


def _with_size(argv: list[str], size: str) -> list[str]:
    if "--img-size" not in argv:
        return [*argv, "--img-size", size]
    i = argv.index("--img-size")
    return [*argv[: i + 1], size, *argv[i + 2 :]]


@pytest.mark.parametrize("trainer", TRAINERS)
def test_img_size_takes_hxw_or_one_side(trainer, inputs, tmp_path, capsys):
    """Stage 1 took `--img-size 32`, stage 2 and TIGER `48x64`: each takes both forms now."""
    good, expect, bad = {"stage1": ("32x32", 32, "32x48"), "stage2": ("48", [48, 48], "48x50"),
                         "tiger": ("48", [48, 48], "48x50")}[trainer]  # fmt: skip
    assert main(_with_size(args(trainer, inputs, tmp_path / "a", "--steps", "1"), good)) == 0
    assert _record(tmp_path / "a")["config"]["img_size"] == expect
    assert main(_with_size(args(trainer, inputs, tmp_path / "b", "--steps", "1"), bad)) == 2
    assert "--img-size" in _error_line(capsys)


@pytest.mark.parametrize("trainer", TRAINERS)
def test_the_length_extends_on_resume_but_never_below_the_steps_done(trainer, inputs, tmp_path, capsys):
    run = tmp_path / "run"
    assert main(args(trainer, inputs, run)) == 0
    assert main([trainer, "--resume", str(run), "--steps", "6"]) == 0
    assert train_steps(run) == [1, 2, 3, 4, 5, 6]
    assert main([trainer, "--resume", str(run), "--steps", "5"]) == 2
    assert "has done 6 steps" in _error_line(capsys)


@pytest.mark.parametrize("trainer", TRAINERS)
def test_a_changed_recorded_option_is_refused_in_one_line_naming_both(trainer, inputs, tmp_path, capsys):
    run = tmp_path / "run"
    assert main([*args(trainer, inputs, run), "--stop-after", "2"]) == 0
    assert main([trainer, "--resume", str(run), "--lr", "0.5"]) == 2
    line = _error_line(capsys)
    assert "--lr 0.5" in line and "0.001" in line and str(run) in line
    assert train_steps(run) == [1, 2]  # nothing was trained


@pytest.mark.parametrize("trainer", TRAINERS)
def test_stop_after_belongs_to_one_invocation(trainer, inputs, tmp_path, capsys):
    run = tmp_path / "run"
    assert main([*args(trainer, inputs, run), "--stop-after", "2"]) == 0
    assert f"stopped at step 2/4; continue with --resume {run}" in capsys.readouterr().out
    assert "stop_after" not in _record(run)["config"]
    assert main([trainer, "--resume", str(run)]) == 0  # goes on to the end, not to step 2 again
    assert train_steps(run) == [1, 2, 3, 4]
    assert main([trainer, "--resume", str(run), "--steps", "8", "--stop-after", "6"]) == 0
    assert train_steps(run)[-1] == 6


@pytest.mark.parametrize("trainer", TRAINERS)
def test_a_run_killed_before_its_first_checkpoint_restarts_with_the_named_flag(
    trainer, inputs, tmp_path, capsys
):
    run = tmp_path / "run"
    assert main(args(trainer, inputs, run)) == 0
    shutil.rmtree(run / "checkpoint")  # as a kill before the first save leaves it: a record, no checkpoint
    assert main(args(trainer, inputs, run)) == 2
    assert "--restart" in _error_line(capsys)
    assert main([trainer, "--resume", str(run)]) == 2
    assert "--restart" in _error_line(capsys)
    assert main([*args(trainer, inputs, run), "--restart"]) == 0
    assert train_steps(run) == [1, 2, 3, 4]
    assert main([*args(trainer, inputs, run), "--restart"]) == 2  # it has a checkpoint now: never deleted
    assert "--resume" in _error_line(capsys)


@pytest.mark.parametrize("trainer", TRAINERS)
def test_a_torn_last_metrics_line_is_dropped_on_resume(trainer, inputs, tmp_path, caplog):
    run = tmp_path / "run"
    assert main([*args(trainer, inputs, run), "--stop-after", "2"]) == 0
    with open(run / "metrics.jsonl", "a") as f:
        f.write('{"kind": "train", "step": 3, "loss": 1.2')  # a write cut by a full disk or a kill
    assert main([trainer, "--resume", str(run)]) == 0
    assert [r["step"] for r in metrics(run) if r["kind"] == "train"] == [1, 2, 3, 4]  # every line parses
    assert "torn last line" in caplog.text


def _hold_lock(run: Path) -> subprocess.Popen:
    """Another process holding the run's lock (as a second trainer does), until killed."""
    code = (
        "import sys, time; from sak.pipeline.base.lock import CacheLock; "
        "CacheLock(sys.argv[1], writer='trainer').acquire(); print('held', flush=True); time.sleep(120)"
    )
    run.mkdir(parents=True, exist_ok=True)
    proc = subprocess.Popen([sys.executable, "-c", code, str(run)], stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "held"
    return proc


@pytest.mark.parametrize("trainer", TRAINERS)
def test_a_second_trainer_on_the_same_out_refuses_naming_the_holder(
    trainer, inputs, tmp_path, capsys, caplog
):
    run = tmp_path / "run"
    holder = _hold_lock(run)
    try:
        assert main(args(trainer, inputs, run)) == 2
        line = _error_line(capsys)
        assert "another trainer" in line and f"pid {holder.pid} on {socket.gethostname()}" in line
        assert str(run) in line  # the holder's command line (its argv: `-c RUN`)
    finally:
        os.kill(holder.pid, signal.SIGKILL)  # the holder dies without releasing: its lock is stale
        holder.wait(timeout=30)
    assert not (run / "config.json").exists()  # nothing was written meanwhile
    assert main(args(trainer, inputs, run)) == 0
    assert "taking over a stale lock" in caplog.text and str(holder.pid) in caplog.text
