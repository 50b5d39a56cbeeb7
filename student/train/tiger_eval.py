"""Evaluation of a TIGER run: the stage-2 metrics (eval.json, delta_m) and the routing pictures.

The validation images are in no stage-2 cache (it holds training views), so the run's teachers are rebuilt
from its record (names and weights, or the stage-1 run) and run live; their fingerprints must match.

    RUN/eval.json            metrics per task, delta_m (--baselines FILE.json, or the paper's table when the
                             dataset matches), mean gate per expert, level and task
    RUN/routers.png          mean gate per expert, one panel per level, bars per task
    RUN/gates_<task>.png     token-level gate maps (mean over levels), one panel per expert, a few images
    RUN/predictions.png      input | GT and prediction per task
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from sak.pipeline.provenance import read_json
from sak.student.train.dense_eval import EvalModel, evaluate_dense, plot_gate_maps  # noqa: F401
from sak.student.train.distributed import resolve_device
from sak.student.train.tiger import RUN_CONFIG, TIGER_KIND, live_teachers, load_tiger


def is_tiger_run(run: str | Path) -> bool:
    path = Path(run).expanduser() / RUN_CONFIG
    return path.exists() and read_json(path).get("kind") == TIGER_KIND


def evaluate_tiger(
    run: str | Path,
    dataset: str,
    data_root: str | Path,
    split: str = "val",
    out: str | Path | None = None,
    batch_size: int = 4,
    device: str | None = None,
    baselines: dict[str, float] | None = None,
    num_pictures: int = 3,
    save_predictions: bool = False,
) -> dict[str, Any]:
    """TIGER's metrics and pictures (dense_eval.evaluate_dense), its teachers rebuilt and run live."""
    dev = resolve_device(device)
    run = Path(run).expanduser()
    record = read_json(run / RUN_CONFIG)
    model, _ = load_tiger(run, dev)
    model.eval()
    img_size = tuple(record["img_size"])
    live = {"size": img_size, "teachers": live_teachers(record["teachers"], img_size, dev)}

    def predict(batch: dict) -> tuple[dict, dict]:
        o = model(live["teachers"](batch["images"]), live["size"])
        return o.preds, o.gates

    def prepare(size: tuple[int, int]) -> None:  # another input size: the teachers rebuilt for it
        live.update(size=size, teachers=live_teachers(record["teachers"], size, dev))

    target = EvalModel(
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
    return evaluate_dense(
        target,
        dataset,
        data_root,
        split,
        Path(out or run),
        batch_size,
        baselines,
        num_pictures,
        save_predictions,
    )
