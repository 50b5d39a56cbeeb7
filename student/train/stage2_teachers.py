"""The stage-1 run that stage 2 starts from, and its teachers run live on stage-2 images.

Shared by the stage-2 trainer (stage2.py, `--online`) and the stage-2 target cache (`sak-cache stage2`,
whose builder loads them through `Stage2TeacherSet`), which must produce the same targets; both take
them from here.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from sak.pipeline.base.errors import SakError
from sak.pipeline.base.typed_json import from_json, to_json
from sak.pipeline.extraction.stage2 import Stage2TeacherInfo
from sak.pipeline.format.records import WeightsRecord
from sak.pipeline.teachers.forward import LoadedTeacher, fit_to_input
from sak.student.data.opening import open_cache
from sak.student.run.folder import CONFIG_FILE, RunFolder
from sak.student.run.models import load_run_student
from sak.student.run.record import Stage1Run, run_kind
from sak.student.train.targets import OnlineTeachers


def read_stage1_record(init: str | Path) -> Stage1Run:
    """The stage-1 run's record (config.json), refused in one line when `init` is not a stage-1 run."""
    run = Path(init).expanduser()
    if not (run / CONFIG_FILE).exists():
        raise SakError(f"--init {run} is not a stage-1 run folder (no {CONFIG_FILE})")
    record = RunFolder(run).read_record()
    if not isinstance(record, Stage1Run):
        raise SakError(f"--init {run} is a {run_kind(record)} run, not a stage-1 run")
    return record


def load_stage1_run(init: str | Path, device: torch.device) -> tuple[torch.nn.Module, Stage1Run]:
    """The stage-1 student (latest checkpoint, built by the student registry) and the run's record."""
    record = read_stage1_record(init)
    return load_run_student(Path(init).expanduser(), device).model, record


NAMED_PLAN_SIZE = 224  # side a named teacher is built at before its input is set to the stage-2 crop


@dataclass(frozen=True)
class NamedStore:
    """A teacher given by name (`sak-cache stage2 --teachers`): what Stage2Teachers.stores holds for it."""

    teacher: str
    fingerprint: str
    blocks: tuple[int, ...]
    positions: tuple[int, ...]
    weights: dict  # WeightsChoice.record() as JSON (what a run records): source, id, path, random_init
    seed: int


def named_teachers(
    names: list[str] | tuple[str, ...],
    weights: dict[str, str],
    random_init: bool,
    seed: int,
    normalization: str = "teacher",
) -> list[tuple[NamedStore, object, object]]:
    """(store, spec, WeightsChoice) per teacher name; the fingerprint hashes everything that makes targets."""
    from sak.pipeline.base.provenance import stable_hash
    from sak.pipeline.teachers.forward import normalization_for
    from sak.pipeline.teachers.specs import parse_teachers
    from sak.pipeline.teachers.weights import resolve_weights

    specs = parse_teachers(list(names))
    choices = resolve_weights(specs, dict(weights), random_init, seed)
    out = []
    for spec in specs:
        described = choices[spec.name].record(spec)
        mean, std = normalization_for(spec, normalization)
        fp = stable_hash(
            {
                "teacher": spec.name,
                "timm": spec.timm_name,
                "tag": spec.pretrained_tag,
                "kwargs": [list(kv) for kv in spec.model_kwargs],
                "weights": described.id,
                "mean": mean,
                "std": std,
                "plan_size": NAMED_PLAN_SIZE,
                "levels": list(spec.levels),
            }
        )
        positions = tuple(range(len(spec.levels)))
        out.append(
            (
                NamedStore(spec.name, fp, tuple(spec.levels), positions, to_json(described), seed),
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
        from sak.pipeline.teachers.forward import load_teacher

        self = cls.__new__(cls)
        self.stores, self.teachers, self.device = [], {}, device
        for store, spec, choice in named_teachers(names, weights, random_init, seed):
            t = load_teacher(spec, choice, NAMED_PLAN_SIZE, "teacher", str(device))
            if spec.fixed_input is None:
                t.model.set_input_size(img_size=tuple(img_size))
            self.stores.append(store)
            self.teachers[store.teacher] = t
        return self

    def __call__(self, images_u8: torch.Tensor) -> dict[str, list[torch.Tensor]]:
        """(B, 3, H, W) uint8 -> {teacher: [(B, h, w, C) fp32]} at the stores' levels (each teacher stops
        after its store's deepest kept block)."""
        out = {}
        for store in self.stores:
            t = self.teachers[store.teacher]
            # the image itself, or (SAM) resized so its long side is its fixed side, then padded square
            maps = t.forward_levels(fit_to_input(t.spec, images_u8).to(self.device), store.blocks)
            out[store.teacher] = [m.clone() for m in maps]  # inference-mode tensors -> ordinary ones
        return out


@dataclass(frozen=True)
class Stage2TeacherSet:
    """The teachers of a stage-2 target cache, for its builder: the stage-1 run's (`init`) or named ones,
    at the stage-2 crop. Picklable: each worker loads the models itself (`load`); the driver describes
    them without any model (`infos`)."""

    init: str | None
    names: tuple[str, ...]
    weights: tuple[tuple[str, str], ...]  # --weights NAME=PATH of named teachers
    random_init: bool
    seed: int
    crop: tuple[int, int]

    def __post_init__(self) -> None:
        if bool(self.init) == bool(self.names):
            raise SakError("give one of --init RUN (a stage-1 run's teachers) and --teachers NAMES")

    def teachers(self, device: torch.device) -> Stage2Teachers:
        if self.init:
            _, stage1 = load_stage1_run(self.init, device)
            return Stage2Teachers(stage1, self.crop, device)
        return Stage2Teachers.named(
            self.names, dict(self.weights), self.random_init, self.seed, self.crop, device
        )

    def load(self, device: str) -> dict[str, LoadedTeacher]:
        return self.teachers(torch.device(device)).teachers

    def infos(self) -> list[Stage2TeacherInfo]:
        """What the cache records of each teacher (name, fingerprint, blocks, positions, weights)."""
        if self.names:
            named = named_teachers(self.names, dict(self.weights), self.random_init, self.seed)
            return [
                Stage2TeacherInfo(
                    s.teacher,
                    s.fingerprint,
                    s.blocks,
                    s.positions,
                    from_json(WeightsRecord, s.weights),
                    s.seed,
                )
                for s, _, _ in named
            ]
        stage1 = read_stage1_record(self.init)
        fps = [s.fingerprint for s in stage1.cache.stores]
        stores = open_cache(stage1.cache.path, fps, require_complete=False).stores
        return [  # the stage-1 stores' weights: a random-init teacher stays flagged in the stage-2 cache
            Stage2TeacherInfo(s.teacher, s.fingerprint, s.blocks, s.positions, s.manifest.weights)
            for s in stores
        ]


def student_levels(maps: dict[str, list[torch.Tensor]], teachers: Stage2Teachers) -> dict:
    return {s.teacher: [maps[s.teacher][p] for p in s.positions] for s in teachers.stores}
