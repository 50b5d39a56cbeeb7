"""The cache format's JSON Schema: generated from the records' type hints (records.py), shipped in the
package as schema/cache-v1.schema.json, and what every read validates against.

`python -m sak.pipeline.format.schema` (`make schema`) regenerates the shipped file; `--check` exits 1
when the shipped file differs from what the records generate.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

from sak.pipeline.base.provenance import SCHEMA_VERSION
from sak.pipeline.base.typed_json import SchemaFamily, schema_text
from sak.pipeline.format.records import DOCUMENTS, CacheManifest, Stage2Cache, StoreManifest

SCHEMA_FILE = f"cache-v{SCHEMA_VERSION}.schema.json"
SCHEMA_ID = f"https://sak-cache.invalid/schema/{SCHEMA_FILE}"

CACHE_SCHEMA = SchemaFamily(
    package="sak.pipeline",
    file=SCHEMA_FILE,
    schema_id=SCHEMA_ID,
    title=f"SAK cache format v{SCHEMA_VERSION}",
    description=(
        "cache.json, teachers/<fingerprint>/manifest.json and the stage-2 cache.json (by their 'kind'); "
        "each line of shards.jsonl is a #/$defs/ShardRecord. Generated from sak.pipeline.format."
    ),
    documents=DOCUMENTS,
    roots=(CacheManifest, StoreManifest, Stage2Cache),
    damaged_hint=f"the file is damaged or not a v{SCHEMA_VERSION} cache file (run `sak-cache verify`)",
)


def generate_schema() -> dict:
    """The JSON Schema of every document of the format, generated from the records' type hints. The root
    accepts any of the documents that carry a `kind` (cache.json, manifest.json, stage-2 cache.json);
    a journal line validates against `#/$defs/ShardRecord`."""
    return CACHE_SCHEMA.generate()


def shipped_schema() -> dict:
    """The schema file shipped in the package (what every read validates against)."""
    return CACHE_SCHEMA.shipped()


def validate(data: Any, cls: type, path: str | Path) -> None:
    """Raise one SakError naming the file and the field path of the first schema violation."""
    CACHE_SCHEMA.validate(data, cls, path)


def load(cls: type, data: Any, path: str | Path) -> Any:
    """Validated JSON data -> a record of type `cls` (a SakError naming `path` and the field otherwise)."""
    return CACHE_SCHEMA.load(cls, data, path)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    shipped = CACHE_SCHEMA.shipped_path()
    text = schema_text(generate_schema())
    if "--check" in argv:
        if not shipped.exists() or shipped.read_text() != text:
            print(f"{shipped} is out of date; run `make schema`", file=sys.stderr)
            return 1
        return 0
    shipped.write_text(text)
    print(f"wrote {shipped}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
