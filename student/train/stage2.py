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

import dataclasses
import json
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from sak.pipeline.errors import SakError
from sak.pipeline.manifest import now_iso
from sak.pipeline.provenance import code_version, read_json, sha256_file, write_json_atomic
from sak.pipeline.teachers import normalize_u8
from sak.student.data.dense import (
    DATASET_METRIC_NAME,
    DATASETS,
    DEFAULT_INPUT_SIZE,
    DenseDataset,
    EvalSamples,
    TrainSamples,
    collate,
    parse_img_size,
)
from sak.student.model.multitask import SakMultiTask, resize_stem_input
from sak.student.model.student import SakStudent, StudentConfig
from sak.student.train.checkpoint import RUN_CONFIG
from sak.student.train.distributed import resolve_device
from sak.student.train.losses import clip_gradients, distillation_loss
from sak.student.train.metrics import (
    EDGE_TOLERANCE,
    SINGLE_TASK_BASELINES,
    BoundaryMeter,
    DepthMeter,
    NormalsMeter,
    SaliencyMeter,
    SegmentationMeter,
    mtl_gain,
)
from sak.student.train.stage2_teachers import Stage2Teachers, load_stage1_run, student_levels
from sak.student.train.task_losses import DEFAULT_TASK_WEIGHTS, multi_task_loss

log = logging.getLogger("sak")

METRICS = "metrics.jsonl"
STAGE2_DIR = "checkpoint"
STAGE2_KIND = "sak-stage2"
METRIC_NAMES = {
    "semseg": "mIoU",
    "human_parts": "mIoU",
    "sal": "maxF",
    "normals": "mErr",
    "edge": "odsF",
    "depth": "RMSE",
}


@dataclass(frozen=True)
class Stage2Config:
    """Stage-2 fine-tuning; defaults are the paper's (Table 11, B.3, B.5). Each field's help (metadata)
    is also its `sak-train stage2` option's help."""

    dataset: str = field(
        metadata={"help": "Dense dataset: PASCAL-Context, NYUD-v2, or your own folder.", "choices": DATASETS}
    )
    data_root: str = field(metadata={"help": "PASCAL_MT / NYUD_MT (or their parent), or your folder."})
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
            "help": "mor: mixture of routers (the paper); sum: plain sum (ablation).",
            "choices": ("mor", "sum"),
        },
    )
    freeze_backbone: bool = field(default=False, metadata={"help": "Train routers and heads only."})
    steps: int = field(default=40_000, metadata={"help": "Training iterations.", "group": "optimisation"})
    batch_size: int = field(default=4, metadata={"help": "Global batch size.", "group": "optimisation"})
    lr: float = field(default=2e-5, metadata={"help": "AdamW learning rate.", "group": "optimisation"})
    weight_decay: float = field(
        default=1e-6, metadata={"help": "AdamW weight decay.", "group": "optimisation"}
    )
    poly_power: float = field(
        default=0.9, metadata={"cli": False}
    )  # lr factor (1 - step / steps) ** power, no warm-up
    grad_clip: float | None = field(
        default=10.0, metadata={"help": "Max global gradient norm.", "group": "optimisation"}
    )
    gamma: float = field(
        default=1.0, metadata={"help": "Weight of the distillation loss (eq. 6).", "group": "optimisation"}
    )
    # (task, weight) pairs overriding the paper's 1/2/5/10/50/1 (semseg, human_parts, sal, normals, edge, depth)
    task_weights: tuple[tuple[str, float], ...] = field(default=(), metadata={"cli": False})
    img_size: tuple[int, int] | None = field(
        default=None,
        metadata={"help": "HxW input [default: 512x512 PASCAL, 448x576 NYUD].", "parse": parse_img_size},
    )
    # the training augmentation: random scale range; colour jitter on/off
    scale_range: tuple[float, float] = field(default=(0.5, 2.0), metadata={"cli": False})
    photometric: bool = field(default=True, metadata={"cli": False})
    seed: int = field(
        default=0, metadata={"help": "Head/router initialisation, data order and augmentation."}
    )
    num_workers: int = field(default=2, metadata={"help": "DataLoader workers."})
    log_every: int = field(default=50, metadata={"help": "Console line every N steps."})
    device: str | None = field(default=None, metadata={"help": "cpu or cuda [default: cuda when available]."})
    checkpoint_every: int = field(
        default=1000,
        metadata={"help": "Save a resumable checkpoint (weights, optimizer, step) every N steps."},
    )
    resume: bool = field(
        default=False,
        metadata={"help": "Continue the run in --out from its checkpoint: same remaining losses."},
    )

    @classmethod
    def debug(cls, dataset: str, data_root: str, init: str, out: str, **overrides: Any) -> Stage2Config:
        """Runs on a CPU in seconds: 64x64 input, 10 steps of 2, no workers."""
        base: dict[str, Any] = dict(steps=10, batch_size=2, img_size=(64, 64), num_workers=0, log_every=5)
        return cls(dataset=dataset, data_root=data_root, init=init, out=out, **{**base, **overrides})

    def input_size(self) -> tuple[int, int]:
        return tuple(self.img_size) if self.img_size else DEFAULT_INPUT_SIZE[self.dataset]

    def weights(self) -> dict[str, float]:
        return {**DEFAULT_TASK_WEIGHTS, **dict(self.task_weights)}

    def validate(self) -> None:
        if self.cache is not None and self.online:
            raise SakError("give one of --online and --cache, not both")
        needs_teachers = self.gamma > 0 and not self.freeze_backbone
        if needs_teachers and not (self.online or self.cache):
            raise SakError("stage 2 distils from the teachers: pass --online or --cache (or --gamma 0)")
        if self.steps < 1 or self.batch_size < 1:
            raise SakError("--steps and --batch-size must be >= 1")
        if self.router not in ("mor", "sum"):
            raise SakError(f"--router must be mor or sum, got {self.router!r}")
        h, w = self.input_size()
        if h % 16 or w % 16 or h < 32 or w < 32:
            raise SakError(f"--img-size {h}x{w}: both sides must be multiples of 16 and >= 32")

    def to_dict(self) -> dict[str, Any]:
        return json.loads(json.dumps(dataclasses.asdict(self)))


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
            "code_version": code_version(),
            "weights_sha256": sha256_file(d / "model.safetensors"),
            "saved": now_iso(),
        },
    )
    return d


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
    model = SakMultiTask(student, meta["tasks"], meta["router"])
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
    """Fine-tune routers, heads (and, unless frozen, the whole student) on the dataset's tasks."""
    cfg.validate()
    device = resolve_device(cfg.device)
    run = Path(cfg.out).expanduser()
    resuming = _check_resume(cfg, run)
    img_size = cfg.input_size()
    data = DenseDataset(cfg.dataset, cfg.data_root, "train", cfg.tasks)
    student, stage1 = load_stage1_run(cfg.init, device)
    resize_stem_input(student, img_size)
    torch.manual_seed(cfg.seed)
    model = SakMultiTask(student, data.outputs, cfg.router).to(device)  # type: ignore[arg-type]
    if cfg.freeze_backbone:
        model.freeze_backbone()
    teachers = _distillation_targets(cfg, data, stage1, img_size, device)
    optimizer = torch.optim.AdamW(model.trainable_parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: max(0.0, 1.0 - s / cfg.steps) ** cfg.poly_power
    )
    meta = _run_meta(cfg, stage1, img_size)
    start = _restore(run, model, optimizer, scheduler, device) if resuming else 0
    if not resuming:
        _write_run_record(run, meta, data, cfg.weights(), model, device)
    loader = torch.utils.data.DataLoader(
        TrainSamples(data, img_size, cfg.seed, cfg.scale_range, cfg.photometric),
        batch_size=cfg.batch_size,
        sampler=range(start * cfg.batch_size, cfg.steps * cfg.batch_size),
        num_workers=cfg.num_workers,
        collate_fn=collate,
        generator=torch.Generator().manual_seed(cfg.seed),  # not the global RNG (the routers' noise)
    )
    log.info(
        f"stage 2: {student.config.name} + {cfg.router} routers on {cfg.dataset} {list(data.tasks)}, "
        f"{cfg.steps} steps of {cfg.batch_size} at {img_size[0]}x{img_size[1]}, "
        f"{('cached targets' if cfg.cache else 'live teachers') if teachers else 'no distillation'}, run {run}"
    )
    step_of = _Stage2Step(cfg, model, teachers, optimizer, scheduler, stage1, device)
    result = Stage2Result(run=run, steps=start, model=model)
    model.train()
    t_start = time.perf_counter()
    with open(run / METRICS, "a") as metrics:
        for step, batch in enumerate(loader, start=start + 1):
            record = {
                "kind": "train",
                "step": step,
                **step_of(batch),
                "elapsed_s": time.perf_counter() - t_start,
            }
            metrics.write(json.dumps(record) + "\n")
            metrics.flush()
            result.losses.append(record["loss"])
            result.records.append(record)
            result.steps = step
            if step % max(1, cfg.log_every) == 0 or step == 1:
                log.info(f"step {step}/{cfg.steps} | loss {record['loss']:.4f} | lr {record['lr']:.2e}")
            if cfg.checkpoint_every and step % cfg.checkpoint_every == 0 and step < cfg.steps:
                save_stage2(run, model, {**meta, "step": step})
                _save_state(run, optimizer, scheduler, step)
    save_stage2(run, model, {**meta, "step": result.steps})
    _save_state(run, optimizer, scheduler, result.steps)
    log.info(f"stage 2 done: {result.steps} steps; checkpoint {run / STAGE2_DIR}")
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


def _restore(run: Path, model: SakMultiTask, optimizer, scheduler, device: torch.device) -> int:
    """Weights (checksum-verified), optimizer and scheduler of the run's checkpoint; metrics trimmed."""
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
        from sak.student.train.stage2_cache import PLAN_VERSION, SPLIT, Stage2CachedTargets, names_hash

        expected = {
            "dataset": cfg.dataset,
            "split": SPLIT,
            "num_images": len(data),
            "names_sha": names_hash(data.names),
            "seed": int(cfg.seed),
            "crop": list(img_size),
            "scale_range": [float(x) for x in cfg.scale_range],
            "photometric": bool(cfg.photometric),
            "plan_version": PLAN_VERSION,
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
    run: Path, meta: dict, data: DenseDataset, weights: dict, model: SakMultiTask, device: torch.device
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
    ) -> None:
        self.cfg, self.model, self.teachers, self.device = cfg, model, teachers, device
        self.optimizer, self.scheduler = optimizer, scheduler
        self.weights = cfg.weights()
        self.mean = torch.tensor(stage1["resolved"]["input_mean"], device=device).view(1, 3, 1, 1)
        self.std = torch.tensor(stage1["resolved"]["input_std"], device=device).view(1, 3, 1, 1)

    def __call__(self, batch: dict) -> dict:
        cfg, device, teachers = self.cfg, self.device, self.teachers
        images_u8 = batch["images"]  # (B, 3, H, W) uint8, the augmented pixels
        targets = {t: v.to(device) for t, v in batch["labels"].items()}
        preds, _, distill_maps = self.model(normalize_u8(images_u8.to(device), self.mean, self.std))
        task_loss, parts = multi_task_loss(preds, targets, self.weights)
        loss = task_loss
        distill = None
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
        return {
            "loss": float(loss.detach()),  # note: host-device sync, once per step
            **{f"loss/{t}": float(v.detach()) for t, v in parts.items()},
            "distill": float(distill.detach()) if distill is not None else None,
            "lr": lr,
            "grad_norm": float(grad_norm),
        }


# ----------------------------------------------------------------------------------------------
# evaluation


def make_meters(outputs: dict[str, int], dataset: str) -> dict[str, Any]:
    tolerance = EDGE_TOLERANCE.get(DATASET_METRIC_NAME[dataset], EDGE_TOLERANCE["pascal_context"])
    meters: dict[str, Any] = {}
    for t, n in outputs.items():
        if t in ("semseg", "human_parts"):
            meters[t] = SegmentationMeter(n)
        elif t == "sal":
            meters[t] = SaliencyMeter()
        elif t == "normals":
            meters[t] = NormalsMeter()
        elif t == "edge":
            meters[t] = BoundaryMeter(tolerance)
        elif t == "depth":
            meters[t] = DepthMeter()
    return meters


def task_output(task: str, pred: torch.Tensor) -> torch.Tensor:
    """Raw head output (B, out, H, W) -> what the meter takes (ids, probabilities, vectors, metres)."""
    if task in ("semseg", "human_parts"):
        return pred.argmax(1)  # (B, H, W)
    if task in ("sal", "edge"):
        return pred.sigmoid()[:, 0]  # (B, H, W)
    return pred


@torch.no_grad()
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
) -> dict[str, Any]:
    """Metrics of a stage-2 run on a split: writes OUT/eval.json (OUT = the run), routers.png, predictions.png."""
    dev = resolve_device(device)
    model, meta = load_stage2(checkpoint, dev)
    model.eval()
    data = DenseDataset(dataset, data_root, split, tuple(model.tasks))
    for t, n in data.outputs.items():
        if n != model.tasks[t]:
            raise SakError(f"task {t}: the model predicts {model.tasks[t]} channels, the dataset has {n}")
    img_size = tuple(meta["img_size"])
    loader = torch.utils.data.DataLoader(
        EvalSamples(data, img_size), batch_size=batch_size, shuffle=False, collate_fn=collate
    )
    mean = torch.tensor(meta["input_mean"], device=dev).view(1, 3, 1, 1)
    std = torch.tensor(meta["input_std"], device=dev).view(1, 3, 1, 1)
    meters = make_meters(model.tasks, dataset)
    gate_sum: dict[tuple[int, str], torch.Tensor] = {}
    shown: list[dict] = []
    for batch in loader:
        preds, gates, _ = model(normalize_u8(batch["images"].to(dev), mean, std))
        for key, g in gates.items():
            gate_sum[key] = gate_sum.get(key, 0) + g.sum(0).cpu()
        outs = {t: task_output(t, p).cpu() for t, p in preds.items()}
        for i, (h, w) in enumerate(batch["sizes"]):  # metrics on the unpadded region only
            for t, meter in meters.items():
                meter.update(outs[t][i : i + 1, ..., :h, :w], batch["labels"][t][i : i + 1, ..., :h, :w])
            if len(shown) < num_pictures:
                shown.append(
                    {
                        "image": batch["images"][i, :, :h, :w],
                        "gt": {t: v[i, ..., :h, :w] for t, v in batch["labels"].items()},
                        "pred": {t: v[i, ..., :h, :w] for t, v in outs.items()},
                    }
                )
    results = {t: float(m.compute()) for t, m in meters.items()}
    metric_ds = DATASET_METRIC_NAME[dataset]
    backbone = meta["student"]["name"]
    paper = SINGLE_TASK_BASELINES.get(metric_ds, {}).get(backbone)
    report: dict[str, Any] = {
        "kind": "sak-stage2-eval",
        "dataset": dataset,
        "split": split,
        "images": len(data),
        "metrics": {t: {"name": METRIC_NAMES[t], "value": v} for t, v in results.items()},
        "code_version": code_version(),
        "created": now_iso(),
    }
    if baselines is not None:
        report["delta_m"] = mtl_gain(results, baselines)
        report["baselines"] = dict(baselines)
    elif paper is not None and all(t in paper for t in results):
        report["delta_m"] = mtl_gain(results, dataset=metric_ds, backbone=backbone)
        report["baselines"] = {t: paper[t] for t in results}
    n = len(data)
    levels = sorted({b for b, _ in gate_sum})
    mean_gates = {f"{b}/{t}": (g / n).tolist() for (b, t), g in sorted(gate_sum.items())}
    report["router_mean_gates"] = mean_gates
    report["experts"] = ["stem", *(x["name"] for x in meta["student"]["teachers"])]
    target = Path(out or checkpoint).expanduser()
    target.mkdir(parents=True, exist_ok=True)
    write_json_atomic(target / "eval.json", report)
    plot_gates(gate_sum, n, levels, list(model.tasks), report["experts"], target / "routers.png")
    plot_predictions(shown, list(model.tasks), model.tasks, target / "predictions.png")
    report["pictures"] = [str(target / "routers.png"), str(target / "predictions.png")]
    return report


def format_table(report: dict[str, Any]) -> str:
    lines = [f"{'task':<12} {'metric':<6} {'value':>9}"]
    for t, m in report["metrics"].items():
        lines.append(f"{t:<12} {m['name']:<6} {m['value']:>9.4f}")
    if "delta_m" in report:
        lines.append(f"{'delta_m %':<19} {report['delta_m']:>9.2f}")
    return "\n".join(lines)


# ----------------------------------------------------------------------------------------------
# pictures (matplotlib, Agg)


def plot_gates(
    gate_sum: dict[tuple[int, str], torch.Tensor],
    count: int,
    levels: list[int],
    tasks: list[str],
    experts: list[str],
    path: Path,
) -> None:
    """The paper's Figure 4: mean gate weight per expert, one panel per level, grouped bars per task."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(levels), figsize=(3.2 * len(levels), 3.0), squeeze=False, sharey=True)
    width = 0.8 / len(experts)
    for ax, b in zip(axes[0], levels):
        for e, name in enumerate(experts):
            values = [float(gate_sum[(b, t)][e]) / count for t in tasks]
            ax.bar(np.arange(len(tasks)) + (e - (len(experts) - 1) / 2) * width, values, width, label=name)
        ax.set_title(f"block {b}")
        ax.set_xticks(np.arange(len(tasks)), tasks, rotation=30, fontsize=8)
    axes[0][0].set_ylabel("mean gate weight")
    axes[0][-1].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def _show(task: str, x: torch.Tensor, classes: int) -> tuple[np.ndarray, dict]:
    """A label or prediction -> (image array, imshow kwargs)."""
    x = x.float()
    if task in ("semseg", "human_parts"):
        return np.ma.masked_equal(x.numpy(), 255), {"cmap": "tab20", "vmin": 0, "vmax": max(1, classes - 1)}
    if task == "normals":
        n = torch.nn.functional.normalize(x, dim=0) if x.abs().sum() else x
        return ((n.permute(1, 2, 0).numpy() + 1) / 2).clip(0, 1), {}
    if task == "depth":
        return np.ma.masked_equal(x.squeeze(0).numpy(), 0), {"cmap": "viridis"}
    return np.ma.masked_equal(x.numpy(), 255), {"cmap": "gray", "vmin": 0, "vmax": 1}


def plot_predictions(shown: list[dict], tasks: list[str], outputs: dict[str, int], path: Path) -> None:
    """Rows: images; columns: input | GT and prediction per task."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    if not shown:
        return
    cols = 1 + 2 * len(tasks)
    fig, axes = plt.subplots(len(shown), cols, figsize=(1.8 * cols, 1.8 * len(shown)), squeeze=False)
    for r, s in enumerate(shown):
        axes[r][0].imshow(s["image"].permute(1, 2, 0).numpy())
        axes[r][0].set_title("input", fontsize=7)
        for k, t in enumerate(tasks):
            for j, (what, x) in enumerate((("GT", s["gt"][t]), ("pred", s["pred"][t]))):
                img, kw = _show(t, x, outputs[t])
                ax = axes[r][1 + 2 * k + j]
                ax.imshow(img, **kw)
                ax.set_title(f"{t} {what}", fontsize=7)
    for ax in axes.ravel():
        ax.axis("off")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
