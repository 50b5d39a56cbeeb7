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

import dataclasses
import json
import logging
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from sak.pipeline.errors import SakError
from sak.pipeline.extract import parse_weights
from sak.pipeline.manifest import now_iso
from sak.pipeline.provenance import code_version, read_json, sha256_file, write_json_atomic
from sak.pipeline.storage import is_url
from sak.student.data.dense import (
    DATASETS,
    DEFAULT_INPUT_SIZE,
    DenseDataset,
    TrainSamples,
    collate,
    parse_img_size,
)
from sak.student.model.instructions import (
    encode_instructions,
    instruction_texts,
    load_instructions,
    save_instructions,
)
from sak.student.model.tiger import ExpertSpec, Tiger, TigerModelConfig, TigerOutput
from sak.student.train.distributed import resolve_device
from sak.student.train.losses import clip_gradients
from sak.student.train.stage2_teachers import Stage2Teachers, load_stage1_run
from sak.student.train.task_losses import DEFAULT_TASK_WEIGHTS, TASK_LOSSES, multi_task_loss

log = logging.getLogger("sak")

TIGER_KIND = "sak-tiger-run"
RUN_CONFIG = "config.json"
METRICS = "metrics.jsonl"
CKPT = "checkpoint"


@dataclass(frozen=True)
class TigerConfig:
    """Every option of `sak-train tiger` (defaults are ours: the paper's are not public)."""

    dataset: str = field(
        metadata={"help": "Dense dataset: PASCAL-Context, NYUD-v2, or your own folder.", "choices": DATASETS}
    )
    data_root: str = field(metadata={"help": "PASCAL_MT / NYUD_MT (or their parent), or your folder."})
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
    weights: tuple[tuple[str, str], ...] = field(
        default=(),
        metadata={
            "help": "With --online: local weights of a named teacher (repeatable).",
            "multiple": True,
            "parse": parse_weights,
            "metavar": "NAME=PATH",
        },
    )
    random_init: bool = field(
        default=False, metadata={"help": "With --online: random-init named teachers (tests; flagged)."}
    )
    tasks: tuple[str, ...] = field(
        default=(), metadata={"help": "Comma list of tasks [default: all of the dataset's]."}
    )
    instructions: str | None = field(
        default=None,
        metadata={
            "help": "JSON {task: sentence} overriding the default instructions.",
            "metavar": "FILE.json",
        },
    )
    text_model: str = field(
        default="ViT-B-32",
        metadata={"help": "open_clip model whose text tower encodes the instructions once."},
    )
    text_pretrained: str | None = field(
        default="laion2b_s34b_b79k",
        metadata={
            "help": "open_clip pretrained tag; 'none' = random init (flagged in the run).",
            "parse": lambda t: None if t.strip().lower() == "none" else t.strip(),
        },
    )
    dim: int = field(default=256, metadata={"help": "Width D of the projected experts and the heads."})
    router_hidden: int = field(default=64, metadata={"help": "Hidden width of each router."})
    grid: tuple[int, int] | None = field(
        default=None,
        metadata={"help": "Common token grid HxW [default: crop / 16].", "parse": parse_img_size},
    )
    cf_weight: float = field(default=0.1, metadata={"help": "Weight of the counterfactual routing loss."})
    cf_tau: float = field(default=0.1, metadata={"help": "Temperature of q = softmax(c / tau)."})
    steps: int = field(default=20_000, metadata={"help": "Optimizer steps.", "group": "optimisation"})
    batch_size: int = field(default=8, metadata={"help": "Images per step.", "group": "optimisation"})
    lr: float = field(
        default=1e-4,
        metadata={"help": "AdamW learning rate (polynomial decay 0.9).", "group": "optimisation"},
    )
    weight_decay: float = field(
        default=1e-4, metadata={"help": "AdamW weight decay.", "group": "optimisation"}
    )
    poly_power: float = field(default=0.9, metadata={"cli": False})
    grad_clip: float | None = field(
        default=10.0, metadata={"help": "Max global gradient norm.", "group": "optimisation"}
    )
    task_weights: tuple[tuple[str, float], ...] = field(default=(), metadata={"cli": False})
    img_size: tuple[int, int] | None = field(
        default=None,
        metadata={"help": "HxW crop [default: the dataset's; must be the cache's].", "parse": parse_img_size},
    )
    scale_range: tuple[float, float] = field(default=(0.5, 2.0), metadata={"cli": False})
    photometric: bool = field(default=True, metadata={"cli": False})
    seed: int = field(default=0, metadata={"help": "Init, data order, augmentation (the cache's --seed)."})
    num_workers: int = field(default=2, metadata={"help": "DataLoader workers."})
    log_every: int = field(default=50, metadata={"help": "Console line every N steps."})
    checkpoint_every: int = field(
        default=500, metadata={"help": "Save a resumable checkpoint every N steps."}
    )
    resume: bool = field(default=False, metadata={"help": "Continue the run in --out exactly."})
    device: str | None = field(default=None, metadata={"help": "cpu or cuda [default: cuda when available]."})

    @classmethod
    def debug(cls, dataset: str, data_root: str, out: str, **overrides: Any) -> TigerConfig:
        base: dict[str, Any] = dict(
            steps=10, batch_size=2, img_size=(64, 64), num_workers=0, log_every=5, dim=32, router_hidden=16,
            text_model="ViT-S-32-alt", text_pretrained=None, lr=1e-3,
        )  # fmt: skip
        return cls(dataset=dataset, data_root=data_root, out=out, **{**base, **overrides})

    def input_size(self) -> tuple[int, int]:
        return tuple(self.img_size) if self.img_size else DEFAULT_INPUT_SIZE[self.dataset]

    def validate(self) -> None:
        if bool(self.cache) == bool(self.online):
            raise SakError("give one of --cache S2CACHE and --online (with --teachers)")
        if self.online and not self.teachers:
            raise SakError("--online runs teachers by name: pass --teachers dinov2_l,clip_l,sam_l")
        if self.steps < 1 or self.batch_size < 1:
            raise SakError("--steps and --batch-size must be >= 1")
        if self.cf_tau <= 0 or self.cf_weight < 0:
            raise SakError("--cf-tau must be > 0 and --cf-weight >= 0")
        if self.dim % 4:
            raise SakError(f"--dim {self.dim}: must be a multiple of 4 (the heads split it over 4 levels)")
        h, w = self.input_size()
        if h % 16 or w % 16 or h < 32 or w < 32:
            raise SakError(f"--img-size {h}x{w}: both sides must be multiples of 16 and >= 32")

    def to_dict(self) -> dict[str, Any]:
        return json.loads(json.dumps(dataclasses.asdict(self)))


# ----------------------------------------------------------------------------------------------
# where the teacher maps come from


@dataclass
class TeacherSource:
    """A callable giving {teacher: [(B, h, w, C)]} for a batch, the experts it yields, and its record."""

    fetch: Any  # (batch, images_u8, device) -> maps
    experts: list[ExpertSpec]
    record: dict  # what config.json keeps: enough to rebuild live teachers for evaluation


def _valid(teacher: str, crop: tuple[int, int]) -> tuple[float, float]:
    from sak.pipeline.teachers import get_teacher

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
    from sak.student.train.stage2_cache import PLAN_VERSION, SPLIT, Stage2CachedTargets, names_hash

    expected = {
        "dataset": cfg.dataset,
        "split": SPLIT,
        "num_images": len(data),
        "names_sha": names_hash(data.names),
        "seed": int(cfg.seed),
        "crop": list(crop),
        "scale_range": [float(x) for x in cfg.scale_range],
        "photometric": bool(cfg.photometric),
        "plan_version": PLAN_VERSION,
    }
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


@contextmanager
def batchnorm_stats_frozen(model: nn.Module):
    """Forward passes that use batch statistics (train mode) but leave the running statistics alone."""
    saved = []
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            saved.append((m, m.momentum, m.num_batches_tracked.clone()))
            m.momentum = 0.0
    try:
        yield
    finally:
        for m, momentum, tracked in saved:
            m.momentum = momentum
            m.num_batches_tracked.copy_(tracked)


def exclude_expert(gates: torch.Tensor, e: int) -> torch.Tensor:
    """Gates with expert e set to zero and the others renormalised to sum 1 per token."""
    g = gates.clone()
    g[..., e] = 0
    return g / g.sum(-1, keepdim=True).clamp_min(1e-12)


@torch.no_grad()
def expert_contributions(
    model: Tiger, out: TigerOutput, targets: dict[str, torch.Tensor], out_size: tuple[int, int]
) -> dict[tuple[int, str], torch.Tensor]:
    """c[(l, t)] = (E,) max(L_-e - L, 0): the task loss's rise when expert e is excluded at level l."""
    L, E = model.config.num_levels, len(model.config.experts)
    experts = out.experts.detach()
    c = {}
    with batchnorm_stats_frozen(model):
        for task in model.task_order:
            loss_fn, target = TASK_LOSSES[task], targets[task]
            base = loss_fn(out.preds[task].detach(), target)
            fused = [out.fused[(k, task)].detach() for k in range(L)]
            for lvl in range(L):
                rises = []
                for e in range(E):
                    maps = list(fused)
                    maps[lvl] = model.fuse(exclude_expert(out.gates[(lvl, task)].detach(), e), experts)
                    rises.append(loss_fn(model.decode(task, maps, out_size), target) - base)
                c[(lvl, task)] = torch.stack(rises).clamp_min(0)
    return c


def counterfactual_loss(
    model: Tiger, out: TigerOutput, targets: dict[str, torch.Tensor], out_size: tuple[int, int], tau: float
) -> tuple[torch.Tensor, dict[str, dict[str, list[float]]]]:
    """Mean over (level, task) of KL(softmax(c / tau) || mean gate); and c, q, mean gate per (level, task)."""
    contributions = expert_contributions(model, out, targets, out_size)
    terms, logged = [], {}
    for (lvl, task), c in contributions.items():
        q = torch.softmax(c / tau, dim=0)
        gbar = out.gates[(lvl, task)].mean(dim=(0, 1))  # (E,)
        terms.append((q * (q.clamp_min(1e-12).log() - gbar.clamp_min(1e-12).log())).sum())
        logged[f"{lvl}/{task}"] = {
            "c": c.tolist(),
            "q": q.tolist(),
            "gate": gbar.detach().tolist(),
        }
    return torch.stack(terms).mean(), logged


# ----------------------------------------------------------------------------------------------
# training


@dataclass
class TigerResult:
    run: Path
    steps: int
    losses: list[float] = field(default_factory=list)  # total loss per step run in this call
    records: list[dict] = field(default_factory=list, repr=False)
    model: Tiger | None = field(default=None, repr=False)


def _instructions(cfg: TigerConfig, run: Path, tasks: list[str], resume: bool):
    if resume:
        return load_instructions(run)
    texts = instruction_texts(tasks, cfg.instructions)
    pretrained = None if (cfg.text_pretrained or "").lower() in ("", "none") else cfg.text_pretrained
    emb, identity = encode_instructions(texts, cfg.text_model, pretrained, cfg.seed)
    return emb, identity


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
    diff = [k for k in new if new[k] != old.get(k)]
    if diff:
        raise SakError(
            f"--resume {run}: options differ from the run's ({', '.join(diff)}); resume with the same"
        )
    return True


def train_tiger(cfg: TigerConfig) -> TigerResult:
    """Train TIGER's projections, routers and heads; returns the per-step losses of this call."""
    cfg.validate()
    device = resolve_device(cfg.device)
    run = Path(cfg.out).expanduser()
    resume = _start(cfg, run)
    crop = cfg.input_size()
    data = DenseDataset(cfg.dataset, cfg.data_root, "train", cfg.tasks)
    source = _cached_source(cfg, data, crop) if cfg.cache else _online_source(cfg, crop, device)
    emb, identity = _instructions(cfg, run, list(data.outputs), resume)
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
    optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: max(0.0, 1.0 - s / cfg.steps) ** cfg.poly_power
    )
    start = 0
    if resume:
        start = _restore(run, model, optimizer, scheduler, device)
    else:
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
                "code_version": code_version(),
                "created": now_iso(),
            },
        )
    log.info(
        f"TIGER: {len(mcfg.experts)} experts x {mcfg.num_levels} levels x {list(data.outputs)}, "
        f"{'cached targets' if cfg.cache else 'live teachers'}, steps {start + 1}..{cfg.steps}, run {run}"
    )
    return _loop(cfg, run, model, source, data, optimizer, scheduler, start, device)


def _restore(run: Path, model: Tiger, optimizer, scheduler, device: torch.device) -> int:
    meta = read_json(run / CKPT / "model.json")
    for name, key in (("model.safetensors", "weights_sha256"), ("state.pt", "state_sha256")):
        if sha256_file(run / CKPT / name) != meta[key]:
            raise SakError(f"{run / CKPT / name} does not match its recorded checksum")
    model.load_state_dict(load_file(str(run / CKPT / "model.safetensors"), device=str(device)), strict=True)
    state = torch.load(run / CKPT / "state.pt", map_location=device, weights_only=True)
    optimizer.load_state_dict(state["optimizer"])
    scheduler.load_state_dict(state["scheduler"])
    step = int(state["step"])
    lines = (run / METRICS).read_text().splitlines() if (run / METRICS).exists() else []
    kept = [ln for ln in lines if ln.strip() and json.loads(ln).get("step", 0) <= step]
    (run / METRICS).write_text("".join(ln + "\n" for ln in kept))  # steps after the checkpoint re-run
    return step


def _loop(cfg, run, model, source, data, optimizer, scheduler, start, device) -> TigerResult:
    crop = cfg.input_size()
    weights = {**DEFAULT_TASK_WEIGHTS, **dict(cfg.task_weights)}
    loader = torch.utils.data.DataLoader(
        TrainSamples(data, crop, cfg.seed, cfg.scale_range, cfg.photometric),
        batch_size=cfg.batch_size,
        sampler=range(start * cfg.batch_size, cfg.steps * cfg.batch_size),
        num_workers=cfg.num_workers,
        collate_fn=collate,
    )
    result = TigerResult(run=run, steps=start, model=model)
    model.train()
    t0 = time.perf_counter()
    with open(run / METRICS, "a") as metrics:
        for step, batch in enumerate(loader, start=start + 1):
            record = {"kind": "train", "step": step, **tiger_step(cfg, model, source, batch, weights, optimizer,
                                                                   scheduler, device)}  # fmt: skip
            record["elapsed_s"] = time.perf_counter() - t0
            metrics.write(json.dumps(record) + "\n")
            metrics.flush()
            result.losses.append(record["loss"])
            result.records.append(record)
            result.steps = step
            if step % max(1, cfg.log_every) == 0 or step == start + 1:
                log.info(f"step {step}/{cfg.steps} | loss {record['loss']:.4f} | cf {record['cf']:.4f}")
            if cfg.checkpoint_every and step % cfg.checkpoint_every == 0 and step < cfg.steps:
                save_checkpoint(run, model, optimizer, scheduler, step)
    save_checkpoint(run, model, optimizer, scheduler, result.steps)
    log.info(f"TIGER done: {result.steps} steps; checkpoint {run / CKPT}")
    return result


def tiger_step(cfg, model, source, batch, weights, optimizer, scheduler, device) -> dict:
    """One optimizer step: task losses + cf_weight x counterfactual loss; the numbers for metrics.jsonl."""
    images = batch["images"]
    maps = source.fetch(batch, images, device)
    targets = {t: v.to(device) for t, v in batch["labels"].items()}
    out = model(maps, tuple(images.shape[-2:]))
    task_loss, parts = multi_task_loss(out.preds, targets, weights)
    loss, routing, cf = task_loss, {}, None
    if cfg.cf_weight > 0:
        cf, routing = counterfactual_loss(model, out, targets, tuple(images.shape[-2:]), cfg.cf_tau)
        loss = task_loss + cfg.cf_weight * cf
    lr = optimizer.param_groups[0]["lr"]
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    grad_norm = clip_gradients(model.parameters(), cfg.grad_clip)
    optimizer.step()
    scheduler.step()
    return {
        "loss": float(loss.detach()),
        "task_loss": float(task_loss.detach()),
        **{f"loss/{t}": float(v.detach()) for t, v in parts.items()},
        "cf": float(cf.detach()) if cf is not None else 0.0,
        "lr": lr,
        "grad_norm": float(grad_norm),
        "routing": routing,
    }
