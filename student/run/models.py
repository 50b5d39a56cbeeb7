"""The model of a run's checkpoint, rebuilt from its record and loaded (checksum-verified), any trainer.

    load_run_student(RUN)   stage 1: the student, built by the student registry from model.json's config
    build_multitask(rec)    stage 2: the student (registry) + routers and heads (SakMultiTask; PRISM's
                            PrismStage2Model for router "prism"), no weights
    load_stage2(RUN)        stage 2: that model with its weights, and the run's records
    load_tiger(RUN)         TIGER: Tiger with its weights and instruction embeddings, and the run's records

Every consumer of a trained model (stage 2 --init, evaluation, Rep Sim, the stage-2 cache builder) goes
through here, so a new student type registered in student/model/registry.py needs no change here.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from sak.pipeline.base.errors import SakError
from sak.student.model.registry import build_student, without_pretrained
from sak.student.run.checkpoint import checkpoint_dir, read_model_record, read_weights
from sak.student.run.folder import CONFIG_FILE, RunFolder
from sak.student.run.record import ModelRecord, RunRecord, run_kind


@dataclass
class RunModel:
    """A run's model as its checkpoint holds it, with the records that describe it."""

    model: torch.nn.Module
    run: RunRecord | None  # config.json (None for a bare checkpoint folder)
    record: ModelRecord  # checkpoint/model.json
    checkpoint: Path


def _checkpoint_of(path: str | Path, what: str) -> tuple[Path, RunRecord | None]:
    """(checkpoint folder, run record) of a run folder, or of a checkpoint folder given directly."""
    path = Path(path).expanduser()
    if (path / CONFIG_FILE).exists():
        d = checkpoint_dir(path)
        if d is None:
            raise SakError(
                f"{path} holds no checkpoint yet (stopped before its first save); nothing to {what}"
            )
        return d, RunFolder(path).read_record()
    d = checkpoint_dir(path.parent) if path.name in ("checkpoint", "checkpoint.old") else None
    if d is None:
        raise SakError(f"{path} is not a run folder (no {CONFIG_FILE}) nor a run's checkpoint folder")
    return path, None


def _expect(record: ModelRecord, kind: str, where: Path) -> None:
    if record.run != kind:
        raise SakError(f"{where} holds a {record.run} checkpoint, not a {kind} one")


def load_run_student(path: str | Path, device: torch.device | str = "cpu") -> RunModel:
    """The student of a stage-1 run (its latest checkpoint)."""
    d, run = _checkpoint_of(path, "load")
    record = read_model_record(d)
    _expect(record, "stage1", d)
    student = build_student(without_pretrained(record.student))
    student.load_state_dict(read_weights(d, record), strict=True)
    return RunModel(student.to(device), run, record, d)


def build_multitask(record: ModelRecord):
    """Stage 2's model of a model record, weights not loaded (a tiger router gets a placeholder
    instruction buffer of the right shape: the weights file holds the real one)."""
    from sak.student.model.multitask import SakMultiTask

    heads = record.multitask
    student = build_student(without_pretrained(record.student))
    if heads.router == "prism":  # PRISM: task-conditioned MoE student + heads (model/prism_stage2.py)
        from sak.student.model.prism_stage2 import PrismStage2Model

        return PrismStage2Model.from_record(record.student, student, heads.tasks, heads.img_size)
    student.resize_input(tuple(heads.img_size))
    instructions = torch.zeros(len(heads.tasks), int(heads.text_dim)) if heads.router == "tiger" else None
    return SakMultiTask(student, heads.tasks, heads.router, instructions, heads.router_hidden)


def load_stage2(path: str | Path, device: torch.device | str = "cpu") -> RunModel:
    """A stage-2 run's model (latest checkpoint), checksum-verified."""
    d, run = _checkpoint_of(path, "evaluate")
    record = read_model_record(d)
    _expect(record, "stage2", d)
    model = build_multitask(record)
    model.load_state_dict(read_weights(d, record), strict=True)
    return RunModel(model.to(device), run, record, d)


def load_tiger(path: str | Path, device: torch.device | str = "cpu") -> RunModel:
    """A TIGER run's model (latest checkpoint) with the run's instruction embeddings."""
    from sak.student.model.tiger import Tiger

    d, run = _checkpoint_of(path, "evaluate")
    record = read_model_record(d)
    _expect(record, "tiger", d)
    emb, _ = RunFolder(d.parent).load_instructions()
    model = Tiger(record.tiger, emb)
    model.load_state_dict(read_weights(d, record), strict=True)
    return RunModel(model.to(device), run, record, d)


def run_record_kind(path: str | Path) -> str | None:
    """ "stage1", "stage2" or "tiger" for a run folder (None: not one)."""
    path = Path(path).expanduser()
    if not (path / CONFIG_FILE).exists():
        return None
    return run_kind(RunFolder(path).read_record())
