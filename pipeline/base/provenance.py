"""Code version, checksums and atomic JSON files: what makes every output self-describing."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from functools import lru_cache
from importlib import metadata
from pathlib import Path
from typing import Any

from sak.pipeline.base.oserrors import writing

SCHEMA_VERSION = 1


@lru_cache(maxsize=1)
def code_version() -> str:
    """Package version plus the git commit of the source tree when it is a checkout ("0.1.0+g1a2b3c4").

    SAK_CODE_VERSION, when set, is returned as is: a copy of the tree without .git (the lent GPU machine)
    gets the version stamped where the copy was made (bench/device/carry.py; Ray workers inherit it)."""
    stamped = os.environ.get("SAK_CODE_VERSION", "").strip()
    if stamped:
        return stamped
    try:
        version = metadata.version("sak-cache")
    except metadata.PackageNotFoundError:
        version = "0+unknown"
    here = Path(__file__).resolve().parent
    try:
        out = subprocess.run(
            ["git", "-C", str(here), "describe", "--always", "--dirty", "--abbrev=10"],
            capture_output=True,
            text=True,
            timeout=5,
            check=True,
        )
        version += "+g" + out.stdout.strip()
    except (OSError, subprocess.SubprocessError):
        pass
    return version


def peak_rss_bytes() -> int:
    """This process's peak resident host memory so far (getrusage ru_maxrss: KiB on Linux, bytes on macOS)."""
    import resource
    import sys

    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(peak if sys.platform == "darwin" else peak * 1024)


def sha256_file(path: str | os.PathLike, chunk: int = 1 << 22) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def xxh3_file(path: str | os.PathLike, chunk: int = 1 << 22) -> str:
    """xxh3-128 hex digest of a file: a fast non-cryptographic check (~6 GB/s per core in memory, against
    sha256's ~0.9), what the loader checks before a shard's first read; `verify` checks sha256 too."""
    import xxhash

    h = xxhash.xxh3_128()
    buf = bytearray(chunk)
    view = memoryview(buf)
    with open(path, "rb", buffering=0) as f:
        while n := f.readinto(buf):
            h.update(view[:n])
    return h.hexdigest()


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def stable_hash(obj: Any, length: int = 16) -> str:
    """Hex digest of a JSON-serialisable object, independent of dict order and Python version."""
    text = json.dumps(obj, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:length]


def current_umask() -> int:
    """This process's umask, read without changing it where Linux says it (/proc), else set and restored."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except OSError:
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def temp_beside(path: Path) -> tuple[int, str]:
    """(fd, name) of a new temporary file next to `path`, for an atomic write by rename. Its mode follows
    the umask as `open()` would (mkstemp makes 0600 whatever the umask: a team could not share a cache)."""
    with writing(path):
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        os.fchmod(fd, 0o666 & ~current_umask())
    except BaseException:
        os.close(fd)
        Path(tmp).unlink(missing_ok=True)
        raise
    return fd, tmp


@contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """A temporary name next to `path` to write the whole file under; renamed onto `path` when the block
    ends, removed on any failure (the previous file stays intact). A full disk, a read-only folder or a
    too-long name leaves as one line naming `path` (oserrors.py)."""
    path = Path(path)
    with writing(path):
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = temp_beside(path)
        os.close(fd)
        try:
            yield Path(tmp)
            os.replace(tmp, path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise


def append_whole(fd: int, data: bytes, path: str | os.PathLike, sync: bool = False) -> None:
    """Append `data` to the file open on `fd` (O_APPEND) whole or not at all: a write that fails (a full
    disk) is cut back to the previous length, so no torn line stays, and leaves as one line naming `path`
    (oserrors.py). `sync`: fsynced before it counts as written."""
    before = os.fstat(fd).st_size
    try:
        with writing(path):
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view) :]
            if sync:
                os.fsync(fd)
    except BaseException:
        os.ftruncate(fd, before)
        raise


def open_append(path: str | os.PathLike) -> int:
    """A descriptor for appending to `path` (created as open() would, following the umask)."""
    with writing(path):
        return os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o666)


def write_json_atomic(path: str | os.PathLike, obj: Any) -> None:
    """Write JSON next to its destination, fsync, then rename: readers never see half a file."""
    with atomic_path(path) as tmp, open(tmp, "w") as f:
        json.dump(obj, f, indent=2, sort_keys=False)
        f.write("\n")
        f.flush()
        os.fsync(f.fileno())


MAX_JSON_BYTES = 256 << 20  # cache and run documents are untrusted: bounded before parsing
MAX_JSON_DEPTH = 64


def json_depth_ok(obj: Any, limit: int = MAX_JSON_DEPTH) -> bool:
    """Whether `obj` nests at most `limit` containers deep (iterative: a forged document cannot recurse)."""
    stack = [(obj, 1)]
    while stack:
        item, depth = stack.pop()
        if isinstance(item, (dict, list)):
            if depth > limit:
                return False
            stack.extend((v, depth + 1) for v in (item.values() if isinstance(item, dict) else item))
    return True


def read_json(path: str | os.PathLike) -> Any:
    """A cache's or run's JSON document, bounded in size and depth: any damage is one SakError."""
    from sak.pipeline.base.errors import SakError

    try:
        with open(path, "rb") as f:
            raw = f.read(MAX_JSON_BYTES + 1)
        if len(raw) > MAX_JSON_BYTES:
            raise SakError(
                f"{path} is over {MAX_JSON_BYTES >> 20} MiB, not a SAK document; the file is damaged"
            )
        data = json.loads(raw.decode())
    except RecursionError as e:
        raise SakError(f"{path} nests deeper than {MAX_JSON_DEPTH} levels; the file is damaged") from e
    except FileNotFoundError as e:
        raise SakError(f"{path} does not exist") from e
    except json.JSONDecodeError as e:
        raise SakError(
            f"{path} is not valid JSON ({e.msg} at line {e.lineno}); the file is damaged: run `sak-cache verify`"
        ) from e
    except UnicodeDecodeError as e:
        raise SakError(
            f"{path} is not valid JSON (a byte that is not UTF-8 at offset {e.start}); the file is damaged: "
            f"run `sak-cache verify`"
        ) from e
    except OSError as e:
        raise SakError(f"{path} cannot be read ({e.strerror})") from e
    if not json_depth_ok(data):
        raise SakError(f"{path} nests deeper than {MAX_JSON_DEPTH} levels; the file is damaged")
    return data


def now_iso() -> str:
    """The current UTC time as every record writes it: 2026-01-31T12:00:00Z."""
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
