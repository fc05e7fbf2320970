"""Each layer imports only downward: no import circle among cifarlens's modules.

Every import counts, at module level or inside a function (as import-linter's grimp counts
them): a lazy import still ties two modules into one."""

import ast
from pathlib import Path

SRC = Path(__file__).resolve().parents[1] / "src"


def import_graph() -> dict[str, set[str]]:
    modules = {}
    for path in SRC.rglob("*.py"):
        name = ".".join(path.relative_to(SRC).with_suffix("").parts)
        modules[name.removesuffix(".__init__")] = path

    def owner(name: str) -> str | None:  # "cifarlens.data.base.Split" -> "cifarlens.data.base"
        while name and name not in modules:
            name = name.rpartition(".")[0]
        return name or None

    graph: dict[str, set[str]] = {m: set() for m in modules}
    for module, path in modules.items():
        package = module if path.name == "__init__.py" else module.rpartition(".")[0]
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:  # relative import
                    parts = package.split(".")[: len(package.split(".")) - node.level + 1]
                    base = ".".join(parts + ([base] if base else []))
                names = [base] + [f"{base}.{a.name}" for a in node.names]
            else:
                continue
            graph[module] |= {o for n in names if n.startswith("cifarlens") and (o := owner(n)) and o != module}
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while (w := stack.pop()) != v:
                component.append(w)
            if component:
                found.append(sorted([v, *component]))

    for v in graph:
        if v not in index:
            visit(v)
    return found


def test_the_cycle_finder_finds_a_circle():
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert cycles({"a": {"b"}, "b": set()}) == []


def test_no_import_circle_in_cifarlens():
    graph = import_graph()
    assert "cifarlens.engine" in graph and "cifarlens.device" in graph["cifarlens.engine"]
    assert cycles(graph) == []


def test_the_package_gives_its_api_and_its_modules_on_first_use():
    """cifarlens.export.load_exported(...), as the docs write it, failed after a bare `import cifarlens`."""
    import subprocess
    import sys

    code = ("import sys, cifarlens; assert 'cifarlens.export' not in sys.modules; "
            "assert callable(cifarlens.export.load_exported) and callable(cifarlens.load_run); "
            "assert {'export', 'load_run', 'train', 'tune'} <= set(dir(cifarlens)); "
            "assert not hasattr(cifarlens, 'nothing')")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
