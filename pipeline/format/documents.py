"""The format's JSON documents read and written: cache.json, each store's manifest.json, and the stage-2
cache.json. Every read checks the document's `kind` and schema version, then validates it whole against
the shipped schema (schema.py) and names the file and the field path of the first problem.

cache.json also records `content_sha256`, the sha256 of its own canonical JSON (keys sorted, separators
"," and ":", this field left out), so a changed cache.json shows too. Caches written before `files` and
`content_sha256` existed are still v1 (every other byte is the same): they read, and `verify` checks what
they record and lists the files they name but do not digest.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from pathlib import Path
from typing import Any

from sak.pipeline.base.errors import SakError
from sak.pipeline.base.lock import LockHolder, lock_holder
from sak.pipeline.base.provenance import SCHEMA_VERSION, read_json, write_json_atomic
from sak.pipeline.base.typed_json import to_json, type_hints
from sak.pipeline.format.layout import CACHE_FILE, STORE_MANIFEST
from sak.pipeline.format.manifest import store_fingerprint
from sak.pipeline.format.records import CacheManifest, Stage2Cache, StoreManifest
from sak.pipeline.format.schema import load

STAGE2_KIND = "sak-stage2-cache"


def canonical_sha256(data: dict) -> str:
    text = json.dumps(data, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    return hashlib.sha256(text.encode()).hexdigest()


def is_stage2_cache(root: Path) -> bool:
    """Whether the cache.json in `root` is a stage-2 target cache's (False when unreadable: read_cache
    then names the problem)."""
    try:
        return json.loads((Path(root) / CACHE_FILE).read_text()).get("kind") == STAGE2_KIND
    except (OSError, ValueError, AttributeError, RecursionError):
        return False


def _read_document(path: Path, cls: type, kind: str) -> Any:
    data = read_json(path)
    if not isinstance(data, dict):
        raise SakError(f"{path}: expected a JSON object, found {type(data).__name__}; the file is damaged")
    if data.get("kind") != kind:
        raise SakError(
            f"{path}: field 'kind' is {data.get('kind')!r}, expected {kind!r}; not a SAK cache file"
        )
    if "schema_version" in type_hints(cls) and data.get("schema_version") != SCHEMA_VERSION:
        raise SakError(
            f"{path}: field 'schema_version' is {data.get('schema_version')!r}, this code reads version "
            f"{SCHEMA_VERSION}; use a sak-cache release that matches the cache"
        )
    return load(cls, data, path)


def read_cache(cache_dir: str | Path) -> CacheManifest:
    path = Path(cache_dir) / CACHE_FILE
    if not path.exists():
        raise SakError(f"{cache_dir} is not a SAK cache (no {CACHE_FILE}); create one with `sak-cache run`")
    return _read_document(path, CacheManifest, "sak-cache")


def stores_in_progress(cache_dir: str | Path, cache: CacheManifest) -> dict[str, LockHolder]:
    """The stores a live `sak-cache run` is adding or finishing now (fingerprint -> who holds the cache's
    lock): listed incomplete while the lock is held. Their manifest is not final (or not written yet):
    an extraction in progress, not damage."""
    pending = [fp for fp, entry in cache.stores.items() if not entry.complete]
    holder = lock_holder(cache_dir) if pending else None
    return {fp: holder for fp in pending} if holder is not None else {}


def cache_content_digest(cache: CacheManifest) -> str:
    """`content_sha256` of a cache.json: the canonical JSON of the document without that field."""
    return canonical_sha256(to_json(dataclasses.replace(cache, content_sha256=None)))


def write_cache(cache_dir: str | Path, cache: CacheManifest) -> CacheManifest:
    """Write cache.json with its content digest; returns what was written."""
    cache = dataclasses.replace(cache, content_sha256=None)
    cache = dataclasses.replace(cache, content_sha256=cache_content_digest(cache))
    write_json_atomic(Path(cache_dir) / CACHE_FILE, to_json(cache))
    return cache


def read_store_manifest(store_dir: str | Path) -> StoreManifest:
    """A store's manifest, its claims checked against its identity: the fingerprint is recomputed, and
    the weights it names (and whether they are random) must be the ones the fingerprint was made of."""
    path = Path(store_dir) / STORE_MANIFEST
    m = _read_document(path, StoreManifest, "sak-teacher-store")
    recomputed = store_fingerprint(m.identity)
    if recomputed != m.fingerprint:
        raise SakError(
            f"{path}: fingerprint {m.fingerprint} is not its identity's ({recomputed}); the manifest was "
            f"edited: re-extract the store"
        )
    random = m.identity.weights.startswith("random init")
    if (
        m.weights.id != m.identity.weights
        or {m.random_init, m.weights.random_init} != {random}
        or ((m.weights.source == "random") != random)
    ):
        raise SakError(
            f"{path}: weights {m.weights.source} {m.weights.id!r} (random_init {m.random_init}) are not the "
            f"identity's {m.identity.weights!r}; the manifest was edited: re-extract the store"
        )
    return m


def write_store_manifest(store_dir: str | Path, manifest: StoreManifest) -> None:
    write_json_atomic(Path(store_dir) / STORE_MANIFEST, to_json(manifest))


def read_stage2_cache(path: str | Path) -> Stage2Cache:
    return _read_document(Path(path), Stage2Cache, STAGE2_KIND)


def write_stage2_cache(path: str | Path, cache: Stage2Cache) -> None:
    write_json_atomic(Path(path), to_json(cache))
