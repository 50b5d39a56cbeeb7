"""What a store holds per view, and the options that choose it: the codec (codecs.py), which tapped levels,
on which grid. Each changes the stored bytes, so each is part of the store's fingerprint.

`--codec` and `--grid` become typed objects where a config is made (a `Codec`, a `GridChoice`) and travel
whole from there; levels and grid are resolved once per teacher into a `TargetShape` (`target_shape`),
the one description of a store's shape that the fingerprint, the manifest, the store's arrays and the
worker all read.

levels  "all" (default) or a comma list of tap positions into the teacher's 4 levels, 0 = shallowest,
        3 = deepest, negatives count from the deepest ("-1" = last tap). Positions, not block indices, so
        one option fits 12- and 24-block teachers alike: "1,3" keeps blocks [5, 11] of dinov2_b and
        [11, 23] of dinov2_l. The teacher then only runs up to the deepest kept block.
grid    "native": the teacher's own patch grid (SAM-L: 64x64, DINOv2-L at 384: 27x27);
        "student": the student's patch grid at the view size (size // 16, 24x24 at 384);
        "HxW": an explicit grid, e.g. "16x16".

How a map is resampled onto another grid, and why: resample.py.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

from sak.pipeline.base.errors import SakError
from sak.pipeline.store.backends import STORE_FORMATS
from sak.pipeline.store.codecs import Codec, codec_option, get_codec
from sak.pipeline.teachers.specs import TeacherSpec

STUDENT_PATCH = 16  # every registered student (vit_s/b/l, tiny) has patch 16
RESAMPLE = (
    "bilinear, align_corners=False, antialias=True (area-like when shrinking), float32, before encoding"
)


# ------------------------------------------------------------------------------------------- the grid


@dataclass(frozen=True)
class GridChoice:
    """`--grid` as given: "native", "student" or an explicit (H, W). Prints as the option is written."""

    mode: str  # "native" | "student" | "explicit"
    hw: tuple[int, int] | None = None  # explicit only

    def __str__(self) -> str:
        return f"{self.hw[0]}x{self.hw[1]}" if self.mode == "explicit" else self.mode

    def resolve(self, spec: TeacherSpec, size: int, student_patch: int = STUDENT_PATCH) -> tuple[int, int]:
        """The (H, W) a store of this teacher holds at view size `size`."""
        if self.mode == "native":
            return spec.grid(size)
        if self.mode == "student":
            if size % student_patch:
                raise SakError(
                    f"--grid student needs --size divisible by the student patch {student_patch}, got {size}"
                )
            return (size // student_patch, size // student_patch)
        return self.hw


NATIVE_GRID = GridChoice("native")


MAX_GRID_SIDE = 256  # an explicit --grid side; the stores' native grids are at most 64


def parse_grid(text: str | None) -> GridChoice:
    """`--grid` text -> GridChoice ("native" when empty). Raises on anything else."""
    t = (text or "native").strip().lower()
    if t in ("native", "student"):
        return GridChoice(t)
    h, sep, w = t.partition("x")
    if sep and h.isdigit() and w.isdigit() and 0 < int(h) <= MAX_GRID_SIDE and 0 < int(w) <= MAX_GRID_SIDE:
        return GridChoice("explicit", (int(h), int(w)))
    raise SakError(
        f"--grid {text!r}: expected native, student or HxW such as 24x24 (each side 1 to {MAX_GRID_SIDE})"
    )


def as_grid(value: str | GridChoice | None) -> GridChoice:
    """A config's grid field as given (a name from a script or test, or already parsed) -> GridChoice."""
    return value if isinstance(value, GridChoice) else parse_grid(value)


def as_codec(value: str | Codec) -> Codec:
    """A config's codec field as given (a name from a script or test, or already resolved) -> Codec."""
    return value if isinstance(value, Codec) else codec_option(value)


# ----------------------------------------------------------------------------------------- the levels


def parse_levels(text: str | Sequence[int] | None) -> tuple[int, ...] | None:
    """`--levels` -> tap positions (None = all). Raises on syntax; ranges are checked per teacher."""
    if text is None or (isinstance(text, str) and text.strip().lower() in ("", "all")):
        return None
    if isinstance(text, str):
        try:
            positions = tuple(int(p) for p in text.split(",") if p.strip())
        except ValueError:
            raise SakError(
                f"--levels {text!r}: expected 'all' or tap positions like '3' or '1,3' (0 = shallowest tap, "
                f"3 = deepest, -1 = deepest)"
            ) from None
    else:
        positions = tuple(int(p) for p in text)
    if not positions:
        raise SakError("--levels is empty; pass 'all' or tap positions such as '1,3'")
    return positions


def select_levels(spec: TeacherSpec, levels: str | Sequence[int] | None) -> tuple[int, ...]:
    """Block indices a store of this teacher keeps, shallowest first (validated against its taps)."""
    positions = parse_levels(levels)
    if positions is None:
        return tuple(spec.levels)
    n = len(spec.levels)
    blocks = []
    for p in positions:
        if not -n <= p < n:
            raise SakError(
                f"--levels position {p} is out of range for {spec.name}, which taps blocks "
                f"{list(spec.levels)} (positions 0..{n - 1}, or -1..-{n} from the deepest)"
            )
        blocks.append(spec.levels[p])
    if len(set(blocks)) != len(blocks):
        raise SakError(f"--levels {levels!r} names a level of {spec.name} twice (blocks {blocks})")
    return tuple(sorted(blocks))


# ---------------------------------------------------------------------------------- a store's shape


@dataclass(frozen=True)
class TargetShape:
    """What one teacher's store holds per view: the kept blocks, all on one (H, W) grid."""

    blocks: tuple[int, ...]  # kept tapped blocks, shallowest first; the teacher stops after the last
    grid: tuple[int, int]  # stored (H, W)
    native: tuple[int, int]  # the teacher's own patch grid at the view size
    choice: GridChoice = NATIVE_GRID

    @property
    def resampled(self) -> bool:
        return self.grid != self.native

    @property
    def grid_mode(self) -> str | None:
        """The identity's `grid_mode`: present only off the native grid, so the fingerprints of existing
        (native grid) stores do not change."""
        return None if self.choice.mode == "native" else str(self.choice)

    @property
    def resample(self) -> str | None:
        """The identity's `resample` (recorded with grid_mode): how the maps were resampled, if they were."""
        return RESAMPLE if self.resampled else None

    def grids(self, channels: int) -> dict[int, tuple[int, int, int]]:
        """{block: (H, W, C)}: the arrays a store of this shape is created with."""
        return {b: (*self.grid, channels) for b in self.blocks}


def target_shape(
    spec: TeacherSpec, size: int, levels: str | Sequence[int] | None, grid: GridChoice
) -> TargetShape:
    """The shape of a store of this teacher at view size `size`: resolved once per teacher (a bad --levels
    or --grid fails here, before any work)."""
    return TargetShape(select_levels(spec, levels), grid.resolve(spec, size), spec.grid(size), grid)


# ----------------------------------------------------------------------------------- config fields

# What is stored per view, as config fields (and so `sak-cache` options) shared by `run`, `estimate` and
# `stage2`: one definition, so they cannot drift apart. The codec and grid fields parse to typed objects.


def codec_field():
    help = (
        "Target codec: fp16, bf16, fp32, int8 (= int8_tc: one scale per channel and per token, robust to "
        "massive activations), int8_group32 (per 32 channels: loses outlier channels), fp8 (see pipeline/store/codecs.py), or pca<k> / pca<k>-fp8 (e.g. pca64: k "
        "coefficients per token, fp16 or fp8 with a per-token scale, over a per-level basis fitted on the "
        "first shard; k clipped to the channel count; see pipeline/store/lowrank.py)."
    )
    return field(
        default=get_codec("fp16"), metadata={"help": help, "parse": codec_option, "group": "targets"}
    )


def format_field():
    return field(
        default="zarr", metadata={"help": "Store format.", "choices": STORE_FORMATS, "group": "targets"}
    )


def compressor_field():
    help = (
        "Lossless compression of Zarr chunks: none, lz4 or zstd (Blosc). Feature maps barely compress "
        "(zstd saves ~8% for 5-10x the loader's decode CPU), so none is the default."
    )
    return field(
        default="none", metadata={"help": help, "choices": ("none", "lz4", "zstd"), "group": "targets"}
    )


def student_views_field():
    help = (
        "raw: also store every view as the student's uint8 input pixels (S*S*3 bytes a view), so the loader "
        "does no JPEG decode or resize; decode: the loader cuts views from the images."
    )
    return field(default="decode", metadata={"help": help, "choices": ("decode", "raw"), "group": "targets"})


def levels_field():
    help = "Tap positions to keep (0-3, -1 = deepest) or all; the teacher stops after the deepest."
    return field(default="all", metadata={"help": help, "group": "targets"})


def grid_field():
    help = f"Target grid: native, student or HxW (each side 1 to {MAX_GRID_SIDE})."
    return field(default=NATIVE_GRID, metadata={"help": help, "parse": parse_grid, "group": "targets"})
