"""The package's shape: no import cycles, no hidden imports of its own modules, short functions.

Read with ``ast`` from the source, so the rules hold for every module, imported by a test or not.
"""

from __future__ import annotations

import ast
from collections.abc import Iterator
from pathlib import Path

from conftest import ROOT

PACKAGE = ROOT / "embedtune"
MAX_FUNCTION_LINES = 100


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def sources() -> dict[str, Path]:
    return {module_name(p): p for p in sorted(PACKAGE.rglob("*.py")) if "resources" not in p.parts}


def imported_modules(node: ast.Import | ast.ImportFrom, known: dict[str, Path]) -> list[str]:
    """The package's own modules an import statement loads, parent packages included."""
    if isinstance(node, ast.Import):
        targets = [alias.name for alias in node.names]
    elif node.level or not node.module:
        targets = []
    else:  # `from a.b import c` loads a.b, and a.b.c when that is a module
        targets = [node.module] + [f"{node.module}.{alias.name}" for alias in node.names
                                   if f"{node.module}.{alias.name}" in known]
    found = []
    for target in targets:
        parts = target.split(".")
        found += [".".join(parts[:i]) for i in range(2, len(parts) + 1) if ".".join(parts[:i]) in known]
    return found


def type_checking_only(node: ast.If) -> bool:
    return isinstance(node.test, ast.Name) and node.test.id == "TYPE_CHECKING"


def top_level_imports(tree: ast.Module) -> Iterator[ast.Import | ast.ImportFrom]:
    todo: list[ast.stmt] = list(tree.body)
    while todo:
        node = todo.pop()
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            yield node
        elif isinstance(node, ast.If) and not type_checking_only(node):
            todo += node.body + node.orelse
        elif isinstance(node, ast.Try):
            todo += node.body + node.orelse + node.finalbody + [s for h in node.handlers for s in h.body]


def functions(tree: ast.AST) -> Iterator[ast.FunctionDef | ast.AsyncFunctionDef]:
    for node in ast.walk(tree):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            yield node


def import_graph() -> dict[str, set[str]]:
    known = sources()
    graph: dict[str, set[str]] = {}
    for name, path in known.items():
        tree = ast.parse(path.read_text(encoding="utf-8"))
        graph[name] = {m for node in top_level_imports(tree) for m in imported_modules(node, known)} - {name}
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for nxt in sorted(graph.get(node, ())):
            # A package's __init__ importing its own submodules is how packages load, not a cycle.
            if nxt.startswith(node + "."):
                continue
            if state.get(nxt) == 1:
                return path[path.index(nxt):] + [nxt]
            if nxt not in state and (cycle := visit(nxt)):
                return cycle
        path.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state and (cycle := visit(node)):
            return cycle
    return None


def test_the_package_modules_import_each_other_without_a_cycle() -> None:
    graph = import_graph()
    assert "embedtune.training.trainer" in graph and "embedtune.data.stream" in graph["embedtune.training.trainer"]
    assert find_cycle(graph) is None, " -> ".join(find_cycle(graph) or [])


def test_the_cycle_finder_finds_a_cycle() -> None:
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": set()}) is None


def test_no_function_imports_a_module_of_the_package() -> None:
    known = sources()
    hidden = []
    for path in known.values():
        for function in functions(ast.parse(path.read_text(encoding="utf-8"))):
            for node in ast.walk(function):
                if isinstance(node, (ast.Import, ast.ImportFrom)) and (
                        imported_modules(node, known) or (isinstance(node, ast.ImportFrom) and node.level)):
                    hidden.append(f"{path.relative_to(ROOT)}:{node.lineno} in {function.name}()")
    assert not hidden, "imports of the package's own modules inside functions:\n" + "\n".join(hidden)


def test_no_function_is_longer_than_a_screenful_and_the_loop_reads_in_one() -> None:
    long = []
    for path in sources().values():
        for function in functions(ast.parse(path.read_text(encoding="utf-8"))):
            lines = function.end_lineno - function.lineno + 1  # type: ignore[operator]
            if lines > MAX_FUNCTION_LINES:
                long.append(f"{path.relative_to(ROOT)}:{function.lineno} {function.name}() is {lines} lines")
    assert not long, "\n".join(long)
    trainer = ast.parse((PACKAGE / "training" / "trainer.py").read_text(encoding="utf-8"))
    loop = {f.name: f.end_lineno - f.lineno + 1 for f in functions(trainer)}  # type: ignore[operator]
    assert loop["train"] + loop["_loop"] <= MAX_FUNCTION_LINES


def test_every_command_of_the_table_has_a_main_that_takes_argv() -> None:
    import importlib
    import inspect

    from embedtune.cli import COMMANDS

    for name, (where, _) in COMMANDS.items():
        module, _, function = where.partition(":")
        main = getattr(importlib.import_module(module), function)
        assert list(inspect.signature(main).parameters)[0] == "argv", name
