"""The packages of slimkit depend on each other one way: foundation -> methods -> workflows -> CLI.

The graph is read from the source with ``ast`` (every ``import`` statement, also those inside
functions, which a lazy import would otherwise hide), so the test needs nothing imported.
A package is a top-level folder of ``slimkit/`` (``slimkit/quant/methods/gptq.py`` is in
``quant``); the modules directly in ``slimkit/`` (``__init__.py``, ``cli.py``, ``demo.py``: the
public API and the command line, the top of the stack) are the package ``slimkit``.

Run ``python tests/test_import_structure.py`` to print the package -> package edges.
"""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1] / "slimkit"

# the foundation every pillar stands on: it imports no other slimkit package
FOUNDATION = {"core"}


def _package_of_file(path: Path) -> str:
    rel = path.relative_to(ROOT).parent.parts
    return rel[0] if rel else "slimkit"


def _package_of_module(module: str) -> str | None:
    """``slimkit.quant.methods.gptq`` -> ``quant``; a name outside slimkit -> None."""
    parts = module.split(".")
    if parts[0] != "slimkit":
        return None
    return parts[1] if len(parts) > 1 and ROOT.joinpath(parts[1]).is_dir() else "slimkit"


def import_edges() -> dict[tuple[str, str], list[str]]:
    """(importing package, imported package) -> ["file:line", ...] for every slimkit import."""
    edges: dict[tuple[str, str], list[str]] = {}
    for path in sorted(ROOT.rglob("*.py")):
        src_pkg = _package_of_file(path)
        tree = ast.parse(path.read_text(), filename=str(path))
        for node in ast.walk(tree):
            targets: list[str] = []
            if isinstance(node, ast.Import):
                # a bare `import slimkit` only names the root package, which every slimkit module
                # has imported already as its parent (plugin discovery reads slimkit.__path__)
                targets = [a.name for a in node.names if a.name != "slimkit"]
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                # `from slimkit import data` imports the package slimkit.data
                targets = [
                    f"{node.module}.{a.name}"
                    if ROOT.joinpath(*node.module.split(".")[1:], a.name).is_dir()
                    else node.module
                    for a in node.names
                ]
            for t in targets:
                dst = _package_of_module(t)
                if dst is None or dst == src_pkg:
                    continue
                where = f"{path.relative_to(ROOT.parent)}:{node.lineno}"
                edges.setdefault((src_pkg, dst), []).append(where)
    return edges


def test_no_two_packages_import_each_other():
    """Catches a cycle such as llm <-> quant (llm.pipeline imported quant.quantizer while every
    quant method imported llm.pipeline) or export <-> llm (export.runtime <-> llm.workflow)."""
    edges = import_edges()
    cycles = sorted(
        f"{a} <-> {b}: {edges[(a, b)][0]} and {edges[(b, a)][0]}"
        for (a, b) in edges
        if a < b and (b, a) in edges
    )
    assert not cycles, "packages import each other:\n" + "\n".join(cycles)


def test_graph_has_no_longer_cycle():
    """A cycle through three packages (a -> b -> c -> a) is as tangled as a two-way edge."""
    graph: dict[str, set[str]] = {}
    for a, b in import_edges():
        graph.setdefault(a, set()).add(b)
    state: dict[str, int] = {}  # 1 = on the current path, 2 = done

    def visit(n: str, path: list[str]) -> list[str] | None:
        state[n] = 1
        for m in sorted(graph.get(n, ())):
            if state.get(m) == 1:
                return path + [n, m]
            if m not in state:
                found = visit(m, path + [n])
                if found:
                    return found
        state[n] = 2
        return None

    for n in sorted(graph):
        if n not in state:
            cycle = visit(n, [])
            assert cycle is None, "import cycle: " + " -> ".join(cycle)


def test_core_imports_no_other_slimkit_package():
    """Catches the foundation reaching up into a pillar (core must stand on nothing)."""
    bad = sorted(
        f"{a} -> {b} ({where[0]})"
        for (a, b), where in import_edges().items()
        if a.split(".")[0] in FOUNDATION and b.split(".")[0] not in FOUNDATION
    )
    assert not bad, "the foundation imports a pillar:\n" + "\n".join(bad)


if __name__ == "__main__":
    for (a, b), where in sorted(import_edges().items()):
        print(f"{a:>14} -> {b:<14} ({len(where)} imports, e.g. {where[0]})")
