"""Can this process use a bucket cache: credentials, the bucket, permission, the endpoint. Every command
that takes a URL checks it before any work (`check_access`); each Ray node proves it can write the bucket
with its own credentials (`write_probe`, run by extraction/probe.py on every node)."""

from __future__ import annotations

import os
import uuid

from sak.pipeline.base.errors import SakError, one_line
from sak.pipeline.buckets.bucket import Bucket, is_url
from sak.pipeline.buckets.failures import emulator_host, is_gcs, storage_errors

PROBE_PREFIX = ".sak-access-probe-"


def _emulator_bucket(url: str, name: str) -> None:
    """One request (5 s at most) to the emulator for the bucket: gcsfs would retry a refused connection
    for about 30 s."""
    import urllib.error
    import urllib.request

    host = emulator_host()
    try:
        urllib.request.urlopen(f"{host}/storage/v1/b/{name}", timeout=5).close()
    except urllib.error.HTTPError as e:
        if e.code == 404:
            raise SakError(
                f"bucket {name} of {url} does not exist (on the emulator {host}); create it"
            ) from e
    except (urllib.error.URLError, OSError) as e:
        raise SakError(
            f"cannot reach the GCS emulator {host} for {url} ({one_line(e, 160)}); start it, or fix "
            f"STORAGE_EMULATOR_HOST"
        ) from e


def _endpoint_reachable(url: str) -> None:
    """An S3-compatible endpoint (AWS_ENDPOINT_URL) that refuses connections is said at once: s3fs and
    botocore would retry it for about 13 s."""
    import socket
    from urllib.parse import urlsplit

    endpoint = os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")
    if not endpoint:
        return
    parts = urlsplit(endpoint)
    port = parts.port or (443 if parts.scheme == "https" else 80)
    try:
        socket.create_connection((parts.hostname, port), timeout=5).close()
    except OSError as e:
        raise SakError(
            f"cannot reach the S3 endpoint {endpoint} for {url} ({one_line(e, 160)}); start it, or fix AWS_ENDPOINT_URL"
        ) from e


def check_access(url: str, write: bool = False) -> None:
    """Before any work on a URL cache: the credentials resolve, the bucket exists, its prefix can be listed,
    and (write) an object can be put under it, read back and deleted. Refuses in one line otherwise."""
    bucket = Bucket(url)  # gs://: credentials resolved first (gcs_credentials)
    name = bucket.root.split("/")[0]
    if is_gcs(url) and emulator_host():
        _emulator_bucket(url, name)
    elif not is_gcs(url):
        _endpoint_reachable(url)
    with storage_errors(url, "listing the bucket"):
        try:
            bucket.fs.ls(bucket.root)
        except FileNotFoundError:  # a new prefix (nothing under it yet), or no such bucket
            if not _bucket_exists(bucket.fs, name):
                endpoint = "" if is_gcs(url) else " (AWS_ENDPOINT_URL for a non-AWS endpoint)"
                raise SakError(
                    f"bucket {name} of {url} does not exist; create it or fix the URL{endpoint}"
                ) from None
    if write:
        problem = write_probe(url, "driver")
        if problem:
            raise SakError(problem)


def check_location(location: str | None, write: bool = False) -> None:
    """`check_access` for a URL cache; nothing to check for a local folder (or none given)."""
    if location and is_url(str(location)):
        check_access(str(location), write=write)


def _bucket_exists(fs, name: str) -> bool:
    """The bucket's own metadata, asked only to tell a missing bucket from an empty prefix: an identity
    allowed the objects but not the bucket's metadata (403) is given the benefit of the doubt."""
    try:
        fs.info(name)
    except FileNotFoundError:
        return False
    except PermissionError:
        return True
    return True


def write_probe(url: str, who: str) -> str | None:
    """Put a tiny object under url, read it back and delete it; None when that works, else the problem
    in words (one line, naming url). Runs on the driver and, in a Ray task, on every node."""
    rel = f"{PROBE_PREFIX}{who}-{uuid.uuid4().hex[:8]}"
    payload = f"sak access probe {who}".encode()
    try:
        bucket = Bucket(url)
        with storage_errors(url, "writing a probe object"):
            bucket.fs.pipe_file(bucket.key(rel), payload)
            try:
                back = bucket.fs.cat_file(bucket.key(rel))
            finally:
                bucket.fs.rm_file(bucket.key(rel))
    except SakError as e:
        return str(e)
    except FileNotFoundError as e:
        return f"cannot write under {url} ({one_line(e, 160)}); check that the bucket exists"
    if back != payload:
        return f"a probe object written under {url} read back different bytes"
    return None
