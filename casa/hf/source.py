"""The export's remote code: casa's own modules, copied next to the weights (`casa.hf`).

transformers runs remote code from one folder: `dynamic_module_utils.get_relative_imports`
copies the files named by `from .x import` lines (same folder, no sub-packages), and
`check_imports` refuses a file with an absolute import of a package that is not installed
(anywhere in the file, function bodies included; only `try:` blocks are skipped). So the
modules the exported model needs are found by following casa imports from the entry modules,
copied flat, and only their import statements are rewritten:

    casa/fusion/casa.py           ->  DIR/casa_fusion_casa.py    (package path joined by "_")
    casa/hf/modeling_casa.py      ->  DIR/modeling_casa.py       (casa.hf keeps its names: auto_map)
    from casa.fusion.base import mark_new      ->  from .casa_fusion_base import mark_new
    from casa.fusion import CASA               ->  from .casa_fusion_casa import CASA
        (a package re-export points at the defining module, so a package's __init__, which
        imports every strategy, is not copied: an export holds its own strategy's code)
    import av  (an optional package)          ->  av = __import__("av")
        (imported where used, as before; `check_imports` does not see it, so a machine without
        PyAV loads the model and fails only when it opens a video)

Everything else is the library's text; `tests/test_hf_release.py` checks that line by line.
`casa/hf/parts.py` is the one file an export writes instead of copying: it imports exactly the
classes of the export's model spec (`parts_module`).
"""

from __future__ import annotations

import ast
import importlib
import importlib.util
import inspect
from pathlib import Path
from types import ModuleType

PACKAGE = "casa"
OPTIONAL = ("av", "flash_attn")
"""Packages casa imports inside functions only when a feature needs them (video, CUDA kernels)."""
GENERATED = "casa.hf.parts"
"""Written per export (`parts_module`), never copied."""


def flat_name(module: str) -> str:
    """casa.fusion.casa -> casa_fusion_casa; casa.hf.modeling_casa -> modeling_casa."""
    if module.startswith(PACKAGE + ".hf."):
        return module.rsplit(".", 1)[1]
    return module.replace(".", "_")


def _source_path(module: str) -> Path:
    spec = importlib.util.find_spec(module)
    if spec is None or spec.origin is None:
        raise ValueError(f"remote code: module {module!r} has no source file")
    return Path(spec.origin)


def _defining_module(package_module: str, name: str) -> str:
    """The module that defines `name` as imported from `package_module` (a class or function
    re-exported by a package __init__ -> its own module; a constant -> package_module)."""
    obj = getattr(importlib.import_module(package_module), name)
    if isinstance(obj, ModuleType):
        raise ValueError(f"remote code: `from {package_module} import {name}` imports a module; "
                         "import from it by its full name instead")
    home = getattr(obj, "__module__", None) if inspect.isclass(obj) or inspect.isfunction(obj) else None
    if home and home.startswith(PACKAGE + ".") and getattr(importlib.import_module(home), name, None) is obj:
        return home
    return package_module


def _absolute(node: ast.ImportFrom, module: str) -> str | None:
    """The absolute module an ImportFrom names (relative ones resolved against `module`)."""
    if node.level == 0:
        return node.module
    package = module if _source_path(module).name == "__init__.py" else module.rpartition(".")[0]
    return importlib.util.resolve_name("." * node.level + (node.module or ""), package)


def _casa_imports(module: str) -> list[tuple[ast.ImportFrom, dict[str, list[ast.alias]]]]:
    """Every `from casa... import` of `module` (any depth) -> (node, {defining module: aliases})."""
    tree = ast.parse(_source_path(module).read_text())
    out = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import) and any(a.name.split(".")[0] == PACKAGE for a in node.names):
            raise ValueError(f"remote code: {module} line {node.lineno} uses `import casa...`; use `from casa... import`")
        if not isinstance(node, ast.ImportFrom):
            continue
        target = _absolute(node, module)
        if target is None or target.split(".")[0] != PACKAGE or target == "__future__":
            continue
        groups: dict[str, list[ast.alias]] = {}
        for alias in node.names:
            home = GENERATED if target == GENERATED else _defining_module(target, alias.name)
            groups.setdefault(home, []).append(alias)
        out.append((node, groups))
    return out


def required_modules(entries: list[str]) -> list[str]:
    """The casa modules `entries` need, following casa imports (function-level ones too,
    since transformers copies what any `from .x import` line names) -> sorted names."""
    seen: set[str] = set()
    todo = list(entries)
    while todo:
        m = todo.pop()
        if m in seen or m == GENERATED:
            continue
        seen.add(m)
        for _, groups in _casa_imports(m):
            todo.extend(groups)
    return sorted(seen)


def _alias(a: ast.alias) -> str:
    return a.name if a.asname is None else f"{a.name} as {a.asname}"


def rewrite(module: str) -> str:
    """`module`'s source with its casa imports made relative to the flat export folder and
    its optional-package imports made invisible to `check_imports` (module docstring above)."""
    path = _source_path(module)
    lines = path.read_text().splitlines(keepends=True)
    tree = ast.parse("".join(lines))
    edits: dict[int, tuple[int, list[str]]] = {}  # first line -> (last line, replacement lines)
    casa_nodes = {(node.lineno, node.col_offset): groups for node, groups in _casa_imports(module)}
    for node in ast.walk(tree):
        if not isinstance(node, (ast.Import, ast.ImportFrom)):
            continue
        indent = " " * node.col_offset
        if lines[node.lineno - 1][:node.col_offset].strip():
            raise ValueError(f"remote code: {path} line {node.lineno}: an import shares its line with other code")
        new: list[str] | None = None
        if (node.lineno, node.col_offset) in casa_nodes:
            new = [f"{indent}from .{flat_name(home)} import {', '.join(map(_alias, aliases))}\n"
                   for home, aliases in casa_nodes[node.lineno, node.col_offset].items()]
        elif isinstance(node, ast.Import) and any(a.name.split(".")[0] in OPTIONAL for a in node.names):
            new = [f"{indent}{a.asname or a.name} = __import__({a.name!r})\n" for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and (node.module or "").split(".")[0] in OPTIONAL:
            new = [f"{indent}{a.asname or a.name} = getattr(__import__({node.module!r}, fromlist=[{a.name!r}]), "
                   f"{a.name!r})\n" for a in node.names]
        if new is not None:
            edits[node.lineno - 1] = (node.end_lineno - 1, new)
    out, i = [], 0
    while i < len(lines):
        if i in edits:
            last, new = edits[i]
            out.extend(new)
            i = last + 1
        else:
            out.append(lines[i])
            i += 1
    return "".join(out)


def parts_module(class_paths: list[str]) -> str:
    """The export's `parts.py`: `resolve(class_path)` for exactly the classes of its model spec
    (statically imported, so transformers copies their modules and only theirs)."""
    imports, table = [], []
    for path in sorted(set(class_paths)):
        package, _, name = path.rpartition(".")
        home = _defining_module(package, name)
        imports.append(f"from .{flat_name(home)} import {name}")
        table.append(f"    {path!r}: {name},")
    return ('"""Written by casa.hf.export: the classes this export\'s model spec names (casa/hf/parts.py\'s\n'
            'role in the library, where classes are imported by their path)."""\n\n'
            + "\n".join(imports) + "\n\nCLASSES = {\n" + "\n".join(table) + "\n}\n\n\n"
            "def resolve(class_path: str):\n"
            '    """A class path of the model spec -> its class (only this export\'s are here)."""\n'
            "    if class_path not in CLASSES:\n"
            '        raise ValueError(f"class_path={class_path!r} is not one of this export\'s classes {sorted(CLASSES)}")\n'
            "    return CLASSES[class_path]\n")


def write_remote_code(out: Path, entries: list[str], class_paths: list[str]) -> list[str]:
    """Copy the modules `entries` and the spec's classes need into `out` (flat, imports
    rewritten) and write its parts.py -> the file names written."""
    homes = [_defining_module(p.rpartition(".")[0], p.rpartition(".")[2]) for p in class_paths]
    written = []
    # `from .parts import resolve` in modeling_casa is the export's own parts.py (GENERATED)
    for module in required_modules(list(entries) + homes):
        name = flat_name(module) + ".py"
        (out / name).write_text(rewrite(module))
        written.append(name)
    (out / "parts.py").write_text(parts_module(class_paths))
    return written + ["parts.py"]
