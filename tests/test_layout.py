"""The package's shape: the grid runner and the analysis load without torch, and imports (those
inside functions included) never form a cycle, between modules or between sub-packages, so the
package can be read in one order with no import pointing back up."""

from __future__ import annotations

import ast
import re
import subprocess
import sys
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "oisd_lab"


def test_the_grid_runner_collect_and_analysis_import_without_torch():
    code = ("import sys, oisd_lab.grid, oisd_lab.grid.local, oisd_lab.collect, oisd_lab.analysis, "
            "oisd_lab.run.folder; assert 'torch' not in sys.modules, 'torch was imported'")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          cwd=PACKAGE.parent, timeout=120)
    assert done.returncode == 0, done.stderr


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports(path: Path, name: str, modules: set[str]) -> set[str]:
    """Package modules that `path` imports anywhere in its body (its own ancestor packages aside:
    Python loads those first anyway)."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            base = package.split(".")[: len(package.split(".")) - node.level + 1] if node.level else []
            module = ".".join([*base, *([node.module] if node.module else [])])
            subs = {f"{module}.{a.name}" for a in node.names} & modules
            found |= subs or {module}
        elif isinstance(node, ast.Import):
            found |= {a.name for a in node.names}
    return {m for m in found & modules if m != name and not name.startswith(m + ".")}


def _cycle(graph: dict[str, set[str]]) -> list[str]:
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(node: str) -> list[str]:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                return [*stack[stack.index(nxt):], nxt]
            if nxt not in state and (found := visit(nxt)):
                return found
        stack.pop()
        state[node] = 2
        return []

    for node in sorted(graph):
        if node not in state and (found := visit(node)):
            return found
    return []


def test_the_cycle_finder_finds_a_cycle():
    assert _cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == ["a", "b", "c", "a"]
    assert _cycle({"a": {"b"}, "b": set(), "c": {"a", "b"}}) == []


def _graph() -> dict[str, set[str]]:
    files = {_module_name(p): p for p in PACKAGE.rglob("*.py")}
    return {name: _imports(path, name, set(files)) for name, path in files.items()}


def _room(name: str) -> str:
    """A sub-package counts as one room (`oisd_lab.tasks.datasets` -> `oisd_lab.tasks`)."""
    return ".".join(name.split(".")[:2])


def test_package_imports_form_no_cycle():
    graph = _graph()
    assert "oisd_lab.run.folder" in graph["oisd_lab.grid.local"]  # the graph sees relative imports
    assert _cycle(graph) == []


def test_sub_packages_and_modules_form_no_cycle():
    rooms: dict[str, set[str]] = {}
    for name, targets in _graph().items():
        rooms.setdefault(_room(name), set()).update(_room(t) for t in targets if _room(t) != _room(name))
    assert {"oisd_lab.run", "oisd_lab.config"} <= rooms["oisd_lab.grid"]
    assert _cycle(rooms) == []


def _readme_order() -> list[str]:
    """The rooms of the README's package table, top to bottom."""
    table = (PACKAGE.parent / "README.md").read_text().split("| module | its one job |")[1]
    rows = [line for line in table.splitlines() if line.startswith("| `")]
    return [f"oisd_lab.{name}" for row in rows for name in re.findall(r"`([\w]+)(?:\.py|/)`", row.split("|")[1])]


def test_the_readme_names_every_module_and_no_import_points_up_its_table():
    order = _readme_order()
    assert order[:3] == ["oisd_lab.errors", "oisd_lab.options", "oisd_lab.provenance"]
    rooms = {_room(name) for name in _graph()} - {"oisd_lab", "oisd_lab.__main__"}
    assert sorted(rooms - set(order)) == []  # every module and sub-package has a row
    rank = {name: i for i, name in enumerate(order)} | {"oisd_lab": -1, "oisd_lab.__main__": len(order)}
    upward = sorted(f"{name} -> {target}" for name, targets in _graph().items() for target in targets
                    if rank[_room(target)] > rank[_room(name)])
    assert upward == []


def _unexplained_function_imports(path: Path) -> list[int]:
    """Lines of package-internal imports inside a function whose import block has no comment
    above it (or on the line)."""
    lines = path.read_text().splitlines()
    found = []
    for node in ast.walk(ast.parse("\n".join(lines))):
        if not isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            continue
        for sub in ast.walk(node):
            if not (isinstance(sub, ast.ImportFrom) and (sub.level or (sub.module or "").startswith("oisd_lab"))):
                continue
            i = sub.lineno - 1
            while i > 0 and lines[i - 1].strip().startswith(("from ", "import ")) and "#" not in lines[i - 1]:
                i -= 1  # the first line of this block of imports
            if "#" not in lines[sub.lineno - 1] and not (i > 0 and lines[i - 1].strip().startswith("#")):
                found.append(sub.lineno)
    return found


def test_the_checker_of_function_imports_sees_a_missing_comment(tmp_path):
    path = tmp_path / "m.py"
    path.write_text("def f():\n    # why\n    from . import a\n    from . import b\n\n\ndef g():\n"
                    "    x = 1\n    from .c import d\n    import os\n")
    assert _unexplained_function_imports(path) == [9]


def test_every_package_import_inside_a_function_says_why():
    unexplained = [f"{p.relative_to(PACKAGE.parent)}:{n}" for p in sorted(PACKAGE.rglob("*.py"))
                   for n in _unexplained_function_imports(p)]
    assert unexplained == []


def test_nothing_outside_the_benchmarks_imports_them():
    """The benchmarks sit on top of the product: what they share with the planner lives in
    `oisd_lab.synthetic`. (`oisd-lab bench` reaches `oisd_lab.bench` through the CLI's table of
    subcommand modules, by name, not by an import.)"""
    into_bench = sorted(f"{name} -> {target}" for name, targets in _graph().items() for target in targets
                        if _room(target) == "oisd_lab.bench" and _room(name) != "oisd_lab.bench")
    assert into_bench == []


def _private(name: str) -> bool:
    return name.startswith("_") and not (name.startswith("__") and name.endswith("__"))


def _private_definitions(tree: ast.AST) -> set[str]:
    """Private names a module defines: functions, classes, methods, variables, arguments, and the
    attributes it assigns on its own objects (`self._x = ...`; `obj._x = ...` defines nothing)."""
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            found.add(node.name)
        elif isinstance(node, ast.Name) and isinstance(node.ctx, ast.Store):
            found.add(node.id)
        elif isinstance(node, ast.Attribute) and isinstance(node.ctx, ast.Store) \
                and isinstance(node.value, ast.Name) and node.value.id in ("self", "cls"):
            found.add(node.attr)
        elif isinstance(node, ast.arg):
            found.add(node.arg)
    return {name for name in found if _private(name)}


def _private_crossings(files: dict[str, Path]) -> list[str]:
    """`module: name` for each private name a module reaches in another package module: imported
    from it (`from .x import _y`), read off it (`x._y`), or read off an object (`obj._y`, `obj` not
    `self` or `cls`) when `_y` is defined in another package module and not in this one."""
    trees = {name: ast.parse(path.read_text()) for name, path in files.items()}
    defined = {name: _private_definitions(tree) for name, tree in trees.items()}
    elsewhere: dict[str, set[str]] = {}
    for name, names in defined.items():
        for private in names:
            elsewhere.setdefault(private, set()).add(name)
    found = set()
    for name, tree in trees.items():
        package = name if files[name].name == "__init__.py" else name.rpartition(".")[0]
        modules: dict[str, str] = {}  # local name -> the package module it is bound to
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom):
                base = package.split(".")[: len(package.split(".")) - node.level + 1] if node.level else []
                source = ".".join([*base, *([node.module] if node.module else [])])
                for alias in node.names:
                    if f"{source}.{alias.name}" in files:
                        modules[alias.asname or alias.name] = f"{source}.{alias.name}"
                    elif _private(alias.name) and source in files and source != name:
                        found.add(f"{name}: {source}.{alias.name}")
            elif isinstance(node, ast.Import):
                modules |= {alias.asname or alias.name: alias.name for alias in node.names if alias.name in files}
        for node in ast.walk(tree):
            if not (isinstance(node, ast.Attribute) and _private(node.attr)):
                continue
            owner = modules.get(node.value.id) if isinstance(node.value, ast.Name) else None
            if owner is not None:
                if owner != name:
                    found.add(f"{name}: {owner}.{node.attr}")
            elif not (isinstance(node.value, ast.Name) and node.value.id in ("self", "cls")) \
                    and node.attr not in defined[name] and elsewhere.get(node.attr):
                found.add(f"{name}: {'|'.join(sorted(elsewhere[node.attr]))}.{node.attr}")
    return sorted(found)


def test_the_crossing_finder_sees_imports_module_attributes_and_object_attributes(tmp_path):
    (tmp_path / "pkg").mkdir()
    (tmp_path / "pkg" / "a.py").write_text("def _f():\n    pass\n\n\nclass A:\n    def _m(self):\n"
                                           "        self._x = 1\n")
    (tmp_path / "pkg" / "b.py").write_text("from . import a\nfrom .a import _f, A\n\n\ndef g(obj):\n"
                                           "    a._f()\n    obj._m()\n    obj._local()\n    obj.__len__()\n")
    (tmp_path / "pkg" / "c.py").write_text("def _m(self):\n    return self._x\n\n\ndef h(o):\n"
                                           "    return o._m()\n")
    files = {f"pkg.{p.stem}": p for p in (tmp_path / "pkg").glob("*.py")}
    assert _private_crossings(files) == ["pkg.b: pkg.a._f", "pkg.b: pkg.a|pkg.c._m"]


def test_no_private_name_crosses_a_module_boundary():
    files = {_module_name(p): p for p in PACKAGE.rglob("*.py")}
    assert _private_crossings(files) == []
