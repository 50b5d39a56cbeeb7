"""TIGER on the folder layout: a stage-2 cache of tiny named teachers (no stage-1 run) -> `sak-train tiger`
-> `sak-train eval`; the routing's invariants and the counterfactual loss checked against direct
recomputation; cache vs live teachers; instructions (exact resume: tests/test_run_harness.py)."""

from __future__ import annotations

import json

import pytest
import torch

from sak.cli.cache import main as cache_main
from sak.cli.train import main as train_main
from sak.pipeline.base.errors import SakError
from sak.pipeline.inspection.verify import check_cache
from sak.student.run.models import load_tiger
from sak.student.train.counterfactual import counterfactual_loss, exclude_expert, expert_contributions
from sak.student.train.dense_run import cached_source
from sak.student.train.task_losses import TASK_LOSSES
from sak.student.train.tiger import train_tiger
from sak.student.train.tiger_config import TigerConfig
from tests.test_datasets import make_folder

NAMES = [f"img{i}" for i in range(5)]  # 4 training images, 1 for validation
CROP = (48, 64)  # SAM sees it padded square: its experts are cropped to the image part
TEACHERS = "dinov2_tiny,clip_tiny,sam_tiny"
STEPS = 24  # a few dozen steps of 2 = 12 epochs of the 4 training images

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def module_one_thread():
    """`one_thread` for the module-scoped fixtures below (they are set up before function fixtures)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def setup(tmp_path_factory, module_one_thread):
    root = tmp_path_factory.mktemp("tiger")
    folder = make_folder(root / "data", names=NAMES)
    code = cache_main(
        ["stage2", "--dataset", "folder", "--data-root", str(folder), "--teachers", TEACHERS,
         "--out", str(root / "s2"), "--epochs", str(STEPS * 2 // 4), "--img-size", f"{CROP[0]}x{CROP[1]}",
         "--codec", "fp32", "--shard-size", "16", "--batch-size", "8", "--device", "cpu"]
    )  # fmt: skip
    assert code == 0
    return root, folder


def _cfg(root, folder, name, **kw):
    kw = {"img_size": CROP, "device": "cpu", "checkpoint_every": 0, **kw}
    if "online" not in kw:
        kw["cache"] = str(root / "s2")
    return TigerConfig.debug("folder", str(folder), str(root / name), **kw)


@pytest.fixture(scope="module")
def trained(setup):
    root, folder = setup
    result = train_tiger(_cfg(root, folder, "run", steps=STEPS))
    return root, folder, result


def test_stage2_cache_of_named_teachers_verifies(setup):
    root, _ = setup
    cache = json.loads((root / "s2/cache.json").read_text())
    assert "init" not in cache and cache["complete"]
    assert [t["teacher"] for t in cache["teachers"]] == TEACHERS.split(",")
    assert all(t["weights"]["random_init"] for t in cache["teachers"])
    assert check_cache(root / "s2").problems == []


def test_tiger_from_cache_learns_and_evaluates(trained, tmp_path):
    root, folder, result = trained
    task = [r["task_loss"] for r in result.records]
    first, last = sum(task[:4]) / 4, sum(task[-4:]) / 4
    print(f"task loss: first 4 steps {first:.4f}, last 4 steps {last:.4f}")
    assert last < 0.8 * first
    record = json.loads((root / "run/config.json").read_text())
    assert record["kind"] == "sak-tiger-run" and len(record["experts"]) == 12  # 3 teachers x 4 levels
    assert record["instructions"]["random_init"] and record["instructions"]["model"] == "ViT-S-32-alt"
    routing = result.records[-1]["routing"]
    assert set(routing) == {f"{lvl}/{t}" for lvl in range(4) for t in ("semseg", "normals")}
    for v in routing.values():
        assert len(v["c"]) == len(v["q"]) == len(v["gate"]) == 12 and min(v["c"]) >= 0
        assert sum(v["q"]) == pytest.approx(1, abs=1e-5) and sum(v["gate"]) == pytest.approx(1, abs=1e-5)
    baselines = tmp_path / "baselines.json"
    baselines.write_text(json.dumps({"semseg": 40.0, "normals": 60.0}))
    args = ["eval", "--checkpoint", str(root / "run"), "--dataset", "folder", "--data-root", str(folder)]
    assert train_main([*args, "--device", "cpu", "--baselines", str(baselines)]) == 0
    report = json.loads((root / "run/eval.json").read_text())
    print(
        "eval:", {t: round(m["value"], 3) for t, m in report["metrics"].items()}, "delta_m", report["delta_m"]
    )
    assert set(report["metrics"]) == {"semseg", "normals"} and "delta_m" in report
    assert report["baselines"] == {"semseg": 40.0, "normals": 60.0}
    for name in ("routers.png", "predictions.png", "gates_semseg.png", "gates_normals.png"):
        assert (root / "run" / name).stat().st_size > 1000


def _batch(root, folder, model):
    """One training batch's teacher maps and targets, from the cache, as the trainer reads them."""
    from sak.student.data.dense import DenseDataset, TrainSamples, collate

    data = DenseDataset("folder", folder, "train")
    batch = collate([TrainSamples(data, CROP)[i] for i in range(2)])
    source = cached_source(_cfg(root, folder, "unused"), data, CROP)
    maps = source.fetch(batch, batch["images"], torch.device("cpu"))
    return maps, batch["labels"]


def test_gates_sum_to_one_and_counterfactual_matches_direct_recomputation(trained):
    root, folder, _ = trained
    model = load_tiger(root / "run").model
    model.train()
    maps, targets = _batch(root, folder, model)
    out = model(maps, CROP)
    for g in out.gates.values():
        assert g.shape == (2, 12, 12) and torch.allclose(g.sum(-1), torch.ones(2, 12), atol=1e-5)
    c = expert_contributions(model, out, targets, CROP)
    checked = 0
    for (lvl, task), ce in c.items():
        base = float(TASK_LOSSES[task](out.preds[task].detach(), targets[task]))
        for e in (0, 5, 11):  # direct: the router itself emits gates without e (renormalised)
            router = model.router(lvl, task)
            forward = router.forward
            router.forward = lambda x, s, f=forward, e=e: exclude_expert(f(x, s), e)
            try:
                with torch.no_grad():
                    direct = model(maps, CROP).preds[task]
            finally:
                router.forward = forward
            want = max(float(TASK_LOSSES[task](direct, targets[task])) - base, 0.0)
            assert float(ce[e]) == pytest.approx(want, abs=1e-5), (lvl, task, e)
            checked += 1
    assert checked == 24 and any(float(v.max()) > 0 for v in c.values())


def test_counterfactual_gradient_reaches_only_the_routers(trained):
    root, folder, _ = trained
    model = load_tiger(root / "run").model
    model.train()
    maps, targets = _batch(root, folder, model)
    cf, _ = counterfactual_loss(model, model(maps, CROP), targets, CROP, tau=0.1)
    cf.backward()
    routers = {id(p) for p in model.router_parameters()}
    reached = [n for n, p in model.named_parameters() if p.grad is not None and p.grad.abs().sum() > 0]
    assert reached and all(id(dict(model.named_parameters())[n]) in routers for n in reached)
    assert any(n.startswith("routers.") and "film" in n for n in reached)  # the instruction's FiLM too


def test_cache_and_online_give_equal_losses(setup):
    root, folder = setup
    cached = train_tiger(_cfg(root, folder, "c4", steps=4))
    online = train_tiger(_cfg(root, folder, "o4", steps=4, online=True, teachers=tuple(TEACHERS.split(","))))
    diff = max(abs(a - b) for a, b in zip(cached.losses, online.losses))
    print(f"cache vs online, 4 steps: losses {cached.losses} / {online.losses}; max |diff| {diff:.2e}")
    assert len(cached.losses) == 4 and diff <= 1e-4


def test_instruction_text_changes_identity_and_gates(setup, tmp_path):
    root, folder = setup
    other = tmp_path / "instructions.json"
    other.write_text(json.dumps({"semseg": "Colour every region by what it is."}))
    a = train_tiger(_cfg(root, folder, "ia", steps=1, cf_weight=0.1))
    b = train_tiger(_cfg(root, folder, "ib", steps=1, cf_weight=0.1, instructions=str(other)))
    ia = json.loads((root / "ia/config.json").read_text())["instructions"]
    ib = json.loads((root / "ib/config.json").read_text())["instructions"]
    assert ia["texts_sha256"] != ib["texts_sha256"] and ib["texts"]["semseg"].startswith("Colour")
    assert ia["texts"]["normals"] == ib["texts"]["normals"]
    ga, gb = a.records[0]["routing"], b.records[0]["routing"]
    assert ga["0/semseg"]["gate"] != pytest.approx(gb["0/semseg"]["gate"], abs=1e-6)
    assert ga["0/normals"]["gate"] == pytest.approx(gb["0/normals"]["gate"], abs=1e-6)  # same sentence


def test_bad_options_are_refused(setup, tmp_path):
    root, folder = setup
    with pytest.raises(SakError, match="one of --cache"):
        train_tiger(_cfg(root, folder, "x", online=True, cache=str(root / "s2"), teachers=("clip_tiny",)))
    with pytest.raises(SakError, match="holds 12 epochs"):
        train_tiger(_cfg(root, folder, "x", steps=STEPS + 1))
    with pytest.raises(SakError, match="crop"):
        train_tiger(_cfg(root, folder, "x", img_size=(64, 64)))
    bad = tmp_path / "bad.json"
    bad.write_text("[1, 2]")
    with pytest.raises(SakError, match="--instructions"):
        train_tiger(_cfg(root, folder, "x2", instructions=str(bad)))
    with pytest.raises(SakError, match="already holds a run"):
        train_tiger(_cfg(root, folder, "c4", steps=4))
    args = ["stage2", "--dataset", "folder", "--data-root", str(folder), "--out", str(tmp_path / "s")]
    assert cache_main(args) == 2  # neither --init nor --teachers


@pytest.mark.slow
def test_ray_built_stage2_cache_resumes_after_kill_9(setup, tmp_path):
    """`sak-cache stage2 --workers 1` (a Ray actor) killed with SIGKILL after its first journaled shard:
    the re-run keeps the finished shards, completes, verifies, and equals an uninterrupted build."""
    import os
    import signal
    import subprocess
    import sys
    import time

    root, folder = setup
    out = tmp_path / "killed"
    args = ["stage2", "--dataset", "folder", "--data-root", str(folder), "--teachers", TEACHERS,
            "--epochs", "12", "--img-size", f"{CROP[0]}x{CROP[1]}", "--codec", "fp32", "--shard-size", "4",
            "--batch-size", "4", "--device", "cpu"]  # fmt: skip
    code = "import sys; from sak.cli.cache import main; sys.exit(main(sys.argv[1:]))"
    proc = subprocess.Popen(
        [sys.executable, "-c", code, *args, "--out", str(out), "--workers", "1"],
        start_new_session=True,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    journal = out / "teachers/sam_tiny/shards.jsonl"
    try:
        deadline = time.time() + 240
        while time.time() < deadline and not (journal.exists() and journal.read_text().count("\n") >= 1):
            assert proc.poll() is None, "the build ended before it could be killed"
            time.sleep(0.2)
        os.killpg(proc.pid, signal.SIGKILL)  # the build and the Ray it started
    finally:
        proc.wait(timeout=60)
    kept = journal.read_text().splitlines()
    assert 1 <= len(kept) < 12 and not json.loads((out / "cache.json").read_text())["complete"]
    assert cache_main([*args, "--out", str(out), "--workers", "1"]) == 0
    assert journal.read_text().splitlines()[: len(kept)] == kept  # finished shards not redone
    assert check_cache(out).problems == []
    clean = tmp_path / "clean"
    assert cache_main([*args, "--out", str(clean)]) == 0
    a, b = (json.loads((p / "cache.json").read_text()) for p in (out, clean))
    assert [t["shards"] for t in a["teachers"]] == [t["shards"] for t in b["teachers"]]
    assert a["views_sha256"] == b["views_sha256"]
    print(f"killed after {len(kept)} of 12 shards; resumed, verified, equal to an uninterrupted build")


def test_sampled_counterfactual_is_exact_on_its_experts(trained):
    """--cf-experts K: c of the sampled experts equals the full pass's; the term is KL over the subset
    (gates renormalised on it); a short run logs which experts each (level, task) drew."""
    from sak.student.train.counterfactual import sample_experts

    root, folder, _ = trained
    model = load_tiger(root / "run").model
    model.train()
    maps, targets = _batch(root, folder, model)
    out = model(maps, CROP)
    full = expert_contributions(model, out, targets, CROP)
    sampled = sample_experts(list(out.gates), 12, 4, seed=0, step=7)
    part = expert_contributions(model, out, targets, CROP, sampled)
    for key, idx in sampled.items():
        assert len(idx) == 4 and torch.allclose(part[key], full[key][idx], atol=1e-6)
    cf, logged = counterfactual_loss(model, out, targets, CROP, 0.1, sampled)
    terms = []
    for (lvl, task), idx in sampled.items():
        q = torch.softmax(part[(lvl, task)] / 0.1, 0)
        g = out.gates[(lvl, task)].mean((0, 1))[idx]
        terms.append((q * (q.clamp_min(1e-12).log() - (g / g.sum()).log())).sum())
        assert logged[f"{lvl}/{task}"]["sampled"] == idx
    assert float(cf.detach()) == pytest.approx(float(torch.stack(terms).mean().detach()), rel=1e-5)
    run = train_tiger(_cfg(root, folder, "k3", steps=2, cf_experts=3))
    for v in run.records[-1]["routing"].values():
        assert len(v["sampled"]) == len(v["c"]) == 3 and len(v["gate"]) == 12
