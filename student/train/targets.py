"""Where stage-1 targets come from, and which of the student's maps they are compared with. The cached
path (`cached_targets`) decodes the stored arrays a batch carries; the online path (`OnlineTeachers`)
rebuilds every teacher exactly as its store's manifest records it (weights, normalisation, input side)
and runs it on the batch's views, resampling to the stored grids as extraction did. `stored_levels`
picks the student's maps at the taps each store keeps. Training and Rep Sim evaluation share these, so
they live apart from the training loop.

    cached:  batch["targets"] -> decode_targets -> {teacher: [(B, H, W, C)]} in the stored dtype
    online:  batch["views"][side] (B, 3, s, s) uint8 -> teacher.forward_levels
             -> {teacher: [(B, H, W, C)]} fp32, resampled to the store's grid when it differs
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

from sak.pipeline.base.errors import SakError
from sak.student.data.batches import decode_targets
from sak.student.data.index import StoreInfo


def store_teacher_weights(store: StoreInfo):
    """The WeightsChoice that made a store, from its manifest (checked against the recorded id)."""
    from sak.pipeline.teachers.specs import get_teacher
    from sak.pipeline.teachers.weights import WeightsChoice

    spec = get_teacher(store.teacher)
    w, config = store.manifest.weights, store.manifest.config
    if w.source == "random":
        choice = WeightsChoice("random", seed=config.seed)
    elif w.source == "file":
        if not w.path or not Path(w.path).is_file():
            raise SakError(
                f"--online needs the weights file of {store.teacher} ({store.fingerprint}), {w.path}, "
                f"which is gone"
            )
        choice = WeightsChoice("file", w.path)
    else:
        choice = WeightsChoice("pretrained")
    rebuilt = choice.record(spec).id
    if rebuilt != w.id:
        raise SakError(
            f"cannot rebuild teacher {store.teacher} of store {store.fingerprint}: its weights were "
            f"{w.id!r}, the rebuilt teacher would have {rebuilt!r}"
        )
    return spec, choice


class OnlineTeachers:
    """Live teachers, loaded once in eval mode, each rebuilt exactly as its store's manifest records."""

    def __init__(self, stores: list[StoreInfo], plan_size: int, device: torch.device) -> None:
        from sak.pipeline.teachers.forward import load_teacher

        self.device = device
        self.teachers, self.stores = {}, {s.teacher: s for s in stores}
        for store in stores:
            spec, choice = store_teacher_weights(store)
            pre = store.manifest.identity.preprocessing
            teacher = load_teacher(spec, choice, plan_size, pre.normalization, str(device))
            if not np.allclose(teacher.mean, pre.mean) or not np.allclose(teacher.std, pre.std):
                raise SakError(f"teacher {store.teacher}: normalisation differs from its store's manifest")
            if spec.model_input_side(plan_size) != store.side:
                raise SakError(f"teacher {store.teacher}: input size differs from its store's manifest")
            if any(g != spec.grid(plan_size) for g in store.grids):
                from sak.pipeline.store.resample import resample  # noqa: F401  (fail now, not at the first step
            self.teachers[store.teacher] = teacher

    @property
    def sides(self) -> tuple[int, ...]:
        return tuple(sorted({t.spec.model_input_side(t.plan_size) for t in self.teachers.values()}))

    def __call__(self, batch: dict) -> dict[str, list[torch.Tensor]]:
        """{teacher: [(B, H, W, C) fp32]}: the store's levels, on the store's grid, as extraction made them."""
        out = {}
        for name, t in self.teachers.items():
            store = self.stores[name]
            views = batch["views"][t.spec.model_input_side(t.plan_size)]  # (B, 3, s, s) uint8
            # the levels the store keeps, the teacher stopping after the deepest (as extraction ran it)
            maps = t.forward_levels(views.to(self.device, non_blocking=True), store.blocks)  # fp32
            if any(tuple(m.shape[1:3]) != g for m, g in zip(maps, store.grids)):
                from sak.pipeline.store.resample import resample  # the extraction's own resampling

                maps = [resample(m, g) for m, g in zip(maps, store.grids)]
            out[name] = [m.clone() for m in maps]  # inference-mode tensors cannot enter the autograd graph
        return out


def cached_targets(
    stores: list[StoreInfo], device: torch.device
) -> Callable[[dict], dict[str, list[torch.Tensor]]]:
    def targets(batch: dict) -> dict[str, list[torch.Tensor]]:
        return decode_targets(batch, stores, device)

    return targets


def stored_levels(
    maps: dict[str, list[torch.Tensor]], stores: list[StoreInfo]
) -> dict[str, list[torch.Tensor]]:
    """The student's maps at the taps each store keeps (all four unless it was extracted with --levels)."""
    return {s.teacher: [maps[s.teacher][p] for p in s.positions] for s in stores}
