"""The import graph of `sak`: no cycles, and no module imports another module's private names.

Every module is read with `ast`, never imported, so an import inside a function or under
`if TYPE_CHECKING:` counts as much as one at the top: a circle hidden in a lazy import is still a circle.
Edges: `import sak.a.b` -> sak.a.b; `from sak.a import b` -> sak.a, and sak.a.b when b is a submodule;
relative imports are resolved against the importing module's package.
"""

from __future__ import annotations

import ast
import importlib
import pkgutil
from collections.abc import Iterable
from pathlib import Path

import pytest
import tomllib

PYPROJECT = Path(__file__).resolve().parents[1] / "pyproject.toml"


def shipped_packages() -> list[str]:
    """The packages `pip install .` ships (pyproject's [tool.setuptools] packages)."""
    return list(tomllib.loads(PYPROJECT.read_text())["tool"]["setuptools"]["packages"])


def sak_modules() -> dict[str, Path]:
    """Every module under `sak` -> its source file, found by walking the installed packages.

    `sak` itself is a namespace package (its subpackages map onto the repository's top-level folders), and
    an editable install's namespace path cannot be walked, so the walk starts at its first-level packages;
    its own top level holds only `sak.__main__` (`python -m sak`).
    """
    tops = sorted({".".join(name.split(".")[:2]) for name in shipped_packages()} - {"sak"})
    found: dict[str, Path] = {"sak.__main__": Path(importlib.util.find_spec("sak.__main__").origin)}
    for top in tops:
        package = importlib.import_module(top)  # the package's __init__ only; its modules are parsed
        found[top] = Path(package.__file__)
        for info in pkgutil.walk_packages(package.__path__, top + "."):
            spec = importlib.util.find_spec(info.name)
            assert spec is not None and spec.origin is not None, info.name
            found[info.name] = Path(spec.origin)
    return found


def is_package(path: Path) -> bool:
    return path.name == "__init__.py"


def resolve(module: str, path: Path, node: ast.ImportFrom) -> str | None:
    """The absolute module an ImportFrom names (None when it is outside `sak`)."""
    if node.level == 0:
        return node.module
    package = module if is_package(path) else module.rpartition(".")[0]
    for _ in range(node.level - 1):
        package = package.rpartition(".")[0]
    return f"{package}.{node.module}" if node.module else package


def imports_of(module: str, path: Path, known: Iterable[str]) -> tuple[set[str], list[tuple[str, str]]]:
    """(sak modules `module` imports, [(source module, private name)] it takes from other sak modules)."""
    known = set(known)
    edges: set[str] = set()
    private: list[tuple[str, str]] = []
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            edges.update(a.name for a in node.names if a.name in known)
        elif isinstance(node, ast.ImportFrom):
            source = resolve(module, path, node)
            if source is None or source not in known:
                continue
            edges.add(source)
            for alias in node.names:
                sub = f"{source}.{alias.name}"
                if sub in known:
                    edges.add(sub)
                if alias.name.startswith("_") and not alias.name.startswith("__") and source != module:
                    private.append((sub if sub in known else source, alias.name))
    edges.discard(module)
    return edges, private


def import_graph(modules: dict[str, Path]) -> tuple[dict[str, set[str]], dict[str, list[tuple[str, str]]]]:
    graph, private = {}, {}
    for name, path in modules.items():
        graph[name], private[name] = imports_of(name, path, modules)
    return graph, private


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """One concrete circle (a -> b -> ... -> a) per strongly connected component of more than one module."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    components: list[list[str]] = []

    def connect(v: str) -> None:  # Tarjan; the graph has ~60 nodes, so recursion depth is no concern
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph[v]):
            if w not in index:
                connect(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                components.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            connect(v)
    return [circle_in(graph, set(c)) for c in components]


def circle_in(graph: dict[str, set[str]], component: set[str]) -> list[str]:
    """A shortest path from the component's first module back to itself, inside the component."""
    start = min(component)
    previous: dict[str, str] = {}
    frontier = [start]
    while frontier:
        nxt = []
        for v in frontier:
            for w in sorted(graph[v] & component):
                if w == start:
                    path = [v]
                    while path[-1] != start:
                        path.append(previous[path[-1]])
                    return [start, *reversed(path[:-1]), start]
                if w not in previous:
                    previous[w] = v
                    nxt.append(w)
        frontier = nxt
    raise AssertionError(f"{sorted(component)} is not strongly connected")


# ------------------------------------------------------------------------------------------------ tests


@pytest.fixture(scope="module")
def graph():
    return import_graph(sak_modules())


def test_every_package_is_shipped():
    """A subpackage missing from pyproject's `packages` works in the editable install and is lost by
    `pip install .`; every package the walk finds must be listed."""
    shipped = set(shipped_packages())
    packages = {name for name, path in sak_modules().items() if is_package(path)}
    assert packages <= shipped, f"add {sorted(packages - shipped)} to [tool.setuptools] packages"
    assert {"sak.student.model", "sak.student.data", "sak.student.train"} <= packages


def test_no_import_cycles(graph):
    edges, _ = graph
    assert len(edges) > 40 and any(edges.values())  # the walk saw the package, not an empty namespace
    found = cycles(edges)
    assert not found, "import cycles: " + "; ".join(" -> ".join(c) for c in found)


def test_no_private_names_across_modules(graph):
    _, private = graph
    offences = [f"{m} imports {name} from {src}" for m, items in private.items() for src, name in items]
    assert not offences, "private names imported across modules: " + "; ".join(offences)


def test_benchmarks_do_not_import_the_tests():
    """bench/ scripts take shared helpers (e.g. sak.pipeline.sources.synthetic) from the package, never from tests/."""
    offences = []
    for path in sorted((PYPROJECT.parent / "bench").glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            names = []
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                names = [node.module]
            offences += [f"{path.name}: {n}" for n in names if n.split(".")[0] in ("tests", "conftest")]
    assert not offences, "benchmarks import the tests: " + "; ".join(offences)


def test_the_checks_see_a_cycle_and_a_private_import(tmp_path):
    """The checks themselves: a circle hidden in a lazy relative import and a private name are reported."""
    (tmp_path / "pkg").mkdir()
    files = {
        "pkg": ("pkg/__init__.py", ""),
        "pkg.a": ("pkg/a.py", "from pkg.b import helper\n"),
        "pkg.b": ("pkg/b.py", "def helper():\n    from .c import _secret\n    return _secret\n"),
        "pkg.c": ("pkg/c.py", "import pkg.a\n_secret = 1\n"),
        "pkg.d": ("pkg/d.py", "from pkg import a\n"),
    }
    modules = {}
    for name, (rel, text) in files.items():
        (tmp_path / rel).write_text(text)
        modules[name] = tmp_path / rel
    edges, private = import_graph(modules)
    assert edges["pkg.d"] == {"pkg", "pkg.a"}
    assert cycles(edges) == [["pkg.a", "pkg.b", "pkg.c", "pkg.a"]]
    assert private["pkg.b"] == [("pkg.c", "_secret")]
    edges["pkg.c"].discard("pkg.a")
    assert cycles(edges) == []


def _imported_roots(path: Path) -> set[str]:
    """Every module an `import` or `from ... import` of this file names (absolute imports), anywhere in it."""
    names = set()
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            names.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names.add(node.module)
    return names


def test_no_module_under_student_imports_ray():
    """Ray belongs to the pipeline's builders (pipeline/extraction/): the trainer package imports none of
    it, lazily or not (the stage-2 cache builder runs on the pipeline's actor pool)."""
    student = PYPROJECT.parent / "student"
    offences = [
        f"{path.relative_to(student.parent)}: {name}"
        for path in sorted(student.rglob("*.py"))
        for name in sorted(_imported_roots(path))
        if name == "ray" or name.startswith("ray.")
    ]
    assert not offences, "student/ imports ray: " + "; ".join(offences)


def test_the_pipeline_is_the_ground_floor(graph):
    """sak.pipeline imports nothing of the trainer, the kernels or the CLI (they stand on it), and its
    base/ imports nothing of the pipeline above it."""
    edges, _ = graph
    up = [f"{m} -> {t}" for m, ts in edges.items() if m.startswith("sak.pipeline") for t in sorted(ts)
          if t.startswith(("sak.student", "sak.kernels", "sak.cli"))]  # fmt: skip
    base = [f"{m} -> {t}" for m, ts in edges.items() if m.startswith("sak.pipeline.base") for t in sorted(ts)
            if t.startswith("sak.pipeline") and not t.startswith("sak.pipeline.base")]  # fmt: skip
    assert not up and not base, "imports against the floors: " + "; ".join(up + base)
    assert any(t.startswith("sak.pipeline") for t in edges["sak.student.data.loader"])  # the check sees edges
