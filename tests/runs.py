"""Tiny runs of the three trainers for the run-harness tests: the command lines (the same grammar for
all three), and the committed inputs they read (tests/fixtures/v1_cache, tests/fixtures/v1_runs/data)."""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import torch
from safetensors.torch import load_file

FIXTURES = Path(__file__).resolve().parent / "fixtures"
V1_CACHE = FIXTURES / "v1_cache"
V1_RUNS = FIXTURES / "v1_runs"


def copy_inputs(root: Path) -> tuple[Path, Path]:
    """Writable copies of the stage-1 cache and the dense folder dataset under root: (cache, data)."""
    root.mkdir(parents=True, exist_ok=True)
    return (
        Path(shutil.copytree(V1_CACHE, root / "cache")),
        Path(shutil.copytree(V1_RUNS / "data", root / "data")),
    )


def stage1_args(cache: Path, out: Path, *extra: str) -> list[str]:
    return ["stage1", "--cache", str(cache), "--out", str(out), "--student", "micro", "--steps", "4",
            "--batch-size", "2", "--warmup-steps", "1", "--num-workers", "0", "--no-tensorboard",
            "--device", "cpu", *extra]  # fmt: skip


def stage2_args(data: Path, init: Path, out: Path, *extra: str) -> list[str]:
    return ["stage2", "--dataset", "folder", "--data-root", str(data), "--init", str(init), "--out", str(out),
            "--steps", "4", "--batch-size", "2", "--img-size", "48x64", "--gamma", "0", "--lr", "1e-3",
            "--checkpoint-every", "2", "--num-workers", "0", "--device", "cpu", *extra]  # fmt: skip


def tiger_args(data: Path, out: Path, *extra: str) -> list[str]:
    return ["tiger", "--dataset", "folder", "--data-root", str(data), "--online", "--teachers", "dinov2_tiny",
            "--out", str(out), "--steps", "4", "--batch-size", "2", "--img-size", "48x64", "--dim", "8",
            "--router-hidden", "4", "--text-model", "ViT-S-32-alt", "--text-pretrained", "none", "--lr", "1e-3",
            "--checkpoint-every", "2", "--num-workers", "0", "--device", "cpu", *extra]  # fmt: skip


def metrics(run: Path) -> list[dict]:
    return [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines() if x.strip()]


def train_losses(run: Path) -> list[float]:
    return [r["loss"] for r in metrics(run) if r["kind"] == "train"]


def train_steps(run: Path) -> list[int]:
    return [r["step"] for r in metrics(run) if r["kind"] == "train"]


def checkpoint_tensors(run: Path) -> dict[str, torch.Tensor]:
    """Every tensor of the run's checkpoint: the weights, and the optimizer state and RNG states."""
    tensors = {f"model.{k}": v for k, v in load_file(str(run / "checkpoint/model.safetensors")).items()}
    tensors.update({f"state.{k}": v for k, v in load_file(str(run / "checkpoint/state.safetensors")).items()})
    return tensors


def digest(tensors: dict[str, torch.Tensor]) -> str:
    h = hashlib.sha256()
    for k in sorted(tensors):
        t = tensors[k].detach().cpu().contiguous().reshape(-1)
        h.update(f"{k}|{t.dtype}|{tuple(t.shape)}|".encode() + t.view(torch.uint8).numpy().tobytes())
    return h.hexdigest()
