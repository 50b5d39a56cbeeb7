"""Stage 2 of SAK: routers + task heads fine-tuned on a dense multi-task dataset, then evaluated.

    stage-1 RUN (--init): checkpoint/student.safetensors + config.json (cache, stores, input normalisation)
      -> resize_stem_input to the stage-2 input (512x512 PASCAL, 448x576 NYUD) -> SakMultiTask (mor | sum)
    TrainSamples: scale 0.5-2, pad + crop, flip, photometric, from a replayable plan (data/dense.py)
      images (B, 3, H, W) uint8 -> student: normalised float; teachers (--online): the same uint8 pixels
    loss = multi_task_loss (weights 1/2/5/10/50/1) + gamma * distillation_loss (live teachers, rebuilt from
           the stage-1 stores exactly as online.py does; SAM at its fixed side, others at the input size)
    AdamW (lr 2e-5, wd 1e-6), polynomial decay (power 0.9), no warm-up, clip 10; paper Table 11
    RUN/metrics.jsonl  step, loss, loss/<task>, distill, lr, grad_norm per step
    RUN/config.json    resolved run + code version
    RUN/checkpoint/    model.safetensors (SakMultiTask state_dict) + model.json (configs, tasks, sha256)
evaluate(RUN, ...) -> RUN/eval.json (one number per metric, delta_m), routers.png, predictions.png

With --freeze-backbone only routers and heads train; the distillation loss then has no gradient to give
and is not computed (no teachers are loaded). With --cache the targets come from a stage-2 target cache
(stage2_cache.py: `sak-cache stage2`) built for the same dataset, images, seed, crop, augmentation and
stage-1 teachers; a batch's rows (epoch * N + image) index it, and each image is checked against its sha256.
"""

from __future__ import annotations

import contextlib
import json
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from sak.pipeline.errors import SakError
from sak.pipeline.manifest import now_iso
from sak.pipeline.provenance import code_version, read_json, sha256_file, write_json_atomic
from sak.pipeline.teachers import normalize_u8
from sak.student.data.dense import (
    DenseDataset,
    TrainSamples,
    collate,
    parse_img_size,
)
from sak.student.model.instructions import save_instructions
from sak.student.model.multitask import SakMultiTask, resize_stem_input
from sak.student.model.student import SakStudent, StudentConfig
from sak.student.train.checkpoint import RUN_CONFIG
from sak.student.train.counterfactual import counterfactual_loss, sample_experts
from sak.student.train.dense_config import (
    OPTIMISATION,
    DenseTrainConfig,
    device_field,
    log_every_field,
    num_workers_field,
)
from sak.student.train.dense_eval import EvalModel, evaluate_dense, format_table  # noqa: F401
from sak.student.train.distributed import (
    DistEnv,
    barrier,
    init_distributed,
    rank_mean_value,
    rank_positions,
    resolve_device,
    shutdown,
    wrap_ddp,
)
from sak.student.train.losses import clip_gradients, distillation_loss
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
from sak.student.train.stage2_teachers import Stage2Teachers, load_stage1_run, student_levels
from sak.student.train.task_losses import multi_task_loss

log = logging.getLogger("sak")

TIGER_GROUP = "tiger router"  # --help lists these options last
METRICS = "metrics.jsonl"
STAGE2_DIR = "checkpoint"
STAGE2_KIND = "sak-stage2"


@dataclass(frozen=True, kw_only=True)
class Stage2Config(DenseTrainConfig):
    """Stage-2 fine-tuning; defaults are the paper's (Table 11, B.3, B.5). Each field's help (metadata)
    is also its `sak-train stage2` option's help. Dataset, optimisation, loss weights and augmentation:
    DenseTrainConfig (shared with TIGER)."""

    init: str = field(metadata={"help": "The stage-1 run folder.", "metavar": "RUN"})
    out: str = field(metadata={"help": "Run folder: config.json, metrics.jsonl, checkpoint/."})
    tasks: tuple[str, ...] = field(
        default=(), metadata={"help": "Comma list of tasks [default: all of the dataset's]."}
    )
    online: bool = field(
        default=False,
        metadata={"help": "Distillation targets from live teachers (the stage-1 stores')."},
    )
    cache: str | None = field(
        default=None,
        metadata={
            "help": "A stage-2 target cache (`sak-cache stage2`; folder or URL) instead of live teachers."
        },
    )
    router: str = field(
        default="mor",
        metadata={
            "help": "mor: mixture of routers (the paper); sum: plain sum (ablation); tiger: TIGER's "
            "token-level instruction router over the same experts.",
            "choices": ("mor", "sum", "tiger"),
        },
    )
    freeze_backbone: bool = field(default=False, metadata={"help": "Train routers and heads only."})
    # the paper's schedule (the base's place and help, other defaults)
    steps: int = field(default=40_000, metadata={"help": "Training iterations.", "group": OPTIMISATION})
    batch_size: int = field(default=4, metadata={"help": "Global batch size.", "group": OPTIMISATION})
    lr: float = field(default=2e-5, metadata={"help": "AdamW learning rate.", "group": OPTIMISATION})
    weight_decay: float = field(default=1e-6, metadata={"help": "AdamW weight decay.", "group": OPTIMISATION})
    gamma: float = field(
        default=1.0, metadata={"help": "Weight of the distillation loss (eq. 6).", "group": OPTIMISATION}
    )
    img_size: tuple[int, int] | None = field(
        default=None,
        metadata={"help": "HxW input [default: 512x512 PASCAL, 448x576 NYUD].", "parse": parse_img_size},
    )
    seed: int = field(
        default=0, metadata={"help": "Head/router initialisation, data order and augmentation."}
    )
    num_workers: int = num_workers_field()
    log_every: int = log_every_field()
    device: str | None = device_field()
    checkpoint_every: int = field(
        default=1000,
        metadata={"help": "Save a resumable checkpoint (weights, optimizer, step) every N steps."},
    )
    resume: bool = field(
        default=False,
        metadata={"help": "Continue the run in --out from its checkpoint: same remaining losses."},
    )
    # --router tiger (student/train/routing_options.py; the same options as `sak-train tiger`)
    instructions: str | None = instructions_field(TIGER_GROUP)
    text_model: str = text_model_field(TIGER_GROUP)
    text_pretrained: str | None = text_pretrained_field(TIGER_GROUP)
    router_hidden: int = router_hidden_field(TIGER_GROUP)
    cf_weight: float = cf_weight_field(TIGER_GROUP)
    cf_tau: float = cf_tau_field(TIGER_GROUP)
    cf_experts: int | None = cf_experts_field(TIGER_GROUP)
    cf_every: int = cf_every_field(TIGER_GROUP)

    @classmethod
    def debug(cls, dataset: str, data_root: str, init: str, out: str, **overrides: Any) -> Stage2Config:
        """Runs on a CPU in seconds: 64x64 input, 10 steps of 2, no workers."""
        base: dict[str, Any] = dict(steps=10, batch_size=2, img_size=(64, 64), num_workers=0, log_every=5)
        return cls(dataset=dataset, data_root=data_root, init=init, out=out, **{**base, **overrides})

    def validate(self) -> None:
        if self.cache is not None and self.online:
            raise SakError("give one of --online and --cache, not both")
        needs_teachers = self.gamma > 0 and not self.freeze_backbone
        if needs_teachers and not (self.online or self.cache):
            raise SakError("stage 2 distils from the teachers: pass --online or --cache (or --gamma 0)")
        if self.router not in ("mor", "sum", "tiger"):
            raise SakError(f"--router must be mor, sum or tiger, got {self.router!r}")
        validate_routing(self)
        self.validate_training()


# ----------------------------------------------------------------------------------------------
# checkpoints


def save_stage2(run: Path, model: SakMultiTask, meta: dict) -> Path:
    d = run / STAGE2_DIR
    d.mkdir(parents=True, exist_ok=True)
    tensors = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
    save_file(tensors, str(d / "model.safetensors"), metadata={"code_version": code_version()})
    write_json_atomic(
        d / "model.json",
        {
            "kind": STAGE2_KIND,
            **meta,
            "student": model.student.config.to_dict(),
            "tasks": model.tasks,
            "router": model.router_kind,
            **_tiger_shape(model),
            "code_version": code_version(),
            "weights_sha256": sha256_file(d / "model.safetensors"),
            "saved": now_iso(),
        },
    )
    return d


def _tiger_shape(model: SakMultiTask) -> dict:
    """What load_stage2 needs to rebuild a tiger router (the weights file holds its instruction buffer)."""
    if model.router_kind != "tiger":
        return {}
    return {"text_dim": int(model.instructions.shape[1]), "router_hidden": model.router_hidden}


def load_stage2(run: str | Path, device: torch.device | str = "cpu") -> tuple[SakMultiTask, dict]:
    """Rebuild SakMultiTask from RUN/checkpoint/model.json and load its weights (checksum-verified)."""
    d = Path(run).expanduser() / STAGE2_DIR
    if not (d / "model.json").exists():
        raise SakError(f"{run} holds no stage-2 checkpoint ({STAGE2_DIR}/model.json)")
    meta = read_json(d / "model.json")
    if meta.get("kind") != STAGE2_KIND:
        raise SakError(f"{d / 'model.json'} is not a stage-2 checkpoint (kind {meta.get('kind')!r})")
    if sha256_file(d / "model.safetensors") != meta["weights_sha256"]:
        raise SakError(f"{d / 'model.safetensors'} does not match its recorded checksum")
    config = StudentConfig.from_dict({**meta["student"], "pretrained": False})
    student = SakStudent(config)
    resize_stem_input(student, tuple(meta["img_size"]))
    instructions = None
    if meta["router"] == "tiger":  # a placeholder of the right shape: the weights file holds the buffer
        instructions = torch.zeros(len(meta["tasks"]), int(meta["text_dim"]))
    model = SakMultiTask(
        student, meta["tasks"], meta["router"], instructions, int(meta.get("router_hidden", 64))
    )
    model.load_state_dict(load_file(str(d / "model.safetensors")), strict=True)
    return model.to(device), meta


# ----------------------------------------------------------------------------------------------
# training


@dataclass
class Stage2Result:
    run: Path
    steps: int
    losses: list[float] = field(default_factory=list)  # total loss per step
    records: list[dict] = field(default_factory=list, repr=False)
    model: SakMultiTask | None = field(default=None, repr=False)


def train_stage2(cfg: Stage2Config) -> Stage2Result:
    """Fine-tune routers, heads (and, unless frozen, the whole student) on the dataset's tasks.

    Under `torchrun --nproc_per_node=N` each rank takes its 1/N part of every global batch (DDP; the
    heads' BatchNorm normalises over the global batch); rank 0 alone writes the run folder."""
    cfg.validate()
    env = init_distributed(cfg.device)
    try:
        result = _train_stage2(cfg, env)
    except BaseException:
        shutdown(env, wait=False)  # the other ranks may never reach a barrier
        raise
    shutdown(env)
    return result


def _train_stage2(cfg: Stage2Config, env: DistEnv) -> Stage2Result:
    device = env.device
    if cfg.batch_size % env.world_size:
        raise SakError(f"--batch-size {cfg.batch_size} is not divisible by the {env.world_size} processes")
    run = Path(cfg.out).expanduser()
    resuming = _check_resume(cfg, run)
    barrier(env)  # every rank has looked at --out before rank 0 writes to it
    img_size = cfg.input_size()
    data = DenseDataset(cfg.dataset, cfg.data_root, "train", cfg.tasks)
    student, stage1 = load_stage1_run(cfg.init, device)
    resize_stem_input(student, img_size)
    emb, identity = None, None
    if cfg.router == "tiger":
        emb, identity = run_instructions(cfg, run, list(data.outputs), resuming)
    torch.manual_seed(cfg.seed)
    model = SakMultiTask(student, data.outputs, cfg.router, emb, cfg.router_hidden).to(device)  # type: ignore[arg-type]
    if cfg.freeze_backbone:
        model.freeze_backbone()
    teachers = _distillation_targets(cfg, data, stage1, img_size, device)
    optimizer, scheduler = cfg.optimizer(model.trainable_parameters())
    meta = _run_meta(cfg, stage1, img_size)
    if identity is not None:
        meta["instructions"] = identity.to_dict()  # the texts and the encoder that made the embeddings
    start = _restore(run, model, optimizer, scheduler, device, env.is_main) if resuming else 0
    if not resuming and env.is_main:
        _write_run_record(run, meta, data, cfg.loss_weights(), model, device, env.world_size)
        if identity is not None:
            save_instructions(run, emb, identity)
    barrier(env)
    train_model = wrap_ddp(model, env, find_unused=teachers is None)  # the aligners idle without targets
    loader = torch.utils.data.DataLoader(
        TrainSamples(data, img_size, cfg.seed, cfg.scale_range, cfg.photometric),
        batch_size=cfg.batch_size // env.world_size,
        sampler=rank_positions(start, cfg.steps, cfg.batch_size, env),
        num_workers=cfg.num_workers,
        collate_fn=collate,
        generator=torch.Generator().manual_seed(cfg.seed),  # not the global RNG (the routers' noise)
    )
    log.info(
        f"stage 2: {student.config.name} + {cfg.router} routers on {cfg.dataset} {list(data.tasks)}, "
        f"{cfg.steps} steps of {cfg.batch_size} at {img_size[0]}x{img_size[1]}, "
        f"{('cached targets' if cfg.cache else 'live teachers') if teachers else 'no distillation'}, "
        f"{env.world_size} process(es), run {run}"
    )
    step_of = _Stage2Step(cfg, model, teachers, optimizer, scheduler, stage1, device, train_model)
    step_of.step = start + 1
    result = Stage2Result(run=run, steps=start, model=model)
    model.train()
    t_start = time.perf_counter()
    with open(run / METRICS, "a") if env.is_main else contextlib.nullcontext() as metrics:
        for step, batch in enumerate(loader, start=start + 1):
            record = {
                "kind": "train",
                "step": step,
                **step_of(batch),
                "elapsed_s": time.perf_counter() - t_start,
            }
            if metrics is not None:
                metrics.write(json.dumps(record) + "\n")
                metrics.flush()
            result.losses.append(record["loss"])
            result.records.append(record)
            result.steps = step
            if env.is_main and (step % max(1, cfg.log_every) == 0 or step == 1):
                log.info(f"step {step}/{cfg.steps} | loss {record['loss']:.4f} | lr {record['lr']:.2e}")
            if cfg.checkpoint_every and step % cfg.checkpoint_every == 0 and step < cfg.steps:
                if env.is_main:
                    save_stage2(run, model, {**meta, "step": step})
                    _save_state(run, optimizer, scheduler, step)
                barrier(env)  # a restart after this step finds the checkpoint on every rank
    if env.is_main:
        save_stage2(run, model, {**meta, "step": result.steps})
        _save_state(run, optimizer, scheduler, result.steps)
        log.info(f"stage 2 done: {result.steps} steps; checkpoint {run / STAGE2_DIR}")
    barrier(env)  # the run folder is complete when any rank returns
    return result


STATE = "state.pt"  # optimizer, scheduler and step beside the weights (torch.load weights_only)


def _check_resume(cfg: Stage2Config, run: Path) -> bool:
    if not cfg.resume:
        if (run / STAGE2_DIR).exists() or (run / RUN_CONFIG).exists():
            raise SakError(f"{run} already holds a run; choose another --out or pass --resume")
        return False
    if not (run / STAGE2_DIR / STATE).exists():
        raise SakError(f"--resume {run}: no checkpoint to resume from ({STAGE2_DIR}/{STATE})")
    old = read_json(run / RUN_CONFIG)["stage2"]
    new = {**cfg.to_dict(), "resume": old.get("resume", False)}
    diff = [k for k in new if k in old and new[k] != old[k]]
    if diff:
        raise SakError(
            f"--resume {run}: options differ from the run's ({', '.join(diff)}); resume with the same"
        )
    return True


def _save_state(run: Path, optimizer, scheduler, step: int) -> None:
    d = run / STAGE2_DIR
    state = {"optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(), "step": step}
    state["rng"] = torch.get_rng_state()  # the routers' noisy gating draws from it
    if torch.cuda.is_available():
        state["cuda_rng"] = torch.cuda.get_rng_state_all()
    torch.save(state, d / (STATE + ".tmp"))
    (d / (STATE + ".tmp")).replace(d / STATE)


def _restore(
    run: Path, model: SakMultiTask, optimizer, scheduler, device: torch.device, trim: bool = True
) -> int:
    """Weights (checksum-verified), optimizer and scheduler of the run's checkpoint; metrics trimmed
    (by rank 0 alone: trim=False on the others)."""
    d = run / STAGE2_DIR
    meta = read_json(d / "model.json")
    if sha256_file(d / "model.safetensors") != meta["weights_sha256"]:
        raise SakError(f"{d / 'model.safetensors'} does not match its recorded checksum")
    model.load_state_dict(load_file(str(d / "model.safetensors"), device=str(device)), strict=True)
    state = torch.load(d / STATE, map_location=device, weights_only=True)
    if int(state["step"]) != int(meta["step"]):
        raise SakError(f"{d}: weights of step {meta['step']} but optimizer state of step {state['step']}")
    optimizer.load_state_dict(state["optimizer"])
    scheduler.load_state_dict(state["scheduler"])
    torch.set_rng_state(state["rng"].cpu())
    if "cuda_rng" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all([t.cpu() for t in state["cuda_rng"]])
    step = int(state["step"])
    if trim:
        lines = (run / METRICS).read_text().splitlines() if (run / METRICS).exists() else []
        kept = [ln for ln in lines if ln.strip() and json.loads(ln).get("step", 0) <= step]
        (run / METRICS).write_text("".join(ln + "\n" for ln in kept))
    return step


def _distillation_targets(
    cfg: Stage2Config, data: DenseDataset, stage1: dict, img_size: tuple[int, int], device: torch.device
) -> Any:
    """Where the distillation targets come from: a stage-2 cache (--cache), live teachers (--online), or
    nowhere (None: gamma 0 or a frozen backbone, where the distillation term has no gradient to give)."""
    if cfg.gamma <= 0 or cfg.freeze_backbone:
        return None
    if cfg.cache is not None:
        from sak.student.train.stage2_cache import Stage2CachedTargets

        expected = {
            **cfg.cache_identity(data, img_size),
            "fingerprints": [s["fingerprint"] for s in stage1["cache"]["stores"]],
        }
        return Stage2CachedTargets(cfg.cache, expected, cfg.steps, cfg.batch_size)
    return Stage2Teachers(stage1, img_size, device)


def _run_meta(cfg: Stage2Config, stage1: dict, img_size: tuple[int, int]) -> dict:
    """What the run record and the checkpoint's model.json both hold."""
    return {
        "stage2": cfg.to_dict(),
        "dataset": cfg.dataset,
        "img_size": list(img_size),
        "input_mean": stage1["resolved"]["input_mean"],
        "input_std": stage1["resolved"]["input_std"],
        "init": str(Path(cfg.init).resolve()),
        "teachers": [s["teacher"] for s in stage1["cache"]["stores"]],
    }


def _write_run_record(
    run: Path,
    meta: dict,
    data: DenseDataset,
    weights: dict,
    model: SakMultiTask,
    device: torch.device,
    world_size: int = 1,
) -> None:
    run.mkdir(parents=True, exist_ok=True)
    write_json_atomic(
        run / RUN_CONFIG,
        {
            "kind": "sak-stage2-run",
            **meta,
            "tasks": data.outputs,
            "task_weights": {t: weights[t] for t in data.tasks},
            "train_images": len(data),
            "trainable_parameters": sum(p.numel() for p in model.trainable_parameters()),
            "device": str(device),
            "world_size": world_size,
            "code_version": code_version(),
            "created": now_iso(),
        },
    )


class _Stage2Step:
    """One optimizer step of stage 2 on a batch; returns the step's numbers for the metrics log."""

    def __init__(
        self,
        cfg: Stage2Config,
        model: SakMultiTask,
        teachers: Any,
        optimizer: torch.optim.Optimizer,
        scheduler: torch.optim.lr_scheduler.LRScheduler,
        stage1: dict,
        device: torch.device,
        train_model: torch.nn.Module | None = None,
    ) -> None:
        self.cfg, self.model, self.teachers, self.device = cfg, model, teachers, device
        self.train_model = train_model if train_model is not None else model  # DDP-wrapped under torchrun
        self.step = 1  # the step this call takes (set to the checkpoint's + 1 on resume)
        self.optimizer, self.scheduler = optimizer, scheduler
        self.weights = cfg.loss_weights()
        self.mean = torch.tensor(stage1["resolved"]["input_mean"], device=device).view(1, 3, 1, 1)
        self.std = torch.tensor(stage1["resolved"]["input_std"], device=device).view(1, 3, 1, 1)

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


# ----------------------------------------------------------------------------------------------
# evaluation


def evaluate(
    checkpoint: str | Path,
    dataset: str,
    data_root: str | Path,
    split: str = "val",
    out: str | Path | None = None,
    batch_size: int = 4,
    device: str | None = None,
    baselines: dict[str, float] | None = None,
    num_pictures: int = 4,
    save_predictions: bool = False,
) -> dict[str, Any]:
    """Metrics of a stage-2 run on a split: writes OUT/eval.json (OUT = the run), routers.png,
    predictions.png (and gates_<task>.png with --router tiger, OUT/predictions/ with save_predictions);
    dense_eval.evaluate_dense does the work."""
    dev = resolve_device(device)
    model, meta = load_stage2(checkpoint, dev)
    model.eval()
    mean = torch.tensor(meta["input_mean"], device=dev).view(1, 3, 1, 1)
    std = torch.tensor(meta["input_std"], device=dev).view(1, 3, 1, 1)

    def predict(batch: dict) -> tuple[dict, dict]:
        preds, gates, _ = model(normalize_u8(batch["images"].to(dev), mean, std))
        return preds, gates

    def prepare(size: tuple[int, int]) -> None:  # another input size: resampled from the trained grid
        nonlocal model
        model, _ = load_stage2(checkpoint, dev)
        resize_stem_input(model.student, size)
        model.eval()

    tiger = model.router_kind == "tiger"
    target = EvalModel(
        kind="sak-stage2-eval",
        tasks=dict(model.tasks),
        img_size=tuple(meta["img_size"]),
        predict=predict,
        prepare=prepare,
        experts=["stem", *(x["name"] for x in meta["student"]["teachers"])],
        levels=list(model.levels),
        backbone=meta["student"]["name"],
        token_grid=tuple(model.student.stem.patch_embed.grid_size) if tiger else None,
    )
    dest = Path(out or checkpoint).expanduser()
    return evaluate_dense(
        target, dataset, data_root, split, dest, batch_size, baselines, num_pictures, save_predictions
    )
