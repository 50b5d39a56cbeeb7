"""The command transcripts shown in docs/ (`$ sak-cache estimate ...` followed by its output, in a
```console block) and what the code prints for them today.

    python tests/doc_examples.py            # exit 1 naming each transcript that differs
    python tests/doc_examples.py --write    # rewrite the outputs in the pages from the code

tests/test_docs.py runs the check, so a page cannot drift from the code it quotes.
"""

from __future__ import annotations

import contextlib
import io
import re
import shlex
import sys
from pathlib import Path

DOCS = Path(__file__).resolve().parents[1] / "docs"
BLOCK = re.compile(r"```console\n(.*?)```", re.S)


def printed(command: str) -> str:
    """What `command` (a sak-cache or sak-train line) prints to stdout, run in this process."""
    argv = shlex.split(command)
    if argv[0] == "sak-cache":
        from sak.cli.cache import main
    elif argv[0] == "sak-train":
        from sak.cli.train import main
    else:
        raise ValueError(f"not a sak command: {command}")
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        rc = main(argv[1:])
    if rc:
        raise RuntimeError(f"{command!r} exited {rc}")
    return out.getvalue().rstrip("\n") + "\n"


def pages() -> list[Path]:
    return sorted(DOCS.glob("*.md"))


def rewritten(page: Path) -> tuple[str, int]:
    """The page with every transcript's output as the code prints it now, and how many changed."""
    changed = 0

    def fresh(match: re.Match) -> str:
        nonlocal changed
        lines = match.group(1).split("\n")
        if not lines[0].startswith("$ "):
            return match.group(0)
        shown = "\n".join(lines[1:]).rstrip("\n") + "\n"
        now = printed(lines[0][2:])
        changed += now != shown
        return f"```console\n{lines[0]}\n{now}```"

    return BLOCK.sub(fresh, page.read_text()), changed


def main(argv: list[str] | None = None) -> int:
    write = "--write" in (sys.argv[1:] if argv is None else argv)
    stale = 0
    for page in pages():
        text, changed = rewritten(page)
        stale += changed
        if changed and write:
            page.write_text(text)
        elif changed:
            print(f"{page.name}: {changed} transcript(s) differ from what the commands print now")
    if write:
        print(f"rewrote {stale} transcript(s)")
        return 0
    return 1 if stale else 0


if __name__ == "__main__":
    sys.exit(main())
