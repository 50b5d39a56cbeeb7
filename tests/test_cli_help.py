"""`sak-train --help` and every `sak-train CMD --help` load no model library: options are generated from
torch-free config dataclasses and every heavy import waits for the command body."""

from __future__ import annotations

import json
import subprocess
import sys

from sak.cli.train import cli

HEAVY = ("torch", "timm", "open_clip", "ray")

# in a fresh interpreter: each --help in turn, and which heavy modules were loaded after each
DRIVER = """
import contextlib, io, json, sys
from sak.cli.train import main
seen = {}
for argv in json.loads(sys.argv[1]):
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        rc = main(argv)
    heavy = [m for m in json.loads(sys.argv[2]) if m in sys.modules]
    seen[" ".join(argv)] = {"rc": rc, "usage": "Usage:" in out.getvalue(), "heavy": heavy}
print(json.dumps(seen))
"""


def test_every_help_of_sak_train_loads_no_torch():
    helps = [["--help"], *[[name, "--help"] for name in sorted(cli.commands)]]
    assert {"stage1", "stage2", "tiger", "eval", "repsim"} <= set(cli.commands)
    proc = subprocess.run(
        [sys.executable, "-c", DRIVER, json.dumps(helps), json.dumps(HEAVY)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    seen = json.loads(proc.stdout.strip().splitlines()[-1])
    assert len(seen) == len(helps)
    for argv, got in seen.items():
        assert got["rc"] == 0 and got["usage"], (argv, got)
        assert got["heavy"] == [], f"`sak-train {argv}` imported {got['heavy']}"
