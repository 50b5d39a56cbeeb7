"""Source images for the extraction job: list them, read their raw bytes back, check and decode them.

Three kinds of source give one item type, sorted by key:

    kind            origin (for messages)        key          locator
    image folder    photos/a/b.jpg               "a/b"        ("file", abs_path)
    WebDataset tar  shards/000.tar:foo.jpg       "foo"        ("tar", abs_tar, member_name)
    Parquet         data.parquet:row 17          key column   ("parquet", abs_path, row_group, row_in_group, column)

Keys keep '/' but never contain a dot: WebDataset splits a key at its first dot, so every '.' becomes
'_' ("img.v2.jpg" -> "img_v2"), '.' and empty path components are dropped, and '\\' counts as '/'.
Two sources that collide after this normalisation are an error, never a silent overwrite.

Decoding never applies the EXIF orientation: crop boxes of the view plan are in stored-pixel
coordinates, and the same bytes must give the same pixels on every machine.
"""

from __future__ import annotations

import logging
import os
import re
import tarfile
from collections import OrderedDict
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from functools import lru_cache
from glob import glob
from pathlib import Path, PurePath
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from sak.pipeline.base.errors import SakError
from sak.pipeline.sources.images import one_line

log = logging.getLogger(__name__)

IMAGE_EXTS = ("jpg", "jpeg", "png", "webp")
KEY_COLUMN_NAMES = ("key", "__key__", "id", "path", "name", "filename")  # auto-detected, in this order
_MAX_OPEN_TARS = 64  # per read_bytes call; bounds file descriptors when items hop between many shards
_STRIPPED_KEY_EXTS = {*IMAGE_EXTS, "gif", "bmp", "tif", "tiff"}  # "dir/a.jpg" in a key column -> "dir/a"
_LOOKED_FOR = ", ".join("." + e for e in IMAGE_EXTS) + " files (any case), .tar shards and .parquet files"


@dataclass(frozen=True)
class SourceItem:
    key: str  # unique, no dots, '/' allowed (see module docstring)
    ext: str  # "jpg" | "png" | "webp" (| "bin" for unrecognised parquet bytes)
    origin: str  # human-readable location for messages
    locator: tuple  # how read_bytes finds the bytes again (see module docstring)


# ----------------------------------------------------------------------------- keys


def normalise_key(raw: str) -> str:
    """'./a.b\\c' -> 'a_b/c': '/' separators, no empty or '.' parts, no dots (WebDataset splits at dots)."""
    parts = [p for p in raw.replace("\\", "/").split("/") if p not in ("", ".")]
    return "/".join(parts).replace(".", "_")


def _normalise_ext(ext: str) -> str:
    ext = ext.lower()
    return "jpg" if ext == "jpeg" else ext


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


# ----------------------------------------------------------------------------- listing


def list_source(
    path: str | Path, *, image_column: str | None = None, key_column: str | None = None
) -> list[SourceItem]:
    """Every image of a source (folder, .tar shards, .parquet files, or a glob/brace pattern of
    shards), sorted by key. Raises SakError when the source is missing, empty or ambiguous."""
    kind, files = _resolve_source(path)
    if kind == "folder":
        items = _list_folder(Path(path), files)
    elif kind == "tar":
        items = [item for shard, shown, _ in files for item in _list_tar(shard, shown)]
    else:
        items = []
        for file, shown, rel in files:
            # default keys "<stem>/<row:08d>"; in a folder the stem keeps its subfolders ("train/0")
            prefix = normalise_key(rel.rpartition(".")[0])
            items += _list_parquet(file, shown, prefix, image_column, key_column)
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
    for file in _walk_files(root):
        rel = file.relative_to(root).as_posix()
        kind = _container_kind(file)
        if kind is not None:
            found[kind].append((file, PurePath(text, rel).as_posix(), rel))
        elif file.suffix[1:].lower() in IMAGE_EXTS:
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


def _walk_files(root: Path) -> Iterator[Path]:
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


def _list_folder(root: Path, files: list[tuple[Path, str, str]]) -> list[SourceItem]:
    items = []
    for file, shown, rel in files:
        stem, _, ext = rel.rpartition(".")
        items.append(
            SourceItem(
                key=normalise_key(stem),
                ext=_normalise_ext(ext),
                origin=shown,
                locator=("file", str(file.absolute())),
            )
        )
    return items


def _expand_pattern(pattern: str) -> tuple[str, list]:
    """'shards/train-{000..003}.tar' or 'shards/*.tar': every named shard must exist."""
    files: list[tuple[Path, str, str]] = []
    for expanded in _expand_braces(pattern):
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


_BRACE = re.compile(r"\{([^{}]*)\}")


def _expand_braces(pattern: str) -> list[str]:
    """Shell-style braces: 'a{1..3}' -> a1 a2 a3 (zero padding kept), 'a{x,y}' -> ax ay."""
    match = _BRACE.search(pattern)
    if match is None:
        return [pattern]
    body, head, tail = match.group(1), pattern[: match.start()], pattern[match.end() :]
    numeric = re.fullmatch(r"(\d+)\.\.(\d+)", body)
    if numeric:
        lo, hi = numeric.groups()
        width = len(lo) if lo.startswith("0") or len(lo) == len(hi) else 0
        step = 1 if int(hi) >= int(lo) else -1
        choices = [str(i).zfill(width) for i in range(int(lo), int(hi) + step, step)]
    else:
        choices = body.split(",")
    return [out for choice in choices for out in _expand_braces(head + choice + tail)]


# ----------------------------------------------------------------------------- tar shards


@dataclass(frozen=True)
class _TarIndex:
    members: dict[str, tuple[int, int]]  # accepted image member -> (data offset, size)
    samples: tuple[tuple[str, str, str], ...]  # (member name, key, ext) in tar order
    refused: tuple[tuple[str, str], ...]  # (member name, why): never read, never extracted
    ignored: int  # members that are not images (.cls, .json, "x.seg.png" fields, ...)


def _tar_index(path: str) -> _TarIndex:
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
            if key is None or ext not in IMAGE_EXTS:
                ignored += 1
                continue
            if info.offset_data + info.size > size:
                raise tarfile.ReadError(f"member {info.name} runs past the end of the file (truncated)")
            members[info.name] = (info.offset_data, info.size)
            samples.append((info.name, key, _normalise_ext(ext)))
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


def _list_tar(path: Path, shown: str) -> list[SourceItem]:
    abs_path = str(path.absolute())
    try:
        index = _tar_index(abs_path)
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
        SourceItem(key=key, ext=ext, origin=f"{shown}:{name}", locator=("tar", abs_path, name))
        for name, key, ext in index.samples
    ]


# ----------------------------------------------------------------------------- parquet


def _list_parquet(
    path: Path, shown: str, default_prefix: str, image_column: str | None, key_column: str | None
) -> list[SourceItem]:
    """Reads the key column and the image column one row group at a time (to sniff each image's
    format from its first bytes), so memory stays at one row group."""
    abs_path = str(path.absolute())
    pf = _open_parquet(abs_path, shown)
    try:
        schema = pf.schema_arrow
        image_col = _pick_image_column(schema, image_column, shown)
        key_col = _pick_key_column(schema, key_column, shown)
        items, row, nulls = [], 0, 0
        for group in range(pf.num_row_groups):
            table = pf.read_row_group(group, columns=[image_col] + ([key_col] if key_col else []))
            heads = pc.binary_slice(_bytes_values(table.column(image_col)), 0, 12).to_pylist()
            keys = table.column(key_col).to_pylist() if key_col else None
            for i, head in enumerate(heads):
                origin = f"{shown}:row {row + i}"
                if head is None:
                    nulls += 1
                    continue
                key = _row_key(keys[i], key_col, origin) if keys else f"{default_prefix}/{row + i:08d}"
                items.append(
                    SourceItem(key, _sniff_ext(head), origin, ("parquet", abs_path, group, i, image_col))
                )
            row += table.num_rows
    finally:
        pf.close()
    if nulls:
        log.warning("%s: skipped %d rows whose %r column is null", shown, nulls, image_col)
    return items


def _open_parquet(abs_path: str, shown: str) -> pq.ParquetFile:
    try:
        return pq.ParquetFile(abs_path)
    except FileNotFoundError:
        raise _vanished(shown, abs_path) from None
    except (pa.ArrowException, OSError) as exc:
        raise SakError(
            f"cannot read parquet {shown} ({one_line(exc)}); re-write it or remove it from --source"
        ) from None


def _is_binary(t: pa.DataType) -> bool:
    is_view = getattr(pa.types, "is_binary_view", lambda _: False)
    return pa.types.is_binary(t) or pa.types.is_large_binary(t) or is_view(t)


def _is_image_type(t: pa.DataType) -> bool:
    """Raw bytes, or a struct with a binary 'bytes' field (HF datasets' Image feature)."""
    if pa.types.is_struct(t):
        idx = t.get_field_index("bytes")
        return idx >= 0 and _is_binary(t.field(idx).type)
    return _is_binary(t)


def _describe(schema: pa.Schema) -> str:
    return ", ".join(f"{f.name}: {f.type}" for f in schema)


def _pick_image_column(schema: pa.Schema, wanted: str | None, shown: str) -> str:
    if wanted is not None:
        if wanted not in schema.names or not _is_image_type(schema.field(wanted).type):
            raise SakError(
                f"parquet {shown} has no image-bytes column {wanted!r} (columns: {_describe(schema)}); "
                "pass --image-column naming a binary column or a struct with a 'bytes' field"
            )
        return wanted
    candidates = [f.name for f in schema if _is_image_type(f.type)]
    if len(candidates) != 1:
        problem = "several image-bytes columns" if candidates else "no image-bytes column"
        raise SakError(
            f"parquet {shown} has {problem} (columns: {_describe(schema)}); "
            "pass --image-column naming a binary column or a struct with a 'bytes' field"
        )
    return candidates[0]


def _pick_key_column(schema: pa.Schema, wanted: str | None, shown: str) -> str | None:
    if wanted is not None:
        if wanted not in schema.names or not (
            _is_string(schema.field(wanted).type) or pa.types.is_integer(schema.field(wanted).type)
        ):
            raise SakError(
                f"parquet {shown} has no string or integer column {wanted!r} (columns: {_describe(schema)}); "
                "pass --key-column naming one, or leave it out to use row numbers"
            )
        return wanted
    for name in KEY_COLUMN_NAMES:
        if name in schema.names and _is_string(schema.field(name).type):
            return name
    return None


def _is_string(t: pa.DataType) -> bool:
    return pa.types.is_string(t) or pa.types.is_large_string(t)


def _row_key(value: Any, column: str, origin: str) -> str:
    """Key column value -> key; a path-like value loses its image extension ('dir/a.jpg' -> 'dir/a')."""
    text = "" if value is None else str(value)
    stem, dot, ext = text.rpartition(".")
    if dot and "/" not in ext and ext.lower() in _STRIPPED_KEY_EXTS:
        text = stem
    key = normalise_key(text)
    if not key:
        raise SakError(
            f"{origin} has an empty key in column {column!r}; fill it, or pass another --key-column"
        )
    return key


def _bytes_values(column: pa.ChunkedArray) -> pa.ChunkedArray:
    """The binary values of an image column; a null struct stays null (flatten keeps its validity)."""
    if pa.types.is_struct(column.type):
        idx = column.type.get_field_index("bytes")
        column = pa.chunked_array(
            [chunk.flatten()[idx] for chunk in column.chunks], column.type.field(idx).type
        )
    if not (pa.types.is_binary(column.type) or pa.types.is_large_binary(column.type)):
        column = column.cast(pa.large_binary())  # binary_view: slice/take kernels want plain binary
    return column


def _sniff_ext(head: bytes) -> str:
    if head.startswith(b"\xff\xd8\xff"):
        return "jpg"
    if head.startswith(b"\x89PNG\r\n\x1a\n"):
        return "png"
    if head[:4] == b"RIFF" and head[8:12] == b"WEBP":
        return "webp"
    return "bin"


# ----------------------------------------------------------------------------- reading


def read_bytes(items: Sequence[SourceItem]) -> Iterator[tuple[SourceItem, bytes]]:
    """(item, raw bytes exactly as stored), in the given order.

    Within one call each tar and parquet file is opened once (up to 64 tars at a time) and each
    needed parquet row group is read once: the first item that needs a row group pulls the values of
    every item of this call in that group, and holds them until they are yielded. Memory is thus about
    one row group for items in key order, and at worst the requested bytes for a shuffled order.
    """
    items = list(items)
    tars = _TarReader(items)
    tables = _ParquetReader(items)
    try:
        for position, item in enumerate(items):
            kind = item.locator[0]
            if kind == "file":
                data = _read_file(item)
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


def _vanished(origin: str, path: str) -> SakError:
    return SakError(
        f"source file {origin} vanished since it was listed ({path}); restore it or list the source again"
    )


def _read_file(item: SourceItem) -> bytes:
    try:
        with open(item.locator[1], "rb") as f:
            return f.read()
    except FileNotFoundError:
        raise _vanished(item.origin, item.locator[1]) from None


class _TarReader:
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
            raise _vanished(origin, path) from None
        try:
            index = _tar_index(path)
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


class _ParquetReader:
    """Row groups of one read_bytes call: each needed (file, row group, column) is read once."""

    def __init__(self, items: list[SourceItem]) -> None:
        self._wanted: dict[tuple, list[tuple[int, int]]] = {}  # (path, group, column) -> [(position, row)]
        for position, it in enumerate(items):
            if it.locator[0] == "parquet":
                _, path, group, row, column = it.locator
                self._wanted.setdefault((path, group, column), []).append((position, row))
        self._groups_left: dict[str, int] = {}
        for path, _, _ in self._wanted:
            self._groups_left[path] = self._groups_left.get(path, 0) + 1
        self._files: dict[str, pq.ParquetFile] = {}
        self._values: dict[int, bytes] = {}  # position -> bytes, until yielded

    def read(self, position: int, item: SourceItem) -> bytes:
        if position not in self._values:
            self._load(item)
        return self._values.pop(position)

    def _load(self, item: SourceItem) -> None:
        _, path, group, _, column = item.locator
        if path not in self._files:
            self._files[path] = _open_parquet(path, item.origin)
        pf = self._files[path]
        wanted = self._wanted.pop((path, group, column))
        try:
            table = pf.read_row_group(group, columns=[column])
            values = _bytes_values(table.column(column)).take([row for _, row in wanted]).to_pylist()
        except (pa.ArrowException, OSError, IndexError, KeyError) as exc:
            raise SakError(
                f"cannot read {item.origin} ({one_line(exc)}); the file changed since listing, list it again"
            ) from None
        for (position, _), value in zip(wanted, values):
            if value is None:
                raise SakError(f"{item.origin}: image bytes became null; the file changed since listing")
            self._values[position] = value
        self._groups_left[path] -= 1
        if self._groups_left[path] == 0:
            self._files.pop(path).close()

    def close(self) -> None:
        while self._files:
            self._files.popitem()[1].close()
