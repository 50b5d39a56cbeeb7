"""The options of TIGER's instruction router and counterfactual loss, defined once for `sak-train tiger`
(TigerConfig) and `sak-train stage2 --router tiger` (Stage2Config): each function returns the dataclass
field (default and help) both configs declare, and `validate_routing` checks their values."""

from __future__ import annotations

from dataclasses import field
from typing import Any

from sak.pipeline.base.errors import SakError


def _pretrained(text: str) -> str | None:
    return None if text.strip().lower() == "none" else text.strip()


def instructions_field(group: str | None = None) -> Any:
    return field(
        default=None,
        metadata={
            "help": "JSON {task: sentence} overriding the default instructions.",
            "metavar": "FILE.json",
            "group": group,
        },
    )


def text_model_field(group: str | None = None) -> Any:
    return field(
        default="ViT-B-32",
        metadata={"help": "open_clip model whose text tower encodes the instructions once.", "group": group},
    )


def text_pretrained_field(group: str | None = None) -> Any:
    return field(
        default="laion2b_s34b_b79k",
        metadata={
            "help": "open_clip pretrained tag; 'none' = random init (flagged in the run).",
            "parse": _pretrained,
            "group": group,
        },
    )


def router_hidden_field(group: str | None = None) -> Any:
    return field(default=64, metadata={"help": "Hidden width of each router.", "group": group})


def cf_weight_field(group: str | None = None) -> Any:
    return field(default=0.1, metadata={"help": "Weight of the counterfactual routing loss.", "group": group})


def cf_tau_field(group: str | None = None) -> Any:
    return field(default=0.1, metadata={"help": "Temperature of q = softmax(c / tau).", "group": group})


def cf_experts_field(group: str | None = None) -> Any:
    return field(
        default=None,
        metadata={
            "help": "Counterfactual pass over K experts sampled per step, level and task [default: all].",
            "metavar": "K",
            "group": group,
        },
    )


def cf_every_field(group: str | None = None) -> Any:
    return field(
        default=1,
        metadata={
            "help": "Add the counterfactual term every N steps (1: every step).",
            "metavar": "N",
            "group": group,
        },
    )


def validate_routing(cfg: Any) -> None:
    """The counterfactual options of a config that declares the fields above."""
    if cfg.cf_tau <= 0 or cfg.cf_weight < 0:
        raise SakError("--cf-tau must be > 0 and --cf-weight >= 0")
    if cfg.cf_experts is not None and cfg.cf_experts < 2:
        raise SakError(f"--cf-experts {cfg.cf_experts}: a routing over fewer than 2 experts says nothing")
    if cfg.cf_every < 1:
        raise SakError(f"--cf-every {cfg.cf_every}: must be >= 1")
    if cfg.router_hidden < 1:
        raise SakError(f"--router-hidden {cfg.router_hidden}: must be >= 1")
