"""`python -m sak cache ARGS` is `sak-cache ARGS`; `python -m sak train ARGS` is `sak-train ARGS`.

This folder is the `sak` namespace's own top level (pyproject.toml maps it to `sak`): it holds only this
file, so `sak` stays a namespace over pipeline/, kernels/, student/ and cli/."""

from __future__ import annotations

import sys

USAGE = """usage: python -m sak {cache,train} ARGS...

  cache  sak-cache: extract teacher features into a cache; inspect, verify, ls, estimate, show
  train  sak-train: stage 1, stage 2 and TIGER trainers; repsim, eval

`python -m sak cache --help` (or train) lists each tool's commands."""


def main(argv: list[str]) -> int:
    if not argv or argv[0] not in ("cache", "train", "-h", "--help"):
        if argv:
            print(f"python -m sak: unknown tool {argv[0]!r}: give cache or train", file=sys.stderr)
        print(USAGE, file=sys.stderr)
        return 2
    if argv[0] in ("-h", "--help"):
        print(USAGE)
        return 0
    if argv[0] == "cache":
        from sak.cli.cache import main as tool
    else:
        from sak.cli.train import main as tool
    return tool(argv[1:])


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
