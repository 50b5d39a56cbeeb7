"""Shared fixtures: one local Ray for the whole session, small procedural photos, one tiny cache."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from sak.pipeline.synthetic import make_photo

os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")


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
