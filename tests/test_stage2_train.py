"""Stage-2 training and evaluation on a tiny stage-1 run and the generic folder fixture."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from sak.cli.train import main as train_main
from sak.student.run.models import load_stage2
from sak.student.train.run_eval import evaluate_run
from sak.student.train.stage2 import train_stage2
from sak.student.train.stage2_config import Stage2Config
from tests.test_datasets import make_folder

NAMES = [f"img{i}" for i in range(5)]


pytestmark = pytest.mark.usefixtures("one_thread")  # see conftest.py


@pytest.fixture(scope="module")
def stage1_run(tiny_stage1_run, tmp_path_factory):
    root = tmp_path_factory.mktemp("stage2")
    (root / "s1").symlink_to(tiny_stage1_run, target_is_directory=True)  # shared, read-only
    return root / "s1"


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return make_folder(tmp_path_factory.mktemp("dense") / "data", names=NAMES)


@pytest.fixture(scope="module")
def trained(stage1_run, folder, tmp_path_factory):
    out = tmp_path_factory.mktemp("s2") / "run"
    cfg = Stage2Config.debug(
        "folder", str(folder), str(stage1_run), str(out), online=True, steps=24, lr=1e-3, grad_clip=10.0
    )
    return train_stage2(cfg)


def test_loss_falls_and_run_folder_is_complete(trained):
    first, last = trained.losses[0], float(np.mean(trained.losses[-4:]))
    print(f"stage-2 loss {first:.3f} -> {last:.3f}")
    assert last < 0.8 * first
    rec = trained.records[0]
    assert {"loss/semseg", "loss/normals", "distill", "lr", "grad_norm"} <= set(rec) and rec["distill"] > 0
    lines = (trained.run / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(x)["step"] for x in lines] == list(range(1, 25))
    meta = json.loads((trained.run / "checkpoint/model.json").read_text())
    assert meta["run"] == "stage2" and meta["multitask"]["img_size"] == [64, 64] and meta["code_version"]
    assert json.loads((trained.run / "config.json").read_text())["tasks"] == {"semseg": 5, "normals": 3}
    model = load_stage2(trained.run).model  # reload gives the same weights
    saved = load_file(str(trained.run / "checkpoint/model.safetensors"))
    assert all(torch.equal(v, saved[k]) for k, v in model.state_dict().items())


def test_eval_computes_every_metric_and_pictures(trained, folder, tmp_path):
    report = evaluate_run(trained.run, "folder", folder, "val", out=tmp_path)
    print(json.dumps(report["metrics"]))
    assert set(report["metrics"]) == {"semseg", "normals"}
    assert 0 <= report["metrics"]["semseg"]["value"] <= 100
    assert 0 <= report["metrics"]["normals"]["value"] <= 180
    assert "delta_m" not in report  # folder data: no paper baselines
    saved = json.loads((tmp_path / "eval.json").read_text())
    assert saved["metrics"] == report["metrics"]
    gates = np.array(list(saved["router_mean_gates"].values()))  # (levels * tasks, E)
    assert gates.shape[1] == 4 and np.allclose(gates.sum(1), 1.0, atol=1e-5)
    assert (tmp_path / "routers.png").stat().st_size > 1000 and (tmp_path / "predictions.png").exists()
    with_base = evaluate_run(
        trained.run, "folder", folder, "val", out=tmp_path, baselines={"semseg": 50, "normals": 20}
    )
    assert "delta_m" in with_base


def test_router_gates_sum_to_one_and_noise_only_in_training(trained):
    model = trained.model
    x = torch.randn(2, 3, 64, 64)
    model.eval()
    with torch.no_grad():
        _, g1, _ = model(x)
        _, g2, _ = model(x)
    model.train()
    with torch.no_grad():
        _, g3, _ = model(x)
    for key in g1:
        assert torch.allclose(g1[key].sum(1), torch.ones(2), atol=1e-5)
        assert torch.equal(g1[key], g2[key])
        assert not torch.equal(g1[key], g3[key])
    model.eval()


def test_freeze_backbone_trains_only_routers_and_heads(stage1_run, folder, tmp_path):
    out = tmp_path / "frozen"
    code = train_main(
        ["stage2", "--dataset", "folder", "--data-root", str(folder), "--init", str(stage1_run),
         "--freeze-backbone", "--steps", "3", "--batch-size", "2", "--img-size", "64x64", "--lr", "1e-3",
         "--num-workers", "0", "--out", str(out)]
    )  # fmt: skip
    assert code == 0
    before = load_file(str(stage1_run / "checkpoint/model.safetensors"))
    after = load_file(str(out / "checkpoint/model.safetensors"))
    for k, v in before.items():
        if k == "stem.pos_embed":
            continue  # resampled to the stage-2 size (64 -> 64: unchanged grid, same values)
        assert torch.equal(after[f"student.{k}"], v), k
    losses = [json.loads(x)["loss"] for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert len(losses) == 3 and len(set(losses)) == 3  # routers and heads did train
    assert all(json.loads(x)["distill"] is None for x in (out / "metrics.jsonl").read_text().splitlines())


def test_cli_errors_are_one_line(stage1_run, folder, tmp_path, capsys):
    base = ["stage2", "--dataset", "folder", "--data-root", str(folder), "--init", str(stage1_run)]
    assert train_main([*base, "--cache", "x", "--out", str(tmp_path / "a")]) == 2
    assert "not a stage-2 cache" in capsys.readouterr().err
    assert train_main([*base, "--out", str(tmp_path / "b"), "--img-size", "64x64"]) == 2
    assert "--online" in capsys.readouterr().err
    assert train_main([*base, "--online", "--img-size", "60", "--out", str(tmp_path / "c")]) == 2
    assert (
        train_main(["eval", "--checkpoint", str(tmp_path), "--dataset", "folder", "--data-root", str(folder)])
        == 2
    )
    assert "not a stage-2 or TIGER run" in capsys.readouterr().err


def test_cli_eval_prints_the_table(trained, folder, tmp_path, capsys):
    args = ["eval", "--checkpoint", str(trained.run), "--dataset", "folder", "--data-root", str(folder)]
    assert train_main([*args, "--out", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "semseg" in out and "mIoU" in out and "mErr" in out
