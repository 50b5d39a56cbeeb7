"""What the cache builders take, as config dataclasses whose fields are their options (cli/options.py
generates them): ExtractConfig (`sak-cache run`, recorded in every manifest it writes; the view-plan
values an existing cache already fixes are its defaults) and Stage2BuildConfig (the builder's part of
`sak-cache stage2`; the views and teachers are the stage-2 source's). Importing this module loads no
torch, so a command's --help stays quick."""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

from sak.pipeline.base.errors import SakError
from sak.pipeline.format.documents import read_cache
from sak.pipeline.format.layout import CACHE_FILE
from sak.pipeline.format.records import CacheManifest
from sak.pipeline.sources.limits import DEFAULT_MAX_DECODE_RATIO, DEFAULT_MAX_PIXELS
from sak.pipeline.store.codecs import Codec, codec_option, get_codec
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
MAX_SHARD_VIEWS = 4096  # a shard is written (and its pca basis fit) in memory: bounded where checked
MAX_VIEW_SIZE = 2048


@dataclass(frozen=True)
class ExtractConfig:
    """Everything `sak-cache run` needs; recorded in every manifest it writes."""

    source: str | None = field(
        metadata={
            "help": "Image folder (recursive; jpg/jpeg/png/webp/gif/bmp/tif/tiff), WebDataset .tar shards (a file, folder or "
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
        default=1,
        metadata={
            "help": "K deterministic random-resized-crop+flip views per image; epoch e replays view e mod K "
            "(1, the paper's; more views trade storage for augmentation) [an existing cache: its own].",
            "group": "views",
        },
    )
    size: int = field(
        default=384,
        metadata={
            "help": f"View side in pixels, 16 to {MAX_VIEW_SIZE} (SAM sees 1024) [an existing cache: its own].",
            "group": "views",
        },
    )
    shard_size: int | None = field(
        default=None,
        metadata={
            "help": f"Views per shard file (a multiple of K, at most {MAX_SHARD_VIEWS}) [default: 64 rounded up; "
            "an existing cache: its own].",
            "group": "views",
        },
    )
    batch_size: int = field(default=32, metadata={"help": "Views per teacher forward.", "group": "compute"})
    limit: int | None = field(default=None, metadata={"help": "Use only the first N images (sorted by key)."})
    address: str | None = field(
        default=None,
        metadata={
            "help": "Ray cluster address (e.g. ray://head:10001 or auto); default: $RAY_ADDRESS when set, else an "
            "embedded local Ray.",
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
        default=DEFAULT_MAX_PIXELS,
        metadata={"help": "Skip images with more pixels (decompression-bomb guard; recorded)."},
    )
    max_decode_ratio: float = field(
        default=DEFAULT_MAX_DECODE_RATIO,
        metadata={
            "help": "Skip images over 16 Mpx whose decoded RGB size is more than this many times their file "
            "size (the second bomb guard: photos are 3-30x; recorded)."
        },
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
        if self.shard_size > MAX_SHARD_VIEWS:
            raise SakError(
                f"--shard-size {self.shard_size} is over the bound {MAX_SHARD_VIEWS}; try {DEFAULT_SHARD_VIEWS}"
            )
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
    _check_ingest_options(cfg, cache, given, out)
    for name in RECORDED_IN_CACHE:
        mine = getattr(cfg, name)
        if name in given and mine != recorded[name]:
            option = "--" + name.replace("_", "-")
            raise SakError(
                f"{out} was created with {option} {recorded[name]}, this run asks for {mine}; "
                f"leave {option} out (or give {recorded[name]}) to add a store, or use another --out"
            )
    return dataclasses.replace(cfg, **{k: v for k, v in recorded.items() if k not in given})


# they chose the cache's images: fixed after ingest
INGEST_ONLY = ("limit", "min_image_side", "max_pixels", "max_decode_ratio")


def _same_source(a: str, b: str) -> bool:
    if a == b:
        return True
    return "://" not in a + b and Path(a).expanduser().resolve() == Path(b).expanduser().resolve()


def _check_ingest_options(cfg: ExtractConfig, cache: CacheManifest, given: set[str], out: Path) -> None:
    """On an existing cache its images are reused, so --source and the ingest-only options given must be
    the recorded ones (a cache from before they were recorded: only --source is known)."""
    if "source" in given and cfg.source is not None and not _same_source(cfg.source, cache.dataset.source):
        raise SakError(
            f"{out} holds the images of --source {cache.dataset.source}, this run asks for {cfg.source}; "
            f"leave --source out to reuse the cache's images, or use another --out for a new cache"
        )
    record = cache.dataset.ingest
    for name in INGEST_ONLY if record is not None else ():
        mine, theirs = getattr(cfg, name), getattr(record, name)
        if name in given and theirs is not None and mine != theirs:  # None: not recorded by older code
            option = "--" + name.replace("_", "-")
            raise SakError(
                f"{out} was ingested with {option} {theirs}, this run asks for {mine}; its images are "
                f"fixed: leave {option} out (or give {theirs}), or use another --out for a new cache"
            )


@dataclass(frozen=True)
class Stage2BuildConfig:
    """How `sak-cache stage2` builds its cache: where, how many epochs of views, the codec, the shards, and
    where the teachers run. What the views and the teachers are comes with the stage-2 source.

    epochs: the views of epochs 0..epochs-1 are cached (a run of S steps of B needs ceil(S * B / N)).
    """

    out: str = field(
        default="",
        metadata={
            "help": "Cache folder or s3:// / gs:// URL (created; an unfinished one resumes).",
            "required": True,
        },
    )
    epochs: int = field(default=1, metadata={"help": "Epochs of plans to cache (0..E-1)."})
    codec: Codec = field(
        default=get_codec("fp16"),
        metadata={"help": "Target codec (fp16, bf16, fp32, int8 = int8_tc, ...).", "parse": codec_option},
    )
    shard_size: int = field(default=64, metadata={"help": "Rows per shard file."})
    batch_size: int = field(default=8, metadata={"help": "Images per teacher forward."})
    device: str | None = field(default=None, metadata={"help": "cpu or cuda [default: cuda when available]."})
    workers: int = field(
        default=0,
        metadata={"help": "Ray actors computing shards (0: in this process); each loads the teachers."},
    )
    address: str | None = field(default=None, metadata={"help": "Ray cluster address (default: embedded)."})

    def __post_init__(self) -> None:
        object.__setattr__(self, "codec", as_codec(self.codec))  # a name from a script: resolved once, here
        if self.epochs < 1 or self.shard_size < 1 or self.batch_size < 1:
            raise SakError("--epochs, --shard-size and --batch-size must be >= 1")
        if self.workers < 0:
            raise SakError(f"--workers must be >= 0, got {self.workers}")
        if self.codec.low_rank:
            raise SakError(
                f"--codec {self.codec}: a stage-2 target cache does not take pca<k> (its targets change every "
                f"epoch, no first shard fits them all); use fp16, bf16, fp32 or a quantised codec"
            )

    def uses_gpus(self) -> bool:
        """Whether the teachers run on GPUs: --device cuda, or no --device and this machine has CUDA."""
        if self.device is not None:
            return self.device.startswith("cuda")
        import torch

        return torch.cuda.is_available()
