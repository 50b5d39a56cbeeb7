"""Target shape options: which tapped levels a store keeps and on which grid. Both change the stored bytes,
so both are part of the store's fingerprint (`identity_fields`).

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
from dataclasses import field

from sak.pipeline.base.errors import SakError
from sak.pipeline.store.backends import STORE_FORMATS
from sak.pipeline.teachers.specs import TeacherSpec

STUDENT_PATCH = 16  # every registered student (vit_s/b/l, tiny) has patch 16
RESAMPLE = (
    "bilinear, align_corners=False, antialias=True (area-like when shrinking), float32, before encoding"
)


# What is stored per view, as config fields (and so `sak-cache` options) shared by `run` and `estimate`
# (ExtractConfig, EstimateConfig): one definition, so the two cannot drift apart.


def codec_field():
    help = (
        "Target codec: fp16, bf16, fp32, int8 (per 32 channels), int8_tc (per channel and token: robust to "
        "massive activations), fp8 (see pipeline/store/codecs.py), or pca<k> / pca<k>-fp8 (e.g. pca64: k "
        "coefficients per token, fp16 or fp8 with a per-token scale, over a per-level basis fitted on the "
        "first shard; k clipped to the channel count; see pipeline/store/lowrank.py)."
    )
    return field(default="fp16", metadata={"help": help, "group": "targets"})


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
    help = "Target grid: native, student or HxW."
    return field(default="native", metadata={"help": help, "parse": parse_grid, "group": "targets"})


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


def parse_grid(text: str | None) -> str:
    """`--grid` -> "native" | "student" | "HxW" (canonical). Raises on anything else."""
    t = (text or "native").strip().lower()
    if t in ("native", "student"):
        return t
    h, sep, w = t.partition("x")
    if sep and h.isdigit() and w.isdigit() and int(h) > 0 and int(w) > 0:
        return f"{int(h)}x{int(w)}"
    raise SakError(f"--grid {text!r}: expected native, student or HxW such as 24x24")


def resolve_grid(
    spec: TeacherSpec, size: int, grid: str | None, student_patch: int = STUDENT_PATCH
) -> tuple[int, int]:
    """The (H, W) a store of this teacher holds at view size `size`."""
    g = parse_grid(grid)
    if g == "native":
        return spec.grid(size)
    if g == "student":
        if size % student_patch:
            raise SakError(
                f"--grid student needs --size divisible by the student patch {student_patch}, got {size}"
            )
        return (size // student_patch, size // student_patch)
    h, w = g.split("x")
    return (int(h), int(w))


def identity_fields(
    spec: TeacherSpec, size: int, levels: str | Sequence[int] | None, grid: str | None
) -> dict:
    """Fingerprint/manifest fields of the target shape. "levels" and "grid" replace the identity's current
    ones; "grid_mode" and "resample" appear only off the native grid, so the fingerprints of existing
    (all levels, native grid) stores do not change."""
    g = parse_grid(grid)
    hw = resolve_grid(spec, size, g)
    fields = {"levels": list(select_levels(spec, levels)), "grid": list(hw)}
    if g != "native":
        fields["grid_mode"] = g
        fields["resample"] = None if tuple(hw) == tuple(spec.grid(size)) else RESAMPLE
    return fields
