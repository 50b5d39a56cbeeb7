"""`sak-cache show`: a PNG whose panels are the stored levels of every teacher (one PCA per level shared
by the shown views), beside the view's pixels; bad view indices are one line."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from PIL import Image

from sak.cli.cache import cli
from sak.pipeline.base.errors import SakError
from sak.pipeline.format.documents import read_cache, read_store_manifest
from sak.pipeline.inspection.show import LABEL, PANEL, pca_rgb, read_levels, render


def test_pca_rgb_spans_the_colour_range_and_is_shared_across_views():
    x = torch.randn(2, 6, 6, 32)
    x[0, :3] += 5 * torch.randn(32)  # a region that differs from the rest
    rgb = pca_rgb(x)
    assert rgb.shape == (2, 6, 6, 3) and rgb.dtype == np.uint8
    assert rgb.min() == 0 and rgb.max() == 255
    single = pca_rgb(x[1:])  # fitted on one view only: other colours than the shared projection
    assert not np.array_equal(single[0], rgb[1])
    assert pca_rgb(torch.randn(1, 3, 3, 2)).shape == (1, 3, 3, 3)  # fewer than 3 channels still draws


def test_show_draws_one_panel_per_stored_level(tiny_caches, tmp_path):
    cache = tiny_caches.get()
    out = tmp_path / "show.png"
    res = CliRunner().invoke(cli, ["show", str(cache), "--view", "0", "--view", "3", "--out", str(out)])
    assert res.exit_code == 0, res.output
    assert res.output.strip() == str(out)
    stores = [read_store_manifest(cache / e.path) for e in read_cache(cache).stores.values()]
    cols = 1 + max(len(m.levels) for m in stores)
    img = np.asarray(Image.open(out).convert("RGB"))
    assert img.shape == (2 * len(stores) * (PANEL + LABEL), cols * PANEL, 3)
    levels = read_levels(cache, [0, 3])
    assert [(lv.teacher, lv.block) for lv in levels] == [
        (m.teacher.name, lv.block) for m in stores for lv in m.levels
    ]
    for m in stores:  # the panels hold the stored grids: same shapes as the store's levels
        for lv, maps in zip(m.levels, [x for x in levels if x.teacher == m.teacher.name]):
            assert tuple(maps.maps.shape) == (2, *lv.shape[1:])
    # every level panel of the first row is a PCA picture (many colours), not a blank tile
    for k in range(1, 1 + len(stores[0].levels)):
        tile = img[:PANEL, k * PANEL : (k + 1) * PANEL].reshape(-1, 3)
        assert len(np.unique(tile, axis=0)) > 8


def test_show_writes_outside_the_cache_by_default_and_verify_stays_clean(tiny_caches, tmp_path, monkeypatch):
    from sak.pipeline.inspection.verify import check_cache

    cache = tiny_caches.copy(tmp_path / "c")
    monkeypatch.chdir(tmp_path)
    res = CliRunner().invoke(cli, ["show", str(cache), "--view", "0"])
    assert res.exit_code == 0, res.output
    assert (tmp_path / "show-c-0.png").is_file() and not list(cache.glob("*.png"))
    assert check_cache(cache).problems == []
    inside = CliRunner().invoke(cli, ["show", str(cache), "--view", "0", "--out", str(cache / "x.png")])
    assert inside.exit_code != 0 and "is inside the cache" in str(inside.exception)
    assert not (cache / "x.png").exists()


def test_show_refuses_views_outside_the_cache(tiny_caches, tmp_path):
    cache = tiny_caches.get()
    with pytest.raises(SakError, match=r"--view must be in 0\.\."):
        render(cache, [10_000], tmp_path / "x.png")


def test_repsim_pictures_draw_student_beside_teacher_per_level(tiny_caches, tiny_stage1_run, tmp_path):
    from sak.cli.train import cli as train_cli

    cache = tiny_caches.get(views_per_image=1)
    out = tmp_path / "repsim.png"
    args = ["repsim", "--checkpoint", str(tiny_stage1_run), "--cache", str(cache), "--device", "cpu"]
    res = CliRunner().invoke(train_cli, [*args, "--pictures", str(out), "--picture-views", "2"])
    assert res.exit_code == 0, res.output
    assert "Rep Sim on" in res.output and f"pictures: {out}" in res.output
    stores = [read_store_manifest(cache / e.path) for e in read_cache(cache).stores.values()]
    img = np.asarray(Image.open(out).convert("RGB"))
    levels = max(len(m.levels) for m in stores)
    assert img.shape[1] == (1 + 2 * levels) * PANEL  # view, then (teacher, student) per level
    assert img.shape[0] % (PANEL + LABEL) == 0 and img.shape[0] // (PANEL + LABEL) <= 2 * len(stores)
