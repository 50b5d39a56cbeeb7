"""WebDataset .tar shards as a source: members indexed once by their headers (plain tars only, so offsets
are file offsets), images taken by the stock WebDataset key rule, unsafe members refused and never read."""

from __future__ import annotations

import logging
import os
import re
import tarfile
from collections import OrderedDict
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any

from sak.pipeline.base.errors import SakError, one_line
from sak.pipeline.sources.items import (
    LISTED_EXTS,
    SourceItem,
    normalise_ext,
    normalise_key,
    utf8_name,
    vanished,
)

log = logging.getLogger(__name__)

_MAX_OPEN_TARS = 64  # per read_bytes call; bounds file descriptors when items hop between many shards


@dataclass(frozen=True)
class _TarIndex:
    members: dict[str, tuple[int, int]]  # accepted image member -> (data offset, size)
    samples: tuple[tuple[str, str, str], ...]  # (member name, key, ext) in tar order
    refused: tuple[tuple[str, str], ...]  # (member name, why): never read, never extracted
    ignored: int  # members that are not images (.cls, .json, "x.seg.png" fields, ...)


def tar_index(path: str) -> _TarIndex:
    st = os.stat(path)
    return _tar_index_cached(path, st.st_size, st.st_mtime_ns)


@lru_cache(maxsize=16)
def _tar_index_cached(path: str, size: int, mtime_ns: int) -> _TarIndex:
    """Scan the headers once (listing primes this for read_bytes); keyed by size and mtime so a
    rewritten shard is rescanned."""
    members, samples, refused, ignored = {}, [], [], 0
    with tarfile.open(path, mode="r:") as tar:  # plain tar only: offsets must be file offsets
        for info in tar:
            if info.isdir():
                continue
            why = _refuse_member(info)
            if why:
                refused.append((info.name, why))
                continue
            key, ext = _split_member(info.name)
            if key is None or ext not in LISTED_EXTS:
                ignored += 1
                continue
            if info.offset_data + info.size > size:
                raise tarfile.ReadError(f"member {info.name} runs past the end of the file (truncated)")
            members[info.name] = (info.offset_data, info.size)
            samples.append((info.name, key, normalise_ext(ext)))
    return _TarIndex(members, tuple(samples), tuple(refused), ignored)


def _refuse_member(info: tarfile.TarInfo) -> str | None:
    """Why a member must not be used: links and devices could point anywhere, and a name that is
    absolute or climbs with '..' is an attack on whoever extracts the shard later."""
    if info.issym() or info.islnk():
        return "symlink or hardlink"
    if not info.isreg():
        return "device, fifo or other special file"
    if info.issparse():
        return "sparse file"
    name = info.name.replace("\\", "/")
    if name.startswith("/") or re.match(r"^[A-Za-z]:", name):
        return "absolute path"
    if ".." in name.split("/"):
        return "'..' path component"
    return None


def _split_member(name: str) -> tuple[str | None, str]:
    """The stock WebDataset rule: the key is the name up to the first dot of its basename, the
    rest is the (lower-cased) field, so 'x.seg.png' is field 'seg.png' of sample 'x', not an image."""
    head, _, base = name.replace("\\", "/").rpartition("/")
    stem, dot, ext = base.partition(".")
    if not dot or not stem:
        return None, ""
    key = normalise_key(f"{head}/{stem}")
    return (key or None), ext.lower()


def list_tar(path: Path, shown: str) -> list[SourceItem]:
    abs_path = str(path.absolute())
    try:
        index = tar_index(abs_path)
    except (tarfile.TarError, OSError, EOFError) as exc:
        raise SakError(
            f"cannot read tar {shown} ({one_line(exc)}); re-create it as a plain (uncompressed) .tar "
            "or remove it from --source"
        ) from None
    for name, why in index.refused:
        log.warning("skipping tar member %s:%s: %s (never extracted)", shown, name, why)
    if index.ignored:
        log.info("%s: ignored %d non-image members", shown, index.ignored)
    return [
        SourceItem(key=key, ext=ext, origin=utf8_name(f"{shown}:{name}"), locator=("tar", abs_path, name))
        for name, key, ext in index.samples
    ]


class TarReader:
    """Open handles of one read_bytes call: opened on first use, closed after their last use."""

    def __init__(self, items: list[SourceItem]) -> None:
        self._last_use = {it.locator[1]: i for i, it in enumerate(items) if it.locator[0] == "tar"}
        self._open: OrderedDict[str, tuple[Any, _TarIndex]] = OrderedDict()

    def read(self, position: int, item: SourceItem) -> bytes:
        _, path, member = item.locator
        handle, index = self._handle(path, item.origin)
        if member not in index.members:
            raise SakError(
                f"{item.origin} is no longer in {path}; the shard changed since listing, list it again"
            )
        offset, size = index.members[member]
        handle.seek(offset)
        data = handle.read(size)
        if len(data) != size:
            raise SakError(f"{item.origin} is cut short; the shard changed since listing, list it again")
        if self._last_use[path] == position:
            self._open.pop(path)[0].close()
        return data

    def _handle(self, path: str, origin: str) -> tuple[Any, _TarIndex]:
        if path in self._open:
            self._open.move_to_end(path)
            return self._open[path]
        try:
            handle = open(path, "rb")  # closed after its last item, or in close()
        except FileNotFoundError:
            raise vanished(origin, path) from None
        try:
            index = tar_index(path)
        except (tarfile.TarError, OSError, EOFError) as exc:
            handle.close()
            raise SakError(
                f"cannot read tar {path} ({one_line(exc)}); the shard changed since listing"
            ) from None
        self._open[path] = (handle, index)
        if len(self._open) > _MAX_OPEN_TARS:
            self._open.popitem(last=False)[1][0].close()
        return handle, index

    def close(self) -> None:
        while self._open:
            self._open.popitem()[1][0].close()
