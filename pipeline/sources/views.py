"""The view plan: K deterministic random-resized-crop + flip views per image (their pixels: images.cut_view).

Caching fixes what the teacher saw, so augmentation is planned up front. A view is
`(key, view index, crop box in source pixels, flip)`. Its random choices come from a generator seeded by
`(plan seed, stable hash of the key, view index)`, implemented here (SplitMix64 over integers, IEEE
doubles), never from a global RNG or a library sampler whose stream may change between versions: the same
plan gives the same boxes on every machine.

Epoch e of training replays view `e mod K`.
"""

from __future__ import annotations

import hashlib
import math
import struct
from dataclasses import asdict, dataclass

from sak.pipeline.base.errors import SakError

_MASK64 = (1 << 64) - 1
PLAN_ALGORITHM = "rrc-splitmix64-v1"  # bump if the sampling procedure below changes


def stable_key_hash(key: str) -> int:
    """64-bit hash of a key that is identical across processes, machines and Python versions."""
    return int.from_bytes(hashlib.sha256(key.encode("utf-8")).digest()[:8], "little")


class ViewSampler:
    """SplitMix64: a tiny, well-mixed, fully specified integer generator (Steele et al., 2014)."""

    def __init__(self, seed: int) -> None:
        self.state = seed & _MASK64

    def next_u64(self) -> int:
        self.state = (self.state + 0x9E3779B97F4A7C15) & _MASK64
        z = self.state
        z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
        z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & _MASK64
        return z ^ (z >> 31)

    def uniform(self, low: float, high: float) -> float:
        """Uniform in [low, high): 53 random bits, exact in IEEE double arithmetic."""
        return low + (high - low) * ((self.next_u64() >> 11) * (1.0 / (1 << 53)))

    def randint(self, low: int, high: int) -> int:
        """Uniform integer in [low, high] (inclusive), without modulo bias worth mentioning (2^-64)."""
        span = high - low + 1
        return low + (self.next_u64() * span >> 64)


def view_seed(plan_seed: int, key: str, view_index: int) -> int:
    packed = struct.pack("<qQq", plan_seed, stable_key_hash(key), view_index)
    return int.from_bytes(hashlib.sha256(packed).digest()[:8], "little")


@dataclass(frozen=True)
class ViewSpec:
    """One planned view. The box is in source pixels, half-open: columns x0..x1-1, rows y0..y1-1."""

    key: str
    view: int
    x0: int
    y0: int
    x1: int
    y1: int
    flip: bool


@dataclass(frozen=True)
class ViewPlan:
    """How views are drawn. Recorded in `cache.json`; any change gives a different cache."""

    seed: int = 0
    views_per_image: int = 2
    size: int = 384  # output side of a view in pixels (square), the student's input size
    scale: tuple[float, float] = (0.08, 1.0)  # fraction of the image area
    ratio: tuple[float, float] = (3 / 4, 4 / 3)  # width / height
    flip_prob: float = 0.5
    algorithm: str = PLAN_ALGORITHM

    def __post_init__(self) -> None:
        if self.views_per_image < 1:
            raise SakError(f"--views-per-image must be >= 1, got {self.views_per_image}")
        if self.size < 16:
            raise SakError(f"--size must be >= 16 pixels, got {self.size}")
        if not (0 < self.scale[0] <= self.scale[1] <= 1):
            raise SakError(f"crop scale must satisfy 0 < min <= max <= 1, got {self.scale}")
        if not (0 < self.ratio[0] <= self.ratio[1]):
            raise SakError(f"crop ratio must satisfy 0 < min <= max, got {self.ratio}")

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> ViewPlan:
        fields = dict(data)
        fields["scale"] = tuple(fields["scale"])
        fields["ratio"] = tuple(fields["ratio"])
        return cls(**fields)

    def view(self, key: str, index: int, width: int, height: int) -> ViewSpec:
        """Draw view `index` of image `key` (width x height source pixels)."""
        rng = ViewSampler(view_seed(self.seed, key, index))
        x0, y0, w, h = _random_resized_crop_box(rng, width, height, self.scale, self.ratio)
        flip = rng.uniform(0.0, 1.0) < self.flip_prob
        return ViewSpec(key, index, x0, y0, x0 + w, y0 + h, flip)

    def views(self, key: str, width: int, height: int) -> list[ViewSpec]:
        return [self.view(key, i, width, height) for i in range(self.views_per_image)]


def _random_resized_crop_box(
    rng: ViewSampler, width: int, height: int, scale: tuple[float, float], ratio: tuple[float, float]
) -> tuple[int, int, int, int]:
    """The usual random-resized-crop rule (10 tries, then a centred crop of clamped ratio)."""
    area = width * height
    log_lo, log_hi = math.log(ratio[0]), math.log(ratio[1])
    for _ in range(10):
        target_area = area * rng.uniform(scale[0], scale[1])
        aspect = math.exp(rng.uniform(log_lo, log_hi))
        w = int(round(math.sqrt(target_area * aspect)))
        h = int(round(math.sqrt(target_area / aspect)))
        if 0 < w <= width and 0 < h <= height:
            return rng.randint(0, width - w), rng.randint(0, height - h), w, h
    in_ratio = width / height
    if in_ratio < ratio[0]:
        w, h = width, int(round(width / ratio[0]))
    elif in_ratio > ratio[1]:
        h, w = height, int(round(height * ratio[1]))
    else:
        w, h = width, height
    return (width - w) // 2, (height - h) // 2, w, h
