"""`sak-train stage1|stage2|tiger --config FILE`: a run's RUN/config.json or a JSON / YAML file of the
same shape gives the options; the options given on the command line win."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from sak.cli.train import STAGE1_OPTIONS, STAGE2_OPTIONS, TIGER_OPTIONS, cli, main, trainer_config
from sak.student.run.record import read_run_record
from tests.runs import copy_inputs, stage1_args

RUNS = Path(__file__).parent / "fixtures" / "v1_runs"
TRAINERS = {"stage1": STAGE1_OPTIONS, "stage2": STAGE2_OPTIONS, "tiger": TIGER_OPTIONS}


def _config(trainer: str, argv: list[str]):
    """The config `sak-train TRAINER ARGV` would run with (parsed by the command, built by trainer_config)."""
    from sak.student.train.stage1_config import Stage1Config
    from sak.student.train.stage2_config import Stage2Config
    from sak.student.train.tiger_config import TigerConfig

    cls = {"stage1": Stage1Config, "stage2": Stage2Config, "tiger": TigerConfig}[trainer]
    ctx = cli.commands[trainer].make_context(trainer, argv)
    return trainer_config(cls, TRAINERS[trainer], ctx.params)[0]


@pytest.mark.parametrize("trainer", ["stage1", "stage2", "tiger"])
def test_a_runs_config_json_gives_the_options_and_flags_win(trainer, tmp_path):
    record = RUNS / trainer / "config.json"
    recorded = read_run_record(record).config
    cfg = _config(trainer, ["--config", str(record), "--out", str(tmp_path / "new"), "--lr", "0.125"])
    assert cfg.lr == 0.125 and recorded.lr != 0.125  # the flag wins
    assert cfg.out == str(tmp_path / "new")
    assert cfg.batch_size == recorded.batch_size and cfg.seed == recorded.seed  # the rest from the file


def test_a_yaml_file_of_the_same_shape(tmp_path):
    cache = tmp_path / "cache"
    shutil.copytree(Path(__file__).parent / "fixtures" / "v1_cache", cache)
    (tmp_path / "s1.yaml").write_text(f"config:\n  cache: {cache}\n  steps: 7\n  batch_size: 3\n  lr: 0.5\n")
    cfg = _config(
        "stage1", ["--config", str(tmp_path / "s1.yaml"), "--out", str(tmp_path / "r"), "--steps", "9"]
    )
    assert (cfg.cache, cfg.steps, cfg.batch_size, cfg.lr) == (str(cache), 9, 3, 0.5)
    (tmp_path / "flat.json").write_text(json.dumps({"cache": str(cache), "out": str(tmp_path / "r2")}))
    assert _config("stage1", ["--config", str(tmp_path / "flat.json")]).out == str(tmp_path / "r2")


@pytest.mark.parametrize(
    ("text", "name", "expect"),
    [
        ("config:\n  batch_size: many\n", "bad.yaml", "batch_size: 'many' is not of type 'integer'"),
        ('{"bach_size": 3}', "typo.json", "bach_size"),
        ("{not json", "broken.json", "not valid JSON"),
    ],
)
def test_a_bad_config_file_is_one_line(text, name, expect, tmp_path, capsys):
    (tmp_path / name).write_text(text)
    assert main(["stage1", "--config", str(tmp_path / name), "--out", str(tmp_path / "r")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("sak-train: error: --config") and expect in err and "\n" not in err


def test_a_stage2_record_is_refused_by_stage1(tmp_path, capsys):
    assert main(["stage1", "--config", str(RUNS / "stage2" / "config.json"), "--out", str(tmp_path)]) == 2
    assert "this trainer reads 'sak-stage1-run'" in capsys.readouterr().err


def test_config_with_resume_is_refused(tmp_path, capsys):
    argv = ["tiger", "--config", str(RUNS / "tiger" / "config.json"), "--resume", str(tmp_path)]
    assert main(argv) == 2
    assert "starts a new run; --resume continues with the run's own config" in capsys.readouterr().err


def test_the_final_line_states_the_peak_host_memory(tmp_path, capsys):
    cache, _ = copy_inputs(tmp_path)
    assert main(stage1_args(cache, tmp_path / "run")) == 0
    last = capsys.readouterr().out.strip().splitlines()[-1]
    assert last.startswith("trained 4 steps; checkpoint ") and "; peak host memory " in last
    amount, unit = last.split("; peak host memory ")[1].split(",")[0].split()
    assert unit in ("MB", "GB") and float(amount) > 0  # a torch process holds more than a few kB
