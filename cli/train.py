"""`sak-train`: stage-1 distillation of the SAK student from a teacher-feature cache, and Rep Sim reports."""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import click

from sak.cli.common import entry_point, run_cli, setup_logging
from sak.cli.options import OptionSet
from sak.pipeline.errors import SakError
from sak.student.data.dense import DATASETS
from sak.student.data.loader import NORMALIZATIONS
from sak.student.train.stage1_config import Stage1Config
from sak.student.train.stage2 import Stage2Config
from sak.student.train.tiger import TigerConfig


@dataclass(frozen=True)
class Stage1Command:
    """`stage1` options that are not part of the run's config."""

    resume: str | None = field(
        default=None,
        metadata={"help": "Continue the run in RUN from its checkpoint (same options).", "metavar": "RUN"},
    )
    debug: bool = field(
        default=False, metadata={"help": "The debug preset: tiny student, 20 steps of 8, no workers."}
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
    """`eval`: stage-2 metrics of a run (arguments of `stage2.evaluate`)."""

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


STAGE1_OPTIONS = OptionSet(Stage1Config, Stage1Command)
STAGE2_OPTIONS = OptionSet(Stage2Config)
REPSIM_OPTIONS = OptionSet(RepsimCommand)
EVAL_OPTIONS = OptionSet(EvalCommand)
TIGER_OPTIONS = OptionSet(TigerConfig)


def _config_from_options(opts: dict) -> Stage1Config:
    """Options -> Stage1Config. With --resume, the run's recorded config plus the options given."""
    from sak.student.train.checkpoint import RUN_CONFIG

    command = STAGE1_OPTIONS.build(Stage1Command, opts)
    given = {k: v for k, v in STAGE1_OPTIONS.given(opts).items() if k in Stage1Config.__dataclass_fields__}
    if not command.resume:
        missing = [f"--{n}" for n in ("cache", "out") if n not in given]
        if missing:
            raise SakError(f"missing {' and '.join(missing)} (or --resume RUN to continue a run)")
        return Stage1Config.debug(**given) if command.debug else Stage1Config(**given)

    from sak.pipeline.provenance import read_json

    run = Path(command.resume)
    if "out" in given and Path(given["out"]).resolve() != run.resolve():
        raise SakError(f"--out {given['out']} differs from --resume {run}; a run continues in its own folder")
    recorded = Stage1Config.from_dict(read_json(run / RUN_CONFIG)["stage1"])
    if "steps" in given:
        given["epochs"] = None
    if "epochs" in given:
        given["steps"] = None
    return dataclasses.replace(recorded, **given, out=str(run))


@click.group(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.option("-v", "--verbose", is_flag=True, help="More log output.")
def cli(verbose: bool) -> None:
    """Train the SAK student (Teacher-Agnostic Stem + Teacher-Specific Adapter Paths) from a cache.

    \b
    Typical use:
      sak-train stage1 --cache /caches/in1k --student vit_b --epochs 30 --batch-size 128 --out runs/s1
      torchrun --nproc_per_node=8 -m sak.cli.train stage1 ...           # DDP, one process per GPU
      sak-train stage1 --resume runs/s1                                 # continue after a stop
      sak-train repsim --checkpoint runs/s1 --cache /caches/in1k
    """
    setup_logging(verbose)


@cli.command()
@STAGE1_OPTIONS
def stage1(**opts) -> None:
    """Stage 1: distil every selected teacher into the student, streaming targets from the cache."""
    from sak.student.train.stage1 import train_stage1

    cfg = _config_from_options(opts)
    result = train_stage1(cfg, resume=bool(STAGE1_OPTIONS.build(Stage1Command, opts).resume))
    if result.step < result.total_steps:
        click.echo(f"stopped at step {result.step}/{result.total_steps}; continue with --resume {result.run}")
        return
    click.echo(f"trained {result.step} steps; checkpoint {result.checkpoint}")
    if cfg.report_repsim and result.repsim_after is not None:
        before = result.repsim_before or {}
        click.echo(f"Rep Sim on {result.eval_views} held-out views (mean per-token cosine):")
        click.echo(f"  {'teacher':<16} {'before':>8} {'after':>8}")
        for t, after in result.repsim_after.items():
            b = f"{before[t]:.4f}" if t in before else "-"
            click.echo(f"  {t:<16} {b:>8} {after:>8.4f}")


@cli.command()
@REPSIM_OPTIONS
def repsim(**opts) -> None:
    """Rep Sim per teacher (mean per-token cosine to the targets) of a saved student, on held-out views."""
    from sak.student.data.loader import eval_batches
    from sak.student.train.evaluate import evaluate_repsim, open_held_out, repsim_pictures

    command = REPSIM_OPTIONS.build(RepsimCommand, opts)
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


@cli.command()
@STAGE2_OPTIONS
def stage2(**opts) -> None:
    """Stage 2: MoR routers and task heads on PASCAL-Context, NYUD-v2 or your own dense dataset."""
    from sak.student.train.stage2 import train_stage2

    cfg = STAGE2_OPTIONS.build(Stage2Config, opts)
    if cfg.online and cfg.cache:
        raise SakError("give one of --online and --cache, not both")
    result = train_stage2(cfg)
    click.echo(f"trained {result.steps} steps; checkpoint {result.run / 'checkpoint'}")


@cli.command(name="eval")
@EVAL_OPTIONS
def eval_cmd(**opts) -> None:
    """Stage-2 metrics (mIoU, maxF, mErr, odsF, RMSE, delta_m), router gates and prediction pictures."""
    from sak.student.train.stage2 import evaluate, format_table
    from sak.student.train.tiger_eval import evaluate_tiger, is_tiger_run

    command = EVAL_OPTIONS.build(EvalCommand, opts)
    run = evaluate_tiger if is_tiger_run(command.checkpoint) else evaluate
    report = run(
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


@cli.command()
@TIGER_OPTIONS
def tiger(**opts) -> None:
    """TIGER: instruction-guided token routing over frozen teachers, trained from a stage-2 cache."""
    from sak.student.train.tiger import train_tiger

    result = train_tiger(TIGER_OPTIONS.build(TigerConfig, opts))
    click.echo(f"TIGER run {result.run}: {result.steps} steps, last loss {result.losses[-1]:.4f}")


def main(argv: Sequence[str] | None = None) -> int:
    return run_cli(cli, argv, "sak-train")


entry = entry_point(main)

if __name__ == "__main__":
    entry()
