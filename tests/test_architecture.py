"""The code's map holds: which package may import which, no import circles, and the architecture document names only
modules that exist.

Layers, bottom up (docs/architecture.md, "Packages"):
- `crlft/`: the core (data, training, inference, registry, evaluation); knows nothing of Ray's glue, so imports
  nothing of `cluster/`, `jobs/` or `services/`;
- `cluster/`: the Ray session every command opens; imports only the core;
- `services/`: the endpoint (HTTP, the OpenAI protocol, the replica); imports the core and `cluster/`, never `jobs/`;
- `jobs/`: the stages as Ray jobs; may deploy the endpoint (`services.local`).
Imports inside functions count as much as those at the top (a circle through a function-level import is still a
circle); imports under `if TYPE_CHECKING:` do not (they are not run).
"""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
PACKAGES = ("crlft", "cluster", "services", "jobs")
FORBIDDEN = {  # package -> packages it must not import
    "crlft": {"cluster", "services", "jobs", "benchmarks"},
    "cluster": {"services", "jobs", "benchmarks"},
    "services": {"jobs", "benchmarks"},
    "jobs": set(),
}


def module_files() -> dict[str, Path]:
    modules = {}
    for package in PACKAGES:
        for path in (REPO / package).rglob("*.py"):
            name = ".".join(path.relative_to(REPO).with_suffix("").parts).removesuffix(".__init__")
            modules[name] = path
    return modules


def imported_names(path: Path) -> set[str]:
    """Every module name an import statement of the file names, `from a import b` as `a.b` too (b may be a module)."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    type_only = {id(node) for stmt in ast.walk(tree) if isinstance(stmt, ast.If) and "TYPE_CHECKING" in
                 ast.unparse(stmt.test) for node in ast.walk(stmt)}
    names = set()
    for node in ast.walk(tree):
        if id(node) in type_only:
            continue
        if isinstance(node, ast.Import):
            names |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names |= {node.module} | {f"{node.module}.{alias.name}" for alias in node.names}
    return names


def import_graph() -> dict[str, set[str]]:
    """Module -> the project's modules it imports (the longest project module each import name starts with)."""
    modules = module_files()
    graph = {}
    for name, path in modules.items():
        targets = set()
        for imported in imported_names(path):
            parts = imported.split(".")
            found = next((".".join(parts[:i]) for i in range(len(parts), 0, -1) if ".".join(parts[:i]) in modules),
                         None)
            if found is not None and found != name:
                targets.add(found)
            elif parts[0] == "benchmarks":
                targets.add("benchmarks")
        graph[name] = targets
    return graph


def circles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected groups of more than one module (Tarjan); a package's `__init__` importing its own modules
    is not a circle."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    found: list[list[str]] = []

    def visit(module: str) -> None:
        index[module] = low[module] = len(index)
        stack.append(module)
        for target in graph.get(module, set()):
            if target.startswith(module + ".") or target not in graph:
                continue
            if target not in index:
                visit(target)
                low[module] = min(low[module], low[target])
            elif target in stack:
                low[module] = min(low[module], index[target])
        if low[module] == index[module]:
            group = []
            while True:
                member = stack.pop()
                group.append(member)
                if member == module:
                    break
            if len(group) > 1:
                found.append(sorted(group))

    for module in sorted(graph):
        if module not in index:
            visit(module)
    return found


def test_each_package_imports_only_the_layers_below_it() -> None:
    wrong = [f"{module} imports {target}" for module, targets in sorted(import_graph().items())
             for target in sorted(targets) if target.split(".")[0] in FORBIDDEN[module.split(".")[0]]]
    assert wrong == []


def test_no_module_imports_itself_through_others() -> None:
    assert circles(import_graph()) == []


def test_the_checks_see_a_forbidden_import_and_a_circle() -> None:
    graph = {"crlft.a": {"crlft.b", "jobs.x"}, "crlft.b": {"crlft.a"}, "jobs.x": set()}
    assert circles(graph) == [["crlft.a", "crlft.b"]]
    assert "jobs" in FORBIDDEN["crlft"]


@pytest.mark.parametrize("document", ["docs/architecture.md", "README.md"])
def test_every_module_the_documents_name_exists(document: str) -> None:
    text = (REPO / document).read_text(encoding="utf-8")
    named = set(re.findall(r"\b((?:crlft|cluster|services|jobs|benchmarks|tests)/[\w/]*\w\.py)\b", text))
    assert named, f"{document} names no module"
    assert sorted(p for p in named if not (REPO / p).is_file()) == []
