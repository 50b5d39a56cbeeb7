"""What `sak-cache run` takes: ExtractConfig, its options (cli/options.py generates them from the fields),
recorded in every manifest the run writes; and the view-plan values an existing cache already fixes."""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

from sak.pipeline.base.errors import SakError
from sak.pipeline.format.documents import read_cache
from sak.pipeline.format.layout import CACHE_FILE
from sak.pipeline.store.codecs import Codec
from sak.pipeline.store.targets import (
    GridChoice,
    as_codec,
    as_grid,
    codec_field,
    compressor_field,
    format_field,
    grid_field,
    levels_field,
    student_views_field,
)
from sak.pipeline.teachers.weights import weights_field

DEFAULT_SHARD_VIEWS = 64


@dataclass(frozen=True)
class ExtractConfig:
    """Everything `sak-cache run` needs; recorded in every manifest it writes."""

    source: str | None = field(
        metadata={
            "help": "Image folder (recursive; jpg/jpeg/png/webp), WebDataset .tar shards (a file, folder or "
            "brace pattern), or .parquet with an image-bytes column. Optional when --out already holds a "
            "cache (its stored images are reused).",
            "required": False,
        }
    )
    out: str = field(
        metadata={
            "help": "Cache folder, or s3:// / gs:// URL (credentials from the standard environment). Created "
            "if missing; an existing cache gains a store per new teacher and resumes unfinished ones."
        }
    )
    teachers: tuple[str, ...] = field(
        metadata={
            "help": "Comma list of teachers: dinov2_b, dinov2_l, clip_b, clip_l, sam_b, sam_l, or the tiny "
            "random-init dinov2_tiny, clip_tiny, sam_tiny."
        }
    )
    views_per_image: int = field(
        default=2,
        metadata={
            "help": "K deterministic random-resized-crop+flip views per image; epoch e replays view e mod K "
            "[an existing cache: its own].",
            "group": "views",
        },
    )
    size: int = field(
        default=384,
        metadata={
            "help": "View side in pixels (SAM sees 1024) [an existing cache: its own].",
            "group": "views",
        },
    )
    shard_size: int | None = field(
        default=None,
        metadata={
            "help": "Views per shard file (a multiple of K) [default: 64 rounded up; an existing cache: its own].",
            "group": "views",
        },
    )
    batch_size: int = field(default=32, metadata={"help": "Views per teacher forward.", "group": "compute"})
    limit: int | None = field(default=None, metadata={"help": "Use only the first N images (sorted by key)."})
    address: str | None = field(
        default=None,
        metadata={
            "help": "Ray cluster address (e.g. ray://head:10001 or auto); default: embedded local Ray.",
            "group": "compute",
        },
    )
    weights: tuple[tuple[str, str], ...] = weights_field(
        "Local .safetensors/.pth weights for a teacher (repeatable); default: timm hub weights.",
        group="teachers",
    )
    random_init: bool = field(
        default=False,
        metadata={
            "help": "Random weights for teachers without --weights. For tests: the cache is flagged as "
            "random-init everywhere.",
            "group": "teachers",
        },
    )
    seed: int = field(
        default=0,
        metadata={
            "help": "Seed of the view plan and random init [an existing cache: its own].",
            "group": "views",
        },
    )
    normalization: str = field(
        default="teacher",
        metadata={
            "help": "teacher: each model's own mean/std; imagenet: ImageNet's for all (the paper's code).",
            "choices": ("teacher", "imagenet"),
            "group": "teachers",
        },
    )
    codec: Codec = codec_field()  # resolved from its name once, here; travels whole from here on
    format: str = format_field()
    student_views: str = student_views_field()
    compressor: str = compressor_field()
    levels: str = levels_field()
    grid: GridChoice = grid_field()
    workers: int | None = field(
        default=None,
        metadata={"help": "Teacher actors [default: one per GPU, or half the CPUs].", "group": "compute"},
    )
    object_store_mb: int = field(
        default=1024, metadata={"help": "Embedded Ray object store size.", "group": "compute"}
    )
    min_image_side: int = field(
        default=32, metadata={"help": "Skip images whose shorter side is smaller (recorded in the manifest)."}
    )
    max_pixels: int = field(
        default=178_956_970, metadata={"help": "Skip images with more pixels (decompression-bomb guard)."}
    )
    progress: bool = field(default=True, metadata={"help": "Progress bar and progress log lines."})

    def __post_init__(self) -> None:
        # a codec or grid named by a script or test (the CLI parses them itself) is resolved here, once
        object.__setattr__(self, "codec", as_codec(self.codec))
        object.__setattr__(self, "grid", as_grid(self.grid))

    def resolved_shard_size(self) -> int:
        k = self.views_per_image
        if self.shard_size is None:
            return k * -(-DEFAULT_SHARD_VIEWS // k)
        if self.shard_size < 1 or self.shard_size % k:
            raise SakError(
                f"--shard-size {self.shard_size} must be a positive multiple of --views-per-image {k} "
                f"(an image's views stay in one shard); try {k * max(1, round(self.shard_size / k))}"
            )
        return self.shard_size


RECORDED_IN_CACHE = ("views_per_image", "size", "seed", "shard_size")  # what every store must agree on


def with_recorded_defaults(cfg: ExtractConfig, given: Iterable[str]) -> ExtractConfig:
    """A recorded value is a default too: when `cfg.out` already holds a cache, the view plan (K, size,
    seed) and shard size not in `given` (the fields the user set) are the cache's own, so
    `run --out CACHE --teachers sam_l` adds a store without restating them. A given value that disagrees
    with the recorded one is refused, naming both."""
    out = Path(cfg.out).expanduser()
    if not (out / CACHE_FILE).exists():
        return cfg
    cache = read_cache(out)
    plan = cache.view_plan
    recorded = dict(
        views_per_image=plan.views_per_image, size=plan.size, seed=plan.seed, shard_size=cache.shard_size
    )
    given = set(given)
    for name in RECORDED_IN_CACHE:
        mine = getattr(cfg, name)
        if name in given and mine != recorded[name]:
            option = "--" + name.replace("_", "-")
            raise SakError(
                f"{out} was created with {option} {recorded[name]}, this run asks for {mine}; "
                f"leave {option} out (or give {recorded[name]}) to add a store, or use another --out"
            )
    return dataclasses.replace(cfg, **{k: v for k, v in recorded.items() if k not in given})
