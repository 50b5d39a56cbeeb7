"""`sak-cache`: extract teacher features once, into a verifiable cache that many experiments reuse."""

from __future__ import annotations

from collections.abc import Sequence

import click

from sak.cli.common import entry_point, parse_img_size, run_cli, setup_logging
from sak.pipeline.errors import SakError
from sak.pipeline.storage import is_url


def _parse_weights(values: tuple[str, ...]) -> tuple[tuple[str, str], ...]:
    pairs = []
    for v in values:
        name, sep, path = v.partition("=")
        if not sep or not name or not path:
            raise SakError(
                f"--weights {v!r} must look like NAME=PATH, e.g. dinov2_l=/ckpt/dinov2_l.safetensors"
            )
        pairs.append((name.strip(), path.strip()))
    return tuple(pairs)


def target_options(command):
    """What is stored per view, shared by `run` and `estimate` so the two cannot drift apart."""
    options = [
        click.option(
            "--codec",
            default="fp16",
            show_default=True,
            help="Target codec: fp16, bf16, fp32, int8 (per 32 channels), fp8 (see pipeline/codecs.py).",
        ),
        click.option(
            "--format",
            "fmt",
            type=click.Choice(["zarr", "wds"]),
            default="zarr",
            show_default=True,
            help="Store format.",
        ),
        click.option(
            "--levels",
            default="all",
            show_default=True,
            help="Tap positions to keep (0-3, -1 = deepest) or all.",
        ),
        click.option(
            "--grid", default="native", show_default=True, help="Target grid: native, student or HxW."
        ),
    ]
    for option in reversed(options):
        command = option(command)
    return command


@click.group(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.option("-v", "--verbose", is_flag=True, help="More log output.")
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


@cli.command()
@click.option(
    "--source",
    help="Image folder (recursive; jpg/jpeg/png/webp), WebDataset .tar shards (a file, "
    "folder or brace pattern), or .parquet with an image-bytes column. Optional when --out already "
    "holds a cache (its stored images are reused).",
)
@click.option(
    "--out",
    required=True,
    help="Cache folder, or s3:// / gs:// URL (credentials from the standard environment). Created if "
    "missing; an existing cache gains a store per new teacher and resumes unfinished ones.",
)
@click.option(
    "--teachers",
    required=True,
    help="Comma list of teachers: dinov2_b, dinov2_l, clip_b, clip_l, "
    "sam_b, sam_l, or the tiny random-init dinov2_tiny, clip_tiny, sam_tiny.",
)
@click.option(
    "--views-per-image",
    default=2,
    show_default=True,
    type=int,
    help="K deterministic random-resized-crop+flip views per image; epoch e replays view e mod K.",
)
@click.option("--size", default=384, show_default=True, type=int, help="View side in pixels (SAM sees 1024).")
@click.option(
    "--shard-size", type=int, help="Views per shard file (a multiple of K) [default: 64 rounded up]."
)
@click.option("--batch-size", default=32, show_default=True, type=int, help="Views per teacher forward.")
@click.option("--limit", type=int, help="Use only the first N images (sorted by key).")
@click.option(
    "--address", help="Ray cluster address (e.g. ray://head:10001 or auto); default: embedded local Ray."
)
@click.option(
    "--weights",
    multiple=True,
    metavar="NAME=PATH",
    help="Local .safetensors/.pth weights for a teacher (repeatable); default: timm hub weights.",
)
@click.option(
    "--random-init",
    is_flag=True,
    help="Random weights for teachers without --weights. For tests: "
    "the cache is flagged as random-init everywhere.",
)
@click.option("--seed", default=0, show_default=True, type=int, help="Seed of the view plan and random init.")
@click.option(
    "--normalization",
    type=click.Choice(["teacher", "imagenet"]),
    default="teacher",
    show_default=True,
    help="teacher: each model's own mean/std; imagenet: ImageNet's for all (the paper's code).",
)
@target_options
@click.option("--workers", type=int, help="Teacher actors [default: one per GPU, or half the CPUs].")
@click.option(
    "--object-store-mb", default=1024, show_default=True, type=int, help="Embedded Ray object store size."
)
@click.option(
    "--min-image-side",
    default=32,
    show_default=True,
    type=int,
    help="Skip images whose shorter side is smaller (recorded in the manifest).",
)
@click.option(
    "--max-pixels",
    default=178_956_970,
    show_default=True,
    type=int,
    help="Skip images with more pixels (decompression-bomb guard).",
)
@click.option("--no-progress", is_flag=True, help="No progress bar or progress log lines.")
def run(**opts) -> None:
    """Extract teacher features into a cache (resumable: re-running skips finished shards)."""
    from sak.pipeline.extract import ExtractConfig, run_extraction
    from sak.pipeline.verify import describe_cache, describe_location

    cfg = ExtractConfig(
        source=opts["source"],
        out=opts["out"],
        teachers=tuple(t.strip() for t in opts["teachers"].split(",")),
        views_per_image=opts["views_per_image"],
        size=opts["size"],
        shard_size=opts["shard_size"],
        batch_size=opts["batch_size"],
        limit=opts["limit"],
        address=opts["address"],
        weights=_parse_weights(opts["weights"]),
        random_init=opts["random_init"],
        seed=opts["seed"],
        normalization=opts["normalization"],
        codec=opts["codec"],
        format=opts["fmt"],
        levels=opts["levels"],
        grid=opts["grid"],
        workers=opts["workers"],
        object_store_mb=opts["object_store_mb"],
        min_image_side=opts["min_image_side"],
        max_pixels=opts["max_pixels"],
        progress=not opts["no_progress"],
    )
    out = run_extraction(cfg)
    click.echo(describe_location(cfg.out) if is_url(cfg.out) else describe_cache(out))


@cli.command()
@click.argument("cache")
def inspect(cache: str) -> None:
    """Describe a cache (folder or s3:// / gs:// URL): teachers, fingerprints, views, shapes, bytes."""
    from sak.pipeline.verify import describe_location

    click.echo(describe_location(cache))


@cli.command(name="ls")
@click.argument("root", default=".")
@click.option(
    "--verify",
    "full",
    is_flag=True,
    help="Read every byte of each cache (as `verify`), not only its records.",
)
def ls_(root: str, full: bool) -> None:
    """One line per cache found under ROOT (a folder or an s3:// / gs:// prefix): teachers, views, bytes,
    created, and whether it verifies."""
    from sak.pipeline.verify import bucket_caches, list_caches

    lines = list_caches(root, bucket_caches(root) if is_url(root) else None, full=full)
    click.echo("\n".join(lines) if lines else f"no cache under {root}")


@cli.command()
@click.argument("cache")
def verify(cache: str) -> int:
    """Recompute every checksum and count; exit 1 naming each failing file and shard. A URL cache is
    downloaded once into a temporary folder."""
    from sak.pipeline.verify import check_bucket_cache, check_cache

    report = check_bucket_cache(cache) if is_url(cache) else check_cache(cache)
    problems = report.problems
    for note in report.notes:
        click.echo(f"note: {note}", err=True)
    for p in problems:
        click.echo(f"FAIL {p}")
    if problems:
        click.echo(f"{cache}: {len(problems)} problem(s)", err=True)
        return 1
    click.echo(f"{cache}: OK")
    return 0


@cli.command()
@click.option("--teachers", required=True, help="Comma list of teachers, as for `run`.")
@click.option("--size", default=384, show_default=True, type=int, help="View side in pixels (SAM sees 1024).")
@click.option(
    "--views-per-image", default=2, show_default=True, type=int, help="Views per image, as for `run`."
)
@target_options
@click.option(
    "--source", help="Count the images (and their bytes) of this source, as `run --source` reads it."
)
@click.option("--images", type=int, help="Number of images, when no --source is given.")
@click.option("--limit", type=int, help="Use only the first N images, as for `run`.")
@click.option(
    "--gpu",
    default="h100",
    show_default=True,
    help="GPU kind for GPU-hours (peak bf16 table in estimate.py).",
)
@click.option(
    "--utilization",
    default=0.4,
    show_default=True,
    type=float,
    help="Achieved fraction of the GPU's bf16 peak.",
)
@click.option(
    "--samples-per-s",
    default=1000.0,
    show_default=True,
    type=float,
    help="Student read rate (views/s, all GPUs).",
)
@click.option(
    "--compression", type=float, help="Lossless factor on top of the codec [default: measured table]."
)
@click.option(
    "--image-kb",
    default=110.0,
    show_default=True,
    type=float,
    help="Mean stored image size without --source.",
)
@click.option("--json", "json_out", help="Also write the estimate as JSON here.")
def estimate(**opts) -> None:
    """Bytes, GPU-hours and read bandwidth of a cache, before extracting it."""
    import json

    from sak.pipeline.estimate import EstimateConfig, estimate_to_dict, format_estimate
    from sak.pipeline.estimate import estimate as run_estimate

    cfg = EstimateConfig(
        teachers=tuple(t.strip() for t in opts["teachers"].split(",") if t.strip()),
        size=opts["size"],
        views_per_image=opts["views_per_image"],
        codec=opts["codec"],
        levels=opts["levels"],
        grid=opts["grid"],
        format=opts["fmt"],
        source=opts["source"],
        images=opts["images"],
        limit=opts["limit"],
        gpu=opts["gpu"].lower(),
        utilization=opts["utilization"],
        samples_per_s=opts["samples_per_s"],
        compression=opts["compression"],
        image_kb=opts["image_kb"],
    )
    est = run_estimate(cfg)
    click.echo(format_estimate(est))
    if opts["json_out"]:
        with open(opts["json_out"], "w") as f:
            json.dump(estimate_to_dict(est), f, indent=2)


@cli.command()
@click.option("--dataset", required=True, type=click.Choice(["pascal", "nyud", "folder"]))
@click.option("--data-root", required=True, help="PASCAL_MT / NYUD_MT (or their parent), or your folder.")
@click.option("--init", "init", required=True, metavar="RUN", help="The stage-1 run (its teachers' stores).")
@click.option("--out", required=True, help="Cache folder (created; an unfinished one resumes).")
@click.option("--epochs", default=1, show_default=True, type=int, help="Epochs of plans to cache (0..E-1).")
@click.option("--img-size", help="HxW crop, as `sak-train stage2` [default: 512x512, NYUD 448x576].")
@click.option("--seed", default=0, show_default=True, type=int, help="The stage-2 run's --seed.")
@click.option("--codec", default="fp16", show_default=True, help="Target codec (fp16, bf16, fp32, ...).")
@click.option("--shard-size", default=64, show_default=True, type=int, help="Rows per shard file.")
@click.option("--batch-size", default=8, show_default=True, type=int, help="Images per teacher forward.")
@click.option("--device", help="cpu or cuda [default: cuda when available].")
def stage2(**opts) -> None:
    """Teacher targets for stage 2: every (epoch, image) augmented view of the training split, replayed
    from the stage-2 plan (seed, crop), for `sak-train stage2 --cache`."""
    from sak.pipeline.format import read_stage2_cache
    from sak.student.train.stage2_cache import CACHE_JSON, Stage2CacheConfig, build_stage2_cache, describe

    cfg = Stage2CacheConfig(
        dataset=opts["dataset"],
        data_root=opts["data_root"],
        init=opts["init"],
        out=opts["out"],
        epochs=opts["epochs"],
        img_size=parse_img_size(opts["img_size"]),
        seed=opts["seed"],
        codec=opts["codec"],
        shard_size=opts["shard_size"],
        batch_size=opts["batch_size"],
        device=opts["device"],
    )
    out = build_stage2_cache(cfg)
    click.echo(describe(read_stage2_cache(out / CACHE_JSON)))


def main(argv: Sequence[str] | None = None) -> int:
    return run_cli(cli, argv, "sak-cache")


entry = entry_point(main)

if __name__ == "__main__":
    entry()
