"""Which source images ingest keeps: the limits `sak-cache run` takes as options and records in the
cache (torch-free, so that `--help` stays light; images.py applies them)."""

from __future__ import annotations

from dataclasses import dataclass

DEFAULT_MAX_PIXELS = 178_956_970  # = PIL's own hard limit (2 * Image.MAX_IMAGE_PIXELS)
DEFAULT_MAX_DECODE_RATIO = 250.0
RATIO_FLOOR_PIXELS = 16_777_216  # 4096 x 4096: below it the decoded size is small whatever the ratio


@dataclass(frozen=True)
class ImageLimits:
    """Which source images ingest keeps (recorded in the cache; a later run must agree)."""

    min_side: int = 32
    max_pixels: int = DEFAULT_MAX_PIXELS
    max_decode_ratio: float = DEFAULT_MAX_DECODE_RATIO
