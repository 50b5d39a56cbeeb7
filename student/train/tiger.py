"""TIGER training from a stage-2 target cache (no foundation model in memory), or with live teachers.

    sak-cache stage2 --teachers ... -> S2CACHE: teacher maps of every replayed (epoch, image) view
    sak-train tiger --cache S2CACHE --dataset D --data-root DIR --out RUN
      instructions: one sentence per task -> frozen open_clip text tower, ONCE -> RUN/instructions.*
      TrainSamples (the cache's seed, crop, augmentation) -> rows -> cached maps (checked by image sha256)
      Tiger (student/model/tiger.py): experts -> per-(level, task) instruction routers -> fusion -> heads
      loss = multi_task_loss (weights 1/2/5/10/50/1) + cf_weight * counterfactual loss
    --online: the same views, teachers by name run live (same targets as the cache, fp32)

Counterfactual loss, per output level l and task t (our reading of the paper's abstract):
    L        the task's (unweighted) loss of the prediction
    L_-e     the loss with expert e excluded at level l: its gates set to 0, the rest renormalised to sum 1,
             the head re-run; no gradient through it (BatchNorm running statistics untouched)
    c_e      max(L_-e - L, 0)          q = softmax(c / tau)         gbar = mean over tokens and images of g
    term     KL(q || gbar) = sum_e q_e (log q_e - log gbar_e); the loss adds cf_weight x the mean over (l, t)
Every c_e, q_e and gbar_e is logged per level and task in RUN/metrics.jsonl ("routing").

The run folder (config.json kind sak-tiger-run, instructions.*, metrics.jsonl, checkpoint/), resume and
the loop are the run harness's (student/run/harness.py), shared with stage 1 and stage 2; the teacher
sources are dense_run.py's; evaluation is run_eval.py's.
"""

from __future__ import annotations

import logging

import torch

from sak.pipeline.base.errors import SakError
from sak.pipeline.base.provenance import code_version
from sak.student.model.config import TigerModelConfig
from sak.student.model.tiger import Tiger
from sak.student.run.harness import NEW_RUN, Harness, OnStep, RunRequest, RunResult, TrainingParts
from sak.student.run.record import LoaderState, ModelRecord, TigerRun
from sak.student.train.counterfactual import counterfactual_loss, sample_experts
from sak.student.train.dense_run import (
    TeacherSource,
    batch_stream,
    cached_source,
    named_source,
    run_instructions,
    train_data,
)
from sak.student.train.distributed import rank_mean_value, wrap_ddp
from sak.student.train.losses import clip_gradients
from sak.student.train.task_losses import multi_task_loss
from sak.student.train.tiger_config import TigerConfig

log = logging.getLogger("sak")


def _run_record(
    cfg: TigerConfig, model: Tiger, data, source: TeacherSource, identity, h: Harness
) -> TigerRun:
    return TigerRun(
        config=cfg,
        dataset=cfg.dataset,
        img_size=cfg.input_size(),
        tasks=dict(data.outputs),
        experts=model.expert_names,
        teachers=source.record,
        instructions=identity,
        trainable_parameters=sum(p.numel() for p in model.parameters() if p.requires_grad),
        router_parameters=sum(p.numel() for p in model.router_parameters()),
        train_images=len(data),
        **h.provenance(),
    )


def train_tiger(cfg: TigerConfig, request: RunRequest = NEW_RUN, on_step: OnStep | None = None) -> RunResult:
    """Train TIGER's projections, routers and heads in cfg.out (resume / restart / stop_after as for every
    trainer: student/run/resume.py); returns the per-step losses of this call.

    Under `torchrun --nproc_per_node=N` each rank takes its 1/N part of every global batch (DDP); the
    heads' BatchNorm, the counterfactual contributions and the mean gates cover the global batch, so the
    run follows one process's; rank 0 alone writes the run folder."""
    cfg.validate()
    with Harness("tiger", cfg.out, request, cfg.device) as h:
        recorded = h.open(cfg, cfg.batch_size)
        crop = cfg.input_size()
        data = train_data(cfg, recorded)
        source = cached_source(cfg, data, crop) if cfg.cache else named_source(cfg, crop, h.device)
        emb, identity = run_instructions(cfg, h.folder, list(data.outputs), h.resuming)
        grid = tuple(cfg.grid) if cfg.grid else (crop[0] // 16, crop[1] // 16)
        mcfg = TigerModelConfig(
            experts=tuple(source.experts), tasks=tuple(data.outputs.items()), grid=grid,
            text_dim=int(emb.shape[1]), dim=cfg.dim, router_hidden=cfg.router_hidden,
        )  # fmt: skip
        if h.model_record is not None and h.model_record.tiger != mcfg:
            raise SakError(
                f"--resume {h.run}: the experts, tasks or grid these options give differ from the run's model "
                f"({h.model_record.tiger} vs {mcfg})"
            )
        torch.manual_seed(cfg.seed)
        model = Tiger(mcfg, emb).to(h.device)
        optimizer, scheduler = cfg.optimizer(model.parameters())
        parts = TrainingParts(
            model=model, optimizer=optimizer, scheduler=scheduler,
            describe=lambda step: ModelRecord(
                run="tiger", step=step, tiger=model.config, weights_sha256="",
                num_parameters=sum(p.numel() for p in model.parameters()), code_version=code_version(), saved="",
            ),
            loader_state=lambda step: LoaderState(batches=step),
        )  # fmt: skip
        start = h.restore(parts)
        h.check_length(cfg.steps)
        if not h.resuming and h.is_main:
            h.folder.save_instructions(emb, identity)
        h.write_record(_run_record(cfg, model, data, source, identity, h))
        if h.is_main:
            log.info(
                f"TIGER: {len(mcfg.experts)} experts x {mcfg.num_levels} levels x {list(data.outputs)}, "
                f"{'cached targets' if cfg.cache else 'live teachers'}, steps {start + 1}..{cfg.steps}, "
                f"{h.env.world_size} process(es), run {h.run}"
            )
        train_model = wrap_ddp(model, h.env)
        weights = cfg.loss_weights()
        step_no = [start]

        def train_step(batch: dict) -> dict:
            step_no[0] += 1
            return tiger_step(cfg, model, source, batch, weights, optimizer, scheduler, h.device, train_model,
                              step=step_no[0])  # fmt: skip

        model.train()
        done = h.loop(
            parts, batch_stream(cfg, data, crop, start, h.env), train_step, total_steps=cfg.steps,
            checkpoint_every=cfg.checkpoint_every, log_every=cfg.log_every, batch_size=cfg.batch_size,
            log_line=lambda r: f"loss {r['loss']:.4f} | cf {r['cf']:.4f}", on_step=on_step,
        )  # fmt: skip
    return RunResult.of(h, done, model)


def tiger_step(
    cfg, model, source, batch, weights, optimizer, scheduler, device, train_model=None, step: int = 1
) -> dict:
    """One optimizer step: task losses + cf_weight x counterfactual loss (every cf_every steps, over
    cf_experts sampled experts); the numbers for metrics.jsonl. train_model: the DDP-wrapped model under
    torchrun (forward and gradient averaging), else model."""
    images = batch["images"]
    maps = source.fetch(batch, images, device)
    targets = {t: v.to(device) for t, v in batch["labels"].items()}
    out = (train_model or model)(maps, tuple(images.shape[-2:]))
    task_loss, parts = multi_task_loss(out.preds, targets, weights)
    loss, routing, cf = task_loss, {}, None
    if cfg.cf_weight > 0 and step % cfg.cf_every == 0:
        sampled = sample_experts(list(out.gates), out.num_experts, cfg.cf_experts, cfg.seed, step)
        cf, routing = counterfactual_loss(model, out, targets, tuple(images.shape[-2:]), cfg.cf_tau, sampled)
        loss = task_loss + cfg.cf_weight * cf
    lr = optimizer.param_groups[0]["lr"]
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    grad_norm = clip_gradients(model.parameters(), cfg.grad_clip)
    optimizer.step()
    scheduler.step()
    logged = [loss, task_loss, *parts.values(), cf if cf is not None else torch.zeros_like(loss)]
    values = rank_mean_value(torch.stack([x.detach().float() for x in logged])).tolist()  # global batch
    return {
        "loss": values[0],
        "task_loss": values[1],
        **{f"loss/{t}": v for t, v in zip(parts, values[2:])},
        "cf": values[-1],
        "lr": lr,
        "grad_norm": float(grad_norm),
        "routing": routing,
    }
