"""What a benchmark writes for `bench/gpu_check.py` (and for `--json OUT` generally): one JSON file,
rewritten atomically after every row, so a step killed at its budget still hands over what it measured.

    report = StepReport(args.json, config=...)   # writes {"status": "running", "rows": [], ...} at once
    report.add(row)                              # one measured row (a dict of plain values)
    report.fail(what, error)                     # a case that could not be measured (kept apart from rows)
    return report.skip("no CUDA")                # set-up done, nothing to measure here (exit code 0)
    report.done(**fields)                        # status "done" (or "failed" when any case failed)

With no path (a plain run printing its table) nothing is written. The file holds only plain JSON values.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from sak.pipeline.base.provenance import write_json_atomic

SKIPPED = "skipped: "  # a status that starts so: the step got through its set-up, and had nothing to run


class StepReport:
    def __init__(self, path: str | Path | None, **fields: Any) -> None:
        self.path = Path(path) if path else None
        self.fields: dict[str, Any] = dict(fields)
        self.rows: list[dict] = []
        self.failures: list[dict] = []
        self.status = "running"
        self.flush()

    def update(self, **fields: Any) -> None:
        self.fields.update(fields)
        self.flush()

    def add(self, row: dict) -> None:
        self.rows.append(row)
        self.flush()

    def fail(self, what: str, error: BaseException | str) -> None:
        text = error if isinstance(error, str) else f"{type(error).__name__}: {str(error).strip()}"
        self.failures.append({"case": what, "error": text[:2000]})
        self.flush()

    def skip(self, reason: str, hint: str = "") -> int:
        """Status 'skipped: <reason>'; the exit code for the script (0: the set-up itself went through)."""
        self.status = SKIPPED + reason
        self.flush()
        print(f"{self.status} (imports and set-up done){'; ' + hint if hint else ''}", flush=True)
        return 0

    def done(self, **fields: Any) -> int:
        """Final status; the exit code for the script: 1 when any case failed."""
        self.fields.update(fields)
        self.status = "failed" if self.failures else "done"
        self.flush()
        return 1 if self.failures else 0

    def as_dict(self) -> dict:
        return {"status": self.status, **self.fields, "rows": self.rows, "failures": self.failures}

    def flush(self) -> None:
        if self.path is not None:
            write_json_atomic(self.path, self.as_dict())
