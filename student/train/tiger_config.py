"""TIGER's options (`TigerConfig`): every field is a `sak-train tiger` option (cli/options.py) and says
how it behaves on resume (student/run/resume.py). No torch: the run record and `--help` read it."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from sak.pipeline.base.errors import SakError
from sak.student.data.dense_sets import parse_grid, parse_img_size
from sak.student.run.resume import OUT, PATH, on_resume
from sak.student.train import dense_config as dense
from sak.student.train import routing_options as routing


def _parse_weights(text: str) -> tuple[str, str]:
    # pipeline.teachers (parse_weights, weights_field) imports torch: resolved when the option is parsed,
    # so `sak-train tiger --help` stays light
    from sak.pipeline.teachers.weights import parse_weights

    return parse_weights(text)


@dataclass(frozen=True, kw_only=True)
class TigerConfig(dense.DenseTrainConfig):
    """Every option of `sak-train tiger` (defaults are ours: the paper's are not public). Dataset,
    optimisation, loss weights and augmentation: DenseTrainConfig (shared with stage 2)."""

    out: str = field(
        metadata={"help": "Run folder: config.json, metrics.jsonl, checkpoint/.", **on_resume(OUT)}
    )
    cache: str | None = field(
        default=None,
        metadata={
            "help": "A stage-2 target cache (`sak-cache stage2`; folder or URL): no teacher in memory.",
            **on_resume(PATH),
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
            "parse": _parse_weights,
            "metavar": "NAME=PATH",
        },
    )
    random_init: bool = field(
        default=False, metadata={"help": "With --online: random-init named teachers (tests; flagged)."}
    )
    tasks: tuple[str, ...] = field(
        default=(), metadata={"help": "Comma list of tasks [default: all of the dataset's]."}
    )
    instructions: str | None = routing.instructions_field()
    text_model: str = routing.text_model_field()
    text_pretrained: str | None = routing.text_pretrained_field()
    dim: int = field(default=256, metadata={"help": "Width D of the projected experts and the heads."})
    router_hidden: int = routing.router_hidden_field()
    grid: tuple[int, int] | None = field(
        default=None,
        metadata={
            "help": "Common token grid HxW [default: crop / 16].",
            "parse": parse_grid,
            "metavar": "HxW",
        },
    )
    cf_weight: float = routing.cf_weight_field()
    cf_tau: float = routing.cf_tau_field()
    cf_experts: int | None = routing.cf_experts_field()
    cf_every: int = routing.cf_every_field()
    batch_size: int = field(default=8, metadata={"help": "Images per step.", "group": dense.OPTIMISATION})
    lr: float = field(
        default=1e-4,
        metadata={"help": "AdamW learning rate (polynomial decay 0.9).", "group": dense.OPTIMISATION},
    )
    img_size: tuple[int, int] | None = field(
        default=None,
        metadata={
            "help": "HxW crop, or one side [default: the dataset's; must be the cache's].",
            "parse": parse_img_size,
            "metavar": "HxW",
        },
    )
    seed: int = field(default=0, metadata={"help": "Init, data order, augmentation (the cache's --seed)."})
    num_workers: int = dense.num_workers_field()
    log_every: int = dense.log_every_field()
    checkpoint_every: int = dense.checkpoint_every_field(500)
    device: str | None = dense.device_field()

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
        routing.validate_routing(self)
        if self.dim % 4:
            raise SakError(f"--dim {self.dim}: must be a multiple of 4 (the heads split it over 4 levels)")
        self.validate_training()
