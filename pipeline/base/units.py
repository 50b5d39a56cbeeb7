"""The one byte formatter: decimal SI units (1 KB = 1000 bytes, 1 MB = 10^6 bytes), as disks and
object stores bill them. `inspect`, `estimate` and every other report print sizes through it."""

from __future__ import annotations

UNITS_NOTE = "decimal units: 1 MB = 10^6 bytes"


def human_bytes(n: float) -> str:
    """12345678 -> '12.3 MB'; whole bytes below 1 KB."""
    for unit in ("B", "KB", "MB", "GB", "TB", "PB"):
        if abs(n) < 1000 or unit == "PB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return f"{n:.1f} PB"
