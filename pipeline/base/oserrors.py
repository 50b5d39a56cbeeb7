"""Write failures the user fixes (a full disk, a quota, a read-only or foreign folder, a too-long name) as
one line naming the path and the fix, wherever they strike: in the driver, the trainer, or a Ray actor.

    write_error(e, path)     the SakError for an OSError of those kinds ("cannot write PATH: no space left
                             on the device; free space or pass another --out"), None for any other error
    writing(path)            a context around a write: such an OSError leaves it as write_error's line
    find_os_error(exc)       the OSError behind an exception: itself, what a Ray task raised, or a cause

Writers remove their temporary file on any failure (provenance.py `atomic_path`), so nothing partial stays
and the previous file is intact; these errors need a fix first, so no message says to just run again.
"""

from __future__ import annotations

import errno
import os
from collections.abc import Iterator
from contextlib import contextmanager

from sak.pipeline.base.errors import SakError

# errno -> (what happened, how to fix it)
WRITE_FIXES: dict[int, tuple[str, str]] = {
    errno.ENOSPC: ("no space left on the device", "free space or pass another --out"),
    errno.EDQUOT: ("disk quota exceeded", "free space within your quota or pass another --out"),
    errno.EACCES: ("permission denied", "make the folder writable for this user or pass another --out"),
    errno.EPERM: ("operation not permitted", "make the folder writable for this user or pass another --out"),
    errno.EROFS: ("read-only file system", "pass an --out on a writable file system"),
    errno.ENAMETOOLONG: ("file name too long", "pass a shorter --out"),
}


class WriteError(SakError):
    """A write the user can make succeed (space, permissions, a shorter name); not a damaged input."""


def write_error(e: BaseException, path: str | os.PathLike | None = None) -> WriteError | None:
    """The one-line error for an OSError the user fixes (or one wrapped by Ray), naming `path` (the file
    being written; a writer's temporary name means nothing to the user), else the file the OSError names;
    None when `e` is no such error."""
    os_error = find_os_error(e)
    if os_error is None:
        return None
    what, fix = WRITE_FIXES[os_error.errno]
    where = path if path is not None else os_error.filename
    return WriteError(f"cannot write {where if where is not None else 'a file'}: {what}; {fix}")


def find_os_error(exc: BaseException | None) -> OSError | None:
    """The OSError of a kind in WRITE_FIXES behind `exc`: itself, the error a Ray task or actor raised
    (RayTaskError.cause), or its explicit cause (`raise ... from e`), a few links deep."""
    for _ in range(8):
        if exc is None:
            return None
        if isinstance(exc, OSError) and exc.errno in WRITE_FIXES:
            return exc
        exc = getattr(exc, "cause", None) or exc.__cause__
    return None


@contextmanager
def writing(path: str | os.PathLike) -> Iterator[None]:
    """Around a write of `path`: an OSError of a kind in WRITE_FIXES leaves as write_error's SakError."""
    try:
        yield
    except OSError as e:
        error = write_error(e, path)
        if error is None:
            raise
        raise error from e
