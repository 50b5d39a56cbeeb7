"""Stage-1 options (`Stage1Config`) and the learning-rate schedule they resolve to.

Kept apart from the loop (stage1.py) because the run's checkpoint (checkpoint.py) records the config and
the loop imports the checkpoint: the config sits below both.
"""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass, field
from typing import Any

from sak.pipeline.errors import SakError
from sak.student.data.loader import NORMALIZATIONS

# options that may change when a run is resumed; every other field must match the recorded run
# (cache and out are paths: a moved cache is accepted when its fingerprints match the recorded ones)
RESUMABLE = frozenset(
    {
        "cache",
        "local_cache",
        "local_cache_gb",
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
    device: "cpu", "cuda" or None (CUDA when available). use_kernels: the fused Triton adapter and loss;
    None (default) turns them on when training on CUDA, False keeps the plain torch ops.
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
    # a cache at an s3:// or gs:// URL is streamed through a bounded local directory
    local_cache: str | None = field(
        default=None,
        metadata={"help": "Local read-through folder for a cache at an s3:// or gs:// URL: shards are "
                  "downloaded there once, so a second epoch reads them locally [default: under ~/.cache/sak]."},
    )  # fmt: skip
    local_cache_gb: float = field(
        default=50.0,
        metadata={"help": "Bound on that folder's shard files; the least recently used are evicted past it."},
    )

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
