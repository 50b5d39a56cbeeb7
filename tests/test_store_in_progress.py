"""A store a live `sak-cache run` is adding (its journal growing, its manifest not written yet, the cache's
lock held) is "in progress", not damage: `verify` and `inspect` say who holds it and pass on the rest, the
trainer leaves it out with one warning, and fails in one line only when --teachers asks for it. The same
state left by a run that died (nobody holds the lock) is still reported by `verify`.

The checks run in the middle of a real run: a hook on the driver's journal, after the first shard."""

from __future__ import annotations

import json
import os
import shutil
import socket
from pathlib import Path

import jsonschema
import pytest

import sak.pipeline.extraction.driver as driver
from sak.cli.cache import main as cache_main
from sak.cli.train import main as train_main
from sak.pipeline.format.documents import read_cache
from sak.student.data.opening import open_cache

REPO = Path(__file__).resolve().parents[1]
HOLDER = f"held by {socket.gethostname()} pid {os.getpid()} since "


def _schema_valid(data: dict, name: str) -> dict:
    jsonschema.validate(
        data, json.loads((REPO / "pipeline" / "schema" / f"{name}-v1.schema.json").read_text())
    )
    return data


def _checks_mid_run(cache: Path, tmp_path: Path, capsys, caplog) -> dict:
    """What verify, inspect and the trainer say while the run adds the int8 clip_tiny store."""
    seen: dict = {}
    capsys.readouterr()
    seen["verify"] = (cache_main(["verify", str(cache)]), capsys.readouterr())
    seen["verify_json"] = (cache_main(["verify", str(cache), "--json"]), json.loads(capsys.readouterr().out))
    seen["inspect"] = (cache_main(["inspect", str(cache)]), capsys.readouterr())
    seen["inspect_json"] = (
        cache_main(["inspect", str(cache), "--json"]),
        json.loads(capsys.readouterr().out),
    )
    caplog.clear()
    with caplog.at_level("WARNING", logger="sak"):
        seen["stores"] = [s.teacher for s in open_cache(cache).stores]
    seen["warnings"] = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    busy = next(fp for fp, e in read_cache(cache).stores.items() if not e.complete)
    seen["busy"] = busy
    args = ["stage1", "--cache", str(cache), "--out", str(tmp_path / "run"), "--teachers", busy,
            "--student", "micro", "--steps", "1", "--device", "cpu", "--num-workers", "0"]  # fmt: skip
    seen["train"] = (train_main(args), capsys.readouterr())
    seen["dead"] = Path(
        shutil.copytree(cache, tmp_path / "dead")
    )  # as a killed run leaves it: nobody holds it
    seen["dead_verify"] = (cache_main(["verify", str(seen["dead"])]), capsys.readouterr())
    return seen


@pytest.fixture
def mid_run(tiny_caches, tmp_path, monkeypatch, capsys, caplog):
    """A real `sak-cache run` adding an int8 clip_tiny store to a copy of the tiny cache, inspected by
    `_checks_mid_run` once its first shard is journaled; returns (cache, what was seen)."""
    cache = tiny_caches.copy(tmp_path / "cache")
    seen: dict = {}
    real = driver.journal_shards

    def journal_then_check(stores, records):
        real(stores, records)
        if not seen:
            seen.update(_checks_mid_run(cache, tmp_path, capsys, caplog))

    monkeypatch.setattr(driver, "journal_shards", journal_then_check)
    run = ["run", "--out", str(cache), "--teachers", "clip_tiny", "--codec", "int8", "--size", "64",
           "--views-per-image", "2", "--no-progress"]  # fmt: skip
    assert cache_main(run) == 0
    assert seen, "no shard was journaled"
    return cache, seen


def test_a_store_being_added_is_in_progress_not_damage(mid_run, capsys):
    cache, seen = mid_run
    busy = seen["busy"]
    rc, out = seen["verify"]
    assert rc == 0, out
    assert f"note: store clip_tiny ({busy}): in progress ({HOLDER}" in out.err
    assert out.out.strip() == f"{cache}: OK (1 store(s) in progress, not verified)"
    rc, report = seen["verify_json"]
    assert rc == 0 and _schema_valid(report, "verify")["ok"] and report["problems"] == []
    assert len(report["in_progress"]) == 1 and HOLDER in report["in_progress"][0]
    rc, out = seen["inspect"]
    assert rc == 0 and f"clip_tiny    {busy:<26} in progress ({HOLDER}" in out.out, out
    rc, report = seen["inspect_json"]
    stores = {s["fingerprint"]: s for s in _schema_valid(report, "inspect")["stores"]}
    assert stores[busy]["in_progress"].startswith(HOLDER) and stores[busy]["shards_done"] >= 1
    assert all("in_progress" not in s for fp, s in stores.items() if fp != busy)
    # the trainer: the store is left out with one warning naming the holder; asked for, one line
    assert sorted(seen["stores"]) == ["clip_tiny", "dinov2_tiny", "sam_tiny"]
    assert len(seen["warnings"]) == 1 and busy in seen["warnings"][0] and HOLDER in seen["warnings"][0]
    rc, out = seen["train"]
    errors = [ln for ln in out.err.splitlines() if ln.startswith("sak-train: error:")]
    assert rc == 2 and len(errors) == 1 and "Traceback" not in out.err, out.err
    assert f"store clip_tiny ({busy})" in errors[0] and "being extracted right now" in errors[0]
    assert HOLDER in errors[0] and "leave clip_tiny out of --teachers" in errors[0]
    # the same files left by a run that died (nobody holds the lock): still a finding
    rc, out = seen["dead_verify"]
    assert rc == 1 and "in progress" not in out.out + out.err
    assert f"manifest teachers/{busy}/manifest.json is missing" in out.out
    # once the run has ended, the store verifies like any other
    capsys.readouterr()
    assert cache_main(["verify", str(cache)]) == 0
    assert capsys.readouterr().out.strip() == f"{cache}: OK"
    assert read_cache(cache).stores[busy].complete
