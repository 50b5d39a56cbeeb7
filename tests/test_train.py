"""Stage-1 training: cached targets give the losses live teachers give, it learns, it resumes exactly,
and a run leaves its metrics, config and checkpoints behind."""

from __future__ import annotations

import json
import logging
import shutil

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from sak.cli.train import main as train_main
from sak.pipeline.base.errors import SakError
from sak.pipeline.extraction.config import ExtractConfig
from sak.pipeline.extraction.driver import run_extraction
from sak.pipeline.format.documents import read_cache
from sak.pipeline.store.codecs import get_codec
from sak.student.data.opening import open_cache
from sak.student.run.harness import RunRequest
from sak.student.train.stage1 import build_student_for, train_stage1
from sak.student.train.stage1_config import Stage1Config, resolve_schedule

SIZE = 64
TEACHERS = ("dinov2_tiny", "clip_tiny", "sam_tiny")
FP16_BOUND = 3e-5  # measured on CPU: 3.1e-6 max relative loss difference over 6 steps (10x headroom)
INT8_BOUND = 7.5e-4  # measured on CPU: 7.5e-5 (int8, one scale per 32 channels; 10x headroom)


def _extract(photo_dir, out, codec):
    cfg = ExtractConfig(
        source=str(photo_dir), out=str(out), teachers=TEACHERS, views_per_image=2, size=SIZE, shard_size=4,
        codec=codec, progress=False,
    )  # fmt: skip
    return run_extraction(cfg)


pytestmark = pytest.mark.usefixtures("one_thread")  # see conftest.py


@pytest.fixture(scope="module")
def cache32(tiny_caches):
    return tiny_caches.get("fp32", teachers=TEACHERS)


@pytest.fixture(scope="module")
def cache16(tiny_caches):
    return tiny_caches.get("fp16", teachers=TEACHERS)


def _cfg(cache, out, **kw) -> Stage1Config:
    base = dict(steps=6, batch_size=4, eval_every=0, eval_batch_size=4)
    return Stage1Config.debug(str(cache), str(out), **{**base, **kw})


def _relative(a, b):
    a, b = np.asarray(a), np.asarray(b)
    return float(np.max(np.abs(a - b) / np.abs(b)))


def test_cached_fp32_targets_give_the_losses_of_live_teachers(cache32, tmp_path):
    cached = train_stage1(_cfg(cache32, tmp_path / "cached"))
    keys = []
    online = train_stage1(
        _cfg(cache32, tmp_path / "online", online=True), on_step=lambda s, b, r: keys.append(set(b))
    )
    assert all("targets" not in k and "views" in k for k in keys)  # no cached target was read
    assert len(cached.losses) == len(online.losses) == 6
    rel = _relative(cached.losses, online.losses)
    print(f"fp32 cache vs online: max relative loss difference {rel:.2e} over 6 steps")
    assert rel <= 1e-4
    assert cached.losses[0] != cached.losses[1]  # the steps did something


def test_fp16_cache_stays_within_the_measured_bound(cache16, tmp_path):
    cached = train_stage1(_cfg(cache16, tmp_path / "cached"))
    online = train_stage1(_cfg(cache16, tmp_path / "online", online=True))
    rel = _relative(cached.losses, online.losses)
    print(f"fp16 cache vs online: max relative loss difference {rel:.2e} over 6 steps")
    assert rel <= FP16_BOUND
    assert rel > 0  # fp16 storage does round the targets


def test_it_learns(cache16, tmp_path):
    result = train_stage1(
        _cfg(cache16, tmp_path / "run", steps=50, warmup_steps=5, report_repsim=True, holdout_shards=1)
    )
    first, last = result.losses[0], float(np.mean(result.losses[-5:]))
    before = float(np.mean(list(result.repsim_before.values())))
    after = float(np.mean(list(result.repsim_after.values())))
    print(f"loss {first:.3f} -> {last:.3f}; Rep Sim {result.repsim_before} -> {result.repsim_after}")
    assert last < 0.6 * first
    assert after > before + 0.1


def test_resume_gives_the_uninterrupted_losses(cache16, tmp_path):
    kw = dict(steps=8, num_workers=2, batch_size=3, warmup_steps=2, grad_clip=1.0)
    whole = train_stage1(_cfg(cache16, tmp_path / "whole", **kw))
    part = train_stage1(_cfg(cache16, tmp_path / "part", **kw), RunRequest(stop_after=3))
    assert part.step == 3 and part.repsim_after is None
    rest = train_stage1(_cfg(cache16, tmp_path / "part", **kw), RunRequest(resume=True))
    assert rest.step == 8 and len(rest.losses) == 5
    assert part.losses + rest.losses == whole.losses  # bit-exact
    a = load_file(str(tmp_path / "whole/checkpoint/model.safetensors"))
    b = load_file(str(tmp_path / "part/checkpoint/model.safetensors"))
    assert all(torch.equal(a[k], b[k]) for k in a)
    config = json.loads((tmp_path / "part/config.json").read_text())
    assert config["resumed"][0]["step"] == 3
    steps = [json.loads(x)["step"] for x in (tmp_path / "part/metrics.jsonl").read_text().splitlines()]
    assert steps == [1, 2, 3, 4, 5, 6, 7, 8, 8]  # train records, then the final eval


def test_run_folder_holds_metrics_config_and_checkpoint(cache16, tmp_path):
    run = tmp_path / "run"
    train_stage1(_cfg(cache16, run, steps=4, eval_every=2, tensorboard=True))
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in records if r["kind"] == "train"]
    evals = [r for r in records if r["kind"] == "eval"]
    assert [r["step"] for r in train] == [1, 2, 3, 4] and [r["step"] for r in evals] == [2, 4]
    for field in ("loss", "lr", "samples_per_s", "data_wait_fraction", "grad_norm", "epoch"):
        assert all(field in r for r in train), field
    for t in TEACHERS:
        assert all(f"loss/{t}/L{i}" in train[0] for i in range(4))
        assert f"repsim/{t}" in evals[-1]
    assert 0 <= train[-1]["data_wait_fraction"] <= 1
    terms = sum(v for k, v in train[0].items() if k.startswith("loss/"))
    assert terms == pytest.approx(train[0]["loss"], rel=1e-5)
    assert list((run / "tb").iterdir())  # TensorBoard event file
    ckpt = run / "checkpoint"
    for name in ("model.safetensors", "model.json", "state.safetensors", "state.json"):
        assert (ckpt / name).is_file(), name
    model = json.loads((ckpt / "model.json").read_text())
    assert (
        model["run"] == "stage1" and model["student"]["name"] == "tiny" and model["student"]["type"] == "sak"
    )
    assert model["step"] == 4 and model["code_version"]
    state = json.loads((ckpt / "state.json").read_text())
    assert state["loader"]["batches"] == 4 and state["scheduler"]["last_epoch"] == 4
    config = json.loads((run / "config.json").read_text())
    assert config["config"]["normalization"] == "student" and config["code_version"]
    assert config["config"]["steps"] == 4 and config["schema_version"] == 1
    assert config["resolved"]["total_steps"] == 4 and config["resolved"]["holdout_views"] == 4


def test_schedule_warmup_and_cosine(cache16):
    cfg = Stage1Config(cache=str(cache16), out="x", epochs=3, batch_size=2)
    s = resolve_schedule(cfg, samples_per_epoch=8)  # 4 steps per epoch
    assert (s.total_steps, s.warmup_steps) == (12, 8)  # two warm-up epochs
    assert s.factor(0) == pytest.approx(1 / 8) and s.factor(7) == pytest.approx(1.0)
    assert s.factor(11) == pytest.approx(0.5 * (1 + np.cos(np.pi * 3 / 4)))  # cosine over steps 8..12
    assert all(s.factor(i) > s.factor(i + 1) for i in range(8, 11))
    by_steps = resolve_schedule(Stage1Config(cache="c", out="x", steps=100, batch_size=2), 8000)
    assert by_steps.warmup_steps == 10  # 2 epochs would be 8000 steps: capped at 10% of --steps


def test_init_from_the_paper_layout(cache16, tmp_path):
    cfg = _cfg(cache16, tmp_path / "run")
    index = open_cache(cache16)
    source = build_student_for(cfg, index)
    family = {"dinov2_tiny": "dinov2", "clip_tiny": "clip", "sam_tiny": "sam"}
    paper = {}
    for k, v in source.state_dict().items():
        head, _, rest = k.partition(".")
        if head == "stem":
            paper[f"vit.{rest}"] = v
        elif head == "adapter_paths":
            t, _, tail = rest.partition(".")
            paper[f"tsap.{family[t]}.{tail}"] = v
        else:  # level_norms.<teacher>.<block>.<param>
            t, block, param = rest.split(".")
            paper[f"out_norms.{block}_{family[t]}.{param}"] = v
    path = tmp_path / "paper.safetensors"
    save_file({k: v.contiguous() + 0.5 for k, v in paper.items()}, str(path))
    loaded = build_student_for(Stage1Config.debug(str(cache16), "x", init_paper=str(path), seed=9), index)
    for k, v in source.state_dict().items():
        assert torch.equal(loaded.state_dict()[k], v + 0.5), k


@pytest.fixture
def sak_log_handlers():
    """The CLI attaches a handler to the "sak" logger bound to the (captured) stderr of the moment: take it
    off afterwards, or later tests log into a closed stream."""
    logger = logging.getLogger("sak")
    handlers, level, propagate = logger.handlers[:], logger.level, logger.propagate
    yield
    logger.handlers[:], logger.propagate = handlers, propagate
    logger.setLevel(level)


def test_cli_stage1_report_and_repsim(cache16, tmp_path, capsys, sak_log_handlers):
    run = str(tmp_path / "run")
    args = ["stage1", "--cache", str(cache16), "--student", "tiny", "--steps", "3", "--batch-size", "4"]
    rc = train_main([*args, "--out", run, "--report-repsim", "--num-workers", "0", "--no-tensorboard"])
    out = capsys.readouterr().out
    assert rc == 0, out
    assert "Rep Sim on 4 held-out views" in out and all(t in out for t in TEACHERS)
    assert train_main(["repsim", "--checkpoint", run, "--cache", str(cache16)]) == 0
    out = capsys.readouterr().out
    assert all(t in out for t in TEACHERS)
    # refusals: one line, exit 2
    assert train_main([*args, "--out", run]) == 2
    assert "already holds a run" in capsys.readouterr().err
    assert train_main(["stage1", "--resume", run, "--seed", "3"]) == 2
    assert "--seed 3 differs from the run's 0" in capsys.readouterr().err
    assert train_main([*args, "--epochs", "1", "--out", str(tmp_path / "r2")]) == 2
    assert "exactly one of --steps and --epochs" in capsys.readouterr().err
    # --resume with the recorded options, the length extended to 5 steps (and stopped once after 4)
    assert train_main(["stage1", "--resume", run, "--steps", "5", "--stop-after", "4"]) == 0
    assert "stopped at step 4/5" in capsys.readouterr().out
    assert train_main(["stage1", "--resume", run]) == 0
    assert "trained 5 steps" in capsys.readouterr().out


def test_a_store_of_some_levels_trains_those_taps_only(cache32, tmp_path):
    """A store that keeps taps 1 and 3 (`--levels 1,3`): the student's maps at those taps meet it, cached
    and online alike."""
    copy = tmp_path / "cache"
    shutil.copytree(cache32, copy)
    meta = json.loads((copy / "cache.json").read_text())
    fp = next(fp for fp, e in meta["stores"].items() if e["teacher"] == "dinov2_tiny")
    path = copy / meta["stores"][fp]["path"] / "manifest.json"
    manifest = json.loads(path.read_text())
    manifest["levels"] = [manifest["levels"][1], manifest["levels"][3]]
    path.write_text(json.dumps(manifest))
    kw = dict(steps=3, teachers=("dinov2_tiny",))
    cached = train_stage1(_cfg(copy, tmp_path / "cached", **kw))
    online = train_stage1(_cfg(copy, tmp_path / "online", online=True, **kw))
    assert _relative(cached.losses, online.losses) <= 1e-4
    record = json.loads((tmp_path / "cached/metrics.jsonl").read_text().splitlines()[0])
    assert sorted(k for k in record if k.startswith("loss/")) == [
        "loss/dinov2_tiny/L1",
        "loss/dinov2_tiny/L3",
    ]


def test_int8_cache_trains_close_to_online(tiny_caches, tmp_path):
    """Quantised targets (int8, one scale per 32 channels) are dequantised on the training device."""
    try:
        get_codec("int8")
    except SakError:
        pytest.skip("this build has no int8 codec")
    cache = tiny_caches.get("int8", teachers=TEACHERS)
    cached = train_stage1(_cfg(cache, tmp_path / "cached"))
    online = train_stage1(_cfg(cache, tmp_path / "online", online=True))
    rel = _relative(cached.losses, online.losses)
    print(f"int8 cache vs online: max relative loss difference {rel:.2e} over 6 steps")
    assert 0 < rel <= INT8_BOUND


def test_stored_student_views_train_like_decoded_ones_and_like_online(tiny_caches, tmp_path):
    """--student-views raw: the loader reads the stored pixels instead of decoding and cutting; the cached
    run gives the losses of the decoding one exactly, and those of live teachers (fp32 targets)."""

    copy = tiny_caches.copy(tmp_path / "raw", codec="fp32", teachers=TEACHERS)
    run_extraction(
        ExtractConfig(
            views_per_image=2, source=None, out=str(copy), teachers=TEACHERS, size=64, shard_size=4, codec="fp32",
            student_views="raw", progress=False,
        )
    )  # fmt: skip
    assert read_cache(copy).student_views is not None
    raw = train_stage1(_cfg(copy, tmp_path / "cached-raw"))
    decoded = train_stage1(_cfg(tiny_caches.get("fp32", teachers=TEACHERS), tmp_path / "cached"))
    online = train_stage1(_cfg(copy, tmp_path / "online", online=True))
    assert raw.losses == decoded.losses
    assert _relative(raw.losses, online.losses) <= 1e-4
