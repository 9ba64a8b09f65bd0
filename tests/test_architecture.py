"""The package's shape, enforced (ARCHITECTURE.md): layers and forbidden imports (import-linter contracts
in pyproject.toml), no import cycle between modules of `proxy/`, counting imports inside functions and
under TYPE_CHECKING, and no import placed inside a function to put off a cycle.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
PACKAGE = REPO / "proxy"
# Imports inside a function that are not there to dodge a cycle: none of the proxy's own modules.
LATE_IMPORTS_ALLOWED: set[tuple[str, str]] = set()


def module_name(path: Path) -> str:
    parts = path.relative_to(REPO).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports(path: Path, modules: set[str]) -> list[tuple[str, bool]]:
    """(imported module of `proxy`, whether the import is inside a function) for each import in `path`."""
    name = module_name(path)
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    tree = ast.parse(path.read_text())
    inside = {id(n) for f in ast.walk(tree) if isinstance(f, ast.FunctionDef | ast.AsyncFunctionDef)
              for n in ast.walk(f) if isinstance(n, ast.Import | ast.ImportFrom)}
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(anchor + ([node.module] if node.module else []))
            for alias in node.names:
                target = f"{base}.{alias.name}" if f"{base}.{alias.name}" in modules else base
                if target in modules:
                    found.append((target, id(node) in inside))
        elif isinstance(node, ast.Import):
            found += [(a.name, id(node) in inside) for a in node.names if a.name in modules]
    return found


def graph() -> tuple[dict[str, set[str]], list[tuple[str, str]]]:
    files = {module_name(p): p for p in PACKAGE.rglob("*.py")}
    edges: dict[str, set[str]] = {m: set() for m in files}
    late = []
    for name, path in files.items():
        for target, in_function in imports(path, set(files)):
            if target != name:
                edges[name].add(target)
            if in_function and (name, target) not in LATE_IMPORTS_ALLOWED:
                late.append((name, target))
    return edges, late


def cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on: set[str] = set()
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in edges[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for v in edges:
        if v not in index:
            visit(v)
    return found


def test_no_import_cycle_and_no_import_put_off_into_a_function():
    edges, late = graph()
    assert cycles(edges) == []
    assert late == [], "imports of the proxy's own modules inside functions (move them to the top)"


def test_the_cycle_check_sees_a_cycle():
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


def test_the_import_contracts_hold():
    """The layers and forbidden imports of pyproject.toml's [tool.importlinter] (ARCHITECTURE.md)."""
    out = subprocess.run([sys.executable, "-c", "import sys; from importlinter.cli import lint_imports_command;"
                          "sys.exit(lint_imports_command())"], cwd=REPO, capture_output=True, text=True)
    assert out.returncode == 0, out.stdout + out.stderr
    assert "0 broken" in out.stdout


# Modules over 400 lines, each with the reason it stays one module.
LONG_MODULES = {
    "proxy/upstream/transport.py": "one concept: the receiving side of the archive HTTP/1.1 client (buffers, "
                                   "head parsing, body framing, relay hand-off), measured as one unit",
    "proxy/cache/store.py": "one concept: the frame cache's two tiers and their keys; the cache phase of issue "
                            "23 point 3 is to take its lookups out",
    "proxy/upstream/splice.py": "one concept: the splice relay on both sides (archive socket, pipe, client "
                                "socket) with its timeouts",
    "proxy/demo/archive.py": "the demo's sample archive and the tests' fault injector: a small DICOMweb "
                             "server of its own, not part of the proxy's request path",
}


def test_modules_and_functions_stay_readable():
    """No function over 80 lines; no module over 400 without a stated reason (LONG_MODULES)."""
    long_functions, long_modules = [], []
    for path in sorted(PACKAGE.rglob("*.py")):
        text = path.read_text()
        rel = str(path.relative_to(REPO))
        if text.count("\n") > 400 and rel not in LONG_MODULES:
            long_modules.append((rel, text.count("\n")))
        for node in ast.walk(ast.parse(text)):
            if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef) and node.end_lineno is not None \
                    and node.end_lineno - node.lineno + 1 > 80:
                long_functions.append((rel, node.name, node.end_lineno - node.lineno + 1))
    assert long_functions == [] and long_modules == []
