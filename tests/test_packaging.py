"""The install is quiet: every folder setuptools would see as an importable package under the mapped
source folders is named in `packages`, so `pip install -e .` prints no 40-line "Package would be ignored"
banner, and the JSON Schemas ship as package data of the packages that hold them."""

from pathlib import Path

import tomllib

ROOT = Path(__file__).resolve().parent.parent


def test_every_importable_folder_is_a_declared_package_and_the_schemas_are_package_data():
    setup = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    packages, dirs = set(setup["packages"]), setup["package-dir"]
    found = set()
    for name, folder in dirs.items():
        for sub in [ROOT / folder, *(p for p in (ROOT / folder).rglob("*") if p.is_dir())]:
            rel = sub.relative_to(ROOT / folder)
            if any(part.startswith((".", "_")) or part == "__pycache__" for part in rel.parts):
                continue
            if any(f.is_file() for f in sub.iterdir()):
                found.add(".".join([name, *rel.parts]))
    assert found - packages == set()
    data = setup["package-data"]
    for pkg in ("sak.pipeline.schema", "sak.student.schema"):
        assert pkg in packages and data[pkg] == ["*.schema.json"]
