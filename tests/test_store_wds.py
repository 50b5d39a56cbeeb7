"""WebDataset teacher store: tars that stock webdataset + numpy read back (keys, shapes, dtypes as the
layout says), the same decoded targets as the Zarr store, atomic and deterministic shard writes."""

from __future__ import annotations

import hashlib
import json

import numpy as np
import pytest
import torch

from sak.pipeline.base.errors import SakError
from sak.pipeline.store import wds as wds_store
from sak.pipeline.store.codecs import get_codec, outlier_features
from sak.pipeline.store.wds import WdsTeacherStore, create_wds_store, sample_key
from sak.pipeline.store.zarr import ZarrTeacherStore, create_store

VIEWS = [
    ("sub/photo0", 0),
    ("sub/photo0", 1),
    ("b", 0),
    ("b", 1),
    ("c_d", 0),
    ("c_d", 1),
]  # views.parquet order
KEYS = [sample_key(k, v) for k, v in VIEWS]
GRIDS = {2: (4, 5, 64), 5: (4, 5, 64)}  # block -> (H, W, C)
SHARD = 4  # two shards: rows 0-3 and 4-5


@pytest.fixture(scope="module")
def levels() -> dict[int, torch.Tensor]:
    x = outlier_features(6, 4, 5, 64, seed=4)
    return {2: x, 5: -0.5 * x.flip(2)}


def _write_wds(path, codec: str, levels) -> tuple[WdsTeacherStore, dict[str, str]]:
    create_wds_store(path, len(KEYS), SHARD, GRIDS, get_codec(codec))
    store = WdsTeacherStore(path, get_codec(codec), SHARD, KEYS)
    files = {}
    for shard, start in ((0, 0), (1, 4)):
        files.update(
            store.write_shard(shard, start, {b: x[start : start + SHARD] for b, x in levels.items()})
        )
    return store, files


@pytest.mark.parametrize("codec", ["fp16", "bf16", "int8", "fp8"])
def test_tars_read_back_with_stock_webdataset(codec, tmp_path, levels):
    import webdataset as wds

    store, files = _write_wds(tmp_path, codec, levels)
    assert sorted(files) == ["shards/shard-000000.tar", "shards/shard-000001.tar"]
    for rel, digest in files.items():
        assert hashlib.sha256((tmp_path / rel).read_bytes()).hexdigest() == digest
    layout = json.loads((tmp_path / "layout.json").read_text())  # what the store manifest will carry
    urls = [str(tmp_path / rel) for rel in sorted(files)]
    samples = list(wds.WebDataset(urls, shardshuffle=False).decode())  # only webdataset and numpy from here
    assert [s["__key__"] for s in samples] == KEYS  # same order as views.parquet, '/' kept, no dots
    c = get_codec(codec)
    for i, s in enumerate(samples):
        for lv in layout["levels"]:
            values = s[f"{lv['block']}.npy"]
            assert list(values.shape) == lv["shape"] and values.dtype == np.dtype(lv["store_dtype"])
            assert values.dtype.kind != "V"  # never a void type (bf16 travels as uint16 bits)
            if c.scaled:
                scales = s[f"{lv['block']}.scales.npy"]
                assert list(scales.shape) == lv["scales_shape"] and scales.dtype == np.float16
                expected = c.decode(*c.encode_parts(levels[lv["block"]][i : i + 1]))[0]
                got = c.decode(values, scales)
            else:
                assert f"{lv['block']}.scales.npy" not in s
                expected = c.decode(c.encode_parts(levels[lv["block"]][i : i + 1]).values)[0]
                got = c.decode(values)
            assert torch.equal(got, expected)
        assert lv["true_dtype"] == c.true_dtype


@pytest.mark.parametrize("codec", ["fp16", "int8"])
def test_zarr_and_wds_stores_give_identical_targets(codec, tmp_path, levels):
    wds_dir, zarr_dir = tmp_path / "w", tmp_path / "z"
    store, _ = _write_wds(wds_dir, codec, levels)
    create_store(zarr_dir, len(KEYS), SHARD, GRIDS, get_codec(codec))
    zstore = ZarrTeacherStore(zarr_dir, get_codec(codec), SHARD)
    zstore.write_shard(0, 0, {b: x[:4] for b, x in levels.items()})
    zstore.write_shard(1, 4, {b: x[4:] for b, x in levels.items()})
    for block in GRIDS:
        assert torch.equal(store.read(block, 0, 6), zstore.read(block, 0, 6))  # across both shards
        rows = np.array([5, 0, 3, 3])  # any order, repeats
        assert torch.equal(store.read_rows(block, rows), zstore.read_rows(block, rows))
        enc_w, enc_z = store.read_encoded(block, 1, 5), zstore.read_encoded(block, 1, 5)
        np.testing.assert_array_equal(enc_w.values, enc_z.values)
        if codec == "int8":
            np.testing.assert_array_equal(enc_w.scales, enc_z.scales)
    for shard in (0, 1):
        w, z = store.read_shard(shard), zstore.read_shard(shard)
        assert sorted(w) == sorted(z) == sorted(GRIDS)
        assert all(torch.equal(w[b], z[b]) for b in GRIDS)


def test_tarwriter_round_trip(tmp_path, levels):
    """A shard rewritten by stock wds.TarWriter from stock wds.WebDataset samples reads the same."""
    import webdataset as wds

    store, _ = _write_wds(tmp_path, "int8", levels)
    before = store.read_shard(0)
    src = tmp_path / "shards" / "shard-000000.tar"
    samples = list(wds.WebDataset(str(src), shardshuffle=False))  # raw bytes per member
    copy = tmp_path / "copy.tar"
    with wds.TarWriter(str(copy)) as sink:
        for s in samples:
            sink.write({k: v for k, v in s.items() if k == "__key__" or k.endswith(".npy")})
    copy.replace(src)
    after = WdsTeacherStore(tmp_path, get_codec("int8"), SHARD, KEYS).read_shard(0)
    assert all(torch.equal(before[b], after[b]) for b in GRIDS)


def test_writes_are_atomic_and_deterministic(tmp_path, levels, monkeypatch):
    store, files = _write_wds(tmp_path, "fp16", levels)
    again = store.write_shard(0, 0, {b: x[:4] for b, x in levels.items()})
    assert again["shards/shard-000000.tar"] == files["shards/shard-000000.tar"]  # same targets, same bytes
    calls, npy_bytes = [], wds_store._npy_bytes

    def failing(a):  # the third member of a rewrite fails: a crash mid-tar
        calls.append(1)
        if len(calls) == 3:
            raise OSError("disk full")
        return npy_bytes(a)

    monkeypatch.setattr(wds_store, "_npy_bytes", failing)
    with pytest.raises(OSError, match="disk full"):
        store.write_shard(0, 0, {b: 2 * x[:4] for b, x in levels.items()})
    monkeypatch.undo()
    assert sorted(p.name for p in (tmp_path / "shards").iterdir()) == ["shard-000000.tar", "shard-000001.tar"]
    assert (
        hashlib.sha256((tmp_path / "shards/shard-000000.tar").read_bytes()).hexdigest()
        == files["shards/shard-000000.tar"]
    )
    with pytest.raises(ValueError, match="must start at 4"):
        store.write_shard(1, 3, {b: x[4:] for b, x in levels.items()})
    with pytest.raises(ValueError, match="must hold 2 rows"):
        store.write_shard(1, 4, {b: x[3:] for b, x in levels.items()})


def test_keys_and_layout_are_checked(tmp_path, levels):
    with pytest.raises(SakError, match="contains a dot"):
        sample_key("img.v2", 0)
    _write_wds(tmp_path, "fp16", levels)
    other = WdsTeacherStore(
        tmp_path, get_codec("fp16"), SHARD, KEYS[1:] + KEYS[:1]
    )  # views.parquet of another cache
    with pytest.raises(SakError, match="row 0 expects"):
        other.read_shard(0)
    with pytest.raises(SakError, match="another layout"):
        create_wds_store(tmp_path, len(KEYS), SHARD, GRIDS, get_codec("int8"))
    with pytest.raises(SakError, match="never written"):
        WdsTeacherStore(tmp_path / "empty", get_codec("fp16"), SHARD, KEYS).read(2, 0, 1)


def test_check_shard_reads_headers_only(tmp_path, levels):
    store, _ = _write_wds(tmp_path, "int8", levels)
    assert store.check_shard(0, [2, 5]) == [] and store.check_shard(1, [2, 5]) == []
    assert "member(s) missing" in store.check_shard(0, [2, 5, 8])[0]
    (tmp_path / "shards/shard-000001.tar").unlink()
    assert "never written" in store.check_shard(1, [2, 5])[0]


def test_an_object_dtype_member_is_one_error_not_a_traceback(tmp_path, levels):
    """A forged shard whose .npy member is an object array (issue 21 item 7): refused from its header."""
    import io
    import tarfile

    from sak.pipeline.base.errors import SakError

    store, _ = _write_wds(tmp_path, "fp16", levels)
    shard = tmp_path / store.shard_file(0)
    with tarfile.open(shard) as tar:
        members = [(m, tar.extractfile(m).read()) for m in tar.getmembers()]
    buf = io.BytesIO()
    np.save(buf, np.array([{"a": 1}] * 4, dtype=object), allow_pickle=True)
    forged = buf.getvalue()
    with tarfile.open(shard, "w", format=tarfile.PAX_FORMAT) as tar:
        for m, data in members:
            data = forged if m.name.endswith(".npy") else data
            m.size = len(data)
            tar.addfile(m, io.BytesIO(data))
    with pytest.raises(SakError, match="holds a object array"):
        store.read(next(iter(levels)), 0, 2)
