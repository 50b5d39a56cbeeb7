"""Parquet files with an image-bytes column as a source (raw bytes, or HF datasets' Image struct with a
'bytes' field): keys from a key column or "<stem>/<row>", read one row group at a time."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from sak.pipeline.base.errors import SakError, one_line
from sak.pipeline.sources.items import IMAGE_EXTS, SourceItem, normalise_key, vanished

log = logging.getLogger(__name__)

KEY_COLUMN_NAMES = ("key", "__key__", "id", "path", "name", "filename")  # auto-detected, in this order


_STRIPPED_KEY_EXTS = {*IMAGE_EXTS, "gif", "bmp", "tif", "tiff"}  # "dir/a.jpg" in a key column -> "dir/a"


def list_parquet(
    path: Path, shown: str, default_prefix: str, image_column: str | None, key_column: str | None
) -> list[SourceItem]:
    """Reads the key column and the image column one row group at a time (to sniff each image's
    format from its first bytes), so memory stays at one row group."""
    abs_path = str(path.absolute())
    pf = open_parquet(abs_path, shown)
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


def open_parquet(abs_path: str, shown: str) -> pq.ParquetFile:
    try:
        return pq.ParquetFile(abs_path)
    except FileNotFoundError:
        raise vanished(shown, abs_path) from None
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


class ParquetReader:
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
            self._files[path] = open_parquet(path, item.origin)
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
