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


def _forge_real_weights(cache_dir: Path, edit_identity: bool) -> None:
    """What an attacker does: claim hub weights in a random-init store, every digest recomputed."""
    import dataclasses

    from sak.pipeline.base.provenance import sha256_file
    from sak.pipeline.base.typed_json import from_json
    from sak.pipeline.format.documents import write_cache, write_store_manifest
    from sak.pipeline.format.records import StoreManifest, WeightsRecord

    cache = read_cache(cache_dir)
    stores = {}
    for fp, entry in cache.stores.items():
        store = cache_dir / entry.path
        m = from_json(StoreManifest, read_json(store / "manifest.json"))  # read unchecked, as an editor would
        real = WeightsRecord(source="pretrained", id=f"timm:{m.teacher.timm_name}.x", random_init=False)
        identity = dataclasses.replace(m.identity, weights=real.id) if edit_identity else m.identity
        write_store_manifest(
            store, dataclasses.replace(m, weights=real, random_init=False, identity=identity)
        )
        digest = sha256_file(store / "manifest.json")
        stores[fp] = dataclasses.replace(entry, random_init=False, manifest_sha256=digest)
    write_cache(cache_dir, dataclasses.replace(cache, stores=stores))


@pytest.mark.parametrize("edit_identity", [True, False], ids=["identity-edited", "identity-kept"])
def test_a_manifest_forged_to_claim_real_weights_fails_verify_and_the_loader(tmp_path, edit_identity):
    from sak.pipeline.inspection.verify import verify_cache
    from sak.student.data.opening import open_cache

    cache = Path(shutil.copytree(FIXTURE, tmp_path / "cache"))
    assert not verify_cache(cache)
    _forge_real_weights(cache, edit_identity)
    problems = verify_cache(cache)
    want = "is not its identity's" if edit_identity else "are not the identity's"
    assert problems and all(want in p for p in problems), problems
    with pytest.raises(SakError, match=want):
        open_cache(cache)


def test_a_zarr_json_with_a_forged_huge_shape_is_refused_by_the_loader(tmp_path):
    import json

    from sak.student.data.opening import open_cache

    cache = Path(shutil.copytree(FIXTURE, tmp_path / "cache"))
    open_cache(cache)
    entry = next(e for e in read_cache(cache).stores.values() if e.format == "zarr")
    meta_path = cache / entry.path / "levels" / "0" / "zarr.json"
    meta = json.loads(meta_path.read_text())
    meta["shape"] = [4_000_000_000, *meta["shape"][1:]]
    meta_path.write_text(json.dumps(meta))  # the fixture records no digest for it: nothing else notices
    with pytest.raises(SakError, match="zarr.json says shape \\[4000000000"):
        open_cache(cache)
