"""One writer per cache: an advisory lock file that names its holder.

`CACHE/.sak-lock` is locked with flock(2) for as long as a `sak-cache run` writes to the cache, and holds
the holder's pid, host, start time and command line. flock is released by the kernel when the holder dies
(even under kill -9), so a lock left by a dead process is detected (the file still names a holder, but
nobody holds the flock) and taken over with a log line. A live holder makes a second run refuse at once.
Note: flock is per host; on a network filesystem shared by several hosts run one writer per cache.
"""

from __future__ import annotations

import fcntl
import json
import logging
import os
import socket
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from sak.pipeline.base.errors import SakError

LOCK_FILE = ".sak-lock"  # a cache's lock file, and a bucket cache's lock object (buckets/lock.py)
log = logging.getLogger("sak")


@dataclass(frozen=True)
class LockHolder:
    """The live process that holds a folder's lock, as its lock file names it."""

    host: str
    pid: int | str
    started: str
    command: str

    def __str__(self) -> str:
        return f"held by {self.host} pid {self.pid} since {self.started}"


def lock_holder(folder: str | Path) -> LockHolder | None:
    """Who holds `folder`'s lock now (a live `sak-cache run`, a trainer), or None: no lock file, or one
    nobody holds (released, or left by a dead process). Probed with a shared flock taken and dropped at
    once (a writer starting in that instant is refused and says so; it can start again)."""
    path = Path(folder) / LOCK_FILE
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return None
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        fcntl.flock(fd, fcntl.LOCK_UN)
        return None
    except BlockingIOError:
        h = CacheLock(folder)._holder()
        return LockHolder(
            host=str(h.get("host", "?")),
            pid=h.get("pid", "?"),
            started=str(h.get("started", "?")),
            command=str(h.get("command", "?")),
        )
    finally:
        os.close(fd)


class CacheLock:
    """writer: what holds such a lock, for the refusal ("sak-cache run"; "trainer" on a run folder)."""

    def __init__(self, cache_dir: str | Path, writer: str = "sak-cache run") -> None:
        self.path = Path(cache_dir) / LOCK_FILE
        self.writer = writer
        self.fd: int | None = None

    def _holder(self) -> dict:
        try:
            text = self.path.read_text()
            return json.loads(text) if text.strip() else {}
        except (OSError, json.JSONDecodeError):
            return {}

    def acquire(self) -> CacheLock:
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o666)  # the umask applies, as for open()
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            h = self._holder()
            who = f"pid {h.get('pid', '?')} on {h.get('host', '?')}, started {h.get('started', '?')}"
            raise SakError(
                f"{self.path.parent} is being written by another {self.writer} ({who}: {h.get('command', '?')}); "
                f"wait for it to finish or stop it, then run again"
            ) from None
        stale = self._holder()
        if stale:
            log.warning(
                f"taking over a stale lock on {self.path.parent}: its holder (pid {stale.get('pid')} on "
                f"{stale.get('host')}, started {stale.get('started')}) is gone"
            )
        info = {
            "pid": os.getpid(),
            "host": socket.gethostname(),
            "started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "command": " ".join(sys.argv)[:500],
        }
        os.ftruncate(fd, 0)
        os.pwrite(fd, json.dumps(info).encode(), 0)
        os.fsync(fd)
        self.fd = fd
        return self

    def release(self) -> None:
        if self.fd is None:
            return
        os.ftruncate(self.fd, 0)  # an empty file means "released cleanly"
        fcntl.flock(self.fd, fcntl.LOCK_UN)
        os.close(self.fd)
        self.fd = None

    def __enter__(self) -> CacheLock:
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()
