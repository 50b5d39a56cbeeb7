"""What the user already has: a folder of theirs as --out is refused untouched; on an existing cache,
--source and the ingest-only options must be the recorded ones (issue 21, item 1)."""

import dataclasses
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from sak.pipeline.base.errors import SakError
from sak.pipeline.extraction.config import ExtractConfig, with_recorded_defaults
from sak.pipeline.format.documents import read_cache, write_cache
from sak.pipeline.format.records import IngestRecord

FIXTURE = Path(__file__).parent / "fixtures" / "v1_cache"


def _run(*args):
    return subprocess.run(
        [sys.executable, "-m", "sak.cli.cache", "run", *args], capture_output=True, text=True, timeout=120
    )


def _one_line(proc) -> str:
    assert proc.returncode == 2, proc.stderr
    lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("sak-cache: error: "), proc.stderr
    return lines[0]


def test_a_users_folder_is_refused_and_left_untouched(tmp_path, photo_dir):
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "views.parquet").write_bytes(b"my own table")
    (mine / "notes.txt").write_text("keep me")
    before = {p.name: p.read_bytes() for p in mine.iterdir()}
    line = _one_line(_run("--source", str(photo_dir), "--out", str(mine), "--teachers", "clip_tiny"))
    assert "not a SAK cache" in line and "--out" in line
    assert {p.name: p.read_bytes() for p in mine.iterdir()} == before


def test_what_an_interrupted_ingest_left_is_not_a_users_folder(tmp_path):
    from sak.pipeline.extraction.probe import check_out_dir

    out = tmp_path / "cache"
    (out / "images").mkdir(parents=True)
    (out / "images" / "images-000000.tar").write_bytes(b"")
    (out / "images" / "images-000001.tar.tmp").write_bytes(b"")
    (out / ".sak-lock").write_text("{}")
    check_out_dir(out)  # a re-run redoes the ingest
    (out / "images" / "holiday.jpg").write_bytes(b"")
    with pytest.raises(SakError, match="not a SAK cache"):
        check_out_dir(out)


def _cache(tmp_path, record: IngestRecord | None) -> Path:
    out = Path(shutil.copytree(FIXTURE, tmp_path / "cache"))
    cache = read_cache(out)
    write_cache(out, dataclasses.replace(cache, dataset=dataclasses.replace(cache.dataset, ingest=record)))
    return out


def _cfg(out: Path, **kw) -> ExtractConfig:
    return ExtractConfig(views_per_image=2, out=str(out), teachers=("clip_tiny",), **{"source": None, **kw})


def test_another_source_on_an_existing_cache_is_refused_naming_both(tmp_path):
    out = _cache(tmp_path, None)
    recorded = read_cache(out).dataset.source
    other = tmp_path / "other"
    other.mkdir()
    with pytest.raises(SakError, match=f"--source {recorded}.*asks for {other}"):
        with_recorded_defaults(_cfg(out, source=str(other)), ["source", "out", "teachers"])
    with_recorded_defaults(_cfg(out, source=recorded), ["source", "out", "teachers"])  # the same: accepted
    line = _one_line(_run("--source", str(other), "--out", str(out), "--teachers", "clip_tiny"))
    assert recorded in line and str(other) in line


@pytest.mark.parametrize(
    "option, value, recorded",
    [
        ("limit", 5, 3),
        ("min_image_side", 16, 32),
        ("max_pixels", 1000, 10**6),
        ("max_decode_ratio", 9.0, 50.0),
    ],
)
def test_ingest_only_options_on_an_existing_cache_must_be_the_recorded_ones(
    tmp_path, option, value, recorded
):
    record = IngestRecord(limit=3, min_image_side=32, max_pixels=10**6, max_decode_ratio=50.0)
    out = _cache(tmp_path, record)
    given = [option, "out", "teachers"]
    flag = "--" + option.replace("_", "-")
    with pytest.raises(SakError, match=f"{flag} {recorded}, this run asks for {value}"):
        with_recorded_defaults(_cfg(out, **{option: value}), given)
    with_recorded_defaults(_cfg(out, **{option: recorded}), given)  # restating the recorded value: fine


def test_an_old_cache_without_the_record_accepts_them(tmp_path):
    out = _cache(tmp_path, None)
    with_recorded_defaults(
        _cfg(out, limit=7, min_image_side=8), ["limit", "min_image_side", "out", "teachers"]
    )


def test_ingest_records_its_options(tiny_caches):
    record = read_cache(tiny_caches.get()).dataset.ingest
    assert record == IngestRecord(
        limit=None,
        min_image_side=32,
        max_pixels=ExtractConfig.max_pixels,
        max_decode_ratio=ExtractConfig.max_decode_ratio,
    )


@pytest.mark.parametrize(
    "args, expect",
    [
        (["--shard-size", "1000000000"], "--shard-size 1000000000 is over the bound 4096"),
        (["--grid", "100000x100000"], "each side 1 to 256"),
        (["--size", "100000"], "--size 100000 is out of range: 16 to 2048"),
    ],
)
def test_sizes_are_bounded_before_any_work(tmp_path, photo_dir, args, expect):
    out = tmp_path / "out"
    line = _one_line(_run("--source", str(photo_dir), "--out", str(out), "--teachers", "clip_tiny", *args))
    assert expect in line
    assert not (out / "images").exists()  # refused before ingest


def test_the_bounds_are_in_the_help():
    proc = subprocess.run(
        [sys.executable, "-m", "sak.cli.cache", "run", "--help"], capture_output=True, text=True, timeout=60
    )
    text = " ".join(proc.stdout.split())
    assert "at most 4096" in text and "each side 1 to 256" in text and "16 to 2048" in text


def test_a_corrupt_weights_file_fails_in_one_line_before_ingest(tmp_path, photo_dir):
    bad = tmp_path / "clip.safetensors"
    bad.write_bytes(b"\x00garbage, not a safetensors file" * 10)
    out = tmp_path / "out"
    args = (
        "--source",
        str(photo_dir),
        "--out",
        str(out),
        "--teachers",
        "clip_tiny",
        "--weights",
        f"clip_tiny={bad}",
    )
    line = _one_line(_run(*args))
    assert f"--weights clip_tiny={bad} cannot be read" in line and "re-run" not in line
    assert not (out / "images").exists()  # before any image is ingested
