"""Node-local mirrors of a bucket cache, and the whole-object transfers between them and the bucket.

Every process works on a URL cache through a local staging folder that mirrors the bucket (`stage_dir`,
one per role: the driver, each Ray node, a reader), so processes of different nodes never share files
even when the nodes share a machine. Writers upload each file as ONE object, checked (`push`, through
`Bucket.put_whole`); readers fetch the objects they need into the mirror (or `--local-cache DIR`) once.
Small metadata objects are mirrored eagerly (`pull(bulk=False)`), bulk ones (image tars, shard files)
on demand.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

from sak.pipeline.base.lock import LOCK_FILE
from sak.pipeline.buckets.access import check_access
from sak.pipeline.buckets.bucket import Bucket

STAGE_ENV = "SAK_STAGE_DIR"  # where node-local mirrors of URL caches live (default ~/.cache/sak/stage)


def is_bulk(rel: str) -> bool:
    """Image tars, WebDataset shards and Zarr chunks (fetched on demand); the rest is small metadata. A pca
    store's basis (basis/: k x C float32 a level, needed whole before any sample decodes) counts as metadata,
    its Zarr chunks included, so every mirror (driver, node, reader) holds it as soon as the bucket does."""
    if "/basis/" in f"/{rel}":
        return False
    return rel.endswith(".tar") or "/c/" in f"/{rel}"


def stage_dir(url: str, role: str = "driver") -> Path:
    """The local mirror of a URL cache for one role: "driver", or a Ray node (`node_role()`), so that
    processes of different nodes never share files even when the nodes share a machine."""
    base = Path(os.environ.get(STAGE_ENV) or Path.home() / ".cache" / "sak" / "stage").expanduser()
    return base / f"{hashlib.sha256(url.rstrip('/').encode()).hexdigest()[:16]}-{role}"


def node_role() -> str:
    """This Ray node's mirror role (inside a Ray task or actor)."""
    import ray

    return f"node-{ray.get_runtime_context().get_node_id()[:12]}"


def node_mirror(cache_url: str, rels: list[str], metadata: bool = False) -> Path:
    """In a Ray task or actor: this node's mirror of the cache, with these objects present (fetched when
    missing), and every small metadata object too when asked. Returns the mirror's root."""
    local = stage_dir(cache_url, node_role())
    bucket = Bucket(cache_url)
    if metadata:
        pull(bucket, local, bulk=False)
    for rel in rels:
        if not (local / rel).is_file():
            bucket.get(rel, local / rel)
    return local


def pull(bucket: Bucket, local: Path, *, bulk: bool, under: str = "") -> dict[str, int]:
    """Mirror the bucket's objects (all, or only the small metadata ones) into local; objects already there
    with the right size are kept. Returns the listing."""
    listing = bucket.listing(under)
    for rel, size in listing.items():
        if not bulk and is_bulk(rel):
            continue
        dst = local / rel
        if not dst.is_file() or dst.stat().st_size != size:
            bucket.get(rel, dst)
    return listing


def metadata_mirror(url: str) -> Path:
    """A reader's local copy of a URL cache's small metadata objects (cache.json, manifests, tables)."""
    local = stage_dir(url, "reader")
    pull(Bucket(url), local, bulk=False)
    return local


def fresh_mirror(url: str) -> Path:
    """The driver's mirror of a URL cache, emptied (a writer fills it from the bucket once it holds the
    lock); a bucket this process cannot list and write is refused in one line first (access.py)."""
    import shutil

    check_access(url, write=True)
    out = stage_dir(url)
    shutil.rmtree(out, ignore_errors=True)
    return out


def push(bucket: Bucket, local: Path, rels: list[str]) -> dict[str, str]:
    """Upload these files of the local mirror, each whole and checked; returns rel -> sha256."""
    return {rel: bucket.put_whole(local / rel, rel) for rel in rels}


def push_metadata(bucket: Bucket, local: Path) -> None:
    """Upload every small (non-bulk) file of the local mirror whose object is missing or differs in size
    or content; metadata files are small, so content is compared directly."""
    remote = bucket.listing()
    for path in sorted(p for p in local.rglob("*") if p.is_file()):
        rel = path.relative_to(local).as_posix()
        if is_bulk(rel) or ".part-" in rel or rel.endswith(".tmp") or rel == LOCK_FILE:
            continue
        if (
            rel in remote
            and remote[rel] == path.stat().st_size
            and bucket.read_bytes(rel) == path.read_bytes()
        ):
            continue
        bucket.put_whole(path, rel)
