"""DDP under torchrun: two CPU processes (gloo) train on disjoint samples and keep identical weights."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

DRIVER = """
import hashlib, json, os, sys
from sak.student.train.stage1 import train_stage1
from sak.student.train.stage1_config import Stage1Config

cache, out, dump = sys.argv[1:4]
seen = []

def on_step(step, batch, record):
    seen.append({"rows": batch["rows"].tolist(), "epochs": batch["epochs"].tolist(), "loss": record["loss"]})

cfg = Stage1Config.debug(cache, out, steps=4, batch_size=4, eval_every=2, eval_batch_size=2, num_workers=0,
                         teachers=("dinov2_tiny", "sam_tiny"))
result = train_stage1(cfg, on_step=on_step)
weights = b"".join(v.contiguous().numpy().tobytes() for v in result.model.state_dict().values())
rank = int(os.environ["RANK"])
with open(os.path.join(dump, f"rank{rank}.json"), "w") as f:
    json.dump({"world": int(os.environ["WORLD_SIZE"]), "seen": seen, "repsim": result.repsim_after,
               "weights": hashlib.sha256(weights).hexdigest()}, f)
"""


@pytest.fixture(scope="module")
def cache(tiny_caches):
    """6 images x 2 views, shards of 2 images: 2 training shards (one per rank), 1 held out. The
    session's shared tiny cache; the driver trains on two of its three stores."""
    return tiny_caches.get()


def test_two_processes_see_disjoint_samples_and_keep_identical_weights(cache, tmp_path):
    driver = tmp_path / "driver.py"
    driver.write_text(DRIVER)
    run, dump = tmp_path / "run", tmp_path / "dump"
    dump.mkdir()
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]
    proc = subprocess.run(
        [*cmd, str(driver), str(cache), str(run), str(dump)],
        env=env,
        capture_output=True,
        text=True,
        timeout=180,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    ranks = [json.loads((dump / f"rank{r}.json").read_text()) for r in range(2)]
    assert [r["world"] for r in ranks] == [2, 2]
    assert ranks[0]["weights"] == ranks[1]["weights"]  # DDP kept the replicas identical
    assert [s["loss"] for s in ranks[0]["seen"]] == [s["loss"] for s in ranks[1]["seen"]]  # logged mean
    assert ranks[0]["repsim"] == ranks[1]["repsim"]  # Rep Sim summed over both ranks' halves
    # per epoch: each rank its own images, together every training image (shards 0 and 1: images 0-3)
    by_epoch: dict[int, list[set[int]]] = {}
    for r, rank in enumerate(ranks):
        assert len(rank["seen"]) == 4
        for s in rank["seen"]:
            assert len(s["rows"]) == 2  # global batch 4 over 2 processes
            for row, epoch in zip(s["rows"], s["epochs"]):
                assert row % 2 == epoch % 2  # view e mod K
                by_epoch.setdefault(epoch, [set(), set()])[r].add(row // 2)
    assert sorted(by_epoch) == [0, 1, 2, 3]
    for a, b in by_epoch.values():
        assert not a & b and a | b == {0, 1, 2, 3}
    # only rank 0 writes the run folder
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if r["kind"] == "train"] == [1, 2, 3, 4]
    assert json.loads((run / "config.json").read_text())["resolved"]["world_size"] == 2
    assert (run / "checkpoint" / "model.safetensors").is_file()


def test_under_torchrun_rank_0_alone_prints_and_refuses_once(tmp_path):
    """`sak-train stage1` launched by torchrun on two processes: one "trained" line, one log line per step,
    and a second launch on the same --out refuses in one line (not once per rank)."""
    from tests.runs import copy_inputs, stage1_args

    cache, _ = copy_inputs(tmp_path)  # 2 shards: one per rank with --holdout-shards 0
    argv = stage1_args(cache, tmp_path / "run", "--steps", "2", "--holdout-shards", "0", "--log-every", "1",
                       "--teachers", "dinov2_tiny")  # fmt: skip
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc_per_node=2",
        "-m",
        "sak.cli.train",
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    first = subprocess.run([*cmd, *argv], env=env, capture_output=True, text=True, timeout=300)
    assert first.returncode == 0, first.stdout[-3000:] + first.stderr[-3000:]
    assert first.stdout.count("trained 2 steps") == 1, first.stdout
    assert first.stderr.count("step 1/2") == 1 and first.stderr.count("step 2/2") == 1, first.stderr
    again = subprocess.run([*cmd, *argv], env=env, capture_output=True, text=True, timeout=300)
    assert again.returncode != 0
    assert again.stderr.count("already holds a run") == 1, again.stderr


@pytest.mark.slow
def test_a_store_of_some_levels_trains_under_torchrun(tmp_path):
    """clip_tiny's store of the committed cache keeps levels 1 and 3: the student's level norms and aligners
    of its taps 0 and 2 never get a gradient, though their maps are outputs (DDP's static graph allows it)."""
    from tests.runs import copy_inputs, stage1_args

    cache, _ = copy_inputs(tmp_path)
    argv = stage1_args(cache, tmp_path / "run", "--steps", "2", "--holdout-shards", "0")
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc_per_node=2",
        "-m",
        "sak.cli.train",
    ]
    proc = subprocess.run([*cmd, *argv], env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True,
                          timeout=300)  # fmt: skip
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    steps = [json.loads(x)["step"] for x in (tmp_path / "run/metrics.jsonl").read_text().splitlines()]
    assert steps == [1, 2]
