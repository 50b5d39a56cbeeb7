"""Image folders as a source: a recursive walk (hidden names skipped, symlink loops refused), one item
per image file, keyed by its path without the extension."""

from __future__ import annotations

import logging
import os
from collections.abc import Iterator
from pathlib import Path

from sak.pipeline.base.errors import SakError
from sak.pipeline.sources.items import SourceItem, normalise_ext, normalise_key, utf8_name, vanished

log = logging.getLogger(__name__)


def walk_files(root: Path) -> Iterator[Path]:
    """Regular files under root, skipping hidden names; follows symlinks but visits each real
    directory once, so a link back to an ancestor cannot loop (and a linked twin is not listed twice)."""
    seen: set[tuple[int, int]] = set()
    stack = [root]
    while stack:
        folder = stack.pop()
        st = folder.stat()
        if (st.st_dev, st.st_ino) in seen:
            log.warning("skipping %s: directory already visited (symlink loop or second link)", folder)
            continue
        seen.add((st.st_dev, st.st_ino))
        try:
            entries = sorted(os.scandir(folder), key=lambda e: e.name)
        except OSError as exc:
            raise SakError(
                f"cannot list source folder {folder} ({exc.strerror}); fix its permissions"
            ) from None
        subfolders = []
        for entry in entries:
            if entry.name.startswith("."):
                continue
            if entry.is_dir():  # follows symlinks
                subfolders.append(Path(entry.path))
            elif entry.is_file():
                yield Path(entry.path)
            elif entry.is_symlink():
                log.warning("skipping %s: broken symlink", entry.path)
        stack.extend(reversed(subfolders))  # depth-first, in name order


def list_folder(root: Path, files: list[tuple[Path, str, str]]) -> list[SourceItem]:
    items = []
    for file, shown, rel in files:
        stem, _, ext = rel.rpartition(".")
        items.append(
            SourceItem(
                key=normalise_key(stem),
                ext=normalise_ext(ext),
                origin=utf8_name(shown),
                locator=("file", str(file.absolute())),
            )
        )
    return items


def read_file(item: SourceItem) -> bytes:
    try:
        with open(item.locator[1], "rb") as f:
            return f.read()
    except FileNotFoundError:
        raise vanished(item.origin, item.locator[1]) from None
