"""Stage-2 target caches: --cache and --online give the same per-step losses from the same views."""

from __future__ import annotations

import json

import pyarrow.parquet as pq
import pytest

from sak.cli.cache import main as cache_main
from sak.pipeline.base.errors import SakError
from sak.student.data.dense import DenseDataset, TrainSamples
from sak.student.data.stage2_views import image_sha256
from sak.student.train.stage2 import train_stage2
from sak.student.train.stage2_config import Stage2Config
from tests.test_datasets import make_folder

NAMES = [f"img{i}" for i in range(5)]  # 4 training images, 1 for validation
CROP = (48, 64)  # not square: SAM sees the long side at its fixed size, zero-padded below


pytestmark = pytest.mark.usefixtures("one_thread")  # see conftest.py


@pytest.fixture(scope="module")
def setup(tiny_stage1_run, tmp_path_factory):
    root = tmp_path_factory.mktemp("s2cache")
    (root / "s1").symlink_to(tiny_stage1_run, target_is_directory=True)  # shared, read-only
    folder = make_folder(root / "data", names=NAMES)
    code = cache_main(
        ["stage2", "--dataset", "folder", "--data-root", str(folder), "--init", str(root / "s1"),
         "--out", str(root / "s2cache"), "--epochs", "2", "--img-size", f"{CROP[0]}x{CROP[1]}",
         "--codec", "fp32", "--shard-size", "3", "--batch-size", "2", "--device", "cpu"]
    )  # fmt: skip
    assert code == 0
    return root, folder


def _run(root, folder, name, **kw):
    kw = {"steps": 4, "batch_size": 2, "img_size": CROP, "lr": 1e-3, "device": "cpu", **kw}
    cfg = Stage2Config.debug("folder", str(folder), str(root / "s1"), str(root / name), **kw)
    return train_stage2(cfg)


def test_cache_records_the_views(setup):
    root, folder = setup
    cache = json.loads((root / "s2cache/cache.json").read_text())
    assert cache["kind"] == "sak-stage2-cache" and cache["complete"] and cache["rows"] == 8
    assert cache["identity"]["crop"] == list(CROP) and cache["identity"]["seed"] == 0
    assert [t["teacher"] for t in cache["teachers"]] == ["dinov2_tiny", "clip_tiny", "sam_tiny"]
    assert all(t["weights"]["random_init"] for t in cache["teachers"])  # --init keeps stage 1's flag
    views = pq.read_table(root / "s2cache/views.parquet").to_pylist()
    assert [v["row"] for v in views] == list(range(8)) and [v["epoch"] for v in views] == [0] * 4 + [1] * 4
    samples = TrainSamples(DenseDataset("folder", folder, "train"), CROP, seed=0)
    s = samples[5]  # stream position 5 = epoch 1, some image: its row's image hash matches
    assert views[s["row"]]["image_sha256"] == image_sha256(s["image"])


def test_cache_and_online_give_equal_losses(setup):
    root, folder = setup
    online = _run(root, folder, "online", online=True)
    cached = _run(root, folder, "cached", cache=str(root / "s2cache"))
    print("online", online.losses, "cached", cached.losses)
    assert len(online.losses) == len(cached.losses) == 4
    for a, b, ra, rb in zip(online.losses, cached.losses, online.records, cached.records):
        assert abs(a - b) <= 1e-4 * abs(a), (a, b)
        assert abs(ra["distill"] - rb["distill"]) <= 1e-4 * abs(ra["distill"]) and ra["distill"] > 0


def test_mismatch_and_too_few_epochs_are_refused(setup):
    root, folder = setup
    with pytest.raises(SakError, match=r"seed 0.*has 1"):
        _run(root, folder, "bad_seed", cache=str(root / "s2cache"), seed=1)
    with pytest.raises(SakError, match=r"crop \[48, 64\].*\[64, 64\]"):
        _run(root, folder, "bad_crop", cache=str(root / "s2cache"), img_size=(64, 64))
    with pytest.raises(SakError, match="holds 2 epochs"):
        _run(root, folder, "too_long", cache=str(root / "s2cache"), steps=5)


def test_cached_run_reads_the_store_and_rerun_resumes(setup, monkeypatch):
    root, folder = setup
    from sak.pipeline.store.zarr import ZarrTeacherStore

    read_rows = ZarrTeacherStore.read_rows
    monkeypatch.setattr(ZarrTeacherStore, "read_rows", lambda self, b, rows: read_rows(self, b, rows) * 0)
    zeroed = _run(root, folder, "zeroed", cache=str(root / "s2cache"), steps=1)
    monkeypatch.undo()
    cached = _run(root, folder, "cached1", cache=str(root / "s2cache"), steps=1)
    assert zeroed.records[0]["distill"] != pytest.approx(cached.records[0]["distill"], rel=1e-3)
    before = (root / "s2cache/teachers/sam_tiny/shards.jsonl").read_text()
    args = ["stage2", "--dataset", "folder", "--data-root", str(folder), "--init", str(root / "s1")]
    args += ["--out", str(root / "s2cache"), "--epochs", "2", "--img-size", "48x64", "--codec", "fp32"]
    assert cache_main([*args, "--shard-size", "3", "--device", "cpu"]) == 0  # complete: nothing redone
    assert (root / "s2cache/teachers/sam_tiny/shards.jsonl").read_text() == before
    assert cache_main([*args, "--shard-size", "3", "--seed", "1"]) == 2  # another plan: refused


def test_a_run_from_the_cache_takes_its_crop_and_seed_and_names_the_fix_for_another(setup, capsys):
    """`sak-train stage2 --cache` without --img-size / --seed trains at the cache's own crop and seed; a
    different --img-size is refused naming both values and the fix."""
    from sak.cli.train import main as train_main

    root, folder = setup
    args = ["stage2", "--dataset", "folder", "--data-root", str(folder), "--init", str(root / "s1")]
    args += ["--cache", str(root / "s2cache"), "--steps", "1", "--batch-size", "2", "--device", "cpu"]
    assert train_main([*args, "--num-workers", "0", "--out", str(root / "defaults")]) == 0
    config = json.loads((root / "defaults/config.json").read_text())["config"]
    assert config["img_size"] == list(CROP) and config["seed"] == 0
    capsys.readouterr()
    assert train_main([*args, "--img-size", "64x64", "--out", str(root / "other_crop")]) == 2
    err = capsys.readouterr().err
    assert "crop [48, 64], this run has [64, 64]; leave out --img-size to take the cache's" in err


def test_a_fresh_stage2_cache_lists_its_random_init_teachers_and_verifies_without_notes(setup):
    from sak.pipeline.inspection.describe import list_caches
    from sak.pipeline.inspection.verify import check_cache

    root, _ = setup
    report = check_cache(root / "s2cache")
    assert report.problems == [] and report.notes == []
    line = next(x for x in list_caches(str(root)) if "s2cache" in x)
    assert "dinov2_tiny(random-init)" in line and "sam_tiny(random-init)" in line
