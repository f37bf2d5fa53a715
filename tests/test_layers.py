"""The architecture (README "Architecture", issue 18): layers that import only downwards, no import
cycle between modules, no private name imported from another module."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("pipeline", "extractors", "models", "stages")


def module_files() -> dict[str, Path]:
    out = {}
    for pkg in PACKAGES:
        for f in (ROOT / pkg).rglob("*.py"):
            parts = f.relative_to(ROOT).with_suffix("").parts
            name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
            out[name] = f
    return out


def imports_of(name: str, path: Path, modules: dict[str, Path]) -> list[tuple[str, str | None, int]]:
    """``(imported module, imported name or None, line)`` of every import of ours in ``path``,
    including those inside functions (a delayed import is still an edge)."""
    out = []
    is_pkg = path.name == "__init__.py"
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            out += [(a.name, None, node.lineno) for a in node.names if a.name.split(".")[0] in PACKAGES]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = name.split(".") if is_pkg else name.split(".")[:-1]
                base = base[: len(base) - (node.level - 1)]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            if target.split(".")[0] not in PACKAGES:
                continue
            for a in node.names:
                full = f"{target}.{a.name}"
                out.append((full, None, node.lineno) if full in modules else (target, a.name, node.lineno))
    return out


def test_layers_contract_is_kept():
    """import-linter's layers contract in pyproject.toml: application -> stages -> extractors |
    models -> core, each importing only the layers below it."""
    pytest.importorskip("importlinter.cli")
    # in a process of its own: import-linter's logging set-up disables the loggers already made
    code = ("import sys, importlinter.cli as c; "
            f"sys.exit(c.lint_imports(config_filename={str(ROOT / 'pyproject.toml')!r}, no_cache=True, no_logo=True))")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stdout + out.stderr


def test_no_import_cycles():
    modules = module_files()
    graph = {m: {t for t, _, _ in imports_of(m, f, modules) if t in modules and t != m} for m, f in modules.items()}
    # Tarjan's strongly connected components: a component of more than one module is a cycle
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    cycles: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                cycles.append(sorted(comp))

    for m in sorted(graph):
        if m not in index:
            visit(m)
    assert cycles == []


def test_no_private_name_is_imported_from_another_module():
    modules = module_files()
    bad = [f"{f.relative_to(ROOT)}:{line}: {target}.{name}"
           for m, f in modules.items() for target, name, line in imports_of(m, f, modules)
           if name is not None and name.startswith("_") and not name.startswith("__")]
    assert bad == []


def test_the_checks_see_a_cycle_and_a_private_import(tmp_path):
    """The two checks above can fail: on a planted cycle and a planted private import they do."""
    a, b = tmp_path / "a.py", tmp_path / "b.py"
    a.write_text("from stages.b import _helper\n")
    b.write_text("import stages.a\n")
    modules = {"stages.a": a, "stages.b": b}
    assert imports_of("stages.a", a, modules) == [("stages.b", "_helper", 1)]
    assert imports_of("stages.b", b, modules) == [("stages.a", None, 1)]
