"""Every `module.name` the code reads through an imported project module exists: a rename or a move that left a
caller behind fails here, on the CPU, even where the caller only runs on a GPU (a GPU test calling a helper moved to
another file went unnoticed for a session). A static walk: the modules named at the top of a file by
`import a.b as m` or `from a import b` (b a module), read as `m.name` anywhere in it, m never rebound."""

from __future__ import annotations

import ast
import importlib
import os
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("kernels", "models", "runtime", "server", "benchmarks", "tests")


def _is_module(name: str) -> bool:
    path = ROOT / name.replace(".", "/")
    return path.with_suffix(".py").exists() or (path / "__init__.py").exists()


def _module_aliases(tree: ast.Module) -> dict[str, str]:
    # name in this file -> the project module it is bound to by a top-level import
    aliases = {}
    for node in tree.body:
        if isinstance(node, ast.Import):
            for a in node.names:
                if a.asname and a.name.split(".")[0] in PACKAGES:
                    aliases[a.asname] = a.name
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            for a in node.names:
                full = f"{node.module}.{a.name}"
                if node.module.split(".")[0] in PACKAGES and _is_module(full):
                    aliases[a.asname or a.name] = full
    return aliases


def _rebound(tree: ast.Module) -> set[str]:
    # names also bound by something other than a top-level import: a local variable, an argument, a nested import
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Name) and isinstance(node.ctx, ast.Store):
            names.add(node.id)
        elif isinstance(node, ast.arg):
            names.add(node.arg)
        elif isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            names.add(node.name)
            names |= {a.asname or a.name.split(".")[0] for n in ast.walk(node) if isinstance(n, (ast.Import,
                      ast.ImportFrom)) for a in n.names}
    return names


def missing_refs(path: Path) -> list[str]:
    tree = ast.parse(path.read_text(), str(path))
    aliases = _module_aliases(tree)
    for name in _rebound(tree):
        aliases.pop(name, None)
    missing = []
    for node in ast.walk(tree):
        if (isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id in aliases
                and isinstance(node.ctx, ast.Load)):
            module = importlib.import_module(aliases[node.value.id])
            if not hasattr(module, node.attr):
                where = path.relative_to(ROOT) if path.is_relative_to(ROOT) else path
                missing.append(f"{where}:{node.lineno}: {module.__name__}.{node.attr}")
    return missing


def test_every_module_attribute_read_exists(monkeypatch: pytest.MonkeyPatch) -> None:
    if "TRITON_INTERPRET" not in os.environ:  # importing kernels' modules on a CPU machine
        monkeypatch.setenv("TRITON_INTERPRET", "1")
    files = sorted(p for pkg in PACKAGES for p in (ROOT / pkg).rglob("*.py"))
    assert len(files) > 100
    missing = [m for f in files for m in missing_refs(f)]
    assert not missing, "\n".join(missing)


def test_a_stale_reference_is_found(tmp_path: Path) -> None:
    # the walk itself: a read of a name the module lacks is reported; a local that shadows the alias is not
    src = ("import kernels.moe_align as align\nfrom kernels import fp8\n\n\n"
           "def f():\n    return align.moe_align, align._no_such_name, fp8.widen_e4m3, fp8._gone\n\n\n"
           "def g(fp8):\n    return fp8.anything\n")
    path = tmp_path / "probe.py"
    path.write_text(src)
    assert [m.split(": ")[1] for m in missing_refs(path)] == ["kernels.moe_align._no_such_name"]
