"""The locked environment: pyproject.toml and requirements.lock agree, and `make test` runs in exactly
the lock. No network: these read files and the installed distributions' metadata."""

from __future__ import annotations

import re
import shutil
import sys
from pathlib import Path

import pytest
from lockcheck import LOCK, PYPROJECT, ROOT, installed_problems, pyproject_problems, read_lock


def test_pyproject_and_lock_agree():
    problems = pyproject_problems()
    assert not problems, "\n".join(problems)


def test_lock_pins_the_tested_builds():
    locked = read_lock()
    assert locked["torch"].version == "2.14.1" and locked["torchvision"].version == "0.29.1"
    assert {"zarr", "ray", "timm", "pytest"} <= set(locked)
    assert all(p.version for p in locked.values())


def test_a_dependency_missing_from_the_lock_is_named(tmp_path):
    lock = tmp_path / "requirements.lock"
    text = LOCK.read_text()
    block = re.search(r"^zarr==.*?(?=^\S|\Z)", text, flags=re.M | re.S)  # the zarr entry and its hashes
    lock.write_text(text[: block.start()] + text[block.end() :])
    problems = pyproject_problems(lock=lock)
    assert len(problems) == 1 and problems[0].startswith("zarr: required by pyproject.toml"), problems


def test_a_dependency_added_to_pyproject_only_is_named(tmp_path):
    pyproject = tmp_path / "pyproject.toml"
    pyproject.write_text(
        PYPROJECT.read_text().replace('    "tqdm>=4.66",\n', '    "tqdm>=4.66",\n    "Fancy_Lib>=1.2",\n')
    )
    assert "Fancy_Lib" in pyproject.read_text()
    problems = pyproject_problems(pyproject=pyproject)
    assert len(problems) == 1 and problems[0].startswith("fancy-lib: required by pyproject.toml"), problems


def test_a_lower_bound_above_the_pin_is_named(tmp_path):
    pyproject = tmp_path / "pyproject.toml"
    pyproject.write_text(PYPROJECT.read_text().replace('"zarr>=3.0.8"', '"zarr>=99"'))
    problems = pyproject_problems(pyproject=pyproject)
    assert len(problems) == 1 and "zarr: requirements.lock pins" in problems[0], problems


def test_a_dependency_dropped_from_pyproject_is_named(tmp_path):
    pyproject = tmp_path / "pyproject.toml"
    pyproject.write_text(PYPROJECT.read_text().replace('    "tqdm>=4.66",\n', ""))
    problems = pyproject_problems(pyproject=pyproject)
    assert len(problems) == 1 and problems[0].startswith("tqdm: requirements.lock says"), problems


def test_lock_names_the_command_that_regenerates_it():
    header = LOCK.read_text().splitlines()[:2]
    assert header[1].strip().startswith("#    uv pip compile pyproject.toml"), header
    flags = header[1].split("uv pip compile", 1)[1].split()
    makefile = (ROOT / "Makefile").read_text()
    recipe = makefile[makefile.index("\nlock:") :].split("\n\n")[0].replace("\\\n", " ")
    assert all(flag in recipe.split() for flag in flags if flag != "requirements.lock"), (flags, recipe)


@pytest.mark.skipif(
    Path(sys.prefix).resolve() != (ROOT / ".venv").resolve(), reason="runs in the repo's .venv (make test)"
)
def test_the_venv_is_exactly_the_lock():
    problems = installed_problems()
    assert not problems, "\n".join(problems)


def test_installed_check_names_a_stray_package(tmp_path):
    lock = tmp_path / "requirements.lock"
    shutil.copy(LOCK, lock)
    text = lock.read_text()
    block = re.search(r"^numpy==.*?(?=^\S|\Z)", text, flags=re.M | re.S)
    lock.write_text(text[: block.start()] + text[block.end() :])
    problems = installed_problems(lock=lock)
    assert any(p.startswith("numpy: ") and "not in requirements.lock" in p for p in problems), problems


def test_installed_check_ignores_what_ray_puts_on_sys_path():
    import ray  # noqa: F401  (importing Ray prepends its vendored third-party packages to sys.path)

    assert not any(p.startswith(("psutil:", "colorama:")) for p in installed_problems())


def test_stray_names_what_the_lock_does_not_hold(tmp_path):
    lock = tmp_path / "requirements.lock"
    text = LOCK.read_text()
    block = re.search(r"^numpy==.*?(?=^\S|\Z)", text, flags=re.M | re.S)
    lock.write_text(text[: block.start()] + text[block.end() :])
    from lockcheck import stray_packages

    assert "numpy" in stray_packages(lock=lock)
