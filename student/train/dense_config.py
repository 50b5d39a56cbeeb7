"""What stage 2 (Stage2Config) and TIGER (TigerConfig) share: the dense dataset, the optimisation
(AdamW, polynomial decay, clipping), the loss weights and the augmentation, declared once here.

DenseTrainConfig is the base dataclass of both (keyword-only fields). A subclass re-declares a field only to
change its default or help (e.g. `steps`: 40000 for stage 2, 20000 for TIGER); a re-declared field keeps the
base's place, so each command's --help lists its options in the same order as before the base existed
(options.py orders by group, then by field). Fields whose place differs between the two commands
(num_workers, log_every, device) are shared as field functions instead. No torch at import: the run
record and `--help` read these configs (the optimiser is built by `optimizer()`, which imports it).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from sak.pipeline.base.errors import SakError
from sak.student.data.dense_sets import DATASETS, DEFAULT_INPUT_SIZE
from sak.student.run.resume import LENGTH, MACHINE, PATH, on_resume

OPTIMISATION = "optimisation"  # the --help group of the optimiser's options

# the paper's task loss weights (B.5): semseg 1, human parts 2, saliency 5, normals 10, edges 50, depth 1
DEFAULT_TASK_WEIGHTS: dict[str, float] = {
    "semseg": 1.0,
    "human_parts": 2.0,
    "sal": 5.0,
    "normals": 10.0,
    "edge": 50.0,
    "depth": 1.0,
}


def num_workers_field() -> Any:
    return field(default=2, metadata={"help": "DataLoader workers.", **on_resume(MACHINE)})


def log_every_field() -> Any:
    return field(
        default=50,
        metadata={"help": "Console line every N steps (and the first and last).", **on_resume(MACHINE)},
    )


def device_field() -> Any:
    return field(
        default=None, metadata={"help": "cpu or cuda [default: cuda when available].", **on_resume(MACHINE)}
    )


def checkpoint_every_field(default: int) -> Any:
    return field(
        default=default,
        metadata={
            "help": "Save a resumable checkpoint every N steps (0: at the end only).",
            **on_resume(MACHINE),
        },
    )


@dataclass(frozen=True, kw_only=True)
class DenseTrainConfig:
    """Dataset, optimisation, loss weights and augmentation of a dense multi-task training run."""

    dataset: str = field(
        metadata={"help": "Dense dataset: PASCAL-Context, NYUD-v2, or your own folder.", "choices": DATASETS}
    )
    data_root: str = field(
        metadata={"help": "PASCAL_MT / NYUD_MT (or their parent), or your folder.", **on_resume(PATH)}
    )
    steps: int = field(
        default=20_000, metadata={"help": "Optimizer steps.", "group": OPTIMISATION, **on_resume(LENGTH)}
    )
    batch_size: int = field(default=8, metadata={"help": "Global batch size.", "group": OPTIMISATION})
    lr: float = field(default=1e-4, metadata={"help": "AdamW learning rate.", "group": OPTIMISATION})
    weight_decay: float = field(default=1e-4, metadata={"help": "AdamW weight decay.", "group": OPTIMISATION})
    # lr factor (1 - step / steps) ** power, no warm-up
    poly_power: float = field(default=0.9, metadata={"cli": False})
    grad_clip: float | None = field(
        default=10.0, metadata={"help": "Max global gradient norm.", "group": OPTIMISATION}
    )
    # (task, weight) pairs overriding the paper's 1/2/5/10/50/1 (semseg, parsing, sal, normals, edge, depth)
    task_weights: tuple[tuple[str, float], ...] = field(default=(), metadata={"cli": False})
    # the training augmentation: random scale range; colour jitter on/off
    scale_range: tuple[float, float] = field(default=(0.5, 2.0), metadata={"cli": False})
    photometric: bool = field(default=True, metadata={"cli": False})

    # declared by the subclasses (their help differs): img_size, seed

    def input_size(self) -> tuple[int, int]:
        size = self.img_size  # type: ignore[attr-defined]  (declared by the subclass)
        return tuple(size) if size else DEFAULT_INPUT_SIZE[self.dataset]

    def loss_weights(self) -> dict[str, float]:
        """Per task: the paper's weight (B.5) unless task_weights overrides it."""
        return {**DEFAULT_TASK_WEIGHTS, **dict(self.task_weights)}

    def validate_training(self) -> None:
        """The checks every dense trainer makes: a positive schedule and a crop the ViT grid fits."""
        if self.steps < 1 or self.batch_size < 1:
            raise SakError("--steps and --batch-size must be >= 1")
        h, w = self.input_size()
        if h % 16 or w % 16 or h < 32 or w < 32:
            raise SakError(f"--img-size {h}x{w}: both sides must be multiples of 16 and >= 32")

    def optimizer(self, params):
        """AdamW and its polynomial decay (no warm-up), stepped once per optimizer step."""
        import torch

        optimizer = torch.optim.AdamW(params, lr=self.lr, weight_decay=self.weight_decay)
        scheduler = torch.optim.lr_scheduler.LambdaLR(
            optimizer, lambda s: max(0.0, 1.0 - s / self.steps) ** self.poly_power
        )
        return optimizer, scheduler
