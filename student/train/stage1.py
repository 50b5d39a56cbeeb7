"""Stage 1 of SAK: distil the selected teachers into the student, from the cache (or from live teachers).

    CacheLoader -> images (B, 3, S, S) float32 + targets {teacher: [(B, H, W, C)]} in the stored dtype
      | online: the same rows cut at each teacher's side -> the teachers rebuilt from the store manifests
    student(images).distill_maps {teacher: [(B, C_t, h, w)]}                (bf16 autocast on CUDA)
    distillation_loss: sum over teachers and levels of 0.9 (1 - cos) + 0.1 smoothL1
    AdamW (lr 1e-3, wd 0.01) -> optional grad clipping -> linear warm-up, then cosine to min_lr
    every step: RUN/metrics.jsonl (+ RUN/tb); every eval_every steps and at the end: Rep Sim, held out
    RUN/checkpoint/  student.safetensors + student.json          weights, student config, code version
                     train_state.safetensors                       optimizer tensors, RNG states
                     train_state.json                              step, optimizer groups, scheduler, loader
    RUN/config.json  the resolved run (config, schedule, cache, stores, world size, code version)

Under `torchrun --nproc_per_node=N` each rank trains on its own shards (DDP; gloo on CPU, NCCL on CUDA).
This file holds the loop; its parts live beside it: the options in stage1_config.py, the targets (cached
or live teachers) in online.py, Rep Sim in evaluate.py, the run's checkpoints in checkpoint.py; the data
order and the loader in ../data/ (order.py, loader.py).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from sak.pipeline.base.errors import SakError
from sak.pipeline.base.provenance import code_version, now_iso, read_json, write_json_atomic
from sak.student.data.index import CacheIndex
from sak.student.data.loader import (
    BatchReader,
    CacheLoader,
    eval_batches,
    input_normalization,
    open_cache,
)
from sak.student.data.order import StreamPlan, holdout_rows, make_stream_plan
from sak.student.model.student import SakStudent, StudentConfig, TeacherTarget
from sak.student.model.weights import load_paper_checkpoint
from sak.student.train.checkpoint import (
    CHECKPOINT_DIR,
    RUN_CONFIG,
    checkpoint_dir,
    load_checkpoint,
    save_checkpoint,
)
from sak.student.train.distributed import (
    DistEnv,
    all_reduce_mean,
    barrier,
    bf16_autocast,
    init_distributed,
    shutdown,
)
from sak.student.train.evaluate import evaluate_repsim
from sak.student.train.losses import clip_gradients, distillation_loss
from sak.student.train.online import OnlineTeachers, cached_targets, stored_levels
from sak.student.train.stage1_config import RESUMABLE, Schedule, Stage1Config, resolve_schedule

log = logging.getLogger("sak")

METRICS = "metrics.jsonl"


# -------------------------------------------------------------------------------------------- logging


class MetricsLog:
    """One JSON line per record in RUN/metrics.jsonl, and the numbers to TensorBoard when installed."""

    def __init__(self, run: Path, enabled: bool, tensorboard: bool) -> None:
        self.file = open(run / METRICS, "a") if enabled else None
        self.tb = None
        if enabled and tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter

                self.tb = SummaryWriter(str(run / "tb"))
            except ImportError:
                log.info("tensorboard is not installed: metrics go to metrics.jsonl only")

    def write(self, record: dict) -> None:
        if self.file is None:
            return
        self.file.write(json.dumps(record) + "\n")
        self.file.flush()
        if self.tb is not None:
            prefix = "eval/" if record.get("kind") == "eval" else "train/"
            for k, v in record.items():
                if isinstance(v, (int, float)) and not isinstance(v, bool) and k not in ("step", "kind"):
                    self.tb.add_scalar(prefix + k, v, record["step"])

    def close(self) -> None:
        if self.file is not None:
            self.file.close()
        if self.tb is not None:
            self.tb.close()


def _format_repsim(sims: dict[str, float]) -> str:
    return ", ".join(f"{t} {v:.4f}" for t, v in sims.items())


# -------------------------------------------------------------------------------------------- training


@dataclass
class Stage1Result:
    """What a call to train_stage1 did (this session only, when resumed)."""

    run: Path
    step: int  # steps done in total
    total_steps: int
    losses: list[float] = field(default_factory=list)  # per step of this session (mean over ranks)
    repsim_before: dict[str, float] | None = None
    repsim_after: dict[str, float] | None = None
    eval_views: int = 0
    skipped_shards: list[int] = field(default_factory=list)  # damaged shards left out (--skip-bad-shards)
    skipped_samples: int = 0  # cache rows (views) of those shards: never trained on or evaluated
    checkpoint: Path | None = None
    model: SakStudent | None = field(default=None, repr=False)  # the trained student (not DDP-wrapped)


def build_student_for(cfg: Stage1Config, index: CacheIndex) -> SakStudent:
    """The student with one adapter path per selected store, built at the cache's view size."""
    # model initialisation from --seed, through a derived seed: a random-init teacher of the same timm
    # family made with the same seed would otherwise start out (almost) equal to the student
    torch.manual_seed(
        int.from_bytes(hashlib.sha256(f"sak-student-init:{cfg.seed}".encode()).digest()[:7], "little")
    )
    config = StudentConfig(
        name=cfg.student,
        teachers=tuple(TeacherTarget(s.teacher, s.dim) for s in index.stores),
        img_size=cfg.img_size or index.plan.size,
        pretrained=cfg.pretrained,
        use_kernels=bool(cfg.use_kernels),
    )
    model = SakStudent(config)
    if cfg.grad_checkpointing:
        model.set_grad_checkpointing(True)
    if cfg.init_paper:
        mapping = dict(cfg.paper_teachers) or {s.manifest.teacher.family: s.teacher for s in index.stores}
        load_paper_checkpoint(model, cfg.init_paper, mapping)
    return model


def cpu_compute_threads(loader_workers: int) -> int:
    """Compute threads of one CPU training process: its share of the cores, minus its loader workers."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    per_process = cores // max(1, int(os.environ.get("LOCAL_WORLD_SIZE", "1")))
    return max(1, per_process - loader_workers)


def _without_shards(plan: StreamPlan, bad: dict[int, list[str]], world_size: int) -> StreamPlan:
    """The plan with the damaged shards left out of training (fewer streams if too few shards remain)."""
    if not bad:
        return plan
    kept = tuple(s for s in plan.train_shards if s not in bad)
    if len(kept) < world_size:
        raise SakError(
            f"--skip-bad-shards: {len(plan.train_shards) - len(kept)} of {len(plan.train_shards)} training "
            f"shard(s) are damaged and too few remain for {world_size} process(es); run `sak-cache verify`"
        )
    return dataclasses.replace(plan, train_shards=kept, streams=min(plan.streams, len(kept) // world_size))


def _check_resume(run: Path, cfg: Stage1Config, env: DistEnv, index: CacheIndex) -> None:
    recorded = read_json(run / RUN_CONFIG)
    old, new = recorded["stage1"], cfg.to_dict()
    diff = sorted(k for k in set(old) | set(new) if k not in RESUMABLE and old.get(k) != new.get(k))
    if diff:
        detail = "; ".join(f"{k}: run has {old.get(k)!r}, now {new.get(k)!r}" for k in diff)
        raise SakError(f"--resume {run}: options differ from the recorded run ({detail})")
    if recorded["resolved"]["world_size"] != env.world_size:
        raise SakError(
            f"--resume {run}: the run used {recorded['resolved']['world_size']} process(es), this launch has "
            f"{env.world_size}; the data order depends on it"
        )
    was = recorded["cache"]
    now = {
        "dataset_fingerprint": index.cache.dataset.fingerprint,
        "views_sha256": index.cache.views.sha256,
        "stores": [s.fingerprint for s in index.stores],
    }
    if [was["dataset_fingerprint"], was["views_sha256"], [s["fingerprint"] for s in was["stores"]]] != list(
        now.values()
    ):
        raise SakError(
            f"--resume {run}: {cfg.cache} is not the cache (or store selection) the run was trained on"
        )


def train_stage1(
    cfg: Stage1Config, *, resume: bool = False, on_step: Callable[[int, dict, dict], None] | None = None
) -> Stage1Result:
    """Train (or, with resume=True, continue) a stage-1 run; on_step(step, batch, record) after each step."""
    cfg.validate()
    env = init_distributed(cfg.device)
    try:
        result = _train(cfg, env, resume, on_step)
    except BaseException:
        shutdown(env, wait=False)  # the other ranks may never reach a barrier
        raise
    shutdown(env)
    return result


@dataclass
class _Session:
    """Everything one stage-1 training session works with, built once by `_set_up`."""

    cfg: Stage1Config
    env: DistEnv
    run: Path
    index: CacheIndex
    model: SakStudent
    train_model: torch.nn.Module  # the model, DDP-wrapped under torchrun
    online: OnlineTeachers | None
    reader: BatchReader
    plan: StreamPlan
    loader: CacheLoader
    schedule: Schedule
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    targets_of: Callable[[dict], dict[str, list[torch.Tensor]]]
    eval_rows: np.ndarray  # held-out cache rows Rep Sim is measured on (damaged shards left out)
    bad: dict[int, list[str]]  # damaged shard -> problems (--skip-bad-shards)
    skipped_samples: int
    level_names: dict[str, str]  # loss term name (list index) -> name by tap position
    input_mean: tuple[float, ...]
    input_std: tuple[float, ...]
    step: int = 0

    @property
    def device(self) -> torch.device:
        return self.env.device


def _check_run_folder(run: Path, cfg: Stage1Config, env: DistEnv, resume: bool) -> None:
    if resume:
        checkpoint_dir(run)
    elif (run / CHECKPOINT_DIR).exists() or (run / RUN_CONFIG).exists():
        raise SakError(f"{run} already holds a run; pass --resume {run} to continue it, or another --out")
    if cfg.batch_size % env.world_size:
        raise SakError(f"--batch-size {cfg.batch_size} is not divisible by the {env.world_size} processes")


def _set_up(cfg: Stage1Config, env: DistEnv, resume: bool) -> _Session:
    """The run folder checked, the cache opened, the model, data order, loader and optimizer built (and,
    with resume, restored from the checkpoint)."""
    device, run = env.device, Path(cfg.out).expanduser()
    _check_run_folder(run, cfg, env, resume)
    index = open_cache(
        cfg.cache,
        cfg.teachers,
        not cfg.online,
        local_cache=cfg.local_cache,
        local_cache_gb=cfg.local_cache_gb,
    )
    if resume:
        _check_resume(run, cfg, env, index)
    mean, std = input_normalization(cfg.normalization, cfg.student)
    model = build_student_for(cfg, index).to(device)
    model.use_kernels = _uses_kernels(cfg)  # fused adapters; the loss follows the same flag
    online = OnlineTeachers(index.stores, index.plan.size, device) if cfg.online else None
    reader = BatchReader(
        index,
        model.config.img_size,
        mean,
        std,
        with_targets=online is None,
        view_sides=online.sides if online else (),
    )
    plan = make_stream_plan(
        index,
        cfg.batch_size // env.world_size,
        seed=cfg.seed,
        world_size=env.world_size,
        rank=env.rank,
        num_workers=cfg.num_workers,
        shuffle_window=cfg.shuffle_window,
        holdout_shards=cfg.holdout_shards,
    )
    bad = reader.integrity.bad_shards(range(index.num_shards)) if cfg.skip_bad_shards else {}
    plan = _without_shards(plan, bad, env.world_size)
    loader = CacheLoader(plan, reader, num_workers=cfg.num_workers, pin_memory=device.type == "cuda")
    schedule = resolve_schedule(cfg, plan.samples_per_epoch)
    optimizer = torch.optim.AdamW(
        model.parameters(), lr=cfg.lr, betas=cfg.betas, weight_decay=cfg.weight_decay
    )
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, schedule.factor)
    step = load_checkpoint(run, model, optimizer, scheduler, loader, device) if resume else 0
    eval_rows = holdout_rows(index, cfg.holdout_shards)
    eval_rows = eval_rows[~np.isin(eval_rows // index.shard_size, list(bad))]
    return _Session(
        cfg=cfg,
        env=env,
        run=run,
        index=index,
        model=model,
        train_model=model,
        online=online,
        reader=reader,
        plan=plan,
        loader=loader,
        schedule=schedule,
        optimizer=optimizer,
        scheduler=scheduler,
        targets_of=online if online is not None else cached_targets(index.stores, device),
        eval_rows=eval_rows,
        bad=bad,
        skipped_samples=sum(len(reader.integrity.shard_rows(s)) for s in bad),
        # loss terms are named by list index; log them by tap position (they differ for --levels stores)
        level_names={
            f"{s.teacher}/L{i}": f"{s.teacher}/L{p}" for s in index.stores for i, p in enumerate(s.positions)
        },
        input_mean=mean,
        input_std=std,
        step=step,
    )


def _uses_kernels(cfg: Stage1Config) -> bool:
    """Opt-in: the torch path is the default until a GPU run shows the kernels beating torch.compile at
    the real shapes (README, "Kernels")."""
    return bool(cfg.use_kernels)


def _run_record(s: _Session, resume: bool) -> dict:
    """RUN/config.json: the resolved run (config, schedule, cache, stores, world size, code version)."""
    cfg, index, plan = s.cfg, s.index, s.plan
    record = {
        "kind": "sak-stage1-run",
        "stage1": cfg.to_dict(),
        "student": s.model.config.to_dict(),
        "resolved": {
            **dataclasses.asdict(s.schedule),
            "world_size": s.env.world_size,
            "batch_per_rank": plan.batch_size,
            "streams_per_rank": plan.streams,
            "train_shards": len(plan.train_shards),
            "samples_per_epoch": plan.samples_per_epoch,
            "holdout_views": int(s.eval_rows.size),
            "skipped_shards": sorted(s.bad),
            "skipped_samples": s.skipped_samples,
            "input_mean": list(s.input_mean),
            "input_std": list(s.input_std),
            "img_size": s.model.config.img_size,
            "device": str(s.device),
        },
        "cache": {  # lineage: where the cache is, and exactly which store manifests were read
            "path": index.remote or str(index.root),
            "url": index.remote,
            "dataset_fingerprint": index.cache.dataset.fingerprint,
            "views_sha256": index.cache.views.sha256,
            "view_plan": index.cache.view_plan.to_dict(),
            "stores": [
                {
                    "fingerprint": st.fingerprint,
                    "teacher": st.teacher,
                    "codec": st.codec.name,
                    "manifest_sha256": index.cache.stores[st.fingerprint].manifest_sha256,
                }
                for st in index.stores
            ],
        },
        "code_version": code_version(),
        "created": now_iso(),
    }
    if resume:
        prev = read_json(s.run / RUN_CONFIG)
        record["created"] = prev.get("created", record["created"])
        record["resumed"] = [*prev.get("resumed", []), {"step": s.step, "at": now_iso()}]
    return record


def _start_run(s: _Session, resume: bool) -> MetricsLog:
    """Write the run record, wrap the model for DDP, and open the metrics log (on resume, without the
    records of steps after the checkpoint)."""
    if s.env.is_main:
        s.run.mkdir(parents=True, exist_ok=True)
        write_json_atomic(s.run / RUN_CONFIG, _run_record(s, resume))
    barrier(s.env)
    if s.env.distributed:
        from torch.nn.parallel import DistributedDataParallel as DDP

        s.train_model = DDP(s.model, device_ids=[s.device.index] if s.device.type == "cuda" else None)
    metrics_file = s.run / METRICS
    if resume and s.env.is_main and metrics_file.exists():  # drop records of steps after the checkpoint
        lines = metrics_file.read_text().splitlines()
        kept = [line for line in lines if line.strip() and json.loads(line)["step"] <= s.step]
        metrics_file.write_text("".join(line + "\n" for line in kept))
    return MetricsLog(s.run, s.env.is_main, s.cfg.tensorboard)


def _report_skipped(s: _Session, metrics: MetricsLog) -> None:
    if not s.bad:
        return
    problems = [f"shard {n}: {'; '.join(p)}" for n, p in sorted(s.bad.items())]
    metrics.write(
        {
            "kind": "skipped",
            "step": s.step,
            "skipped_shards": sorted(s.bad),
            "skipped_samples": s.skipped_samples,
            "problems": problems,
        }
    )
    if s.env.is_main:
        log.warning(
            f"--skip-bad-shards: skipping {len(s.bad)} damaged shard(s), {s.skipped_samples} samples (views) "
            f"never trained on or evaluated; run `sak-cache verify {s.cfg.cache}`: {' | '.join(problems)}"
        )


def _log_start(s: _Session) -> None:
    if s.eval_rows.size == 0:
        log.warning("--holdout-shards 0: nothing is held out, Rep Sim is not reported")
    cfg, schedule = s.cfg, s.schedule
    log.info(
        f"stage 1: {cfg.student} <- {', '.join(st.teacher for st in s.index.stores)} "
        f"({'online teachers' if s.online else 'cached targets'}), {schedule.total_steps} steps of "
        f"{cfg.batch_size} ({schedule.steps_per_epoch:.2f} steps/epoch, warm-up {schedule.warmup_steps}), "
        f"{s.env.world_size} process(es) on {s.device}, run {s.run}"
    )


def _evaluate(s: _Session, metrics: MetricsLog, result: Stage1Result, when: str) -> dict[str, float] | None:
    """Rep Sim on the held-out rows, written to the metrics log (None when nothing is held out)."""
    if not s.eval_rows.size:
        return None
    cfg, env = s.cfg, s.env
    batches = eval_batches(s.reader, s.eval_rows, cfg.eval_batch_size, env.rank, env.world_size)
    sims, n = evaluate_repsim(s.model, batches, s.targets_of, s.index.stores, s.device, env)
    metrics.write(
        {
            "kind": "eval",
            "step": s.step,
            **{f"repsim/{t}": v for t, v in sims.items()},
            "repsim_mean": float(np.mean(list(sims.values()))),
            "eval_views": n,
        }
    )
    result.eval_views = n
    if env.is_main:
        log.info(f"Rep Sim {when} ({n} held-out views): {_format_repsim(sims)}")
    return sims


def _train_step(s: _Session, batch: dict) -> tuple[list[float], list[str]]:
    """One optimizer step on `batch`: ([loss, grad norm, *terms] averaged over ranks, term names)."""
    images = batch["images"].to(s.device, non_blocking=True)  # (B, 3, S, S)
    targets = s.targets_of(batch)  # {teacher: [(B, H, W, C)]}
    with bf16_autocast(s.device):
        maps = stored_levels(s.train_model(images).distill_maps, s.index.stores)  # {t: [(B, C_t, h, w)]}
        loss, terms = distillation_loss(maps, targets, use_kernels=s.model.use_kernels)
    s.optimizer.zero_grad(set_to_none=True)
    loss.backward()
    grad_norm = clip_gradients(s.model.parameters(), s.cfg.grad_clip)
    s.optimizer.step()
    s.scheduler.step()
    s.step += 1
    values = torch.stack([loss.detach().float(), grad_norm.float(), *(v.float() for v in terms.values())])
    return all_reduce_mean(values, s.env).tolist(), list(terms)  # note: host-device sync, once per step


def _step_record(s: _Session, values: list[float], terms: list[str], lr: float, times: tuple) -> dict:
    t_start, t0, t1, t2 = times  # session start, step start, batch ready, step done
    return {
        "kind": "train",
        "step": s.step,
        "epoch": round(s.loader.epoch, 4),
        "loss": values[0],
        **{f"loss/{s.level_names[k]}": v for k, v in zip(terms, values[2:])},
        "lr": lr,
        "grad_norm": values[1],
        "samples_per_s": s.cfg.batch_size / (t2 - t0),
        "data_wait_fraction": (t1 - t0) / (t2 - t0),
        "step_time_s": t2 - t0,
        "elapsed_s": t2 - t_start,
    }


def _log_step(s: _Session, record: dict) -> None:
    if s.env.is_main and (s.step % max(1, s.cfg.log_every) == 0 or s.step == 1):
        log.info(
            f"step {s.step}/{s.schedule.total_steps} | loss {record['loss']:.4f} | lr {record['lr']:.2e} | "
            f"{record['samples_per_s']:.1f} samples/s | data wait {record['data_wait_fraction']:.0%}"
        )


def _save(s: _Session) -> None:
    if s.env.is_main:
        save_checkpoint(s.run, s.model, s.optimizer, s.scheduler, s.loader, s.step, s.cfg)


def _loop(s: _Session, metrics: MetricsLog, result: Stage1Result, on_step) -> int | None:
    """Train until the schedule ends or --stop-after; returns the step of this session's last save."""
    cfg, total = s.cfg, s.schedule.total_steps
    threads = torch.get_num_threads()
    if s.device.type == "cpu" and s.loader.num_workers:
        # leave the loader workers their cores: OpenMP barriers over oversubscribed cores cost seconds a step
        torch.set_num_threads(cpu_compute_threads(s.loader.num_workers))
    stream = iter(s.loader)
    t_start = time.perf_counter()
    last_saved = None  # step of this session's latest checkpoint
    try:
        while s.step < total and (cfg.stop_after is None or s.step < cfg.stop_after):
            t0 = time.perf_counter()
            batch = next(stream)
            t1 = time.perf_counter()
            lr = s.optimizer.param_groups[0]["lr"]
            values, terms = _train_step(s, batch)
            record = _step_record(s, values, terms, lr, (t_start, t0, t1, time.perf_counter()))
            metrics.write(record)
            result.losses.append(values[0])
            if on_step is not None:
                on_step(s.step, batch, record)
            _log_step(s, record)
            if cfg.eval_every and s.step % cfg.eval_every == 0 and s.step < total:
                _evaluate(s, metrics, result, f"at step {s.step}")
            if cfg.save_every and s.step % cfg.save_every == 0 and s.step < total:
                _save(s)
                last_saved = s.step
    finally:
        stream.close()  # shuts the loader workers down
        torch.set_num_threads(threads)
    return last_saved


def _train(cfg: Stage1Config, env: DistEnv, resume: bool, on_step) -> Stage1Result:
    s = _set_up(cfg, env, resume)
    metrics = _start_run(s, resume)
    result = Stage1Result(run=s.run, step=s.step, total_steps=s.schedule.total_steps, model=s.model)
    result.skipped_shards, result.skipped_samples = sorted(s.bad), s.skipped_samples
    _report_skipped(s, metrics)
    _log_start(s)
    if cfg.report_repsim and s.step == 0:
        result.repsim_before = _evaluate(s, metrics, result, "before training")

    last_saved = _loop(s, metrics, result, on_step)

    result.step = s.step
    if last_saved != s.step:
        _save(s)
        barrier(env)
    result.checkpoint = s.run / CHECKPOINT_DIR
    if s.step >= s.schedule.total_steps:
        result.repsim_after = _evaluate(s, metrics, result, f"after {s.step} steps")
    else:
        log.info(f"stopped after step {s.step} of {s.schedule.total_steps}; continue with --resume {s.run}")
    metrics.close()
    return result
