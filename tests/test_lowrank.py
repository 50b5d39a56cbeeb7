"""`--codec pca<k>` (store/lowrank.py): a per-level basis fitted on the first shard before anything is encoded,
stored beside the arrays, digested, part of the store's identity; decoded by one matmul on the training
device; readable with zarr/numpy alone; reused, never refitted, by a resumed run."""

from __future__ import annotations

import io
import logging
import shutil
import tarfile

import numpy as np
import pytest
import torch
import zarr

from sak.cli.cache import main as cache_main
from sak.pipeline.base.errors import SakError
from sak.pipeline.extraction.config import ExtractConfig
from sak.pipeline.extraction.driver import run_extraction
from sak.pipeline.format.documents import read_cache, read_store_manifest
from sak.pipeline.format.journal import read_journal
from sak.pipeline.inspection.describe import describe_cache, store_fidelity_warnings
from sak.pipeline.inspection.verify import verify_cache
from sak.pipeline.store.backends import create_teacher_store, level_records, open_teacher_store
from sak.pipeline.store.codecs import get_codec
from sak.pipeline.store.lowrank import prepare_bases
from sak.pipeline.store.wds import WdsTeacherStore
from sak.student.data.batches import BatchReader, decode_targets
from sak.student.data.opening import open_cache
from sak.student.train.stage1 import train_stage1
from sak.student.train.stage1_config import Stage1Config

TEACHERS = ("dinov2_tiny", "clip_tiny")
pytestmark = pytest.mark.usefixtures("one_thread")  # see conftest.py


def _low_rank(n: int, h: int, w: int, c: int, rank: int, seed: int = 0) -> torch.Tensor:
    """(n, h, w, c) float32 of exactly `rank` directions around a non-zero mean."""
    g = torch.Generator().manual_seed(seed)
    coeffs = 3 * torch.randn(n, h, w, rank, generator=g)
    return coeffs @ torch.randn(rank, c, generator=g) + torch.randn(c, generator=g)


def _store(tmp_path, fmt: str, codec: str, levels: dict[int, torch.Tensor], keys=None):
    n = next(iter(levels.values())).shape[0]
    grids = {b: tuple(x.shape[1:]) for b, x in levels.items()}
    path = tmp_path / f"{fmt}-{codec}"
    create_teacher_store(fmt, path, n, n, grids, get_codec(codec))
    # a WebDataset store outside a cache is given its sample keys
    c = get_codec(codec)
    store = WdsTeacherStore(path, c, n, keys) if fmt == "wds" else open_teacher_store(fmt, path, c, n)
    prepare_bases(store, 0, levels)  # fitted on shard 0, before it is encoded
    store.write_shard(0, 0, levels)
    return store


@pytest.mark.parametrize("fmt", ["zarr", "wds"])
def test_a_low_rank_map_round_trips_exactly_up_to_fp16(tmp_path, fmt):
    x = {3: _low_rank(4, 5, 6, 48, rank=6), 7: _low_rank(4, 5, 6, 48, rank=6, seed=1)}
    keys = [f"img{i}__v0" for i in range(4)]
    store = _store(tmp_path, fmt, "pca6", x, keys)
    for block, ref in x.items():
        got = store.read(block, 0, 4)
        assert got.shape == ref.shape  # decoded width C; the store holds k = 6
        rel = float((got - ref).norm() / ref.norm())
        assert rel < 2e-3, rel  # exact up to the coefficients' fp16 rounding
    enc = store.read_encoded(3, 0, 4)
    assert enc.values.shape == (4, 5, 6, 6) and enc.values.dtype == np.float16
    # the fp8 coefficients (one scale per token): close, not exact
    fp8 = _store(tmp_path, fmt, "pca6-fp8", x, keys)
    rel8 = float((fp8.read(3, 0, 4) - x[3]).norm() / x[3].norm())
    assert 2e-3 < rel8 < 0.08, rel8


def test_the_numpy_recipe_of_a_wds_store_equals_the_store_decode(tmp_path):
    x = {5: _low_rank(3, 4, 4, 32, rank=4)}
    keys = [f"a{i}__v0" for i in range(3)]
    store = _store(tmp_path, "wds", "pca8", x, keys)
    mean = np.load(store.path / "basis/5.mean.npy", allow_pickle=False)
    comps = np.load(store.path / "basis/5.components.npy", allow_pickle=False)
    assert comps.shape == (8, 32) and mean.shape == (32,)
    with tarfile.open(store.path / "shards/shard-000000.tar") as tar:
        coeffs = [np.load(io.BytesIO(tar.extractfile(f"{k}.5.npy").read())) for k in keys]
    recipe = np.stack(coeffs).astype("float32") @ comps + mean  # (3, 4, 4, 32)
    np.testing.assert_allclose(recipe, store.read(5, 0, 3).numpy(), rtol=1e-5, atol=1e-5)


def test_pca_names_records_and_refusals():
    codec = get_codec("pca64")
    assert (codec.rank, codec.store_dtype, codec.scaled) == (64, "float16", False)
    fp8 = get_codec("pca64-fp8")
    assert (fp8.rank, fp8.true_dtype, fp8.granularity) == (64, "float8_e4m3fn", "token")
    assert codec.describe()["low_rank"]["rank"] == 64 and codec.identity()  # in the store fingerprint
    for bad, says in (
        ("pca64-int8", "fp16 (pca64) or fp8 (pca64-fp8), not int8"),
        ("pca0", "k >= 1"),
        ("pcax", "unknown codec"),
    ):
        with pytest.raises(SakError, match=r"^[^\n]*$") as e:
            get_codec(bad)
        assert says in str(e.value)
    # k is clipped to the channel count: the manifest states the stored k and the decoded C
    (small,) = level_records("zarr", get_codec("pca256"), 10, {4: (3, 3, 48)})
    assert small.shape == [10, 3, 3, 48] and small.channels == 48 and small.basis.components_shape == [48, 48]
    (big,) = level_records("wds", get_codec("pca16"), 10, {4: (3, 3, 48)})
    assert big.shape == [10, 3, 3, 16] and big.channels == 48 and big.basis.mean == "basis/4.mean.npy"


def test_the_cli_refuses_pca_with_another_coefficient_type_in_one_line(tmp_path, capsys):
    args = ["run", "--source", str(tmp_path), "--out", str(tmp_path / "c"), "--teachers", "dinov2_tiny"]
    assert cache_main([*args, "--codec", "pca64-int8", "--random-init"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "pca coefficients are stored as fp16 (pca64) or fp8" in err


@pytest.fixture(scope="module")
def pca_cache(tiny_caches):
    return tiny_caches.get("pca8", teachers=TEACHERS)


def test_a_pca_store_records_its_basis_and_decodes_like_the_numpy_recipe(pca_cache):
    assert verify_cache(pca_cache) == []
    # lossy: 8 of 64 random-init directions fall under 0.99, and `run` says so per level, with the fix
    warnings = store_fidelity_warnings(pca_cache)
    assert len(warnings) >= 2 and all("pca8" in w and "a larger pca<k>" in w for w in warnings)
    assert "k8" in describe_cache(pca_cache)  # inspect: H x W x C and the stored k
    cache = read_cache(pca_cache)
    index = open_cache(pca_cache)
    reader = BatchReader(index, 64, (0.5,) * 3, (0.5,) * 3)
    rows = np.array([9, 0, 5, 2])
    batch = reader.read(rows)
    targets = decode_targets(batch, index.stores, "cpu")
    for store in index.stores:
        m = read_store_manifest(pca_cache / cache.stores[store.fingerprint].path)
        assert m.codec_spec.low_rank.rank == 8 and m.fidelity and len(m.fidelity) == len(m.levels)
        journal = read_journal(store.path)  # fidelity measured on shard 1, held out from the basis fit
        assert journal[0].fidelity is None and journal[1].fidelity == m.fidelity
        group = zarr.open_group(str(store.path), mode="r")  # stock zarr + numpy, no project code
        for block, level, got in zip(store.blocks, m.levels, targets[store.teacher]):
            assert level.shape[-1] == 8 and level.channels == store.dim
            assert {f"basis/{block}/mean/c/0", f"basis/{block}/components/c/0/0"} <= set(m.files)
            coeffs = group[f"levels/{block}"][rows].astype("float32")  # (B, H, W, 8)
            recipe = coeffs @ group[f"basis/{block}/components"][:] + group[f"basis/{block}/mean"][:]
            assert tuple(got.shape) == recipe.shape == (4, *level.shape[1:3], store.dim)
            np.testing.assert_allclose(got.numpy(), recipe, rtol=1e-5, atol=1e-5)


def test_resume_reuses_the_basis_and_k_changes_the_fingerprint(pca_cache, tmp_path, caplog):
    copy = shutil.copytree(pca_cache, tmp_path / "cache")
    cache = read_cache(copy)
    fp = next(fp for fp, e in cache.stores.items() if e.teacher == "dinov2_tiny")
    store = copy / cache.stores[fp].path
    before = {p: (p.stat().st_ino, p.stat().st_mtime_ns) for p in (store / "basis").rglob("*") if p.is_file()}
    shard1 = (store / "levels/0/c/1/0/0/0").read_bytes()
    # interrupted before any shard was recorded, after the basis was written: no journal, no shard files
    (store / "shards.jsonl").unlink()
    for f in store.glob("levels/*/c"):
        shutil.rmtree(f)
    cfg = ExtractConfig(
        views_per_image=2,
        source=None,
        out=str(copy),
        teachers=TEACHERS,
        size=64,
        shard_size=4,
        codec="pca8",
        progress=False,
    )
    run_extraction(cfg)
    after = {p: (p.stat().st_ino, p.stat().st_mtime_ns) for p in (store / "basis").rglob("*") if p.is_file()}
    assert after == before  # the stored basis was read, not refitted or rewritten
    assert (store / "levels/0/c/1/0/0/0").read_bytes() == shard1  # same basis, same bytes
    assert verify_cache(copy) == []
    # another k: another store (fingerprint), k clipped to the 64 channels with a message
    caplog.set_level(logging.WARNING, logger="sak")
    run_extraction(ExtractConfig(**{**cfg.__dict__, "teachers": ("dinov2_tiny",), "codec": "pca256"}))
    assert "keeps all 64 (k clipped to the channel count)" in caplog.text
    stores = {e.codec: fp for fp, e in read_cache(copy).stores.items() if e.teacher == "dinov2_tiny"}
    assert set(stores) == {"pca8", "pca256"} and stores["pca8"] != stores["pca256"]
    wide = read_store_manifest(copy / "teachers" / stores["pca256"])
    assert wide.levels[0].shape[-1] == 64 == wide.levels[0].channels
    # a store that records shards but lost its basis is refused, by run and by verify, in one line
    shutil.rmtree(store / "basis")
    problems = verify_cache(copy)
    assert len([p for p in problems if "pca basis" in p]) == 1
    with pytest.raises(SakError, match="a pca basis file: the store cannot be decoded"):
        open_cache(copy, teachers=(fp,))
    with pytest.raises(SakError, match="its pca basis .* is missing"):
        run_extraction(cfg)


def test_verify_refuses_an_altered_basis_in_one_line(pca_cache, tmp_path):
    copy = shutil.copytree(pca_cache, tmp_path / "cache")
    entry = next(iter(read_cache(copy).stores.values()))
    f = copy / entry.path / "basis/1/components/c/0/0"
    data = bytearray(f.read_bytes())
    data[-5] ^= 0x40
    f.write_bytes(bytes(data))
    problems = verify_cache(copy)
    assert len(problems) == 1 and "basis/1/components/c/0/0 altered" in problems[0], problems
    with pytest.raises(SakError, match="does not match its recorded sha256"):
        open_cache(copy)


def test_stage1_trains_from_a_pca_store_close_to_live_teachers(pca_cache, tmp_path):
    """The cached targets are decoded to the teachers' C channels (never compared as coefficients); live
    teachers on the same views give close, not equal, losses: the store is lossy (fidelity says how)."""
    kw = dict(steps=3, batch_size=4, eval_every=0, eval_batch_size=4)
    cached = train_stage1(Stage1Config.debug(str(pca_cache), str(tmp_path / "cached"), **kw))
    online = train_stage1(Stage1Config.debug(str(pca_cache), str(tmp_path / "online"), online=True, **kw))
    a, b = np.asarray(cached.losses), np.asarray(online.losses)
    assert np.isfinite(a).all() and len(a) == 3
    rel = float(np.max(np.abs(a - b) / np.abs(b)))
    print(f"pca8 cache vs online: max relative loss difference {rel:.2e} over 3 steps")
    assert 0 < rel < 0.05


def test_a_stage2_target_cache_refuses_pca_in_one_line(tmp_path, capsys):
    """Refused where the build's config is made (before any data or teacher is read), in one line."""
    from sak.cli.cache import main as cache_main
    from sak.pipeline.extraction.config import Stage2BuildConfig

    with pytest.raises(SakError, match=r"^--codec pca8: a stage-2 target cache does not take pca<k>[^\n]*$"):
        Stage2BuildConfig(out=str(tmp_path / "s2"), codec="pca8")
    args = ["stage2", "--dataset", "folder", "--data-root", str(tmp_path), "--teachers", "dinov2_tiny"]
    assert cache_main([*args, "--out", str(tmp_path / "s2"), "--codec", "pca8"]) == 2
    assert "--codec pca8: a stage-2 target cache does not take pca<k>" in capsys.readouterr().err
    assert not (tmp_path / "s2").exists()
