"""Regenerate the shipped JSON Schema from the format's records: `python -m sak.pipeline.format.schema_gen`
(`make schema`). `--check` exits 1 when the shipped file differs from what the records generate."""

from __future__ import annotations

import sys
from sak.pipeline.base.typed_json import schema_text
from sak.pipeline.format.records import CACHE_SCHEMA, generate_schema

SHIPPED = CACHE_SCHEMA.shipped_path()


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    text = schema_text(generate_schema())
    if "--check" in argv:
        if not SHIPPED.exists() or SHIPPED.read_text() != text:
            print(f"{SHIPPED} is out of date; run `make schema`", file=sys.stderr)
            return 1
        return 0
    SHIPPED.write_text(text)
    print(f"wrote {SHIPPED}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
