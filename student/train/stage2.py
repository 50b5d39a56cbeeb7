"""Stage 2 of SAK: routers + task heads fine-tuned on a dense multi-task dataset.

    stage-1 RUN (--init): its student (the student registry builds it from the checkpoint's record) and
      config.json (cache, stores, input normalisation) -> resize_input to the stage-2 input (512x512
      PASCAL, 448x576 NYUD) -> SakMultiTask (mor | sum | tiger routers)
    TrainSamples: scale 0.5-2, pad + crop, flip, photometric, from a replayable plan (data/dense.py)
      images (B, 3, H, W) uint8 -> student: normalised float; teachers (--online): the same uint8 pixels
    loss = multi_task_loss (weights 1/2/5/10/50/1) + gamma * distillation_loss (live teachers, rebuilt from
           the stage-1 stores exactly as targets.py does; SAM at its fixed side, others at the input size)
    AdamW (lr 2e-5, wd 1e-6), polynomial decay (power 0.9), no warm-up, clip 10; paper Table 11

The run folder, resume, checkpoints and the loop are the run harness's (student/run/harness.py), shared
with stage 1 and TIGER; evaluation is run_eval.py's. With --freeze-backbone only routers and heads train;
the distillation loss then has no gradient to give and is not computed (no teachers are loaded). With
--cache the targets come from a stage-2 target cache (`sak-cache stage2`) built for the same dataset,
images, seed, crop, augmentation and stage-1 teachers; a batch's rows (epoch * N + image) index it, and
each image is checked against its sha256.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import torch

from sak.pipeline.base.errors import SakError
from sak.pipeline.base.provenance import code_version
from sak.pipeline.teachers.forward import normalize_u8
from sak.student.model.config import StudentConfig
from sak.student.model.multitask import SakMultiTask
from sak.student.model.prism_loss import stage2_balance
from sak.student.model.prism_stage2 import PRISM_ROUTER, PrismStage2Model
from sak.student.run.harness import (
    NEW_RUN,
    Harness,
    OnStep,
    PeriodicStep,
    RunRequest,
    RunResult,
    TrainingParts,
)
from sak.student.run.models import build_multitask
from sak.student.run.record import LoaderState, ModelRecord, MultiTaskHeads, Stage1Run, Stage2Run
from sak.student.train.counterfactual import counterfactual_loss, sample_experts
from sak.student.train.dense_run import batch_stream, run_instructions, stage2_cache_targets, train_data
from sak.student.train.distributed import rank_mean_value, wrap_ddp
from sak.student.train.losses import clip_gradients, distillation_loss
from sak.student.train.prism_step import ExpertUseLog, is_prism
from sak.student.train.stage2_config import Stage2Config
from sak.student.train.stage2_teachers import Stage2Teachers, load_stage1_run, student_levels
from sak.student.train.task_losses import multi_task_loss

log = logging.getLogger("sak")


def _model(cfg: Stage2Config, h: Harness, recorded: Stage2Run | None, data, emb) -> tuple[SakMultiTask, Any]:
    """The model (a new run: the stage-1 student, resized; a resume: the checkpoint's own student, rebuilt
    by the registry: its weights come next) and the stage-1 run when --init is read (None otherwise)."""
    crop = cfg.input_size()
    needs_init = recorded is None or (cfg.gamma > 0 and not cfg.freeze_backbone)  # live or cached targets
    stage1 = None
    if needs_init:
        student, stage1 = load_stage1_run(cfg.init, h.device)
    if recorded is None and cfg.init_paper and not is_prism(student):
        raise SakError(
            "--init-paper in stage 2 takes the PRISM authors' checkpoint: --init a PRISM stage-1 run"
        )
    if recorded is None and is_prism(student):
        torch.manual_seed(cfg.seed)
        model = prism_stage2_model(cfg, student, data.outputs, crop)
    elif recorded is None:
        student.resize_input(crop)
        torch.manual_seed(cfg.seed)
        model = SakMultiTask(student, data.outputs, cfg.router, emb, cfg.router_hidden)
    else:
        torch.manual_seed(cfg.seed)
        model = build_multitask(h.model_record)
    if cfg.freeze_backbone:
        model.freeze_backbone()
    return model.to(h.device), stage1


PRISM_BALANCE = 0.1 * 0.01  # the authors' aux factor x load_balancing_alpha (prism_loss.PrismLossConfig)


def prism_stage2_model(cfg: Stage2Config, stage1, outputs: dict[str, int], crop) -> PrismStage2Model:
    """A PRISM stage-1 student -> task-conditioned student + heads; the MoE blocks do the routing, so
    --router tiger (instruction routers over SAK's adapter paths) does not apply."""
    if cfg.router == "tiger":
        raise SakError(
            "--router tiger routes SAK's adapter paths; a PRISM student routes by task in its experts"
        )
    config = StudentConfig(stage1.config.name, tuple(stage1.config.teachers), stage1.config.img_size[0],
                           type="prism")  # fmt: skip
    model = PrismStage2Model.from_record(config, stage1, outputs, crop)
    if cfg.init_paper:
        model.load_authors_stage2(cfg.init_paper)
    return model


def _distillation_targets(cfg: Stage2Config, data, stage1: Stage1Run | None, crop, device) -> Any:
    """Where the distillation targets come from: a stage-2 cache (--cache), live teachers (--online), or
    nowhere (None: gamma 0 or a frozen backbone, where the distillation term has no gradient to give)."""
    if cfg.gamma <= 0 or cfg.freeze_backbone:
        return None
    if cfg.cache is not None:
        return stage2_cache_targets(cfg, data, crop, [s.fingerprint for s in stage1.cache.stores])
    return Stage2Teachers(stage1, crop, device)


def _run_record(cfg, model, data, emb_identity, mean, std, teachers, h: Harness) -> Stage2Run:
    return Stage2Run(
        config=cfg,
        dataset=cfg.dataset,
        img_size=cfg.input_size(),
        input_mean=list(mean),
        input_std=list(std),
        init=str(Path(cfg.init).expanduser().resolve()),
        teachers=teachers,
        instructions=emb_identity,
        tasks=dict(data.outputs),
        task_weights={t: cfg.loss_weights()[t] for t in data.tasks},
        train_images=len(data),
        trainable_parameters=sum(p.numel() for p in model.trainable_parameters()),
        **h.provenance(),
    )


def train_stage2(
    cfg: Stage2Config, request: RunRequest = NEW_RUN, on_step: OnStep | None = None
) -> RunResult:
    """Fine-tune routers, heads (and, unless frozen, the whole student) on the dataset's tasks, in cfg.out
    (or as `request` says: resume, restart, stop after a step; student/run/resume.py).

    Under `torchrun --nproc_per_node=N` each rank takes its 1/N part of every global batch (DDP; the
    heads' BatchNorm normalises over the global batch); rank 0 alone writes the run folder."""
    cfg.validate()
    with Harness("stage2", cfg.out, request, cfg.device) as h:
        recorded = h.open(cfg, cfg.batch_size)
        crop = cfg.input_size()
        data = train_data(cfg, recorded)
        emb = identity = None
        if cfg.router == "tiger":
            emb, identity = run_instructions(cfg, h.folder, list(data.outputs), h.resuming)
        model, stage1 = _model(cfg, h, recorded, data, emb)
        mean = recorded.input_mean if recorded else stage1.resolved.input_mean
        std = recorded.input_std if recorded else stage1.resolved.input_std
        teachers = recorded.teachers if recorded else [s.teacher for s in stage1.cache.stores]
        targets = _distillation_targets(cfg, data, stage1, crop, h.device)
        optimizer, scheduler = cfg.optimizer(model.trainable_parameters())
        parts = TrainingParts(
            model=model, optimizer=optimizer, scheduler=scheduler,
            describe=lambda step: _model_record(model, crop, step),
            loader_state=lambda step: LoaderState(batches=step),
        )  # fmt: skip
        start = h.restore(parts)
        h.check_length(cfg.steps)
        if not h.resuming and h.is_main and identity is not None:
            h.folder.save_instructions(emb, identity)
        h.write_record(_run_record(cfg, model, data, identity, mean, std, teachers, h))
        prism = model.router_kind == PRISM_ROUTER
        if prism:
            model.distill = targets is not None
        # the aligners idle without targets; PRISM: experts no token picked get no gradient
        train_model = wrap_ddp(model, h.env, find_unused=targets is None or prism)
        step_of = _Stage2Step(cfg, model, targets, optimizer, scheduler, mean, std, h.device, train_model)
        step_of.step = start + 1
        experts = step_of.experts = ExpertUseLog(model.student, h.env) if prism else None
        periodic = (
            [PeriodicStep("experts", cfg.log_every, lambda s: _log_experts(h, experts, s))] if prism else []
        )
        if h.is_main:
            log.info(
                f"stage 2: {model.student.config.name} + {model.router_kind} routers on {cfg.dataset} {list(data.tasks)}, "
                f"steps {start + 1}..{cfg.steps} of {cfg.batch_size} at {crop[0]}x{crop[1]}, "
                f"{('cached targets' if cfg.cache else 'live teachers') if targets else 'no distillation'}, "
                f"{h.env.world_size} process(es), run {h.run}"
            )
        model.train()
        done = h.loop(
            parts, batch_stream(cfg, data, crop, start, h.env), step_of, total_steps=cfg.steps,
            checkpoint_every=cfg.checkpoint_every, log_every=cfg.log_every, batch_size=cfg.batch_size,
            log_line=lambda r: f"loss {r['loss']:.4f} | lr {r['lr']:.2e}", on_step=on_step, periodic=periodic,
        )  # fmt: skip
        if prism:
            _log_experts(h, experts, done.step, f"{model.student.config.name}: expert use by task")
    return RunResult.of(h, done, model)


def _model_record(model: SakMultiTask, crop: tuple[int, int], step: int) -> ModelRecord:
    text_dim = int(model.instructions.shape[1]) if model.router_kind == "tiger" else None
    student = model.student_config if model.router_kind == PRISM_ROUTER else model.student.config
    heads = MultiTaskHeads(tasks=dict(model.tasks), router=model.router_kind, img_size=tuple(crop),
                           text_dim=text_dim, router_hidden=model.router_hidden)  # fmt: skip
    return ModelRecord(run="stage2", step=step, student=student, multitask=heads, weights_sha256="",
                       num_parameters=sum(p.numel() for p in model.parameters()), code_version=code_version(),
                       saved="")  # fmt: skip


def _log_experts(h: Harness, experts: ExpertUseLog, step: int, picture_title: str | None = None) -> None:
    """PRISM: expert use by task (and teacher, with distillation on) since the last line; at the end also
    RUN/routers.png."""
    line = experts.line(step)
    if line is not None:
        h.metrics.write(line)
    if picture_title is not None:
        experts.draw(h.run, picture_title)


class _Stage2Step:
    """One optimizer step of stage 2 on a batch; returns the step's numbers for the metrics log."""

    def __init__(
        self,
        cfg: Stage2Config,
        model: SakMultiTask,
        teachers: Any,
        optimizer: torch.optim.Optimizer,
        scheduler: torch.optim.lr_scheduler.LRScheduler,
        mean: list[float],
        std: list[float],
        device: torch.device,
        train_model: torch.nn.Module | None = None,
    ) -> None:
        self.cfg, self.model, self.teachers, self.device = cfg, model, teachers, device
        self.train_model = train_model if train_model is not None else model  # DDP-wrapped under torchrun
        self.step = 1  # the step this call takes (set to the checkpoint's + 1 on resume)
        self.experts: ExpertUseLog | None = None  # PRISM: expert use by task, counted every step
        self.optimizer, self.scheduler = optimizer, scheduler
        self.weights = cfg.loss_weights()
        self.mean = torch.tensor(mean, device=device).view(1, 3, 1, 1)
        self.std = torch.tensor(std, device=device).view(1, 3, 1, 1)

    def __call__(self, batch: dict) -> dict:
        cfg, device, teachers = self.cfg, self.device, self.teachers
        images_u8 = batch["images"]  # (B, 3, H, W) uint8, the augmented pixels
        targets = {t: v.to(device) for t, v in batch["labels"].items()}
        images = normalize_u8(images_u8.to(device), self.mean, self.std)
        counterfactual = cfg.router == "tiger" and cfg.cf_weight > 0 and self.step % cfg.cf_every == 0
        if counterfactual:
            preds, _, distill_maps, token = self.train_model(images, routing=True)
        else:
            preds, _, distill_maps = self.train_model(images)
        task_loss, parts = multi_task_loss(preds, targets, self.weights)
        loss = task_loss
        distill = cf = None
        routing: dict = {}
        if counterfactual:
            sampled = sample_experts(
                list(token.gates), token.num_experts, cfg.cf_experts, cfg.seed, self.step
            )
            cf, routing = counterfactual_loss(self.model, token, targets, tuple(images.shape[-2:]), cfg.cf_tau,
                                              sampled)  # fmt: skip
            loss = loss + cfg.cf_weight * cf
        if teachers is not None:
            if cfg.cache is not None:
                teacher_maps = teachers(batch, images_u8, device)
            else:
                teacher_maps = teachers(images_u8)
            distill, _ = distillation_loss(student_levels(distill_maps, teachers), teacher_maps)
            loss = task_loss + cfg.gamma * distill
        if self.experts is not None:  # PRISM: the MoE balance term of the authors' stage 2, expert use
            out = self.model.last_output
            if not cfg.freeze_backbone:
                loss = loss + PRISM_BALANCE * stage2_balance(out.features, self.model.student)
            self.experts.add(out)
        lr = self.optimizer.param_groups[0]["lr"]
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        grad_norm = clip_gradients(self.model.trainable_parameters(), cfg.grad_clip)
        self.optimizer.step()
        self.scheduler.step()
        self.step += 1
        # the numbers of the global batch: means over ranks (one all_reduce; a host-device sync per step)
        zero = torch.zeros_like(task_loss)
        logged = [
            loss,
            *parts.values(),
            distill if distill is not None else zero,
            cf if cf is not None else zero,
        ]
        values = rank_mean_value(torch.stack([x.detach().float() for x in logged])).tolist()
        record = {
            "loss": values[0],
            **{f"loss/{t}": v for t, v in zip(parts, values[1:])},
            "distill": values[-2] if distill is not None else None,
            "lr": lr,
            "grad_norm": float(grad_norm),
        }
        if cfg.router == "tiger":
            record.update(cf=values[-1], routing=routing)
        return record
