"""Stage 2 and TIGER under torchrun: two CPU processes (gloo) split every global batch and log, step by
step, the losses one process logs on the same batches; rank 0 alone writes checkpoints; a crashed
two-process run resumes with the uninterrupted run's remaining losses.

The crops are taken at scale 2 (no padding), so both halves of a batch hold the same number of labelled
pixels and the mean of the ranks' per-pixel losses is the global batch's (see docs/stage2.md, DDP)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

from sak.student.train.stage2 import train_stage2
from sak.student.train.stage2_config import Stage2Config
from sak.student.train.tiger import train_tiger
from sak.student.train.tiger_config import TigerConfig
from tests.test_datasets import make_folder

pytestmark = pytest.mark.usefixtures("one_thread")

NAMES = [f"img{i}" for i in range(5)]
STEPS, CRASH_AT = 4, 3  # checkpoint every 2 steps; the crash comes after step 3, before its checkpoint

DRIVER = """
import json, os, sys
import torch.distributed as dist
from sak.student.run import harness
from sak.student.run.harness import RunRequest
from sak.student.train import stage2 as stage2_mod, tiger as tiger_mod
from sak.student.train.stage2_config import Stage2Config
from sak.student.train.tiger_config import TigerConfig

dist.init_process_group("gloo")  # ours, so the trainers leave it up between their runs
rank = dist.get_rank()
kind, kwargs_json, root, dump = sys.argv[1:5]
kwargs = json.loads(kwargs_json)
saves = []

def cfg(name, **kw):
    config = Stage2Config if kind == "stage2" else TigerConfig
    return config.debug(**{**kwargs, "out": os.path.join(root, name), **kw})

def train(c, *args, **kw):
    return (stage2_mod.train_stage2 if kind == "stage2" else tiger_mod.train_tiger)(c, *args, **kw)

save = harness.save_checkpoint  # what rank 0 alone must call
harness.save_checkpoint = lambda *a, **k: (saves.append(rank), save(*a, **k))[1]

def crash(step, batch, record):  # after step {crash}'s metrics line, before any checkpoint of it
    if step == {crash}:
        raise KeyboardInterrupt("simulated crash")

full = train(cfg("full"))
try:
    train(cfg("part"), on_step=crash)
    raise SystemExit("the simulated crash did not happen")
except KeyboardInterrupt:
    pass
resumed = train(cfg("part"), RunRequest(resume=True))
with open(os.path.join(dump, f"rank{rank}.json"), "w") as f:
    timing = ("elapsed_s", "samples_per_s", "data_wait_fraction", "step_time_s")
    json.dump({"full": full.losses, "resumed": resumed.losses, "saves": len(saves),
               "records": [{k: v for k, v in r.items() if k not in timing} for r in full.records]}, f)
dist.destroy_process_group()
""".replace("{crash}", str(CRASH_AT))


def _torchrun(tmp_path, kind: str, kwargs: dict) -> list[dict]:
    driver = tmp_path / "driver.py"
    driver.write_text(DRIVER)
    dump = tmp_path / "dump"
    dump.mkdir()
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", str(driver)]
    proc = subprocess.run(
        [*cmd, kind, json.dumps(kwargs), str(tmp_path / "ddp"), str(dump)],
        env={**os.environ, "OMP_NUM_THREADS": "1"},
        capture_output=True,
        text=True,
        timeout=300,
    )
    (tmp_path / "torchrun.log").write_text(proc.stdout + proc.stderr)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return [json.loads((dump / f"rank{r}.json").read_text()) for r in range(2)]


def _check(ranks: list[dict], single: list[float], run) -> None:
    print("1 process  ", single)
    print("2 processes", ranks[0]["full"])
    assert ranks[0]["full"] == ranks[1]["full"]  # every rank logs the global batch's mean
    assert ranks[0]["full"] == pytest.approx(single, rel=2e-5, abs=1e-6)
    assert ranks[0]["full"][-1] != pytest.approx(ranks[0]["full"][0], rel=1e-3)  # it did train
    assert ranks[0]["resumed"] == pytest.approx(ranks[0]["full"][CRASH_AT - 1 :], rel=1e-6, abs=1e-7)
    assert ranks[0]["resumed"] == ranks[1]["resumed"]
    assert ranks[0]["saves"] > 0 and ranks[1]["saves"] == 0  # rank 0 alone writes checkpoints
    for name in ("full", "part"):
        steps = [json.loads(x)["step"] for x in (run / name / "metrics.jsonl").read_text().splitlines()]
        assert steps == list(range(1, STEPS + 1))  # one writer; the resumed run's records after step 2
        assert json.loads((run / name / "config.json").read_text())["world_size"] == 2


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return make_folder(tmp_path_factory.mktemp("ddp2") / "data", names=NAMES)


def test_stage2_two_processes_match_one_and_resume(tiny_stage1_run, folder, tmp_path):
    kwargs = dict(
        dataset="folder", data_root=str(folder), init=str(tiny_stage1_run), online=True, router="tiger",
        text_model="ViT-S-32-alt", text_pretrained=None, steps=STEPS, batch_size=4, lr=1e-3,
        checkpoint_every=2, scale_range=[2.0, 2.0], device="cpu",
    )  # fmt: skip
    ranks = _torchrun(tmp_path, "stage2", kwargs)
    single = train_stage2(Stage2Config.debug(**{**kwargs, "out": str(tmp_path / "one")}))
    _check(ranks, single.losses, tmp_path / "ddp")
    assert [r["cf"] for r in ranks[0]["records"]] == pytest.approx(
        [r["cf"] for r in single.records], rel=1e-4
    )


def test_tiger_two_processes_match_one_and_resume(folder, tmp_path):
    kwargs = dict(
        dataset="folder", data_root=str(folder), online=True, teachers=["dinov2_tiny", "sam_tiny"],
        random_init=True, img_size=[48, 64], steps=STEPS, batch_size=4, checkpoint_every=2,
        scale_range=[2.0, 2.0], device="cpu",
    )  # fmt: skip
    ranks = _torchrun(tmp_path, "tiger", kwargs)
    single = train_tiger(TigerConfig.debug(**{**kwargs, "out": str(tmp_path / "one")}))
    _check(ranks, single.losses, tmp_path / "ddp")
    # the counterfactual contributions and mean gates are the global batch's too
    routing = [r["routing"] for r in ranks[0]["records"]]
    assert routing == [r["routing"] for r in ranks[1]["records"]]
    first = next(iter(single.records[0]["routing"].values()))
    assert next(iter(routing[0].values()))["gate"] == pytest.approx(first["gate"], rel=1e-5)
    assert torch.tensor(first["c"]).ge(0).all()
