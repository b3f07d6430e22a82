"""Import rules of the `casa` package, read from the source (AST), not by importing it.

Every import counts, the ones inside functions too (a lazy import is still a cycle, it only
hides it until the function runs), except those under `if TYPE_CHECKING:`, which never run.
"""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def _module_name(path: Path, root: Path) -> str:
    parts = path.relative_to(root).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


def _runtime_imports(tree: ast.AST, module: str, is_package: bool) -> list[tuple[str, tuple[str, ...]]]:
    """Every import `tree` runs, as (absolute module, names taken from it): `import a.b` gives
    ("a.b", ()), `from a import b, c` gives ("a", ("b", "c")) (b may be a submodule)."""
    found: list[tuple[str, tuple[str, ...]]] = []
    package = module if is_package else module.rpartition(".")[0]

    def visit(node: ast.AST) -> None:
        if isinstance(node, ast.If) and _is_type_checking(node.test):
            for child in node.orelse:
                visit(child)
            return
        if isinstance(node, ast.Import):
            found.extend((alias.name, ()) for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:  # relative: from .x import y, from .. import z
                base = package.rsplit(".", node.level - 1)[0] if node.level > 1 else package
                source = f"{base}.{node.module}" if node.module else base
            else:
                source = node.module
            found.append((source, tuple(alias.name for alias in node.names)))
        for child in ast.iter_child_nodes(node):
            visit(child)

    visit(tree)
    return found


def import_graph(root: Path, package: str) -> dict[str, set[str]]:
    """module -> the modules of `package` it imports at run time, for every module under
    root/package. `from a import b` depends on a.b when b is a module, else on a itself.
    Importing a.b.c runs a/__init__.py and a/b/__init__.py first, so a module outside a
    package that imports one of its modules depends on the package's __init__ too (a module
    inside that package does not: its package is already being imported)."""
    paths = sorted((root / package).rglob("*.py"))
    modules = {_module_name(p, root): p for p in paths}
    graph: dict[str, set[str]] = {}
    for name, path in modules.items():
        targets = set()
        for source, taken in _runtime_imports(ast.parse(path.read_text(), str(path)), name, path.name == "__init__.py"):
            submodules = {f"{source}.{t}" for t in taken} & modules.keys()
            targets |= submodules
            if len(submodules) < len(taken) or not taken:
                targets.add(source)  # names defined by the module itself, or `import source`
        deps = set()
        for target in targets & modules.keys():
            deps.add(target)
            parts = target.split(".")
            for i in range(1, len(parts)):
                parent = ".".join(parts[:i])
                if not (name == parent or name.startswith(parent + ".")):
                    deps.add(parent)
        deps.discard(name)
        graph[name] = deps
    return graph


def external_imports(root: Path, package: str, prefixes: tuple[str, ...]) -> dict[str, set[str]]:
    """module of `package` -> the modules it imports at run time from under any of `prefixes`
    (e.g. the application packages `data`, `callbacks`, `experiments`, `lightning`)."""
    found = {}
    for path in sorted((root / package).rglob("*.py")):
        name = _module_name(path, root)
        imports = _runtime_imports(ast.parse(path.read_text(), str(path)), name, path.name == "__init__.py")
        hits = {source for source, _ in imports if source.split(".")[0] in prefixes}
        if hits:
            found[name] = hits
    return found


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One cycle of `graph` as [a, b, ..., a], or None if it is acyclic (depth-first search)."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for dep in sorted(graph.get(node, ())):
            if state.get(dep) == 1:
                return path[path.index(dep):] + [dep]
            if dep not in state and (cycle := visit(dep)):
                return cycle
        state[node] = 2
        path.pop()
        return None

    for node in sorted(graph):
        if node not in state and (cycle := visit(node)):
            return cycle
    return None


def test_casa_modules_import_each_other_without_a_cycle():
    graph = import_graph(ROOT, "casa")
    assert "casa.blocks" in graph and "casa.fusion.layers" in graph  # the walk found the package
    cycle = find_cycle(graph)
    assert cycle is None, f"import cycle among casa modules: {' -> '.join(cycle)}"


def test_the_blocks_and_the_stream_context_do_not_import_the_fusion_package():
    """The fusion strategies build on the blocks, never the other way round (issue 15)."""
    graph = import_graph(ROOT, "casa")
    for module in ("casa.blocks", "casa.context"):
        fusion = {m for m in graph[module] if m == "casa.fusion" or m.startswith("casa.fusion.")}
        assert not fusion, f"{module} imports {sorted(fusion)}"
    assert graph["casa.context"] == set(), f"casa.context imports {sorted(graph['casa.context'])} at run time"


def _write(root: Path, files: dict[str, str]) -> None:
    for rel, text in files.items():
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)


def test_the_checker_finds_a_cycle_through_a_lazy_import_and_a_package_init(tmp_path):
    """The shape of the old cycle: blocks -> (lazily) fusion.layers -> fusion.windows -> blocks,
    where importing fusion.layers also runs fusion/__init__.py."""
    _write(tmp_path, {
        "pkg/__init__.py": "",
        "pkg/blocks.py": "def f():\n    from pkg.fusion.layers import g\n",
        "pkg/fusion/__init__.py": "from pkg.fusion.layers import g\n",
        "pkg/fusion/layers.py": "from . import windows\ndef g():\n    pass\n",
        "pkg/fusion/windows.py": "from pkg import blocks\n",
    })
    graph = import_graph(tmp_path, "pkg")
    assert graph["pkg.blocks"] == {"pkg.fusion", "pkg.fusion.layers"}
    assert graph["pkg.fusion.layers"] == {"pkg.fusion.windows"}  # a sibling: the package is being imported
    cycle = find_cycle(graph)
    assert cycle is not None and cycle[0] == cycle[-1] and "pkg.blocks" in cycle and "pkg.fusion.windows" in cycle


def test_the_checker_ignores_type_checking_imports_and_reports_application_imports(tmp_path):
    _write(tmp_path, {
        "pkg/__init__.py": "",
        "pkg/a.py": "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from pkg.b import B\n",
        "pkg/b.py": "import pkg.a\ndef load():\n    import data.packing\n    from lightning import Trainer\n",
    })
    graph = import_graph(tmp_path, "pkg")
    assert graph == {"pkg": set(), "pkg.a": set(), "pkg.b": {"pkg.a"}}
    assert find_cycle(graph) is None
    assert external_imports(tmp_path, "pkg", ("data", "lightning")) == {
        "pkg.b": {"data.packing", "lightning"}}


APPLICATION = ("data", "callbacks", "experiments", "lightning")


def _imports_of(package: str, prefixes: tuple[str, ...], outside: str | None = None) -> dict[str, set[str]]:
    """external_imports of `package`, leaving out the modules under `outside` (a subpackage)."""
    return {m: hits for m, hits in external_imports(ROOT, package, prefixes).items()
            if outside is None or not (m == outside or m.startswith(outside + "."))}


def test_the_model_package_imports_no_application_package_outside_its_training_part():
    """The layers of the code (DESIGN.md): `casa` (model, the per-sample processor, inference)
    needs torch and transformers only; `casa.train` (LightningModule, optimiser, validation
    metrics) adds lightning; data -> casa; callbacks -> casa, data; experiments -> everything."""
    assert "casa.assistant" in import_graph(ROOT, "casa")  # the walk found the package
    bad = _imports_of("casa", APPLICATION, outside="casa.train")
    assert not bad, f"casa modules importing {APPLICATION}: {bad}"
    bad = _imports_of("casa", ("data", "callbacks", "experiments"))
    assert not bad, f"casa.train may import lightning, not the application packages: {bad}"
    bad = _imports_of("data", ("callbacks", "experiments"))
    assert not bad, f"data modules importing callbacks/experiments: {bad}"
    bad = _imports_of("callbacks", ("experiments",))
    assert not bad, f"callbacks modules importing experiments: {bad}"


def test_the_library_never_imports_the_tests():
    """Test tools live in tests/ (`tests.builders`); the benchmarks and the demo use `casa.tiny`."""
    for package in ("casa", "data", "callbacks", "experiments"):
        bad = _imports_of(package, ("tests",))
        assert not bad, f"{package} modules importing tests: {bad}"
