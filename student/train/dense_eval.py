"""Evaluation of a dense multi-task run, one helper for stage 2 (stage2.evaluate) and TIGER
(tiger_eval.evaluate_tiger): metrics per task (mIoU, maxF, mErr, odsF, RMSE), delta_m, the mean gate per
expert, level and task, and the pictures.

    EvalModel   what differs between the two: how a batch becomes (predictions, gates), the image size,
                the experts' names, the levels' gate keys, the backbone for the paper's baselines
    evaluate_dense(model, ...) -> OUT/eval.json, routers.png, predictions.png and, with token-level gates
                (TIGER, stage 2 --router tiger), gates_<task>.png: per task, each expert's gate over a few
                validation images (mean over levels); with save_predictions, OUT/predictions/ in the
                reference's files (prediction_files.py)

The protocol (docs/protocol.md; innovator-zero/SAK test.py, evaluation/evaluate_utils.py): every validation
image whole, centre-padded to the dataset's evaluation size (512x512 PASCAL-Context, 448x576 NYUD; a
folder dataset: the run's input size; a larger image: its own size rounded up to 16), never resized; the
predictions are cropped back to the image before every metric. The model is asked to `prepare` for an
input size other than the one it was built for (its position embedding resampled, its teachers rebuilt).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from sak.pipeline.base.errors import SakError
from sak.pipeline.base.provenance import code_version, now_iso, write_json_atomic
from sak.student.data.dense import EVAL_SIZE, DenseDataset, EvalSamples, collate
from sak.student.data.dense_sets import DATASET_METRIC_NAME
from sak.student.train.boundary_eval import SEISM_MAX_DIST, SeismBoundaryMeter
from sak.student.train.metrics import (
    SINGLE_TASK_BASELINES,
    DepthMeter,
    NormalsMeter,
    SaliencyMeter,
    SegmentationMeter,
    mtl_gain,
)
from sak.student.train.prediction_files import save_prediction

METRIC_NAMES = {
    "semseg": "mIoU",
    "human_parts": "mIoU",
    "sal": "maxF",
    "normals": "mErr",
    "edge": "odsF",
    "depth": "RMSE",
}


def make_meters(outputs: dict[str, int], dataset: str) -> dict[str, Any]:
    max_dist = SEISM_MAX_DIST.get(DATASET_METRIC_NAME[dataset], SEISM_MAX_DIST["pascal_context"])
    meters: dict[str, Any] = {}
    for t, n in outputs.items():
        if t in ("semseg", "human_parts"):
            meters[t] = SegmentationMeter(n)
        elif t == "sal":
            meters[t] = SaliencyMeter()
        elif t == "normals":
            meters[t] = NormalsMeter()
        elif t == "edge":
            meters[t] = SeismBoundaryMeter(max_dist)
        elif t == "depth":
            meters[t] = DepthMeter()
    return meters


def task_output(task: str, pred: torch.Tensor) -> torch.Tensor:
    """Raw head output (B, out, H, W) -> what the meter takes (ids, probabilities, vectors, metres)."""
    if task in ("semseg", "human_parts"):
        return pred.argmax(1)  # (B, H, W)
    if task in ("sal", "edge"):
        return pred.sigmoid()[:, 0]  # (B, H, W)
    return pred


def format_table(report: dict[str, Any]) -> str:
    lines = [f"{'task':<12} {'metric':<6} {'value':>9}"]
    for t, m in report["metrics"].items():
        lines.append(f"{t:<12} {m['name']:<6} {m['value']:>9.4f}")
    if "delta_m" in report:
        lines.append(f"{'delta_m %':<19} {report['delta_m']:>9.2f}")
    return "\n".join(lines)


# ----------------------------------------------------------------------------------------------
# the evaluation loop


@dataclass
class EvalModel:
    """How a run predicts, and what its report names: everything evaluate_dense needs of the run."""

    kind: str  # eval.json "kind": sak-stage2-eval, sak-tiger-eval
    tasks: dict[str, int]  # task -> output channels, in the model's order
    img_size: tuple[int, int]  # the input size the model was built for (a folder dataset's evaluation size)
    predict: Callable[[dict], tuple[dict[str, torch.Tensor], dict[tuple[int, str], torch.Tensor]]]
    experts: list[str]  # names, in the gates' last dimension
    levels: list[int]  # the gate keys' levels (blocks or 0..L-1), in order
    backbone: str  # whose paper single-task baselines apply
    baselines_from: str | None = None  # recorded beside the paper's baselines
    token_grid: tuple[int, int] | None = None  # token-level gates: their grid (gate-map pictures)
    # sets the model up for another (H, W) input before its first batch of that size; None: it has one size
    prepare: Callable[[tuple[int, int]], None] | None = None
    extra: dict[str, Any] = field(default_factory=dict)  # more report fields


def _per_image(gates: torch.Tensor) -> torch.Tensor:
    """(B, E) or token-level (B, N, E) -> (B, E): per image, the mean over tokens."""
    return gates.mean(1) if gates.dim() == 3 else gates


def _baselines(results: dict[str, float], model: EvalModel, dataset: str, given: dict | None) -> dict:
    """delta_m and the baselines used: given ones (every task needs one), else the paper's when it has
    every task of this dataset for the run's backbone, else none."""
    if given is not None:
        missing = [t for t in results if t not in given]
        if missing:
            raise SakError(f"--baselines has no single-task value for {', '.join(missing)}")
        used = {t: given[t] for t in results}
        return {"delta_m": mtl_gain(results, used), "baselines": used}
    metric_ds = DATASET_METRIC_NAME[dataset]
    paper = SINGLE_TASK_BASELINES.get(metric_ds, {}).get(model.backbone)
    if paper is None or not all(t in paper for t in results):
        return {}
    out = {
        "delta_m": mtl_gain(results, dataset=metric_ds, backbone=model.backbone),
        "baselines": {t: paper[t] for t in results},
    }
    if model.baselines_from:
        out["baselines_from"] = model.baselines_from
    return out


def _keep(batch: dict, i: int, outs: dict, gates: dict, model: EvalModel) -> dict:
    """One image for the pictures: input, labels, predictions (cropped to the image) and token gates."""
    pad = batch["pads"][i]
    shown = {
        "image": pad.crop(batch["images"][i]),
        "size": (pad.height, pad.width),
        "pad": pad,
        "input_size": tuple(batch["images"].shape[-2:]),
        "gt": {t: pad.crop(v[i]) for t, v in batch["labels"].items()},
        "pred": {t: pad.crop(v[i]) for t, v in outs.items()},
    }
    if model.token_grid is not None:  # (N, E) per task, mean over levels
        shown["gates"] = {
            t: torch.stack([gates[(lvl, t)][i] for lvl in model.levels]).mean(0).cpu() for t in model.tasks
        }
    return shown


def _input_size(model: EvalModel, dataset: str) -> tuple[int, int]:
    return tuple(EVAL_SIZE.get(dataset, model.img_size))


class _Sizes:
    """Asks the model to prepare for each new padded input size (once per change)."""

    def __init__(self, model: EvalModel) -> None:
        self.model, self.current = model, tuple(model.img_size)

    def __call__(self, size: tuple[int, int]) -> None:
        if size == self.current:
            return
        if self.model.prepare is None:
            raise SakError(
                f"this run predicts {self.current[0]}x{self.current[1]} inputs only, and its evaluation "
                f"needs {size[0]}x{size[1]}"
            )
        self.model.prepare(size)
        self.current = size


def _update(meters: dict, outs: dict, batch: dict, i: int) -> None:
    """Image i of the batch: every meter on the image itself (predictions and labels cropped back)."""
    pad = batch["pads"][i]
    for t, meter in meters.items():
        if t == "edge":
            meter.update(pad.crop(outs[t][i]), batch["boundary_sources"][i])
        else:
            meter.update(pad.crop(outs[t][i : i + 1]), pad.crop(batch["labels"][t][i : i + 1]))


@torch.no_grad()
def evaluate_dense(
    model: EvalModel,
    dataset: str,
    data_root: str | Path,
    split: str,
    out: Path,
    batch_size: int = 4,
    baselines: dict[str, float] | None = None,
    num_pictures: int = 4,
    save_predictions: bool = False,
) -> dict[str, Any]:
    """Metrics of `model` on a split of the dataset; writes OUT/eval.json and the pictures (and with
    save_predictions OUT/predictions/); returns the report."""
    data = DenseDataset(dataset, data_root, split, tuple(model.tasks))
    for t, n in data.outputs.items():
        if n != model.tasks[t]:
            raise SakError(f"task {t}: the model predicts {model.tasks[t]} channels, the dataset has {n}")
    size = _input_size(model, dataset)
    samples = EvalSamples(data, size, boundaries="edge" in model.tasks)
    loader = torch.utils.data.DataLoader(samples, batch_size=batch_size, shuffle=False, collate_fn=collate)
    meters = make_meters(model.tasks, dataset)
    prepare = _Sizes(model)
    out = Path(out).expanduser()
    files = out / "predictions"
    gate_sum: dict[tuple[int, str], torch.Tensor] = {}
    shown: list[dict] = []
    for batch in loader:
        prepare(tuple(batch["images"].shape[-2:]))
        preds, gates = model.predict(batch)
        for key, g in gates.items():
            gate_sum[key] = gate_sum.get(key, 0) + _per_image(g).sum(0).cpu()
        outs = {t: task_output(t, p).cpu() for t, p in preds.items()}
        for i, name in enumerate(batch["names"]):
            _update(meters, outs, batch, i)
            if save_predictions:
                for t in model.tasks:
                    pred = batch["pads"][i].crop(outs[t][i])
                    save_prediction(files, dataset, name, t, pred, model.tasks[t])
            if len(shown) < num_pictures:
                shown.append(_keep(batch, i, outs, gates, model))
    results = {t: float(m.compute()) for t, m in meters.items()}
    n = len(data)
    report: dict[str, Any] = {
        "kind": model.kind,
        "dataset": dataset,
        "split": split,
        "images": n,
        "protocol": {
            "input": list(size),
            "padding": "centre",
            "boundaries": "SEISM" if "edge" in meters else None,
        },
        "metrics": {t: {"name": METRIC_NAMES[t], "value": v} for t, v in results.items()},
        **_baselines(results, model, dataset, baselines),
        "experts": list(model.experts),
        "router_mean_gates": {f"{b}/{t}": (g / n).tolist() for (b, t), g in sorted(gate_sum.items())},
        **model.extra,
        "code_version": code_version(),
        "created": now_iso(),
    }
    if save_predictions:
        report["predictions"] = str(files)
    out.mkdir(parents=True, exist_ok=True)
    pictures = [out / "routers.png", out / "predictions.png"]
    tasks = list(model.tasks)
    plot_gates(gate_sum, n, list(model.levels), tasks, list(model.experts), pictures[0])
    plot_predictions(shown, tasks, model.tasks, pictures[1])
    if model.token_grid is not None:
        for t in tasks:
            pictures.append(out / f"gates_{t}.png")
            plot_gate_maps(shown, t, list(model.experts), model.token_grid, pictures[-1])
    report["pictures"] = [str(p) for p in pictures]
    write_json_atomic(out / "eval.json", report)
    return report


# ----------------------------------------------------------------------------------------------
# pictures (matplotlib, Agg)


def plot_gates(
    gate_sum: dict[tuple[int, str], torch.Tensor],
    count: int,
    levels: list[int],
    tasks: list[str],
    experts: list[str],
    path: Path,
) -> None:
    """The paper's Figure 4: mean gate weight per expert, one panel per level, grouped bars per task."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(levels), figsize=(3.2 * len(levels), 3.0), squeeze=False, sharey=True)
    width = 0.8 / len(experts)
    for ax, b in zip(axes[0], levels):
        for e, name in enumerate(experts):
            values = [float(gate_sum[(b, t)][e]) / count for t in tasks]
            ax.bar(np.arange(len(tasks)) + (e - (len(experts) - 1) / 2) * width, values, width, label=name)
        ax.set_title(f"block {b}")
        ax.set_xticks(np.arange(len(tasks)), tasks, rotation=30, fontsize=8)
    axes[0][0].set_ylabel("mean gate weight")
    axes[0][-1].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def _show(task: str, x: torch.Tensor, classes: int) -> tuple[np.ndarray, dict]:
    """A label or prediction -> (image array, imshow kwargs)."""
    x = x.float()
    if task in ("semseg", "human_parts"):
        return np.ma.masked_equal(x.numpy(), 255), {"cmap": "tab20", "vmin": 0, "vmax": max(1, classes - 1)}
    if task == "normals":
        n = torch.nn.functional.normalize(x, dim=0) if x.abs().sum() else x
        return ((n.permute(1, 2, 0).numpy() + 1) / 2).clip(0, 1), {}
    if task == "depth":
        return np.ma.masked_equal(x.squeeze(0).numpy(), 0), {"cmap": "viridis"}
    return np.ma.masked_equal(x.numpy(), 255), {"cmap": "gray", "vmin": 0, "vmax": 1}


def plot_predictions(shown: list[dict], tasks: list[str], outputs: dict[str, int], path: Path) -> None:
    """Rows: images; columns: input | GT and prediction per task."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    if not shown:
        return
    cols = 1 + 2 * len(tasks)
    fig, axes = plt.subplots(len(shown), cols, figsize=(1.8 * cols, 1.8 * len(shown)), squeeze=False)
    for r, s in enumerate(shown):
        axes[r][0].imshow(s["image"].permute(1, 2, 0).numpy())
        axes[r][0].set_title("input", fontsize=7)
        for k, t in enumerate(tasks):
            for j, (what, x) in enumerate((("GT", s["gt"][t]), ("pred", s["pred"][t]))):
                img, kw = _show(t, x, outputs[t])
                ax = axes[r][1 + 2 * k + j]
                ax.imshow(img, **kw)
                ax.set_title(f"{t} {what}", fontsize=7)
    for ax in axes.ravel():
        ax.axis("off")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def plot_gate_maps(
    shown: list[dict],
    task: str,
    experts: list[str],
    grid: tuple[int, int],
    path: Path,
) -> None:
    """Rows: images; columns: the image, then each expert's gate over the tokens (upsampled to the image)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    if not shown:
        return
    cols = 1 + len(experts)
    fig, axes = plt.subplots(len(shown), cols, figsize=(1.6 * cols, 1.6 * len(shown)), squeeze=False)
    for r, s in enumerate(shown):
        axes[r][0].imshow(s["image"].permute(1, 2, 0).numpy())
        axes[r][0].set_title("input", fontsize=6)
        maps = s["gates"][task].T.reshape(len(experts), 1, *grid)  # (E, 1, gh, gw) over the padded input
        up = s["pad"].crop(torch.nn.functional.interpolate(maps, size=s["input_size"], mode="nearest")[:, 0])
        top = float(up.max())  # one colour scale per image (row), 0 .. its largest gate
        for e, name in enumerate(experts):
            axes[r][1 + e].imshow(np.asarray(up[e]), cmap="magma", vmin=0, vmax=top)
            axes[r][1 + e].set_title(f"{name}\n(max {top:.2f})" if e == 0 else name, fontsize=6)
    for ax in axes.ravel():
        ax.axis("off")
    fig.suptitle(f"{task}: token gates per expert (mean over levels)", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)
