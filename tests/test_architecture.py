"""The import rules of docs/architecture.md, read from the code itself.

Every .py file's imports (module level and inside functions alike) are read with `ast`:
- model/ imports only torch, the standard library and model/ itself;
- no package imports a root script (an entry point) or bench/, experiments/, tests/;
- no root script imports another root script;
- bench/ and experiments/ run as `python -m ...` and never edit sys.path;
- the package dependency graph has no cycle, and is the one docs/architecture.md draws.

Packages are found, not listed: every directory at the root with an __init__.py. Each
failure names file:line."""
from __future__ import annotations

import ast
import re
import sys
from functools import cache
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
APPS = ("bench", "experiments", "tests")  # run as commands; nothing may import them
MODEL_MAY_IMPORT = {"torch"}  # beyond the standard library and model/ itself
SKIP = {"__pycache__", "runs", "outputs", "multirun", "build", "dist", "wandb"}


def python_files() -> list[Path]:
    return sorted(p for p in ROOT.rglob("*.py")
                  if not any(part.startswith(".") or part in SKIP or part.endswith(".egg-info")
                             for part in p.relative_to(ROOT).parts[:-1]))


def packages() -> set[str]:
    """The library packages: dirs at the root with an __init__.py, less the apps."""
    return {p.parent.name for p in ROOT.glob("*/__init__.py")} - set(APPS)


def root_scripts() -> set[str]:
    return {p.stem for p in ROOT.glob("*.py")}


def unit(path: Path) -> str:
    """Which unit a file belongs to: its top dir (a package or an app), or the root script."""
    rel = path.relative_to(ROOT)
    return rel.parts[0] if len(rel.parts) > 1 else rel.stem


@cache
def imports(path: Path) -> list[tuple[int, str]]:
    """(line, dotted module) for every import in the file; relative imports resolved."""
    tree = ast.parse(path.read_text(), str(path))
    package = list(path.relative_to(ROOT).parent.parts)
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [(node.lineno, a.name) for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package[:len(package) - node.level + 1]
                module = ".".join(base + ([node.module] if node.module else []))
            else:
                module = node.module
            found.append((node.lineno, module))
    return found


def where(path: Path, line: int) -> str:
    return f"{path.relative_to(ROOT)}:{line}"


def local_units() -> set[str]:
    return packages() | set(APPS) | root_scripts()


def dependency_graph() -> dict[str, set[str]]:
    """package -> the other packages it imports."""
    ours = packages()
    graph: dict[str, set[str]] = {p: set() for p in ours}
    for path in python_files():
        if unit(path) in ours:
            for _, module in imports(path):
                top = module.split(".")[0]
                if top in ours and top != unit(path):
                    graph[unit(path)].add(top)
    return graph


def show(graph: dict[str, set[str]]) -> str:
    return "\n".join(f"  {p} -> {', '.join(sorted(d)) or '(nothing)'}"
                     for p, d in sorted(graph.items()))


def test_packages_are_found():
    """The discovery is not vacuous: model/ and a few others are packages, train.py a
    root script, and every package's files are read."""
    assert {"model", "cli", "data", "store"} <= packages()
    assert {"train", "generate", "evaluate"} <= root_scripts()
    assert any(module.startswith("torch") for p in (ROOT / "model").glob("*.py")
               for _, module in imports(p))


def test_model_imports_only_torch_and_the_standard_library():
    bad = []
    for path in python_files():
        if unit(path) != "model":
            continue
        for line, module in imports(path):
            top = module.split(".")[0]
            if top not in sys.stdlib_module_names and top not in MODEL_MAY_IMPORT \
                    and top != "model":
                bad.append(f"{where(path, line)} imports {module}")
    assert not bad, "model/ may import only torch, the standard library and model/:\n" \
        + "\n".join(bad)


def test_packages_never_import_entry_points_or_apps():
    forbidden = root_scripts() | set(APPS)
    bad = [f"{where(path, line)} ({unit(path)}/) imports {module}"
           for path in python_files() if unit(path) in packages()
           for line, module in imports(path) if module.split(".")[0] in forbidden]
    assert not bad, "a package imports an entry point, bench/, experiments/ or tests/:\n" \
        + "\n".join(bad)


def test_no_root_script_imports_another():
    scripts = root_scripts()
    bad = [f"{where(path, line)} imports {module}"
           for path in ROOT.glob("*.py") for line, module in imports(path)
           if module.split(".")[0] in scripts - {path.stem}]
    assert not bad, "a root script imports another root script:\n" + "\n".join(bad)


def test_apps_never_import_tests_and_bench_experiments_are_independent():
    """bench/ and experiments/ use the packages, not each other's code or the tests'."""
    bad = [f"{where(path, line)} imports {module}"
           for path in python_files() if unit(path) in ("bench", "experiments")
           for line, module in imports(path)
           if module.split(".")[0] in {"tests"} | {"bench", "experiments"} - {unit(path)}]
    assert not bad, "\n".join(bad)


def sys_path_edits(path: Path) -> list[int]:
    """Lines that edit sys.path: sys.path.insert/append/extend(...), sys.path[...] = ...,
    sys.path += ..."""
    def is_sys_path(node: ast.AST) -> bool:
        return (isinstance(node, ast.Attribute) and node.attr == "path"
                and isinstance(node.value, ast.Name) and node.value.id == "sys")
    lines = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) \
                and node.func.attr in ("insert", "append", "extend") and is_sys_path(node.func.value):
            lines.append(node.lineno)
        elif isinstance(node, (ast.Assign, ast.AugAssign)):
            targets = node.targets if isinstance(node, ast.Assign) else [node.target]
            if any(is_sys_path(t) or isinstance(t, ast.Subscript) and is_sys_path(t.value)
                   for t in targets):
                lines.append(node.lineno)
    return sorted(lines)


def test_sys_path_edit_is_detected(tmp_path):
    probe = tmp_path / "probe.py"
    probe.write_text("import sys\nsys.path.insert(0, 'x')\nsys.path.append('y')\n"
                     "sys.path[:0] = ['z']\nprint(sys.path)\n")
    assert sys_path_edits(probe) == [2, 3, 4]


def test_bench_and_experiments_do_not_edit_sys_path():
    bad = [where(path, line) for path in python_files() if unit(path) in ("bench", "experiments")
           for line in sys_path_edits(path)]
    assert not bad, ("bench/ and experiments/ run as `python -m bench.x` / "
                     "`python -m experiments.x` from the root; they edit sys.path at:\n"
                     + "\n".join(bad))


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for nxt in sorted(graph.get(node, ())):
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


def test_find_cycle_finds_one():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": set()}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None


def test_package_graph_is_acyclic():
    graph = dependency_graph()
    cycle = find_cycle(graph)
    assert cycle is None, (f"import cycle {' -> '.join(cycle)} in the package graph:\n"
                           + show(graph))


def documented_graph() -> dict[str, set[str]]:
    """The `package -> dependencies` lines of docs/architecture.md's import section."""
    text = (ROOT / "docs" / "architecture.md").read_text()
    block = re.search(r"<!-- imports -->\n```\n(.*?)```", text, re.S)
    assert block, "docs/architecture.md has no <!-- imports --> block"
    graph = {}
    for line in block.group(1).splitlines():
        name, _, deps = line.partition("->")
        deps = deps.split("#")[0].strip()
        graph[name.strip().rstrip("/")] = ({d.strip().rstrip("/") for d in deps.split(",")}
                                          if deps not in ("", "(nothing)") else set())
    return graph


def test_docs_draw_the_real_package_graph():
    """docs/architecture.md's import picture is the graph the imports make: an edge added
    or dropped in the code must be drawn (or undrawn) there."""
    real, drawn = dependency_graph(), documented_graph()
    assert real == drawn, (f"docs/architecture.md draws\n{show(drawn)}\nbut the imports "
                           f"are\n{show(real)}")
