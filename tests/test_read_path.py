"""The read path: store compressor (none | lz4 | zstd), the loader's direct shard-file reads, and the fast
xxh3-128 digest beside every sha256."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np
import pytest
import torch
import zarr

from sak.pipeline.base.errors import SakError
from sak.pipeline.base.provenance import sha256_file, xxh3_file
from sak.pipeline.extraction.config import ExtractConfig
from sak.pipeline.extraction.driver import run_extraction
from sak.pipeline.format.documents import read_cache, read_store_manifest
from sak.pipeline.inspection.verify import verify_cache
from sak.pipeline.store.codecs import get_codec, outlier_features
from sak.pipeline.store.zarr import ShardRows, ZarrTeacherStore, check_compressor, create_store
from sak.student.data.batches import BatchReader
from sak.student.data.normalization import input_normalization
from sak.student.data.opening import open_cache

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.mark.parametrize("compressor", ["none", "lz4", "zstd"])
@pytest.mark.parametrize("codec", ["fp16", "bf16", "int8", "fp8"])
def test_every_compressor_round_trips_through_zarr_and_the_direct_reader(tmp_path, codec, compressor):
    c = get_codec(codec)
    create_store(tmp_path, 10, 4, {7: (3, 5, 64)}, c, compressor)
    store = ZarrTeacherStore(tmp_path, c, 4)
    x = outlier_features(10, 3, 5, 64, seed=1)
    for shard, start in enumerate(range(0, 10, 4)):
        store.write_shard(shard, start, {7: x[start : start + 4]})
    meta = json.loads((tmp_path / "levels" / "7" / "zarr.json").read_text())
    inner = meta["codecs"][0]["configuration"]["codecs"]
    assert [i.get("configuration", {}).get("cname") for i in inner if i["name"] == "blosc"] == (
        [] if compressor == "none" else [compressor]
    )
    rows = np.array([9, 2, 5, 2, 0])  # any order, a row twice, across shards and the short last one
    kinds = ["levels", "scales"] if c.scaled else ["levels"]
    for kind in kinds:
        stock = zarr.open_array(str(tmp_path / kind / "7"), mode="r")[:][rows]  # the stock library
        fast = ShardRows.of(tmp_path / kind / "7")
        assert fast is not None and fast.blosc == (compressor != "none")
        out = np.empty_like(stock)
        order = np.argsort(rows, kind="stable")
        fast.read_into(rows[order], out, dest=order)
        assert out.tobytes() == stock.tobytes()
    decoded = store.read_rows(7, np.sort(rows))
    torch.testing.assert_close(decoded, c.decode(*c.encode_parts(x[np.sort(rows)])))


def test_an_unknown_compressor_is_one_line():
    with pytest.raises(SakError, match="unknown compressor 'brotli'; use one of none, lz4, zstd"):
        check_compressor("brotli")


@pytest.fixture(scope="module")
def zstd_cache(tiny_caches, tmp_path_factory):
    """The fp16 tiny cache plus a second store of clip_tiny with --compressor zstd."""
    dst = tiny_caches.copy(tmp_path_factory.mktemp("zstd") / "c")
    cfg = ExtractConfig(
        views_per_image=2, source=None, out=str(dst), teachers=("clip_tiny",), size=64, shard_size=4, compressor="zstd",
        progress=False,
    )  # fmt: skip
    run_extraction(cfg)
    return dst


def test_the_compressor_is_in_the_manifest_and_the_fingerprint_and_reads_the_same(zstd_cache):
    cache = read_cache(zstd_cache)
    clip = {
        fp: read_store_manifest(zstd_cache / e.path)
        for fp, e in cache.stores.items()
        if e.teacher == "clip_tiny"
    }
    assert len(clip) == 2  # a different compressor is a different store
    by = {m.identity.compressor: fp for fp, m in clip.items()}
    assert set(by) == {"none", "zstd"} and clip[by["zstd"]].config.compressor == "zstd"
    same = {
        f.name: getattr(clip[by["none"]].identity, f.name)
        for f in dataclasses.fields(clip[by["none"]].identity)
    }
    assert dataclasses.replace(clip[by["zstd"]].identity, compressor="none") == type(
        clip[by["none"]].identity
    )(**same)  # nothing else differs
    mean, std = input_normalization("student", "tiny")
    rows = np.array([5, 0, 3])
    got = []
    for fp in (by["none"], by["zstd"]):
        reader = BatchReader(open_cache(zstd_cache, [fp]), 64, mean, std)
        got.append(reader.read(rows)["targets"]["clip_tiny"])
    for a, b in zip(*got):
        assert torch.equal(a, b)
    assert verify_cache(zstd_cache) == []


def test_every_shard_file_and_image_tar_records_its_xxh3(tiny_caches):
    root = tiny_caches.get()
    cache = read_cache(root)
    for tar in cache.images.shards:
        assert tar.xxh3 == xxh3_file(root / tar.file) and tar.sha256 == sha256_file(root / tar.file)
    for entry in cache.stores.values():
        m = read_store_manifest(root / entry.path)
        for shard in m.shards:
            assert shard.xxh3 is not None and set(shard.xxh3) == set(shard.files)
            for rel, digest in shard.xxh3.items():
                assert xxh3_file(root / entry.path / rel) == digest


def test_the_loader_checks_the_fast_digest_and_verify_both(tiny_caches, tmp_path):
    root = tiny_caches.copy(tmp_path / "c")
    entry = next(iter(read_cache(root).stores.values()))
    m = read_store_manifest(root / entry.path)
    rel = sorted(m.shards[1].files)[0]
    path = root / entry.path / rel
    data = bytearray(path.read_bytes())
    data[len(data) // 3] ^= 0x10
    path.write_bytes(bytes(data))
    mean, std = input_normalization("student", "tiny")
    reader = BatchReader(open_cache(root), 64, mean, std)
    reader.read(np.array([0, 1]))  # shard 0 is intact
    with pytest.raises(SakError, match=f"shard 1 .*{rel} does not match its recorded xxh3"):
        reader.read(np.array([4]))
    problems = verify_cache(root)
    assert any(rel in p and "sha256" in p for p in problems)


@pytest.fixture(scope="module")
def raw_views_cache(tiny_caches, tmp_path_factory):
    """The fp16 tiny cache with its views also stored as student pixels (--student-views raw)."""
    dst = tiny_caches.copy(tmp_path_factory.mktemp("raw") / "c")
    cfg = ExtractConfig(
        views_per_image=2, source=None, out=str(dst), teachers=("clip_tiny",), size=64, shard_size=4, student_views="raw",
        progress=False,
    )  # fmt: skip
    run_extraction(cfg)
    return dst


def test_stored_student_views_are_the_cut_views_and_the_loader_uses_them(raw_views_cache, tiny_caches):
    cache = read_cache(raw_views_cache)
    sv = cache.student_views
    assert sv is not None and sv.size == 64 and sv.shape == [cache.num_views, 64, 64, 3]
    assert [s.index for s in sv.shards] == list(range(cache.num_shards))
    stock = zarr.open_array(str(raw_views_cache / sv.array), mode="r")  # readable by stock zarr
    mean, std = input_normalization("student", "tiny")
    raw = BatchReader(open_cache(raw_views_cache), 64, mean, std)
    decoded = BatchReader(open_cache(tiny_caches.get()), 64, mean, std)
    assert raw.raw_views() is not None and decoded.raw_views() is None
    rows = np.array([7, 0, 3, 3, 11])
    a, b = raw.read(rows), decoded.read(rows)
    assert torch.equal(a["images"], b["images"])  # the same pixels as decode + cut_view
    views = decoded.read_views(rows, (64,))[64]
    assert np.array_equal(stock[:][rows], views.permute(0, 2, 3, 1).numpy())
    for x, y in zip(a["targets"]["clip_tiny"], b["targets"]["clip_tiny"]):
        assert torch.equal(x, y)
    assert verify_cache(raw_views_cache) == []


def test_a_damaged_student_view_shard_is_refused(raw_views_cache, tmp_path):
    import shutil

    root = Path(shutil.copytree(raw_views_cache, tmp_path / "c"))
    shard = read_cache(root).student_views.shards[1]
    data = bytearray((root / shard.file).read_bytes())
    data[100] ^= 1
    (root / shard.file).write_bytes(bytes(data))
    mean, std = input_normalization("student", "tiny")
    with pytest.raises(
        SakError, match=f"shard 1 .*student views {shard.file} does not match its recorded xxh3"
    ):
        BatchReader(open_cache(root), 64, mean, std).read(np.array([5]))
    assert any(shard.file in p for p in verify_cache(root))


def test_an_unknown_student_views_mode_is_one_line(tmp_path):
    cfg = ExtractConfig(
        views_per_image=2, source=None, out=str(tmp_path / "c"), teachers=("clip_tiny",), student_views="png"
    )
    with pytest.raises(SakError, match="unknown --student-views 'png'; use one of decode, raw"):
        run_extraction(cfg)


def test_the_cli_offers_the_read_path_options(capsys, tmp_path):
    from sak.cli.cache import main as cache_main

    assert (
        cache_main(["run", "--out", str(tmp_path / "c"), "--teachers", "clip_tiny", "--compressor", "brotli"])
        == 2
    )
    assert "'brotli' is not one of 'none', 'lz4', 'zstd'" in capsys.readouterr().err
    assert (
        cache_main(["run", "--out", str(tmp_path / "c"), "--teachers", "clip_tiny", "--student-views", "png"])
        == 2
    )
    argv = ["estimate", "--teachers", "clip_l", "--images", "1000", "--student-views", "raw", "--cores", "4"]
    argv += ["--views-per-image", "2"]  # break-even after K epochs: the K views are cut once
    assert cache_main([*argv, "--read-gbps", "2.5"]) == 0
    out = capsys.readouterr().out
    assert (
        "break-even after 2.0 epochs" in out
        and "2.5 GB/s of storage feeds" in out
        and "4 loader cores" in out
    )
