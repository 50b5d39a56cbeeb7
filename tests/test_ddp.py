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
    assert (run / "checkpoint" / "student.safetensors").is_file()
