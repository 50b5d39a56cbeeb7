"""Stage-2 options (`Stage2Config`): every field is a `sak-train stage2` option (cli/options.py) and says
how it behaves on resume (student/run/resume.py). No torch: the run record and `--help` read it."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from sak.pipeline.base.errors import SakError
from sak.student.data.dense_sets import parse_img_size
from sak.student.run.resume import LENGTH, OUT, PATH, on_resume
from sak.student.train import dense_config as dense
from sak.student.train import routing_options as routing

TIGER_GROUP = "tiger router"  # --help lists these options last
ROUTERS = ("mor", "sum", "tiger")


@dataclass(frozen=True, kw_only=True)
class Stage2Config(dense.DenseTrainConfig):
    """Stage-2 fine-tuning; defaults are the paper's (Table 11, B.3, B.5). Each field's help (metadata)
    is also its `sak-train stage2` option's help. Dataset, optimisation, loss weights and augmentation:
    DenseTrainConfig (shared with TIGER)."""

    init: str = field(metadata={"help": "The stage-1 run folder.", "metavar": "RUN", **on_resume(PATH)})
    out: str = field(
        metadata={"help": "Run folder: config.json, metrics.jsonl, checkpoint/.", **on_resume(OUT)}
    )
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
            "help": "A stage-2 target cache (`sak-cache stage2`; folder or URL) instead of live teachers.",
            **on_resume(PATH),
        },
    )
    router: str = field(
        default="mor",
        metadata={
            "help": "mor: mixture of routers (the paper); sum: plain sum (ablation); tiger: TIGER's "
            "token-level instruction router over the same experts.",
            "choices": ROUTERS,
        },
    )
    freeze_backbone: bool = field(default=False, metadata={"help": "Train routers and heads only."})
    init_paper: str | None = field(
        default=None,
        metadata={
            "help": "PRISM runs: start the student and heads from the PRISM authors' released stage-2 "
            "checkpoint (the --init run gives the student's size and teachers).",
            "metavar": "CKPT",
        },
    )
    # the paper's schedule (the base's place and help, other defaults)
    steps: int = field(
        default=40_000,
        metadata={"help": "Training iterations.", "group": dense.OPTIMISATION, **on_resume(LENGTH)},
    )
    batch_size: int = field(default=4, metadata={"help": "Global batch size.", "group": dense.OPTIMISATION})
    lr: float = field(default=2e-5, metadata={"help": "AdamW learning rate.", "group": dense.OPTIMISATION})
    weight_decay: float = field(
        default=1e-6, metadata={"help": "AdamW weight decay.", "group": dense.OPTIMISATION}
    )
    gamma: float = field(
        default=1.0,
        metadata={"help": "Weight of the distillation loss (eq. 6).", "group": dense.OPTIMISATION},
    )
    img_size: tuple[int, int] | None = field(
        default=None,
        metadata={
            "help": "HxW input, or one side [default: 512x512 PASCAL, 448x576 NYUD].",
            "parse": parse_img_size,
            "metavar": "HxW",
        },
    )
    seed: int = field(
        default=0, metadata={"help": "Head/router initialisation, data order and augmentation."}
    )
    num_workers: int = dense.num_workers_field()
    log_every: int = dense.log_every_field()
    device: str | None = dense.device_field()
    checkpoint_every: int = dense.checkpoint_every_field(1000)
    # --router tiger (student/train/routing_options.py; the same options as `sak-train tiger`)
    instructions: str | None = routing.instructions_field(TIGER_GROUP)
    text_model: str = routing.text_model_field(TIGER_GROUP)
    text_pretrained: str | None = routing.text_pretrained_field(TIGER_GROUP)
    router_hidden: int = routing.router_hidden_field(TIGER_GROUP)
    cf_weight: float = routing.cf_weight_field(TIGER_GROUP)
    cf_tau: float = routing.cf_tau_field(TIGER_GROUP)
    cf_experts: int | None = routing.cf_experts_field(TIGER_GROUP)
    cf_every: int = routing.cf_every_field(TIGER_GROUP)

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
        if self.router not in ROUTERS:
            raise SakError(f"--router must be mor, sum or tiger, got {self.router!r}")
        routing.validate_routing(self)
        self.validate_training()
