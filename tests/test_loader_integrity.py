"""Damaged cache files never silently train a model: the loader checks each shard's files (teacher
store shard files and image tars) against their recorded sha256 before first reading them, and stops
naming the shard and file, or, with --skip-bad-shards, leaves the shard out and counts what it skipped."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from sak.cli.train import main as train_main
from sak.pipeline.base.errors import SakError
from sak.pipeline.format.documents import read_cache, read_store_manifest
from sak.student.train.stage1 import train_stage1
from sak.student.train.stage1_config import Stage1Config

SIZE = 64


pytestmark = pytest.mark.usefixtures("one_thread")  # see conftest.py


@pytest.fixture(scope="module")
def clean_cache(tiny_caches) -> Path:
    """6 images x 2 views, shards of 4 views: shards 0 and 1 train, shard 2 is held out."""
    return tiny_caches.get()


@pytest.fixture
def cache(tiny_caches, tmp_path) -> Path:
    return tiny_caches.copy(tmp_path / "cache")


def _shard_file(cache: Path, shard: int) -> tuple[Path, str]:
    """(path, store fingerprint) of one file of a teacher shard."""
    fp, entry = next(iter(read_cache(cache).stores.items()))
    record = next(r for r in read_store_manifest(cache / entry.path).shards if r.index == shard)
    return cache / entry.path / sorted(record.files)[0], fp


def _flip_byte(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x01
    path.write_bytes(bytes(data))


def _cfg(cache: Path, out: Path, **kw) -> Stage1Config:
    base = dict(steps=3, batch_size=4, eval_every=0, eval_batch_size=4)
    return Stage1Config.debug(str(cache), str(out), **{**base, **kw})


def test_flipped_byte_in_a_teacher_shard_is_refused_naming_it(cache, tmp_path):
    path, fp = _shard_file(cache, 1)
    _flip_byte(path)
    # two loader workers: the check runs in the worker, the error reaches the trainer as a SakError
    with pytest.raises(SakError) as err:
        train_stage1(_cfg(cache, tmp_path / "run", num_workers=2))
    msg = str(err.value)
    assert "shard 1" in msg and fp in msg and path.name in msg and "sak-cache verify" in msg
    assert "Traceback" not in msg


def test_truncated_image_tar_is_refused(cache, tmp_path):
    tar = sorted((cache / "images").glob("*.tar"))[0]
    tar.write_bytes(tar.read_bytes()[: tar.stat().st_size // 2])
    with pytest.raises(SakError, match=rf"shard 0 .*image tar images/{tar.name}.*sak-cache verify"):
        train_stage1(_cfg(cache, tmp_path / "run"))


def test_deleted_shard_file_is_refused(cache, tmp_path):
    path, fp = _shard_file(cache, 0)
    path.unlink()
    with pytest.raises(SakError, match=rf"shard 0 .*{fp}.*is missing.*sak-cache verify"):
        train_stage1(_cfg(cache, tmp_path / "run"))


def test_a_damaged_held_out_shard_stops_rep_sim(cache, tmp_path):
    _flip_byte(_shard_file(cache, 2)[0])
    with pytest.raises(SakError, match="shard 2 "):  # training shards are intact: the final Rep Sim refuses
        train_stage1(_cfg(cache, tmp_path / "run"))


def test_skip_bad_shards_trains_without_the_shard_and_counts_it(cache, tmp_path, capsys):
    _flip_byte(_shard_file(cache, 0)[0])
    run = tmp_path / "run"
    args = [
        "stage1",
        "--cache",
        str(cache),
        "--student",
        "tiny",
        "--steps",
        "3",
        "--batch-size",
        "4",
        "--warmup-steps",
        "2",
    ]
    args += ["--out", str(run), "--num-workers", "0", "--no-tensorboard", "--skip-bad-shards"]
    assert train_main(args) == 0, capsys.readouterr().err
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    skipped = [r for r in records if r["kind"] == "skipped"]
    assert len(skipped) == 1 and skipped[0]["skipped_shards"] == [0]
    assert skipped[0]["skipped_samples"] == 4  # shard 0: rows 0..3 (2 images x 2 views)
    resolved = json.loads((run / "config.json").read_text())["resolved"]
    assert resolved["skipped_samples"] == 4 and resolved["train_shards"] == 1
    assert [r["step"] for r in records if r["kind"] == "train"] == [1, 2, 3]
    # deterministic: a second run skips the same shard and gives the same losses
    result = train_stage1(_cfg(cache, tmp_path / "again", skip_bad_shards=True))
    assert result.skipped_shards == [0] and result.skipped_samples == 4
    assert result.losses == [r["loss"] for r in records if r["kind"] == "train"]


def test_a_clean_cache_trains_the_same_with_and_without_the_flag(clean_cache, tmp_path):
    plain = train_stage1(_cfg(clean_cache, tmp_path / "a"))
    flagged = train_stage1(_cfg(clean_cache, tmp_path / "b", skip_bad_shards=True))
    assert flagged.skipped_shards == [] and flagged.skipped_samples == 0
    assert plain.losses == flagged.losses and plain.repsim_after == flagged.repsim_after
