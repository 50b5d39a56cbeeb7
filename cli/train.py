"""`sak-train`: stage-1 distillation of the SAK student from a teacher-feature cache, and Rep Sim reports."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import click
from click.core import ParameterSource

from sak.cli.common import entry_point, parse_img_size, run_cli, setup_logging
from sak.pipeline.errors import SakError


def _split(text: str | None) -> tuple[str, ...]:
    return tuple(t.strip() for t in text.split(",") if t.strip()) if text else ()


def _parse_pairs(text: str | None, option: str) -> tuple[tuple[str, str], ...]:
    pairs = []
    for item in _split(text):
        left, sep, right = item.partition("=")
        if not sep or not left.strip() or not right.strip():
            raise SakError(
                f"{option} {item!r} must look like PAPER=OURS, e.g. dinov2=dinov2_b,clip=clip_b,sam=sam_b"
            )
        pairs.append((left.strip(), right.strip()))
    return tuple(pairs)


# CLI option -> Stage1Config field (options not listed here are handled by hand)
_FIELDS = {
    "cache": "cache",
    "out": "out",
    "student": "student",
    "steps": "steps",
    "epochs": "epochs",
    "batch_size": "batch_size",
    "lr": "lr",
    "weight_decay": "weight_decay",
    "min_lr": "min_lr",
    "warmup_steps": "warmup_steps",
    "warmup_epochs": "warmup_epochs",
    "grad_clip": "grad_clip",
    "seed": "seed",
    "online": "online",
    "normalization": "normalization",
    "img_size": "img_size",
    "pretrained": "pretrained",
    "init_paper": "init_paper",
    "num_workers": "num_workers",
    "skip_bad_shards": "skip_bad_shards",
    "shuffle_window": "shuffle_window",
    "holdout_shards": "holdout_shards",
    "eval_every": "eval_every",
    "eval_batch_size": "eval_batch_size",
    "report_repsim": "report_repsim",
    "save_every": "save_every",
    "log_every": "log_every",
    "stop_after": "stop_after",
    "device": "device",
    "use_kernels": "use_kernels",
    "grad_checkpointing": "grad_checkpointing",
    "local_cache": "local_cache",
    "local_cache_gb": "local_cache_gb",
}


def _config_from_options(ctx: click.Context, opts: dict):
    """Options -> Stage1Config. With --resume, the run's recorded config plus the options given."""
    from sak.student.train.checkpoint import RUN_CONFIG
    from sak.student.train.stage1_config import Stage1Config

    values = {field: opts[name] for name, field in _FIELDS.items()}
    values["teachers"] = _split(opts["teachers"])
    values["paper_teachers"] = _parse_pairs(opts["paper_teachers"], "--paper-teachers")
    values["tensorboard"] = not opts["no_tensorboard"]
    if not opts["resume"]:
        missing = [f"--{n}" for n in ("cache", "out") if not opts[n]]
        if missing:
            raise SakError(f"missing {' and '.join(missing)} (or --resume RUN to continue a run)")
        if opts["debug"]:
            given = {f: v for f, v in values.items() if _explicit(ctx, f, opts)}
            return Stage1Config.debug(**given)
        return Stage1Config(**values)

    from sak.pipeline.provenance import read_json

    run = Path(opts["resume"])
    if opts["out"] and Path(opts["out"]).resolve() != run.resolve():
        raise SakError(f"--out {opts['out']} differs from --resume {run}; a run continues in its own folder")
    recorded = Stage1Config.from_dict(read_json(run / RUN_CONFIG)["stage1"])
    given = {f: v for f, v in values.items() if _explicit(ctx, f, opts)}
    if "steps" in given:
        given["epochs"] = None
    if "epochs" in given:
        given["steps"] = None
    return Stage1Config.from_dict({**recorded.to_dict(), **given, "out": str(run)})


def _explicit(ctx: click.Context, field: str, opts: dict) -> bool:
    names = {"teachers": "teachers", "paper_teachers": "paper_teachers", "tensorboard": "no_tensorboard"}
    name = names.get(field) or next(n for n, f in _FIELDS.items() if f == field)
    return ctx.get_parameter_source(name) not in (ParameterSource.DEFAULT, ParameterSource.DEFAULT_MAP, None)


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
@click.option("--cache", help="The cache folder or s3:// / gs:// URL (from `sak-cache run`).")
@click.option("--local-cache", help="Local read-through folder for a cache at a URL (bounded, LRU).")
@click.option("--local-cache-gb", default=50.0, show_default=True, type=float, help="Bound of --local-cache.")
@click.option(
    "--teachers",
    help="Comma list of teacher names or store fingerprints, in adapter-path order [default: every store].",
)
@click.option("--student", default="vit_b", show_default=True, help="vit_s, vit_b, vit_l, or tiny (tests).")
@click.option("--steps", type=int, help="Training steps (one global batch each).")
@click.option(
    "--epochs", type=float, help="Training epochs (every training image once per epoch, view e mod K)."
)
@click.option("--batch-size", default=128, show_default=True, type=int, help="Global batch size (all ranks).")
@click.option("--out", help="Run folder: config.json, metrics.jsonl, tb/, checkpoint/.")
@click.option("--online", is_flag=True, help="Targets from live teachers rebuilt from the store manifests.")
@click.option("--resume", metavar="RUN", help="Continue the run in RUN from its checkpoint (same options).")
@click.option("--seed", default=0, show_default=True, type=int, help="Model init and data order.")
@click.option("--lr", default=1e-3, show_default=True, type=float, help="Peak AdamW learning rate.")
@click.option("--weight-decay", default=0.01, show_default=True, type=float)
@click.option("--min-lr", default=0.0, show_default=True, type=float, help="Floor of the cosine schedule.")
@click.option("--warmup-steps", type=int, help="Linear warm-up in steps (overrides --warmup-epochs).")
@click.option(
    "--warmup-epochs",
    default=2.0,
    show_default=True,
    type=float,
    help="Linear warm-up in epochs; with --steps capped at 10% of the steps.",
)
@click.option("--grad-clip", type=float, help="Clip the global gradient norm to this value.")
@click.option("--num-workers", default=4, show_default=True, type=int, help="Loader workers per process.")
@click.option(
    "--skip-bad-shards",
    is_flag=True,
    help="Leave out shards whose files fail their sha256 (counted and logged) instead of stopping.",
)
@click.option(
    "--eval-every", default=0, show_default=True, type=int, help="Rep Sim every N steps (0: at the end)."
)
@click.option("--eval-batch-size", default=32, show_default=True, type=int)
@click.option("--report-repsim", is_flag=True, help="Print Rep Sim per teacher before and after training.")
@click.option(
    "--holdout-shards", default=1, show_default=True, type=int, help="Last shards held out for Rep Sim."
)
@click.option("--shuffle-window", default=8, show_default=True, type=int, help="Shards shuffled together.")
@click.option(
    "--normalization",
    type=click.Choice(["student", "imagenet"]),
    default="student",
    show_default=True,
    help="Student input mean/std: its timm config, or ImageNet's (the paper's code).",
)
@click.option("--img-size", type=int, help="Student input side [default: the cache's view size].")
@click.option("--pretrained", is_flag=True, help="Start the stem from timm's pretrained weights.")
@click.option("--init-paper", metavar="CKPT", help="Start from the paper code's stage-1 checkpoint.")
@click.option(
    "--paper-teachers",
    metavar="MAP",
    help="Paper teacher -> ours, e.g. dinov2=dinov2_b,clip=clip_b,sam=sam_b [default: by family].",
)
@click.option(
    "--save-every", default=0, show_default=True, type=int, help="Checkpoint every N steps (0: at the end)."
)
@click.option("--log-every", default=10, show_default=True, type=int, help="Console line every N steps.")
@click.option("--stop-after", type=int, help="Stop with a checkpoint after this step (resume later).")
@click.option("--device", help="cpu or cuda [default: cuda when available].")
@click.option(
    "--kernels/--no-kernels",
    "use_kernels",
    default=None,
    help="Fused Triton adapter and loss kernels [default: on when training on CUDA].",
)
@click.option("--grad-checkpointing", is_flag=True, help="Recompute stem blocks in backward.")
@click.option("--no-tensorboard", is_flag=True, help="Do not write RUN/tb.")
@click.option("--debug", is_flag=True, help="The debug preset: tiny student, 20 steps of 8, no workers.")
@click.pass_context
def stage1(ctx: click.Context, **opts) -> None:
    """Stage 1: distil every selected teacher into the student, streaming targets from the cache."""
    from sak.student.train.stage1 import train_stage1

    cfg = _config_from_options(ctx, opts)
    result = train_stage1(cfg, resume=bool(opts["resume"]))
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
@click.option(
    "--checkpoint", required=True, help="A run folder (its latest checkpoint) or a student .safetensors."
)
@click.option("--cache", required=True, help="The cache whose held-out shards are measured.")
@click.option("--teachers", help="Store fingerprints or teacher names [default: the student's teachers].")
@click.option("--holdout-shards", type=int, help="Held-out shards [default: the run's, else 1].")
@click.option("--normalization", type=click.Choice(["student", "imagenet"]), help="[default: the run's].")
@click.option("--batch-size", default=32, show_default=True, type=int)
@click.option("--online", is_flag=True, help="Compare with live teachers instead of the cached targets.")
@click.option("--device", help="cpu or cuda [default: cuda when available].")
def repsim(**opts) -> None:
    """Rep Sim per teacher (mean per-token cosine to the targets) of a saved student, on held-out views."""
    from sak.student.train.evaluate import repsim_of_checkpoint

    sims, n = repsim_of_checkpoint(
        opts["checkpoint"],
        opts["cache"],
        teachers=_split(opts["teachers"]),
        holdout_shards=opts["holdout_shards"],
        normalization=opts["normalization"],
        batch_size=opts["batch_size"],
        online=opts["online"],
        device=opts["device"],
    )
    click.echo(f"Rep Sim on {n} held-out views of {opts['cache']}:")
    for t, v in sims.items():
        click.echo(f"  {t:<16} {v:.4f}")


@cli.command()
@click.option("--dataset", required=True, type=click.Choice(["pascal", "nyud", "folder"]))
@click.option("--data-root", required=True, help="PASCAL_MT / NYUD_MT (or their parent), or your folder.")
@click.option("--init", "init", required=True, metavar="RUN", help="The stage-1 run folder.")
@click.option("--online", is_flag=True, help="Distillation targets from live teachers (the stage-1 stores').")
@click.option("--cache", help="A stage-2 target cache (`sak-cache stage2`) instead of live teachers.")
@click.option("--tasks", help="Comma list of tasks [default: all of the dataset's].")
@click.option("--router", type=click.Choice(["mor", "sum"]), default="mor", show_default=True)
@click.option("--freeze-backbone", is_flag=True, help="Train routers and heads only.")
@click.option("--steps", default=40_000, show_default=True, type=int)
@click.option("--batch-size", default=4, show_default=True, type=int, help="Global batch size.")
@click.option("--lr", default=2e-5, show_default=True, type=float)
@click.option("--weight-decay", default=1e-6, show_default=True, type=float)
@click.option("--gamma", default=1.0, show_default=True, type=float, help="Weight of the distillation loss.")
@click.option("--grad-clip", default=10.0, show_default=True, type=float)
@click.option("--img-size", help="HxW input [default: 512x512 PASCAL, 448x576 NYUD].")
@click.option("--seed", default=0, show_default=True, type=int)
@click.option("--num-workers", default=2, show_default=True, type=int)
@click.option("--log-every", default=50, show_default=True, type=int)
@click.option("--device", help="cpu or cuda [default: cuda when available].")
@click.option("--out", required=True, help="Run folder: config.json, metrics.jsonl, checkpoint/.")
def stage2(**opts) -> None:
    """Stage 2: MoR routers and task heads on PASCAL-Context, NYUD-v2 or your own dense dataset."""
    from sak.student.train.stage2 import Stage2Config, train_stage2

    cfg = Stage2Config(
        dataset=opts["dataset"],
        data_root=opts["data_root"],
        init=opts["init"],
        out=opts["out"],
        tasks=_split(opts["tasks"]),
        online=opts["online"],
        cache=opts["cache"],
        router=opts["router"],
        freeze_backbone=opts["freeze_backbone"],
        steps=opts["steps"],
        batch_size=opts["batch_size"],
        lr=opts["lr"],
        weight_decay=opts["weight_decay"],
        gamma=opts["gamma"],
        grad_clip=opts["grad_clip"],
        img_size=parse_img_size(opts["img_size"]),
        seed=opts["seed"],
        num_workers=opts["num_workers"],
        log_every=opts["log_every"],
        device=opts["device"],
    )
    if cfg.online and cfg.cache:
        raise SakError("give one of --online and --cache, not both")
    result = train_stage2(cfg)
    click.echo(f"trained {result.steps} steps; checkpoint {result.run / 'checkpoint'}")


@cli.command(name="eval")
@click.option("--checkpoint", required=True, metavar="RUN", help="A stage-2 run folder.")
@click.option("--dataset", required=True, type=click.Choice(["pascal", "nyud", "folder"]))
@click.option("--data-root", required=True)
@click.option("--split", default="val", show_default=True)
@click.option("--out", help="Where eval.json and the pictures go [default: the run folder].")
@click.option("--batch-size", default=4, show_default=True, type=int)
@click.option("--device", help="cpu or cuda [default: cuda when available].")
def eval_cmd(**opts) -> None:
    """Stage-2 metrics (mIoU, maxF, mErr, odsF, RMSE, delta_m), router gates and prediction pictures."""
    from sak.student.train.stage2 import evaluate, format_table

    report = evaluate(
        opts["checkpoint"],
        opts["dataset"],
        opts["data_root"],
        opts["split"],
        out=opts["out"],
        batch_size=opts["batch_size"],
        device=opts["device"],
    )
    click.echo(f"{opts['dataset']} {opts['split']}: {report['images']} images")
    click.echo(format_table(report))


def main(argv: Sequence[str] | None = None) -> int:
    return run_cli(cli, argv, "sak-train")


entry = entry_point(main)

if __name__ == "__main__":
    entry()
