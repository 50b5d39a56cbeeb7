"""Run folders written before the run record (format run-v1): their JSON upgraded into v1 documents.

Before run-v1 each trainer wrote its own shapes, with no `schema_version`:

    stage 1   config.json {"kind": "sak-stage1-run", "stage1": {...}, ...}; checkpoint/student.json (the
              student sidecar) + student.safetensors, train_state.json + train_state.safetensors
    stage 2   config.json {"kind": "sak-stage2-run", "stage2": {...}, ...}; checkpoint/model.json
              {"kind": "sak-stage2", ...} + model.safetensors, state.pt (torch.save: optimizer, scheduler,
              step, torch RNG)
    TIGER     config.json {"kind": "sak-tiger-run", "config": {...}, ...}; checkpoint/model.json
              {"kind": "sak-tiger", ...} + model.safetensors, state.pt (optimizer, scheduler, step)

Here: their JSON -> the v1 JSON of the same facts (record.py validates and builds the records); the old
checkpoint files are read by checkpoint.py. Options that are no longer part of a run's config are dropped
(`stop_after`: an invocation's; `resume`: a command flag); `save_every` is `checkpoint_every` now.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from sak.pipeline.base.errors import SakError

VERSION = 1  # what these upgrades produce (record.RUN_SCHEMA_VERSION)
# the checkpoint files of those runs (checkpoint.py reads them)
STAGE1_WEIGHTS, STAGE1_STUDENT_JSON = "student.safetensors", "student.json"
STAGE1_STATE_TENSORS, STAGE1_STATE_JSON = "train_state.safetensors", "train_state.json"
DENSE_STATE = "state.pt"  # stage 2 and TIGER: torch.save of optimizer, scheduler, step (weights_only)
DROPPED = ("stop_after", "resume")  # per-invocation flags, recorded in the config before run-v1
RENAMED = {"save_every": "checkpoint_every"}


def upgrade_config(config: dict[str, Any]) -> dict[str, Any]:
    """A trainer config as recorded before run-v1 -> its v1 fields."""
    out = {RENAMED.get(k, k): v for k, v in config.items() if k not in DROPPED}
    return out


def upgrade_student(student: dict[str, Any]) -> dict[str, Any]:
    return {**student, "type": student.get("type", "sak")}  # every student before run-v1 was SAK's


def _resumed(entries: list[dict] | None) -> list[dict]:
    return [{"step": int(e["step"]), "at": str(e["at"]), "changed": {}} for e in entries or []]


def _stage1_run(d: dict) -> dict:
    return {
        "kind": "sak-stage1-run",
        "schema_version": VERSION,
        "config": upgrade_config(d["stage1"]),
        "student": upgrade_student(d["student"]),
        "resolved": d["resolved"],
        "cache": d["cache"],
        "code_version": d["code_version"],
        "created": d["created"],
        "resumed": _resumed(d.get("resumed")),
    }


def _stage2_run(d: dict) -> dict:
    rest = {k: v for k, v in d.items() if k not in ("kind", "stage2")}
    return {"kind": "sak-stage2-run", "schema_version": VERSION, "config": upgrade_config(d["stage2"]), **rest,
            "resumed": _resumed(d.get("resumed"))}  # fmt: skip


def _tiger_run(d: dict) -> dict:
    rest = {k: v for k, v in d.items() if k not in ("kind", "config")}
    return {"kind": "sak-tiger-run", "schema_version": VERSION, "config": upgrade_config(d["config"]), **rest,
            "resumed": _resumed(d.get("resumed"))}  # fmt: skip


def _stage2_model(d: dict) -> dict:
    heads = {"tasks": d["tasks"], "router": d["router"], "img_size": d["img_size"],
             "router_hidden": int(d.get("router_hidden", 64))}  # fmt: skip
    if d["router"] == "tiger":
        heads["text_dim"] = int(d["text_dim"])
    return {"kind": "sak-run-model", "schema_version": VERSION, "run": "stage2", "step": int(d["step"]),
            "student": upgrade_student(d["student"]), "multitask": heads, "weights_sha256": d["weights_sha256"],
            "code_version": d["code_version"], "saved": d["saved"]}  # fmt: skip


def _tiger_model(d: dict) -> dict:
    return {"kind": "sak-run-model", "schema_version": VERSION, "run": "tiger", "step": int(d["step"]),
            "tiger": d["model"], "weights_sha256": d["weights_sha256"], "code_version": d["code_version"],
            "saved": d["saved"]}  # fmt: skip


def stage1_model(student_json: dict, train_state_json: dict) -> dict:
    """The ModelRecord of a stage-1 checkpoint before run-v1: the student sidecar and the train state."""
    return {"kind": "sak-run-model", "schema_version": VERSION, "run": "stage1",
            "step": int(train_state_json["step"]), "student": upgrade_student(student_json["config"]),
            "weights_sha256": student_json["weights_sha256"],
            "num_parameters": int(student_json["num_parameters"]),
            "code_version": student_json["code_version"], "saved": train_state_json["saved"]}  # fmt: skip


UPGRADES = {
    "sak-stage1-run": _stage1_run,
    "sak-stage2-run": _stage2_run,
    "sak-tiger-run": _tiger_run,
    "sak-stage2": _stage2_model,
    "sak-tiger": _tiger_model,
}


def upgrade(data: dict, path: str | Path) -> dict:
    """A run file written before run-v1 -> its v1 JSON (validated by the caller)."""
    kind = data.get("kind")
    if kind not in UPGRADES:
        raise SakError(f"{path}: no 'schema_version' and kind {kind!r}: not a SAK run file of any version")
    try:
        return UPGRADES[kind](data)
    except (KeyError, TypeError, ValueError) as e:
        raise SakError(f"{path}: a run file from before run-v1 that lacks {e}; the file is damaged") from None
