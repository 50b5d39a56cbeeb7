"""Evaluation of a stage-2 or TIGER run (whichever the run record says): the stage-2 metrics (eval.json,
delta_m) and the pictures, by dense_eval.evaluate_dense.

    stage 2   the run's model (student rebuilt by the student registry + routers and heads), its input
              normalisation from the run record
    TIGER     the run's model and instruction embeddings; the validation images are in no stage-2 cache
              (it holds training views), so the run's teachers are rebuilt from its record (names and
              weights, or the stage-1 run) and run live; their fingerprints must match

    RUN/eval.json            metrics per task, delta_m (--baselines FILE.json, or the paper's table when the
                             dataset matches), mean gate per expert, level and task
    RUN/routers.png          mean gate per expert (one panel per level, bars per task)
    RUN/gates_<task>.png     token-level gate maps (tiger routers), one panel per expert, a few images
    RUN/predictions.png      input | GT and prediction per task
    RUN/predictions/         with save_predictions: the reference code's prediction files (SEISM reads edge/)

Every validation image is evaluated whole, centre-padded to the dataset's evaluation size; a run asked for
another input size than it was trained at gets its position embedding resampled (stage 2) or its teachers
rebuilt at that size (TIGER): `EvalModel.prepare`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from sak.pipeline.base.errors import SakError
from sak.pipeline.teachers.forward import normalize_u8
from sak.student.run.models import load_stage2, load_tiger, run_record_kind
from sak.student.train.dense_eval import EvalModel, evaluate_dense, format_table  # noqa: F401  (the CLI's)
from sak.student.train.dense_run import live_teachers
from sak.student.train.distributed import resolve_device


def _stage2_target(run: Path, dev: torch.device) -> EvalModel:
    loaded = load_stage2(run, dev)
    model, record, heads = loaded.model, loaded.run, loaded.record.multitask
    model.eval()
    mean = torch.tensor(record.input_mean, device=dev).view(1, 3, 1, 1)
    std = torch.tensor(record.input_std, device=dev).view(1, 3, 1, 1)

    current = {"model": model}

    def predict(batch: dict) -> tuple[dict, dict]:
        preds, gates, _ = current["model"](normalize_u8(batch["images"].to(dev), mean, std))
        return preds, gates

    def prepare(size: tuple[int, int]) -> None:  # another input size: resampled from the trained grid
        fresh = load_stage2(run, dev).model
        fresh.student.resize_input(size)
        current["model"] = fresh.eval()

    return EvalModel(
        kind="sak-stage2-eval",
        tasks=dict(model.tasks),
        img_size=tuple(heads.img_size),
        predict=predict,
        prepare=prepare,
        experts=model.expert_names
        if heads.router == "prism"
        else ["stem", *(t.name for t in loaded.record.student.teachers)],
        levels=list(model.levels),
        backbone=loaded.record.student.name,
        token_grid=model.student.token_grid if heads.router == "tiger" else None,
    )


def _tiger_target(run: Path, dev: torch.device) -> EvalModel:
    loaded = load_tiger(run, dev)
    model, record = loaded.model, loaded.run
    model.eval()
    img_size = tuple(record.img_size)
    live = {"size": img_size, "teachers": live_teachers(record.teachers, img_size, dev)}

    def predict(batch: dict) -> tuple[dict, dict]:
        o = model(live["teachers"](batch["images"]), live["size"])
        return o.preds, o.gates

    def prepare(size: tuple[int, int]) -> None:  # another input size: the teachers rebuilt for it
        live.update(size=size, teachers=live_teachers(record.teachers, size, dev))

    return EvalModel(
        kind="sak-tiger-eval",
        tasks=dict(model.tasks),
        img_size=img_size,
        predict=predict,
        prepare=prepare,
        experts=model.expert_names,
        levels=list(range(model.config.num_levels)),
        backbone="vit_b",
        baselines_from="the paper's single-task ViT-B baselines",
        token_grid=tuple(model.config.grid),
    )


def evaluate_run(
    run: str | Path,
    dataset: str,
    data_root: str | Path,
    split: str = "val",
    out: str | Path | None = None,
    batch_size: int = 4,
    device: str | None = None,
    baselines: dict[str, float] | None = None,
    num_pictures: int | None = None,
    save_predictions: bool = False,
) -> dict[str, Any]:
    """Metrics of a stage-2 or TIGER run on a split, by the reference protocol (docs/protocol.md): writes
    OUT/eval.json (OUT = the run), the pictures and, with save_predictions, OUT/predictions/."""
    run = Path(run).expanduser()
    kind = run_record_kind(run)
    if kind not in ("stage2", "tiger"):
        raise SakError(f"{run} is not a stage-2 or TIGER run ({'no config.json' if kind is None else kind})")
    dev = resolve_device(device)
    target = _stage2_target(run, dev) if kind == "stage2" else _tiger_target(run, dev)
    pictures = num_pictures if num_pictures is not None else (4 if kind == "stage2" else 3)
    return evaluate_dense(
        target, dataset, data_root, split, Path(out or run), batch_size, baselines, pictures, save_predictions
    )
