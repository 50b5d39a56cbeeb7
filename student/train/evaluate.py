"""Rep Sim: how close the student's maps are to its teachers' targets (mean per-token cosine, averaged
over levels and images), on a cache's held-out shards. `evaluate_repsim` is the measurement the training
loop calls every `eval_every` steps; `repsim_of_checkpoint` measures a saved student (a run folder or a
student .safetensors) outside training, for `sak-train repsim` and the benchmarks. Kept apart from the
training loop so that measuring needs none of it (this module does not import student/train/stage1.py).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from sak.pipeline.base.errors import SakError
from sak.pipeline.buckets.bucket import is_url
from sak.pipeline.buckets.mirror import metadata_mirror
from sak.pipeline.format.documents import read_cache
from sak.student.data.batches import BatchReader
from sak.student.data.index import CacheIndex, StoreInfo
from sak.student.data.loader import eval_batches
from sak.student.data.normalization import input_normalization
from sak.student.data.opening import open_cache
from sak.student.data.order import holdout_rows
from sak.student.model.weights import load_student
from sak.student.run.folder import CONFIG_FILE, RunFolder
from sak.student.run.models import load_run_student
from sak.student.run.record import Stage1Run
from sak.student.train.distributed import DistEnv, all_reduce_sum, bf16_autocast
from sak.student.train.losses import rep_sim_by_teacher, resize_to_target
from sak.student.train.targets import OnlineTeachers, cached_targets, stored_levels

# ------------------------------------------------------------------------------------------- evaluation


@torch.no_grad()
def evaluate_repsim(
    model: torch.nn.Module,
    batches: Iterator[dict],
    targets_of: Callable[[dict], dict[str, list[torch.Tensor]]],
    stores: list[StoreInfo],
    device: torch.device,
    env: DistEnv | None = None,
) -> tuple[dict[str, float], int]:
    """Rep Sim per teacher (mean per-token cosine, averaged over levels and images) and the view count,
    summed over ranks."""
    was_training = model.training
    model.eval()
    names = model.teacher_names
    sums = torch.zeros(len(names) + 1, dtype=torch.float64, device=device)  # per teacher, then count
    for batch in batches:
        images = batch["images"].to(device, non_blocking=True)
        with bf16_autocast(device):
            maps = stored_levels(model(images).distill_maps, stores)
        sims = rep_sim_by_teacher(maps, targets_of(batch))
        n = images.shape[0]
        sums += torch.stack(
            [*(sims[t].double() * n for t in names), torch.tensor(n, dtype=torch.float64, device=device)]
        )
    model.train(was_training)
    if env is not None:
        sums = all_reduce_sum(sums, env)
    count = int(sums[-1].item())  # note: host-device sync
    return ({t: float(sums[i] / max(count, 1)) for i, t in enumerate(names)}, count)


# ------------------------------------------------------------------------------------------ Rep Sim only


@dataclass
class HeldOut:
    """A saved student and a cache's held-out views, ready to evaluate (repsim_of_checkpoint, pictures)."""

    model: torch.nn.Module
    index: CacheIndex
    reader: BatchReader
    rows: np.ndarray
    targets_of: Callable[[dict], dict[str, list[torch.Tensor]]]
    device: torch.device


def open_held_out(
    checkpoint: str | Path,
    cache: str | Path,
    *,
    teachers: tuple[str, ...] = (),
    holdout_shards: int | None = None,
    normalization: str | None = None,
    online: bool = False,
    device: str | None = None,
) -> HeldOut:
    """The student of `checkpoint` (a stage-1 run folder, or a student .safetensors file) and the held-out
    views of `cache`. Settings not given come from the run's record (else: 1 held-out shard, "student")."""
    run: Stage1Run | None = None
    path = Path(checkpoint).expanduser()
    if path.is_dir() and (path / CONFIG_FILE).exists():
        run = RunFolder(path).read_record()
        if not isinstance(run, Stage1Run):
            raise SakError(f"{path} is not a stage-1 run; Rep Sim measures a stage-1 student")
    holdout = holdout_shards if holdout_shards is not None else (run.config.holdout_shards if run else 1)
    norm = normalization or (run.config.normalization if run else "student")
    dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    model = load_run_student(path, dev).model if path.is_dir() else load_student(path, device=dev)
    if not teachers:  # the run's own stores when this cache has them, else the student's teacher names
        fps = tuple(s.fingerprint for s in run.cache.stores) if run is not None else ()
        known = read_cache(metadata_mirror(str(cache)) if is_url(cache) else cache).stores
        teachers = fps if fps and set(fps) <= set(known) else tuple(model.teacher_names)
    index = open_cache(cache, teachers, require_complete=not online)
    dims = {s.teacher: s.dim for s in index.stores}
    for t in model.config.teachers:
        if dims.get(t.name) != t.dim:
            raise SakError(
                f"the student distils {t.name} at width {t.dim}, the cache's store has {dims.get(t.name)}"
            )
    if set(dims) != set(model.teacher_names):
        raise SakError(
            f"the student's teachers {model.teacher_names} differ from the selected stores {sorted(dims)}"
        )
    mean, std = input_normalization(norm, model.config.name)
    teachers_online = OnlineTeachers(index.stores, index.plan.size, dev) if online else None
    reader = BatchReader(
        index,
        model.config.img_size,
        mean,
        std,
        with_targets=not online,
        view_sides=teachers_online.sides if teachers_online else (),
    )
    rows = holdout_rows(index, holdout)
    if not rows.size:
        raise SakError("nothing is held out (--holdout-shards 0): no views to measure Rep Sim on")
    targets_of = teachers_online if teachers_online is not None else cached_targets(index.stores, dev)
    return HeldOut(model, index, reader, rows, targets_of, dev)


def repsim_of_checkpoint(
    checkpoint: str | Path,
    cache: str | Path,
    *,
    teachers: tuple[str, ...] = (),
    holdout_shards: int | None = None,
    normalization: str | None = None,
    batch_size: int = 32,
    online: bool = False,
    device: str | None = None,
) -> tuple[dict[str, float], int]:
    """Rep Sim per teacher of a saved student on a cache's held-out shards (settings: `open_held_out`)."""
    h = open_held_out(
        checkpoint,
        cache,
        teachers=teachers,
        holdout_shards=holdout_shards,
        normalization=normalization,
        online=online,
        device=device,
    )
    return evaluate_repsim(
        h.model, eval_batches(h.reader, h.rows, batch_size), h.targets_of, h.index.stores, h.device
    )


@torch.no_grad()
def repsim_pictures(held: HeldOut, cache: str | Path, out: str | Path, views: int = 3) -> Path:
    """A PNG: per held-out view and teacher, the view, then per stored level the teacher's map beside the
    student's aligned map (resized to the teacher's grid as Rep Sim compares them), both projected by one
    3-component PCA fitted on the teacher's level over the shown views, so their colours compare."""
    from sak.pipeline.inspection.show import pca_rgb, save_sheet, view_images

    rows = held.rows[:views]
    batch = held.reader.read(rows)
    held.model.eval()
    with bf16_autocast(held.device):
        maps = stored_levels(held.model(batch["images"].to(held.device)).distill_maps, held.index.stores)
    targets = held.targets_of(batch)
    images = view_images(Path(cache), [int(r) for r in rows], held.index.plan.size)
    sheet = []
    for store in held.index.stores:
        pairs = []
        for block, s, t in zip(store.blocks, maps[store.teacher], targets[store.teacher]):
            t = t.float().cpu()
            aligned = resize_to_target(s.float(), t.to(s.device)).float().cpu()  # (B, H, W, C)
            pairs.append((block, t.shape[1:3], *pca_rgb(t, also=aligned)))
        for i in range(len(rows)):
            row = [(images[i], f"view {int(rows[i])}")]
            for block, hw, tp, sp in pairs:
                row += [(tp[i], f"{store.teacher} L{block} {hw[0]}x{hw[1]}"), (sp[i], f"student -> L{block}")]
            sheet.append(row)
    return save_sheet(sheet, out)
