"""The one run harness of stage 1, stage 2 and TIGER: set-up, resume check, checkpoint, metrics, the loop.

    with Harness("stage2", cfg.out, request, cfg.device) as h:    torchrun's process group, rank 0's lock
        recorded = h.open(cfg, cfg.batch_size)                    new, --resume or --restart: checked once,
                                                                  on rank 0, the verdict shared with all
        ... the trainer builds its data, model, optimizer ...
        start = h.restore(parts)                                  weights, optimizer, scheduler, loader
                                                                  position, metrics trimmed (0 when new)
        h.write_record(record)                                    config.json (+ the resume, on resume)
        result = h.loop(parts, batches, train_step, ...)          the loop of named steps, below; every RNG
                                                                  restored just before its first step

Each iteration of the loop runs these steps, in order:
    batch        the next batch of the trainer's stream (its wait is `data_wait_fraction`)
    train        the trainer's optimizer step -> the numbers of its metrics line
    record       {"kind": "train", "step", ..., samples_per_s, step_time_s, elapsed_s} to metrics.jsonl
    on_step      the caller's hook (tests, progress)
    log          a console line at the session's first step, every `log_every`, and the last
    <periodic>   the trainer's named steps (stage 1: "eval", Rep Sim every eval_every)
    checkpoint   every `checkpoint_every` steps (0: at the end only)
until the run's length, or `--stop-after` (this invocation only); a checkpoint at the end unless the last
step just saved one. Rank 0 alone writes and prints; every rank runs the same steps.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from sak.pipeline.base.errors import SakError
from sak.pipeline.base.provenance import code_version, now_iso
from sak.student.run.checkpoint import (
    Checkpoint,
    RngStates,
    checkpoint_dir,
    read_checkpoint,
    read_model_record,
    save_checkpoint,
)
from sak.student.run.folder import CHECKPOINT_DIR, MetricsLog, RunFolder
from sak.student.run.record import LoaderState, ModelRecord, Resumption, RunKind, RunRecord, run_kind
from sak.student.run.resume import check_length, check_resumable, given_differences
from sak.student.train.distributed import agree, barrier, gather_to_main, init_distributed, shutdown

log = logging.getLogger("sak")

COMMAND = {"stage1": "sak-train stage1", "stage2": "sak-train stage2", "tiger": "sak-train tiger"}


@dataclass(frozen=True)
class RunRequest:
    """What this invocation asks of the run folder: a new run, --resume, or --restart; and --stop-after."""

    resume: bool = False
    restart: bool = False
    stop_after: int | None = None

    def __post_init__(self) -> None:
        if self.resume and self.restart:
            raise SakError(
                "give one of --resume and --restart: a resume continues, a restart starts at step 0"
            )
        if self.stop_after is not None and self.stop_after < 1:
            raise SakError(f"--stop-after {self.stop_after}: must be >= 1")


NEW_RUN = RunRequest()  # a new run, to its end
OnStep = Callable[[int, Any, dict], None]  # (step, batch, its metrics record), after each step


@dataclass(frozen=True)
class PeriodicStep:
    """A named step of the loop, run after every `every`-th step (never at the run's last: the trainer
    runs its end-of-run work after the loop)."""

    name: str
    every: int
    run: Callable[[int], None]


@dataclass
class TrainingParts:
    """What a checkpoint holds of a trainer, and how it describes its model."""

    model: torch.nn.Module  # the module whose state_dict is saved (not DDP-wrapped)
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    describe: Callable[[int], ModelRecord]  # the model record at a step (digest and time filled on save)
    loader_state: Callable[[int], LoaderState]  # where the data stream stands after a step
    restore_loader: Callable[[LoaderState], None] | None = None


@dataclass
class LoopResult:
    step: int  # steps done in total
    total_steps: int
    records: list[dict] = field(default_factory=list, repr=False)  # this session's metrics lines
    checkpoint: Path | None = None

    @property
    def losses(self) -> list[float]:
        return [r["loss"] for r in self.records]

    @property
    def stopped(self) -> bool:
        """Ended before the run's length (--stop-after)."""
        return self.step < self.total_steps


@dataclass
class RunResult:
    """What one call of a trainer did: the steps of this session (all of them unless it resumed)."""

    run: Path
    step: int  # steps done in total
    total_steps: int = 0
    losses: list[float] = field(default_factory=list)  # loss per step of this call (mean over ranks)
    records: list[dict] = field(default_factory=list, repr=False)  # their metrics lines
    model: torch.nn.Module | None = field(default=None, repr=False)  # the trained model (not DDP-wrapped)
    checkpoint: Path | None = None

    @property
    def stopped(self) -> bool:
        """Ended before the run's length (--stop-after)."""
        return self.step < self.total_steps

    @classmethod
    def of(cls, h: Harness, loop: LoopResult, model: torch.nn.Module, **extra: Any) -> RunResult:
        return cls(
            h.run, loop.step, loop.total_steps, loop.losses, loop.records, model, loop.checkpoint, **extra
        )


class Harness:
    """One trainer's run in one process (of one or several under torchrun)."""

    def __init__(self, kind: RunKind, out: str, request: RunRequest, device: str | None) -> None:
        self.kind, self.request = kind, request
        self.folder = RunFolder(out)
        self.env = init_distributed(device)
        self.recorded: RunRecord | None = None
        self.changed: dict[str, tuple[Any, Any]] = {}
        self.checkpoint: Checkpoint | None = None
        self.model_record: ModelRecord | None = None  # on resume: what rebuilds the checkpoint's model
        self.metrics: MetricsLog | None = None
        self.start = 0

    @property
    def run(self) -> Path:
        return self.folder.path

    @property
    def device(self) -> torch.device:
        return self.env.device

    @property
    def is_main(self) -> bool:
        return self.env.is_main

    @property
    def resuming(self) -> bool:
        return self.request.resume

    def __enter__(self) -> Harness:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if self.metrics is not None:
            self.metrics.close()
        self.folder.unlock()
        shutdown(self.env, wait=exc_type is None)  # after an error the other ranks may never reach a barrier

    # ------------------------------------------------------------------------------------ set-up

    def open(self, cfg: Any, batch_size: int) -> RunRecord | None:
        """Take the run's lock and check the folder for what the request asks (rank 0 decides, every rank
        gets the same verdict); on resume, the recorded run (its config checked against `cfg`)."""
        if batch_size % self.env.world_size:
            raise SakError(
                f"--batch-size {batch_size} is not divisible by the {self.env.world_size} processes"
            )
        error = None
        if self.is_main:
            try:
                self.folder.lock()
                self._check_folder()
            except SakError as e:
                error = str(e)
        agree(self.env, error)
        if self.resuming:
            self.recorded = self.folder.read_record()
            if run_kind(self.recorded) != self.kind:
                raise SakError(
                    f"--resume {self.run}: it is a {run_kind(self.recorded)} run; continue it with "
                    f"`{COMMAND[run_kind(self.recorded)]} --resume {self.run}`"
                )
            self.changed = check_resumable(
                self.recorded.config, given_differences(self.recorded.config, cfg), self.run
            )
            self.model_record = read_model_record(checkpoint_dir(self.run))
        barrier(self.env)  # every rank has looked at the folder before rank 0 writes to it
        return self.recorded

    def _check_folder(self) -> None:
        run, d = self.run, checkpoint_dir(self.run)
        held = self.folder.holds_run()
        if self.request.restart:
            if d is not None:
                raise SakError(
                    f"--restart {run}: the run has a checkpoint ({d.name}/); continue it with --resume {run}, "
                    f"or choose another --out (a restart never deletes a checkpoint)"
                )
            self.folder.clear_for_restart()
        elif self.resuming:
            if not held:
                raise SakError(f"--resume {run}: no run there (no config.json); start one with --out {run}")
            if d is None:
                raise SakError(
                    f"--resume {run}: the run has no checkpoint yet (stopped before its first save); start it "
                    f"again with --restart --out {run}"
                )
        elif held:
            if d is None:
                raise SakError(
                    f"{run} holds a run with no checkpoint yet (stopped before its first save); start it again "
                    f"with --restart, or choose another --out"
                )
            raise SakError(
                f"{run} already holds a run; continue it with --resume {run}, or choose another --out"
            )

    def restore(self, parts: TrainingParts) -> int:
        """Weights, optimizer, scheduler and loader position of the run's checkpoint (0 for a new run); the
        metrics after its step dropped. RNG states wait for the loop's first step."""
        if not self.resuming:
            return 0
        ckpt = read_checkpoint(self.run, self.device)
        if ckpt is None:  # gone since open()
            raise SakError(f"--resume {self.run}: its checkpoint is gone")
        parts.model.load_state_dict(ckpt.weights, strict=True)
        parts.optimizer.load_state_dict(ckpt.optimizer)
        parts.scheduler.load_state_dict(ckpt.scheduler)
        if parts.restore_loader is not None:
            parts.restore_loader(ckpt.loader)
        self.checkpoint, self.start = ckpt, ckpt.step
        if self.is_main:
            self.folder.trim_metrics(ckpt.step)
        return ckpt.step

    def check_length(self, total_steps: int) -> None:
        if self.resuming:
            check_length(total_steps, self.start, self.run)

    def write_record(self, record: RunRecord) -> None:
        """config.json (rank 0): a new run's record, or on resume the fresh one keeping the run's creation
        time and its resumptions, this one added with what changed."""
        if self.recorded is not None:
            resumed = [
                *self.recorded.resumed,
                Resumption(step=self.start, at=now_iso(), changed=self.changed),
            ]
            record = dataclasses.replace(record, created=self.recorded.created, resumed=resumed)
        if self.is_main:
            self.folder.write_record(record)
        barrier(self.env)

    def provenance(self) -> dict[str, Any]:
        """The fields every run record ends with: where and by what it ran, and when it was created."""
        return {"device": str(self.device), "world_size": self.env.world_size, "code_version": code_version(),
                "created": now_iso()}  # fmt: skip

    def open_metrics(self, tensorboard: bool = False) -> MetricsLog:
        self.metrics = self.folder.metrics_log(self.is_main, tensorboard)
        return self.metrics

    # ------------------------------------------------------------------------------------ saving

    def save(self, parts: TrainingParts, step: int) -> Path:
        """A checkpoint of `step` (collective: every rank hands rank 0 its RNG states)."""
        states = gather_to_main(self.env, RngStates.capture())
        if self.is_main:
            save_checkpoint(self.run, parts.describe(step), parts.model, parts.optimizer, parts.scheduler,
                            parts.loader_state(step), states)  # fmt: skip
        barrier(self.env)  # a restart after this step finds the checkpoint on every rank
        return self.run / CHECKPOINT_DIR

    def _restore_rng(self) -> None:
        ckpt = self.checkpoint
        if ckpt is not None and ckpt.rng:
            ckpt.rng[min(self.env.rank, len(ckpt.rng) - 1)].apply()

    # -------------------------------------------------------------------------------------- loop

    def loop(
        self,
        parts: TrainingParts,
        batches: Iterator[Any],
        train_step: Callable[[Any], dict],
        *,
        total_steps: int,
        checkpoint_every: int,
        log_every: int,
        log_line: Callable[[dict], str],
        batch_size: int,
        periodic: Sequence[PeriodicStep] = (),
        on_step: OnStep | None = None,
    ) -> LoopResult:
        """Train from the checkpoint's step to `total_steps` (or --stop-after); see the module docstring."""
        if self.metrics is None:
            self.open_metrics()
        stop_at = (
            total_steps if self.request.stop_after is None else min(total_steps, self.request.stop_after)
        )
        step, last_saved = self.start, (self.start if self.resuming else None)
        result = LoopResult(step=step, total_steps=total_steps)
        self._restore_rng()  # last, so nothing of the set-up draws from the restored generators
        t_start = time.perf_counter()
        while step < stop_at:
            t0 = time.perf_counter()
            batch = next(batches)
            t1 = time.perf_counter()
            numbers = train_step(batch)
            step += 1
            t2 = time.perf_counter()
            record = {"kind": "train", "step": step, **numbers, "samples_per_s": batch_size / (t2 - t0),
                      "data_wait_fraction": (t1 - t0) / (t2 - t0), "step_time_s": t2 - t0,
                      "elapsed_s": t2 - t_start}  # fmt: skip
            self.metrics.write(record)
            result.records.append(record)
            result.step = step
            if on_step is not None:
                on_step(step, batch, record)
            if self.is_main and (step == self.start + 1 or step % max(1, log_every) == 0 or step == stop_at):
                log.info(f"step {step}/{total_steps} | {log_line(record)}")
            for p in periodic:
                if p.every and step % p.every == 0 and step < total_steps:
                    p.run(step)
            if checkpoint_every and step % checkpoint_every == 0 and step < total_steps:
                self.save(parts, step)
                last_saved = step
        if last_saved != step:
            self.save(parts, step)
        result.checkpoint = self.run / CHECKPOINT_DIR
        return result
