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

import numpy as np
import torch

from sak.pipeline.errors import SakError
from sak.pipeline.manifest import now_iso
from sak.pipeline.provenance import code_version, read_json, write_json_atomic
from sak.student.data.dense import DATASET_METRIC_NAME, DenseDataset, EvalSamples, collate
from sak.student.train.distributed import resolve_device
from sak.student.train.metrics import SINGLE_TASK_BASELINES, mtl_gain
from sak.student.train.stage2 import METRIC_NAMES, make_meters, plot_gates, plot_predictions, task_output
from sak.student.train.tiger import RUN_CONFIG, TIGER_KIND, live_teachers, load_tiger


def is_tiger_run(run: str | Path) -> bool:
    path = Path(run).expanduser() / RUN_CONFIG
    return path.exists() and read_json(path).get("kind") == TIGER_KIND


@torch.no_grad()
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
) -> dict[str, Any]:
    dev = resolve_device(device)
    run = Path(run).expanduser()
    record = read_json(run / RUN_CONFIG)
    model, _ = load_tiger(run, dev)
    model.eval()
    data = DenseDataset(dataset, data_root, split, tuple(model.tasks))
    for t, n in data.outputs.items():
        if n != model.tasks[t]:
            raise SakError(f"task {t}: the model predicts {model.tasks[t]} channels, the dataset has {n}")
    img_size = tuple(record["img_size"])
    teachers = live_teachers(record["teachers"], img_size, dev)
    loader = torch.utils.data.DataLoader(
        EvalSamples(data, img_size), batch_size=batch_size, shuffle=False, collate_fn=collate
    )
    meters = make_meters(model.tasks, dataset)
    gate_sum: dict[tuple[int, str], torch.Tensor] = {}
    shown: list[dict] = []
    for batch in loader:
        o = model(teachers(batch["images"]), img_size)
        for key, g in o.gates.items():
            gate_sum[key] = gate_sum.get(key, 0) + g.mean(1).sum(0).cpu()  # per image: mean over tokens
        outs = {t: task_output(t, p).cpu() for t, p in o.preds.items()}
        for i, (h, w) in enumerate(batch["sizes"]):
            for t, meter in meters.items():
                meter.update(outs[t][i : i + 1, ..., :h, :w], batch["labels"][t][i : i + 1, ..., :h, :w])
            if len(shown) < num_pictures:
                shown.append(
                    {
                        "image": batch["images"][i, :, :h, :w],
                        "size": (h, w),
                        "gt": {t: v[i, ..., :h, :w] for t, v in batch["labels"].items()},
                        "pred": {t: v[i, ..., :h, :w] for t, v in outs.items()},
                        "gates": {
                            t: torch.stack([o.gates[(lvl, t)][i] for lvl in range(model.config.num_levels)])
                            .mean(0)
                            .cpu()
                            for t in model.task_order
                        },  # (N, E), mean over levels
                    }
                )
    results = {t: float(m.compute()) for t, m in meters.items()}
    report: dict[str, Any] = {
        "kind": "sak-tiger-eval",
        "dataset": dataset,
        "split": split,
        "images": len(data),
        "metrics": {t: {"name": METRIC_NAMES[t], "value": v} for t, v in results.items()},
        "code_version": code_version(),
        "created": now_iso(),
    }
    metric_ds = DATASET_METRIC_NAME[dataset]
    paper = SINGLE_TASK_BASELINES.get(metric_ds, {}).get("vit_b")
    if baselines is not None:
        missing = [t for t in results if t not in baselines]
        if missing:
            raise SakError(f"--baselines has no single-task value for {', '.join(missing)}")
        report["delta_m"] = mtl_gain(results, {t: baselines[t] for t in results})
        report["baselines"] = {t: baselines[t] for t in results}
    elif paper is not None and all(t in paper for t in results):
        report["delta_m"] = mtl_gain(results, dataset=metric_ds, backbone="vit_b")
        report["baselines"] = {t: paper[t] for t in results}
        report["baselines_from"] = "the paper's single-task ViT-B baselines"
    n = len(data)
    levels = list(range(model.config.num_levels))
    report["experts"] = model.expert_names
    report["router_mean_gates"] = {f"{b}/{t}": (g / n).tolist() for (b, t), g in sorted(gate_sum.items())}
    target = Path(out or run).expanduser()
    target.mkdir(parents=True, exist_ok=True)
    pictures = [target / "routers.png", target / "predictions.png"]
    plot_gates(gate_sum, n, levels, model.task_order, model.expert_names, pictures[0])
    plot_predictions(shown, model.task_order, model.tasks, pictures[1])
    for t in model.task_order:
        pictures.append(target / f"gates_{t}.png")
        plot_gate_maps(shown, t, model.expert_names, tuple(model.config.grid), img_size, pictures[-1])
    report["pictures"] = [str(p) for p in pictures]
    write_json_atomic(target / "eval.json", report)
    return report


def plot_gate_maps(
    shown: list[dict],
    task: str,
    experts: list[str],
    grid: tuple[int, int],
    img_size: tuple[int, int],
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
        h, w = s["size"]
        axes[r][0].imshow(s["image"].permute(1, 2, 0).numpy())
        axes[r][0].set_title("input", fontsize=6)
        maps = s["gates"][task].T.reshape(len(experts), 1, *grid)  # (E, 1, gh, gw)
        up = torch.nn.functional.interpolate(maps, size=img_size, mode="nearest")[:, 0, :h, :w]
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
