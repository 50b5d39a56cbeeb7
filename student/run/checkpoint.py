"""A run's checkpoint, one format for every trainer: what `--resume` restores, written whole then swapped in.

    RUN/checkpoint/  model.safetensors   the model's state_dict (student, stage-2 model, or TIGER)
                     model.json          ModelRecord: how to rebuild the model, step, weights sha256
                     state.safetensors   optimizer tensors ("optim.<param id>.<name>"); per rank r the
                                         torch CPU RNG ("rng.<r>.torch") and CUDA RNGs ("rng.<r>.cuda.<i>")
                     state.json          TrainState: step, optimizer groups and scalars, scheduler, loader
                                         position, per rank the python and numpy RNG, state sha256

A save writes RUN/checkpoint.tmp completely and renames it into place (the previous one kept as
checkpoint.old until then), so a crash at any point leaves a whole checkpoint: checkpoint/, or
checkpoint.old/ when it struck between the two renames. Under torchrun every rank hands its RNG states to
rank 0, which alone writes. Checkpoints of runs from before run-v1 (legacy.py lists their files) are read
into the same `Checkpoint`, so those runs resume.
"""

from __future__ import annotations

import dataclasses
import json
import random
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from sak.pipeline.base.errors import SakError
from sak.pipeline.base.oserrors import writing
from sak.pipeline.base.provenance import code_version, now_iso, peak_rss_bytes, read_json, sha256_file
from sak.student.run import legacy
from sak.student.run.folder import CHECKPOINT_DIR
from sak.student.run.record import (
    LoaderState,
    ModelRecord,
    OptimizerState,
    PeakMemory,
    RankRng,
    TrainState,
    load_document,
    read_document,
    write_document,
)

MODEL_WEIGHTS, MODEL_JSON = "model.safetensors", "model.json"
STATE_TENSORS, STATE_JSON = "state.safetensors", "state.json"


@dataclass
class RngStates:
    """The random generators of one process: python's, numpy's global one, torch's CPU and CUDA ones."""

    python: Any
    numpy: Any
    torch: torch.Tensor
    cuda: list[torch.Tensor]

    @classmethod
    def capture(cls) -> RngStates:
        cuda = [s.cpu() for s in torch.cuda.get_rng_state_all()] if torch.cuda.is_available() else []
        return cls(random.getstate(), np.random.get_state(), torch.get_rng_state(), cuda)

    def apply(self) -> None:
        if self.python is not None:
            random.setstate(_as_tuple(self.python))
        if self.numpy is not None:
            name, keys, pos, has_gauss, cached = self.numpy
            np.random.set_state(
                (name, np.asarray(keys, dtype=np.uint32), int(pos), int(has_gauss), float(cached))
            )
        torch.set_rng_state(self.torch.cpu())
        if self.cuda and torch.cuda.is_available() and len(self.cuda) == torch.cuda.device_count():
            torch.cuda.set_rng_state_all([s.cpu() for s in self.cuda])


def _as_tuple(x: Any) -> Any:
    return tuple(_as_tuple(v) for v in x) if isinstance(x, list) else x  # JSON lists -> random's tuples


@dataclass
class Checkpoint:
    """What a checkpoint holds, whichever layout it was read from."""

    model: ModelRecord
    weights: dict[str, torch.Tensor]
    optimizer: dict  # an optimizer state_dict
    scheduler: dict
    loader: LoaderState
    rng: list[RngStates]  # per rank; empty when the run never saved them (TIGER before run-v1)
    step: int
    where: Path


# -------------------------------------------------------------------------------------------- saving


def _optimizer_to_files(optimizer: torch.optim.Optimizer) -> tuple[dict[str, torch.Tensor], OptimizerState]:
    sd = optimizer.state_dict()
    tensors, scalars = {}, {}
    for pid, state in sd["state"].items():
        for k, v in state.items():
            if isinstance(v, torch.Tensor):
                tensors[f"optim.{pid}.{k}"] = v.detach().contiguous().cpu()
            else:
                scalars[f"{pid}.{k}"] = v
    return tensors, OptimizerState(param_groups=json.loads(json.dumps(sd["param_groups"])), scalars=scalars)


def _optimizer_from_files(tensors: dict[str, torch.Tensor], meta: OptimizerState) -> dict:
    state: dict[int, dict] = {}
    for key, v in tensors.items():
        if key.startswith("optim."):
            _, pid, name = key.split(".", 2)
            state.setdefault(int(pid), {})[name] = v
    for key, v in meta.scalars.items():
        pid, name = key.split(".", 1)
        state.setdefault(int(pid), {})[name] = v
    groups = [{**g, "betas": tuple(g["betas"])} if "betas" in g else g for g in meta.param_groups]
    return {"state": state, "param_groups": groups}


def save_checkpoint(
    run: Path,
    model_record: ModelRecord,
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
    loader: LoaderState,
    rng: list[RngStates],
) -> Path:
    """Write RUN/checkpoint.tmp completely, then swap it in (`_swapped_in`)."""
    with _swapped_in(run) as tmp:
        weights = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
        save_file(weights, str(tmp / MODEL_WEIGHTS), metadata={"code_version": code_version()})
        tensors, optim_meta = _optimizer_to_files(optimizer)
        for r, states in enumerate(rng):
            tensors[f"rng.{r}.torch"] = states.torch.cpu()
            tensors.update({f"rng.{r}.cuda.{i}": s.cpu() for i, s in enumerate(states.cuda)})
        save_file(tensors, str(tmp / STATE_TENSORS))
        saved = now_iso()
        write_document(
            tmp / MODEL_JSON,
            dataclasses.replace(model_record, weights_sha256=sha256_file(tmp / MODEL_WEIGHTS), saved=saved),
        )
        state = TrainState(
            run=model_record.run,
            step=model_record.step,
            optimizer=optim_meta,
            scheduler=json.loads(json.dumps(scheduler.state_dict())),
            loader=loader,
            rng=[
                RankRng(python=_plain(s.python), numpy=_plain(s.numpy), cuda_devices=len(s.cuda)) for s in rng
            ],
            tensors_sha256=sha256_file(tmp / STATE_TENSORS),
            code_version=code_version(),
            saved=saved,
            peak_memory=measured_peak_memory(),
        )
        write_document(tmp / STATE_JSON, state)
    return run / CHECKPOINT_DIR


@contextmanager
def _swapped_in(run: Path) -> Iterator[Path]:
    """RUN/checkpoint.tmp to fill; when the block ends, swapped in for RUN/checkpoint (a crash leaves the
    previous one intact). A failure removes checkpoint.tmp; a full disk or a read-only folder leaves as
    one line naming the path."""
    tmp, final, old = run / f"{CHECKPOINT_DIR}.tmp", run / CHECKPOINT_DIR, run / f"{CHECKPOINT_DIR}.old"
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        with writing(final):
            tmp.mkdir(parents=True)
            yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if final.exists():
        shutil.rmtree(old, ignore_errors=True)
        final.rename(old)
    tmp.rename(final)
    shutil.rmtree(old, ignore_errors=True)


def measured_peak_memory() -> PeakMemory:
    """This process's peak host memory and, when it used CUDA, its device's peak allocation."""
    gpu = (
        torch.cuda.max_memory_allocated()
        if torch.cuda.is_available() and torch.cuda.is_initialized()
        else None
    )
    return PeakMemory(host_bytes=peak_rss_bytes(), gpu_bytes=gpu)


def _plain(x: Any) -> Any:
    if isinstance(x, np.ndarray):
        return x.tolist()
    if isinstance(x, (list, tuple)):
        return [_plain(v) for v in x]
    return x.item() if isinstance(x, np.generic) else x


# ------------------------------------------------------------------------------------------- reading

# what marks a complete checkpoint folder, per layout (run-v1; stage 1, stage 2 / TIGER before it)
_COMPLETE = (STATE_JSON, legacy.STAGE1_STATE_JSON, legacy.DENSE_STATE)


def checkpoint_dir(run: str | Path) -> Path | None:
    """RUN/checkpoint, or the previous one when a crash struck between the two renames of a save; None
    when the run has none."""
    for name in (CHECKPOINT_DIR, f"{CHECKPOINT_DIR}.old"):
        d = Path(run) / name
        if any((d / marker).exists() for marker in _COMPLETE):
            return d
    return None


def _verified(path: Path, sha256: str) -> Path:
    if sha256_file(path) != sha256:
        raise SakError(f"{path} does not match its recorded checksum; the checkpoint is damaged")
    return path


def read_model_record(d: Path) -> ModelRecord:
    """The ModelRecord of a checkpoint folder, whichever layout wrote it."""
    if (d / legacy.STAGE1_STATE_JSON).exists():
        data = legacy.stage1_model(
            read_json(d / legacy.STAGE1_STUDENT_JSON), read_json(d / legacy.STAGE1_STATE_JSON)
        )
        return load_document(ModelRecord, data, d / legacy.STAGE1_STUDENT_JSON)
    return read_document(d / MODEL_JSON, ModelRecord)


def weights_file(d: Path) -> Path:
    return d / (legacy.STAGE1_WEIGHTS if (d / legacy.STAGE1_STATE_JSON).exists() else MODEL_WEIGHTS)


def read_weights(d: Path, record: ModelRecord, device: str | torch.device = "cpu") -> dict[str, torch.Tensor]:
    """The checkpoint's state_dict, checksum-verified."""
    return load_file(str(_verified(weights_file(d), record.weights_sha256)), device=str(device))


def read_checkpoint(run: str | Path, device: str | torch.device = "cpu") -> Checkpoint | None:
    """The run's latest checkpoint (None when it has none), every file checked against its digest."""
    d = checkpoint_dir(run)
    if d is None:
        return None
    record = read_model_record(d)
    weights = read_weights(d, record, device)
    if (d / STATE_JSON).exists():
        state = read_document(d / STATE_JSON, TrainState)
        tensors = load_file(str(_verified(d / STATE_TENSORS, state.tensors_sha256)))
        rng = [
            RngStates(
                r.python,
                r.numpy,
                tensors[f"rng.{i}.torch"],
                [tensors[f"rng.{i}.cuda.{c}"] for c in range(r.cuda_devices)],
            )
            for i, r in enumerate(state.rng)
        ]
        optimizer = _optimizer_from_files(tensors, state.optimizer)
        return Checkpoint(record, weights, optimizer, state.scheduler, state.loader, rng, state.step, d)
    if (d / legacy.STAGE1_STATE_JSON).exists():
        return _legacy_stage1(d, record, weights)
    return _legacy_dense(d, record, weights, device)


def _legacy_stage1(d: Path, record: ModelRecord, weights: dict) -> Checkpoint:
    meta = read_json(d / legacy.STAGE1_STATE_JSON)
    tensors = load_file(str(d / legacy.STAGE1_STATE_TENSORS))
    optimizer = _optimizer_from_files(tensors, OptimizerState(**meta["optimizer"]))
    cuda = [tensors[k] for k in sorted(tensors) if k.startswith("rng.cuda.")]
    rng = [RngStates(None, None, tensors["rng.cpu"], cuda)]  # python / numpy were never saved (nor used)
    loader = LoaderState(batches=int(meta["loader"]["batches"]), plan=meta["loader"]["plan"])
    return Checkpoint(record, weights, optimizer, meta["scheduler"], loader, rng, int(meta["step"]), d)


def _legacy_dense(d: Path, record: ModelRecord, weights: dict, device) -> Checkpoint:
    raw = read_json(d / MODEL_JSON)
    if "state_sha256" in raw:  # TIGER recorded the digest of its state.pt
        _verified(d / legacy.DENSE_STATE, raw["state_sha256"])
    state = torch.load(d / legacy.DENSE_STATE, map_location="cpu", weights_only=True)
    if int(state["step"]) != record.step:
        raise SakError(f"{d}: weights of step {record.step} but optimizer state of step {state['step']}")
    rng = []
    if "rng" in state:  # stage 2 saved the torch RNG (its routers' noise draws from it); TIGER did not
        rng = [RngStates(None, None, state["rng"], list(state.get("cuda_rng", [])))]
    loader = LoaderState(batches=int(state["step"]))
    return Checkpoint(record, weights, state["optimizer"], state["scheduler"], loader, rng, record.step, d)
