"""The lock (requirements.lock) against pyproject.toml and against the running environment.

Used by tests/test_lock.py (default tier, no network) and by `make venv` after installing the lock:
    python tests/lockcheck.py installed     # exit 1, naming each package, unless the env IS the lock
    python tests/lockcheck.py pyproject     # exit 1, naming each package, unless pyproject and lock agree
    python tests/lockcheck.py stray         # installed packages the lock does not hold (make removes them)
Standard library plus `packaging` (pinned in the lock) only.
"""

from __future__ import annotations

import re
import sys
import sysconfig
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path

import tomllib
from packaging.markers import default_environment
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

ROOT = Path(__file__).resolve().parents[1]
LOCK = ROOT / "requirements.lock"
PYPROJECT = ROOT / "pyproject.toml"
PROJECT = "sak-cache"
LOCKED_EXTRAS = ("test", "train", "s3", "gs")  # what `make lock` compiles (its --extra flags)
# The lock's target: Linux x86_64, CPython 3.11 (markers of pyproject requirements are judged for it)
LOCK_ENVIRONMENT = {
    **default_environment(),
    "sys_platform": "linux",
    "platform_system": "Linux",
    "platform_machine": "x86_64",
    "os_name": "posix",
    "python_version": "3.11",
    "python_full_version": "3.11.7",
    "implementation_name": "cpython",
    "platform_python_implementation": "CPython",
}
# Installer tooling and the project itself are not part of the lock.
NOT_LOCKED = {"pip", PROJECT}

_PIN = re.compile(r"^([A-Za-z0-9][A-Za-z0-9._-]*)==([^\s\\;]+)")


@dataclass(frozen=True)
class LockedPackage:
    name: str  # canonical (PEP 503) name
    version: str
    direct: bool  # "# via sak-cache (pyproject.toml)": asked for by pyproject itself


def read_lock(path: Path = LOCK) -> dict[str, LockedPackage]:
    """{canonical name: LockedPackage} of a `uv pip compile` output (name==version lines, hashes and
    `# via` annotations)."""
    packages: dict[str, LockedPackage] = {}
    name = version = None
    vias: list[str] = []

    def flush() -> None:
        if name is not None:
            direct = any(f"{PROJECT} (pyproject.toml)" in v for v in vias)
            packages[name] = LockedPackage(name, version, direct)

    for line in path.read_text().splitlines():
        match = _PIN.match(line)
        if match:
            flush()
            name, version, vias = canonicalize_name(match[1]), match[2], []
        elif line.strip().startswith("#") and name is not None:
            vias.append(line.strip().lstrip("#").strip())
    flush()
    return packages


def pyproject_requirements(path: Path = PYPROJECT) -> list[Requirement]:
    """The project's dependencies plus its locked extras, those that apply to the lock's platform."""
    project = tomllib.loads(path.read_text())["project"]
    reqs = [Requirement(r) for r in project["dependencies"]]
    for extra in LOCKED_EXTRAS:
        reqs += [Requirement(r) for r in project.get("optional-dependencies", {}).get(extra, [])]
    return [r for r in reqs if r.marker is None or r.marker.evaluate(LOCK_ENVIRONMENT)]


def pyproject_problems(lock: Path = LOCK, pyproject: Path = PYPROJECT) -> list[str]:
    """One line per disagreement between pyproject.toml and the lock (empty when they agree)."""
    locked = read_lock(lock)
    wanted = {canonicalize_name(r.name): r for r in pyproject_requirements(pyproject)}
    problems = []
    for name, req in sorted(wanted.items()):
        pin = locked.get(name)
        if pin is None:
            problems.append(
                f"{name}: required by pyproject.toml ({req}) but missing from {lock.name}; run `make lock`"
            )
        elif not req.specifier.contains(pin.version, prereleases=True):
            problems.append(
                f"{name}: {lock.name} pins {pin.version}, outside pyproject.toml's {req}; run `make lock`"
            )
    for name, pin in sorted(locked.items()):
        if pin.direct and name not in wanted:
            problems.append(
                f"{name}: {lock.name} says pyproject.toml asks for it, but pyproject.toml does not; run `make lock`"
            )
    return problems


def installed_problems(lock: Path = LOCK) -> list[str]:
    """One line per difference between the running environment and the lock (as `pip freeze`)."""
    locked = read_lock(lock)
    # the environment's own site-packages, as `pip freeze` sees it: not whatever else is on sys.path at
    # the time (Ray, once imported, puts its vendored psutil/colorama there)
    site = sorted({sysconfig.get_paths()["purelib"], sysconfig.get_paths()["platlib"]})
    installed = {canonicalize_name(d.metadata["Name"]): d.version for d in metadata.distributions(path=site)}
    problems = []
    for name, pin in sorted(locked.items()):
        have = installed.get(name)
        if have is None:
            problems.append(f"{name}: locked at {pin.version} but not installed")
        elif have != pin.version:
            problems.append(f"{name}: locked at {pin.version} but {have} is installed")
    for name, have in sorted(installed.items()):
        if name not in locked and name not in NOT_LOCKED:
            problems.append(f"{name}: {have} is installed but not in {lock.name}")
    return problems


def stray_packages(lock: Path = LOCK) -> list[str]:
    """Installed distributions the lock does not hold (left by an older lock): `make` uninstalls them."""
    locked = read_lock(lock)
    site = sorted({sysconfig.get_paths()["purelib"], sysconfig.get_paths()["platlib"]})
    names = {canonicalize_name(d.metadata["Name"]) for d in metadata.distributions(path=site)}
    return sorted(n for n in names if n not in locked and n not in NOT_LOCKED)


def main(argv: list[str]) -> int:
    if argv == ["stray"]:  # names only, one a line, for `pip uninstall`
        print("\n".join(stray_packages()))
        return 0
    checks = {"installed": installed_problems, "pyproject": pyproject_problems}
    if len(argv) != 1 or argv[0] not in checks:
        print(f"usage: python tests/lockcheck.py {'|'.join(checks)}", file=sys.stderr)
        return 2
    problems = checks[argv[0]]()
    for line in problems:
        print(f"lockcheck: {line}", file=sys.stderr)
    if not problems:
        print(f"lockcheck: {argv[0]}: agrees with {LOCK.name} ({len(read_lock())} packages)")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
