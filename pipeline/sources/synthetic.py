"""Procedural photos for the tests, the benchmarks and anyone without a dataset at hand.

Gradients, blobs and stripes, so that teacher features differ across crops and flips (flat noise would
give every view the same statistics). Deterministic in the seed; no downloads.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image


def make_photo(seed: int, width: int, height: int) -> Image.Image:
    """A structured RGB image (gradients, blobs, stripes): features differ across crops and flips."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width].astype(np.float32)
    img = np.zeros((height, width, 3), np.float32)
    for c in range(3):
        fx, fy, phase = rng.uniform(0.01, 0.08, 2).tolist() + [rng.uniform(0, 6)]
        img[..., c] = 0.5 + 0.5 * np.sin(fx * x + fy * y + phase)
    for _ in range(4):
        cx, cy, r = rng.uniform(0, width), rng.uniform(0, height), rng.uniform(5, 0.3 * min(width, height))
        img[(x - cx) ** 2 + (y - cy) ** 2 < r * r] = rng.uniform(0, 1, 3)
    return Image.fromarray((img * 255).clip(0, 255).astype(np.uint8))


def write_photo_folder(folder: Path, images: int) -> Path:
    """`images` JPEGs of assorted sizes (320-519 x 240-399) in `folder`, an image folder as users have."""
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(images):
        make_photo(i, 320 + (i * 37) % 200, 240 + (i * 53) % 160).save(folder / f"img{i:05d}.jpg", quality=90)
    return folder
