"""The stage-1 run that stage 2 starts from, and its teachers run live on stage-2 images.

Shared by the stage-2 trainer (stage2.py, `--online`) and the stage-2 target cache (stage2_cache.py),
which must produce the same targets; both import it from here.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from sak.pipeline.errors import SakError
from sak.pipeline.teachers import LoadedTeacher
from sak.pipeline.views import cut_view
from sak.student.data.opening import open_cache
from sak.student.run.folder import CONFIG_FILE, RunFolder
from sak.student.run.models import load_run_student
from sak.student.run.record import Stage1Run, run_kind
from sak.student.train.targets import OnlineTeachers


def load_stage1_run(init: str | Path, device: torch.device) -> tuple[torch.nn.Module, Stage1Run]:
    """The stage-1 student (latest checkpoint, built by the student registry) and the run's record."""
    run = Path(init).expanduser()
    if not (run / CONFIG_FILE).exists():
        raise SakError(f"--init {run} is not a stage-1 run folder (no {CONFIG_FILE})")
    record = RunFolder(run).read_record()
    if not isinstance(record, Stage1Run):
        raise SakError(f"--init {run} is a {run_kind(record)} run, not a stage-1 run")
    return load_run_student(run, device).model, record


NAMED_PLAN_SIZE = 224  # side a named teacher is built at before its input is set to the stage-2 crop


@dataclass(frozen=True)
class NamedStore:
    """A teacher given by name (`sak-cache stage2 --teachers`): what Stage2Teachers.stores holds for it."""

    teacher: str
    fingerprint: str
    blocks: tuple[int, ...]
    positions: tuple[int, ...]
    weights: dict  # WeightsChoice.describe(): source, id, path, random_init
    seed: int


def named_teachers(
    names: list[str] | tuple[str, ...],
    weights: dict[str, str],
    random_init: bool,
    seed: int,
    normalization: str = "teacher",
) -> list[tuple[NamedStore, object, object]]:
    """(store, spec, WeightsChoice) per teacher name; the fingerprint hashes everything that makes targets."""
    from sak.pipeline.provenance import stable_hash
    from sak.pipeline.teachers import normalization_for, parse_teachers, resolve_weights

    specs = parse_teachers(list(names))
    choices = resolve_weights(specs, dict(weights), random_init, seed)
    out = []
    for spec in specs:
        described = choices[spec.name].describe(spec)
        mean, std = normalization_for(spec, normalization)
        fp = stable_hash(
            {
                "teacher": spec.name,
                "timm": spec.timm_name,
                "tag": spec.pretrained_tag,
                "kwargs": [list(kv) for kv in spec.model_kwargs],
                "weights": described["id"],
                "mean": mean,
                "std": std,
                "plan_size": NAMED_PLAN_SIZE,
                "levels": list(spec.levels),
            }
        )
        positions = tuple(range(len(spec.levels)))
        out.append(
            (
                NamedStore(spec.name, fp, tuple(spec.levels), positions, described, seed),
                spec,
                choices[spec.name],
            )
        )
    return out


class Stage2Teachers:
    """Live teachers for stage 2, rebuilt from the stage-1 stores exactly as OnlineTeachers does, run by
    the same `LoadedTeacher.forward_levels` as extraction and online stage 1.

    Teachers with a free input size see the augmented image itself (position embedding resampled to the
    stage-2 size, as for the student); SAM sees it resized so its long side is its fixed side, then
    zero-padded square (after normalisation). Returns the stores' levels on the teachers' native grids.
    """

    def __init__(self, stage1: Stage1Run, img_size: tuple[int, int], device: torch.device) -> None:
        fps = [s.fingerprint for s in stage1.cache.stores]
        index = open_cache(stage1.cache.path, fps, require_complete=False)
        online = OnlineTeachers(index.stores, index.plan.size, device)
        self.stores, self.teachers, self.device = index.stores, online.teachers, device
        for t in self.teachers.values():
            if t.spec.fixed_input is None:
                t.model.set_input_size(img_size=tuple(img_size))

    @classmethod
    def named(
        cls,
        names: list[str] | tuple[str, ...],
        weights: dict[str, str],
        random_init: bool,
        seed: int,
        img_size: tuple[int, int],
        device: torch.device,
    ) -> Stage2Teachers:
        """Teachers given by name and weights (no stage-1 run), every tapped level of each."""
        from sak.pipeline.teachers import load_teacher

        self = cls.__new__(cls)
        self.stores, self.teachers, self.device = [], {}, device
        for store, spec, choice in named_teachers(names, weights, random_init, seed):
            t = load_teacher(spec, choice, NAMED_PLAN_SIZE, "teacher", str(device))
            if spec.fixed_input is None:
                t.model.set_input_size(img_size=tuple(img_size))
            self.stores.append(store)
            self.teachers[store.teacher] = t
        return self

    def _views(self, t: LoadedTeacher, images_u8: torch.Tensor) -> torch.Tensor:
        """What the teacher sees: the image itself, or (fixed input side, SAM) the image resized with the
        project's resize so its long side is that side; `LoadedTeacher.prepare` then pads it square."""
        fixed = t.spec.fixed_input
        if fixed:
            H, W = images_u8.shape[-2:]
            size = (round(H * fixed / max(H, W)), round(W * fixed / max(H, W)))
            images_u8 = torch.stack([cut_view(im, (0, 0, W, H), False, size) for im in images_u8.cpu()])
        return images_u8.to(self.device)

    def __call__(self, images_u8: torch.Tensor) -> dict[str, list[torch.Tensor]]:
        """(B, 3, H, W) uint8 -> {teacher: [(B, h, w, C) fp32]} at the stores' levels (each teacher stops
        after its store's deepest kept block)."""
        out = {}
        for store in self.stores:
            t = self.teachers[store.teacher]
            maps = t.forward_levels(self._views(t, images_u8), store.blocks)
            out[store.teacher] = [m.clone() for m in maps]  # inference-mode tensors -> ordinary ones
        return out


def student_levels(maps: dict[str, list[torch.Tensor]], teachers: Stage2Teachers) -> dict:
    return {s.teacher: [maps[s.teacher][p] for p in s.positions] for s in teachers.stores}
