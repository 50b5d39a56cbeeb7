"""Source images for the extraction job: list every image of a source, sorted by key, and read the raw
bytes of listed items back.

A source is an image folder, WebDataset .tar shards (a file, a folder, or a glob / brace pattern such as
'shards/train-{000..003}.tar') or .parquet files with an image-bytes column; each kind lists and reads
its own items (folder.py, tars.py, parquet.py), all of one type (items.py). Two sources that collide
after key normalisation are an error, never a silent overwrite.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from glob import glob
from pathlib import Path, PurePath

from braceexpand import braceexpand

from sak.pipeline.base.errors import SakError
from sak.pipeline.sources.folder import list_folder, read_file, walk_files
from sak.pipeline.sources.items import IMAGE_EXTS, LISTED_EXTS, SourceItem, normalise_key
from sak.pipeline.sources.parquet import ParquetReader, list_parquet
from sak.pipeline.sources.tars import TarReader, list_tar

_LOOKED_FOR = ", ".join("." + e for e in IMAGE_EXTS) + " files (any case), .tar shards and .parquet files"


def _sorted_unique(items: list[SourceItem]) -> list[SourceItem]:
    """Sort by key (the same source always gives the same order) and refuse duplicate keys."""
    items = sorted(items, key=lambda it: (it.key, it.origin))
    for prev, cur in zip(items, items[1:]):
        if prev.key == cur.key:
            raise SakError(
                f"duplicate key {cur.key!r} from {prev.origin} and {cur.origin}; rename one of them "
                "(keys drop the extension and turn '.' into '_')"
            )
    return items


def list_source(
    path: str | Path, *, image_column: str | None = None, key_column: str | None = None
) -> list[SourceItem]:
    """Every image of a source (folder, .tar shards, .parquet files, or a glob/brace pattern of
    shards), sorted by key. Raises SakError when the source is missing, empty or ambiguous."""
    kind, files = _resolve_source(path)
    if kind == "folder":
        items = list_folder(Path(path), files)
    elif kind == "tar":
        items = [item for shard, shown, _ in files for item in list_tar(shard, shown)]
    else:
        items = []
        for file, shown, rel in files:
            # default keys "<stem>/<row:08d>"; in a folder the stem keeps its subfolders ("train/0")
            prefix = normalise_key(rel.rpartition(".")[0])
            items += list_parquet(file, shown, prefix, image_column, key_column)
    if not items:
        raise SakError(
            f"no images found in source {path} (looked for {_LOOKED_FOR}); "
            "pass --source with an image folder, .tar shards or .parquet files"
        )
    return _sorted_unique(items)


def _resolve_source(path: str | Path) -> tuple[str, list]:
    """(kind, [(file, shown, rel)]): kind is "folder", "tar" or "parquet"; `shown` is the path as the
    user would write it (for messages), `rel` the path relative to the source folder (or the file name)."""
    text, p = str(path), Path(path)
    if p.is_dir():
        return _classify_folder(p, text)
    if p.is_file():
        kind = _container_kind(p)
        if kind is None:
            raise SakError(
                f"source {text} is a single {p.suffix or 'extensionless'} file; pass --source with an "
                "image folder, .tar shards or .parquet files"
            )
        return kind, [(p, text, p.name)]
    if any(c in text for c in "*?[{"):
        return _expand_pattern(text)
    raise SakError(
        f"source {text} does not exist; pass --source with an image folder, .tar shards or .parquet files"
    )


def _container_kind(p: Path) -> str | None:
    suffix = p.suffix.lower()
    return {".tar": "tar", ".parquet": "parquet"}.get(suffix)


def _classify_folder(root: Path, text: str) -> tuple[str, list]:
    """One walk finds images, tars and parquet files; exactly one kind may be present."""
    found: dict[str, list] = {"folder": [], "tar": [], "parquet": []}
    for file in walk_files(root):
        rel = file.relative_to(root).as_posix()
        kind = _container_kind(file)
        if kind is not None:
            found[kind].append((file, PurePath(text, rel).as_posix(), rel))
        elif file.suffix[1:].lower() in LISTED_EXTS:
            found["folder"].append((file, PurePath(text, rel).as_posix(), rel))
    present = [k for k, v in found.items() if v]
    if len(present) > 1:
        counts = ", ".join(f"{len(found[k])} {_KIND_NAMES[k]}" for k in present)
        raise SakError(
            f"source {text} mixes {counts}; point --source at one kind (e.g. a folder of images, "
            f"or a pattern such as '{text.rstrip('/')}/*.tar')"
        )
    return (present[0], found[present[0]]) if present else ("folder", [])


_KIND_NAMES = {"folder": "image files", "tar": ".tar shards", "parquet": ".parquet files"}


def _expand_pattern(pattern: str) -> tuple[str, list]:
    """'shards/train-{000..003}.tar' or 'shards/*.tar': every named shard must exist."""
    files: list[tuple[Path, str, str]] = []
    for expanded in braceexpand(pattern):  # shell-style: a{1..3} a{x,y}, zero padding kept
        if any(c in expanded for c in "*?["):
            matches = sorted(glob(expanded))
            if not matches:
                raise SakError(f"source pattern {pattern} matches no files ({expanded}); check the path")
            files += [(Path(m), m, Path(m).name) for m in matches]
        elif Path(expanded).is_file():
            files.append((Path(expanded), expanded, Path(expanded).name))
        else:
            raise SakError(
                f"source shard {expanded} (from {pattern}) does not exist; fix the pattern or restore it"
            )
    kinds = {_container_kind(f) for f, _, _ in files}
    if len(kinds) != 1 or None in kinds:
        raise SakError(f"source pattern {pattern} must name only .tar shards or only .parquet files")
    return kinds.pop(), files


# ----------------------------------------------------------------------------- reading


def read_bytes(items: Sequence[SourceItem]) -> Iterator[tuple[SourceItem, bytes]]:
    """(item, raw bytes exactly as stored), in the given order.

    Within one call each tar and parquet file is opened once (up to 64 tars at a time) and each
    needed parquet row group is read once: the first item that needs a row group pulls the values of
    every item of this call in that group, and holds them until they are yielded. Memory is thus about
    one row group for items in key order, and at worst the requested bytes for a shuffled order.
    """
    items = list(items)
    tars = TarReader(items)
    tables = ParquetReader(items)
    try:
        for position, item in enumerate(items):
            kind = item.locator[0]
            if kind == "file":
                data = read_file(item)
            elif kind == "tar":
                data = tars.read(position, item)
            elif kind == "parquet":
                data = tables.read(position, item)
            else:
                raise ValueError(f"unknown locator {item.locator!r} for {item.origin}")
            yield item, data
    finally:
        tars.close()
        tables.close()
