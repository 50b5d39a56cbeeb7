"""What scripts lean on: `--version` on both tools, `python -m sak`."""

from __future__ import annotations

import subprocess
import sys
from importlib import metadata
from pathlib import Path

import pytest

from sak.cli.cache import main as cache_main
from sak.cli.train import main as train_main
from sak.pipeline.base import provenance

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
