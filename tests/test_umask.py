"""Files and folders follow the umask, as `open()` does: a team sharing a cache or a run folder (umask
022) can read what one member wrote; a private umask (077) keeps it private. Each case runs in its own
process, whose umask is set before anything is written."""

from __future__ import annotations

import os
import stat
import subprocess
import sys
from pathlib import Path

import pytest

WRITE = r"""
import os, sys
from pathlib import Path
os.umask(int(sys.argv[1], 8))
root = Path(sys.argv[2])
from sak.pipeline.base.lock import CacheLock
from sak.pipeline.base.provenance import write_json_atomic
from sak.student.model.config import TeacherTarget
from sak.student.model.registry import create_student
from sak.student.model.weights import save_student
write_json_atomic(root / "cache" / "cache.json", {"kind": "probe"})
with CacheLock(root / "cache"):
    pass
model = create_student("tiny", [TeacherTarget("dinov2_tiny", 64)], img_size=32)
save_student(model, root / "run" / "checkpoint" / "model.safetensors")
"""


def _modes(root: Path) -> dict[str, int]:
    return {
        str(p.relative_to(root)): stat.S_IMODE(p.stat().st_mode)
        for p in [*root.rglob("*")]
        if not p.is_symlink()
    }


@pytest.mark.parametrize("umask, file_mode, dir_mode", [("022", 0o644, 0o755), ("077", 0o600, 0o700)])
def test_files_and_folders_follow_the_umask(umask, file_mode, dir_mode, tmp_path):
    subprocess.run([sys.executable, "-c", WRITE, umask, str(tmp_path)], check=True, env=os.environ)
    modes = _modes(tmp_path)
    assert {"cache/cache.json", "run/checkpoint/model.safetensors", "run/checkpoint/model.json"} <= set(modes)
    wrong = {
        name: oct(mode)
        for name, mode in modes.items()
        if mode != (dir_mode if (tmp_path / name).is_dir() else file_mode)
    }
    assert not wrong, wrong
