"""The typed cache format: the shipped JSON Schema is the one the records generate, every read validates
every field and names the file and field path, and a v1 cache written before the typed format (committed
under tests/fixtures/v1_cache) still reads, verifies, loads and trains."""

from __future__ import annotations

import dataclasses
import json
import shutil
from pathlib import Path

import jsonschema
import pytest

from sak.cli.cache import main as cache_main
from sak.cli.train import main as train_main
from sak.pipeline.base.errors import SakError
from sak.pipeline.base.typed_json import schema_text, to_json
from sak.pipeline.extraction.config import ExtractConfig
from sak.pipeline.format.documents import read_cache, read_store_manifest
from sak.pipeline.format.manifest import store_fingerprint
from sak.pipeline.format.records import ExtractRecord
from sak.pipeline.format.schema import CACHE_SCHEMA, generate_schema, shipped_schema
from sak.pipeline.format.schema import main as schema_main
from sak.pipeline.inspection.verify import check_cache
from sak.student.data.batches import BatchReader
from sak.student.data.normalization import input_normalization
from sak.student.data.opening import open_cache

V1 = Path(__file__).parent / "fixtures" / "v1_cache"

pytestmark = pytest.mark.usefixtures("one_thread")  # see conftest.py


@pytest.fixture
def v1(tmp_path) -> Path:
    return Path(shutil.copytree(V1, tmp_path / "v1"))


def test_the_shipped_schema_is_the_generated_one():
    assert CACHE_SCHEMA.shipped_path().read_text() == schema_text(generate_schema())
    assert shipped_schema() == generate_schema()
    assert schema_main(["--check"]) == 0
    jsonschema.Draft202012Validator.check_schema(shipped_schema())


def test_the_recorded_run_config_has_every_extract_option():
    assert [f.name for f in dataclasses.fields(ExtractRecord)] == [
        f.name for f in dataclasses.fields(ExtractConfig)
    ]


def test_the_v1_fixture_is_small_and_validates_with_plain_jsonschema():
    assert sum(p.stat().st_size for p in V1.rglob("*") if p.is_file()) < 1_000_000
    schema = json.loads(CACHE_SCHEMA.shipped_path().read_text())
    jsonschema.validate(json.loads((V1 / "cache.json").read_text()), schema)
    for path in V1.glob("teachers/*/manifest.json"):
        jsonschema.validate(json.loads(path.read_text()), schema)
        for line in (path.parent / "shards.jsonl").read_text().splitlines():
            jsonschema.validate(json.loads(line), {"$ref": "#/$defs/ShardRecord", "$defs": schema["$defs"]})


def test_a_v1_cache_reads_back_byte_for_byte_and_keeps_its_fingerprints():
    """Reading and writing the typed records changes nothing: same JSON, same store fingerprints."""
    cache = read_cache(V1)
    assert to_json(cache) == json.loads((V1 / "cache.json").read_text())
    assert cache.files is None and cache.content_sha256 is None  # written before both existed
    formats = set()
    for fp, entry in cache.stores.items():
        m = read_store_manifest(V1 / entry.path)
        assert to_json(m) == json.loads((V1 / entry.path / "manifest.json").read_text())
        assert store_fingerprint(m.identity) == fp == m.fingerprint
        formats.add(m.format)
    assert formats == {"zarr", "wds"}


def test_a_v1_cache_inspects_verifies_and_trains(v1, tmp_path, capsys):
    assert cache_main(["inspect", str(v1)]) == 0
    assert "dinov2_tiny" in capsys.readouterr().out
    assert cache_main(["verify", str(v1)]) == 0
    out = capsys.readouterr()
    assert "OK" in out.out
    assert "carry no digest" in out.err and "zarr.json" in out.err  # what it cannot check, said
    report = check_cache(v1)
    assert report.problems == [] and len(report.notes) == 1

    index = open_cache(v1)
    assert [s.format for s in index.stores] == ["zarr", "wds"]
    mean, std = input_normalization("student", "tiny")
    batch = BatchReader(index, 32, mean, std).read(index.boxes[:2, 0] * 0 + [0, 1])
    assert batch["images"].shape == (2, 3, 32, 32)
    assert [t.shape[1:] for t in batch["targets"]["clip_tiny"]] == [(2, 2, 64)] * 2

    args = ["stage1", "--cache", str(v1), "--student", "tiny", "--steps", "2", "--batch-size", "2",
            "--warmup-steps", "1", "--out", str(tmp_path / "run"), "--num-workers", "0", "--no-tensorboard"]  # fmt: skip
    assert train_main(args) == 0, capsys.readouterr().err

    # old caches still fail verify on what they do record
    tar = v1 / "images/images-000001.tar"
    data = bytearray(tar.read_bytes())
    data[len(data) // 2] ^= 0xFF
    tar.write_bytes(bytes(data))
    assert any("images/images-000001.tar" in p for p in check_cache(v1).problems)


def test_a_wrong_typed_nested_field_is_refused_naming_file_and_field_path(v1, capsys):
    path = next(v1.glob("teachers/dinov2_tiny-*/manifest.json"))
    data = json.loads(path.read_text())
    data["levels"][1]["shape"][2] = "two"
    path.write_text(json.dumps(data))
    with pytest.raises(
        SakError, match=r"manifest\.json: field 'levels\.1\.shape\.2' should be int, found str"
    ):
        read_store_manifest(path.parent)
    with pytest.raises(SakError, match=r"field 'levels\.1\.shape\.2'"):
        open_cache(v1)
    data["levels"][1]["shape"][2] = 2
    data["identity"]["preprocessing"]["mean"] = "red"
    path.write_text(json.dumps(data))
    assert cache_main(["inspect", str(v1)]) == 0  # inspect lists an unreadable store on its row
    assert "field 'identity.preprocessing.mean' should be list, found str" in capsys.readouterr().out

    cache = json.loads((v1 / "cache.json").read_text())
    cache["images"]["shards"][0]["count"] = 2.5
    (v1 / "cache.json").write_text(json.dumps(cache))
    assert cache_main(["verify", str(v1)]) == 2
    err = capsys.readouterr().err
    assert (
        err.count("\n") == 1 and "cache.json: field 'images.shards.0.count' should be int, found float" in err
    )
    cache["images"]["shards"][0]["count"] = 2
    cache["stores"]["extra"] = {"teacher": "x"}
    (v1 / "cache.json").write_text(json.dumps(cache))
    with pytest.raises(
        SakError, match=r"cache\.json: field 'stores\.extra' is missing a required field \('path'\)"
    ):
        read_cache(v1)


def test_verify_reports_an_edited_cache_json_and_files_the_format_does_not_name(v1):
    assert check_cache(v1).problems == []
    (v1 / "teachers" / "notes.txt").write_text("x")
    (v1 / "images" / "images-000009.tar").write_bytes(b"")
    store = next(v1.glob("teachers/clip_tiny-*"))
    (store / "shards" / ".shard-000000.tar.tmp123").write_bytes(b"half")
    problems = "\n".join(check_cache(v1).problems)
    assert "teachers/notes.txt is not a file of the cache format" in problems
    assert "images/images-000009.tar is not an image tar recorded in cache.json" in problems
    assert ".shard-000000.tar.tmp123 is not a file of the cache format" in problems


def test_a_cache_json_edited_by_hand_fails_its_content_digest(tmp_path, ray_local, photo_dir):
    from sak.pipeline.extraction.driver import run_extraction

    out = tmp_path / "c"
    run_extraction(ExtractConfig(source=str(photo_dir), out=str(out), teachers=("clip_tiny",), size=32,
                                 views_per_image=1, shard_size=3, limit=3, progress=False))  # fmt: skip
    assert check_cache(out).problems == []
    data = json.loads((out / "cache.json").read_text())
    assert data["files"].keys() == {"images/index.parquet", "views.parquet"}
    data["dataset"]["source"] = "/elsewhere"
    (out / "cache.json").write_text(json.dumps(data))
    assert check_cache(out).problems == [
        "cache.json was modified after it was written (its content digest differs)"
    ]
