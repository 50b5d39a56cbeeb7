"""Long work is never silent: with output not on a terminal, extraction says what it is waiting for (the
teachers loading, the first shard) at least every few seconds, from Ray's start to the summary; and it
prints no noise (Ray's token-auth warning)."""

from __future__ import annotations

import logging
import os
import subprocess
import sys
import threading
import time

import pytest

from sak.pipeline.extraction.runtime import Progress, heartbeat


def test_progress_heartbeat_says_what_it_waits_for_when_nothing_lands(caplog):
    bar = Progress(8, "views", "extract", every=0.0, enabled=True)
    with caplog.at_level(logging.INFO, logger="sak"):
        bar.tick("1 actor(s) loading dinov2_b and computing the first shard")
        bar.update(4)
        bar.tick("1 shard(s) on the teachers, 0 being cut")
    lines = [r.getMessage() for r in caplog.records]
    assert lines[0].startswith("extract: 0/8 views; 1 actor(s) loading dinov2_b")
    assert lines[-1].startswith("extract: 4/8 views; 1 shard(s) on the teachers")


def test_a_blocking_call_gets_a_heartbeat_line(caplog):
    with caplog.at_level(logging.INFO, logger="sak"), heartbeat("still starting Ray", every=0.05):
        time.sleep(0.3)
    beats = [r.getMessage() for r in caplog.records if r.getMessage().startswith("still starting Ray (")]
    assert 2 <= len(beats) <= 7


def test_a_quiet_progress_says_nothing():
    bar = Progress(8, "views", "extract", every=0.0, enabled=False)
    bar.tick("waiting")  # --no-progress: no line, no error


@pytest.mark.slow
def test_extraction_through_a_pipe_prints_a_line_at_least_every_10_s(photo_dir, tmp_path):
    """The whole command, its output a pipe: the longest gap between lines (start and exit included)."""
    cmd = [
        sys.executable,
        "-m",
        "sak.cli.cache",
        "run",
        "--source",
        str(photo_dir),
        "--out",
        str(tmp_path / "c"),
    ]
    cmd += ["--teachers", "dinov2_b", "--random-init", "--size", "224", "--shard-size", "4", "--limit", "8"]
    t0 = time.monotonic()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=os.environ)
    stamps, lines = [t0], []

    def read():
        for line in proc.stdout:
            stamps.append(time.monotonic())
            lines.append(line)

    reader = threading.Thread(target=read)
    reader.start()
    assert proc.wait(timeout=600) == 0
    reader.join()
    stamps.append(time.monotonic())
    gaps = [b - a for a, b in zip(stamps, stamps[1:])]
    assert max(gaps) < 10.0, f"silent for {max(gaps):.1f} s"
    assert not [line for line in lines if "Token authentication" in line]  # Ray's warning, every run before
