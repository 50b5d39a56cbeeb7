"""One item type for every kind of source: its key, extension, origin and how to find its bytes again.

    kind            origin (for messages)        key          locator
    image folder    photos/a/b.jpg               "a/b"        ("file", abs_path)                  folder.py
    WebDataset tar  shards/000.tar:foo.jpg       "foo"        ("tar", abs_tar, member_name)       tars.py
    Parquet         data.parquet:row 17          key column   ("parquet", abs_path, row_group,    parquet.py
                                                               row_in_group, column)

Keys keep '/' but never contain a dot: WebDataset splits a key at its first dot, so every '.' becomes
'_' ("img.v2.jpg" -> "img_v2"), '.' and empty path components are dropped, and '\\' counts as '/'.
"""

from __future__ import annotations

from dataclasses import dataclass

from sak.pipeline.base.errors import SakError

IMAGE_EXTS = ("jpg", "jpeg", "png", "webp", "gif", "bmp", "tif", "tiff")
# image types met in datasets that ingest does not read: listed so that each is named in the cache's
# skipped list (with the fix) instead of left out without a word
UNSUPPORTED_IMAGE_EXTS = ("heic", "heif", "avif", "jxl", "jp2", "j2k", "svg", "ico", "psd", "exr", "hdr",
                          "dng", "cr2", "nef", "arw", "raw")  # fmt: skip
LISTED_EXTS = IMAGE_EXTS + UNSUPPORTED_IMAGE_EXTS


def unsupported_reason(ext: str) -> str | None:
    """Why an item of this extension is skipped, or None if ingest reads it."""
    if ext not in UNSUPPORTED_IMAGE_EXTS:
        return None
    return f"unsupported image type .{ext}; convert it to JPEG, PNG or WebP to include it"


@dataclass(frozen=True)
class SourceItem:
    key: str  # unique, no dots, '/' allowed (see module docstring)
    ext: str  # one of LISTED_EXTS, "jpeg" as "jpg" (| "bin" for unrecognised parquet bytes)
    origin: str  # human-readable location for messages
    locator: tuple  # how read_bytes finds the bytes again (see module docstring)


def normalise_key(raw: str) -> str:
    """'./a.b\\c' -> 'a_b/c': '/' separators, no empty or '.' parts, no dots (WebDataset splits at dots);
    the bytes of a name that is not UTF-8 as %XX (the key is stored as text)."""
    parts = [p for p in utf8_name(raw).replace("\\", "/").split("/") if p not in ("", ".")]
    return "/".join(parts).replace(".", "_")


def utf8_name(name: str) -> str:
    """A file name as text that encodes: the undecodable bytes of a non-UTF-8 name (surrogate escapes,
    as os gives them) written %XX, so such a file is ingested instead of failing the run."""
    raw = name.encode("utf-8", "surrogateescape")
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        return "".join(c if not 0xDC80 <= ord(c) <= 0xDCFF else f"%{ord(c) - 0xDC00:02X}" for c in name)


def normalise_ext(ext: str) -> str:
    ext = ext.lower()
    return "jpg" if ext == "jpeg" else ext


def vanished(origin: str, path: str) -> SakError:
    return SakError(
        f"source file {origin} vanished since it was listed ({path}); restore it or list the source again"
    )
