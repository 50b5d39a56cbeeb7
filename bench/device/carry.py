"""What travels to the device machine, and the code version it runs: stdlib only (runs here and there).

    tree here      the files the device tool sends: tracked + untracked-not-ignored (`git ls-files -co
                   --exclude-standard`), and shared/ where the checkout has one
    carry folder   .gpu-carry/ (git-ignored, named in the run call's `carry`): wheels/ and stamp.json
    stamp.json     written by `make gpu-wheels`: the code version (`git describe`), the list of tree files
                   with a digest of their contents, the wheels with their sizes

On the device there is no .git: `code_version(root, carry)` recomputes the digest over the stamped file
list and returns the stamped version when the tree is the one stamped, else the version marked
`+changed-<digest>` (the tree was edited after `make gpu-wheels`). run.sh exports it as SAK_CODE_VERSION,
which sak.pipeline.base.provenance.code_version() returns when set.

    python3 bench/device/carry.py version [--carry DIR]   # print the code version for SAK_CODE_VERSION
    python3 bench/device/carry.py bytes [--carry DIR]     # tree + carry bytes, as `make gpu-wheels` prints
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
CARRY = ROOT / ".gpu-carry"
LIMIT_BYTES = 64 << 20  # the device tool's limit on what travels (tree + carried paths)
STAMP = "stamp.json"


def tree_files(root: Path = ROOT) -> list[str]:
    """Relative paths of the files that travel with a call (what the device tool sends), sorted."""
    out = subprocess.run(
        ["git", "-C", str(root), "ls-files", "-co", "--exclude-standard", "-z"],
        capture_output=True,
        check=True,
    ).stdout.decode()
    files = {p for p in out.split("\0") if p and (root / p).is_file()}  # deleted but tracked: not sent
    shared = root / "shared"
    if shared.is_dir():  # sent even when ignored
        files |= {str(p.relative_to(root)) for p in shared.rglob("*") if p.is_file()}
    return sorted(files)


def tree_digest(root: Path, files: list[str]) -> str:
    """sha256 over (path, content sha256) of `files`; a missing file counts as empty content 'missing'."""
    h = hashlib.sha256()
    for rel in files:
        path = root / rel
        content = hashlib.sha256(path.read_bytes()).hexdigest() if path.is_file() else "missing"
        h.update(f"{rel}\0{content}\n".encode())
    return h.hexdigest()


def folder_bytes(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file()) if folder.is_dir() else 0


def package_version(root: Path = ROOT) -> str:
    """[project] version of pyproject.toml (no tomllib needed: one regex on the one line)."""
    text = (root / "pyproject.toml").read_text()
    match = re.search(r'^version\s*=\s*"([^"]+)"', text, flags=re.MULTILINE)
    return match.group(1) if match else "0+unknown"


def git_version(root: Path = ROOT) -> str:
    """The version sak.pipeline.base.provenance.code_version() gives in a checkout: '<version>+g<describe>'."""
    out = subprocess.run(
        ["git", "-C", str(root), "describe", "--always", "--dirty", "--abbrev=10"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.strip()
    return f"{package_version(root)}+g{out}"


def write_stamp(carry: Path, root: Path = ROOT, wheels: dict[str, int] | None = None) -> dict:
    """carry/stamp.json for the tree as it is now (atomically: a reader never sees half a file)."""
    files = tree_files(root)
    stamp = {
        "code_version": git_version(root),
        "tree_digest": tree_digest(root, files),
        "tree_bytes": sum((root / f).stat().st_size for f in files),
        "files": files,
        "wheels": wheels if wheels is not None else {},
    }
    carry.mkdir(parents=True, exist_ok=True)
    tmp = carry / f".{STAMP}.tmp"
    tmp.write_text(json.dumps(stamp, indent=1) + "\n")
    os.replace(tmp, carry / STAMP)
    return stamp


def read_stamp(carry: Path) -> dict | None:
    path = carry / STAMP
    return json.loads(path.read_text()) if path.is_file() else None


def code_version(root: Path = ROOT, carry: Path = CARRY) -> str:
    """The stamped version if the tree here is the stamped tree, else marked as changed; without a stamp
    the package version marked 'unstamped' (the run still goes; the record says what it ran)."""
    stamp = read_stamp(carry)
    if stamp is None:
        return f"{package_version(root)}+unstamped"
    digest = tree_digest(root, stamp["files"])
    if digest == stamp["tree_digest"]:
        return stamp["code_version"]
    return f"{stamp['code_version']}+changed-{digest[:10]}"


def carry_bytes(root: Path = ROOT, carry: Path = CARRY) -> dict[str, int]:
    """{'tree': bytes, 'carry': bytes, 'total': bytes, 'limit': bytes} of what travels.

    Here the tree is what git would send; on the device (no .git, or no git) it is the stamped file list."""
    try:
        files = tree_files(root)
    except (OSError, subprocess.CalledProcessError):
        files = (read_stamp(carry) or {}).get("files", [])
    tree = sum((root / f).stat().st_size for f in files if (root / f).is_file())
    carried = folder_bytes(carry)
    return {"tree": tree, "carry": carried, "total": tree + carried, "limit": LIMIT_BYTES}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("what", choices=["version", "bytes"])
    parser.add_argument("--carry", type=Path, default=CARRY)
    args = parser.parse_args(argv)
    if args.what == "version":
        print(code_version(ROOT, args.carry))
    else:
        sizes = carry_bytes(ROOT, args.carry)
        print(json.dumps(sizes))
    return 0


if __name__ == "__main__":
    sys.exit(main())
