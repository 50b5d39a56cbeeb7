"""The run record: every JSON file of a run folder is a typed record, validated against the shipped
run-v1 JSON Schema (generated from the records); runs from before the record are upgraded into it."""

from __future__ import annotations

import dataclasses
import json

import jsonschema
import pytest

from sak.cli.train import main
from sak.pipeline.base.errors import SakError
from sak.student import schema_gen
from sak.student.run.checkpoint import read_checkpoint, read_model_record
from sak.student.run.folder import RunFolder
from sak.student.run.record import (
    RUN_SCHEMA,
    InstructionsRecord,
    ModelRecord,
    Stage1Run,
    Stage2Run,
    TigerRun,
    read_document,
    read_run_record,
    write_document,
)
from sak.student.train.stage1_config import Stage1Config
from tests.runs import V1_RUNS, copy_inputs, stage1_args


def test_the_shipped_schema_is_what_the_records_generate(capsys):
    assert schema_gen.main(["--check"]) == 0, capsys.readouterr().err
    shipped = json.loads(RUN_SCHEMA.shipped_path().read_text())
    assert shipped == RUN_SCHEMA.generate()
    assert {"Stage1Run", "Stage2Run", "TigerRun", "ModelRecord", "TrainState", "InstructionsRecord"} <= set(
        shipped["$defs"]
    )
    jsonschema.Draft202012Validator.check_schema(shipped)


@pytest.fixture(scope="module")
def new_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("record")
    cache, _ = copy_inputs(root)
    assert main(stage1_args(cache, root / "run")) == 0
    return root / "run"


def test_every_file_of_a_new_run_validates_with_a_stock_validator(new_run):
    """Other tools can read a run folder with any JSON Schema validator and the published file."""
    schema = json.loads(RUN_SCHEMA.shipped_path().read_text())
    for path in (
        new_run / "config.json",
        new_run / "checkpoint/model.json",
        new_run / "checkpoint/state.json",
    ):
        jsonschema.validate(json.loads(path.read_text()), schema)
    record = read_run_record(new_run / "config.json")
    assert isinstance(record, Stage1Run) and isinstance(record.config, Stage1Config)
    assert record.config.steps == 4 and record.student.type == "sak" and record.resolved.streams_per_rank == 1
    model = read_model_record(new_run / "checkpoint")
    assert model.run == "stage1" and model.step == 4 and model.student == record.student


def test_a_record_reads_back_into_the_same_record(new_run, tmp_path):
    record = read_run_record(new_run / "config.json")
    write_document(tmp_path / "config.json", record)
    assert read_run_record(tmp_path / "config.json") == record
    assert json.loads((tmp_path / "config.json").read_text()) == json.loads(
        (new_run / "config.json").read_text()
    )


def test_runs_from_before_the_record_are_upgraded_into_it():
    """The fixture's files as the old trainers wrote them (each its own shapes, no schema_version)."""
    s1 = read_run_record(V1_RUNS / "stage1/config.json")
    assert isinstance(s1, Stage1Run) and s1.config.student == "micro" and s1.config.checkpoint_every == 0
    assert not hasattr(s1.config, "stop_after")  # an invocation's flag, dropped (it was 2)
    s2 = read_run_record(V1_RUNS / "stage2/config.json")
    assert (
        isinstance(s2, Stage2Run)
        and s2.config.img_size == (48, 64)
        and s2.teachers == ["dinov2_tiny", "clip_tiny"]
    )
    tiger = read_run_record(V1_RUNS / "tiger/config.json")
    assert isinstance(tiger, TigerRun) and tiger.teachers.source == "named"
    assert (
        tiger.teachers.teachers[0].weights.source == "random" and tiger.instructions.model == "ViT-S-32-alt"
    )
    m2 = read_document(V1_RUNS / "stage2/checkpoint/model.json", ModelRecord)
    assert m2.run == "stage2" and m2.multitask.router == "mor" and m2.multitask.img_size == (48, 64)
    assert read_model_record(V1_RUNS / "stage1/checkpoint").student.name == "micro"  # from student.json
    ins = read_document(V1_RUNS / "tiger/instructions.json", InstructionsRecord)
    assert ins.identity == tiger.instructions
    for kind in ("stage1", "stage2", "tiger"):  # and their checkpoints, in their old layouts
        ckpt = read_checkpoint(V1_RUNS / kind)
        assert ckpt.step == 2 and ckpt.loader.batches == 2 and ckpt.optimizer["state"]
        assert len(ckpt.rng) == (0 if kind == "tiger" else 1)  # TIGER never saved its RNG


def test_an_option_added_later_takes_its_default_and_an_unknown_one_is_refused(new_run, tmp_path):
    data = json.loads((new_run / "config.json").read_text())
    del data["config"]["grad_checkpointing"]  # a record written before this option existed
    (tmp_path / "config.json").write_text(json.dumps(data))
    assert read_run_record(tmp_path / "config.json").config.grad_checkpointing is False
    data["config"]["warp_drive"] = True  # written by a newer version
    (tmp_path / "config.json").write_text(json.dumps(data))
    with pytest.raises(
        SakError, match=r"config\.json: field 'config' has a field the format does not define"
    ):
        read_run_record(tmp_path / "config.json")


def test_a_damaged_record_is_refused_naming_file_and_field(new_run, tmp_path):
    data = json.loads((new_run / "config.json").read_text())
    data["resolved"]["world_size"] = "two"
    (tmp_path / "config.json").write_text(json.dumps(data))
    with pytest.raises(
        SakError, match=r"config\.json: field 'resolved\.world_size' should be int, found str"
    ):
        RunFolder(tmp_path).read_record()
    data["resolved"]["world_size"], data["schema_version"] = 1, 2
    (tmp_path / "config.json").write_text(json.dumps(data))
    with pytest.raises(SakError, match="this code reads run version 1"):
        read_run_record(tmp_path / "config.json")
    (tmp_path / "config.json").write_text(json.dumps({"kind": "sak-stage9-run"}))
    with pytest.raises(SakError, match="not a SAK run's config.json"):
        read_run_record(tmp_path / "config.json")


def test_nothing_is_written_that_could_not_be_read_back(new_run, tmp_path):
    record = read_run_record(new_run / "config.json")
    broken = dataclasses.replace(record, resolved=dataclasses.replace(record.resolved, world_size="two"))
    with pytest.raises(SakError, match="resolved.world_size"):
        write_document(tmp_path / "config.json", broken)
    assert not (tmp_path / "config.json").exists()


def test_each_checkpoint_records_the_trainers_peak_memory_and_the_final_line_says_it(tmp_path, capsys):
    """The trainer's peak host memory (and GPU, on CUDA) goes into RUN/checkpoint/state.json, validated by
    the run schema, and the final line prints the same figure."""
    import json

    from runs import copy_inputs, stage1_args

    from sak.cli.train import main as train_main
    from sak.pipeline.base.units import human_bytes

    cache, _ = copy_inputs(tmp_path / "in")
    assert train_main(stage1_args(cache, tmp_path / "run")) == 0
    state = json.loads((tmp_path / "run" / "checkpoint" / "state.json").read_text())
    peak = state["peak_memory"]
    assert peak["host_bytes"] > 100e6 and "gpu_bytes" not in peak  # CPU run: no GPU figure
    captured = capsys.readouterr()
    (last,) = [ln for ln in (captured.out + captured.err).splitlines() if "peak host memory" in ln]
    shown = last.split("peak host memory ")[1].split(",")[0]
    assert abs(float(shown.split()[0]) - float(human_bytes(peak["host_bytes"]).split()[0])) < 0.5
