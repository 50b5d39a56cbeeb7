"""`sak-cache show`: features as pictures. Every teacher's every stored level of the chosen views, each
projected to RGB by one 3-component PCA per (teacher, level) shared by all the shown views (so colours
compare across views), beside the view's own pixels as the teacher saw them (the same `cut_view`).

    sak-cache show CACHE --view 0 --view 5 --out views.png

Layout: one row per (view, teacher): the view image, then one panel per stored level (label: teacher,
block, stored grid). Panels are upsampled with nearest neighbour, so each token stays one visible square.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw

from sak.pipeline.base.errors import SakError
from sak.pipeline.base.provenance import atomic_path
from sak.pipeline.extraction.preprocess import cut_shard_views, view_rows
from sak.pipeline.format.documents import read_cache, read_store_manifest
from sak.pipeline.store.backends import open_store

PANEL = 160  # pixels per panel side
LABEL = 14  # pixels of caption under each panel


@dataclass(frozen=True)
class LevelMaps:
    """One stored level of one teacher for the shown views."""

    teacher: str
    block: int
    maps: torch.Tensor  # (n_views, H, W, C) float32, as decoded from the store


def pca_rgb(maps: torch.Tensor, also: torch.Tensor | None = None):
    """(n, H, W, C) -> (n, H, W, 3) uint8: the top-3 principal components of all tokens of all n maps,
    each scaled to [0, 255] by its 1st and 99th percentile over those tokens. With `also` (m, h, w, C):
    returns (maps' picture, also's picture), `also` projected with the same fit (colours compare)."""
    n, h, w, c = maps.shape
    x = maps.reshape(-1, c).double()
    mean = x.mean(0)
    x = x - mean
    k = min(3, c, x.shape[0])
    _, _, v = torch.linalg.svd(x, full_matrices=False)  # v: (min(T, C), C)
    proj = x @ v[:k].T  # (T, k)
    lo = torch.quantile(proj.float(), 0.01, dim=0).double()
    hi = torch.quantile(proj.float(), 0.99, dim=0).double()

    def to_rgb(p: torch.Tensor, shape: tuple[int, ...]) -> np.ndarray:
        rgb = ((p - lo) / (hi - lo).clamp_min(1e-12)).clamp(0, 1) * 255
        if k < 3:
            rgb = torch.cat([rgb, rgb.new_zeros(rgb.shape[0], 3 - k)], 1)
        return rgb.reshape(*shape, 3).round().to(torch.uint8).numpy()

    if also is None:
        return to_rgb(proj, (n, h, w))
    other = (also.reshape(-1, c).double() - mean) @ v[:k].T
    return to_rgb(proj, (n, h, w)), to_rgb(other, tuple(also.shape[:3]))


def read_levels(cache_dir: Path, views: list[int]) -> list[LevelMaps]:
    """Every stored level of every teacher store of the cache, for the given view indices."""
    cache = read_cache(cache_dir)
    out = []
    for entry in cache.stores.values():
        m = read_store_manifest(cache_dir / entry.path)
        store = open_store(cache_dir / entry.path, m)
        done = {i for s in m.shards for i in range(s.start, s.stop)}
        missing = [v for v in views if v not in done]
        if missing:
            raise SakError(
                f"{entry.teacher}: view(s) {missing} are not extracted yet in {cache_dir}; finish "
                f"`sak-cache run` or pick views below {cache.num_views}"
            )
        for lv in m.levels:
            maps = torch.cat([store.read(lv.block, v, v + 1) for v in views])
            out.append(LevelMaps(entry.teacher, lv.block, maps))
    return out


def view_images(cache_dir: Path, views: list[int], size: int) -> np.ndarray:
    """(n, size, size, 3) uint8: the views cut from the cached source images, as the teachers saw them."""
    rows = view_rows(cache_dir)
    cut = cut_shard_views(str(cache_dir), [rows[v] for v in views], [size])[size]  # (n, 3, s, s)
    return cut.transpose(0, 2, 3, 1)


def _panel(img: np.ndarray, caption: str) -> Image.Image:
    tile = Image.new("RGB", (PANEL, PANEL + LABEL), "white")
    tile.paste(Image.fromarray(img).resize((PANEL, PANEL), Image.NEAREST), (0, 0))
    ImageDraw.Draw(tile).text((2, PANEL + 1), caption[:28], fill="black")
    return tile


def save_sheet(rows: list[list[tuple[np.ndarray, str]]], out: str | Path) -> Path:
    """A PNG of panel rows: each panel an (h, w, 3) uint8 picture and its caption."""
    cols = max(len(r) for r in rows)
    sheet = Image.new("RGB", (cols * PANEL, len(rows) * (PANEL + LABEL)), "white")
    for i, row in enumerate(rows):
        for j, (img, caption) in enumerate(row):
            sheet.paste(_panel(img, caption), (j * PANEL, i * (PANEL + LABEL)))
    out = Path(out)
    with atomic_path(out) as tmp:  # a full disk or a read-only folder: one line, no partial PNG
        sheet.save(tmp, format="PNG")
    return out


def render(cache_dir: str | Path, views: list[int], out: str | Path) -> Path:
    """Write the PNG: per view and teacher one row (image, then one PCA-RGB panel per stored level)."""
    cache_dir = Path(cache_dir)
    cache = read_cache(cache_dir)
    bad = [v for v in views if not 0 <= v < cache.num_views]
    if not views or bad:
        raise SakError(
            f"--view must be in 0..{cache.num_views - 1} (the cache holds {cache.num_views} views)"
        )
    levels = read_levels(cache_dir, views)
    if not levels:
        raise SakError(f"{cache_dir} holds no teacher store yet; run `sak-cache run` first")
    images = view_images(cache_dir, views, cache.view_plan.size)
    rgb = [pca_rgb(lv.maps) for lv in levels]  # one shared PCA per (teacher, level) over the shown views
    teachers = list(dict.fromkeys(lv.teacher for lv in levels))
    rows = []
    for i, v in enumerate(views):
        for t in teachers:
            mine = [(lv, p) for lv, p in zip(levels, rgb) if lv.teacher == t]
            rows.append(
                [(images[i], f"view {v}")]
                + [(p[i], f"{t} L{lv.block} {lv.maps.shape[1]}x{lv.maps.shape[2]}") for lv, p in mine]
            )
    return save_sheet(rows, out)
