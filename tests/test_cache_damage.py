"""One flipped byte in any file of a cache: `sak-cache verify` fails naming that file, and `sak-train stage1`
either trains exactly as on the clean cache (a file training does not read) or stops with one line naming
the file, never a traceback. The cache holds every kind of file the format names: image tars, both
tables, cache.json, a Zarr store with scales (int8), a WebDataset store, manifests, journals, statistics."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import jsonschema
import pytest

from sak.cli.cache import main as cache_main
from sak.cli.train import main as train_main
from sak.pipeline.format.layout import cache_file_kind, store_file_kind
from sak.pipeline.format.schema import generate_schema

pytestmark = pytest.mark.usefixtures("one_thread")  # see conftest.py

SIZE = 32


@pytest.fixture(scope="module")
def damage_cache(ray_local, tmp_path_factory) -> Path:
    """4 images x 1 view at 32px, shards of 2 views (shard 1 is the held-out one): a Zarr int8 store of
    dinov2_tiny keeping levels 1 and 3 (values + scales arrays) and a WebDataset fp16 store of clip_tiny."""
    from conftest import make_photo

    src = tmp_path_factory.mktemp("damage_src")
    for i, (w, h) in enumerate([(48, 40), (40, 56), (64, 36), (44, 44)]):
        make_photo(10 + i, w, h).save(src / f"img{i}.png")
    out = tmp_path_factory.mktemp("damage") / "c"
    common = ["run", "--source", str(src), "--out", str(out), "--size", str(SIZE), "--views-per-image", "1",
              "--shard-size", "2", "--no-progress", "--workers", "1"]  # fmt: skip
    assert cache_main([*common, "--teachers", "dinov2_tiny", "--codec", "int8", "--levels", "1,3"]) == 0
    assert cache_main([*common, "--teachers", "clip_tiny", "--format", "wds"]) == 0
    return out


def _files(cache: Path) -> list[str]:
    files = sorted(p.relative_to(cache).as_posix() for p in cache.rglob("*") if p.is_file())
    return [f for f in files if f != ".sak-lock"]  # the lock: the one file the format leaves undigested


def _kind(rel: str) -> str:
    parts = rel.split("/")
    return store_file_kind("/".join(parts[2:])) if parts[0] == "teachers" else cache_file_kind(rel)


def _train(cache: Path, out: Path, capsys) -> tuple[int, list[float], str]:
    args = ["stage1", "--cache", str(cache), "--student", "tiny", "--steps", "2", "--batch-size", "2",
            "--warmup-steps", "1", "--out", str(out), "--num-workers", "0", "--no-tensorboard"]  # fmt: skip
    capsys.readouterr()
    code = train_main(args)  # anything but a SakError escapes and fails the test: a traceback
    err = capsys.readouterr().err
    losses = []
    if code == 0:
        records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
        losses = [r["loss"] for r in records if r["kind"] == "train"]
    return code, losses, err


def test_the_cache_holds_every_kind_of_file_and_verifies(damage_cache, capsys):
    kinds = {_kind(f) for f in _files(damage_cache)}
    assert None not in kinds
    assert kinds == {
        "cache manifest", "views table", "image index", "image tar", "store manifest", "shard journal",
        "statistics", "zarr metadata", "zarr shard", "wds layout", "wds shard",
    }  # fmt: skip
    assert cache_main(["verify", str(damage_cache)]) == 0
    assert "note:" not in capsys.readouterr().err  # every file is digested: nothing to note


def test_the_schema_validates_a_cache_with_plain_jsonschema(damage_cache):
    """As another team would: the shipped schema file, the stock validator, no project code."""
    schema_path = (
        Path(__import__("sak.pipeline", fromlist=["x"]).__file__).parent / "schema/cache-v1.schema.json"
    )
    schema = json.loads(schema_path.read_text())
    assert schema == generate_schema()
    jsonschema.validate(json.loads((damage_cache / "cache.json").read_text()), schema)
    journal = {"$ref": "#/$defs/ShardRecord", "$defs": schema["$defs"]}
    manifests = sorted(damage_cache.glob("teachers/*/manifest.json"))
    assert len(manifests) == 2
    for path in manifests:
        jsonschema.validate(json.loads(path.read_text()), schema)
        for line in (path.parent / "shards.jsonl").read_text().splitlines():
            jsonschema.validate(json.loads(line), journal)


def test_one_flipped_byte_in_any_file_fails_verify_and_never_trains_silently_wrong(
    damage_cache, tmp_path, capsys
):
    code, clean_losses, err = _train(damage_cache, tmp_path / "clean", capsys)
    assert code == 0, err
    files = _files(damage_cache)
    assert len(files) >= 25
    outcomes, failures, table = {}, [], []
    for i, rel in enumerate(files):
        copy = Path(shutil.copytree(damage_cache, tmp_path / f"c{i}"))
        data = bytearray((copy / rel).read_bytes())
        data[len(data) // 2] ^= 0xFF
        (copy / rel).write_bytes(bytes(data))
        name = rel.split("/", 2)[-1] if rel.startswith("teachers/") else rel  # the store names it this way

        capsys.readouterr()
        code = cache_main(["verify", str(copy)])
        out = capsys.readouterr()
        lines = [line for line in (out.out + out.err).splitlines() if name in line]
        if code == 0 or not lines:
            failures.append(f"verify: {rel}: exit {code}, no line names it:\n{out.out}{out.err}")

        code, losses, err = _train(copy, tmp_path / f"run{i}", capsys)
        err_lines = [line for line in err.splitlines() if line.startswith("sak-train: error:")]  # not logs
        if code == 0:
            outcome = "trained"
            if losses != clean_losses:
                failures.append(f"train: {rel}: trained, but the losses differ from the clean cache's")
        elif code == 2 and len(err_lines) == 1 and name in err_lines[0] and "Traceback" not in err:
            outcome = "stopped"
        else:
            outcome = "bad"
            failures.append(f"train: {rel}: exit {code}, stderr: {err!r}")
        outcomes.setdefault(_kind(rel), set()).add(outcome)
        table.append(f"{rel:<60} {_kind(rel):<15} verify names it: {bool(lines)}  train: {outcome}")
        shutil.rmtree(copy)
        shutil.rmtree(tmp_path / f"run{i}", ignore_errors=True)
    assert not failures, "\n".join(failures + table)
    if os.environ.get("SAK_SHOW_FLIPS"):  # the per-file table: SAK_SHOW_FLIPS=1 pytest -s ...
        with capsys.disabled():
            print("\n" + "\n".join(table))
    # files training reads stop it; the journal and statistics are extraction's own: training goes on
    for kind in ("cache manifest", "views table", "image index", "image tar", "zarr shard", "wds shard",
                 "zarr metadata", "store manifest"):  # fmt: skip
        assert outcomes[kind] == {"stopped"}, (kind, outcomes[kind])
    assert outcomes["shard journal"] == outcomes["statistics"] == {"trained"}
