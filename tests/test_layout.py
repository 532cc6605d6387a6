"""The package's shape: no import circle, imports only run down the layers, the SQLite
worker loads nothing but the codec, every benchmark module imports, and the errors
tree in ``errors.py`` names every error the package defines."""

from __future__ import annotations

import ast
import importlib
import pkgutil
import subprocess
import sys
from pathlib import Path

import pytest

import store_svc
from store_svc import errors

PACKAGE = Path(store_svc.__file__).parent

#: Top-level modules every folder may use: they import nothing but each other.
BASE = {"constants", "core", "errors", "kinds", "settings", "state", "tasks"}
#: What each folder may import besides the base modules and itself. Only ``runtime``
#: (the wiring) and the command line reach into every folder.
ALLOWED = {
    "bus": set(),
    "store": set(),
    "ingest": {"bus", "store"},
    "read": {"bus", "store", "ingest"},
    "control": {"bus", "ingest"},
    "runtime": {"bus", "store", "ingest", "read", "control"},
    "devtools": {"bus", "store", "ingest", "read", "control", "runtime"},
    "cli": {"bus", "store", "ingest", "read", "control", "runtime", "devtools"},
}


def _modules() -> dict[str, Path]:
    found = {}
    for path in PACKAGE.rglob("*.py"):
        parts = path.relative_to(PACKAGE).with_suffix("").parts
        if parts[-1] == "__init__":
            parts = parts[:-1]
        found[".".join(parts)] = path
    return found


def _imports(path: Path, known: set[str]) -> set[str]:
    """The package modules ``path`` imports, wherever the import statement is."""
    out: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        names: list[str] = []
        if isinstance(node, ast.ImportFrom) and node.module:
            assert node.level == 0, f"{path}: relative import (use store_svc.<module>)"
            names = [node.module] + [f"{node.module}.{a.name}" for a in node.names]
        elif isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        for name in names:
            if name == "store_svc" or not name.startswith("store_svc."):
                continue
            dotted = name.removeprefix("store_svc.")
            if dotted in known:
                out.add(dotted)
    return out


def _graph() -> dict[str, set[str]]:
    modules = _modules()
    known = set(modules)
    return {name: _imports(path, known) - {name} for name, path in modules.items() if name}


def _folder(module: str) -> str:
    return module.split(".")[0]


@pytest.mark.logic
def test_no_module_imports_itself_back_through_others() -> None:
    graph = _graph()
    # Tarjan-free check: a depth-first walk that meets a module on its own path.
    state: dict[str, int] = {}
    path: list[str] = []

    def visit(node: str) -> None:
        state[node] = 1
        path.append(node)
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                cycle = [*path[path.index(nxt) :], nxt]
                pytest.fail("import circle: " + " -> ".join(cycle))
            if nxt not in state:
                visit(nxt)
        path.pop()
        state[node] = 2

    for node in sorted(graph):
        if node not in state:
            visit(node)


@pytest.mark.logic
def test_imports_run_down_the_layers() -> None:
    wrong = []
    for module, imported in sorted(_graph().items()):
        folder = _folder(module)
        for target in sorted(imported):
            tfolder = _folder(target)
            if tfolder in BASE or tfolder == folder or module == "__main__":
                if folder in BASE and tfolder not in BASE:
                    wrong.append(f"{module} -> {target} (a base module reaches into a folder)")
                continue
            if tfolder not in ALLOWED.get(folder, set()):
                wrong.append(f"{module} -> {target}")
    assert not wrong, "imports against the layers:\n" + "\n".join(wrong)


@pytest.mark.logic
def test_the_sqlite_worker_imports_only_the_codec() -> None:
    # It runs as a child process per writer and reader: it must start small.
    assert _graph()["store.sqlite_worker"] == {"store.codec"}
    assert _graph()["store.codec"] == set()


@pytest.mark.logic
def test_the_errors_tree_lists_every_store_error() -> None:
    for info in pkgutil.walk_packages(store_svc.__path__, "store_svc."):
        if not info.name.endswith("__main__"):
            importlib.import_module(info.name)

    def subclasses(cls: type) -> set[type]:
        found = set(cls.__subclasses__())
        for sub in list(found):
            found |= subclasses(sub)
        return found

    ours = {c for c in subclasses(errors.StoreError) if c.__module__.startswith("store_svc")}
    # (column where the name starts, name) per line of the drawn tree.
    drawn: list[tuple[int, str]] = []
    for line in (errors.__doc__ or "").splitlines():
        if "── " in line:
            col = line.index("── ") + 3
        elif line.strip() == "StoreError":
            col = line.index("StoreError")
        else:
            continue
        drawn.append((col, line[col:].split()[0]))
    names = [name for _, name in drawn]
    assert sorted(names) == sorted({c.__name__ for c in ours} | {"StoreError"})
    for i, (col, name) in enumerate(drawn[1:], 1):
        parent = next(n for c, n in reversed(drawn[:i]) if c == col - 4)
        cls = next(c for c in ours if c.__name__ == name)
        assert cls.__mro__[1].__name__ == parent, f"{name} is drawn under {parent}"
        assert cls.__module__ == "store_svc.errors", f"{name} lives outside errors.py"
        assert name in errors.__all__


def test_a_worker_process_loads_the_standard_library_and_msgspec_only() -> None:
    """What the child process really imports, third-party packages included."""
    code = (
        "import sys, store_svc.store.sqlite_worker; "
        "print('\\n'.join(sorted(m for m in sys.modules if '.' not in m)))"
    )
    out = subprocess.run(
        [sys.executable, "-P", "-c", code], capture_output=True, text=True, check=True
    ).stdout.split()
    stdlib = set(sys.stdlib_module_names)
    others = {m for m in out if m.lstrip("_") not in stdlib and m not in stdlib}
    # msgspec brings typing_extensions; an editable install adds its path finder.
    allowed = {"msgspec", "typing_extensions", "store_svc", "__main__", "_distutils_hack"}
    assert {m for m in others if not m.startswith("__editable__")} <= allowed
    for heavy in ("pydantic", "nats", "asyncpg", "market_data_core", "uvloop"):
        assert heavy not in out


@pytest.mark.logic
def test_every_benchmark_module_imports() -> None:
    # Benchmarks are not tests, but one that no longer imports breaks CI's smoke run.
    root = PACKAGE.parent / "benchmarks"
    for path in sorted(root.glob("*.py")):
        if path.stem != "__init__":
            importlib.import_module(f"benchmarks.{path.stem}")
