"""`sak-train stage2 --router tiger`: TIGER's token-level instruction router over the SAK student's experts
(stem + teacher adapters), with the counterfactual loss; trains, resumes its config, evaluates. And
`--cf-experts K` / `--cf-every N` (sampled counterfactual pass) on both trainers."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from sak.cli.train import main as train_main
from sak.pipeline.base.errors import SakError
from sak.student.model.multitask import SakMultiTask
from sak.student.run.models import load_stage2
from sak.student.train.counterfactual import (
    counterfactual_loss,
    exclude_expert,
    expert_contributions,
    sample_experts,
)
from sak.student.train.stage2 import train_stage2
from sak.student.train.stage2_config import Stage2Config
from sak.student.train.stage2_teachers import load_stage1_run
from sak.student.train.task_losses import TASK_LOSSES
from tests.test_datasets import make_folder

pytestmark = pytest.mark.usefixtures("one_thread")

NAMES = [f"img{i}" for i in range(5)]
STEPS = 16
TEXT = ["--text-model", "ViT-S-32-alt", "--text-pretrained", "none"]


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return make_folder(tmp_path_factory.mktemp("s2tiger") / "data", names=NAMES)


@pytest.fixture(scope="module")
def trained(tiny_stage1_run, folder, tmp_path_factory):
    """The CLI: 16 steps of 2 at 64x64, no distillation (--gamma 0), counterfactual weight 0.1."""
    out = tmp_path_factory.mktemp("s2t") / "run"
    args = ["stage2", "--dataset", "folder", "--data-root", str(folder), "--init", str(tiny_stage1_run),
            "--out", str(out), "--router", "tiger", "--gamma", "0", "--steps", str(STEPS), "--batch-size", "2",
            "--img-size", "64x64", "--num-workers", "0", "--lr", "1e-3", "--device", "cpu",
            "--checkpoint-every", "0", *TEXT]  # fmt: skip
    assert train_main(args) == 0
    records = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    return out, records


def test_tiger_router_trains_and_logs_the_routing(trained):
    run, records = trained
    assert [r["step"] for r in records] == list(range(1, STEPS + 1))
    task = [r["loss/semseg"] + r["loss/normals"] for r in records]
    first, last = float(np.mean(task[:4])), float(np.mean(task[-4:]))
    print(f"stage2 --router tiger: task loss first 4 steps {first:.4f}, last 4 steps {last:.4f}")
    assert last < 0.8 * first
    assert all(r["cf"] >= 0 for r in records) and any(r["cf"] > 0 for r in records)
    config = json.loads((run / "config.json").read_text())
    assert config["config"]["router"] == "tiger" and config["instructions"]["random_init"]
    assert (run / "instructions.safetensors").is_file()
    loaded = load_stage2(run)
    model, record = loaded.model, loaded.run
    E = model.num_experts  # stem + the stage-1 teachers
    assert record.config.router == "tiger" and model.router_kind == "tiger" and E >= 3
    routing = records[-1]["routing"]
    assert set(routing) == {f"{lvl}/{t}" for lvl in range(4) for t in ("semseg", "normals")}
    for v in routing.values():
        assert len(v["c"]) == len(v["q"]) == len(v["gate"]) == E and min(v["c"]) >= 0
        assert sum(v["gate"]) == pytest.approx(1, abs=1e-5)


def test_tiger_router_gates_per_token_and_counterfactual_is_exact(trained):
    run, _ = trained
    model = load_stage2(run).model
    model.train()
    torch.manual_seed(0)
    images = torch.rand(2, 3, 64, 64)
    targets = {"semseg": torch.randint(0, 5, (2, 64, 64)), "normals": torch.nn.functional.normalize(
        torch.randn(2, 3, 64, 64), dim=1)}  # fmt: skip
    preds, gates, _, token = model(images, routing=True)
    for g in gates.values():
        assert g.shape == (2, 16, model.num_experts)  # (B, tokens of the 4x4 grid, E)
        assert torch.allclose(g.sum(-1), torch.ones(2, 16), atol=1e-5)
    c = expert_contributions(model, token, targets, (64, 64))
    lvl, task, e = 2, "semseg", 1
    block = model.levels[lvl]
    router = model.tiger[f"{block}_{task}"]
    forward = router.forward
    router.forward = lambda x, s: exclude_expert(forward(x, s), e)
    try:
        with torch.no_grad():
            direct = model(images)[0][task]  # the router itself emits gates without e
    finally:
        router.forward = forward
    base = TASK_LOSSES[task](preds[task].detach(), targets[task])
    want = max(float(TASK_LOSSES[task](direct, targets[task]) - base), 0.0)
    assert float(c[(lvl, task)][e]) == pytest.approx(want, abs=1e-5)
    # the counterfactual term's gradient reaches only the tiger routers
    model.zero_grad()
    cf, _ = counterfactual_loss(model, token, targets, (64, 64), tau=0.1)
    cf.backward()
    reached = [n for n, p in model.named_parameters() if p.grad is not None and p.grad.abs().sum() > 0]
    assert reached and all(n.startswith("tiger.") for n in reached)


def test_eval_works_on_a_tiger_router_run(trained, folder, tmp_path):
    run, _ = trained
    args = ["eval", "--checkpoint", str(run), "--dataset", "folder", "--data-root", str(folder)]
    assert train_main([*args, "--out", str(tmp_path), "--device", "cpu"]) == 0
    report = json.loads((tmp_path / "eval.json").read_text())
    assert set(report["metrics"]) == {"semseg", "normals"}
    for gates in report["router_mean_gates"].values():  # per token, then over tokens and images
        assert sum(gates) == pytest.approx(1, abs=1e-5)
    for name in ("routers.png", "predictions.png", "gates_semseg.png", "gates_normals.png"):
        assert (tmp_path / name).stat().st_size > 1000  # token-level gates: per-expert gate maps too


def test_tiger_router_refusals(tiny_stage1_run, folder, tmp_path):
    with pytest.raises(SakError, match="--cf-experts 1"):
        Stage2Config.debug(
            "folder", str(folder), str(tiny_stage1_run), str(tmp_path), cf_experts=1, gamma=0.0
        ).validate()
    student, _ = load_stage1_run(str(tiny_stage1_run), "cpu")
    with pytest.raises(SakError, match="instruction embedding per task"):
        SakMultiTask(student, {"semseg": 5}, "tiger")


def test_sampled_experts_are_seeded_and_all_by_default():
    keys = [(lvl, t) for lvl in range(4) for t in ("semseg", "normals")]
    assert sample_experts(keys, 5, None, 0, 3) == {k: [0, 1, 2, 3, 4] for k in keys}
    a, b = sample_experts(keys, 5, 2, 0, 3), sample_experts(keys, 5, 2, 0, 3)
    assert a == b and all(len(v) == 2 and v == sorted(v) for v in a.values())
    assert a != sample_experts(keys, 5, 2, 0, 4)  # another step, another draw


def test_cf_experts_and_cf_every_in_stage2(tiny_stage1_run, folder, tmp_path):
    """K=2 sampled experts: each (level, task) logs which, its c and q over them; with --cf-every 2 the
    odd steps carry no counterfactual term."""
    cfg = Stage2Config.debug(
        "folder", str(folder), str(tiny_stage1_run), str(tmp_path / "k2"), router="tiger", gamma=0.0,
        steps=4, cf_experts=2, cf_every=2, text_model="ViT-S-32-alt", text_pretrained=None,
    )  # fmt: skip
    result = train_stage2(cfg)
    odd, even = result.records[0], result.records[1]
    assert odd["cf"] == 0.0 and odd["routing"] == {}
    for v in even["routing"].values():
        assert len(v["sampled"]) == 2 and len(v["c"]) == len(v["q"]) == 2 and sum(v["q"]) == pytest.approx(1)
        assert len(v["gate"]) == result.model.num_experts
    assert even["routing"] != result.records[3]["routing"]  # steps 2 and 4 drew their own subsets
