"""Shared fixtures: one local Ray for the whole session, small procedural photos, one tiny cache."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")


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


@pytest.fixture(scope="session")
def ray_local():
    """One embedded Ray for every test that extracts (starting Ray costs seconds)."""
    import ray

    if not ray.is_initialized():
        ray.init(
            num_cpus=2,
            object_store_memory=300 * 1024 * 1024,
            include_dashboard=False,
            logging_level="WARNING",
        )
    yield ray
    ray.shutdown()


@pytest.fixture(scope="session")
def photo_dir(tmp_path_factory) -> Path:
    """Six images of assorted sizes and formats, one in a subfolder."""
    root = tmp_path_factory.mktemp("photos")
    (root / "sub").mkdir()
    sizes = [(160, 120), (96, 128), (200, 90), (120, 120), (140, 100), (64, 80)]
    for i, (w, h) in enumerate(sizes):
        path = root / ("sub" if i == 5 else ".") / f"photo{i}.{'jpg' if i % 2 else 'png'}"
        make_photo(i, w, h).save(path, quality=95) if i % 2 else make_photo(i, w, h).save(path)
    return root


@pytest.fixture
def one_thread():
    """Tiny models gain nothing from intra-op threads, and OpenMP barriers on busy shared cores cost
    seconds per step: compute on one thread (restored afterwards). Modules opt in with
    `pytestmark = pytest.mark.usefixtures("one_thread")`."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
