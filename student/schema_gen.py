"""The shipped JSON Schema of run folders, regenerated from the run record (student/run/record.py):
`python -m sak.student.schema_gen` (`make schema`) writes it; `--check` exits 1 when the shipped file is
not what the records generate (a test runs it)."""

from __future__ import annotations

import sys

from sak.pipeline.base.typed_json import schema_text
from sak.student.run.record import RUN_SCHEMA


def main(argv: list[str] | None = None) -> int:
    check = "--check" in (sys.argv[1:] if argv is None else argv)
    path, text = RUN_SCHEMA.shipped_path(), schema_text(RUN_SCHEMA.generate())
    current = path.exists() and path.read_text() == text
    if check and not current:
        print(f"{path} is out of date; run `make schema`", file=sys.stderr)
    elif not check:
        path.write_text(text)
        print(f"wrote {path}")
    return 0 if current or not check else 1


if __name__ == "__main__":
    sys.exit(main())
