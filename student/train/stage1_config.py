"""Stage-1 options (`Stage1Config`) and the learning-rate schedule they resolve to (`LrSchedule`).

Kept apart from the loop (stage1.py), and free of torch: the run record (student/run/record.py) and
`sak-train stage1 --help` read the config without loading a model library. Each field's metadata also
says how the option behaves on resume (student/run/resume.py).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

from sak.pipeline.base.errors import SakError
from sak.student.data.dense_sets import parse_img_size
from sak.student.data.normalization import NORMALIZATIONS
from sak.student.run.resume import LENGTH, MACHINE, OUT, PATH, on_resume


def parse_paper_teachers(text: str) -> tuple[tuple[str, str], ...]:
    """`--paper-teachers dinov2=dinov2_b,clip=clip_b` -> (("dinov2", "dinov2_b"), ("clip", "clip_b"))."""
    pairs = []
    for item in (t.strip() for t in text.split(",") if t.strip()):
        left, sep, right = item.partition("=")
        if not sep or not left.strip() or not right.strip():
            raise SakError(
                f"--paper-teachers {item!r} must look like PAPER=OURS, e.g. dinov2=dinov2_b,clip=clip_b,sam=sam_b"
            )
        pairs.append((left.strip(), right.strip()))
    return tuple(pairs)


def parse_square_size(text: str) -> int:
    """`--img-size 384` or `384x384` (the trainers' one size syntax; stage-1 views are square)."""
    h, w = parse_img_size(text)
    if h != w:
        raise SakError(
            f"--img-size {text}: stage 1 trains on the cache's square views; give one side, e.g. 384"
        )
    return h


@dataclass(frozen=True)
class Stage1Config:
    """Stage-1 distillation; defaults follow the paper (AdamW 1e-3, wd 0.01, 2 warm-up epochs, cosine).

    cache, out: the cache folder and the run folder (RUN).
    student: registered student (vit_s, vit_b, vit_l, tiny, micro; student/model/registry.py).
    teachers: teacher names or store fingerprints, in adapter-path order; () = every store of the cache.
    teachers_per_image: a PRISM student (prism_*) routes each image to this many teachers, balanced over
      the rank's batch (1: the authors' one teacher per image); None = every teacher on every image (what
      a cache makes free). Refused for other students.
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
    img_size: student input side (`--img-size 384` or `384x384`); None = the cache's view size (any other
      value is refused).
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
    checkpoint_every: checkpoint every N steps (0: only at the end). log_every: a console line every N steps
      (and at the first and last step of a session). `--stop-after` is not part of the config: it is this
      invocation's (student/run/resume.py, RunCommand).
    device: "cpu", "cuda" or None (CUDA when available). use_kernels: the fused Triton adapter and loss
    (opt-in); None (default) and False keep the eager torch ops, which stay the default until a GPU run shows
    the kernels beating torch.compile at the real shapes (README, "Kernels").
    grad_checkpointing: recompute stem blocks in backward. tensorboard: also write RUN/tb.
    """

    cache: str = field(
        metadata={
            "help": "The cache folder or s3:// / gs:// URL (from `sak-cache run`).",
            **on_resume(PATH),
        }
    )
    out: str = field(
        metadata={"help": "Run folder: config.json, metrics.jsonl, tb/, checkpoint/.", **on_resume(OUT)}
    )
    student: str = field(
        default="vit_b",
        metadata={"help": "vit_s, vit_b, vit_l, prism_s/b/l (PRISM), or tiny / micro / prism_tiny (tests)."},
    )
    teachers: tuple[str, ...] = field(
        default=(),
        metadata={
            "help": "Comma list of teacher names or store fingerprints, in adapter-path order "
            "[default: every store]."
        },
    )
    teachers_per_image: int | None = field(
        default=None,
        metadata={
            "help": "PRISM students: teachers each image is routed to, balanced over the batch (1: the "
            "authors' assignment) [default: every teacher on every image].",
            "metavar": "K",
        },
    )
    steps: int | None = field(
        default=None,
        metadata={
            "help": "Training steps (one global batch each).",
            "group": "schedule",
            **on_resume(LENGTH),
        },
    )
    epochs: float | None = field(
        default=None,
        metadata={
            "help": "Training epochs (every training image once per epoch, view e mod K).",
            "group": "schedule",
            **on_resume(LENGTH),
        },
    )
    batch_size: int = field(
        default=128, metadata={"help": "Global batch size (all ranks).", "group": "schedule"}
    )
    lr: float = field(default=1e-3, metadata={"help": "Peak AdamW learning rate.", "group": "schedule"})
    weight_decay: float = field(
        default=0.01, metadata={"help": "AdamW weight decay (every parameter).", "group": "schedule"}
    )
    betas: tuple[float, float] = field(default=(0.9, 0.999), metadata={"cli": False})
    min_lr: float = field(
        default=0.0, metadata={"help": "Floor of the cosine schedule.", "group": "schedule"}
    )
    warmup_steps: int | None = field(
        default=None,
        metadata={"help": "Linear warm-up in steps (overrides --warmup-epochs).", "group": "schedule"},
    )
    warmup_epochs: float = field(
        default=2.0,
        metadata={
            "help": "Linear warm-up in epochs; with --steps capped at 10% of the steps.",
            "group": "schedule",
        },
    )
    grad_clip: float | None = field(
        default=None,
        metadata={"help": "Clip the global gradient norm to this value.", "group": "schedule"},
    )
    seed: int = field(default=0, metadata={"help": "Model init and data order."})
    online: bool = field(
        default=False, metadata={"help": "Targets from live teachers rebuilt from the store manifests."}
    )
    normalization: str = field(
        default="student",
        metadata={
            "help": "Student input mean/std: its timm config, or ImageNet's (the paper's code).",
            "choices": NORMALIZATIONS,
        },
    )
    img_size: int | None = field(
        default=None,
        metadata={
            "help": "Student input side, S or SxS [default: the cache's view size].",
            "parse": parse_square_size,
            "metavar": "S",
        },
    )
    pretrained: bool = field(
        default=False, metadata={"help": "Start the stem from timm's pretrained weights."}
    )
    init_paper: str | None = field(
        default=None,
        metadata={"help": "Start from the paper code's stage-1 checkpoint.", "metavar": "CKPT"},
    )
    paper_teachers: tuple[tuple[str, str], ...] = field(
        default=(),
        metadata={
            "help": "Paper teacher -> ours, e.g. dinov2=dinov2_b,clip=clip_b,sam=sam_b [default: by family].",
            "parse": parse_paper_teachers,
            "metavar": "MAP",
        },
    )
    num_workers: int = field(
        default=4, metadata={"help": "Loader workers per process.", "group": "data", **on_resume(MACHINE)}
    )
    skip_bad_shards: bool = field(
        default=False,
        metadata={
            "help": "Leave out shards whose files fail their sha256 (counted and logged) instead of stopping.",
            "group": "data",
        },
    )
    shuffle_window: int = field(default=8, metadata={"help": "Shards shuffled together.", "group": "data"})
    holdout_shards: int = field(
        default=1, metadata={"help": "Last shards held out for Rep Sim.", "group": "data"}
    )
    eval_every: int = field(
        default=0,
        metadata={
            "help": "Rep Sim every N steps (0: at the end).",
            "group": "reporting",
            **on_resume(MACHINE),
        },
    )
    eval_batch_size: int = field(
        default=32,
        metadata={"help": "Rep Sim batch size per rank.", "group": "reporting", **on_resume(MACHINE)},
    )
    report_repsim: bool = field(
        default=False,
        metadata={
            "help": "Print Rep Sim per teacher before and after training.",
            "group": "reporting",
            **on_resume(MACHINE),
        },
    )
    checkpoint_every: int = field(
        default=0,
        metadata={
            "help": "Checkpoint every N steps (0: at the end).",
            "group": "reporting",
            "aliases": ("save-every",),
            **on_resume(MACHINE),
        },
    )
    log_every: int = field(
        default=10,
        metadata={
            "help": "Console line every N steps (and the first and last).",
            "group": "reporting",
            **on_resume(MACHINE),
        },
    )
    device: str | None = field(
        default=None,
        metadata={
            "help": "cpu or cuda [default: cuda when available].",
            "group": "compute",
            **on_resume(MACHINE),
        },
    )
    use_kernels: bool | None = field(
        default=None,
        metadata={
            "help": "Fused Triton adapter and loss kernels (opt-in) [default: off, the torch ops; see README 'Kernels'].",
            "name": "kernels",
            "group": "compute",
            **on_resume(MACHINE),
        },
    )
    grad_checkpointing: bool = field(
        default=False,
        metadata={"help": "Recompute stem blocks in backward.", "group": "compute", **on_resume(MACHINE)},
    )
    tensorboard: bool = field(
        default=True, metadata={"help": "Also write RUN/tb.", "group": "reporting", **on_resume(MACHINE)}
    )
    # a cache at an s3:// or gs:// URL: read in place by byte range, or through a bounded local directory
    local_cache: str | None = field(
        default=None,
        metadata={"help": "Local read-through folder for a cache at an s3:// or gs:// URL: shards are "
                  "downloaded there whole once, so a second epoch reads them locally [default: none: only the "
                  "byte ranges each batch needs are read from the bucket, every epoch].",
                  "group": "data", **on_resume(MACHINE)},
    )  # fmt: skip
    local_cache_gb: float = field(
        default=50.0,
        metadata={
            "help": "Bound on that folder's shard files; the least recently used are evicted past it.",
            "group": "data",
            **on_resume(MACHINE),
        },
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
        if self.teachers_per_image is not None and self.teachers_per_image < 1:
            raise SakError(f"--teachers-per-image must be >= 1, got {self.teachers_per_image}")
        if self.teachers_per_image is not None and not self.student.startswith("prism"):
            raise SakError(
                f"--teachers-per-image is for PRISM students (prism_*); {self.student!r} sees every teacher"
            )
        if self.num_workers < 0 or self.shuffle_window < 1:
            raise SakError("--num-workers must be >= 0 and --shuffle-window >= 1")


@dataclass(frozen=True)
class LrSchedule:
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


def resolve_schedule(cfg: Stage1Config, samples_per_epoch: int) -> LrSchedule:
    steps_per_epoch = samples_per_epoch / cfg.batch_size
    total = cfg.steps if cfg.steps is not None else max(1, math.ceil(cfg.epochs * steps_per_epoch))
    if cfg.warmup_steps is not None:
        warmup = cfg.warmup_steps
    else:
        warmup = round(cfg.warmup_epochs * steps_per_epoch)
        if cfg.steps is not None:
            warmup = min(warmup, cfg.steps // 10)
    warmup = max(0, min(warmup, total))
    return LrSchedule(total, warmup, steps_per_epoch, cfg.min_lr / cfg.lr if cfg.lr > 0 else 0.0)
