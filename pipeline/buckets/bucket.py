"""Cache locations: a local folder, or an object-store URL (s3://bucket/prefix, gs://bucket/prefix).

A local cache is read and written in place exactly as before (atomic rename, fsync). A URL cache is worked
on through a node-local staging folder that mirrors the bucket (`stage_dir`): every process writes a file
there first, then uploads it as ONE object (a single PUT or a multipart upload: object stores have no
rename) and checks the uploaded object against the local bytes before anything records it as done.
Readers fetch the objects they need into the staging folder (or `--local-cache DIR`) once.

Credentials and endpoints come only from the libraries' standard environment (AWS_ACCESS_KEY_ID,
AWS_SECRET_ACCESS_KEY, AWS_ENDPOINT_URL, GOOGLE_APPLICATION_CREDENTIALS): nothing here takes or records them.
"""

from __future__ import annotations

import hashlib
import json
import os
import socket
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path

from sak.pipeline.base.errors import SakError

URL_SCHEMES = ("s3://", "gs://", "gcs://")
STAGE_ENV = "SAK_STAGE_DIR"  # where node-local mirrors of URL caches live (default ~/.cache/sak/stage)


def is_url(location: str | os.PathLike) -> bool:
    return str(location).startswith(URL_SCHEMES)


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


def _sha256_path(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


@dataclass
class Bucket:
    """One cache (or a prefix of caches) in an object store, through fsspec."""

    url: str

    def __post_init__(self) -> None:
        import fsspec

        self.url = self.url.rstrip("/")
        try:
            self.fs, self.root = fsspec.core.url_to_fs(self.url)
        except ImportError as e:
            extra = "gs" if self.url.startswith(("gs://", "gcs://")) else "s3"
            raise SakError(
                f"{self.url}: the filesystem library is not installed ({e.name}); pip install 'sak-cache[{extra}]'"
            ) from e

    def key(self, rel: str) -> str:
        return f"{self.root}/{rel}" if rel else self.root

    def sub(self, rel: str) -> Bucket:
        return Bucket(f"{self.url}/{rel}")

    def exists(self, rel: str) -> bool:
        return self.fs.exists(self.key(rel))

    def read_bytes(self, rel: str) -> bytes:
        try:
            return self.fs.cat_file(self.key(rel))
        except FileNotFoundError as e:
            raise SakError(f"{self.url}/{rel} does not exist") from e

    def listing(self, rel: str = "") -> dict[str, int]:
        """Every object under rel: path relative to this bucket's root -> size in bytes."""
        try:
            found = self.fs.find(self.key(rel), detail=True)
        except FileNotFoundError:
            return {}
        self.fs.invalidate_cache()
        n = len(self.root) + 1
        return {k[n:]: int(v.get("size") or 0) for k, v in found.items() if v.get("type") != "directory"}

    def put_whole(self, local: Path, rel: str) -> str:
        """Upload one file as one object and check it landed intact; returns its sha256."""
        digest = _sha256_path(local)
        self.fs.put_file(str(local), self.key(rel))
        self.fs.invalidate_cache()
        size = self.fs.info(self.key(rel)).get("size")
        if size != local.stat().st_size or self._sha256(rel) != digest:
            raise SakError(f"{self.url}/{rel}: the uploaded object does not match the local file; run again")
        return digest

    def _sha256(self, rel: str) -> str:
        """The sha256 of an object as stored, read back in 8 MB ranges."""
        h = hashlib.sha256()
        with self.fs.open(self.key(rel), "rb", block_size=8 << 20) as f:
            for block in iter(lambda: f.read(8 << 20), b""):
                h.update(block)
        return h.hexdigest()

    def get(self, rel: str, local: Path) -> Path:
        """Download one object into local (whole: a temp name renamed into place)."""
        local.parent.mkdir(parents=True, exist_ok=True)
        tmp = local.with_name(f"{local.name}.part-{os.getpid()}")
        try:
            self.fs.get_file(self.key(rel), str(tmp))
            os.replace(tmp, local)
        except FileNotFoundError as e:
            raise SakError(f"{self.url}/{rel} does not exist; run `sak-cache verify {self.url}`") from e
        finally:
            tmp.unlink(missing_ok=True)
        return local

    def delete(self, rel: str) -> None:
        try:
            self.fs.rm_file(self.key(rel))
        except FileNotFoundError:
            pass


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
    lock); a bucket that cannot be listed is refused in one line."""
    import shutil

    try:
        Bucket(url).listing()
    except (OSError, PermissionError) as e:
        raise SakError(
            f"cannot list {url} ({type(e).__name__}: {e}); check the bucket name and the standard credentials "
            f"environment (AWS_*/AWS_ENDPOINT_URL, GOOGLE_APPLICATION_CREDENTIALS)"
        ) from e
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
        if is_bulk(rel) or ".part-" in rel or rel.endswith(".tmp") or rel == LOCK_OBJECT:
            continue
        if (
            rel in remote
            and remote[rel] == path.stat().st_size
            and bucket.read_bytes(rel) == path.read_bytes()
        ):
            continue
        bucket.put_whole(path, rel)


# --------------------------------------------------------------------------------------------- the lock

LOCK_OBJECT = ".sak-lock"
LOCK_TTL_S = 6 * 3600  # a lock object older than this (its holder stopped refreshing it) is stale


def _dead_here(holder: dict) -> bool:
    """The holder ran on this host and its process is gone (e.g. kill -9): the lock is stale at once."""
    if holder.get("host") != socket.gethostname() or not isinstance(holder.get("pid"), int):
        return False
    try:
        os.kill(holder["pid"], 0)  # signal 0: only asks whether the process exists
    except ProcessLookupError:
        return True
    except PermissionError:
        return False
    return False


class BucketLock:
    """One writer per URL cache: a lock object naming its owner and an expiry.

    Created with a conditional PUT (If-None-Match: *) where the store supports it (AWS S3 since 2024,
    GCS via gcsfs, MinIO, moto), so two writers cannot both create it. A lock whose expiry has passed (its
    holder died without releasing it) or whose holder process is gone from this host (kill -9) is taken
    over with a log line. While held, a background thread pushes the expiry forward every ttl/4.
    """

    def __init__(self, bucket: Bucket, ttl_s: int = LOCK_TTL_S) -> None:
        self.bucket, self.ttl_s, self.held = bucket, ttl_s, False
        self._stop = threading.Event()
        self.owner = f"{socket.gethostname()}:{os.getpid()}:{time.time_ns()}"

    def _body(self) -> bytes:
        now = time.time()
        return json.dumps(
            {
                "owner": self.owner,
                "host": socket.gethostname(),
                "pid": os.getpid(),
                "started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(now)),
                "expires": now + self.ttl_s,
                "command": " ".join(os.path.basename(a) if i == 0 else a for i, a in enumerate(sys.argv))[
                    :500
                ],
            }
        ).encode()

    def _holder(self) -> dict:
        try:
            return json.loads(self.bucket.read_bytes(LOCK_OBJECT))
        except (SakError, ValueError):
            return {}

    def _create(self) -> bool:
        key = self.bucket.key(LOCK_OBJECT)
        try:
            self.bucket.fs.pipe_file(key, self._body(), mode="create")
        except FileExistsError:
            return False
        except TypeError:  # a filesystem without conditional create: best effort (documented in README)
            if self.bucket.exists(LOCK_OBJECT):
                return False
            self.bucket.fs.pipe_file(key, self._body())
        self.bucket.fs.invalidate_cache()
        return self._holder().get("owner") == self.owner

    def acquire(self) -> BucketLock:
        from sak.pipeline.extraction.runtime import log

        if not self._create():
            h = self._holder()
            if h and h.get("expires", 0) > time.time() and not _dead_here(h):
                raise SakError(
                    f"{self.bucket.url} is being written by another sak-cache run (pid {h.get('pid')} on "
                    f"{h.get('host')}, started {h.get('started')}); wait for it to finish or stop it, then run "
                    f"again (a lock left by a dead run expires {LOCK_TTL_S // 3600} h after it was taken)"
                )
            log.warning(f"taking over an expired lock on {self.bucket.url} (held by {h.get('owner')})")
            self.bucket.delete(LOCK_OBJECT)
            if not self._create():
                raise SakError(f"{self.bucket.url}: another run took the lock at the same moment; run again")
        self.held = True
        if self.ttl_s > 0:
            self._stop.clear()
            threading.Thread(target=self._keep_fresh, daemon=True, name="sak-lock-refresh").start()
        return self

    def _keep_fresh(self) -> None:
        while not self._stop.wait(self.ttl_s / 4):
            try:
                if self._holder().get("owner") == self.owner:
                    self.bucket.fs.pipe_file(self.bucket.key(LOCK_OBJECT), self._body())
            except OSError:
                pass  # retried at the next period; the expiry still has 3/4 of its time

    def release(self) -> None:
        self._stop.set()
        if self.held and self._holder().get("owner") == self.owner:
            self.bucket.delete(LOCK_OBJECT)
        self.held = False

    def __enter__(self) -> BucketLock:
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()
