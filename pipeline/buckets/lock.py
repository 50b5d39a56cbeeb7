"""One writer per URL cache: a lock object in the bucket that names its owner and an expiry (the bucket
counterpart of base/lock.py's flock, under the same name, .sak-lock)."""

from __future__ import annotations

import json
import logging
import os
import socket
import sys
import threading
import time

from sak.pipeline.base.errors import SakError
from sak.pipeline.base.lock import LOCK_FILE
from sak.pipeline.buckets.bucket import Bucket
from sak.pipeline.buckets.failures import storage_errors

log = logging.getLogger("sak")
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
            return json.loads(self.bucket.read_bytes(LOCK_FILE))
        except (SakError, ValueError):
            return {}

    def _create(self) -> bool:
        key = self.bucket.key(LOCK_FILE)
        try:
            with storage_errors(self.bucket.url, "taking the lock"):
                self.bucket.fs.pipe_file(key, self._body(), mode="create")
        except FileExistsError:
            return False
        except TypeError:  # a filesystem without conditional create: best effort (documented in README)
            if self.bucket.exists(LOCK_FILE):
                return False
            with storage_errors(self.bucket.url, "taking the lock"):
                self.bucket.fs.pipe_file(key, self._body())
        self.bucket.fs.invalidate_cache()
        return self._holder().get("owner") == self.owner

    def acquire(self) -> BucketLock:
        if not self._create():
            h = self._holder()
            if h and h.get("expires", 0) > time.time() and not _dead_here(h):
                raise SakError(
                    f"{self.bucket.url} is being written by another sak-cache run (pid {h.get('pid')} on "
                    f"{h.get('host')}, started {h.get('started')}); wait for it to finish or stop it, then run "
                    f"again (a lock left by a dead run expires {LOCK_TTL_S // 3600} h after it was taken)"
                )
            log.warning(f"taking over an expired lock on {self.bucket.url} (held by {h.get('owner')})")
            self.bucket.delete(LOCK_FILE)
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
                    self.bucket.fs.pipe_file(self.bucket.key(LOCK_FILE), self._body())
            except OSError:
                pass  # retried at the next period; the expiry still has 3/4 of its time

    def release(self) -> None:
        self._stop.set()
        if self.held and self._holder().get("owner") == self.owner:
            self.bucket.delete(LOCK_FILE)
        self.held = False

    def __enter__(self) -> BucketLock:
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()
