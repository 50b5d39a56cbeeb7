"""Cache locations: a local folder, or an object-store URL (s3://bucket/prefix, gs://bucket/prefix), and
`Bucket`, one cache (or a prefix of caches) in an object store through fsspec.

A local cache is read and written in place (atomic rename, fsync). Object stores have no rename: a file
is uploaded as ONE object (a single PUT or a multipart upload) and the uploaded object is checked against
the local bytes before anything records it as done (`Bucket.put_whole`). How processes work on a URL
cache through local mirrors: mirror.py.

Credentials and endpoints come only from the libraries' standard environment (AWS_ACCESS_KEY_ID,
AWS_SECRET_ACCESS_KEY, AWS_ENDPOINT_URL, GOOGLE_APPLICATION_CREDENTIALS): nothing here takes or records them.
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass
from pathlib import Path

from sak.pipeline.base.errors import SakError
from sak.pipeline.buckets.failures import gcs_credentials, is_gcs, storage_errors

URL_SCHEMES = ("s3://", "gs://", "gcs://")


def is_url(location: str | os.PathLike) -> bool:
    return str(location).startswith(URL_SCHEMES)


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
            if is_gcs(self.url):
                gcs_credentials(self.url)  # before gcsfs tries its fallbacks (about a minute): failures.py
            with storage_errors(self.url, "connecting"):
                self.fs, self.root = fsspec.core.url_to_fs(self.url)
        except ImportError as e:
            extra = "gs" if is_gcs(self.url) else "s3"
            raise SakError(
                f"{self.url}: the filesystem library is not installed ({e.name}); pip install 'sak-cache[{extra}]'"
            ) from e

    def key(self, rel: str) -> str:
        return f"{self.root}/{rel}" if rel else self.root

    def sub(self, rel: str) -> Bucket:
        return Bucket(f"{self.url}/{rel}")

    def exists(self, rel: str) -> bool:
        with storage_errors(self.url, f"looking for {rel}"):
            return self.fs.exists(self.key(rel))

    def read_bytes(self, rel: str) -> bytes:
        try:
            with storage_errors(self.url, f"reading {rel}"):
                return self.fs.cat_file(self.key(rel))
        except FileNotFoundError as e:
            raise SakError(f"{self.url}/{rel} does not exist") from e

    def listing(self, rel: str = "") -> dict[str, int]:
        """Every object under rel: path relative to this bucket's root -> size in bytes."""
        try:
            with storage_errors(self.url, "listing"):
                found = self.fs.find(self.key(rel), detail=True)
        except FileNotFoundError:
            return {}
        self.fs.invalidate_cache()
        n = len(self.root) + 1
        return {k[n:]: int(v.get("size") or 0) for k, v in found.items() if v.get("type") != "directory"}

    def put_whole(self, local: Path, rel: str) -> str:
        """Upload one file as one object and check it landed intact; returns its sha256."""
        digest = _sha256_path(local)
        with storage_errors(self.url, f"uploading {rel}"):
            self.fs.put_file(str(local), self.key(rel))
            self.fs.invalidate_cache()
            size = self.fs.info(self.key(rel)).get("size")
            same = size == local.stat().st_size and self._sha256(rel) == digest
        if not same:
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
            with storage_errors(self.url, f"downloading {rel}"):
                self.fs.get_file(self.key(rel), str(tmp))
            os.replace(tmp, local)
        except FileNotFoundError as e:
            raise SakError(f"{self.url}/{rel} does not exist; run `sak-cache verify {self.url}`") from e
        finally:
            tmp.unlink(missing_ok=True)
        return local

    def delete(self, rel: str) -> None:
        try:
            with storage_errors(self.url, f"deleting {rel}"):
                self.fs.rm_file(self.key(rel))
        except FileNotFoundError:
            pass


# --------------------------------------------------------------------------------------------- the lock
