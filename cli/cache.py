"""`sak-cache`: extract teacher features once, into a verifiable cache that many experiments reuse."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import click

from sak.cli.common import entry_point, run_cli, setup_logging, version_option
from sak.cli.options import GeneratedCommand, OptionSet
from sak.pipeline.base.errors import SakError
from sak.pipeline.buckets.access import check_location
from sak.pipeline.buckets.bucket import is_url


def _extract_config():
    from sak.pipeline.extraction.config import ExtractConfig

    return ExtractConfig


def _estimate_config():
    from sak.pipeline.inspection.estimate import EstimateConfig

    return EstimateConfig


def _stage2_source_config():
    from sak.student.train.stage2_source import Stage2SourceConfig

    return Stage2SourceConfig


def _stage2_build_config():
    from sak.pipeline.extraction.config import Stage2BuildConfig

    return Stage2BuildConfig


@dataclass(frozen=True)
class EstimateCommand:
    """What `estimate` does with its result (not part of the estimate itself)."""

    json: str | None = field(default=None, metadata={"help": "Also write the estimate as JSON here."})


@click.group(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.option("-v", "--verbose", is_flag=True, help="More log output.")
@version_option("sak-cache")
def cli(verbose: bool) -> None:
    """Compute multi-level features of frozen vision foundation models (DINOv2, CLIP, SAM) once, on Ray,
    into a compressed Zarr cache with a manifest that makes it self-describing, verifiable and reusable.

    \b
    Typical use:
      sak-cache run --source /data/imagenet/train --out /caches/in1k --teachers dinov2_l,clip_l,sam_l
      sak-cache inspect /caches/in1k
      sak-cache verify /caches/in1k
    """
    setup_logging(verbose)


# the options of each command are generated from its config dataclass when first needed (cli/options.py)
RUN_OPTIONS = OptionSet(_extract_config)


@cli.command(cls=GeneratedCommand, options=RUN_OPTIONS)
def run(**opts) -> None:
    """Extract teacher features into a cache (resumable: re-running skips finished shards).

    Adding a teacher to an existing cache needs only --out and --teachers: the view plan and shard
    size are the cache's own (a different value given is refused)."""
    from sak.pipeline.extraction.config import ExtractConfig, with_recorded_defaults
    from sak.pipeline.extraction.driver import run_extraction
    from sak.pipeline.inspection.describe import describe_cache, describe_location, store_fidelity_warnings

    cfg = with_recorded_defaults(RUN_OPTIONS.build(ExtractConfig, opts), RUN_OPTIONS.given(opts))
    out = run_extraction(cfg)
    click.echo(describe_location(cfg.out) if is_url(cfg.out) else describe_cache(out))
    if not is_url(cfg.out):
        for line in store_fidelity_warnings(out, cfg.teachers, cfg.codec.name):
            click.echo(line, err=True)


JSON_HELP = "Print the result as one JSON document instead (its schema: docs/scripting.md)."


def _echo_json(report) -> None:
    import json

    from sak.pipeline.inspection.reports import report_json

    click.echo(json.dumps(report_json(report), indent=2))


@cli.command()
@click.argument("cache")
@click.option("--json", "as_json", is_flag=True, help=JSON_HELP)
def inspect(cache: str, as_json: bool) -> None:
    """Describe a cache (folder or s3:// / gs:// URL): teachers, fingerprints, views, shapes, bytes."""
    from sak.pipeline.inspection.describe import describe_location

    check_location(cache)
    if as_json:
        from sak.pipeline.inspection.reports import inspect_report

        return _echo_json(inspect_report(cache))
    click.echo(describe_location(cache))


@cli.command()
@click.argument("cache")
@click.option("--view", "views", type=int, multiple=True, required=True, help="View index (repeatable).")
@click.option(
    "--out",
    default=None,
    help="PNG to write, outside the cache (default: ./show-<cache name>-<views>.png).",
)
def show(cache: str, views: tuple[int, ...], out: str | None) -> None:
    """Draw the views beside a PCA-to-RGB map of every teacher's every stored level (one PCA per level)."""
    from sak.pipeline.extraction.runtime import heartbeat
    from sak.pipeline.inspection.show import render

    check_location(cache)
    name = Path(cache.rstrip("/")).name or "cache"
    out = out or f"show-{name}-{'-'.join(map(str, views))}.png"
    if not is_url(cache) and Path(cache).resolve() in Path(out).resolve().parents:
        raise SakError(f"--out {out} is inside the cache (its verify would then fail); write it elsewhere")
    with heartbeat(f"show: still drawing {len(views)} view(s) of {cache}"):
        click.echo(render(cache, list(views), out))


@cli.command(name="ls")
@click.argument("root", default=".")
@click.option(
    "--verify",
    "full",
    is_flag=True,
    help="Read every byte of each cache (as `verify`), not only its records.",
)
@click.option("--json", "as_json", is_flag=True, help=JSON_HELP)
def ls_(root: str, full: bool, as_json: bool) -> None:
    """One line per cache found under ROOT (a folder or an s3:// / gs:// prefix): teachers, views, bytes,
    created, and whether it verifies."""
    from sak.pipeline.inspection.describe import bucket_caches, list_caches

    check_location(root)
    found = bucket_caches(root) if is_url(root) else None
    if as_json:
        from sak.pipeline.inspection.reports import ls_report

        return _echo_json(ls_report(root, found, full=full))
    lines = list_caches(root, found, full=full)
    click.echo("\n".join(lines) if lines else f"no cache under {root}")


@cli.command()
@click.argument("cache")
@click.option("--json", "as_json", is_flag=True, help=JSON_HELP)
def verify(cache: str, as_json: bool) -> int:
    """Recompute every checksum and count; exit 1 naming each failing file and shard. A URL cache is
    downloaded once into a temporary folder."""
    from sak.pipeline.inspection.verify import check_bucket_cache, check_cache

    check_location(cache)
    report = check_bucket_cache(cache) if is_url(cache) else check_cache(cache)
    problems = report.problems
    if as_json:
        from sak.pipeline.inspection.reports import verify_report

        _echo_json(verify_report(cache, report))
        return 1 if problems else 0
    for note in report.notes + report.in_progress:
        click.echo(f"note: {note}", err=True)
    for p in problems:
        click.echo(f"FAIL {p}")
    if problems:
        click.echo(f"{cache}: {len(problems)} problem(s)", err=True)
        return 1
    busy = f" ({len(report.in_progress)} store(s) in progress, not verified)" if report.in_progress else ""
    click.echo(f"{cache}: OK{busy}")
    return 0


ESTIMATE_OPTIONS = OptionSet(_estimate_config, EstimateCommand)


@cli.command(cls=GeneratedCommand, options=ESTIMATE_OPTIONS)
def estimate(**opts) -> None:
    """Bytes, GPU-hours and read bandwidth of a cache, before extracting it."""
    import json

    from sak.pipeline.inspection.estimate import EstimateConfig, estimate_to_dict, format_estimate
    from sak.pipeline.inspection.estimate import estimate as run_estimate

    est = run_estimate(ESTIMATE_OPTIONS.build(EstimateConfig, opts))
    click.echo(format_estimate(est))
    command = ESTIMATE_OPTIONS.build(EstimateCommand, opts)
    if command.json:
        with open(command.json, "w") as f:
            json.dump(estimate_to_dict(est), f, indent=2)


STAGE2_OPTIONS = OptionSet(_stage2_source_config, _stage2_build_config)


@cli.command(cls=GeneratedCommand, options=STAGE2_OPTIONS)
def stage2(**opts) -> None:
    """Teacher targets for stage 2: every (epoch, image) augmented view of the training split, replayed
    from the stage-2 plan (seed, crop), for `sak-train stage2 --cache`."""
    from sak.pipeline.extraction.config import Stage2BuildConfig
    from sak.pipeline.extraction.stage2 import build_stage2_cache, describe_build
    from sak.pipeline.format.documents import read_stage2_cache
    from sak.pipeline.format.layout import CACHE_FILE
    from sak.student.train.stage2_source import Stage2SourceConfig, stage2_source

    build = STAGE2_OPTIONS.build(Stage2BuildConfig, opts)  # a bad --codec or --epochs fails first
    check_location(build.out, write=True)  # before the student and the dataset are loaded
    out = build_stage2_cache(build, stage2_source(STAGE2_OPTIONS.build(Stage2SourceConfig, opts)))
    click.echo(describe_build(read_stage2_cache(out / CACHE_FILE)))


def main(argv: Sequence[str] | None = None) -> int:
    return run_cli(cli, argv, "sak-cache")


entry = entry_point(main)

if __name__ == "__main__":
    entry()
