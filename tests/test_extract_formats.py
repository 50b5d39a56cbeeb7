"""`run --format wds --codec int8 --levels 1,3 --grid 2x2`: the options reach the store, its manifest and
fingerprint; verify checks the tars; Zarr and WDS stores of one run hold the same targets."""

from __future__ import annotations

import json

import numpy as np
import torch
import webdataset as wds

from sak.cli.cache import main as cache_main
from sak.pipeline.inspection.describe import describe_cache
from sak.pipeline.inspection.verify import verify_cache
from sak.pipeline.store.backends import open_teacher_store
from sak.pipeline.store.codecs import get_codec


def test_formats_levels_grid_and_codec_end_to_end(ray_local, photo_dir, tmp_path):
    out = tmp_path / "c"
    common = ["run", "--source", str(photo_dir), "--out", str(out), "--teachers", "dinov2_tiny,sam_tiny", "--size", "64",
              "--views-per-image", "2", "--shard-size", "4", "--no-progress", "--codec", "int8", "--levels", "1,3",
              "--grid", "2x2"]  # fmt: skip
    assert cache_main([*common, "--format", "wds"]) == 0
    assert cache_main([*common, "--format", "zarr"]) == 0
    meta = json.loads((out / "cache.json").read_text())
    stores = {}
    for e in meta["stores"].values():
        m = json.loads((out / e["path"] / "manifest.json").read_text())
        assert m["identity"]["levels"] == [1, 3] and m["identity"]["grid"] == [2, 2]
        assert (
            m["identity"]["grid_mode"] == "2x2" and m["identity"]["codec"] == "int8_tc"
        )  # what --codec int8 means
        assert [lv["block"] for lv in m["levels"]] == [1, 3] and m["levels"][0]["shape"] == [12, 2, 2, 64]
        stores[e["teacher"], m["format"]] = open_teacher_store(
            m["format"], out / e["path"], get_codec("int8_tc"), 4
        )
    assert len(stores) == 4
    assert verify_cache(out) == []
    assert "wds" in describe_cache(out)
    for t in ("dinov2_tiny", "sam_tiny"):
        for b in (1, 3):
            assert torch.equal(stores[t, "wds"].read(b, 0, 12), stores[t, "zarr"].read(b, 0, 12))
    tars = sorted(str(p) for p in (stores["sam_tiny", "wds"].path / "shards").glob("*.tar"))
    samples = list(wds.WebDataset(tars, shardshuffle=False).decode())
    assert (
        len(samples) == 12
        and samples[0]["3.npy"].shape == (2, 2, 64)
        and samples[0]["3.npy"].dtype == np.int8
    )
    # a tampered tar is named by verify
    tar = stores["dinov2_tiny", "wds"].path / "shards" / "shard-000001.tar"
    data = bytearray(tar.read_bytes())
    data[700] ^= 0xFF
    tar.write_bytes(bytes(data))
    problems = verify_cache(out)
    assert any("dinov2_tiny" in p and "shard 1" in p for p in problems)
    assert cache_main([*common, "--levels", "4"]) == 2  # out of range for 4 taps
