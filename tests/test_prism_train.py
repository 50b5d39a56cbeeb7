"""PRISM's student through the trainers: `sak-train stage1 --student prism_tiny` from a cache (every teacher
on every image, or `--teachers-per-image 1`), its loss, expert use in metrics.jsonl and routers.png, exact
resume, and cached targets giving the losses of live teachers."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from sak.cli.train import main as train_main
from sak.pipeline.base.errors import SakError
from sak.student.model.prism import PrismStudent
from sak.student.run.harness import RunRequest
from sak.student.run.models import load_run_student
from sak.student.train.stage1 import train_stage1
from sak.student.train.stage1_config import Stage1Config

TEACHERS = ("dinov2_tiny", "clip_tiny", "sam_tiny")

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def cache32(tiny_caches):
    return tiny_caches.get("fp32", teachers=TEACHERS)


def _cfg(cache, out, **kw) -> Stage1Config:
    base = dict(student="prism_tiny", steps=4, batch_size=3, eval_every=0, eval_batch_size=4, log_every=2)
    return Stage1Config.debug(str(cache), str(out), **{**base, **kw})


def _lines(run, kind):
    return [r for r in map(json.loads, (run / "metrics.jsonl").read_text().splitlines()) if r["kind"] == kind]


def test_stage1_cli_trains_prism_and_logs_expert_use_by_teacher(cache32, tmp_path):
    out = tmp_path / "run"
    argv = ["stage1", "--cache", str(cache32), "--student", "prism_tiny", "--steps", "4", "--batch-size", "3",
            "--num-workers", "0", "--log-every", "2", "--out", str(out), "--no-tensorboard"]  # fmt: skip
    assert train_main(argv) == 0
    train = _lines(out, "train")
    assert [r["step"] for r in train] == [1, 2, 3, 4]
    assert {"loss/dinov2_tiny/L0", "loss/sam_tiny/L3", "loss/decorrelation", "loss/balance"} <= set(train[0])
    experts = _lines(out, "experts")
    assert [(r["step"], r["steps"]) for r in experts] == [(2, 2), (4, 2)]
    use = experts[-1]
    assert use["conditions"] == list(TEACHERS) and use["blocks"] == [1, 3, 5, 7]
    load = np.array(use["load"])  # (blocks, teachers, experts): every teacher routed on every image
    assert load.shape == (4, 3, 4) and np.allclose(load.sum(-1), 1.0)
    assert all(n > 0 for n in use["tokens"]) and len(use["specialisation"]) == 4
    assert (out / "routers.png").stat().st_size > 0
    model = load_run_student(out).model  # rebuilt through the registry from model.json
    assert isinstance(model, PrismStudent) and model.teacher_names == list(TEACHERS)
    record = json.loads((out / "checkpoint/model.json").read_text())
    assert record["student"]["type"] == "prism" and record["student"]["name"] == "prism_tiny"


def test_one_teacher_per_image_routes_each_image_once(cache32, tmp_path):
    every = train_stage1(_cfg(cache32, tmp_path / "every", steps=2))
    one = train_stage1(_cfg(cache32, tmp_path / "one", steps=2, teachers_per_image=1))
    tokens_every = np.array(_lines(tmp_path / "every", "experts")[-1]["tokens"])
    tokens_one = np.array(_lines(tmp_path / "one", "experts")[-1]["tokens"])
    # 3 images per step, 2 steps: every teacher sees 6 images, or each image one teacher (2 each)
    assert np.all(tokens_every == 3 * tokens_one)
    assert one.losses != every.losses
    config = json.loads((tmp_path / "one/config.json").read_text())
    assert config["config"]["teachers_per_image"] == 1


def test_teachers_per_image_is_refused_for_sak_students(cache32, tmp_path):
    with pytest.raises(SakError, match="PRISM students"):
        train_stage1(_cfg(cache32, tmp_path / "r", student="tiny", teachers_per_image=1))


@pytest.mark.parametrize("teachers_per_image", [None, 1])
def test_prism_resume_gives_the_uninterrupted_losses(cache32, tmp_path, teachers_per_image):
    kw = dict(steps=6, num_workers=2, batch_size=3, warmup_steps=2, grad_clip=1.0,
              teachers_per_image=teachers_per_image)  # fmt: skip
    whole = train_stage1(_cfg(cache32, tmp_path / "whole", **kw))
    part = train_stage1(_cfg(cache32, tmp_path / "part", **kw), RunRequest(stop_after=3))
    rest = train_stage1(_cfg(cache32, tmp_path / "part", **{**kw, "num_workers": 1}), RunRequest(resume=True))
    assert part.step == 3 and rest.step == 6
    assert part.losses + rest.losses == whole.losses  # bit-exact: routing noise and pairs replayed
    a = load_file(str(tmp_path / "whole/checkpoint/model.safetensors"))
    b = load_file(str(tmp_path / "part/checkpoint/model.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_prism_cached_fp32_targets_give_the_losses_of_live_teachers(cache32, tmp_path):
    cached = train_stage1(_cfg(cache32, tmp_path / "cached"))
    keys = []
    online = train_stage1(
        _cfg(cache32, tmp_path / "online", online=True), on_step=lambda s, b, r: keys.append(set(b))
    )
    assert keys and all("targets" not in k and "views" in k for k in keys)  # no cached target was read
    rel = float(np.max(np.abs(np.subtract(cached.losses, online.losses)) / np.abs(online.losses)))
    print(f"prism_tiny, fp32 cache vs online: max relative loss difference {rel:.2e} over 4 steps")
    assert rel <= 1e-4
    assert cached.losses[0] != cached.losses[1]


# ------------------------------------------------------------------------------------------- stage 2


@pytest.fixture(scope="module")
def prism_stage1(tiny_caches, tmp_path_factory):
    out = tmp_path_factory.mktemp("prism_s1") / "s1"
    cache = tiny_caches.get(views_per_image=1)
    train_stage1(
        Stage1Config.debug(str(cache), str(out), student="prism_tiny", steps=2, batch_size=2, eval_every=0)
    )
    return out


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    from tests.test_datasets import make_folder

    return make_folder(tmp_path_factory.mktemp("dense") / "data", names=[f"img{i}" for i in range(5)])


def test_stage2_from_a_prism_run_routes_by_task_then_evaluates(prism_stage1, folder, tmp_path, capsys):
    from sak.student.model.prism_stage2 import PrismStage2Model
    from sak.student.run.models import load_stage2

    out = tmp_path / "s2"
    argv = ["stage2", "--dataset", "folder", "--data-root", str(folder), "--init", str(prism_stage1),
            "--out", str(out), "--online", "--steps", "4", "--log-every", "2", "--batch-size", "2",
            "--img-size", "64", "--num-workers", "0"]  # fmt: skip
    assert train_main(argv) == 0
    train = _lines(out, "train")
    assert [r["step"] for r in train] == [1, 2, 3, 4] and train[0]["distill"] > 0
    experts = _lines(out, "experts")
    assert [r["step"] for r in experts] == [2, 4]
    use = experts[-1]  # distillation on: teacher rows and task rows, counted apart
    assert use["conditions"] == [*TEACHERS, "semseg", "normals"] and all(n > 0 for n in use["tokens"])
    assert np.allclose(np.array(use["load"]).sum(-1), 1.0)
    assert (out / "routers.png").exists()
    meta = json.loads((out / "checkpoint/model.json").read_text())
    assert meta["multitask"]["router"] == "prism" and meta["student"]["type"] == "prism"
    model = load_stage2(out).model
    assert isinstance(model, PrismStage2Model) and model.student.task_names == ["semseg", "normals"]
    saved = load_file(str(out / "checkpoint/model.safetensors"))
    assert all(torch.equal(v, saved[k]) for k, v in model.state_dict().items())

    assert train_main(["eval", "--checkpoint", str(out), "--dataset", "folder", "--data-root", str(folder),
                       "--out", str(tmp_path / "eval")]) == 0  # fmt: skip
    report = json.loads((tmp_path / "eval/eval.json").read_text())
    assert set(report["metrics"]) == {"semseg", "normals"}
    assert report["experts"] == ["expert 0", "expert 1", "expert 2", "expert 3"]
    gates = report["router_mean_gates"]
    assert set(gates) == {f"{b}/{t}" for b in (1, 3, 5, 7) for t in ("semseg", "normals")}
    assert all(abs(sum(g) - 1) < 1e-4 for g in gates.values())  # top-k weights sum to 1 per token

    # resume: the stage-2 record rebuilds the PRISM model
    assert train_main(["stage2", "--resume", str(out), "--steps", "5"]) == 0
    assert [r["step"] for r in _lines(out, "train")] == [1, 2, 3, 4, 5]


# ----------------------------------------------------------------------------------------------- DDP

DDP_DRIVER = """
import hashlib, json, os, sys
from sak.student.train.stage1 import train_stage1
from sak.student.train.stage1_config import Stage1Config

cache, out, dump = sys.argv[1:4]
cfg = Stage1Config.debug(cache, out, student="prism_tiny", steps=3, batch_size=4, eval_every=0, num_workers=0,
                         teachers=("dinov2_tiny", "sam_tiny"), teachers_per_image=1, log_every=3)
result = train_stage1(cfg)
weights = b"".join(v.contiguous().numpy().tobytes() for v in result.model.state_dict().values())
with open(os.path.join(dump, f"rank{os.environ['RANK']}.json"), "w") as f:
    json.dump({"losses": result.losses, "weights": hashlib.sha256(weights).hexdigest()}, f)
"""


@pytest.mark.slow  # two torchrun processes: ~20 s on 2 shared cores
def test_prism_stage1_under_two_gloo_processes_keeps_identical_weights(tiny_caches, tmp_path):
    import os
    import subprocess
    import sys

    driver, run, dump = tmp_path / "driver.py", tmp_path / "run", tmp_path / "dump"
    driver.write_text(DDP_DRIVER)
    dump.mkdir()
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]
    proc = subprocess.run([*cmd, str(driver), str(tiny_caches.get()), str(run), str(dump)], capture_output=True,
                          text=True, timeout=180, env={**os.environ, "OMP_NUM_THREADS": "1"})  # fmt: skip
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    ranks = [json.loads((dump / f"rank{r}.json").read_text()) for r in range(2)]
    assert ranks[0]["weights"] == ranks[1]["weights"] and ranks[0]["losses"] == ranks[1]["losses"]
    (use,) = _lines(run, "experts")
    # 3 steps x 2 ranks x 2 images, each image one teacher: 6 images per teacher, counted over both ranks
    assert use["conditions"] == ["dinov2_tiny", "sam_tiny"] and use["tokens"][0] == use["tokens"][1]
    tokens_per_image = use["tokens"][0] // 6
    assert use["tokens"] == [6 * tokens_per_image] * 2 and tokens_per_image == 1 + (64 // 16) ** 2


# ------------------------------------------------------------------------- the authors' checkpoints


def test_init_paper_loads_the_authors_stage1_checkpoint_into_a_prism_run(cache32, tmp_path, monkeypatch):
    """`sak-train stage1 --student prism_tiny --init-paper CKPT`: their file in their key layout (synthetic,
    tests/test_prism_weights.py), their teacher ids dinov2, clip, sam mapped to our stores by family,
    whatever order --teachers gives; the run starts from it."""
    from sak.student.data.opening import open_cache
    from tests import test_prism_weights

    dims = {s.teacher: s.dim for s in open_cache(str(cache32), (), True).stores}
    monkeypatch.setattr(test_prism_weights, "TEACHER_DIMS", tuple(dims[t] for t in TEACHERS))  # their ids
    sd = test_prism_weights.authors_stage1(grid=4)  # 64 px cache: 4 x 4 patches
    path = tmp_path / "prism_s1.pth"
    torch.save({"model": sd}, path)
    out = tmp_path / "run"
    argv = ["stage1", "--cache", str(cache32), "--student", "prism_tiny", "--init-paper", str(path),
            "--teachers", "sam_tiny,dinov2_tiny,clip_tiny", "--steps", "1", "--batch-size", "2", "--lr", "0",
            "--num-workers", "0", "--out", str(out), "--no-tensorboard"]  # fmt: skip
    assert train_main(argv) == 0
    model = load_run_student(out).model
    assert model.teacher_names == ["sam_tiny", "dinov2_tiny", "clip_tiny"]
    theirs = sd["vfm_condition_embeddings.weight"]  # rows: their ids 0 dinov2, 1 clip, 2 sam
    assert torch.equal(model.teacher_embeddings.weight, theirs[[2, 0, 1]])
    assert torch.equal(
        model.projectors["sam_tiny"]["1"].fc1.weight, sd["vfm_projection_heads.2_0.net.0.weight"]
    )
    assert torch.equal(
        model.stem.blocks[3].moe.experts[2].fc1.weight,
        sd["backbone.blocks.3.moe_ffn_layer.experts.2.fc1.weight"],
    )


def test_stage2_init_paper_loads_the_authors_stage2_checkpoint(prism_stage1, folder, tmp_path, monkeypatch):
    """`sak-train stage2 --init RUN --init-paper CKPT`: their MultiTaskModel file (synthetic, their key layout:
    PASCAL-Context's 5 task rows, their teacher ids dinov2, clip, sam) -> our student and heads."""
    from sak.student.run.models import load_stage2
    from tests import test_prism_weights

    monkeypatch.setattr(test_prism_weights, "TEACHER_DIMS", (64, 64, 64))  # the tiny stores' widths
    sd = test_prism_weights.authors_stage2(
        outputs={"semseg": 5, "human_parts": 7, "normals": 3, "edge": 1, "sal": 2}
    )
    path = tmp_path / "prism_s2.pth"
    torch.save({"model": sd}, path)
    out = tmp_path / "s2"
    argv = ["stage2", "--dataset", "folder", "--data-root", str(folder), "--init", str(prism_stage1),
            "--init-paper", str(path), "--out", str(out), "--gamma", "0", "--lr", "0", "--steps", "1",
            "--batch-size", "2", "--img-size", "64", "--num-workers", "0"]  # fmt: skip
    assert train_main(argv) == 0
    model = load_stage2(out).model
    emb = sd["backbone.task_condition_embeddings.weight"]  # their rows semseg 0, ..., normals 2
    assert torch.equal(model.student.task_embeddings.weight, emb[[0, 2]])
    assert torch.equal(
        model.student.teacher_embeddings.weight, sd["backbone.vfm_condition_embeddings.weight"]
    )
    head = model.multitask.heads["normals"].state_dict()
    assert all(
        torch.equal(v, sd[f"heads.normals.{k}"])
        for k, v in head.items()
        if v.is_floating_point() and "running" not in k
    )
