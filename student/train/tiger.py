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

RUN/ config.json (kind sak-tiger-run, config, experts, teachers and where they come from, instructions'
identity), instructions.json/.safetensors, metrics.jsonl, checkpoint/ (model.safetensors, model.json,
state.pt: optimizer, scheduler, step; `--resume` continues exactly: same remaining losses).
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from sak.pipeline.base.errors import SakError
from sak.pipeline.base.provenance import code_version, now_iso, read_json, sha256_file, write_json_atomic
from sak.pipeline.buckets.bucket import is_url
from sak.pipeline.teachers.weights import weights_field
from sak.student.data.dense import (
    DenseDataset,
    TrainSamples,
    collate,
    parse_img_size,
)
from sak.student.model.instructions import (
    load_instructions,
    save_instructions,
)
from sak.student.model.tiger import ExpertSpec, Tiger, TigerModelConfig
from sak.student.train.counterfactual import (  # noqa: F401  (re-exported: TIGER's loss)
    batchnorm_stats_frozen,
    counterfactual_loss,
    exclude_expert,
    expert_contributions,
    sample_experts,
)
from sak.student.train.dense_config import (
    OPTIMISATION,
    DenseTrainConfig,
    device_field,
    log_every_field,
    num_workers_field,
)
from sak.student.train.distributed import (
    DistEnv,
    barrier,
    init_distributed,
    rank_mean_value,
    rank_positions,
    shutdown,
    wrap_ddp,
)
from sak.student.train.losses import clip_gradients
from sak.student.train.routing_options import (
    cf_every_field,
    cf_experts_field,
    cf_tau_field,
    cf_weight_field,
    instructions_field,
    router_hidden_field,
    run_instructions,
    text_model_field,
    text_pretrained_field,
    validate_routing,
)
from sak.student.train.stage2_teachers import Stage2Teachers, load_stage1_run
from sak.student.train.task_losses import multi_task_loss

log = logging.getLogger("sak")

TIGER_KIND = "sak-tiger-run"
RUN_CONFIG = "config.json"
METRICS = "metrics.jsonl"
CKPT = "checkpoint"


@dataclass(frozen=True, kw_only=True)
class TigerConfig(DenseTrainConfig):
    """Every option of `sak-train tiger` (defaults are ours: the paper's are not public). Dataset,
    optimisation, loss weights and augmentation: DenseTrainConfig (shared with stage 2)."""

    out: str = field(metadata={"help": "Run folder: config.json, metrics.jsonl, checkpoint/."})
    cache: str | None = field(
        default=None,
        metadata={
            "help": "A stage-2 target cache (`sak-cache stage2`; folder or URL): no teacher in memory."
        },
    )
    online: bool = field(
        default=False, metadata={"help": "Run the --teachers live on the same views instead."}
    )
    teachers: tuple[str, ...] = field(
        default=(), metadata={"help": "With --online: teachers by name, e.g. dinov2_l,clip_l,sam_l."}
    )
    weights: tuple[tuple[str, str], ...] = weights_field(
        "With --online: local weights of a named teacher (repeatable)."
    )
    random_init: bool = field(
        default=False, metadata={"help": "With --online: random-init named teachers (tests; flagged)."}
    )
    tasks: tuple[str, ...] = field(
        default=(), metadata={"help": "Comma list of tasks [default: all of the dataset's]."}
    )
    instructions: str | None = instructions_field()
    text_model: str = text_model_field()
    text_pretrained: str | None = text_pretrained_field()
    dim: int = field(default=256, metadata={"help": "Width D of the projected experts and the heads."})
    router_hidden: int = router_hidden_field()
    grid: tuple[int, int] | None = field(
        default=None,
        metadata={"help": "Common token grid HxW [default: crop / 16].", "parse": parse_img_size},
    )
    cf_weight: float = cf_weight_field()
    cf_tau: float = cf_tau_field()
    cf_experts: int | None = cf_experts_field()
    cf_every: int = cf_every_field()
    batch_size: int = field(default=8, metadata={"help": "Images per step.", "group": OPTIMISATION})
    lr: float = field(
        default=1e-4,
        metadata={"help": "AdamW learning rate (polynomial decay 0.9).", "group": OPTIMISATION},
    )
    img_size: tuple[int, int] | None = field(
        default=None,
        metadata={"help": "HxW crop [default: the dataset's; must be the cache's].", "parse": parse_img_size},
    )
    seed: int = field(default=0, metadata={"help": "Init, data order, augmentation (the cache's --seed)."})
    num_workers: int = num_workers_field()
    log_every: int = log_every_field()
    checkpoint_every: int = field(
        default=500, metadata={"help": "Save a resumable checkpoint every N steps."}
    )
    resume: bool = field(default=False, metadata={"help": "Continue the run in --out exactly."})
    device: str | None = device_field()

    @classmethod
    def debug(cls, dataset: str, data_root: str, out: str, **overrides: Any) -> TigerConfig:
        base: dict[str, Any] = dict(
            steps=10, batch_size=2, img_size=(64, 64), num_workers=0, log_every=5, dim=32, router_hidden=16,
            text_model="ViT-S-32-alt", text_pretrained=None, lr=1e-3,
        )  # fmt: skip
        return cls(dataset=dataset, data_root=data_root, out=out, **{**base, **overrides})

    def validate(self) -> None:
        if bool(self.cache) == bool(self.online):
            raise SakError("give one of --cache S2CACHE and --online (with --teachers)")
        if self.online and not self.teachers:
            raise SakError("--online runs teachers by name: pass --teachers dinov2_l,clip_l,sam_l")
        validate_routing(self)
        if self.dim % 4:
            raise SakError(f"--dim {self.dim}: must be a multiple of 4 (the heads split it over 4 levels)")
        self.validate_training()


# ----------------------------------------------------------------------------------------------
# where the teacher maps come from


@dataclass
class TeacherSource:
    """A callable giving {teacher: [(B, h, w, C)]} for a batch, the experts it yields, and its record."""

    fetch: Any  # (batch, images_u8, device) -> maps
    experts: list[ExpertSpec]
    record: dict  # what config.json keeps: enough to rebuild live teachers for evaluation


def _valid(teacher: str, crop: tuple[int, int]) -> tuple[float, float]:
    from sak.pipeline.teachers.specs import get_teacher

    if get_teacher(teacher).fixed_input is None:
        return (1.0, 1.0)
    side = max(crop)
    return (crop[0] / side, crop[1] / side)


def _live_experts(teachers: Stage2Teachers, crop: tuple[int, int]) -> list[ExpertSpec]:
    return [
        ExpertSpec(s.teacher, int(b), i, teachers.teachers[s.teacher].spec.dim, _valid(s.teacher, crop))
        for s in teachers.stores
        for i, b in enumerate(s.blocks)
    ]


def _cached_source(cfg: TigerConfig, data: DenseDataset, crop: tuple[int, int]) -> TeacherSource:
    from sak.student.data.stage2_cache import Stage2CachedTargets

    expected = cfg.cache_identity(data, crop)
    targets = Stage2CachedTargets(cfg.cache, expected, cfg.steps, cfg.batch_size)
    cache = targets.cache
    experts = [
        ExpertSpec(t.teacher, int(b), i, int(t.grids[i][2]), _valid(t.teacher, crop))
        for t in cache.teachers
        for i, b in enumerate(t.blocks)
    ]
    record = {
        "source": "cache",
        "cache": cfg.cache if is_url(cfg.cache) else str(Path(cfg.cache).expanduser().resolve()),
        "init": cache.init,
        "teachers": [
            {
                "teacher": t.teacher,
                "fingerprint": t.stage1_fingerprint,
                "weights": dataclasses.asdict(t.weights) if t.weights else None,
                "seed": t.seed,
            }
            for t in cache.teachers
        ],
    }
    return TeacherSource(lambda batch, images, device: targets(batch, images, device), experts, record)


def _online_source(cfg: TigerConfig, crop: tuple[int, int], device: torch.device) -> TeacherSource:
    teachers = Stage2Teachers.named(cfg.teachers, dict(cfg.weights), cfg.random_init, cfg.seed, crop, device)
    record = {
        "source": "named",
        "init": None,
        "teachers": [
            {"teacher": s.teacher, "fingerprint": s.fingerprint, "weights": s.weights, "seed": s.seed}
            for s in teachers.stores
        ],
    }
    return TeacherSource(lambda batch, images, dev: teachers(images), _live_experts(teachers, crop), record)


def live_teachers(record: dict, crop: tuple[int, int], device: torch.device) -> Stage2Teachers:
    """Rebuild a run's teachers (for evaluation on images no cache holds); fingerprints must match."""
    if record.get("init"):
        _, stage1 = load_stage1_run(record["init"], device)
        teachers = Stage2Teachers(stage1, crop, device)
    else:
        ts = record["teachers"]
        files = {
            t["teacher"]: t["weights"]["path"]
            for t in ts
            if t["weights"] and t["weights"]["source"] == "file"
        }
        random_init = any(t["weights"] and t["weights"]["source"] == "random" for t in ts)
        seed = next((t["seed"] for t in ts if t["seed"] is not None), 0)
        teachers = Stage2Teachers.named([t["teacher"] for t in ts], files, random_init, seed, crop, device)
    have = [s.fingerprint for s in teachers.stores]
    want = [t["fingerprint"] for t in record["teachers"]]
    if have != want:
        raise SakError(f"the run's teachers cannot be rebuilt as they were: fingerprints {have} != {want}")
    return teachers


# ----------------------------------------------------------------------------------------------
# the counterfactual loss


# ----------------------------------------------------------------------------------------------
# training


@dataclass
class TigerResult:
    run: Path
    steps: int
    losses: list[float] = field(default_factory=list)  # total loss per step run in this call
    records: list[dict] = field(default_factory=list, repr=False)
    model: Tiger | None = field(default=None, repr=False)


def save_checkpoint(run: Path, model: Tiger, optimizer, scheduler, step: int) -> None:
    d = run / CKPT
    d.mkdir(parents=True, exist_ok=True)
    tensors = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
    save_file(tensors, str(d / "model.safetensors.tmp"))
    torch.save(
        {"optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(), "step": step},
        d / "state.pt.tmp",
    )
    (d / "model.safetensors.tmp").replace(d / "model.safetensors")
    (d / "state.pt.tmp").replace(d / "state.pt")
    write_json_atomic(
        d / "model.json",
        {
            "kind": "sak-tiger",
            "model": model.config.to_dict(),
            "step": step,
            "weights_sha256": sha256_file(d / "model.safetensors"),
            "state_sha256": sha256_file(d / "state.pt"),
            "code_version": code_version(),
            "saved": now_iso(),
        },
    )


def load_tiger(run: str | Path, device: torch.device | str = "cpu") -> tuple[Tiger, dict]:
    """The model of a TIGER run's checkpoint (checksum-verified) and its model.json."""
    run = Path(run).expanduser()
    d = run / CKPT
    if not (d / "model.json").exists():
        raise SakError(f"{run} holds no TIGER checkpoint ({CKPT}/model.json)")
    meta = read_json(d / "model.json")
    if meta.get("kind") != "sak-tiger":
        raise SakError(f"{d / 'model.json'} is not a TIGER checkpoint (kind {meta.get('kind')!r})")
    if sha256_file(d / "model.safetensors") != meta["weights_sha256"]:
        raise SakError(f"{d / 'model.safetensors'} does not match its recorded checksum")
    emb, _ = load_instructions(run)
    model = Tiger(TigerModelConfig.from_dict(meta["model"]), emb)
    model.load_state_dict(load_file(str(d / "model.safetensors")), strict=True)
    return model.to(device), meta


def _start(cfg: TigerConfig, run: Path) -> bool:
    """True when resuming; refuses a non-empty --out without --resume and a --resume of another config."""
    if not cfg.resume:
        if (run / RUN_CONFIG).exists() or (run / CKPT).exists():
            raise SakError(f"{run} already holds a run; choose another --out or pass --resume")
        return False
    if not (run / CKPT / "state.pt").exists():
        raise SakError(f"--resume {run}: no checkpoint to resume from ({CKPT}/state.pt)")
    old = read_json(run / RUN_CONFIG)["config"]
    new = {**cfg.to_dict(), "resume": old["resume"]}
    diff = [k for k in new if k in old and new[k] != old[k]]  # options added since: their defaults
    if diff:
        raise SakError(
            f"--resume {run}: options differ from the run's ({', '.join(diff)}); resume with the same"
        )
    return True


def train_tiger(cfg: TigerConfig) -> TigerResult:
    """Train TIGER's projections, routers and heads; returns the per-step losses of this call.

    Under `torchrun --nproc_per_node=N` each rank takes its 1/N part of every global batch (DDP); the
    heads' BatchNorm, the counterfactual contributions and the mean gates cover the global batch, so the
    run follows one process's; rank 0 alone writes the run folder."""
    cfg.validate()
    env = init_distributed(cfg.device)
    try:
        result = _train_tiger(cfg, env)
    except BaseException:
        shutdown(env, wait=False)  # the other ranks may never reach a barrier
        raise
    shutdown(env)
    return result


def _train_tiger(cfg: TigerConfig, env: DistEnv) -> TigerResult:
    if cfg.batch_size % env.world_size:
        raise SakError(f"--batch-size {cfg.batch_size} is not divisible by the {env.world_size} processes")
    device = env.device
    run = Path(cfg.out).expanduser()
    resume = _start(cfg, run)
    barrier(env)  # every rank has looked at --out before rank 0 writes to it
    crop = cfg.input_size()
    data = DenseDataset(cfg.dataset, cfg.data_root, "train", cfg.tasks)
    source = _cached_source(cfg, data, crop) if cfg.cache else _online_source(cfg, crop, device)
    emb, identity = run_instructions(cfg, run, list(data.outputs), resume)
    grid = tuple(cfg.grid) if cfg.grid else (crop[0] // 16, crop[1] // 16)
    mcfg = TigerModelConfig(
        experts=tuple(source.experts),
        tasks=tuple(data.outputs.items()),
        grid=grid,
        text_dim=int(emb.shape[1]),
        dim=cfg.dim,
        router_hidden=cfg.router_hidden,
    )
    torch.manual_seed(cfg.seed)
    model = Tiger(mcfg, emb).to(device)
    optimizer, scheduler = cfg.optimizer(model.parameters())
    start = 0
    if resume:
        start = _restore(run, model, optimizer, scheduler, device, trim=env.is_main)
    elif env.is_main:
        run.mkdir(parents=True, exist_ok=True)
        save_instructions(run, emb, identity)
        write_json_atomic(
            run / RUN_CONFIG,
            {
                "kind": TIGER_KIND,
                "config": cfg.to_dict(),
                "dataset": cfg.dataset,
                "img_size": list(crop),
                "tasks": data.outputs,
                "experts": model.expert_names,
                "teachers": source.record,
                "instructions": identity.to_dict(),
                "trainable_parameters": sum(p.numel() for p in model.parameters() if p.requires_grad),
                "router_parameters": sum(p.numel() for p in model.router_parameters()),
                "train_images": len(data),
                "device": str(device),
                "world_size": env.world_size,
                "code_version": code_version(),
                "created": now_iso(),
            },
        )
    barrier(env)
    log.info(
        f"TIGER: {len(mcfg.experts)} experts x {mcfg.num_levels} levels x {list(data.outputs)}, "
        f"{'cached targets' if cfg.cache else 'live teachers'}, steps {start + 1}..{cfg.steps}, "
        f"{env.world_size} process(es), run {run}"
    )
    return _loop(cfg, run, model, source, data, optimizer, scheduler, start, env)


def _restore(run: Path, model: Tiger, optimizer, scheduler, device: torch.device, trim: bool = True) -> int:
    meta = read_json(run / CKPT / "model.json")
    for name, key in (("model.safetensors", "weights_sha256"), ("state.pt", "state_sha256")):
        if sha256_file(run / CKPT / name) != meta[key]:
            raise SakError(f"{run / CKPT / name} does not match its recorded checksum")
    model.load_state_dict(load_file(str(run / CKPT / "model.safetensors"), device=str(device)), strict=True)
    state = torch.load(run / CKPT / "state.pt", map_location=device, weights_only=True)
    optimizer.load_state_dict(state["optimizer"])
    scheduler.load_state_dict(state["scheduler"])
    step = int(state["step"])
    if trim:  # rank 0 alone
        lines = (run / METRICS).read_text().splitlines() if (run / METRICS).exists() else []
        kept = [ln for ln in lines if ln.strip() and json.loads(ln).get("step", 0) <= step]
        (run / METRICS).write_text("".join(ln + "\n" for ln in kept))  # steps after the checkpoint re-run
    return step


def _loop(cfg, run, model, source, data, optimizer, scheduler, start, env: DistEnv) -> TigerResult:
    crop = cfg.input_size()
    weights = cfg.loss_weights()
    loader = torch.utils.data.DataLoader(
        TrainSamples(data, crop, cfg.seed, cfg.scale_range, cfg.photometric),
        batch_size=cfg.batch_size // env.world_size,
        sampler=rank_positions(start, cfg.steps, cfg.batch_size, env),
        num_workers=cfg.num_workers,
        collate_fn=collate,
    )
    train_model = wrap_ddp(model, env)
    result = TigerResult(run=run, steps=start, model=model)
    model.train()
    t0 = time.perf_counter()
    with open(run / METRICS, "a") if env.is_main else contextlib.nullcontext() as metrics:
        for step, batch in enumerate(loader, start=start + 1):
            numbers = tiger_step(cfg, model, source, batch, weights, optimizer, scheduler, env.device, train_model,
                                 step=step)  # fmt: skip
            record = {"kind": "train", "step": step, **numbers}
            record["elapsed_s"] = time.perf_counter() - t0
            if metrics is not None:
                metrics.write(json.dumps(record) + "\n")
                metrics.flush()
            result.losses.append(record["loss"])
            result.records.append(record)
            result.steps = step
            if env.is_main and (step % max(1, cfg.log_every) == 0 or step == start + 1):
                log.info(f"step {step}/{cfg.steps} | loss {record['loss']:.4f} | cf {record['cf']:.4f}")
            if cfg.checkpoint_every and step % cfg.checkpoint_every == 0 and step < cfg.steps:
                if env.is_main:
                    save_checkpoint(run, model, optimizer, scheduler, step)
                barrier(env)  # a restart after this step finds the checkpoint on every rank
    if env.is_main:
        save_checkpoint(run, model, optimizer, scheduler, result.steps)
        log.info(f"TIGER done: {result.steps} steps; checkpoint {run / CKPT}")
    barrier(env)  # the run folder is complete when any rank returns
    return result


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
