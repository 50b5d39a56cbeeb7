"""`sak-cache run` end to end on a local Ray: stored targets equal an independent computation, the store
opens with stock libraries, bad inputs are skipped and recorded, stores are added and runs resume."""

from __future__ import annotations

import io
import json
import shutil
import tarfile

import numpy as np
import pyarrow.parquet as pq
import pytest
import timm
import torch
import torch.nn.functional as F
import zarr
from PIL import Image
from safetensors.torch import load_file, save_file

from sak.cli.cache import main as cache_main
from sak.pipeline.extraction.config import ExtractConfig
from sak.pipeline.extraction.driver import run_extraction
from sak.pipeline.inspection.describe import describe_cache, list_caches
from sak.pipeline.inspection.verify import verify_cache
from sak.pipeline.teachers.specs import get_teacher

SIZE = 64
TEACHERS = ("dinov2_tiny", "clip_tiny", "sam_tiny")


@pytest.fixture(scope="module")
def weight_files(tmp_path_factory):
    """Weights written by plain timm, so the test can rebuild each teacher without project code."""
    root = tmp_path_factory.mktemp("weights")
    files = {}
    for i, name in enumerate(TEACHERS):
        spec = get_teacher(name)
        torch.manual_seed(100 + i)
        model = timm.create_model(
            spec.timm_name, pretrained=False, img_size=spec.fixed_input or SIZE, **dict(spec.model_kwargs)
        )
        files[name] = root / f"{name}.safetensors"
        save_file({k: v.contiguous() for k, v in model.state_dict().items()}, files[name])
    return files


@pytest.fixture(scope="module")
def cache(ray_local, photo_dir, weight_files, tmp_path_factory):
    out = tmp_path_factory.mktemp("cache") / "c"
    cfg = ExtractConfig(
        source=str(photo_dir),
        out=str(out),
        teachers=TEACHERS,
        views_per_image=2,
        size=SIZE,
        shard_size=4,
        batch_size=3,
        weights=tuple((k, str(v)) for k, v in weight_files.items()),
        progress=False,
    )
    run_extraction(cfg)
    return out


def _stores(cache_dir):
    meta = json.loads((cache_dir / "cache.json").read_text())
    return {e["teacher"]: cache_dir / e["path"] for e in meta["stores"].values()}, meta


def test_store_opens_with_stock_zarr_and_pyarrow(cache):
    stores, meta = _stores(cache)
    views = pq.read_table(cache / "views.parquet")
    assert views.column_names == ["key", "view", "x0", "y0", "x1", "y1", "flip", "image_shard"]
    assert views.num_rows == meta["num_views"] == 12
    assert sorted(stores) == sorted(TEACHERS)
    for store in stores.values():
        manifest = json.loads((store / "manifest.json").read_text())
        group = zarr.open_group(str(store), mode="r")
        for level in manifest["levels"]:
            arr = group[level["array"]]
            assert list(arr.shape) == level["shape"]
            assert arr.dtype == np.float16 and arr.attrs["true_dtype"] == "float16"
            assert np.isfinite(arr[:]).all()  # every sample was written (holes would read as NaN)
        assert manifest["complete"] and manifest["random_init"] is False
        assert len(manifest["stats"]) == 4 and len(manifest["stats"][0]["mean"]) == 64
        assert [s["samples"] for s in manifest["shards"]] == [4, 4, 4]


def test_stored_target_equals_independent_computation(cache, weight_files):
    """Cut the recorded crop from the stored bytes, run plain timm, compare with the stored levels."""
    stores, _ = _stores(cache)
    views = pq.read_table(cache / "views.parquet").to_pylist()
    members = {}
    for tar_path in sorted((cache / "images").glob("*.tar")):
        with tarfile.open(tar_path) as tar:
            for m in tar.getmembers():
                members[m.name.rsplit(".", 1)[0]] = tar.extractfile(m).read()
    for name in TEACHERS:
        spec = get_teacher(name)
        side = spec.fixed_input or SIZE
        model = timm.create_model(spec.timm_name, pretrained=False, img_size=side, **dict(spec.model_kwargs))
        model.load_state_dict(load_file(weight_files[name]))
        model.eval()
        cfg = timm.models.get_pretrained_cfg(spec.timm_name)
        mean, std = torch.tensor(cfg.mean).view(1, 3, 1, 1), torch.tensor(cfg.std).view(1, 3, 1, 1)
        group = zarr.open_group(str(stores[name]), mode="r")
        for row in (0, 5, 11):
            v = views[row]
            img = np.asarray(Image.open(io.BytesIO(members[v["key"]])).convert("RGB"))
            crop = (
                torch.from_numpy(img[v["y0"] : v["y1"], v["x0"] : v["x1"]].copy())
                .permute(2, 0, 1)[None]
                .float()
            )
            x = F.interpolate(crop, size=(side, side), mode="bicubic", antialias=True, align_corners=False)
            x = x.clamp(0, 255) / 255
            if v["flip"]:
                x = x.flip(-1)
            with torch.no_grad():
                outs = model.forward_intermediates(
                    (x - mean) / std, indices=list(spec.levels), norm=False, intermediates_only=True
                )  # NCHW, prefix tokens dropped
            for block, ref in zip(spec.levels, outs):
                stored = torch.from_numpy(group[f"levels/{block}"][row].astype(np.float32))  # (H, W, C)
                ref = ref[0].permute(1, 2, 0)
                cos = F.cosine_similarity(
                    stored.reshape(-1, stored.shape[-1]), ref.reshape(-1, ref.shape[-1]), dim=-1
                )
                assert cos.mean() >= 0.9999, (name, row, block, cos.mean().item())


def test_verify_inspect_and_ls(cache, capsys):
    assert verify_cache(cache) == []
    text = describe_cache(cache)
    for name in TEACHERS:
        assert name in text
    assert "RANDOM-INIT" not in text  # weights came from files
    assert len(list_caches(cache.parent)) == 1
    assert cache_main(["verify", str(cache)]) == 0
    assert "OK" in capsys.readouterr().out


def test_verify_names_a_corrupted_shard(cache, tmp_path):
    broken = tmp_path / "broken"
    shutil.copytree(cache, broken)
    stores, _ = _stores(broken)
    shard_file = stores["clip_tiny"] / "levels" / "2" / "c" / "1" / "0" / "0" / "0"
    data = bytearray(shard_file.read_bytes())
    data[len(data) // 2] ^= 0xFF
    shard_file.write_bytes(bytes(data))
    problems = verify_cache(broken)
    assert len(problems) == 1 and "clip_tiny" in problems[0] and "shard 1" in problems[0]
    (stores["sam_tiny"] / "levels" / "0" / "c" / "2" / "0" / "0" / "0").unlink()
    assert any("sam_tiny" in p and "shard 2" in p and "missing" in p for p in verify_cache(broken))
    assert cache_main(["verify", str(broken)]) == 1


def test_second_run_adds_a_store_and_reruns_skip_done_shards(cache, tmp_path, caplog):
    copy = tmp_path / "copy"
    shutil.copytree(cache, copy)
    views_before = (copy / "views.parquet").read_bytes()
    tars_before = {p.name: p.stat().st_mtime_ns for p in (copy / "images").glob("*.tar")}
    # no --source needed: the cache's stored images are reused; tiny teachers without --weights are
    # random-init, so these are new stores (new fingerprints) beside the file-weight ones
    cfg = ExtractConfig(
        source=None,
        out=str(copy),
        teachers=("clip_tiny", "dinov2_tiny"),
        views_per_image=2,
        size=SIZE,
        batch_size=4,
        progress=False,
    )
    with caplog.at_level("INFO", logger="sak"):
        run_extraction(cfg)
    stores, meta = _stores(copy)
    assert len(meta["stores"]) == 5  # 3 with file weights + 2 random-init stores beside them
    assert (copy / "views.parquet").read_bytes() == views_before
    assert {p.name: p.stat().st_mtime_ns for p in (copy / "images").glob("*.tar")} == tars_before
    assert verify_cache(copy) == []
    assert "RANDOM-INIT" in describe_cache(copy)
    caplog.clear()
    with caplog.at_level("INFO", logger="sak"):
        run_extraction(cfg)  # everything is done: nothing is recomputed
    assert "skipping 3 shard(s) already done; 0 to compute" in caplog.text


def test_plan_mismatch_with_existing_cache_is_refused(cache):
    rc = cache_main(
        [
            "run",
            "--out",
            str(cache),
            "--teachers",
            "clip_tiny",
            "--views-per-image",
            "3",
            "--size",
            str(SIZE),
            "--no-progress",
        ]
    )
    assert rc == 2


def test_bad_inputs_are_skipped_and_recorded(ray_local, photo_dir, tmp_path):
    src = tmp_path / "mixed"
    shutil.copytree(photo_dir, src)
    good = (src / "photo1.jpg").read_bytes()
    (src / "truncated.jpg").write_bytes(good[: len(good) // 2])
    (src / "empty.png").write_bytes(b"")
    (src / "notes.jpg").write_text("this is not an image\n")
    Image.new("RGB", (1, 1), (255, 0, 0)).save(src / "tiny.png")
    out = tmp_path / "cache"
    rc = cache_main(
        [
            "run",
            "--source",
            str(src),
            "--out",
            str(out),
            "--teachers",
            "clip_tiny",
            "--size",
            str(SIZE),
            "--views-per-image",
            "1",
            "--no-progress",
        ]
    )
    assert rc == 0
    manifest_path = next((out / "teachers").glob("*/manifest.json"))
    skipped = {s["key"]: s["reason"] for s in json.loads(manifest_path.read_text())["skipped_inputs"]}
    assert set(skipped) == {"truncated", "empty", "notes", "tiny"}
    assert "empty" in skipped["empty"] and "too small" in skipped["tiny"]
    assert "truncated" in skipped["truncated"] or "corrupt" in skipped["truncated"]
    assert json.loads((out / "cache.json").read_text())["dataset"]["num_images"] == 6
    assert verify_cache(out) == []
