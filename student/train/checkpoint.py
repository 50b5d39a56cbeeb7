"""A stage-1 run's training state: what `--resume` restores, written whole then swapped in.

RUN/checkpoint/  student.safetensors + student.json      weights, student config, code version
                 train_state.safetensors                 optimizer tensors, RNG states
                 train_state.json                        step, optimizer groups, scheduler, loader
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from sak.pipeline.base.errors import SakError
from sak.pipeline.base.provenance import code_version, now_iso, read_json, write_json_atomic
from sak.student.data.loader import CacheLoader
from sak.student.model.student import SakStudent
from sak.student.model.weights import load_student_weights, save_student
from sak.student.train.stage1_config import Stage1Config

CHECKPOINT_DIR = "checkpoint"  # RUN/checkpoint: the latest training state of a run
RUN_CONFIG = "config.json"  # RUN/config.json: the resolved run, written by train_stage1


def _optimizer_to_files(optimizer: torch.optim.Optimizer) -> tuple[dict[str, torch.Tensor], dict]:
    sd = optimizer.state_dict()
    tensors, scalars = {}, {}
    for pid, state in sd["state"].items():
        for k, v in state.items():
            if isinstance(v, torch.Tensor):
                tensors[f"optim.{pid}.{k}"] = v.detach().contiguous().cpu()
            else:
                scalars[f"{pid}.{k}"] = v
    return tensors, {"param_groups": json.loads(json.dumps(sd["param_groups"])), "scalars": scalars}


def _optimizer_from_files(tensors: dict[str, torch.Tensor], meta: dict) -> dict:
    state: dict[int, dict] = {}
    for key, v in tensors.items():
        if key.startswith("optim."):
            _, pid, name = key.split(".", 2)
            state.setdefault(int(pid), {})[name] = v
    for key, v in meta["scalars"].items():
        pid, name = key.split(".", 1)
        state.setdefault(int(pid), {})[name] = v
    groups = [{**g, "betas": tuple(g["betas"])} if "betas" in g else g for g in meta["param_groups"]]
    return {"state": state, "param_groups": groups}


def save_checkpoint(
    run: Path,
    model: SakStudent,
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
    loader: CacheLoader,
    step: int,
    cfg: Stage1Config,
) -> Path:
    """Write RUN/checkpoint.tmp completely, then swap it in (a crash leaves the previous one intact)."""
    tmp, final, old = run / f"{CHECKPOINT_DIR}.tmp", run / CHECKPOINT_DIR, run / f"{CHECKPOINT_DIR}.old"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    save_student(model, tmp / "student.safetensors", extra={"stage1": cfg.to_dict(), "step": step})
    tensors, optim_meta = _optimizer_to_files(optimizer)
    tensors["rng.cpu"] = torch.get_rng_state()
    if torch.cuda.is_available():
        for i, s in enumerate(torch.cuda.get_rng_state_all()):
            tensors[f"rng.cuda.{i}"] = s
    save_file(tensors, str(tmp / "train_state.safetensors"))
    write_json_atomic(
        tmp / "train_state.json",
        {
            "kind": "sak-stage1-state",
            "step": step,
            "optimizer": optim_meta,
            "scheduler": scheduler.state_dict(),
            "loader": loader.state_dict(),
            "config": cfg.to_dict(),
            "code_version": code_version(),
            "saved": now_iso(),
        },
    )
    if final.exists():
        shutil.rmtree(old, ignore_errors=True)
        final.rename(old)
    tmp.rename(final)
    shutil.rmtree(old, ignore_errors=True)
    return final


def checkpoint_dir(run: str | Path) -> Path:
    """RUN/checkpoint, or the previous one if a crash hit between the two renames of a save."""
    run = Path(run)
    for name in (CHECKPOINT_DIR, f"{CHECKPOINT_DIR}.old"):
        if (run / name / "train_state.json").exists():
            return run / name
    raise SakError(f"{run} holds no checkpoint ({CHECKPOINT_DIR}/train_state.json); nothing to resume")


def load_checkpoint(
    run: Path,
    model: SakStudent,
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
    loader: CacheLoader,
    device: torch.device,
) -> int:
    """Restore everything save_checkpoint wrote; returns the step to continue from."""
    d = checkpoint_dir(run)
    load_student_weights(model, d / "student.safetensors", device=device)
    meta = read_json(d / "train_state.json")
    tensors = load_file(str(d / "train_state.safetensors"))
    optimizer.load_state_dict(_optimizer_from_files(tensors, meta["optimizer"]))
    scheduler.load_state_dict(meta["scheduler"])
    loader.load_state_dict(meta["loader"])
    torch.set_rng_state(tensors["rng.cpu"])
    cuda_states = [tensors[k] for k in sorted(tensors) if k.startswith("rng.cuda.")]
    if cuda_states and torch.cuda.is_available() and len(cuda_states) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(cuda_states)
    return int(meta["step"])
