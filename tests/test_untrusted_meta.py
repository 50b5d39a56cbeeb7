"""Cache and run metadata are untrusted (issue 21, item 7): forged documents end in one SakError."""

import shutil
from pathlib import Path

import pytest

from sak.pipeline.base.errors import SakError
from sak.pipeline.base.provenance import read_json
from sak.pipeline.format.documents import read_cache

FIXTURE = Path(__file__).parent / "fixtures" / "v1_cache"


def test_json_nested_200000_deep_is_one_error_not_a_recursion(tmp_path):
    cache = Path(shutil.copytree(FIXTURE, tmp_path / "cache"))
    (cache / "cache.json").write_text("[" * 200_000 + "]" * 200_000)
    with pytest.raises(SakError, match="nests deeper than"):
        read_cache(cache)


def test_json_nested_past_the_bound_but_parseable_is_refused(tmp_path):
    path = tmp_path / "doc.json"
    path.write_text('{"a":' * 100 + "1" + "}" * 100)
    with pytest.raises(SakError, match="nests deeper than 64"):
        read_json(path)
    path.write_text('{"a":' * 10 + "1" + "}" * 10)
    assert read_json(path)["a"]


def test_an_oversized_json_is_refused_before_parsing(tmp_path, monkeypatch):
    from sak.pipeline.base import provenance

    monkeypatch.setattr(provenance, "MAX_JSON_BYTES", 1000)
    path = tmp_path / "big.json"
    path.write_text('{"a": "' + "x" * 2000 + '"}')
    with pytest.raises(SakError, match="is over"):
        read_json(path)
