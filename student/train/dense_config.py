"""What stage 2 (Stage2Config) and TIGER (TigerConfig) share: the dense dataset, the optimisation
(AdamW, polynomial decay, clipping), the loss weights and the augmentation, declared once here.

DenseTrainConfig is the base dataclass of both (keyword-only fields). A subclass re-declares a field only to
change its default or help (e.g. `steps`: 40000 for stage 2, 20000 for TIGER); a re-declared field keeps the
base's place, so each command's --help lists its options in the same order as before the base existed
(options.py orders by group, then by field). Fields whose place differs between the two commands
(num_workers, log_every, device) are shared as field functions instead.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from typing import Any

import torch

from sak.pipeline.base.errors import SakError
from sak.student.data.dense import DATASETS, DEFAULT_INPUT_SIZE, DenseDataset
from sak.student.train.task_losses import DEFAULT_TASK_WEIGHTS

OPTIMISATION = "optimisation"  # the --help group of the optimiser's options


def num_workers_field() -> Any:
    return field(default=2, metadata={"help": "DataLoader workers."})


def log_every_field() -> Any:
    return field(default=50, metadata={"help": "Console line every N steps."})


def device_field() -> Any:
    return field(default=None, metadata={"help": "cpu or cuda [default: cuda when available]."})


@dataclass(frozen=True, kw_only=True)
class DenseTrainConfig:
    """Dataset, optimisation, loss weights and augmentation of a dense multi-task training run."""

    dataset: str = field(
        metadata={"help": "Dense dataset: PASCAL-Context, NYUD-v2, or your own folder.", "choices": DATASETS}
    )
    data_root: str = field(metadata={"help": "PASCAL_MT / NYUD_MT (or their parent), or your folder."})
    steps: int = field(default=20_000, metadata={"help": "Optimizer steps.", "group": OPTIMISATION})
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

    def to_dict(self) -> dict[str, Any]:
        return json.loads(json.dumps(dataclasses.asdict(self)))

    def validate_training(self) -> None:
        """The checks every dense trainer makes: a positive schedule and a crop the ViT grid fits."""
        if self.steps < 1 or self.batch_size < 1:
            raise SakError("--steps and --batch-size must be >= 1")
        h, w = self.input_size()
        if h % 16 or w % 16 or h < 32 or w < 32:
            raise SakError(f"--img-size {h}x{w}: both sides must be multiples of 16 and >= 32")

    def optimizer(self, params) -> tuple[torch.optim.Optimizer, torch.optim.lr_scheduler.LRScheduler]:
        """AdamW and its polynomial decay (no warm-up), stepped once per optimizer step."""
        optimizer = torch.optim.AdamW(params, lr=self.lr, weight_decay=self.weight_decay)
        scheduler = torch.optim.lr_scheduler.LambdaLR(
            optimizer, lambda s: max(0.0, 1.0 - s / self.steps) ** self.poly_power
        )
        return optimizer, scheduler

    def cache_identity(self, data: DenseDataset, crop: tuple[int, int]) -> dict[str, Any]:
        """What a stage-2 target cache must have been built with to serve this run (its identity fields)."""
        from sak.student.data.stage2_views import PLAN_VERSION, SPLIT, names_hash

        return {
            "dataset": self.dataset,
            "split": SPLIT,
            "num_images": len(data),
            "names_sha": names_hash(data.names),
            "seed": int(self.seed),  # type: ignore[attr-defined]
            "crop": list(crop),
            "scale_range": [float(x) for x in self.scale_range],
            "photometric": bool(self.photometric),
            "plan_version": PLAN_VERSION,
        }
