"""`sak-train`: stage-1 distillation of the SAK student from a teacher-feature cache, stage 2, TIGER, and
their reports.

Each trainer's options are generated from its config dataclass when first needed (cli/options.py), and
every import of torch or a model library waits for the command body, so `sak-train --help` and every
`sak-train CMD --help` load none. The three trainers share one grammar (student/run/resume.py):
`--resume RUN` (or `--resume --out RUN`), `--restart`, `--stop-after N`, `--img-size HxW` or one side.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import click

from sak.cli.common import entry_point, run_cli, setup_logging, version_option
from sak.cli.options import GeneratedCommand, OptionSet
from sak.pipeline.base.errors import SakError
from sak.pipeline.buckets.access import check_location
from sak.student.data.dense_sets import DATASETS
from sak.student.data.normalization import NORMALIZATIONS
from sak.student.run.resume import RunCommand, missing_required, resumed_config


def _is_main_process() -> bool:
    """Rank 0 of a torchrun launch (or a plain process): the one that prints."""
    return int(os.environ.get("RANK", "0")) == 0


def _echo(text: str) -> None:
    if _is_main_process():
        click.echo(text)


def _stage1_config():
    from sak.student.train.stage1_config import Stage1Config

    return Stage1Config


def _stage2_config():
    from sak.student.train.stage2_config import Stage2Config

    return Stage2Config


def _tiger_config():
    from sak.student.train.tiger_config import TigerConfig

    return TigerConfig


@dataclass(frozen=True)
class Stage1Command:
    """`stage1` options that are not part of the run's config."""

    debug: bool = field(
        default=False, metadata={"help": "The debug preset: tiny student, 20 steps of 8, no workers."}
    )


@dataclass(frozen=True)
class ConfigCommand:
    """`--config FILE` of every trainer (student/run/config_file.py)."""

    config: str | None = field(
        default=None,
        metadata={
            "help": "Options from a file: a run's RUN/config.json, or JSON / YAML of the same shape; "
            "options given on the command line win.",
            "metavar": "FILE",
            "group": "run",
        },
    )


@dataclass(frozen=True)
class RepsimCommand:
    """`repsim`: Rep Sim of a saved student on held-out views (arguments of `open_held_out`), with pictures."""

    checkpoint: str = field(
        metadata={"help": "A run folder (its latest checkpoint) or a student .safetensors."}
    )
    cache: str = field(metadata={"help": "The cache whose held-out shards are measured."})
    teachers: tuple[str, ...] = field(
        default=(),
        metadata={"help": "Store fingerprints or teacher names [default: the student's teachers]."},
    )
    holdout_shards: int | None = field(
        default=None, metadata={"help": "Held-out shards [default: the run's, else 1]."}
    )
    normalization: str | None = field(
        default=None,
        metadata={"help": "Student input mean/std [default: the run's].", "choices": NORMALIZATIONS},
    )
    batch_size: int = field(default=32, metadata={"help": "Views per forward."})
    online: bool = field(
        default=False, metadata={"help": "Compare with live teachers instead of the cached targets."}
    )
    device: str | None = field(default=None, metadata={"help": "cpu or cuda [default: cuda when available]."})
    pictures: str | None = field(
        default=None,
        metadata={
            "help": "Also draw the student's aligned maps beside the teachers' into this PNG.",
            "metavar": "PNG",
        },
    )
    picture_views: int = field(default=3, metadata={"help": "Held-out views drawn with --pictures."})


@dataclass(frozen=True)
class EvalCommand:
    """`eval`: stage-2 metrics of a stage-2 or TIGER run (arguments of `run_eval.evaluate_run`)."""

    checkpoint: str = field(metadata={"help": "A stage-2 or TIGER run folder.", "metavar": "RUN"})
    dataset: str = field(
        metadata={"help": "Dense dataset: PASCAL-Context, NYUD-v2, or your own folder.", "choices": DATASETS}
    )
    data_root: str = field(metadata={"help": "PASCAL_MT / NYUD_MT (or their parent), or your folder."})
    split: str = field(default="val", metadata={"help": "The split measured."})
    out: str | None = field(
        default=None, metadata={"help": "Where eval.json and the pictures go [default: the run folder]."}
    )
    batch_size: int = field(default=4, metadata={"help": "Images per forward."})
    baselines: str | None = field(
        default=None,
        metadata={
            "help": "JSON {task: single-task metric}: delta_m against these on any dataset.",
            "metavar": "FILE.json",
        },
    )
    device: str | None = field(default=None, metadata={"help": "cpu or cuda [default: cuda when available]."})
    save_predictions: bool = field(
        default=False,
        metadata={"help": "Also write OUT/predictions/ as the reference code does (SEISM reads edge/)."},
    )


# a --resume RUN gives every option of the run's config: none of the config's own options is required
_OPTIONAL = {"cache": False, "out": False}
_DENSE_OPTIONAL = {"dataset": False, "data_root": False, "out": False}
STAGE1_OPTIONS = OptionSet(_stage1_config, RunCommand, ConfigCommand, Stage1Command, required=_OPTIONAL)
STAGE2_OPTIONS = OptionSet(
    _stage2_config, RunCommand, ConfigCommand, required={**_DENSE_OPTIONAL, "init": False}
)
TIGER_OPTIONS = OptionSet(_tiger_config, RunCommand, ConfigCommand, required=_DENSE_OPTIONAL)
REPSIM_OPTIONS = OptionSet(RepsimCommand)
EVAL_OPTIONS = OptionSet(EvalCommand)


def trainer_config(cls: type, options: OptionSet, opts: dict, preset=None) -> tuple[Any, RunCommand]:
    """The config a trainer command runs with, and its invocation options. A new run: the options given
    (over `preset`, e.g. stage 1's --debug); with --resume RUN: the run's recorded config with the
    options given, by the resume rules (student/run/resume.py)."""
    command = options.build(RunCommand, opts)
    names = {f.name for f in dataclasses.fields(cls)}
    given = {k: v for k, v in options.given(opts).items() if k in names}
    given = _with_config_file(cls, options.build(ConfigCommand, opts).config, command, given)
    run = command.run_folder(given.get("out"))
    if run is None:
        missing = missing_required(cls, given)
        if missing:
            raise SakError(f"missing {' and '.join(missing)} (or --resume RUN to continue a run)")
        check_location(given.get("cache"))
        given = _stage2_cache_defaults(cls, given)
        return (preset(**given) if preset else cls(**given)), command
    from sak.student.run.folder import RunFolder

    recorded = RunFolder(run).read_record()
    if not isinstance(recorded.config, cls):
        kind = {"Stage1Config": "stage1", "Stage2Config": "stage2", "TigerConfig": "tiger"}.get(
            type(recorded.config).__name__, "another"
        )
        raise SakError(f"--resume {run} is a {kind} run; continue it with `sak-train {kind} --resume {run}`")
    cfg = resumed_config(recorded.config, given, run)
    check_location(getattr(cfg, "cache", None))
    return cfg, command


def _stage2_cache_defaults(cls: type, given: dict) -> dict:
    """A new stage-2 or TIGER run from a stage-2 cache (--cache) takes the crop, seed and augmentation the
    cache was built with, unless given (a different value given is refused by the reader, naming both)."""
    names = {f.name for f in dataclasses.fields(cls)}
    if not given.get("cache") or "img_size" not in names:
        return given
    from sak.student.data.stage2_cache import recorded_identity

    built = recorded_identity(given["cache"])
    if built is None:
        return given
    recorded = {
        "img_size": tuple(built.crop),
        "seed": built.seed,
        "scale_range": tuple(built.scale_range),
        "photometric": built.photometric,
    }
    return {**{k: v for k, v in recorded.items() if k in names}, **given}


def _with_config_file(cls: type, path: str | None, command: RunCommand, given: dict) -> dict:
    """--config FILE: its options under the ones given on the command line (a new run only)."""
    if not path:
        return given
    if command.resume is not None:
        raise SakError(
            f"--config {path} starts a new run; --resume continues with the run's own config (leave out --config)"
        )
    from sak.student.run.config_file import config_file_values

    return {**config_file_values(cls, path), **given}


def _request(command: RunCommand):
    """How the trainer treats the folder (a RunRequest); --resume RUN --restart restarts with the
    recorded options."""
    from sak.student.run.harness import RunRequest

    resume = command.resume is not None and not command.restart
    return RunRequest(resume=resume, restart=command.restart, stop_after=command.stop_after)


def _peak_memory() -> str:
    """`peak host memory 1.20 GB` (this process, ru_maxrss), `, GPU 3.40 GB` when it used CUDA."""
    from sak.pipeline.base.units import human_bytes
    from sak.student.run.checkpoint import measured_peak_memory

    peak = measured_peak_memory()  # as each checkpoint records it (state.json `peak_memory`)
    text = f"peak host memory {human_bytes(peak.host_bytes)}"
    return text + (f", GPU {human_bytes(peak.gpu_bytes)}" if peak.gpu_bytes is not None else "")


def _finish(result, what: str) -> None:
    if result.stopped:
        _echo(
            f"stopped at step {result.step}/{result.total_steps}; continue with --resume {result.run}; "
            f"{_peak_memory()}"
        )
    else:
        _echo(f"{what} {result.step} steps; checkpoint {result.checkpoint}; {_peak_memory()}")


@click.group(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.option("-v", "--verbose", is_flag=True, help="More log output.")
@version_option("sak-train")
def cli(verbose: bool) -> None:
    """Train the SAK student (Teacher-Agnostic Stem + Teacher-Specific Adapter Paths) from a cache.

    \b
    Typical use:
      sak-train stage1 --cache /caches/in1k --student vit_b --epochs 30 --batch-size 128 --out runs/s1
      torchrun --nproc_per_node=8 -m sak.cli.train stage1 ...           # DDP, one process per GPU
      sak-train stage1 --resume runs/s1                                 # continue after a stop
      sak-train repsim --checkpoint runs/s1 --cache /caches/in1k
    Every trainer (stage1, stage2, tiger) continues with --resume RUN, restarts a run that has no
    checkpoint yet with --restart, and stops early with --stop-after N.
    """
    setup_logging(verbose, quiet=not _is_main_process())


@cli.command(cls=GeneratedCommand, options=STAGE1_OPTIONS)
def stage1(**opts) -> None:
    """Stage 1: distil every selected teacher into the student, streaming targets from the cache."""
    from sak.student.train.stage1 import train_stage1

    cfg_cls = _stage1_config()
    debug = STAGE1_OPTIONS.build(Stage1Command, opts).debug
    cfg, command = trainer_config(cfg_cls, STAGE1_OPTIONS, opts, cfg_cls.debug if debug else None)
    result = train_stage1(cfg, _request(command))
    _finish(result, "trained")
    if cfg.report_repsim and result.repsim_after is not None:
        before = result.repsim_before or {}
        _echo(f"Rep Sim on {result.eval_views} held-out views (mean per-token cosine):")
        _echo(f"  {'teacher':<16} {'before':>8} {'after':>8}")
        for t, after in result.repsim_after.items():
            b = f"{before[t]:.4f}" if t in before else "-"
            _echo(f"  {t:<16} {b:>8} {after:>8.4f}")


@cli.command(cls=GeneratedCommand, options=REPSIM_OPTIONS)
def repsim(**opts) -> None:
    """Rep Sim per teacher (mean per-token cosine to the targets) of a saved student, on held-out views."""
    from sak.student.data.loader import eval_batches
    from sak.student.train.evaluate import evaluate_repsim, open_held_out, repsim_pictures

    command = REPSIM_OPTIONS.build(RepsimCommand, opts)
    check_location(command.cache)
    held = open_held_out(
        command.checkpoint,
        command.cache,
        teachers=command.teachers,
        holdout_shards=command.holdout_shards,
        normalization=command.normalization,
        online=command.online,
        device=command.device,
    )
    batches = eval_batches(held.reader, held.rows, command.batch_size)
    sims, n = evaluate_repsim(held.model, batches, held.targets_of, held.index.stores, held.device)
    click.echo(f"Rep Sim on {n} held-out views of {command.cache}:")
    for t, v in sims.items():
        click.echo(f"  {t:<16} {v:.4f}")
    if command.pictures:
        click.echo(
            f"pictures: {repsim_pictures(held, command.cache, command.pictures, command.picture_views)}"
        )


@cli.command(cls=GeneratedCommand, options=STAGE2_OPTIONS)
def stage2(**opts) -> None:
    """Stage 2: MoR routers and task heads on PASCAL-Context, NYUD-v2 or your own dense dataset."""
    from sak.student.train.stage2 import train_stage2

    cfg, command = trainer_config(_stage2_config(), STAGE2_OPTIONS, opts)
    result = train_stage2(cfg, _request(command))
    _finish(result, "trained")


@cli.command(name="eval", cls=GeneratedCommand, options=EVAL_OPTIONS)
def eval_cmd(**opts) -> None:
    """Stage-2 metrics (mIoU, maxF, mErr, odsF, RMSE, delta_m), router gates and prediction pictures."""
    from sak.student.train.dense_eval import format_table
    from sak.student.train.run_eval import evaluate_run

    command = EVAL_OPTIONS.build(EvalCommand, opts)
    report = evaluate_run(
        command.checkpoint,
        command.dataset,
        command.data_root,
        command.split,
        out=command.out,
        batch_size=command.batch_size,
        device=command.device,
        baselines=_read_baselines(command.baselines),
        save_predictions=command.save_predictions,
    )
    click.echo(f"{command.dataset} {command.split}: {report['images']} images")
    if "predictions" in report:
        click.echo(f"predictions in {report['predictions']}")
    click.echo(format_table(report))


def _read_baselines(path: str | None) -> dict[str, float] | None:
    if not path:
        return None
    import json

    try:
        data = json.loads(Path(path).expanduser().read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise SakError(f"--baselines {path}: cannot read it as JSON ({type(e).__name__})") from None
    if not isinstance(data, dict) or not all(isinstance(v, (int, float)) for v in data.values()):
        raise SakError(
            f'--baselines {path}: expected {{"task": single-task metric, ...}}, e.g. {{"semseg": 0.5}}'
        )
    return {str(k): float(v) for k, v in data.items()}


@cli.command(cls=GeneratedCommand, options=TIGER_OPTIONS)
def tiger(**opts) -> None:
    """TIGER: instruction-guided token routing over frozen teachers, trained from a stage-2 cache."""
    from sak.student.train.tiger import train_tiger

    cfg, command = trainer_config(_tiger_config(), TIGER_OPTIONS, opts)
    result = train_tiger(cfg, _request(command))
    _finish(result, "TIGER trained")


def main(argv: Sequence[str] | None = None) -> int:
    return run_cli(cli, argv, "sak-train", quiet=not _is_main_process())


entry = entry_point(main)

if __name__ == "__main__":
    entry()
