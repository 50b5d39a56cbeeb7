"""The run record: every JSON file of a run folder as a typed record, read and written here only.

A run folder (format run-v1, the same for stage 1, stage 2 and TIGER):

    RUN/config.json                  Stage1Run | Stage2Run | TigerRun (by `kind`): the resolved run, its
                                     config (the trainer's config dataclass), lineage, resumptions
    RUN/metrics.jsonl                one JSON object per line: {"kind": train|eval|skipped, "step", ...}
                                     (free-form numbers: the one file not validated, see folder.py)
    RUN/instructions.json            InstructionsRecord (TIGER, stage 2 --router tiger) + .safetensors
    RUN/checkpoint/model.json        ModelRecord: what rebuilds the model (student config through the
                                     student registry, stage-2 heads, TIGER's config), step, sha256
    RUN/checkpoint/model.safetensors the model's state_dict
    RUN/checkpoint/state.json        TrainState: step, optimizer groups, scheduler, loader position,
                                     every rank's python / numpy RNG, sha256 of state.safetensors
    RUN/checkpoint/state.safetensors optimizer tensors; torch CPU and CUDA RNG states per rank
    RUN/.sak-lock                    the trainer's lock (pipeline/lock.py), naming its holder

Every read validates the document against the shipped JSON Schema (student/schema/run-v1.schema.json,
generated from these records: `python -m sak.student.schema_gen`), the same mechanism the cache format uses
(sak.pipeline.base.typed_json.SchemaFamily), and names the file and field path of the first problem. Runs
written before this format (no `schema_version`) are read through legacy.py's upgrade into the same
records, so they resume and evaluate. A v1 record written before a config option existed gets that
option's default.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from sak.pipeline.base.errors import SakError
from sak.pipeline.base.provenance import read_json, write_json_atomic
from sak.pipeline.base.typed_json import OMIT, SchemaFamily, doc, to_json
from sak.pipeline.format.records import (
    WeightsRecord,  # the one record of a teacher's weights (cache and run alike
)
from sak.student.model.config import InstructionIdentity, StudentConfig, TigerModelConfig
from sak.student.run import legacy
from sak.student.train.stage1_config import Stage1Config
from sak.student.train.stage2_config import Stage2Config
from sak.student.train.tiger_config import TigerConfig

RUN_SCHEMA_VERSION = 1
SCHEMA_FILE = f"run-v{RUN_SCHEMA_VERSION}.schema.json"
SCHEMA_ID = f"https://sak-cache.invalid/schema/{SCHEMA_FILE}"
RunKind = Literal["stage1", "stage2", "tiger"]


@dataclass(frozen=True, kw_only=True)
class Resumption:
    """One resume of the run: from which step, when, and the options that changed (recorded, given)."""

    step: int
    at: str
    changed: dict[str, tuple[Any, Any]] = field(default_factory=dict)


# ------------------------------------------------------------------------------------------- stage 1


@dataclass(frozen=True, kw_only=True)
class StoreLineage:
    """One cache store a stage-1 run trained on, exactly as read (its manifest's sha256)."""

    fingerprint: str
    teacher: str
    codec: str
    manifest_sha256: str


@dataclass(frozen=True, kw_only=True)
class CacheLineage:
    """Where the stage-1 cache was and which of its records the run read."""

    path: str
    url: str | None
    dataset_fingerprint: str
    views_sha256: str
    view_plan: dict[str, Any] = field(metadata=doc("the cache's view plan, as its cache.json holds it"))
    stores: list[StoreLineage]


@dataclass(frozen=True, kw_only=True)
class Stage1Resolved:
    """What the config resolved to on this machine: schedule, data order, normalisation."""

    total_steps: int
    warmup_steps: int
    steps_per_epoch: float
    min_ratio: float
    world_size: int
    batch_per_rank: int
    streams_per_rank: int = field(metadata=doc("loader streams per rank: part of the data order"))
    train_shards: int
    samples_per_epoch: int
    holdout_views: int
    skipped_shards: list[int]
    skipped_samples: int
    input_mean: list[float]
    input_std: list[float]
    img_size: int
    device: str


@dataclass(frozen=True, kw_only=True)
class Stage1Run:
    """RUN/config.json of `sak-train stage1`."""

    kind: Literal["sak-stage1-run"] = "sak-stage1-run"
    schema_version: int = RUN_SCHEMA_VERSION
    config: Stage1Config
    student: StudentConfig
    resolved: Stage1Resolved
    cache: CacheLineage
    code_version: str
    created: str
    resumed: list[Resumption] = field(default_factory=list)


# ------------------------------------------------------------------------------------------- stage 2


@dataclass(frozen=True, kw_only=True)
class Stage2Run:
    """RUN/config.json of `sak-train stage2`."""

    kind: Literal["sak-stage2-run"] = "sak-stage2-run"
    schema_version: int = RUN_SCHEMA_VERSION
    config: Stage2Config
    dataset: str
    img_size: tuple[int, int]
    input_mean: list[float] = field(metadata=doc("the stage-1 run's student input normalisation"))
    input_std: list[float]
    init: str = field(metadata=doc("the stage-1 run folder the student came from"))
    teachers: list[str]
    instructions: InstructionIdentity | None = field(default=None, metadata=OMIT)  # --router tiger
    tasks: dict[str, int]
    task_weights: dict[str, float]
    train_images: int
    trainable_parameters: int
    device: str
    world_size: int
    code_version: str
    created: str
    resumed: list[Resumption] = field(default_factory=list)


# ------------------------------------------------------------------------------------------- TIGER


@dataclass(frozen=True, kw_only=True)
class TeacherRef:
    teacher: str
    fingerprint: str
    weights: WeightsRecord | None = field(
        metadata=doc("the teacher's weights, as the cache format records them")
    )
    seed: int | None


@dataclass(frozen=True, kw_only=True)
class TeacherSourceRecord:
    """Where TIGER's teacher maps came from: enough to rebuild the teachers live for evaluation."""

    source: Literal["cache", "named"]
    cache: str | None = field(default=None, metadata=OMIT)
    init: str | None = field(metadata=doc("the stage-1 run whose stores the teachers are; null: by name"))
    teachers: list[TeacherRef]


@dataclass(frozen=True, kw_only=True)
class TigerRun:
    """RUN/config.json of `sak-train tiger`."""

    kind: Literal["sak-tiger-run"] = "sak-tiger-run"
    schema_version: int = RUN_SCHEMA_VERSION
    config: TigerConfig
    dataset: str
    img_size: tuple[int, int]
    tasks: dict[str, int]
    experts: list[str]
    teachers: TeacherSourceRecord
    instructions: InstructionIdentity
    trainable_parameters: int
    router_parameters: int
    train_images: int
    device: str
    world_size: int
    code_version: str
    created: str
    resumed: list[Resumption] = field(default_factory=list)


RunRecord = Stage1Run | Stage2Run | TigerRun
RUN_KINDS: dict[str, type] = {
    "sak-stage1-run": Stage1Run,
    "sak-stage2-run": Stage2Run,
    "sak-tiger-run": TigerRun,
}


def run_kind(record: RunRecord) -> RunKind:
    return {Stage1Run: "stage1", Stage2Run: "stage2", TigerRun: "tiger"}[type(record)]


# ---------------------------------------------------------------------------------------- checkpoint


@dataclass(frozen=True, kw_only=True)
class MultiTaskHeads:
    """Stage 2's routers and heads around the student (SakMultiTask)."""

    tasks: dict[str, int]
    router: str
    img_size: tuple[int, int] = field(metadata=doc("the input size the stem's position embedding has"))
    text_dim: int | None = field(default=None, metadata=OMIT)  # --router tiger: instruction width
    router_hidden: int


@dataclass(frozen=True, kw_only=True)
class ModelRecord:
    """RUN/checkpoint/model.json: what rebuilds the model of model.safetensors, and its digest."""

    kind: Literal["sak-run-model"] = "sak-run-model"
    schema_version: int = RUN_SCHEMA_VERSION
    run: RunKind
    step: int
    student: StudentConfig | None = field(default=None, metadata=OMIT)  # stage 1 and 2 (the registry's)
    multitask: MultiTaskHeads | None = field(default=None, metadata=OMIT)  # stage 2
    tiger: TigerModelConfig | None = field(default=None, metadata=OMIT)  # TIGER
    weights_sha256: str
    num_parameters: int | None = field(default=None, metadata=OMIT)  # absent in runs before run-v1
    code_version: str
    saved: str


@dataclass(frozen=True, kw_only=True)
class OptimizerState:
    """The optimizer's state_dict without its tensors (those are in state.safetensors)."""

    param_groups: list[dict[str, Any]]
    scalars: dict[str, Any] = field(metadata=doc("'<param id>.<name>' -> a non-tensor state value"))


@dataclass(frozen=True, kw_only=True)
class LoaderState:
    """Where the data stream stands: batches handed out, and the order they follow (stage 1's plan)."""

    batches: int
    plan: dict[str, Any] | None = field(default=None, metadata=OMIT)


@dataclass(frozen=True, kw_only=True)
class RankRng:
    """One rank's random generators besides torch's (whose states are tensors in state.safetensors)."""

    python: list[Any] = field(metadata=doc("random.getstate()"))
    numpy: list[Any] = field(metadata=doc("numpy.random.get_state() (legacy global generator)"))
    cuda_devices: int = field(metadata=doc("CUDA RNG states saved for this rank (0 on the CPU)"))


@dataclass(frozen=True, kw_only=True)
class PeakMemory:
    """The largest memory this process had used when the checkpoint was saved (rank 0's process)."""

    host_bytes: int = field(metadata=doc("peak resident host memory (ru_maxrss)"))
    gpu_bytes: int | None = field(
        default=None, metadata=doc("torch.cuda.max_memory_allocated on its device; absent on the CPU", **OMIT)
    )


@dataclass(frozen=True, kw_only=True)
class TrainState:
    """RUN/checkpoint/state.json: everything a resume restores besides the weights."""

    kind: Literal["sak-train-state"] = "sak-train-state"
    schema_version: int = RUN_SCHEMA_VERSION
    run: RunKind
    step: int
    optimizer: OptimizerState
    scheduler: dict[str, Any]
    loader: LoaderState
    rng: list[RankRng] = field(metadata=doc("per rank, in rank order"))
    tensors_sha256: str = field(metadata=doc("sha256 of state.safetensors"))
    code_version: str
    saved: str
    peak_memory: PeakMemory | None = field(
        default=None, metadata=doc("the trainer's peak memory so far; absent in older runs", **OMIT)
    )


@dataclass(frozen=True, kw_only=True)
class InstructionsRecord:
    """RUN/instructions.json: the identity of the embeddings in instructions.safetensors."""

    model: str
    weights: str
    random_init: bool
    texts_sha256: str
    texts: dict[str, str]
    dim: int
    embeddings_sha256: str

    @property
    def identity(self) -> InstructionIdentity:
        return InstructionIdentity(
            **{f.name: getattr(self, f.name) for f in dataclasses.fields(InstructionIdentity)}
        )


DOCUMENTS = (Stage1Run, Stage2Run, TigerRun, ModelRecord, TrainState, InstructionsRecord)

RUN_SCHEMA = SchemaFamily(
    package="sak.student",
    file=SCHEMA_FILE,
    schema_id=SCHEMA_ID,
    title=f"SAK run folder v{RUN_SCHEMA_VERSION}",
    description=(
        "config.json of a stage-1, stage-2 or TIGER run, checkpoint/model.json, checkpoint/state.json and "
        "instructions.json (by their 'kind'; instructions.json is a #/$defs/InstructionsRecord). Generated "
        "from sak.student.run.record."
    ),
    documents=DOCUMENTS,
    roots=(Stage1Run, Stage2Run, TigerRun, ModelRecord, TrainState),
    damaged_hint=f"the file is damaged or not a v{RUN_SCHEMA_VERSION} run file",
)


def generate_schema() -> dict:
    return RUN_SCHEMA.generate()


# ------------------------------------------------------------------------------------------- reading

CONFIG_FIELD = {Stage1Run: Stage1Config, Stage2Run: Stage2Config, TigerRun: TigerConfig}


def _with_config_defaults(data: dict, cls: type) -> dict:
    """A v1 record written before an option existed: that option takes its default (unknown ones are
    left for the schema to refuse: written by a newer version)."""
    config_cls = CONFIG_FIELD.get(cls)
    if config_cls is None or not isinstance(data.get("config"), dict):
        return data
    defaults = {
        f.name: to_json(f.default if f.default is not dataclasses.MISSING else f.default_factory())
        for f in dataclasses.fields(config_cls)
        if f.default is not dataclasses.MISSING or f.default_factory is not dataclasses.MISSING
    }
    return {
        **data,
        "config": {**{k: v for k, v in defaults.items() if k not in data["config"]}, **data["config"]},
    }


def load_document(cls: type, data: Any, path: str | Path) -> Any:
    """Validate a v1 document and build its record (legacy.py hands its upgrades in here too)."""
    if not isinstance(data, dict):
        raise SakError(f"{path}: expected a JSON object, found {type(data).__name__}; the file is damaged")
    version = data.get("schema_version")
    if version != RUN_SCHEMA_VERSION:
        raise SakError(
            f"{path}: field 'schema_version' is {version!r}, this code reads run version {RUN_SCHEMA_VERSION}; "
            f"use a sak release that matches the run"
        )
    return RUN_SCHEMA.load(cls, _with_config_defaults(data, cls), path)


def read_document(path: Path, cls: type) -> Any:
    """One file as its record; a run file written before run-v1 (no `schema_version`) is upgraded first."""
    data = read_json(path)
    if cls is InstructionsRecord:  # no kind, no version: its shape is the same since it was written first
        return RUN_SCHEMA.load(cls, data, path)
    if isinstance(data, dict) and "schema_version" not in data:
        data = legacy.upgrade(data, path)
    expected = cls.__dataclass_fields__["kind"].default
    if isinstance(data, dict) and data.get("kind") != expected:
        raise SakError(
            f"{path}: field 'kind' is {data.get('kind')!r}, expected {expected!r}; not a SAK run file"
        )
    return load_document(cls, data, path)


def read_run_record(path: Path) -> RunRecord:
    """RUN/config.json as its record, whichever trainer wrote it (by `kind`)."""
    data = read_json(path)
    kind = data.get("kind") if isinstance(data, dict) else None
    if kind not in RUN_KINDS:
        raise SakError(
            f"{path}: field 'kind' is {kind!r}, not one of {', '.join(RUN_KINDS)}; not a SAK run's config.json"
        )
    return read_document(path, RUN_KINDS[kind])


def write_document(path: Path, record: Any) -> None:
    data = to_json(record)
    RUN_SCHEMA.validate(data, type(record), path)  # never write what this code could not read back
    write_json_atomic(path, data)
