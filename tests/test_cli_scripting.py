"""What scripts lean on: `--version` on both tools, `python -m sak`."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from importlib import metadata
from pathlib import Path

import jsonschema
import pytest

from sak.cli.cache import main as cache_main
from sak.cli.train import main as train_main
from sak.pipeline.base import provenance
from sak.pipeline.base.typed_json import schema_text
from sak.pipeline.inspection.reports import REPORT_SCHEMAS
from sak.pipeline.inspection.reports import main as reports_main

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture
def fresh_version(monkeypatch):
    monkeypatch.delenv("SAK_CODE_VERSION", raising=False)
    provenance.code_version.cache_clear()
    yield monkeypatch
    provenance.code_version.cache_clear()


@pytest.mark.parametrize(("main", "prog"), [(cache_main, "sak-cache"), (train_main, "sak-train")])
def test_version_names_the_package_version_and_the_commit(main, prog, fresh_version, capsys):
    commit = subprocess.run(
        ["git", "-C", str(REPO), "rev-parse", "--short=10", "HEAD"], capture_output=True, text=True
    ).stdout.strip()
    assert main(["--version"]) == 0
    out = capsys.readouterr().out.strip()
    assert out.startswith(f"{prog} {metadata.version('sak-cache')} (commit ")
    assert commit and commit in out


def test_version_outside_a_checkout_says_unknown(fresh_version, capsys):
    fresh_version.setenv("SAK_CODE_VERSION", "0.1.0")  # a copy without .git, stamped with no commit
    assert cache_main(["--version"]) == 0
    assert capsys.readouterr().out.strip() == "sak-cache 0.1.0 (commit unknown)"


def _python_m_sak(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "sak", *args], capture_output=True, text=True, timeout=120, cwd=REPO
    )


def test_python_m_sak_dispatches_to_both_tools():
    cache = _python_m_sak("cache", "inspect", "--help")
    assert cache.returncode == 0 and "Describe a cache" in cache.stdout, cache.stderr[-2000:]
    train = _python_m_sak("train", "stage1", "--help")
    assert train.returncode == 0 and "--resume" in train.stdout, train.stderr[-2000:]


@pytest.mark.parametrize(("args", "rc"), [((), 2), (("--help",), 0), (("extract",), 2)])
def test_python_m_sak_usage_names_both_tools(args, rc):
    proc = _python_m_sak(*args)
    assert proc.returncode == rc
    text = proc.stdout + proc.stderr
    assert "python -m sak {cache,train}" in text and "sak-cache" in text and "sak-train" in text


V1_CACHE = REPO / "tests" / "fixtures" / "v1_cache"


def test_the_shipped_report_schemas_are_the_generated_ones():
    for family in REPORT_SCHEMAS.values():
        assert family.shipped_path().read_text() == schema_text(family.generate()), family.file
        jsonschema.Draft202012Validator.check_schema(family.shipped())
    assert reports_main(["--check"]) == 0


def _json_of(capsys, argv, rc=0) -> dict:
    assert cache_main(argv) == rc
    return json.loads(capsys.readouterr().out)


def _valid(data: dict, name: str) -> dict:
    schema = json.loads((REPO / "pipeline" / "schema" / f"{name}-v1.schema.json").read_text())
    jsonschema.validate(data, schema)  # stock jsonschema against the published file
    return data


def test_inspect_ls_verify_json_validate_against_their_schemas(tmp_path, capsys):
    cache = tmp_path / "caches" / "c1"
    shutil.copytree(V1_CACHE, cache)
    got = _valid(_json_of(capsys, ["inspect", str(cache), "--json"]), "inspect")
    assert got["num_views"] == 4 and {s["teacher"] for s in got["stores"]} == {"dinov2_tiny", "clip_tiny"}
    listed = _valid(_json_of(capsys, ["ls", str(tmp_path), "--json"]), "ls")
    assert [c["cache"] for c in listed["caches"]] == [str(cache)] and listed["caches"][0]["problems"] == []
    assert _valid(_json_of(capsys, ["verify", str(cache), "--json"]), "verify")["ok"] is True

    store = next((cache / "teachers").iterdir())
    victim = next(
        p for p in sorted(store.rglob("*")) if p.is_file() and p.stat().st_size > 64 and "levels" in str(p)
    )
    victim.write_bytes(b"\0" * victim.stat().st_size)  # damage one array chunk: verify fails, exit 1
    bad = _valid(_json_of(capsys, ["verify", str(cache), "--json"], rc=1), "verify")
    assert bad["ok"] is False and bad["problems"]


def test_each_store_records_its_actors_peak_host_memory(tiny_caches, capsys):
    """A real extraction (Ray, tiny teachers): the manifest's throughput holds the teacher actors' peak
    RSS (ru_maxrss), and inspect shows it, as text and as JSON."""
    cache = tiny_caches.get()
    got = _valid(_json_of(capsys, ["inspect", str(cache), "--json"]), "inspect")
    peaks = [s["actor_peak_rss_bytes"] for s in got["stores"]]
    assert peaks and all(p is not None and 50e6 < p < 64e9 for p in peaks), peaks  # a torch process: > 50 MB
    assert cache_main(["inspect", str(cache)]) == 0
    assert capsys.readouterr().out.count("peak host memory per teacher actor: ") == len(peaks)
