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
This file holds the loop; its parts live beside it: the data order in order.py, the loader in data.py,
the targets (cached or live teachers) in online.py, Rep Sim in evaluate.py, the checkpoints in checkpoint.py.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import math
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from sak.pipeline.errors import SakError
from sak.pipeline.manifest import now_iso
from sak.pipeline.provenance import code_version, read_json, write_json_atomic
from sak.student.checkpoint import (
    CHECKPOINT_DIR,
    RUN_CONFIG,
    checkpoint_dir,
    load_checkpoint,
    load_paper_checkpoint,
    save_checkpoint,
)
from sak.student.data import (
    NORMALIZATIONS,
    BatchReader,
    CacheIndex,
    CacheLoader,
    eval_batches,
    input_normalization,
    open_cache,
)
from sak.student.distributed import (
    DistEnv,
    all_reduce_mean,
    barrier,
    init_distributed,
    shutdown,
)
from sak.student.evaluate import _autocast, evaluate_repsim
from sak.student.losses import clip_gradients, distillation_loss
from sak.student.model import SakStudent, StudentConfig, TeacherTarget
from sak.student.online import OnlineTeachers, cached_targets, stored_levels
from sak.student.order import StreamPlan, holdout_rows, make_stream_plan

log = logging.getLogger("sak")

METRICS = "metrics.jsonl"
# options that may change when a run is resumed; every other field must match the recorded run
# (cache and out are paths: a moved cache is accepted when its fingerprints match the recorded ones)
RESUMABLE = frozenset(
    {
        "cache",
        "out",
        "stop_after",
        "eval_every",
        "eval_batch_size",
        "save_every",
        "log_every",
        "report_repsim",
        "tensorboard",
        "device",
    }
)


@dataclass(frozen=True)
class Stage1Config:
    """Stage-1 distillation; defaults follow DESIGN §3 (AdamW 1e-3, wd 0.01, 2 warm-up epochs, cosine).

    cache, out: the cache folder and the run folder (RUN).
    student: registered student (vit_s, vit_b, vit_l, tiny).
    teachers: teacher names or store fingerprints, in adapter-path order; () = every store of the cache.
    steps / epochs: training length, exactly one set. An epoch shows every training image once (one view).
    batch_size: global batch, split evenly over DDP ranks.
    lr, weight_decay, betas: AdamW (decay on every parameter, as a plain AdamW(model.parameters())).
    min_lr: floor of the cosine.
    warmup_steps / warmup_epochs: linear warm-up from lr/warmup to lr. warmup_steps wins when set; otherwise
      warmup_epochs x steps per epoch, and when training by `steps`, at most 10% of them (two epochs of a big
      cache would otherwise outlast a short run). The resolved number is in RUN/config.json.
    grad_clip: max global gradient norm (None: no clipping; the norm is logged either way).
    seed: model initialisation and data order.
    online: targets from live teachers rebuilt from the store manifests (same weights, normalisation and
      views), instead of the cached arrays: for equivalence checks and caches still being extracted.
    normalization: student input mean/std, "student" (its timm pretrained_cfg) or "imagenet" (what the
      paper's code used for every model).
    img_size: student input side; None = the cache's view size (any other value is refused).
    pretrained: timm weights for the stem. init_paper, paper_teachers: start from the authors' stage-1
      checkpoint, mapping their teacher names (dinov2, clip, sam) to ours; () = by teacher family.
    num_workers: loader workers per rank; each owns whole shards (fewer when the cache has few shards).
    skip_bad_shards: a shard whose files fail their sha256 (store shard files, image tars) is left out of
      training and Rep Sim instead of stopping the run. Every shard is hashed up front in each process, so
      the skip is the same on every rank and worker and resume stays exact; the skipped shards and sample
      count are logged, recorded in metrics.jsonl and config.json, and returned. Off: the loader checks
      each shard when first read and stops with an error naming it.
    shuffle_window: shards whose images are shuffled together. holdout_shards: the last shards, never
      trained on, where Rep Sim is measured.
    eval_every: Rep Sim every N steps (0: only at the end). eval_batch_size: per rank.
    report_repsim: also measure Rep Sim before training; both are logged and returned.
    save_every: checkpoint every N steps (0: only at the end). log_every: a console line every N steps.
    stop_after: stop with a checkpoint after this step, as if preempted; `resume` continues the schedule.
    device: "cpu", "cuda" or None (CUDA when available). use_kernels: the fused Triton adapter and loss
    (opt-in); None (default) and False keep the eager torch ops, which stay the default until a GPU run shows
    the kernels beating torch.compile at the real shapes (README, "Kernels").
    grad_checkpointing: recompute stem blocks in backward. tensorboard: also write RUN/tb.
    """

    cache: str
    out: str
    student: str = "vit_b"
    teachers: tuple[str, ...] = ()
    steps: int | None = None
    epochs: float | None = None
    batch_size: int = 128
    lr: float = 1e-3
    weight_decay: float = 0.01
    betas: tuple[float, float] = (0.9, 0.999)
    min_lr: float = 0.0
    warmup_steps: int | None = None
    warmup_epochs: float = 2.0
    grad_clip: float | None = None
    seed: int = 0
    online: bool = False
    normalization: str = "student"
    img_size: int | None = None
    pretrained: bool = False
    init_paper: str | None = None
    paper_teachers: tuple[tuple[str, str], ...] = ()
    num_workers: int = 4
    skip_bad_shards: bool = False
    shuffle_window: int = 8
    holdout_shards: int = 1
    eval_every: int = 0
    eval_batch_size: int = 32
    report_repsim: bool = False
    save_every: int = 0
    log_every: int = 10
    stop_after: int | None = None
    device: str | None = None
    use_kernels: bool | None = None
    grad_checkpointing: bool = False
    tensorboard: bool = True

    @classmethod
    def debug(cls, cache: str, out: str, **overrides: Any) -> Stage1Config:
        """Runs anywhere in seconds: tiny student, 20 steps of 8, no workers, Rep Sim every 10 steps."""
        base: dict[str, Any] = dict(
            student="tiny",
            steps=20,
            batch_size=8,
            warmup_steps=2,
            num_workers=0,
            eval_every=10,
            eval_batch_size=8,
            log_every=5,
            tensorboard=False,
        )
        return cls(cache=cache, out=out, **{**base, **overrides})

    def validate(self) -> None:
        if (self.steps is None) == (self.epochs is None):
            raise SakError("give exactly one of --steps and --epochs")
        if (self.steps is not None and self.steps < 1) or (self.epochs is not None and self.epochs <= 0):
            raise SakError("--steps / --epochs must be positive")
        if self.batch_size < 1 or self.eval_batch_size < 1:
            raise SakError("--batch-size must be >= 1")
        if self.normalization not in NORMALIZATIONS:
            raise SakError(
                f"--normalization must be one of {', '.join(NORMALIZATIONS)}, got {self.normalization!r}"
            )
        if self.grad_clip is not None and self.grad_clip <= 0:
            raise SakError(f"--grad-clip must be positive, got {self.grad_clip}")
        if self.num_workers < 0 or self.shuffle_window < 1:
            raise SakError("--num-workers must be >= 0 and --shuffle-window >= 1")

    def to_dict(self) -> dict[str, Any]:
        return json.loads(json.dumps(dataclasses.asdict(self)))  # tuples -> lists, as stored

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Stage1Config:
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - names)
        if unknown:
            raise SakError(f"run config has unknown fields {unknown}; written by a newer version?")
        d = dict(d)
        d["teachers"] = tuple(d.get("teachers", ()))
        d["betas"] = tuple(d.get("betas", (0.9, 0.999)))
        d["paper_teachers"] = tuple(tuple(p) for p in d.get("paper_teachers", ()))
        return cls(**d)


@dataclass(frozen=True)
class Schedule:
    """Resolved length and learning-rate shape of a run (lr factor of step s, 0-based)."""

    total_steps: int
    warmup_steps: int
    steps_per_epoch: float
    min_ratio: float = 0.0

    def factor(self, step: int) -> float:
        if step < self.warmup_steps:
            return (step + 1) / self.warmup_steps  # linear, reaching 1 at the last warm-up step
        span = max(1, self.total_steps - self.warmup_steps)
        progress = min(1.0, (step - self.warmup_steps) / span)
        return self.min_ratio + (1 - self.min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


def resolve_schedule(cfg: Stage1Config, samples_per_epoch: int) -> Schedule:
    steps_per_epoch = samples_per_epoch / cfg.batch_size
    total = cfg.steps if cfg.steps is not None else max(1, math.ceil(cfg.epochs * steps_per_epoch))
    if cfg.warmup_steps is not None:
        warmup = cfg.warmup_steps
    else:
        warmup = round(cfg.warmup_epochs * steps_per_epoch)
        if cfg.steps is not None:
            warmup = min(warmup, cfg.steps // 10)
    warmup = max(0, min(warmup, total))
    return Schedule(total, warmup, steps_per_epoch, cfg.min_lr / cfg.lr if cfg.lr > 0 else 0.0)


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
        mapping = dict(cfg.paper_teachers) or {
            s.manifest["teacher"]["family"]: s.teacher for s in index.stores
        }
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
        "dataset_fingerprint": index.cache["dataset"]["fingerprint"],
        "views_sha256": index.cache["views"]["sha256"],
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


def _train(cfg: Stage1Config, env: DistEnv, resume: bool, on_step) -> Stage1Result:
    device = env.device
    run = Path(cfg.out).expanduser()
    if resume:
        checkpoint_dir(run)
    elif (run / CHECKPOINT_DIR).exists() or (run / RUN_CONFIG).exists():
        raise SakError(f"{run} already holds a run; pass --resume {run} to continue it, or another --out")
    if cfg.batch_size % env.world_size:
        raise SakError(f"--batch-size {cfg.batch_size} is not divisible by the {env.world_size} processes")
    index = open_cache(cfg.cache, cfg.teachers, require_complete=not cfg.online)
    if resume:
        _check_resume(run, cfg, env, index)
    mean, std = input_normalization(cfg.normalization, cfg.student)
    model = build_student_for(cfg, index).to(device)
    use_kernels = bool(cfg.use_kernels)  # opt-in: the torch path is the measured default
    model.use_kernels = use_kernels  # fused adapters; the loss below follows the same flag
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
    targets_of = online if online is not None else cached_targets(index.stores, device)
    eval_rows = holdout_rows(index, cfg.holdout_shards)
    eval_rows = eval_rows[~np.isin(eval_rows // index.shard_size, list(bad))]
    skipped_samples = sum(len(reader.integrity.shard_rows(s)) for s in bad)
    # loss terms are named by list index; log them by tap position (they differ for --levels stores)
    level_names = {
        f"{s.teacher}/L{i}": f"{s.teacher}/L{p}" for s in index.stores for i, p in enumerate(s.positions)
    }

    if env.is_main:
        run.mkdir(parents=True, exist_ok=True)
        record = {
            "kind": "sak-stage1-run",
            "stage1": cfg.to_dict(),
            "student": model.config.to_dict(),
            "resolved": {
                **dataclasses.asdict(schedule),
                "world_size": env.world_size,
                "batch_per_rank": plan.batch_size,
                "streams_per_rank": plan.streams,
                "train_shards": len(plan.train_shards),
                "samples_per_epoch": plan.samples_per_epoch,
                "holdout_views": int(eval_rows.size),
                "skipped_shards": sorted(bad),
                "skipped_samples": skipped_samples,
                "input_mean": list(mean),
                "input_std": list(std),
                "img_size": model.config.img_size,
                "device": str(device),
            },
            "cache": {
                "path": str(index.root),
                "dataset_fingerprint": index.cache["dataset"]["fingerprint"],
                "views_sha256": index.cache["views"]["sha256"],
                "view_plan": index.cache["view_plan"],
                "stores": [
                    {"fingerprint": s.fingerprint, "teacher": s.teacher, "codec": s.codec}
                    for s in index.stores
                ],
            },
            "code_version": code_version(),
            "created": now_iso(),
        }
        if resume:
            prev = read_json(run / RUN_CONFIG)
            record["created"] = prev.get("created", record["created"])
            record["resumed"] = [*prev.get("resumed", []), {"step": step, "at": now_iso()}]
        write_json_atomic(run / RUN_CONFIG, record)
    barrier(env)

    train_model = model
    if env.distributed:
        from torch.nn.parallel import DistributedDataParallel as DDP

        train_model = DDP(model, device_ids=[device.index] if device.type == "cuda" else None)
    if resume and env.is_main and (run / METRICS).exists():  # drop records of steps after the checkpoint
        lines = (run / METRICS).read_text().splitlines()
        kept = [line for line in lines if line.strip() and json.loads(line)["step"] <= step]
        (run / METRICS).write_text("".join(line + "\n" for line in kept))
    metrics = MetricsLog(run, env.is_main, cfg.tensorboard)
    result = Stage1Result(run=run, step=step, total_steps=schedule.total_steps, model=model)
    result.skipped_shards, result.skipped_samples = sorted(bad), skipped_samples
    if bad:
        problems = [f"shard {s}: {'; '.join(p)}" for s, p in sorted(bad.items())]
        metrics.write(
            {
                "kind": "skipped",
                "step": step,
                "skipped_shards": sorted(bad),
                "skipped_samples": skipped_samples,
                "problems": problems,
            }
        )
        if env.is_main:
            log.warning(
                f"--skip-bad-shards: skipping {len(bad)} damaged shard(s), {skipped_samples} samples (views) "
                f"never trained on or evaluated; run `sak-cache verify {cfg.cache}`: {' | '.join(problems)}"
            )

    def evaluate(when: str) -> dict[str, float] | None:
        if not eval_rows.size:
            return None
        batches = eval_batches(reader, eval_rows, cfg.eval_batch_size, env.rank, env.world_size)
        sims, n = evaluate_repsim(model, batches, targets_of, index.stores, device, env)
        metrics.write(
            {
                "kind": "eval",
                "step": step,
                **{f"repsim/{t}": v for t, v in sims.items()},
                "repsim_mean": float(np.mean(list(sims.values()))),
                "eval_views": n,
            }
        )
        result.eval_views = n
        if env.is_main:
            log.info(f"Rep Sim {when} ({n} held-out views): {_format_repsim(sims)}")
        return sims

    if eval_rows.size == 0:
        log.warning("--holdout-shards 0: nothing is held out, Rep Sim is not reported")
    log.info(
        f"stage 1: {cfg.student} <- {', '.join(s.teacher for s in index.stores)} "
        f"({'online teachers' if online else 'cached targets'}), {schedule.total_steps} steps of "
        f"{cfg.batch_size} ({schedule.steps_per_epoch:.2f} steps/epoch, warm-up {schedule.warmup_steps}), "
        f"{env.world_size} process(es) on {device}, run {run}"
    )
    if cfg.report_repsim and step == 0:
        result.repsim_before = evaluate("before training")

    threads = torch.get_num_threads()
    if device.type == "cpu" and loader.num_workers:
        # leave the loader workers their cores: OpenMP barriers over oversubscribed cores cost seconds a step
        torch.set_num_threads(cpu_compute_threads(loader.num_workers))
    stream = iter(loader)
    t_start = time.perf_counter()
    last_saved = None  # step of this session's latest checkpoint
    try:
        while step < schedule.total_steps and (cfg.stop_after is None or step < cfg.stop_after):
            t0 = time.perf_counter()
            batch = next(stream)
            t1 = time.perf_counter()
            images = batch["images"].to(device, non_blocking=True)  # (B, 3, S, S)
            targets = targets_of(batch)  # {teacher: [(B, H, W, C)]}
            lr = optimizer.param_groups[0]["lr"]
            with _autocast(device):
                maps = stored_levels(train_model(images).distill_maps, index.stores)  # {t: [(B, C_t, h, w)]}
                loss, terms = distillation_loss(maps, targets, use_kernels=use_kernels)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            grad_norm = clip_gradients(model.parameters(), cfg.grad_clip)
            optimizer.step()
            scheduler.step()
            step += 1
            values = torch.stack(
                [loss.detach().float(), grad_norm.float(), *(v.float() for v in terms.values())]
            )
            values = all_reduce_mean(values, env).tolist()  # note: host-device sync, once per step
            t2 = time.perf_counter()
            record = {
                "kind": "train",
                "step": step,
                "epoch": round(loader.epoch, 4),
                "loss": values[0],
                **{f"loss/{level_names[k]}": v for k, v in zip(terms, values[2:])},
                "lr": lr,
                "grad_norm": values[1],
                "samples_per_s": cfg.batch_size / (t2 - t0),
                "data_wait_fraction": (t1 - t0) / (t2 - t0),
                "step_time_s": t2 - t0,
                "elapsed_s": t2 - t_start,
            }
            metrics.write(record)
            result.losses.append(values[0])
            if on_step is not None:
                on_step(step, batch, record)
            if env.is_main and (step % max(1, cfg.log_every) == 0 or step == 1):
                log.info(
                    f"step {step}/{schedule.total_steps} | loss {values[0]:.4f} | lr {lr:.2e} | "
                    f"{record['samples_per_s']:.1f} samples/s | data wait {record['data_wait_fraction']:.0%}"
                )
            if cfg.eval_every and step % cfg.eval_every == 0 and step < schedule.total_steps:
                evaluate(f"at step {step}")
            if cfg.save_every and step % cfg.save_every == 0 and step < schedule.total_steps:
                if env.is_main:
                    save_checkpoint(run, model, optimizer, scheduler, loader, step, cfg)
                last_saved = step
    finally:
        stream.close()  # shuts the loader workers down
        torch.set_num_threads(threads)

    result.step = step
    if last_saved != step:
        if env.is_main:
            save_checkpoint(run, model, optimizer, scheduler, loader, step, cfg)
        barrier(env)
    result.checkpoint = run / CHECKPOINT_DIR
    if step >= schedule.total_steps:
        result.repsim_after = evaluate(f"after {step} steps")
    else:
        log.info(f"stopped after step {step} of {schedule.total_steps}; continue with --resume {run}")
    metrics.close()
    return result
