"""Stage 1 of SAK: distil the selected teachers into the student, from the cache (or from live teachers).

    CacheLoader -> images (B, 3, S, S) float32 + targets {teacher: [(B, H, W, C)]} in the stored dtype
      | online: the same rows cut at each teacher's side -> the teachers rebuilt from the store manifests
    student(images).distill_maps {teacher: [(B, C_t, h, w)]}                (bf16 autocast on CUDA)
    distillation_loss: sum over teachers and levels of 0.9 (1 - cos) + 0.1 smoothL1
    AdamW (lr 1e-3, wd 0.01) -> optional grad clipping -> linear warm-up, then cosine to min_lr
    every step: RUN/metrics.jsonl (+ RUN/tb); every eval_every steps and at the end: Rep Sim, held out

The run folder, its lock, resume, checkpoints, metrics and the loop are the run harness's
(student/run/harness.py), shared with stage 2 and TIGER. Under `torchrun --nproc_per_node=N` each rank
trains on its own shards (DDP; gloo on CPU, NCCL on CUDA). Its parts live beside it: the options in
stage1_config.py, the targets (cached or live teachers) in targets.py, Rep Sim in evaluate.py; the data
order and the loader in ../data/ (order.py, loader.py).
"""

from __future__ import annotations

import dataclasses
import hashlib
import logging
import os
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import torch

from sak.pipeline.base.errors import SakError
from sak.pipeline.base.provenance import code_version, now_iso
from sak.student.data.batches import BatchReader
from sak.student.data.index import CacheIndex
from sak.student.data.loader import CacheLoader, eval_batches
from sak.student.data.normalization import input_normalization
from sak.student.data.opening import open_cache
from sak.student.data.order import StreamPlan, holdout_rows, make_stream_plan
from sak.student.model.config import StudentConfig, TeacherTarget
from sak.student.model.registry import build_student, get_student_arch
from sak.student.model.weights import load_paper_checkpoint
from sak.student.run.folder import MetricsLog
from sak.student.run.harness import (
    NEW_RUN,
    Harness,
    OnStep,
    PeriodicStep,
    RunRequest,
    RunResult,
    TrainingParts,
)
from sak.student.run.record import (
    CacheLineage,
    LoaderState,
    ModelRecord,
    Stage1Resolved,
    Stage1Run,
    StoreLineage,
)
from sak.student.train.distributed import all_reduce_mean, bf16_autocast, wrap_ddp
from sak.student.train.evaluate import evaluate_repsim
from sak.student.train.losses import clip_gradients, distillation_loss
from sak.student.train.prism_step import (
    ExpertUseLog,
    check_prism_stores,
    is_prism,
    load_prism_paper_stage1,
    prism_train_loss,
)
from sak.student.train.stage1_config import LrSchedule, Stage1Config, resolve_schedule
from sak.student.train.targets import OnlineTeachers, cached_targets, stored_levels

log = logging.getLogger("sak")


@dataclass
class Stage1Result(RunResult):
    """What a call to train_stage1 did (this session only, when resumed), with Rep Sim and skipped shards."""

    repsim_before: dict[str, float] | None = None
    repsim_after: dict[str, float] | None = None
    eval_views: int = 0
    skipped_shards: list[int] = field(default_factory=list)  # damaged shards left out (--skip-bad-shards)
    skipped_samples: int = 0  # cache rows (views) of those shards: never trained on or evaluated


def student_config_for(cfg: Stage1Config, index: CacheIndex) -> StudentConfig:
    """The recorded config of the run's student: one adapter path (or condition) per selected store."""
    return StudentConfig(
        name=cfg.student,
        teachers=tuple(TeacherTarget(s.teacher, s.dim) for s in index.stores),
        img_size=cfg.img_size or index.plan.size,
        pretrained=cfg.pretrained,
        use_kernels=bool(cfg.use_kernels),
        type=get_student_arch(cfg.student).type,
    )


def build_student_for(cfg: Stage1Config, index: CacheIndex) -> torch.nn.Module:
    """The student (by the registry, any student type) with one adapter path per selected store, built at
    the cache's view size."""
    # model initialisation from --seed, through a derived seed: a random-init teacher of the same timm
    # family made with the same seed would otherwise start out (almost) equal to the student
    torch.manual_seed(
        int.from_bytes(hashlib.sha256(f"sak-student-init:{cfg.seed}".encode()).digest()[:7], "little")
    )
    model = build_student(student_config_for(cfg, index))
    if cfg.grad_checkpointing:
        model.set_grad_checkpointing(True)
    if cfg.init_paper:
        mapping = dict(cfg.paper_teachers) or {s.manifest.teacher.family: s.teacher for s in index.stores}
        if is_prism(model):  # the PRISM authors' released stage-1 checkpoint (prism_weights.py)
            load_prism_paper_stage1(model, cfg.init_paper, mapping)
        else:
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


def _check_same_cache(recorded: Stage1Run, cfg: Stage1Config, index: CacheIndex, world_size: int) -> None:
    """A resumed run reads the cache (and store selection) it was trained on, with as many processes."""
    run = cfg.out
    if recorded.resolved.world_size != world_size:
        raise SakError(
            f"--resume {run}: the run used {recorded.resolved.world_size} process(es), this launch has "
            f"{world_size}; the data order depends on it"
        )
    was = recorded.cache
    if (was.dataset_fingerprint, was.views_sha256, [s.fingerprint for s in was.stores]) != (
        index.cache.dataset.fingerprint,
        index.cache.views.sha256,
        [s.fingerprint for s in index.stores],
    ):
        raise SakError(
            f"--resume {run}: {cfg.cache} is not the cache (or store selection) the run was trained on "
            f"(recorded: {was.path}, stores {', '.join(s.fingerprint for s in was.stores)})"
        )


@dataclass
class _Session:
    """Everything one stage-1 training session works with, built once by `_set_up`."""

    cfg: Stage1Config
    harness: Harness
    index: CacheIndex
    model: torch.nn.Module
    train_model: torch.nn.Module  # the model, DDP-wrapped under torchrun
    online: OnlineTeachers | None
    reader: BatchReader
    plan: StreamPlan
    loader: CacheLoader
    schedule: LrSchedule
    parts: TrainingParts
    targets_of: Callable[[dict], dict[str, list[torch.Tensor]]]
    eval_rows: np.ndarray  # held-out cache rows Rep Sim is measured on (damaged shards left out)
    bad: dict[int, list[str]]  # damaged shard -> problems (--skip-bad-shards)
    skipped_samples: int
    level_names: dict[str, str]  # loss term name (list index) -> name by tap position
    input_mean: tuple[float, ...]
    input_std: tuple[float, ...]
    student: StudentConfig  # what model.json records: rebuilds the student through the registry
    experts: ExpertUseLog | None = None  # PRISM students: expert use by teacher
    step: int = 0

    @property
    def device(self) -> torch.device:
        return self.harness.device


def _set_up(cfg: Stage1Config, h: Harness, recorded: Stage1Run | None) -> _Session:
    """The cache opened (on resume: checked to be the run's), the model, data order, loader and optimizer
    built, and on resume restored from the checkpoint."""
    env = h.env
    teachers = cfg.teachers or (tuple(s.fingerprint for s in recorded.cache.stores) if recorded else ())
    index = open_cache(
        cfg.cache, teachers, not cfg.online, local_cache=cfg.local_cache, local_cache_gb=cfg.local_cache_gb
    )
    if recorded is not None:
        _check_same_cache(recorded, cfg, index, env.world_size)
    mean, std = input_normalization(cfg.normalization, cfg.student)
    student = student_config_for(cfg, index)
    model = build_student_for(cfg, index).to(h.device)
    if is_prism(model):
        check_prism_stores(model, {st.teacher: st.positions for st in index.stores})
    model.use_kernels = bool(cfg.use_kernels)  # opt-in fused adapters; the loss follows the same flag
    online = OnlineTeachers(index.stores, index.plan.size, h.device) if cfg.online else None
    reader = BatchReader(
        index, student.img_size, mean, std, with_targets=online is None,
        view_sides=online.sides if online else (),
    )  # fmt: skip
    plan = make_stream_plan(
        index, cfg.batch_size // env.world_size, seed=cfg.seed, world_size=env.world_size, rank=env.rank,
        num_workers=cfg.num_workers, shuffle_window=cfg.shuffle_window, holdout_shards=cfg.holdout_shards,
        streams=recorded.resolved.streams_per_rank if recorded else None,  # part of the data order
    )  # fmt: skip
    bad = reader.integrity.bad_shards(range(index.num_shards)) if cfg.skip_bad_shards else {}
    plan = _without_shards(plan, bad, env.world_size)
    loader = CacheLoader(plan, reader, num_workers=cfg.num_workers, pin_memory=h.device.type == "cuda")
    schedule = resolve_schedule(cfg, plan.samples_per_epoch)
    optimizer = torch.optim.AdamW(
        model.parameters(), lr=cfg.lr, betas=cfg.betas, weight_decay=cfg.weight_decay
    )
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, schedule.factor)
    num_parameters = model.num_parameters(include_aligners=True)
    parts = TrainingParts(
        model=model,
        optimizer=optimizer,
        scheduler=scheduler,
        describe=lambda step: ModelRecord(
            run="stage1",
            step=step,
            student=student,
            weights_sha256="",
            num_parameters=num_parameters,
            code_version=code_version(),
            saved="",
        ),  # fmt: skip
        loader_state=lambda step: LoaderState(**loader.state_dict()),
        restore_loader=lambda state: loader.load_state_dict({"batches": state.batches, "plan": state.plan}),
    )
    step = h.restore(parts)
    h.check_length(schedule.total_steps)
    eval_rows = holdout_rows(index, cfg.holdout_shards)
    eval_rows = eval_rows[~np.isin(eval_rows // index.shard_size, list(bad))]
    return _Session(
        cfg=cfg, harness=h, index=index, model=model, train_model=_ddp(model, index, env), online=online,
        reader=reader, plan=plan, loader=loader, schedule=schedule, parts=parts,
        targets_of=online if online is not None else cached_targets(index.stores, h.device),
        eval_rows=eval_rows, bad=bad, skipped_samples=sum(len(reader.integrity.shard_rows(s)) for s in bad),
        # loss terms are named by list index; log them by tap position (they differ for --levels stores)
        level_names={f"{s.teacher}/L{i}": f"{s.teacher}/L{p}" for s in index.stores for i, p in enumerate(s.positions)},
        input_mean=mean, input_std=std, student=student, step=step,
        experts=ExpertUseLog(model, env) if is_prism(model) else None,
    )  # fmt: skip


def _ddp(model: torch.nn.Module, index: CacheIndex, env) -> torch.nn.Module:
    """The model DDP-wrapped under torchrun. A store of some levels only (`--levels`) leaves the level norms
    and aligners of the student's other taps without gradient, though their maps are outputs: the same
    parameters every step, which DDP's static graph mode allows."""
    if is_prism(model):  # experts no token picked this step get no gradient
        return wrap_ddp(model, env, find_unused=True)
    partial = any(len(s.positions) < len(model.levels) for s in index.stores)
    return wrap_ddp(model, env, static_graph=partial)


def _run_record(s: _Session) -> Stage1Run:
    """RUN/config.json: the resolved run (config, schedule, cache, stores, world size, code version)."""
    cfg, index, plan, sched = s.cfg, s.index, s.plan, s.schedule
    return Stage1Run(
        config=cfg,
        student=s.student,
        resolved=Stage1Resolved(
            total_steps=sched.total_steps,
            warmup_steps=sched.warmup_steps,
            steps_per_epoch=sched.steps_per_epoch,
            min_ratio=sched.min_ratio,
            world_size=s.harness.env.world_size,
            batch_per_rank=plan.batch_size,
            streams_per_rank=plan.streams,
            train_shards=len(plan.train_shards),
            samples_per_epoch=plan.samples_per_epoch,
            holdout_views=int(s.eval_rows.size),
            skipped_shards=sorted(s.bad),
            skipped_samples=s.skipped_samples,
            input_mean=list(s.input_mean),
            input_std=list(s.input_std),
            img_size=s.student.img_size,
            device=str(s.device),
        ),  # fmt: skip
        cache=CacheLineage(  # lineage: where the cache is, and exactly which store manifests were read
            path=index.remote or str(index.root),
            url=index.remote,
            dataset_fingerprint=index.cache.dataset.fingerprint,
            views_sha256=index.cache.views.sha256,
            view_plan=index.cache.view_plan.to_dict(),
            stores=[
                StoreLineage(
                    fingerprint=st.fingerprint,
                    teacher=st.teacher,
                    codec=st.codec.name,
                    manifest_sha256=index.cache.stores[st.fingerprint].manifest_sha256,
                )
                for st in index.stores
            ],  # fmt: skip
        ),
        code_version=code_version(),
        created=now_iso(),
    )


def _report_skipped(s: _Session, metrics: MetricsLog) -> None:
    if not s.bad:
        return
    problems = [f"shard {n}: {'; '.join(p)}" for n, p in sorted(s.bad.items())]
    metrics.write({"kind": "skipped", "step": s.step, "skipped_shards": sorted(s.bad),
                   "skipped_samples": s.skipped_samples, "problems": problems})  # fmt: skip
    if s.harness.is_main:
        log.warning(
            f"--skip-bad-shards: skipping {len(s.bad)} damaged shard(s), {s.skipped_samples} samples (views) "
            f"never trained on or evaluated; run `sak-cache verify {s.cfg.cache}`: {' | '.join(problems)}"
        )


def _log_start(s: _Session) -> None:
    if not s.harness.is_main:
        return
    if s.eval_rows.size == 0:
        log.warning("--holdout-shards 0: nothing is held out, Rep Sim is not reported")
    cfg, schedule = s.cfg, s.schedule
    log.info(
        f"stage 1: {cfg.student} <- {', '.join(st.teacher for st in s.index.stores)} "
        f"({'online teachers' if s.online else 'cached targets'}), {schedule.total_steps} steps of "
        f"{cfg.batch_size} ({schedule.steps_per_epoch:.2f} steps/epoch, warm-up {schedule.warmup_steps}), "
        f"{s.harness.env.world_size} process(es) on {s.device}, run {s.harness.run}"
    )


def _evaluate(s: _Session, result: Stage1Result, step: int, when: str) -> dict[str, float] | None:
    """Rep Sim on the held-out rows, written to the metrics log (None when nothing is held out)."""
    if not s.eval_rows.size:
        return None
    cfg, env = s.cfg, s.harness.env
    batches = eval_batches(s.reader, s.eval_rows, cfg.eval_batch_size, env.rank, env.world_size)
    sims, n = evaluate_repsim(s.model, batches, s.targets_of, s.index.stores, s.device, env)
    s.harness.metrics.write(
        {"kind": "eval", "step": step, **{f"repsim/{t}": v for t, v in sims.items()},
         "repsim_mean": float(np.mean(list(sims.values()))), "eval_views": n}
    )  # fmt: skip
    result.eval_views = n
    if env.is_main:
        log.info(
            f"Rep Sim {when} ({n} held-out views): " + ", ".join(f"{t} {v:.4f}" for t, v in sims.items())
        )
    return sims


def _train_step(s: _Session, batch: dict) -> dict:
    """One optimizer step on `batch`: the numbers of its metrics line (averaged over ranks)."""
    images = batch["images"].to(s.device, non_blocking=True)  # (B, 3, S, S)
    targets = s.targets_of(batch)  # {teacher: [(B, H, W, C)]}
    optimizer = s.parts.optimizer
    lr = optimizer.param_groups[0]["lr"]
    with bf16_autocast(s.device):
        if s.experts is not None:  # PRISM: routed pairs, its objective, expert use counted
            prism, output = prism_train_loss(
                s.model, s.train_model, images, targets, s.cfg.teachers_per_image, s.cfg.seed, s.step,
                s.harness.env.rank,
            )  # fmt: skip
            loss, terms = (
                prism.total,
                {**prism.distill, "decorrelation": prism.decorrelation, "balance": prism.balance},
            )
            s.experts.add(output)
        else:
            maps = stored_levels(s.train_model(images).distill_maps, s.index.stores)  # {t: [(B, C_t, h, w)]}
            loss, terms = distillation_loss(maps, targets, use_kernels=s.model.use_kernels)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    grad_norm = clip_gradients(s.model.parameters(), s.cfg.grad_clip)
    optimizer.step()
    s.parts.scheduler.step()
    s.step += 1
    values = torch.stack([loss.detach().float(), grad_norm.float(), *(v.float() for v in terms.values())])
    values = all_reduce_mean(values, s.harness.env).tolist()  # note: host-device sync, once per step
    return {
        "epoch": round(s.loader.epoch, 4),
        "loss": values[0],
        **{f"loss/{s.level_names.get(k, k)}": v for k, v in zip(terms, values[2:])},
        "lr": lr,
        "grad_norm": values[1],
    }


def _log_experts(s: _Session, step: int, draw: bool = False) -> None:
    """PRISM: the expert-use line of the steps since the last one; at the end also RUN/routers.png."""
    if s.experts is None:
        return
    line = s.experts.line(step)
    if line is not None:
        s.harness.metrics.write(line)
    if draw:
        s.experts.draw(
            s.harness.run, f"{s.cfg.student}: expert use by teacher, steps {s.harness.start + 1}-{step}"
        )


def _log_line(record: dict) -> str:
    return (
        f"loss {record['loss']:.4f} | lr {record['lr']:.2e} | {record['samples_per_s']:.1f} samples/s | "
        f"data wait {record['data_wait_fraction']:.0%}"
    )


def train_stage1(
    cfg: Stage1Config, request: RunRequest = NEW_RUN, on_step: OnStep | None = None
) -> Stage1Result:
    """Train a stage-1 run in cfg.out: a new one, or as `request` says (resume it from its checkpoint,
    restart a run that has none, stop after a step: student/run/resume.py); on_step(step, batch, record)
    after each step."""
    cfg.validate()
    with Harness("stage1", cfg.out, request, cfg.device) as h:
        recorded = h.open(cfg, cfg.batch_size)
        s = _set_up(cfg, h, recorded)
        h.write_record(_run_record(s))
        metrics = h.open_metrics(cfg.tensorboard)
        result = Stage1Result(run=h.run, step=s.step, total_steps=s.schedule.total_steps, model=s.model)
        result.skipped_shards, result.skipped_samples = sorted(s.bad), s.skipped_samples
        _report_skipped(s, metrics)
        _log_start(s)
        if cfg.report_repsim and s.step == 0:
            result.repsim_before = _evaluate(s, result, 0, "before training")
        threads = torch.get_num_threads()
        if s.device.type == "cpu" and s.loader.num_workers:
            # leave the loader workers their cores: OpenMP barriers over oversubscribed cores cost seconds a step
            torch.set_num_threads(cpu_compute_threads(s.loader.num_workers))
        stream = iter(s.loader)
        evaluate_now = PeriodicStep(
            "eval", cfg.eval_every, lambda step: _evaluate(s, result, step, f"at step {step}")
        )
        periodic = [evaluate_now]
        if s.experts is not None:
            periodic.append(PeriodicStep("experts", cfg.log_every, lambda step: _log_experts(s, step)))
        try:
            done = h.loop(
                s.parts, stream, lambda batch: _train_step(s, batch), total_steps=s.schedule.total_steps,
                checkpoint_every=cfg.checkpoint_every, log_every=cfg.log_every, log_line=_log_line,
                batch_size=cfg.batch_size, periodic=periodic, on_step=on_step,
            )  # fmt: skip
        finally:
            stream.close()  # shuts the loader workers down
            torch.set_num_threads(threads)
        result.step, result.losses, result.records, result.checkpoint = (
            done.step,
            done.losses,
            done.records,
            done.checkpoint,
        )
        _log_experts(s, done.step, draw=True)
        if not done.stopped:
            result.repsim_after = _evaluate(s, result, done.step, f"after {done.step} steps")
    return result
